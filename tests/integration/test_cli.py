"""The command line against a real control plane: output formats, exit codes, readable errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from controlplane.bootstrap import ControlPlane

from .cli import run_cli

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "orders.yaml"


@pytest.fixture
def address(control_plane: ControlPlane) -> str:
    return control_plane.address


def test_create_get_list_in_every_output_format(address: str) -> None:
    created = run_cli("-o", "json", "ingestions", "create", "-f", EXAMPLE, address=address)
    assert created.code == 0, created.stderr
    body = json.loads(created.stdout)
    assert body["name"] == "ingestions/orders"
    assert body["format"]["type"] == "TYPE_JSON"
    assert body["limits"]["maxAttempts"] == 5
    assert body["schedule"] == {"cron": "*/15 * * * *", "timeZone": "Europe/Berlin"}

    as_yaml = run_cli("-o", "yaml", "ingestions", "get", "orders", address=address)
    assert as_yaml.code == 0
    assert yaml.safe_load(as_yaml.stdout)["destination"]["table"] == "raw.orders"

    table = run_cli("ingestions", "list", address=address)
    assert table.code == 0
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:3] == ["NAME", "STATE", "SOURCE"]
    assert row.split()[:2] == ["orders", "ACTIVE"]

    listed = json.loads(run_cli("-o", "json", "ingestions", "list", address=address).stdout)
    assert [i["name"] for i in listed["ingestions"]] == ["ingestions/orders"]


def test_json_output_applies_back_unchanged(address: str, tmp_path: Path) -> None:
    assert run_cli("ingestions", "create", "-f", EXAMPLE, address=address).code == 0
    exported = tmp_path / "exported.json"
    exported.write_text(run_cli("-o", "json", "ingestions", "get", "orders", address=address).stdout)
    again = run_cli("ingestions", "apply", "-f", exported, address=address)
    assert again.code == 0, again.stderr
    assert "unchanged" in again.stderr


def test_apply_creates_then_updates_only_changed_fields(address: str, tmp_path: Path) -> None:
    first = run_cli("ingestions", "apply", "-f", EXAMPLE, address=address)
    assert first.code == 0, first.stderr
    assert "created ingestions/orders" in first.stderr
    changed = tmp_path / "orders.yaml"
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["limits"]["maxAttempts"] = 9
    spec["format"] = {"type": "JSON", "multiline": True}
    changed.write_text(yaml.safe_dump(spec))
    second = run_cli("-o", "json", "ingestions", "apply", "-f", changed, address=address)
    assert second.code == 0, second.stderr
    assert "updated ingestions/orders: format.multiline, limits.max_attempts" in second.stderr
    body = json.loads(second.stdout)
    assert body["limits"]["maxAttempts"] == 9
    assert body["format"]["multiline"] is True
    assert body["etag"] == 'W/"2"'


def test_update_with_mask_pause_resume_delete(address: str, tmp_path: Path) -> None:
    assert run_cli("ingestions", "create", "-f", EXAMPLE, address=address).code == 0
    patch = tmp_path / "patch.yaml"
    patch.write_text("limits: {maxAttempts: 3, maxFilesPerLease: 7}\n")
    updated = run_cli("-o", "json", "ingestions", "update", "orders", "-f", patch, "--mask", "limits.max_attempts",
                      address=address)  # fmt: skip
    assert updated.code == 0, updated.stderr
    limits = json.loads(updated.stdout)["limits"]
    assert limits["maxAttempts"] == 3
    assert limits["maxFilesPerLease"] == 200  # not in the mask: unchanged

    paused = run_cli("-o", "json", "ingestions", "pause", "ingestions/orders", address=address)
    assert json.loads(paused.stdout)["state"] == "STATE_PAUSED"
    only_paused = run_cli("-o", "json", "ingestions", "list", "--state", "paused", address=address)
    assert len(json.loads(only_paused.stdout)["ingestions"]) == 1
    only_active = run_cli("-o", "json", "ingestions", "list", "--state", "active", address=address)
    assert json.loads(only_active.stdout)["ingestions"] == []
    resumed = run_cli("-o", "json", "ingestions", "resume", "orders", address=address)
    assert json.loads(resumed.stdout)["state"] == "STATE_ACTIVE"

    deleted = run_cli("ingestions", "delete", "orders", address=address)
    assert deleted.code == 0
    gone = run_cli("ingestions", "get", "orders", address=address)
    assert gone.code == 1
    assert "NOT_FOUND" in gone.stderr


def test_bad_input_exit_2_names_every_field_without_traceback(address: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: {uri: 'ftp://host/x'}\nformat: {type: CSV, delimiter: ';;'}\ndestination: {table: Bad}\n")
    result = run_cli("ingestions", "create", "-f", bad, address=address)
    assert result.code == 2
    for field in ("source.uri", "format.delimiter", "destination.table"):
        assert f"- {field}:" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("- just\n- a list\n", "must be a mapping"),
        ("source: {uri: [1, 2]}\n", "uri"),
        ("format: {type: XML}\n", "XML"),
        ("sauce: {}\n", "sauce"),
        ("source: {uri: 'file:///x'\n", "not valid YAML"),
    ],
)
def test_unreadable_spec_exit_2(address: str, tmp_path: Path, content: str, expected: str) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(content)
    result = run_cli("ingestions", "create", "-f", spec, address=address)
    assert result.code == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_spec_file_and_usage_errors_exit_2(address: str) -> None:
    missing = run_cli("ingestions", "create", "-f", "/no/such/spec.yaml", address=address)
    assert missing.code == 2
    assert "cannot read /no/such/spec.yaml" in missing.stderr
    assert run_cli("ingestions", "create", address=address).code == 2
    assert run_cli("ingestions", "frobnicate", address=address).code == 2
    assert run_cli("-o", "xml", "ingestions", "list", address=address).code == 2


def test_duplicate_and_wrong_state_exit_1(address: str) -> None:
    assert run_cli("ingestions", "create", "-f", EXAMPLE, address=address).code == 0
    duplicate = run_cli("ingestions", "create", "-f", EXAMPLE, address=address)
    assert duplicate.code == 1
    assert "ALREADY_EXISTS" in duplicate.stderr


def test_retried_create_with_same_request_id_returns_first(address: str) -> None:
    first = run_cli("-o", "json", "ingestions", "create", "-f", EXAMPLE, "--request-id", "r-1", address=address)
    again = run_cli("-o", "json", "ingestions", "create", "-f", EXAMPLE, "--request-id", "r-1", address=address)
    assert first.code == again.code == 0
    assert json.loads(first.stdout) == json.loads(again.stdout)


def test_spec_from_stdin(address: str) -> None:
    result = run_cli("ingestions", "create", "-f", "-", "--id", "piped", stdin=EXAMPLE.read_text(), address=address)
    assert result.code == 0, result.stderr
    assert "ingestions/piped" in result.stdout


def test_unreachable_control_plane_exit_3() -> None:
    result = run_cli("ingestions", "list", address="127.0.0.1:1")
    assert result.code == 3
    assert "cannot reach the control plane at 127.0.0.1:1" in result.stderr


def test_refresh_asks_first_and_dry_run_changes_nothing(address: str) -> None:
    assert run_cli("ingestions", "create", "-f", EXAMPLE, address=address).code == 0
    dry = run_cli("ingestions", "refresh", "orders", "--dry-run", address=address)
    assert dry.code == 0, dry.stderr
    assert "would ingestions/orders: empty" in dry.stdout
    assert "0 known files" in dry.stdout
    plan = json.loads(run_cli("-o", "json", "ingestions", "refresh", "orders", "--mode", "new-only", "--dry-run",
                              address=address).stdout)  # fmt: skip
    assert plan["table"]
    assert "run" not in plan
    runs = json.loads(run_cli("-o", "json", "runs", "list", "orders", address=address).stdout)
    assert runs.get("runs", []) == []

    # Not a terminal and no --yes: refused, readable, nothing done.
    unconfirmed = run_cli("ingestions", "refresh", "orders", address=address, stdin="")
    assert unconfirmed.code == 2
    assert "--yes" in unconfirmed.stderr
    assert "Traceback" not in unconfirmed.stderr
    assert json.loads(run_cli("-o", "json", "runs", "list", "orders", address=address).stdout).get("runs", []) == []

    started = run_cli("ingestions", "refresh", "orders", "--yes", address=address)
    assert started.code == 0, started.stderr
    run = started.stdout.strip()
    assert run.startswith("ingestions/orders/runs/")
    shown = json.loads(run_cli("-o", "json", "runs", "get", run, address=address).stdout)
    assert shown["trigger"] == "TRIGGER_REFRESH"
