"""Who is calling. Authentication (bearer tokens bound to tenants) plugs in here."""

from __future__ import annotations

import hashlib

import grpc
from google.protobuf.message import Message

from controlplane.domain.idempotency import RequestKey

DEFAULT_TENANT = "default"


def tenant_of(context: grpc.ServicerContext) -> str:
    # Until tokens are bound to tenants every caller belongs to the default tenant.
    return DEFAULT_TENANT


def request_key(request: Message, request_id: str) -> RequestKey | None:
    """The request id with a fingerprint of the whole request, so a reused id with
    different content is told apart from a retry."""
    fingerprint = hashlib.sha256(type(request).DESCRIPTOR.full_name.encode())
    fingerprint.update(request.SerializeToString(deterministic=True))
    return RequestKey.of(request_id, fingerprint.hexdigest())
