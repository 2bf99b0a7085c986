"""The SQLAlchemy Unit of Work: one session, one transaction.

`with uow: ...; uow.commit()` - leaving the block without commit rolls back.
Losing the database surfaces as the domain's DatabaseUnavailable, whatever
statement hit it, so the API answers UNAVAILABLE instead of INTERNAL.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from controlplane.adapters.commit_repository import SqlCommitRepository
from controlplane.adapters.file_repository import SqlFileRepository
from controlplane.adapters.lease_repository import SqlLeaseRepository
from controlplane.adapters.repositories import SqlIdempotencyRepository, SqlIngestionRepository
from controlplane.adapters.run_repository import SqlRunRepository
from controlplane.domain.errors import DatabaseUnavailable


class SqlAlchemyUnitOfWork:
    ingestions: SqlIngestionRepository
    idempotency: SqlIdempotencyRepository
    runs: SqlRunRepository
    files: SqlFileRepository
    leases: SqlLeaseRepository
    commits: SqlCommitRepository

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory
        self._session: Session | None = None

    def __enter__(self) -> Self:
        self._session = self._session_factory()
        self.ingestions = SqlIngestionRepository(self._session)
        self.idempotency = SqlIdempotencyRepository(self._session)
        self.runs = SqlRunRepository(self._session)
        self.files = SqlFileRepository(self._session)
        self.leases = SqlLeaseRepository(self._session)
        self.commits = SqlCommitRepository(self._session)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._session is not None
        session, self._session = self._session, None
        try:
            session.rollback()  # a no-op after commit
        except DBAPIError:
            pass  # the connection is already gone
        finally:
            # Always close, so a dead connection is discarded rather than leaked.
            session.close()
        if isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
            raise DatabaseUnavailable() from exc

    def commit(self) -> None:
        assert self._session is not None, "commit outside 'with uow:'"
        self._session.commit()

    def rollback(self) -> None:
        assert self._session is not None, "rollback outside 'with uow:'"
        self._session.rollback()
