"""gRPC options every fabric server and channel uses: message limits and keepalive."""

# Weight chunks are a few MiB; leave headroom for big prompts too.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Calls (streams included) one server runs at once; more are refused RESOURCE_EXHAUSTED.
MAX_CONCURRENT_RPCS = 1024
# Calls open without a token (health) run within a budget of their own, on top: they cannot starve the others.
OPEN_CALL_SLOTS = 64
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Keepalive so that a dead peer on a long stream is noticed in seconds, not at TCP timeout.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # grpc-core times an unanswered ping out after this (60 s by default), not after keepalive_timeout_ms
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.so_reuseport", 0),
]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.ping_timeout_ms", 5_000),  # a silent peer is noticed in ~15 s, not ~70 s
]
