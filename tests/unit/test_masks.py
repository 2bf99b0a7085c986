"""controlplane.domain.masks.apply_mask: field-mask updates over nested dicts."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controlplane.domain.errors import InvalidArgument
from controlplane.domain.masks import apply_mask

MUTABLE = frozenset(
    {
        "display_name", "labels",
        "source.glob", "source.recursive",
        "format", "format.type", "format.delimiter", "format.header",
        "limits", "limits.max_attempts", "limits.max_files_per_lease",
        "schedule", "schedule.cron", "schedule.time_zone",
    }
)  # fmt: skip
IMMUTABLE = frozenset({"source.uri", "destination", "destination.table"})


def current() -> dict[str, Any]:
    return {
        "display_name": "Old",
        "description": "kept",
        "labels": {"team": "a", "env": "dev"},
        "source": {"uri": "s3://bucket/p", "glob": "*.json", "recursive": False},
        "format": {"type": "CSV", "delimiter": ",", "header": True},
        "limits": {"max_attempts": 3, "max_files_per_lease": 10},
        "destination": {"table": "raw.t"},
        "schedule": None,
    }


def apply(base: dict[str, Any], patch: dict[str, Any], *paths: str) -> dict[str, Any]:
    return apply_mask(base, patch, paths, mutable=MUTABLE, immutable=IMMUTABLE)


def rejected(patch: dict[str, Any], *paths: str) -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgument) as caught:
        apply(current(), patch, *paths)
    return [(v.field, v.description) for v in caught.value.violations]


def test_leaf_path_changes_only_that_leaf() -> None:
    patch = {"format": {"type": "JSON", "delimiter": ";", "header": False}, "display_name": "New"}
    result = apply(current(), patch, "format.delimiter")
    expected = current()
    expected["format"]["delimiter"] = ";"
    assert result == expected


def test_top_level_leaf_path() -> None:
    result = apply(current(), {"display_name": "New", "description": "ignored"}, "display_name")
    expected = current()
    expected["display_name"] = "New"
    assert result == expected


def test_message_path_replaces_the_whole_message() -> None:
    result = apply(current(), {"limits": {"max_attempts": 7}}, "limits")
    assert result["limits"] == {"max_attempts": 7}
    assert {k: v for k, v in result.items() if k != "limits"} == {k: v for k, v in current().items() if k != "limits"}


def test_map_path_replaces_the_whole_map() -> None:
    result = apply(current(), {"labels": {"owner": "x"}}, "labels")
    assert result["labels"] == {"owner": "x"}


def test_several_paths_apply_together() -> None:
    patch = {"display_name": "New", "format": {"header": False}, "source": {"glob": "**/*.csv", "uri": "s3://other/x"}}
    result = apply(current(), patch, "display_name", "format.header", "source.glob")
    assert result["display_name"] == "New"
    assert result["format"] == {"type": "CSV", "delimiter": ",", "header": False}
    assert result["source"] == {"uri": "s3://bucket/p", "glob": "**/*.csv", "recursive": False}


def test_false_and_zero_are_values_not_removals() -> None:
    result = apply(current(), {"format": {"header": False}, "limits": {"max_attempts": 0}}, "format.header", "limits")
    assert result["format"]["header"] is False
    assert result["limits"] == {"max_attempts": 0}


def test_missing_leaf_in_patch_removes_it() -> None:
    result = apply(current(), {}, "display_name")
    assert "display_name" not in result
    assert result["description"] == "kept"


def test_none_leaf_in_patch_removes_it() -> None:
    result = apply(current(), {"format": {"delimiter": None}}, "format.delimiter")
    assert result["format"] == {"type": "CSV", "header": True}


def test_none_message_in_patch_removes_the_message() -> None:
    base = current()
    base["schedule"] = {"cron": "0 * * * *", "time_zone": "UTC"}
    result = apply(base, {"schedule": None}, "schedule")
    assert "schedule" not in result


def test_leaf_path_under_a_missing_parent_in_patch_removes_the_leaf() -> None:
    result = apply(current(), {"format": None}, "format.delimiter")
    assert result["format"] == {"type": "CSV", "header": True}


def test_leaf_path_creates_a_parent_that_was_none() -> None:
    result = apply(current(), {"schedule": {"cron": "0 * * * *", "time_zone": "UTC"}}, "schedule.cron")
    assert result["schedule"] == {"cron": "0 * * * *"}


def test_current_and_patch_are_not_mutated() -> None:
    base = current()
    patch = {"display_name": "New", "labels": {"owner": "x"}, "limits": {"max_attempts": 9}, "format": {}}
    base_before, patch_before = copy.deepcopy(base), copy.deepcopy(patch)
    apply(base, patch, "display_name", "labels", "limits.max_attempts", "format.delimiter", "source.glob")
    assert base == base_before
    assert patch == patch_before


def test_result_shares_no_nested_dicts_with_its_inputs() -> None:
    base = current()
    patch: dict[str, Any] = {"labels": {"owner": "x", "nested": {"deep": "1"}}}
    result = apply(base, patch, "labels")
    result["format"]["delimiter"] = "X"
    result["labels"]["nested"]["deep"] = "2"
    assert base["format"]["delimiter"] == ","
    assert patch["labels"]["nested"]["deep"] == "1"


def test_paths_may_be_any_iterable() -> None:
    result = apply_mask(
        current(), {"display_name": "New"}, iter(["display_name"]), mutable=MUTABLE, immutable=IMMUTABLE
    )
    assert result["display_name"] == "New"


def test_empty_mask_is_rejected() -> None:
    assert rejected({"display_name": "New"}) == [("update_mask", "is required: name the fields to change")]


@pytest.mark.parametrize("path", ["source.uri", "destination", "destination.table", "destination.table.x"])
def test_immutable_paths_are_rejected(path: str) -> None:
    violations = rejected({}, path)
    assert violations == [("update_mask", f"{path!r} cannot be changed after creation")]


def test_a_path_containing_immutable_fields_is_rejected() -> None:
    assert rejected({"source": {"glob": "x"}}, "source") == [
        ("update_mask", "'source' includes fields that cannot change")
    ]


@pytest.mark.parametrize("path", ["nope", "description", "format_x", "form", "", "sourc.glob", "source.credentials"])
def test_unknown_paths_are_rejected(path: str) -> None:
    assert rejected({}, path) == [("update_mask", f"unknown or read-only field {path!r}")]


def test_every_bad_path_is_reported_and_nothing_applies() -> None:
    violations = rejected({"display_name": "New"}, "display_name", "nope", "source.uri", "source")
    assert [field for field, _ in violations] == ["update_mask"] * 3
    assert [description.split()[0] for _, description in violations] == ["unknown", "'source.uri'", "'source'"]


def test_a_path_below_a_scalar_field_is_rejected() -> None:
    """ "limits.max_attempts" is a number: "limits.max_attempts.x" names no field, and must not replace it with {}."""
    with pytest.raises(InvalidArgument):
        apply(current(), {"limits": {"max_attempts": 5}}, "limits.max_attempts.x")
