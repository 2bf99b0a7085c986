"""controlplane.domain.paging: page tokens and the state filter."""

from __future__ import annotations

import base64
import json
from enum import StrEnum

import pytest

from controlplane.domain.errors import InvalidArgument
from controlplane.domain.ingestion import IngestionState
from controlplane.domain.paging import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    PageRequest,
    next_page_token,
    page_request,
    parse_state_filter,
)

QUERY = "tenant-a|ACTIVE"


def invalid_field(call: object) -> str:
    """The single violated field of an InvalidArgument raised by call()."""
    assert callable(call)
    with pytest.raises(InvalidArgument) as caught:
        call()
    (violation,) = caught.value.violations
    assert violation.description
    return violation.field


def encode(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


# --- page_request / next_page_token -------------------------------------------------------------------------------


def test_first_page_has_no_cursor() -> None:
    assert page_request(10, "", QUERY) == PageRequest(10, None)


@pytest.mark.parametrize("key", ["orders", "a", "ingestion-with-dashes-1", "ünïcode/ключ", "x" * 500, ""])
def test_token_round_trip(key: str) -> None:
    token = next_page_token(key, QUERY)
    assert page_request(25, token, QUERY) == PageRequest(25, key)


def test_token_is_url_safe_and_unpadded() -> None:
    token = next_page_token("ü?/+" * 10, QUERY)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_token_does_not_carry_the_query_in_clear() -> None:
    token = next_page_token("orders", "secret-tenant|ACTIVE")
    decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    assert "secret-tenant" not in decoded


def test_default_page_size() -> None:
    assert DEFAULT_PAGE_SIZE == 50
    assert page_request(0, "", QUERY).size == 50


@pytest.mark.parametrize(("asked", "given"), [(1, 1), (999, 999), (1000, 1000), (1001, 1000), (10**9, 1000)])
def test_page_size_is_capped(asked: int, given: int) -> None:
    assert MAX_PAGE_SIZE == 1000
    assert page_request(asked, "", QUERY).size == given
    assert page_request(asked, next_page_token("k", QUERY), QUERY) == PageRequest(given, "k")


@pytest.mark.parametrize("size", [-1, -1000])
def test_negative_page_size_is_invalid(size: int) -> None:
    assert invalid_field(lambda: page_request(size, "", QUERY)) == "page_size"
    assert invalid_field(lambda: page_request(size, next_page_token("k", QUERY), QUERY)) == "page_size"


def test_token_from_another_query_is_rejected() -> None:
    token = next_page_token("orders", "tenant-a|")
    assert invalid_field(lambda: page_request(10, token, "tenant-a|ACTIVE")) == "page_token"
    assert invalid_field(lambda: page_request(10, token, "tenant-b|")) == "page_token"
    assert page_request(10, token, "tenant-a|") == PageRequest(10, "orders")


def _tampered(token: str) -> list[str]:
    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    return [token[:-1], token[1:], token[: len(token) // 2], flipped, "x" + token]


@pytest.mark.parametrize("token", _tampered(next_page_token("orders", QUERY)))
def test_tampered_token_is_rejected(token: str) -> None:
    assert invalid_field(lambda: page_request(10, token, QUERY)) == "page_token"


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "!!!!",
        "a",
        "====",
        "é",
        "\x00",
        encode([1, 2]),
        encode("a string"),
        encode(5),
        encode(None),
        encode({}),
        encode({"after": "orders"}),
        encode({"query": "x"}),
        base64.urlsafe_b64encode(b"\xff\xfe\x00garbage").decode(),
    ],
)
def test_garbage_token_is_rejected(token: str) -> None:
    assert invalid_field(lambda: page_request(10, token, QUERY)) == "page_token"


def test_token_with_a_non_string_cursor_is_rejected() -> None:
    good = json.loads(base64.urlsafe_b64decode(next_page_token("k", QUERY) + "=="))
    for after in (5, None, ["k"], {"k": 1}):
        token = encode({"after": after, "query": good["query"]})
        assert invalid_field(lambda token=token: page_request(10, token, QUERY)) == "page_token"


def test_deeply_nested_token_is_invalid_argument() -> None:
    """Any client-sent token is INVALID_ARGUMENT; a JSON bomb must not escape as RecursionError (INTERNAL)."""
    token = base64.urlsafe_b64encode(b"[" * 100_000 + b"]" * 100_000).decode()
    assert invalid_field(lambda: page_request(10, token, QUERY)) == "page_token"


# --- parse_state_filter ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", " ", "\t\n"])
def test_empty_filter_means_all_states(text: str) -> None:
    assert parse_state_filter(text, IngestionState) == frozenset()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("state = ACTIVE", {IngestionState.ACTIVE}),
        ("state=PAUSED", {IngestionState.PAUSED}),
        ("  state   =   ERROR  ", {IngestionState.ERROR}),
        ("STATE = active", {IngestionState.ACTIVE}),
        ("State = Paused", {IngestionState.PAUSED}),
        ("state = STATE_ACTIVE", {IngestionState.ACTIVE}),
        ("state = state_deleting", {IngestionState.DELETING}),
        ("state = ACTIVE OR state = PAUSED", {IngestionState.ACTIVE, IngestionState.PAUSED}),
        ("state = ACTIVE or state = STATE_PAUSED", {IngestionState.ACTIVE, IngestionState.PAUSED}),
        ("state = ACTIVE OR state = ACTIVE", {IngestionState.ACTIVE}),
        (
            "state=PROVISIONING  OR  state=REFRESHING Or state=ERROR",
            {IngestionState.PROVISIONING, IngestionState.REFRESHING, IngestionState.ERROR},
        ),
    ],
)
def test_state_filter(text: str, expected: set[IngestionState]) -> None:
    assert parse_state_filter(text, IngestionState) == frozenset(expected)


@pytest.mark.parametrize(
    "text",
    [
        "ACTIVE",
        "state",
        "state =",
        "state == ACTIVE",
        "state != ACTIVE",
        "state = 'ACTIVE'",
        'state = "ACTIVE"',
        "state = ACTIVE AND state = PAUSED",
        "state = ACTIVE OR",
        "OR state = ACTIVE",
        "state = ACTIVE OR OR state = PAUSED",
        "name = orders",
        "state = ACTIVE; DROP TABLE ingestions",
        "state = ACTIVE,PAUSED",
        "state = 1",
    ],
)
def test_bad_filter_syntax(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_state_filter(text, IngestionState)
    (violation,) = caught.value.violations
    assert violation.field == "filter"
    assert violation.description.startswith("cannot parse")


@pytest.mark.parametrize("value", ["RUNNING", "STATE_", "STATE_RUNNING", "ACTIVEX", "_ACTIVE"])
def test_unknown_state(value: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_state_filter(f"state = ACTIVE OR state = {value}", IngestionState)
    (violation,) = caught.value.violations
    assert violation.field == "filter"
    assert violation.description == (
        f"unknown state {value!r}; use one of PROVISIONING, ACTIVE, PAUSED, REFRESHING, ERROR, DELETING"
    )


def test_state_filter_works_for_any_enum_and_prefix() -> None:
    class Color(StrEnum):
        RED = "RED"
        BLUE = "BLUE"

    assert parse_state_filter("state = COLOR_red", Color, prefix="COLOR_") == frozenset({Color.RED})
    with pytest.raises(InvalidArgument):
        parse_state_filter("state = STATE_RED", Color, prefix="COLOR_")
