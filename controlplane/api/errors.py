"""The one place domain errors become gRPC statuses.

Every status carries a google.rpc.ErrorInfo (reason, domain, metadata); bad
input also carries google.rpc.BadRequest field violations, and UNAVAILABLE a
RetryInfo. Anything unexpected is logged with a traceback and answered
INTERNAL with no internals in the message.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from controlplane.domain import errors

log = logging.getLogger(__name__)

ERROR_DOMAIN = "autoloader.v1"

# Most specific first: the first matching class wins.
_CODES: tuple[tuple[type[errors.AutoloaderError], int], ...] = (
    (errors.NotFound, code_pb2.NOT_FOUND),
    (errors.AlreadyExists, code_pb2.ALREADY_EXISTS),
    (errors.InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (errors.FailedPrecondition, code_pb2.FAILED_PRECONDITION),
    (errors.Unavailable, code_pb2.UNAVAILABLE),
    (errors.Unimplemented, code_pb2.UNIMPLEMENTED),
    (errors.Unauthenticated, code_pb2.UNAUTHENTICATED),
    (errors.PermissionDenied, code_pb2.PERMISSION_DENIED),
)


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(error: errors.AutoloaderError) -> status_pb2.Status:
    code = next((c for cls, c in _CODES if isinstance(error, cls)), code_pb2.UNKNOWN)
    details = [_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata))]
    if isinstance(error, errors.InvalidArgument) and error.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in error.violations
                    ]
                )
            )
        )
    if isinstance(error, errors.Unavailable):
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1))))
    return status_pb2.Status(code=code, message=error.message, details=details)


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, errors.AutoloaderError):
        if isinstance(exc, errors.Unavailable):
            log.warning("%s: %s", method, exc.message, extra={"action": "rpc.unavailable", "method": method})
        context.abort_with_status(rpc_status.to_status(to_status(exc)))
    incident = uuid.uuid4().hex[:12]
    log.exception("unexpected error in %s", method, extra={"action": "rpc.internal", "incident": incident})
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); see the control-plane log")


class ErrorInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Maps exceptions raised by servicers to statuses, for unary and streaming replies."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        # grpc's handlers are namedtuples; _replace swaps in the wrapped behaviour.
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return unary(request, context)
                except Exception as exc:
                    _abort(context, exc, method)

            return handler._replace(unary_unary=unary_unary)
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from stream(request, context)
                except Exception as exc:
                    _abort(context, exc, method)

            return handler._replace(unary_stream=unary_stream)
        return handler
