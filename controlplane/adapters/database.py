"""Engine and session factory, with each setting's reason."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.orm import Session, sessionmaker


def sqlalchemy_url(url: str) -> str:
    """postgresql://... -> postgresql+psycopg://... (psycopg 3 is our driver)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, pool_size: int = 10) -> Engine:
    return create_engine(
        sqlalchemy_url(url),
        # The idempotency claim relies on READ COMMITTED: a statement that waited
        # on a concurrent insert sees that row once it commits.
        isolation_level="READ COMMITTED",
        # Pooled connections die with database restarts; test before use
        # instead of failing the next RPC.
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        # Fail fast (UNAVAILABLE) rather than queue RPCs behind a saturated pool.
        pool_timeout=10,
        connect_args={"connect_timeout": 5, "application_name": "autoloader-controlplane"},
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # Entities are returned to the API layer after commit; expiring them would
    # trigger lazy loads on a closed session.
    return sessionmaker(engine, expire_on_commit=False)
