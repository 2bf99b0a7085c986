"""Keeps a lease alive while its batch is processed; tells the worker when it is lost."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from types import TracebackType

import grpc

from agent.protocol import LeaseClient, error_reason, timedelta_of
from autoloader.v1 import lease_pb2

log = logging.getLogger(__name__)
# Seconds between extension attempts after one failed.
RETRY_AFTER = 0.5


class Heartbeat:
    """Extends the lease every heartbeat_interval (a third of its TTL) in a thread.

    `lost` is set when the control plane answers LEASE_LOST, or when the lease's
    expiry passes without a successful extension (control plane unreachable): from
    then on another agent may hold the files, so the batch must not be committed.
    """

    def __init__(self, client: LeaseClient, lease: lease_pb2.Lease) -> None:
        self._client = client
        self._lease = lease.name
        self._interval = max(timedelta_of(lease.heartbeat_interval).total_seconds(), 0.05)
        self._expires = lease.expire_time.ToDatetime(tzinfo=UTC)
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self._lease}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    @property
    def expires(self) -> datetime:
        """Until when the lease is held, as of its last extension."""
        return self._expires

    def still_held(self) -> bool:
        """True while the lease is ours and has not expired (checked right before a commit)."""
        return not self.lost.is_set() and datetime.now(UTC) < self._expires

    def _run(self) -> None:
        wait = self._interval
        while not self._done.wait(wait):
            wait = self._interval
            left = (self._expires - datetime.now(UTC)).total_seconds()
            try:
                lease = self._client.extend(self._lease, timeout=max(left, 0.1))
                self._expires = lease.expire_time.ToDatetime(tzinfo=UTC)
            except grpc.RpcError as error:
                if error_reason(error) == "LEASE_LOST" or error.code() in (
                    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
                ):  # fmt: skip
                    log.warning("lease lost: %s", self._lease, extra={"action": "agent.lease_lost"})
                    self.lost.set()
                    return
                log.warning("could not extend %s: %s", self._lease, error.code().name,
                            extra={"action": "agent.heartbeat"})  # fmt: skip
                # A control plane that restarts is back within seconds: try again soon, not a
                # whole interval later, so a short outage costs no lease.
                wait = min(self._interval, RETRY_AFTER)
            if datetime.now(UTC) >= self._expires:
                log.warning("lease expired before it could be extended: %s", self._lease,
                            extra={"action": "agent.lease_lost"})  # fmt: skip
                self.lost.set()
                return
