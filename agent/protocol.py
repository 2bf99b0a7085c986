"""The agent's side of LeaseService: every call retried while the control plane is unavailable.

Retries use capped exponential backoff with full jitter, so a restarting control
plane is not met by every agent at once; they stop as soon as the agent stops.
Reports are safe to retry: the control plane answers an identical, already
recorded result with the recorded answer, and a retry of a report whose data
is being committed waits for that commit.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration

from autoloader.rpc_errors import error_info
from autoloader.v1 import ingestion_pb2, lease_pb2, lease_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
CALL_TIMEOUT = 30.0


class Stopped(Exception):
    """The agent is stopping; the call was abandoned."""


def error_reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason the control plane attached (e.g. LEASE_LOST), or ""."""
    return error_info(error)[0]


@dataclass(frozen=True)
class Batch:
    lease: lease_pb2.Lease
    files: list[lease_pb2.LeasedFile]
    ingestion: ingestion_pb2.Ingestion
    target: lease_pb2.WriteTarget  # where to stage the data, and the table's columns


class LeaseClient:
    def __init__(
        self,
        channel: grpc.Channel,
        agent: str,
        stop: threading.Event,
        *,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._stub = lease_pb2_grpc.LeaseServiceStub(channel)
        self.agent = f"agents/{agent}"
        self._stop = stop
        self._initial = retry_initial
        self._max = retry_max
        self._metadata = metadata

    def _call(self, what: str, call: Callable[[], T], *, until_stopped: bool = True) -> T:
        delay = self._initial
        while True:
            try:
                return call()
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE:
                    raise
                if until_stopped and self._stop.is_set():
                    raise Stopped() from error
                pause = random.uniform(0, delay)  # noqa: S311 - jitter, not security
                log.warning(
                    "%s: control plane unavailable (%s); retrying in %.1fs", what, error.code().name, pause,
                    extra={"action": "agent.retry"},
                )  # fmt: skip
                if self._stop.wait(pause) and until_stopped:
                    raise Stopped() from error
                delay = min(delay * 2, self._max)

    def lease(self, wait: float, max_files: int = 0, max_bytes: int = 0) -> Batch | None:
        request = lease_pb2.LeaseFilesRequest(
            agent=self.agent, max_files=max_files, max_bytes=max_bytes, wait=Duration(seconds=int(wait))
        )
        reply = self._call(
            "lease",
            lambda: self._stub.LeaseFiles(request, timeout=wait + CALL_TIMEOUT, metadata=self._metadata),
        )
        if not reply.files:
            return None
        return Batch(reply.lease, list(reply.files), reply.ingestion, reply.target)

    def extend(self, lease: str, timeout: float = CALL_TIMEOUT) -> lease_pb2.Lease:
        """One attempt (the heartbeat retries on its own schedule).

        It waits for a connection, up to `timeout`, instead of failing at once while the
        control plane restarts: the heartbeat gives it the time its lease has left.
        """
        request = lease_pb2.ExtendLeaseRequest(lease=lease, agent=self.agent)
        return self._stub.ExtendLease(request, timeout=timeout, metadata=self._metadata, wait_for_ready=True).lease

    def report(
        self, lease: str, results: list[lease_pb2.FileResult], data_files: Sequence[lease_pb2.DataFile] = ()
    ) -> list[lease_pb2.ReportFileResultsResponse.Result]:
        """Reports a batch's results with its staged data; retried even while stopping (the work is done).

        The control plane answers once the data is committed; an answer that cannot
        wait that long is UNAVAILABLE (COMMIT_IN_PROGRESS), and the retry gets it.
        """
        request = lease_pb2.ReportFileResultsRequest(lease=lease, agent=self.agent, results=results,
                                                     data_files=data_files)  # fmt: skip
        reply = self._call(
            "report",
            lambda: self._stub.ReportFileResults(request, timeout=CALL_TIMEOUT, metadata=self._metadata),
            until_stopped=False,
        )
        return list(reply.results)

    def release(self, lease: str, files: tuple[str, ...] = ()) -> int:
        request = lease_pb2.ReleaseLeaseRequest(lease=lease, agent=self.agent, files=list(files))
        try:
            return self._stub.ReleaseLease(request, timeout=CALL_TIMEOUT, metadata=self._metadata).files_released
        except grpc.RpcError as error:
            # The lease expires on its own; releasing only returns the files sooner.
            log.warning("could not release %s: %s", lease, error.code().name, extra={"action": "agent.release"})
            return 0


def timedelta_of(duration: Duration) -> timedelta:
    return timedelta(seconds=duration.seconds, microseconds=duration.nanos // 1000)
