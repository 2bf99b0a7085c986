"""LeaseService servicer (agents)."""

from __future__ import annotations

import re
import time
import uuid
from datetime import timedelta

import grpc

from autoloader.v1 import file_pb2, lease_pb2, lease_pb2_grpc
from controlplane.api.context import tenant_of
from controlplane.api.convert import ingestion_to_proto
from controlplane.domain.commits import StagedFile, TableInfo
from controlplane.domain.errors import InvalidArgument
from controlplane.domain.leases import Lease
from controlplane.domain.names import parse_file_name, parse_ingestion_name
from controlplane.service.leases import Claim, FileOutcome, FileReport, LeaseService

_AGENT = re.compile(r"agents/([A-Za-z0-9._:@-]{1,128})")


def _agent(name: str) -> str:
    match = _AGENT.fullmatch(name)
    if not match:
        raise InvalidArgument.field("agent", f"{name!r} is not an agent name: agents/{{host-pid}} (1-128 characters)")
    return match.group(1)


def _lease_id(name: str) -> uuid.UUID:
    try:
        if not name.startswith("leases/"):
            raise ValueError
        return uuid.UUID(name.removeprefix("leases/"))
    except ValueError:
        raise InvalidArgument.field("lease", f"{name!r} is not a lease name: leases/{{uuid}}") from None


def _lease_to_proto(lease: Lease) -> lease_pb2.Lease:
    message = lease_pb2.Lease(name=lease.name, agent=f"agents/{lease.agent_id}")
    message.expire_time.FromDatetime(lease.expire_time)
    message.heartbeat_interval.FromTimedelta(lease.heartbeat_interval)
    return message


def _file_report(result: lease_pb2.ReportFileResultRequest | lease_pb2.FileResult, where: str) -> FileReport:
    """One file's reported result; `where` prefixes field names in errors ("results[3].")."""
    _, file_id = parse_file_name(result.file, where + "file")
    if result.outcome == lease_pb2.ReportFileResultRequest.OUTCOME_SUCCEEDED:
        outcome = FileOutcome(True, records=result.records, bytes=result.bytes)
    elif result.outcome == lease_pb2.ReportFileResultRequest.OUTCOME_FAILED:
        if not result.HasField("error") or not result.error.message:
            raise InvalidArgument.field(where + "error", "is required when the outcome is FAILED")
        outcome = FileOutcome(
            False, records=result.records, bytes=result.bytes, error_type=result.error.type,
            error_message=result.error.message, retryable=result.error.retryable,
        )  # fmt: skip
    else:
        raise InvalidArgument.field(where + "outcome", "must be OUTCOME_SUCCEEDED or OUTCOME_FAILED")
    return FileReport(file_id, result.attempt, outcome)


def _data_file(data_file: lease_pb2.DataFile, where: str) -> StagedFile:
    if not data_file.path:
        raise InvalidArgument.field(where + "path", "is required")
    return StagedFile(data_file.path, data_file.record_count, data_file.size_bytes)


def _answer_by(context: grpc.ServicerContext) -> float | None:
    """When a waiting call must answer (monotonic): half a second before the client's deadline, if it set one."""
    remaining = context.time_remaining()  # huge when the client set no deadline
    if remaining is None or remaining >= 3600:
        return None
    return time.monotonic() + max(remaining - 0.5, 0.0)


def _target_to_proto(target: TableInfo, claim: Claim) -> lease_pb2.WriteTarget:
    message = lease_pb2.WriteTarget(
        table=target.name, exists=target.exists, schema_version=target.schema_version,
        staging_location=target.staging_location(str(claim.lease.id)),
        columns=[lease_pb2.TableColumn(name=name, type=type_) for name, type_ in target.columns],
    )  # fmt: skip
    for field in claim.ingestion.spec.destination.partition_by:
        message.partition_by.add(column=field.column, transform=field.transform or "identity")
    return message


class LeaseServicer(lease_pb2_grpc.LeaseServiceServicer):
    def __init__(self, service: LeaseService) -> None:
        self._service = service

    def LeaseFiles(
        self, request: lease_pb2.LeaseFilesRequest, context: grpc.ServicerContext
    ) -> lease_pb2.LeaseFilesResponse:
        agent = _agent(request.agent)
        if not 0 <= request.wait.seconds <= 60 or request.wait.nanos < 0:
            raise InvalidArgument.field("wait", "must be 0 to 60s")
        wait = timedelta(seconds=request.wait.seconds, microseconds=request.wait.nanos // 1000)
        remaining = context.time_remaining()  # huge when the client set no deadline
        if remaining is not None and remaining < 3600:
            # Answer (empty) before the client's deadline rather than let it expire.
            wait = min(wait, timedelta(seconds=max(remaining - 0.5, 0)))
        claim = self._service.lease_files(
            tenant_of(context),
            agent,
            max_files=request.max_files,
            max_bytes=request.max_bytes,
            wait=wait,
            ingestion_id=parse_ingestion_name(request.ingestion, "ingestion") if request.ingestion else None,
            still_wanted=context.is_active,
        )
        if claim is None:
            return lease_pb2.LeaseFilesResponse()
        files = []
        for f in claim.files:
            leased = lease_pb2.LeasedFile(
                name=f"ingestions/{f.ingestion_id}/files/{f.id}", path=f.path, size_bytes=f.size_bytes, etag=f.etag,
                attempt=f.attempt, run=f"ingestions/{f.ingestion_id}/runs/{f.run_id}",
            )  # fmt: skip
            if f.modified_time is not None:
                leased.modified_time.FromDatetime(f.modified_time)
            files.append(leased)
        reply = lease_pb2.LeaseFilesResponse(
            lease=_lease_to_proto(claim.lease), files=files, ingestion=ingestion_to_proto(claim.ingestion)
        )
        if claim.target is not None:
            reply.target.CopyFrom(_target_to_proto(claim.target, claim))
        return reply

    def ExtendLease(
        self, request: lease_pb2.ExtendLeaseRequest, context: grpc.ServicerContext
    ) -> lease_pb2.ExtendLeaseResponse:
        lease = self._service.extend(tenant_of(context), _agent(request.agent), _lease_id(request.lease))
        return lease_pb2.ExtendLeaseResponse(lease=_lease_to_proto(lease))

    def ReportFileResult(
        self, request: lease_pb2.ReportFileResultRequest, context: grpc.ServicerContext
    ) -> lease_pb2.ReportFileResultResponse:
        agent, lease_id = _agent(request.agent), _lease_id(request.lease)
        report = _file_report(request, "")
        state, next_at = self._service.report(
            tenant_of(context),
            agent,
            lease_id,
            report.file_id,
            report.attempt,
            report.outcome,
            until=_answer_by(context),
        )
        reply = lease_pb2.ReportFileResultResponse(file_state=file_pb2.File.State.Value("STATE_" + state.value))
        if next_at is not None:
            reply.next_attempt_time.FromDatetime(next_at)
        return reply

    def ReportFileResults(
        self, request: lease_pb2.ReportFileResultsRequest, context: grpc.ServicerContext
    ) -> lease_pb2.ReportFileResultsResponse:
        agent, lease_id = _agent(request.agent), _lease_id(request.lease)
        reports = [_file_report(result, f"results[{i}].") for i, result in enumerate(request.results)]
        data_files = [_data_file(d, f"data_files[{i}].") for i, d in enumerate(request.data_files)]
        answers = self._service.report_many(
            tenant_of(context), agent, lease_id, reports, data_files, until=_answer_by(context)
        )
        reply = lease_pb2.ReportFileResultsResponse()
        for answer in answers:
            result = reply.results.add(file=answer.file_name, lease_lost=answer.state is None)
            if answer.state is not None:
                result.file_state = file_pb2.File.State.Value("STATE_" + answer.state.value)
            if answer.next_attempt_at is not None:
                result.next_attempt_time.FromDatetime(answer.next_attempt_at)
        return reply

    def ReleaseLease(
        self, request: lease_pb2.ReleaseLeaseRequest, context: grpc.ServicerContext
    ) -> lease_pb2.ReleaseLeaseResponse:
        file_ids = [parse_file_name(name, f"files[{i}]")[1] for i, name in enumerate(request.files)]
        released = self._service.release(tenant_of(context), _agent(request.agent), _lease_id(request.lease), file_ids)
        return lease_pb2.ReleaseLeaseResponse(files_released=released)

    def ListAgents(
        self, request: lease_pb2.ListAgentsRequest, context: grpc.ServicerContext
    ) -> lease_pb2.ListAgentsResponse:
        agents = []
        for row in self._service.list_agents(tenant_of(context)):
            agent = lease_pb2.Agent(
                name=f"agents/{row.id}", hostname=row.hostname, active_leases=row.active_leases,
                leased_files=row.leased_files,
            )  # fmt: skip
            agent.create_time.FromDatetime(row.create_time)
            agent.last_seen_time.FromDatetime(row.last_seen_time)
            agents.append(agent)
        return lease_pb2.ListAgentsResponse(agents=agents)
