"""Generated from protos/fabric/v1 by `make proto`."""
