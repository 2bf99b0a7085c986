"""Discovery: list a run's source into the files table, in chunks, on any replica.

A replica claims a DISCOVERING run (skip-locked), then streams the listing:
each chunk is one short transaction that upserts the files, moves the resume
cursor and refreshes the claim's heartbeat. Agents can lease a chunk's files
as soon as it commits. No transaction is open while the source is listed.

If the replica dies, its heartbeat goes stale and another replica (or this
one, restarted) claims the run and resumes after the cursor; re-listing a
chunk is harmless because the upsert is idempotent.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import uuid
from collections.abc import Callable, Generator, Iterator
from datetime import timedelta
from queue import Empty, Queue
from typing import Protocol

from controlplane.domain.errors import DatabaseUnavailable
from controlplane.domain.ingestion import Source
from controlplane.domain.runs import ListedFile, Run
from controlplane.service.changes import ChangeFeed
from controlplane.service.ports import UnitOfWork

log = logging.getLogger(__name__)


class Lister(Protocol):
    def list(self, source: Source, after: str | None = None) -> Iterator[ListedFile]: ...


class DiscoveryService:
    def __init__(
        self,
        uow_factory: Callable[[], UnitOfWork],
        lister: Lister,
        listing_errors: tuple[type[Exception], ...],
        run_changes: ChangeFeed,
        *,
        owner: str | None = None,
        chunk_size: int = 1000,
        stale_after: timedelta = timedelta(seconds=30),
    ) -> None:
        self._uow_factory = uow_factory
        self._lister = lister
        self._listing_errors = listing_errors
        self._run_changes = run_changes
        self.owner = owner or f"cp-{uuid.uuid4().hex[:12]}"
        self._chunk_size = chunk_size
        self._stale_after = stale_after

    def claim(self) -> tuple[Run, Source, str | None] | None:
        with self._uow_factory() as uow:
            claimed = uow.runs.claim_discovery(self.owner, self._stale_after)
            if claimed is None:
                return None
            run, cursor = claimed
            ingestion = uow.ingestions.get_by_pk(run.ingestion_pk)
            uow.commit()
        assert ingestion is not None  # runs are deleted with their ingestion
        return run, ingestion.spec.source, cursor

    def discover_next(self, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Claims one run and discovers it to the end; False when there was nothing to claim."""
        claimed = self.claim()
        if claimed is None:
            return False
        run, source, cursor = claimed
        self.discover(run, source, cursor, should_stop)
        return True

    def discover(
        self, run: Run, source: Source, cursor: str | None, should_stop: Callable[[], bool] = lambda: False
    ) -> None:
        extra = {"run": run.name, "owner": self.owner}
        log.info("discovery %s", "resumed" if cursor else "started", extra={"action": "discovery.start", **extra})
        listed = queued = 0
        with contextlib.closing(prefetch_chunks(self._lister.list(source, after=cursor), self._chunk_size)) as chunks:
            try:
                while True:
                    if should_stop():
                        # Hand the run back so a replica (or our restart) resumes it at once.
                        with self._uow_factory() as uow:
                            uow.runs.release_discovery(run.id, self.owner)
                            uow.commit()
                        log.info("discovery paused for shutdown", extra={"action": "discovery.release", **extra})
                        return
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
                    with self._uow_factory() as uow:
                        if not uow.runs.heartbeat_discovery(run.id, self.owner, chunk[-1].path):
                            log.info(
                                "discovery stopped: run cancelled or taken over",
                                extra={"action": "discovery.lost", **extra},
                            )
                            return
                        queued += uow.files.upsert_discovered(run.ingestion_pk, run.id, chunk)
                        uow.commit()
                    listed += len(chunk)
                    self._run_changes.notify()
            except DatabaseUnavailable:
                # Nothing to record while the database is away: the heartbeat goes stale
                # and this or another replica resumes from the last committed chunk.
                log.warning(
                    "discovery interrupted: database unavailable", extra={"action": "discovery.db_down", **extra}
                )
                return
            except Exception as exc:
                if isinstance(exc, self._listing_errors):
                    reason = str(exc)
                else:
                    log.exception("discovery failed unexpectedly", extra={"action": "discovery.error", **extra})
                    reason = f"discovery failed: {type(exc).__name__}: {exc}"
                with self._uow_factory() as uow:
                    uow.runs.end_discovery(run.id, self.owner, error=reason)
                    uow.commit()
                self._run_changes.notify()
                log.warning("discovery failed: %s", reason, extra={"action": "discovery.failed", **extra})
                return
        with self._uow_factory() as uow:
            if uow.runs.end_discovery(run.id, self.owner):
                # Nothing new (or everything already done) ends the run right away.
                uow.runs.finalize_if_done(run.id)
            uow.commit()
        self._run_changes.notify()
        log.info(
            "discovery finished: %d files listed, %d queued",
            listed,
            queued,
            extra={"action": "discovery.end", "listed": listed, "queued": queued, **extra},
        )


_DONE = object()


def prefetch_chunks(items: Iterator[ListedFile], size: int, depth: int = 2) -> Generator[list[ListedFile]]:
    """Chunks of `items`, listed by a background thread up to `depth` chunks ahead,
    so listing the source overlaps with writing the previous chunk. Errors of the
    listing surface here, in the consumer; closing the generator stops the lister."""
    queue: Queue[object] = Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            while not stop.is_set():
                chunk = list(itertools.islice(items, size))
                if not chunk:
                    break
                queue.put(chunk)
            queue.put(_DONE)
        except BaseException as exc:
            queue.put(exc)

    thread = threading.Thread(target=produce, name="discovery-lister", daemon=True)
    thread.start()
    try:
        while True:
            item = queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(Empty):
                queue.get(timeout=0.1)
        thread.join()


class DiscoveryLoop:
    """Background thread: discover claimable runs; sleep until woken or `poll` passes."""

    def __init__(self, service: DiscoveryService, wakeup: ChangeFeed, poll: float = 2.0) -> None:
        self._service = service
        self._wakeup = wakeup
        self._poll = poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="discovery", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wakeup.notify()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        seen = self._wakeup.version
        while not self._stop.is_set():
            try:
                while not self._stop.is_set() and self._service.discover_next(self._stop.is_set):
                    pass
            except Exception:
                log.exception("discovery loop error; retrying", extra={"action": "discovery.error"})
                self._stop.wait(self._poll)
            seen = self._wakeup.wait(seen, self._poll)
