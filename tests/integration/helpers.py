"""Helpers for gRPC tests: valid requests to start from, and reading error details."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from autoloader.v1 import ingestion_pb2 as pb


def valid_ingestion(**overrides: object) -> pb.Ingestion:
    """A minimal valid ingestion; keyword arguments replace top-level fields."""
    message = pb.Ingestion(
        display_name="Orders",
        source=pb.Source(uri="s3://bucket/orders", glob="*.json", recursive=True),
        format=pb.Format(type=pb.Format.TYPE_JSON),
        destination=pb.Destination(table="raw.orders"),
    )
    for name, value in overrides.items():
        field = getattr(message, name)
        if hasattr(field, "CopyFrom"):
            field.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the status carries no details"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the status details")


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    """field -> description of every BadRequest violation."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    violations: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.update({v.field: v.description for v in bad.field_violations})
    return violations
