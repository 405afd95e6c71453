"""`fabric run`: every process of a config on this node, one command."""
