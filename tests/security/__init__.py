"""Security tests: TLS, mutual TLS, bearer tokens, namespaces."""
