"""IngestionService servicer."""

from __future__ import annotations

import grpc

from autoloader.v1 import ingestion_pb2 as pb
from autoloader.v1 import ingestion_pb2_grpc
from controlplane.api.context import request_key, tenant_of
from controlplane.api.convert import ingestion_to_proto, spec_from_proto
from controlplane.domain.errors import InvalidArgument, Unimplemented
from controlplane.domain.ingestion import RefreshMode
from controlplane.domain.names import parse_ingestion_name
from controlplane.service.ingestions import IngestionService
from controlplane.service.refreshes import IngestionRefreshes

_MODES = {
    pb.RefreshIngestionRequest.MODE_FULL: RefreshMode.FULL,
    pb.RefreshIngestionRequest.MODE_NEW_ONLY: RefreshMode.NEW_ONLY,
}


class IngestionServicer(ingestion_pb2_grpc.IngestionServiceServicer):
    def __init__(self, service: IngestionService, refreshes: IngestionRefreshes | None = None) -> None:
        self._service = service
        self._refreshes = refreshes  # None: no catalog (tests of the API alone)

    def CreateIngestion(
        self, request: pb.CreateIngestionRequest, context: grpc.ServicerContext
    ) -> pb.CreateIngestionResponse:
        if not request.HasField("ingestion"):
            raise InvalidArgument.field("ingestion", "is required")
        ingestion = self._service.create(
            tenant_of(context),
            spec_from_proto(request.ingestion),
            ingestion_id=request.ingestion_id,
            key=request_key(request, request.request_id),
        )
        return pb.CreateIngestionResponse(ingestion=ingestion_to_proto(ingestion))

    def GetIngestion(self, request: pb.GetIngestionRequest, context: grpc.ServicerContext) -> pb.GetIngestionResponse:
        ingestion = self._service.get(tenant_of(context), parse_ingestion_name(request.name))
        return pb.GetIngestionResponse(ingestion=ingestion_to_proto(ingestion))

    def ListIngestions(
        self, request: pb.ListIngestionsRequest, context: grpc.ServicerContext
    ) -> pb.ListIngestionsResponse:
        items, token = self._service.list(tenant_of(context), request.page_size, request.page_token, request.filter)
        return pb.ListIngestionsResponse(ingestions=[ingestion_to_proto(i) for i in items], next_page_token=token)

    def UpdateIngestion(
        self, request: pb.UpdateIngestionRequest, context: grpc.ServicerContext
    ) -> pb.UpdateIngestionResponse:
        if not request.HasField("ingestion"):
            raise InvalidArgument.field("ingestion", "is required")
        ingestion = self._service.update(
            tenant_of(context),
            parse_ingestion_name(request.ingestion.name, "ingestion.name"),
            spec_from_proto(request.ingestion),
            list(request.update_mask.paths),
            etag=request.ingestion.etag,
            key=request_key(request, request.request_id),
        )
        return pb.UpdateIngestionResponse(ingestion=ingestion_to_proto(ingestion))

    def DeleteIngestion(
        self, request: pb.DeleteIngestionRequest, context: grpc.ServicerContext
    ) -> pb.DeleteIngestionResponse:
        self._service.delete(
            tenant_of(context),
            parse_ingestion_name(request.name),
            etag=request.etag,
            drop_table=request.drop_table,
            key=request_key(request, request.request_id),
        )
        return pb.DeleteIngestionResponse()

    def PauseIngestion(
        self, request: pb.PauseIngestionRequest, context: grpc.ServicerContext
    ) -> pb.PauseIngestionResponse:
        ingestion = self._service.pause(
            tenant_of(context), parse_ingestion_name(request.name), request_key(request, request.request_id)
        )
        return pb.PauseIngestionResponse(ingestion=ingestion_to_proto(ingestion))

    def ResumeIngestion(
        self, request: pb.ResumeIngestionRequest, context: grpc.ServicerContext
    ) -> pb.ResumeIngestionResponse:
        ingestion = self._service.resume(
            tenant_of(context), parse_ingestion_name(request.name), request_key(request, request.request_id)
        )
        return pb.ResumeIngestionResponse(ingestion=ingestion_to_proto(ingestion))

    def RefreshIngestion(
        self, request: pb.RefreshIngestionRequest, context: grpc.ServicerContext
    ) -> pb.RefreshIngestionResponse:
        mode = _MODES.get(request.mode)
        if mode is None:
            raise InvalidArgument.field("mode", "is required: MODE_FULL or MODE_NEW_ONLY")
        if self._refreshes is None:
            raise Unimplemented("RefreshIngestion needs an Iceberg catalog, and none is configured")
        plan = self._refreshes.refresh(
            tenant_of(context), parse_ingestion_name(request.name), mode, dry_run=request.dry_run,
            key=None if request.dry_run else request_key(request, request.request_id),
        )  # fmt: skip
        return pb.RefreshIngestionResponse(
            run=plan.run, files_queued=plan.files, bytes_queued=plan.bytes, table_rows=plan.table_rows,
            table=plan.table,
        )  # fmt: skip

    def PreviewIngestion(
        self, request: pb.PreviewIngestionRequest, context: grpc.ServicerContext
    ) -> pb.PreviewIngestionResponse:
        raise Unimplemented("PreviewIngestion needs a Spark agent, which this version does not have yet")
