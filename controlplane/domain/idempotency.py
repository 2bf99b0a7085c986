"""Request ids: a retried mutating call carries the same id and gets the first answer."""

from __future__ import annotations

import re
from dataclasses import dataclass

from controlplane.domain.errors import InvalidArgument

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:~-]{1,128}$")


@dataclass(frozen=True)
class RequestKey:
    """A request id and a fingerprint of the whole request it came with."""

    request_id: str
    fingerprint: str

    @classmethod
    def of(cls, request_id: str, fingerprint: str) -> RequestKey | None:
        """None when the client sent no request id (the call is then not deduplicated)."""
        if not request_id:
            return None
        if not _REQUEST_ID.fullmatch(request_id):
            raise InvalidArgument.field(
                "request_id", "must be 1 to 128 characters of letters, digits and . _ : ~ - (a UUID works)"
            )
        return cls(request_id, fingerprint)
