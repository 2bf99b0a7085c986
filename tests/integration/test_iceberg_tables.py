"""The committer's Iceberg adapter on a real SqlCatalog: commits that stay flat, fence, and recognition.

A commit reads none of the table's earlier data files, however many there are;
a commit built on a table state someone else has since moved past fails (the
fence a paused committer meets); every snapshot names its commits, so a commit
whose outcome is unknown is recognised instead of redone.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.io.pyarrow import PyArrowFileIO

from controlplane.adapters.iceberg_tables import TABLE_PROPERTIES, IcebergTables, open_catalog
from controlplane.domain.commits import FenceLost, StagedBatch

pytestmark = pytest.mark.integration

# One long prefix for every path, as the files of one source directory share.
SOURCE = "file:///data/landing/events/region=eu-west-1/2026/11/30/part-"
TABLE = "bench.events"


@pytest.fixture
def tables(database_url: str, tmp_path: Path) -> Iterator[IcebergTables]:
    store = IcebergTables(open_catalog("test", {"warehouse": (tmp_path / "warehouse").as_uri()}, database_url), 0)
    yield store
    store.close()


def stage(tables: IcebergTables, sources: list[str]) -> StagedBatch:
    """One Parquet file with two rows per source, staged under a fresh lease's location."""
    lease = str(uuid.uuid4())
    rows = pa.table({"id": list(range(2 * len(sources))), "_source_file": [s for s in sources for _ in (0, 1)]})
    path = Path(tables.describe(TABLE).staging_location(lease).removeprefix("file://")) / "piece" / "part-0.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(rows, path)
    return StagedBatch(str(uuid.uuid4()), f"leases/{lease}", tuple(sources), (f"file://{path}",))


def commit(tables: IcebergTables, *batches: StagedBatch, table: Any = None) -> int:
    return tables.commit(TABLE, batches, [], lambda: True, table if table is not None else tables.load(TABLE))


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The Parquet files pyiceberg opens."""
    paths: list[str] = []
    new_input = PyArrowFileIO.new_input

    def recording(self: PyArrowFileIO, location: str) -> Any:
        if location.endswith(".parquet"):
            paths.append(location)
        return new_input(self, location)

    monkeypatch.setattr(PyArrowFileIO, "new_input", recording)
    return paths


@pytest.mark.parametrize(("batches", "per_batch"), [(8, 10), (4, 1000)])
def test_a_commit_reads_only_its_own_staged_files(
    tables: IcebergTables, opened: list[str], batches: int, per_batch: int
) -> None:
    """Also past 200 sources a batch: pyiceberg checks a larger IN predicate against no bounds, so the
    committer must not hand it one (a 5,000-file run's fifth commit read all 128 data files before)."""
    for batch in range(batches):
        commit(tables, stage(tables, [f"{SOURCE}{batch}{i:04d}.json" for i in range(per_batch)]))
    opened.clear()
    staged = stage(tables, [f"{SOURCE}9{i:04d}.json" for i in range(per_batch)])
    commit(tables, staged)
    # Its own file (its schema, and the statistics add_files takes from the footer); none of those before.
    assert {p.removeprefix("file://") for p in opened} == {s.removeprefix("file://") for s in staged.data_files}
    table = tables.load(TABLE)
    assert len(table.scan().to_arrow()) == (batches + 1) * per_batch * 2


def test_a_large_commit_replaces_the_rows_of_the_sources_it_reloads(tables: IcebergTables) -> None:
    commit(tables, stage(tables, [f"{SOURCE}0{i:04d}.json" for i in range(600)]))
    # Interleaved with the first batch's names (inside its bounds) and three of them again.
    again = [f"{SOURCE}0{i:04d}.json" for i in (0, 299, 599)]
    commit(tables, stage(tables, [f"{SOURCE}0{i:04d}x.json" for i in range(600)] + again))
    counts = tables.load(TABLE).scan().to_arrow()["_source_file"].value_counts().to_pylist()
    assert len(counts) == 1200
    assert {c["counts"] for c in counts} == {2}


def test_recommitting_a_source_still_replaces_its_rows(tables: IcebergTables) -> None:
    commit(tables, stage(tables, [f"{SOURCE}00001.json", f"{SOURCE}00002.json"]))
    commit(tables, stage(tables, [f"{SOURCE}00002.json"]))
    counts = tables.load(TABLE).scan().to_arrow()["_source_file"].value_counts().to_pylist()
    assert {c["values"]: c["counts"] for c in counts} == {f"{SOURCE}00001.json": 2, f"{SOURCE}00002.json": 2}


def test_several_batches_become_one_snapshot_pair(tables: IcebergTables) -> None:
    commit(tables, stage(tables, [f"{SOURCE}00001.json"]))
    before = len(tables.load(TABLE).snapshots())
    batches = [stage(tables, [f"{SOURCE}1{i:04d}.json"]) for i in range(5)]
    commit(tables, *batches)
    table = tables.load(TABLE)
    # One transaction: a delete snapshot (when it matches rows) and an append, whatever the batch count.
    assert len(table.snapshots()) - before <= 2
    assert len(table.scan().to_arrow()) == 2 + 5 * 2
    carried = table.current_snapshot().summary.additional_properties["autoloader.commits"].split(",")
    assert sorted(carried) == sorted(b.commit_id for b in batches)


def test_a_table_an_older_version_created_gets_the_property(tables: IcebergTables) -> None:
    schema = pa.schema([("id", pa.int64()), ("_source_file", pa.string())])
    tables.catalog.create_namespace_if_not_exists("bench")
    tables.catalog.create_table(TABLE, schema=schema, location=tables.describe(TABLE).location)
    commit(tables, stage(tables, [f"{SOURCE}00001.json"]))
    table = tables.load(TABLE)
    assert {k: table.properties.get(k) for k in TABLE_PROPERTIES} == TABLE_PROPERTIES


def test_a_commit_built_on_an_old_table_state_fails_and_changes_nothing(tables: IcebergTables) -> None:
    """The paused committer: it loaded the table, someone committed since, its commit must not land."""
    commit(tables, stage(tables, [f"{SOURCE}00001.json"]))
    stale = tables.load(TABLE)
    newer = stage(tables, [f"{SOURCE}00001.json"])
    commit(tables, newer)
    # Another source, so nothing in the data conflicts: only the fence can stop it (pyiceberg's own
    # retry would rebuild it on top of the newer state and land it).
    old = stage(tables, [f"{SOURCE}00002.json"])
    with pytest.raises(CommitFailedException):
        commit(tables, old, table=stale)
    table = tables.load(TABLE)
    assert tables.committed(table, [newer.commit_id, old.commit_id], 0) == {newer.commit_id}
    assert {r["_source_file"] for r in table.scan().to_arrow().to_pylist()} == {f"{SOURCE}00001.json"}


def test_a_committer_that_lost_the_table_commits_nothing(tables: IcebergTables) -> None:
    commit(tables, stage(tables, [f"{SOURCE}00001.json"]))
    snapshot = tables.load(TABLE).current_snapshot().snapshot_id
    with pytest.raises(FenceLost):
        tables.commit(TABLE, [stage(tables, [f"{SOURCE}00002.json"])], [], lambda: False, tables.load(TABLE))
    assert tables.load(TABLE).current_snapshot().snapshot_id == snapshot


def test_commits_are_recognised_by_their_snapshot_property(tables: IcebergTables) -> None:
    since = int(time.time() * 1000)
    first, second = stage(tables, [f"{SOURCE}00001.json"]), stage(tables, [f"{SOURCE}00002.json"])
    commit(tables, first)
    never = str(uuid.uuid4())
    table = tables.load(TABLE)
    assert tables.committed(table, [first.commit_id, second.commit_id, never], since) == {first.commit_id}
    commit(tables, second)
    table = tables.load(TABLE)
    assert tables.committed(table, [first.commit_id, second.commit_id, never], since) == {
        first.commit_id, second.commit_id,
    }  # fmt: skip
    # Snapshots older than the intent (less the clock-skew margin) are not searched.
    assert tables.committed(table, [first.commit_id], since + 3_600_000) == set()
