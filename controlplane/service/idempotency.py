"""Run a mutating use case once per request id, inside the caller's Unit of Work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from controlplane.domain.errors import InvalidArgument
from controlplane.domain.idempotency import RequestKey
from controlplane.service.ports import UnitOfWork

T = TypeVar("T")


def commit_once(
    uow: UnitOfWork,
    tenant: str,
    method: str,
    key: RequestKey | None,
    work: Callable[[], T],
    dump: Callable[[T], dict[str, Any]],
    load: Callable[[dict[str, Any]], T],
) -> T:
    """Does `work` and commits, recording its answer under the request id in the same
    transaction; a repeat of the request returns the recorded answer and does nothing."""
    if key is not None:
        earlier = uow.idempotency.claim(tenant, key.request_id, method, key.fingerprint)
        if earlier is not None:
            if earlier.method != method or earlier.fingerprint != key.fingerprint or earlier.response is None:
                raise InvalidArgument.field(
                    "request_id", f"{key.request_id!r} was already used for a different request"
                )
            return load(earlier.response)
    result = work()
    if key is not None:
        uow.idempotency.complete(tenant, key.request_id, dump(result))
    uow.commit()
    return result
