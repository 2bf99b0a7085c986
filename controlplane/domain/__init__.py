"""Entities, state machines and errors. Imports neither SQLAlchemy nor grpc."""
