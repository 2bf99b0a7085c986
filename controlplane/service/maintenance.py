"""Housekeeping in background loops on every replica: bounded tables, no run left unfinished."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from controlplane.service.changes import ChangeFeed
from controlplane.service.ports import UnitOfWork

log = logging.getLogger(__name__)

PURGE_BATCH = 1000
SWEEP_BATCH = 100


class MaintenanceService:
    def __init__(
        self,
        uow_factory: Callable[[], UnitOfWork],
        idempotency_retention: timedelta,
        changes: ChangeFeed | None = None,
    ) -> None:
        self._uow_factory = uow_factory
        self._retention = idempotency_retention
        self._changes = changes or ChangeFeed()

    def finalize_finished_runs(self) -> int:
        """Ends RUNNING runs whose files are all closed; returns how many it ended.

        A report ends its run when it saw itself close the last open file. Two
        concurrent last reports each see the other's file still open, and a
        control plane can crash between a report's commit and that step; this
        sweep ends such runs. Finalization is exactly once whoever does it.
        """
        ended = 0
        with self._uow_factory() as uow:
            candidates = uow.runs.finished_running(SWEEP_BATCH)
        for run_pk in candidates:
            with self._uow_factory() as uow:
                if uow.runs.finalize_if_done(run_pk) is not None:
                    uow.commit()
                    ended += 1
        if ended:
            self._changes.notify()
            log.info("ended %d finished runs", ended, extra={"action": "maintenance.finalize_runs"})
        return ended

    def purge_idempotency_records(self) -> int:
        """Forgets request ids older than the retention window, one short transaction per batch.

        A retry later than the window is treated as a new request; the window is
        documented (AUTOLOADER_IDEMPOTENCY_RETENTION) and defaults to 7 days.
        """
        total = 0
        while True:
            with self._uow_factory() as uow:
                purged = uow.idempotency.purge(self._retention, PURGE_BATCH)
                uow.commit()
            total += purged
            if purged < PURGE_BATCH:
                break
        if total:
            log.info("purged %d request ids", total, extra={"action": "maintenance.purge_idempotency"})
        return total


class MaintenanceLoop:
    """Runs each task every its interval until stopped; failures are logged, not fatal."""

    def __init__(self, tasks: list[tuple[Callable[[], object], float]]) -> None:
        self._tasks = tasks
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maintenance", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        due = [time.monotonic()] * len(self._tasks)
        while not self._stop.is_set():
            for i, (task, interval) in enumerate(self._tasks):
                if time.monotonic() < due[i]:
                    continue
                try:
                    task()
                except Exception:
                    log.exception(
                        "maintenance failed; retrying next round",
                        extra={"action": "maintenance.error", "task": getattr(task, "__name__", repr(task))},
                    )
                due[i] = time.monotonic() + interval
            self._stop.wait(max(0.0, min(due) - time.monotonic()))
