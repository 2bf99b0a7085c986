"""One error hierarchy for the whole control plane.

Each class's docstring is its default message. The API layer maps classes to
gRPC status codes in one interceptor; nothing here knows about gRPC.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: `field` is a dotted path such as "source.uri"."""

    field: str
    description: str


class AutoloaderError(Exception):
    """Something went wrong."""

    # Stable, machine-readable reason (google.rpc.ErrorInfo.reason).
    reason = "ERROR"

    def __init__(self, message: str | None = None, *, metadata: Mapping[str, str] | None = None) -> None:
        self.message = message or (type(self).__doc__ or "").strip()
        self.metadata = dict(metadata or {})
        super().__init__(self.message)


class NotFound(AutoloaderError):
    """The resource does not exist."""

    reason = "NOT_FOUND"


class AlreadyExists(AutoloaderError):
    """The resource already exists."""

    reason = "ALREADY_EXISTS"


class InvalidArgument(AutoloaderError):
    """The request is invalid."""

    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str | None = None,
        *,
        violations: Iterable[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.violations = list(violations)
        if message is None and self.violations:
            message = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message, metadata=metadata)

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls(violations=[FieldViolation(field, description)])


class FailedPrecondition(AutoloaderError):
    """The resource is not in a state that allows this."""

    reason = "FAILED_PRECONDITION"


class WrongState(FailedPrecondition):
    """The resource is in the wrong state for this operation."""

    reason = "WRONG_STATE"


class EtagMismatch(FailedPrecondition):
    """The resource changed since it was read; read it again and retry."""

    reason = "ETAG_MISMATCH"


class Unavailable(AutoloaderError):
    """A dependency is unavailable; retry later."""

    reason = "UNAVAILABLE"


class DatabaseUnavailable(Unavailable):
    """The database is unavailable; retry later."""

    reason = "DATABASE_UNAVAILABLE"


class Unimplemented(AutoloaderError):
    """This operation is not available in this version."""

    reason = "UNIMPLEMENTED"


class Unauthenticated(AutoloaderError):
    """Missing or invalid credentials."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(AutoloaderError):
    """The caller may not do this."""

    reason = "PERMISSION_DENIED"
