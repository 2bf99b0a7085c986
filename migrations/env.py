"""Alembic environment: the ORM metadata is the target; the connection is handed in
by the control plane (config.attributes["connection"]) or built from -x url=..."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from controlplane.adapters.database import sqlalchemy_url
from controlplane.adapters.orm import Base

config = context.config
target_metadata = Base.metadata


def run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_server_default=True)
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("pass the database: alembic -c migrations/alembic.ini -x url=postgresql://... upgrade head")
    engine = create_engine(sqlalchemy_url(url))
    with engine.connect() as conn:
        run(conn)
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported")
main()
