"""Housekeeping that keeps tables bounded: runs in a background loop on every replica."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from controlplane.service.ports import UnitOfWork

log = logging.getLogger(__name__)

PURGE_BATCH = 1000


class MaintenanceService:
    def __init__(self, uow_factory: Callable[[], UnitOfWork], idempotency_retention: timedelta) -> None:
        self._uow_factory = uow_factory
        self._retention = idempotency_retention

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
    """Runs the housekeeping every `interval` seconds until stopped; failures are logged, not fatal."""

    def __init__(self, service: MaintenanceService, interval: float) -> None:
        self._service = service
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maintenance", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._service.purge_idempotency_records()
            except Exception:
                log.exception("maintenance failed; retrying next round", extra={"action": "maintenance.error"})
            self._stop.wait(self._interval)
