"""RunService and FileService servicers."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from autoloader.v1 import file_pb2, file_pb2_grpc, run_pb2, run_pb2_grpc
from controlplane.api.context import request_key, tenant_of
from controlplane.api.convert_runs import (
    attempt_to_proto,
    file_states_in,
    file_to_proto,
    optional_time,
    run_to_proto,
    trigger_in,
)
from controlplane.domain.errors import InvalidArgument
from controlplane.domain.names import parse_file_name, parse_ingestion_name, parse_run_name
from controlplane.service.files import FileService
from controlplane.service.runs import RunService


class RunServicer(run_pb2_grpc.RunServiceServicer):
    def __init__(self, service: RunService) -> None:
        self._service = service

    def StartRun(self, request: run_pb2.StartRunRequest, context: grpc.ServicerContext) -> run_pb2.StartRunResponse:
        run = self._service.start(
            tenant_of(context),
            parse_ingestion_name(request.ingestion, "ingestion"),
            trigger_in(request.trigger),
            request_key(request, request.request_id),
        )
        return run_pb2.StartRunResponse(run=run_to_proto(run))

    def GetRun(self, request: run_pb2.GetRunRequest, context: grpc.ServicerContext) -> run_pb2.GetRunResponse:
        ingestion_id, run_id = parse_run_name(request.name)
        return run_pb2.GetRunResponse(run=run_to_proto(self._service.get(tenant_of(context), ingestion_id, run_id)))

    def ListRuns(self, request: run_pb2.ListRunsRequest, context: grpc.ServicerContext) -> run_pb2.ListRunsResponse:
        runs, token = self._service.list(
            tenant_of(context),
            parse_ingestion_name(request.ingestion, "ingestion"),
            request.page_size,
            request.page_token,
            request.filter,
        )
        return run_pb2.ListRunsResponse(runs=[run_to_proto(r) for r in runs], next_page_token=token)

    def CancelRun(self, request: run_pb2.CancelRunRequest, context: grpc.ServicerContext) -> run_pb2.CancelRunResponse:
        ingestion_id, run_id = parse_run_name(request.name)
        run = self._service.cancel(tenant_of(context), ingestion_id, run_id, request_key(request, request.request_id))
        return run_pb2.CancelRunResponse(run=run_to_proto(run))

    def WatchRun(
        self, request: run_pb2.WatchRunRequest, context: grpc.ServicerContext
    ) -> Iterator[run_pb2.WatchRunResponse]:
        ingestion_id, run_id = parse_run_name(request.name)
        for run in self._service.watch(tenant_of(context), ingestion_id, run_id, context.is_active):
            yield run_pb2.WatchRunResponse(run=run_to_proto(run))


class FileServicer(file_pb2_grpc.FileServiceServicer):
    def __init__(self, service: FileService) -> None:
        self._service = service

    def ListFiles(
        self, request: file_pb2.ListFilesRequest, context: grpc.ServicerContext
    ) -> file_pb2.ListFilesResponse:
        ingestion_id = parse_ingestion_name(request.ingestion, "ingestion")
        run_id = ""
        if request.run:
            run_ingestion, run_id = parse_run_name(request.run, "run")
            if run_ingestion != ingestion_id:
                raise InvalidArgument.field("run", f"{request.run} is not a run of {request.ingestion}")
        files, token = self._service.list_files(
            tenant_of(context),
            ingestion_id,
            page_size=request.page_size,
            page_token=request.page_token,
            states=file_states_in(request.states, "states"),
            run_id=run_id,
            path_prefix=request.path_prefix,
            modified_after=optional_time(request, "modified_after"),
            modified_before=optional_time(request, "modified_before"),
        )
        return file_pb2.ListFilesResponse(files=[file_to_proto(f) for f in files], next_page_token=token)

    def RetryFiles(
        self, request: file_pb2.RetryFilesRequest, context: grpc.ServicerContext
    ) -> file_pb2.RetryFilesResponse:
        ingestion_id = parse_ingestion_name(request.ingestion, "ingestion")
        file_ids = []
        for i, name in enumerate(request.names):
            owner, file_id = parse_file_name(name, f"names[{i}]")
            if owner != ingestion_id:
                raise InvalidArgument.field(f"names[{i}]", f"{name} is not a file of {request.ingestion}")
            file_ids.append(file_id)
        run, queued = self._service.retry(
            tenant_of(context),
            ingestion_id,
            file_ids=file_ids,
            states=file_states_in(request.states, "states"),
            modified_after=optional_time(request, "modified_after"),
            modified_before=optional_time(request, "modified_before"),
            key=request_key(request, request.request_id),
        )
        return file_pb2.RetryFilesResponse(run=run, files_queued=queued)

    def ListFileAttempts(
        self, request: file_pb2.ListFileAttemptsRequest, context: grpc.ServicerContext
    ) -> file_pb2.ListFileAttemptsResponse:
        ingestion_id, file_id = parse_file_name(request.file, "file")
        attempts = self._service.attempts(tenant_of(context), ingestion_id, file_id)
        return file_pb2.ListFileAttemptsResponse(attempts=[attempt_to_proto(a) for a in attempts])
