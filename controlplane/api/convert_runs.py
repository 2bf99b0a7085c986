"""Proto <-> domain conversion for runs, files and attempts."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from autoloader.v1 import file_pb2, run_pb2
from controlplane.api.convert import timestamp_in
from controlplane.domain.errors import InvalidArgument
from controlplane.domain.runs import File, FileAttempt, FileState, Run, Trigger


def _set_time(target: Timestamp, value: datetime | None) -> None:
    if value is not None:
        target.FromDatetime(value)


def optional_time(message: Message, field: str) -> datetime | None:
    """The message's timestamp field, or None when unset."""
    if not message.HasField(field):
        return None
    return timestamp_in(getattr(message, field), field)


def trigger_in(value: int) -> Trigger:
    if value == 0:
        return Trigger.MANUAL
    try:
        return Trigger(run_pb2.Run.Trigger.Name(value).removeprefix("TRIGGER_"))  # type: ignore[arg-type]
    except ValueError:
        raise InvalidArgument.field("trigger", f"unknown value {value}") from None


def file_states_in(values: Iterable[Any], field: str) -> list[FileState]:
    states = []
    for value in values:
        try:
            states.append(FileState(file_pb2.File.State.Name(value).removeprefix("STATE_")))
        except ValueError:
            raise InvalidArgument.field(field, f"unknown file state {value}") from None
    return states


def run_to_proto(run: Run) -> run_pb2.Run:
    counts = run.counts
    message = run_pb2.Run(
        name=run.name,
        state=run_pb2.Run.State.Value("STATE_" + run.state.value),
        trigger=run_pb2.Run.Trigger.Value("TRIGGER_" + run.trigger.value),
        file_counts=run_pb2.RunFileCounts(
            total=counts.total,
            pending=counts.pending,
            leased=counts.leased,
            succeeded=counts.succeeded,
            failed=counts.failed,
            quarantined=counts.quarantined,
            skipped=counts.skipped,
        ),
        records=counts.records,
        bytes=counts.bytes,
        error=run.error,
        first_errors=[
            run_pb2.FileError(file=f"ingestions/{run.ingestion_id}/files/{e.file_id}", path=e.path, error=e.error)
            for e in run.first_errors
        ],
    )
    _set_time(message.create_time, run.create_time)
    _set_time(message.discovery_end_time, run.discovery_end_time)
    _set_time(message.end_time, run.end_time)
    return message


def file_to_proto(file: File) -> file_pb2.File:
    message = file_pb2.File(
        name=file.name,
        path=file.path,
        size_bytes=file.size_bytes,
        etag=file.etag,
        state=file_pb2.File.State.Value("STATE_" + file.state.value),
        run=f"ingestions/{file.ingestion_id}/runs/{file.run_id}" if file.run_id else "",
        attempts=file.attempts,
        lease_expiries=file.lease_expiries,
        last_error=file.last_error,
        records=file.records,
    )
    _set_time(message.modified_time, file.modified_time)
    if file.state is FileState.FAILED:
        _set_time(message.next_attempt_time, file.next_attempt_at)
    _set_time(message.discover_time, file.discover_time)
    _set_time(message.update_time, file.update_time)
    return message


_OUTCOMES = frozenset(file_pb2.FileAttempt.Outcome.keys())


def attempt_to_proto(attempt: FileAttempt) -> file_pb2.FileAttempt:
    outcome = f"OUTCOME_{attempt.outcome}"
    message = file_pb2.FileAttempt(
        attempt=attempt.attempt,
        agent=f"agents/{attempt.agent_id}" if attempt.agent_id else "",
        lease=f"leases/{attempt.lease_id}" if attempt.lease_id else "",
        outcome=file_pb2.FileAttempt.Outcome.Value(outcome if outcome in _OUTCOMES else "OUTCOME_UNSPECIFIED"),
        records=attempt.records,
        error_type=attempt.error_type,
        error_message=attempt.error_message,
        retryable=attempt.retryable,
    )
    _set_time(message.start_time, attempt.start_time)
    _set_time(message.end_time, attempt.end_time)
    if attempt.start_time and attempt.end_time:
        message.duration.FromTimedelta(attempt.end_time - attempt.start_time)
    return message
