"""Run a mutating use case once per request id, inside the caller's Unit of Work."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from controlplane.domain.errors import InvalidArgument
from controlplane.domain.idempotency import RequestKey
from controlplane.service.ports import UnitOfWork

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Outcome(Generic[T]):
    result: T
    # True when this call was a retry, answered from the idempotency record.
    replayed: bool


def commit_once(
    uow: UnitOfWork,
    tenant: str,
    method: str,
    key: RequestKey | None,
    work: Callable[[], T],
    dump: Callable[[T], dict[str, Any]],
    load: Callable[[dict[str, Any]], T],
) -> Outcome[T]:
    """Does `work` and commits, recording its answer under the request id in the same
    transaction; a repeat of the request returns the recorded answer and does nothing."""
    if key is not None:
        earlier = uow.idempotency.claim(tenant, key.request_id, method, key.fingerprint)
        if earlier is not None:
            if earlier.method != method or earlier.fingerprint != key.fingerprint or earlier.response is None:
                raise InvalidArgument.field(
                    "request_id", f"{key.request_id!r} was already used for a different request"
                )
            log.info("replayed %s", method, extra={"action": "request.replay", "request_id": key.request_id})
            return Outcome(load(earlier.response), replayed=True)
    result = work()
    if key is not None:
        uow.idempotency.complete(tenant, key.request_id, dump(result))
    uow.commit()
    return Outcome(result, replayed=False)
