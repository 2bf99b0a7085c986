"""The autoloader control plane: gRPC API over ingestion, run and file state in PostgreSQL."""
