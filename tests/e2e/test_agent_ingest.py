"""An in-process agent on real Spark and Iceberg: files land exactly once, whatever happens to them."""

from __future__ import annotations

import gzip
import json
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from autoloader.v1 import file_pb2, ingestion_pb2

from .conftest import Run, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

Format = ingestion_pb2.Format
Schema = ingestion_pb2.Schema
File = file_pb2.File


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def data(rows: list[dict[str, Any]], *columns: str) -> Counter[tuple[Any, ...]]:
    """The multiset of the given columns' values."""
    return Counter(tuple(r.get(c) for c in columns) for r in rows)


def test_files_land_exactly_once_with_metadata_columns(stack: Stack, workdir: Path) -> None:
    source = workdir / "src"
    expected: list[dict[str, Any]] = []
    for i in range(12):
        rows = [{"id": i * 1000 + j, "name": f"n{j}", "price": j * 1.5} for j in range(i * 3)]  # file 0 is empty
        write_jsonl(source / f"part-{i:03d}.json", rows)
        expected.extend(rows)
    ingestion = stack.create(
        "orders", source.as_uri(), Format(type=Format.TYPE_JSON), limits=ingestion_pb2.Limits(max_files_per_lease=5)
    )
    stack.start_agent()
    run = stack.run(ingestion)
    assert run.state == Run.STATE_SUCCEEDED, run
    assert run.file_counts.succeeded == 12
    assert run.records == len(expected)

    rows = stack.rows("e2e.orders")
    assert data(rows, "id", "name", "price") == data(expected, "id", "name", "price")
    by_file = Counter(r["_source_file"] for r in rows)
    assert by_file == {(source / f"part-{i:03d}.json").as_uri(): i * 3 for i in range(1, 12)}
    assert {r["_run"] for r in rows} == {run.name.rpartition("/")[2]}
    assert all(r["_ingested_at"] is not None for r in rows)
    # Each file's reported record count is its row count.
    files = {f.path: f for f in stack.list_files(ingestion)}
    # Each row carries its file's modification time as discovery listed it, to the microsecond.
    assert {r["_source_file"]: r["_source_modified_at"] for r in rows} == {
        path: f.modified_time.ToDatetime(tzinfo=UTC) for path, f in files.items() if f.records
    }
    assert {path: f.records for path, f in files.items()} == {
        (source / f"part-{i:03d}.json").as_uri(): i * 3 for i in range(12)
    }
    # Every snapshot names the commits (intents) it carries and the leases that staged them.
    table = stack.table("e2e.orders")
    assert all(s.summary["autoloader.leases"].startswith("leases/") for s in table.snapshots())
    assert all(s.summary["autoloader.commits"] for s in table.snapshots())


def test_a_changed_file_replaces_its_rows(stack: Stack, workdir: Path) -> None:
    source = workdir / "src"
    write_jsonl(source / "a.json", [{"id": 1, "v": "old"}, {"id": 2, "v": "old"}])
    write_jsonl(source / "b.json", [{"id": 3, "v": "keep"}])
    ingestion = stack.create("changes", source.as_uri(), Format(type=Format.TYPE_JSON))
    stack.start_agent()
    assert stack.run(ingestion).state == Run.STATE_SUCCEEDED
    write_jsonl(source / "a.json", [{"id": 1, "v": "new"}, {"id": 4, "v": "new"}, {"id": 5, "v": "new"}])
    second = stack.run(ingestion)
    assert second.state == Run.STATE_SUCCEEDED
    assert second.file_counts.total == 1  # only the changed file
    assert data(stack.rows("e2e.changes"), "id", "v") == Counter(
        {(1, "new"): 1, (4, "new"): 1, (5, "new"): 1, (3, "keep"): 1}
    )
    # A file emptied at the source takes its rows with it.
    (source / "a.json").write_text("")
    assert stack.run(ingestion).state == Run.STATE_SUCCEEDED
    assert data(stack.rows("e2e.changes"), "id", "v") == Counter({(3, "keep"): 1})


def test_bad_files_fail_alone_with_readable_errors(stack: Stack, workdir: Path) -> None:
    source = workdir / "src"
    good = [{"id": i, "s": "x"} for i in range(5)]
    for i in range(6):
        write_jsonl(source / f"good-{i}.json", [{**r, "id": r["id"] + 10 * i} for r in good])
    (source / "malformed.json").write_text('{"id": 100, "s": "ok"}\n{"id": 101, "s": \n')
    (source / "binary.json").write_bytes(bytes(range(256)) * 4)
    (source / "empty.json").write_text("")
    payload = gzip.compress(b"".join(json.dumps({"id": 200 + i, "s": "z"}).encode() + b"\n" for i in range(500)))
    (source / "truncated.json.gz").write_bytes(payload[: len(payload) // 2])
    with gzip.open(source / "whole.json.gz", "wt") as f:
        f.write("".join(json.dumps({"id": 300 + i, "s": "gz"}) + "\n" for i in range(3)))
    ingestion = stack.create(
        "poison", source.as_uri(), Format(type=Format.TYPE_JSON), source_fields={"glob": "*.json*"},
        limits=ingestion_pb2.Limits(max_files_per_lease=20),
    )  # fmt: skip
    stack.start_agent()
    run = stack.run(ingestion)
    assert run.state == Run.STATE_PARTIALLY_SUCCEEDED, run
    files = {Path(f.path).name: f for f in stack.list_files(ingestion)}
    bad = {name for name, f in files.items() if f.state == File.STATE_QUARANTINED}
    assert bad == {"malformed.json", "binary.json", "truncated.json.gz"}
    for name in bad:
        assert files[name].last_error, name
        assert "Traceback" not in files[name].last_error, files[name].last_error
    assert {name for name, f in files.items() if f.state == File.STATE_SUCCEEDED} == set(files) - bad
    ids = sorted(r["id"] for r in stack.rows("e2e.poison"))
    assert ids == sorted([r["id"] + 10 * i for i in range(6) for r in good] + [300, 301, 302])


def test_orphaned_staging_files_are_removed_and_committed_ones_kept(
    make_stack: Callable[..., Stack], workdir: Path
) -> None:
    import os

    from controlplane.config import ControlPlaneSettings

    stack = make_stack(orphan_sweep_interval=0)
    source = workdir / "src"
    write_jsonl(source / "a.json", [{"id": 1}])
    ingestion = stack.create("orphans", source.as_uri(), Format(type=Format.TYPE_JSON))
    stack.start_agent()
    assert stack.run(ingestion).state == Run.STATE_SUCCEEDED
    stack.stop_agents()
    staging = Path(stack.table("e2e.orphans").location().removeprefix("file://")) / "data" / "_staging"
    (committed,) = list(staging.iterdir())
    orphan = staging / "crashed-batch"
    (orphan / "part-0.parquet").parent.mkdir()
    (orphan / "part-0.parquet").write_bytes(b"PAR1")
    old = 1_000_000_000  # 2001: long abandoned
    for path in (orphan, committed):
        os.utime(path, (old, old))
    # a.json changes: its first rows are deleted, so the first staged files stay referenced only by
    # the older snapshots (time travel), which keeps them too.
    write_jsonl(source / "a.json", [{"id": 10}])
    write_jsonl(source / "b.json", [{"id": 2}])
    stack.start_agent("agent-2")
    assert stack.run(ingestion).state == Run.STATE_SUCCEEDED
    # The committer sweeps the table after committing to it, so shortly after the run ended.
    deadline = time.monotonic() + 30
    while orphan.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not orphan.exists()
    assert committed.exists()  # referenced by a snapshot, however old
    assert sorted(r["id"] for r in stack.rows("e2e.orphans")) == [2, 10]
    table = stack.table("e2e.orphans")
    first = min(table.snapshots(), key=lambda s: s.timestamp_ms)
    assert [r["id"] for r in table.scan(snapshot_id=first.snapshot_id).to_arrow().to_pylist()] == [1]
    assert ControlPlaneSettings.model_fields["orphan_age"].default.total_seconds() >= 3600


def test_files_with_unusual_names_keep_their_names(stack: Stack, workdir: Path) -> None:
    """Spark names the files it reads as Java-encoded URIs; each row still gets its file's URI as
    discovery listed it (nothing dropped, nothing unattributed)."""
    source = workdir / "src dir"
    names = ["a b.json", "c+d.json", "e%2Bf.json", "g[1].json", "é.json", "h,i.json", "j#k.json", "l?m.json",
             "n{o}*.json"]  # fmt: skip
    for i, name in enumerate(names):
        write_jsonl(source / name, [{"id": i, "name": name}] * (i + 1))
    # The control plane's file URIs are file:// plus the path as it is (not percent-encoded).
    ingestion = stack.create("names", f"file://{source}", Format(type=Format.TYPE_JSON))
    stack.start_agent()
    run = stack.run(ingestion)
    assert run.state == Run.STATE_SUCCEEDED, run
    assert run.file_counts.succeeded == len(names)
    rows = stack.rows("e2e.names")
    assert Counter((r["_source_file"], r["name"]) for r in rows) == {
        (f"file://{source / name}", name): i + 1 for i, name in enumerate(names)
    }
