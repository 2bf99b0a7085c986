"""controlplane.api.errors.to_status: domain errors -> google.rpc.Status with details."""

from __future__ import annotations

from typing import TypeVar

import grpc
import pytest
from google.protobuf import message as protobuf_message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from controlplane.api.errors import ERROR_DOMAIN, to_status
from controlplane.domain import errors
from controlplane.domain.errors import FieldViolation

CODES: list[tuple[type[errors.AutoloaderError], int, str]] = [
    (errors.NotFound, code_pb2.NOT_FOUND, "NOT_FOUND"),
    (errors.AlreadyExists, code_pb2.ALREADY_EXISTS, "ALREADY_EXISTS"),
    (errors.InvalidArgument, code_pb2.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (errors.FailedPrecondition, code_pb2.FAILED_PRECONDITION, "FAILED_PRECONDITION"),
    (errors.WrongState, code_pb2.FAILED_PRECONDITION, "WRONG_STATE"),
    (errors.EtagMismatch, code_pb2.FAILED_PRECONDITION, "ETAG_MISMATCH"),
    (errors.Unavailable, code_pb2.UNAVAILABLE, "UNAVAILABLE"),
    (errors.DatabaseUnavailable, code_pb2.UNAVAILABLE, "DATABASE_UNAVAILABLE"),
    (errors.Unimplemented, code_pb2.UNIMPLEMENTED, "UNIMPLEMENTED"),
    (errors.Unauthenticated, code_pb2.UNAUTHENTICATED, "UNAUTHENTICATED"),
    (errors.PermissionDenied, code_pb2.PERMISSION_DENIED, "PERMISSION_DENIED"),
]
IDS = [cls.__name__ for cls, _, _ in CODES]
M = TypeVar("M", bound=protobuf_message.Message)


def details_of(status: status_pb2.Status, kind: type[M]) -> list[M]:
    found: list[M] = []
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            unpacked = kind()
            detail.Unpack(unpacked)
            found.append(unpacked)
    return found


@pytest.mark.parametrize(("cls", "code", "reason"), CODES, ids=IDS)
def test_code_and_error_info(cls: type[errors.AutoloaderError], code: int, reason: str) -> None:
    status = to_status(cls("it broke", metadata={"ingestion": "ingestions/orders", "state": "PAUSED"}))
    assert status.code == code
    assert status.message == "it broke"
    (info,) = details_of(status, error_details_pb2.ErrorInfo)
    assert info.reason == reason
    assert info.domain == ERROR_DOMAIN == "autoloader.v1"
    assert dict(info.metadata) == {"ingestion": "ingestions/orders", "state": "PAUSED"}


@pytest.mark.parametrize(("cls", "code", "reason"), CODES, ids=IDS)
def test_default_message_is_the_docstring(cls: type[errors.AutoloaderError], code: int, reason: str) -> None:
    status = to_status(cls())
    assert status.message == (cls.__doc__ or "").strip()
    assert status.message
    assert status.code == code
    (info,) = details_of(status, error_details_pb2.ErrorInfo)
    assert info.reason == reason
    assert dict(info.metadata) == {}


@pytest.mark.parametrize(("cls", "code", "reason"), CODES, ids=IDS)
def test_converts_to_a_grpc_status(cls: type[errors.AutoloaderError], code: int, reason: str) -> None:
    converted = rpc_status.to_status(to_status(cls("x")))
    assert converted.code.value[0] == code
    assert converted.code is not grpc.StatusCode.INTERNAL
    assert converted.details == "x"


def test_subclasses_map_like_their_parents() -> None:
    assert to_status(errors.WrongState()).code == code_pb2.FAILED_PRECONDITION
    assert to_status(errors.EtagMismatch()).code == code_pb2.FAILED_PRECONDITION
    assert to_status(errors.DatabaseUnavailable()).code == code_pb2.UNAVAILABLE


def test_unmapped_domain_error_is_never_ok_or_internal() -> None:
    status = to_status(errors.AutoloaderError("odd"))
    assert status.code not in (code_pb2.OK, code_pb2.INTERNAL)
    (info,) = details_of(status, error_details_pb2.ErrorInfo)
    assert info.reason == "ERROR"


def test_invalid_argument_carries_every_field_violation_in_order() -> None:
    error = errors.InvalidArgument(
        violations=[
            FieldViolation("source.uri", "is required"),
            FieldViolation("schema.columns[2].type", "unknown type 'x'"),
            FieldViolation("source.uri", "second problem with the same field"),
        ]
    )
    status = to_status(error)
    assert status.code == code_pb2.INVALID_ARGUMENT
    assert status.message == (
        "source.uri: is required; schema.columns[2].type: unknown type 'x'; "
        "source.uri: second problem with the same field"
    )
    (bad_request,) = details_of(status, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("source.uri", "is required"),
        ("schema.columns[2].type", "unknown type 'x'"),
        ("source.uri", "second problem with the same field"),
    ]
    assert details_of(status, error_details_pb2.RetryInfo) == []


def test_invalid_argument_field_shortcut() -> None:
    status = to_status(errors.InvalidArgument.field("page_token", "is not a token this API returned"))
    (bad_request,) = details_of(status, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("page_token", "is not a token this API returned")
    ]
    assert status.message == "page_token: is not a token this API returned"


def test_invalid_argument_without_violations_has_no_bad_request() -> None:
    status = to_status(errors.InvalidArgument("just bad"))
    assert status.message == "just bad"
    assert details_of(status, error_details_pb2.BadRequest) == []
    assert len(details_of(status, error_details_pb2.ErrorInfo)) == 1


@pytest.mark.parametrize("cls", [errors.Unavailable, errors.DatabaseUnavailable])
def test_unavailable_carries_retry_info(cls: type[errors.Unavailable]) -> None:
    status = to_status(cls())
    (retry,) = details_of(status, error_details_pb2.RetryInfo)
    delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    assert 0 < delay <= 60
    assert details_of(status, error_details_pb2.BadRequest) == []


@pytest.mark.parametrize(
    "cls", [cls for cls, _, _ in CODES if not issubclass(cls, errors.Unavailable)], ids=lambda c: c.__name__
)
def test_only_unavailable_carries_retry_info(cls: type[errors.AutoloaderError]) -> None:
    assert details_of(to_status(cls()), error_details_pb2.RetryInfo) == []


def test_every_domain_error_class_is_mapped() -> None:
    """A new error class must be added to the mapping (and to CODES above)."""

    def subclasses(cls: type[errors.AutoloaderError]) -> set[type[errors.AutoloaderError]]:
        found = set(cls.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    domain_classes = {c for c in subclasses(errors.AutoloaderError) if c.__module__ == errors.__name__}
    assert domain_classes == {cls for cls, _, _ in CODES}
