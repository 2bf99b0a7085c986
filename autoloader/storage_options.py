"""fsspec options for a source: its non-secret options plus the named credentials, on any process.

Credentials are configured on each process that reads sources
(`AUTOLOADER_CREDENTIALS`, the same JSON map on control planes and agents) and
referenced by name from the ingestion; the secret never travels in an RPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class MissingCredentials(Exception):
    """The ingestion names credentials this process was not configured with."""


def storage_options(
    options: Mapping[str, str], credentials: Mapping[str, Mapping[str, str]], credentials_ref: str
) -> dict[str, Any]:
    merged: dict[str, Any] = dict(options)
    if credentials_ref:
        if credentials_ref not in credentials:
            raise MissingCredentials(credentials_ref)
        merged.update(credentials[credentials_ref])
    return merged


def fsspec_protocol(scheme: str) -> str:
    """fsspec's name for a URI scheme (gcs:// is gs)."""
    return {"gcs": "gs"}.get(scheme, scheme)
