"""Keyset pagination tokens and list filters.

Pages are keyed on a unique, immutable sort key (the resource id), so rows
inserted while a client pages through never shift a page: every row that
existed when paging began appears exactly once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from controlplane.domain.errors import InvalidArgument

E = TypeVar("E", bound=StrEnum)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Our tokens are under 200 characters; anything much longer is not one of ours.
MAX_TOKEN_LENGTH = 2048


@dataclass(frozen=True)
class PageRequest:
    size: int
    after: str | None


def page_request(page_size: int, page_token: str, query_fingerprint: str) -> PageRequest:
    """Validates page_size/page_token; the token must come from the same query."""
    if page_size < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not page_token:
        return PageRequest(size, None)
    if len(page_token) > MAX_TOKEN_LENGTH:
        raise InvalidArgument.field("page_token", "is not a token this API returned")
    try:
        payload = json.loads(base64.urlsafe_b64decode(page_token.encode() + b"=" * (-len(page_token) % 4)))
        after, fingerprint = payload["after"], payload["query"]
    except (ValueError, KeyError, TypeError, RecursionError, binascii.Error):
        raise InvalidArgument.field("page_token", "is not a token this API returned") from None
    if not isinstance(after, str) or fingerprint != _hash(query_fingerprint):
        raise InvalidArgument.field("page_token", "belongs to a different query (filter changed?)")
    return PageRequest(size, after)


def next_page_token(last_key: str, query_fingerprint: str) -> str:
    payload = json.dumps({"after": last_key, "query": _hash(query_fingerprint)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_TERM = re.compile(r"^\s*state\s*=\s*([A-Za-z_]+)\s*$", re.IGNORECASE)


def parse_state_filter(text: str, states: type[E], prefix: str = "STATE_") -> frozenset[E]:
    """Parses "state = ACTIVE OR state = PAUSED"; empty means no filter (all states)."""
    if not text.strip():
        return frozenset()
    chosen: set[E] = set()
    for term in re.split(r"\s+OR\s+", text.strip(), flags=re.IGNORECASE):
        match = _TERM.fullmatch(term)
        if not match:
            raise InvalidArgument.field(
                "filter", f"cannot parse {term.strip()!r}: use 'state = ACTIVE OR state = PAUSED'"
            )
        value = match.group(1).upper().removeprefix(prefix)
        try:
            chosen.add(states(value))
        except ValueError:
            allowed = ", ".join(s.value for s in states)
            raise InvalidArgument.field("filter", f"unknown state {match.group(1)!r}; use one of {allowed}") from None
    return frozenset(chosen)
