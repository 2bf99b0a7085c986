"""Alembic migrations of the control-plane schema (env.py uses the ORM metadata)."""
