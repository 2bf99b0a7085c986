"""Engine and session factory, with each setting's reason."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc, make_url
from sqlalchemy.orm import Session, sessionmaker


def sqlalchemy_url(url: str) -> str:
    """postgresql://... -> postgresql+psycopg://... (psycopg 3 is our driver)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


# A pooled connection idle this long is tested before use (see _ping_when_idle).
PING_AFTER_IDLE_SECONDS = 5.0


def make_engine(url: str, pool_size: int = 10) -> Engine:
    engine = create_engine(
        sqlalchemy_url(url),
        # The idempotency claim relies on READ COMMITTED: a statement that waited
        # on a concurrent insert sees that row once it commits.
        isolation_level="READ COMMITTED",
        pool_size=pool_size,
        max_overflow=pool_size,
        # Fail fast (UNAVAILABLE) rather than queue RPCs behind a saturated pool.
        pool_timeout=10,
        connect_args={"connect_timeout": 5, "application_name": "autoloader-controlplane"},
    )
    _ping_when_idle(engine, PING_AFTER_IDLE_SECONDS)
    return engine


def _ping_when_idle(engine: Engine, idle_after: float) -> None:
    """Tests a pooled connection before use only if it sat idle in the pool.

    Pooled connections die with database restarts, so they are tested before
    use instead of failing the next RPC; but pool_pre_ping's round trip on every
    checkout was a fifth of a file report's cost. A connection that was in use a
    moment ago is alive as far as a ping could tell; if the database died since,
    the statement fails, the RPC answers UNAVAILABLE (clients retry) and the
    disconnect invalidates the whole pool.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection: Any, record: Any) -> None:
        record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if time.monotonic() - record.info.get("checked_in", 0.0) < idle_after:
            return
        # Autocommit, so the ping never shows as an open transaction, not even
        # for the instant between the SELECT and a rollback.
        autocommit = dbapi_connection.autocommit
        try:
            dbapi_connection.autocommit = True
            dbapi_connection.execute("SELECT 1")
            dbapi_connection.autocommit = autocommit
        except Exception as error:
            # The pool discards this connection and retries the checkout with a new one.
            raise exc.DisconnectionError() from error


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # Entities are returned to the API layer after commit; expiring them would
    # trigger lazy loads on a closed session.
    return sessionmaker(engine, expire_on_commit=False)
