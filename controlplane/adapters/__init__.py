"""Adapters to the outside world: PostgreSQL (ORM, repositories, unit of work), embedded server, migrations."""
