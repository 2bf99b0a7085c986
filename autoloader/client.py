"""The Python SDK: a thin, retrying client over the autoloader.v1 gRPC API.

Every mutating call carries a request id (generated when not given), so
retrying it after UNAVAILABLE or a lost reply can never apply it twice.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from autoloader.v1 import file_pb2, file_pb2_grpc, ingestion_pb2_grpc, lease_pb2, lease_pb2_grpc, run_pb2, run_pb2_grpc
from autoloader.v1 import ingestion_pb2 as pb

DEFAULT_ADDRESS = "127.0.0.1:50051"
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
R = TypeVar("R")


class Client:
    """Connects lazily; use as a context manager or call close()."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
    ) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self._retries = retries
        self.ingestions = ingestion_pb2_grpc.IngestionServiceStub(self._channel)
        self.runs = run_pb2_grpc.RunServiceStub(self._channel)
        self.files = file_pb2_grpc.FileServiceStub(self._channel)
        self.leases = lease_pb2_grpc.LeaseServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., R], request: object) -> R:
        delay = 0.2
        for attempt in range(self._retries + 1):
            try:
                return method(request, timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() not in _RETRYABLE or attempt == self._retries:
                    raise
                time.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter, not crypto
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    # Ingestions

    def create_ingestion(
        self, ingestion: pb.Ingestion, ingestion_id: str = "", request_id: str | None = None
    ) -> pb.Ingestion:
        request = pb.CreateIngestionRequest(
            ingestion=ingestion, ingestion_id=ingestion_id, request_id=request_id or str(uuid.uuid4())
        )
        return self._call(self.ingestions.CreateIngestion, request).ingestion

    def get_ingestion(self, name: str) -> pb.Ingestion:
        return self._call(self.ingestions.GetIngestion, pb.GetIngestionRequest(name=ingestion_name(name))).ingestion

    def list_ingestions(self, filter: str = "", page_size: int = 0) -> Iterator[pb.Ingestion]:
        """Yields every ingestion matching filter, fetching pages as needed."""
        token = ""
        while True:
            request = pb.ListIngestionsRequest(page_size=page_size, page_token=token, filter=filter)
            page = self._call(self.ingestions.ListIngestions, request)
            yield from page.ingestions
            token = page.next_page_token
            if not token:
                return

    def update_ingestion(
        self, ingestion: pb.Ingestion, paths: Sequence[str], request_id: str | None = None
    ) -> pb.Ingestion:
        request = pb.UpdateIngestionRequest(
            ingestion=ingestion, update_mask=FieldMask(paths=list(paths)), request_id=request_id or str(uuid.uuid4())
        )
        return self._call(self.ingestions.UpdateIngestion, request).ingestion

    def delete_ingestion(self, name: str, drop_table: bool = False, etag: str = "") -> None:
        request = pb.DeleteIngestionRequest(
            name=ingestion_name(name), drop_table=drop_table, etag=etag, request_id=str(uuid.uuid4())
        )
        self._call(self.ingestions.DeleteIngestion, request)

    def refresh_ingestion(self, name: str, mode: str = "full", *, dry_run: bool = False) -> pb.RefreshIngestionResponse:
        """Empties the table and loads again: "full" (every known file) or "new-only" (what is new from now on)."""
        modes = {"full": pb.RefreshIngestionRequest.MODE_FULL, "new-only": pb.RefreshIngestionRequest.MODE_NEW_ONLY}
        if mode not in modes:
            raise ValueError(f"mode must be one of {', '.join(modes)}, not {mode!r}")
        request = pb.RefreshIngestionRequest(
            name=ingestion_name(name), mode=modes[mode], dry_run=dry_run, request_id=str(uuid.uuid4())
        )
        return self._call(self.ingestions.RefreshIngestion, request)

    def pause_ingestion(self, name: str) -> pb.Ingestion:
        request = pb.PauseIngestionRequest(name=ingestion_name(name), request_id=str(uuid.uuid4()))
        return self._call(self.ingestions.PauseIngestion, request).ingestion

    def resume_ingestion(self, name: str) -> pb.Ingestion:
        request = pb.ResumeIngestionRequest(name=ingestion_name(name), request_id=str(uuid.uuid4()))
        return self._call(self.ingestions.ResumeIngestion, request).ingestion

    # Runs

    def start_run(self, ingestion: str, trigger: str | int = "MANUAL", request_id: str | None = None) -> run_pb2.Run:
        request = run_pb2.StartRunRequest(
            ingestion=ingestion_name(ingestion), trigger=_trigger(trigger), request_id=request_id or str(uuid.uuid4())
        )
        return self._call(self.runs.StartRun, request).run

    def get_run(self, name: str) -> run_pb2.Run:
        return self._call(self.runs.GetRun, run_pb2.GetRunRequest(name=run_name(name))).run

    def list_runs(self, ingestion: str, filter: str = "", page_size: int = 0) -> Iterator[run_pb2.Run]:
        """Yields an ingestion's runs, newest first, fetching pages as needed."""
        token = ""
        while True:
            request = run_pb2.ListRunsRequest(
                ingestion=ingestion_name(ingestion), page_size=page_size, page_token=token, filter=filter
            )
            page = self._call(self.runs.ListRuns, request)
            yield from page.runs
            token = page.next_page_token
            if not token:
                return

    def cancel_run(self, name: str, request_id: str | None = None) -> run_pb2.Run:
        request = run_pb2.CancelRunRequest(name=run_name(name), request_id=request_id or str(uuid.uuid4()))
        return self._call(self.runs.CancelRun, request).run

    def watch_run(self, name: str, timeout: float | None = None) -> Iterator[run_pb2.Run]:
        """Yields the run now and after every change; the last one is terminal.

        Not retried: a dropped stream raises grpc.RpcError; watch again to resume.
        Closing the iterator cancels the stream.
        """
        stream = self.runs.WatchRun(
            run_pb2.WatchRunRequest(name=run_name(name)), timeout=timeout, metadata=self._metadata
        )
        try:
            for response in stream:
                yield response.run
        finally:
            stream.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs

    # Files

    def list_files(
        self,
        ingestion: str,
        states: Iterable[str | int] = (),
        run: str = "",
        path_prefix: str = "",
        modified_after: datetime | None = None,
        modified_before: datetime | None = None,
        page_size: int = 0,
    ) -> Iterator[file_pb2.File]:
        """Yields an ingestion's files matching every given filter, fetching pages as needed."""
        token = ""
        while True:
            request = file_pb2.ListFilesRequest(
                ingestion=ingestion_name(ingestion),
                page_size=page_size,
                page_token=token,
                states=[_file_state(s) for s in states],
                run=run_name(run, ingestion) if run else "",
                path_prefix=path_prefix,
                modified_after=_timestamp(modified_after),
                modified_before=_timestamp(modified_before),
            )
            page = self._call(self.files.ListFiles, request)
            yield from page.files
            token = page.next_page_token
            if not token:
                return

    def retry_files(
        self,
        ingestion: str,
        names: Iterable[str] = (),
        states: Iterable[str | int] = (),
        modified_after: datetime | None = None,
        modified_before: datetime | None = None,
        request_id: str | None = None,
    ) -> file_pb2.RetryFilesResponse:
        """Queues files again; with no names, states or times: every FAILED and QUARANTINED file."""
        request = file_pb2.RetryFilesRequest(
            ingestion=ingestion_name(ingestion),
            names=[file_name(n, ingestion) for n in names],
            states=[_file_state(s) for s in states],
            modified_after=_timestamp(modified_after),
            modified_before=_timestamp(modified_before),
            request_id=request_id or str(uuid.uuid4()),
        )
        return self._call(self.files.RetryFiles, request)

    def list_file_attempts(self, file: str) -> list[file_pb2.FileAttempt]:
        request = file_pb2.ListFileAttemptsRequest(file=file_name(file))
        return list(self._call(self.files.ListFileAttempts, request).attempts)

    # Agents

    def list_agents(self) -> list[lease_pb2.Agent]:
        """Agents known to the control plane, with their last contact and the leases they hold."""
        return list(self._call(self.leases.ListAgents, lease_pb2.ListAgentsRequest()).agents)


def ingestion_name(name_or_id: str) -> str:
    """Accepts "orders" or "ingestions/orders"."""
    return name_or_id if name_or_id.startswith("ingestions/") else f"ingestions/{name_or_id}"


def _child_name(name: str, collection: str, ingestion: str) -> str:
    """Full name of a run or file: "ingestions/x/C/y", "x/C/y", or a bare "y" given its ingestion."""
    if name.startswith("ingestions/"):
        return name
    if f"/{collection}/" in name:
        return f"ingestions/{name}"
    if ingestion and name and "/" not in name:
        return f"{ingestion_name(ingestion)}/{collection}/{name}"
    return name  # not a name we can complete: the server says what is wrong with it


def run_name(name: str, ingestion: str = "") -> str:
    """Accepts "ingestions/x/runs/y", "x/runs/y", or "y" when the ingestion is given."""
    return _child_name(name, "runs", ingestion)


def file_name(name: str, ingestion: str = "") -> str:
    """Accepts "ingestions/x/files/12", "x/files/12", or "12" when the ingestion is given."""
    return _child_name(name, "files", ingestion)


def _enum_value(enum: Any, prefix: str, value: str | int) -> int:
    """An enum's number from its number, full name ("STATE_FAILED") or short name ("failed")."""
    if isinstance(value, int):
        enum.Name(value)  # ValueError if unknown
        return value
    return int(enum.Value(prefix + value.strip().upper().removeprefix(prefix)))


def _file_state(value: str | int) -> file_pb2.File.State.ValueType:
    return file_pb2.File.State.ValueType(_enum_value(file_pb2.File.State, "STATE_", value))


def _trigger(value: str | int) -> run_pb2.Run.Trigger.ValueType:
    return run_pb2.Run.Trigger.ValueType(_enum_value(run_pb2.Run.Trigger, "TRIGGER_", value))


def _timestamp(value: datetime | None) -> Timestamp | None:
    """A Timestamp for a datetime (naive means UTC), or None to leave the field unset."""
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp
