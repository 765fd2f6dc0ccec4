"""The turnid service: domain rules, stores, gRPC transport and CLI."""
