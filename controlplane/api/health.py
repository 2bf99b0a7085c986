"""grpc.health.v1: SERVING only while the database answers; NOT_SERVING while draining."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from grpc_health.v1 import health, health_pb2

log = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(self, probe: Callable[[], None], services: Iterable[str], interval: float) -> None:
        self.servicer = health.HealthServicer(experimental_non_blocking=True)
        self._probe = probe
        self._services = ["", *services]
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-monitor", daemon=True)
        self._serving: bool | None = None

    def start(self) -> None:
        self.check()
        self._thread.start()

    def check(self) -> bool:
        try:
            self._probe()
            serving = True
        except Exception as exc:
            serving = False
            if self._serving is not False:
                log.warning("database probe failed: %s", exc, extra={"action": "health.not_serving"})
        if serving != self._serving:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for service in self._services:
                self.servicer.set(service, status)
            self._serving = serving
        return serving

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.check()

    def drain(self) -> None:
        """Reports NOT_SERVING from now on, so balancers stop sending new calls."""
        self._stop.set()
        self.servicer.enter_graceful_shutdown()
        # A probe in flight holds a database connection; let it finish before the pool goes.
        if self._thread.is_alive():
            self._thread.join(timeout=10)
