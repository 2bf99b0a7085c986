from __future__ import annotations

import grpc
import pytest

from autoloader.v1 import ingestion_pb2 as pb
from autoloader.v1 import ingestion_pb2_grpc

from .helpers import field_violations, valid_ingestion


def test_create_then_get(ingestions: ingestion_pb2_grpc.IngestionServiceStub) -> None:
    created = ingestions.CreateIngestion(pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id="orders"))
    assert created.ingestion.name == "ingestions/orders"
    got = ingestions.GetIngestion(pb.GetIngestionRequest(name="ingestions/orders"))
    assert got.ingestion == created.ingestion


def test_bad_uri_names_the_field(ingestions: ingestion_pb2_grpc.IngestionServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        ingestions.CreateIngestion(
            pb.CreateIngestionRequest(ingestion=valid_ingestion(source=pb.Source(uri="ftp://host/x")))
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "source.uri" in field_violations(caught.value)
