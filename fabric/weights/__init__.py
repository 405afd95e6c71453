"""Both ends of a weight update: chunking with checksums, staging, versions, relay fan-out."""
