"""A batch's commit reads none of the table's earlier data files, however many there are."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.io.pyarrow import PyArrowFileIO

from agent.config import AgentSettings
from agent.engine import catalog
from agent.sink import TABLE_PROPERTIES, IcebergSink, Staged

# One long prefix for every path, as the files of one source directory share.
SOURCE = "file:///data/landing/events/region=eu-west-1/2026/11/30/part-"
TABLE = "bench.events"


@pytest.fixture
def sink(database_url: str, tmp_path: Path) -> Iterator[IcebergSink]:
    settings = AgentSettings(state_dir=tmp_path / "state", warehouse=(tmp_path / "warehouse").as_uri())
    sink = IcebergSink(catalog(settings, database_url))
    yield sink
    sink.close()


def commit_batch(sink: IcebergSink, sources: list[str]) -> list[str]:
    """Stages one Parquet file with two rows per source and commits it; the staged file's URI."""
    location = sink.location_for(TABLE)
    prefix = sink.staging_prefix(location, f"leases/{uuid.uuid4()}")
    rows = pa.table({"id": list(range(2 * len(sources))), "_source_file": [s for s in sources for _ in (0, 1)]})
    path = Path(prefix.removeprefix("file://")) / "part-0.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(rows, path)
    staged = [f"file://{path}"]
    assert sink.commit(TABLE, Staged(location, prefix, staged), rows.schema, sources, "leases/x", [])
    return staged


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


def test_a_commit_reads_only_its_own_staged_files(sink: IcebergSink, opened: list[str]) -> None:
    for batch in range(8):
        commit_batch(sink, [f"{SOURCE}{batch:03d}{i:02d}.json" for i in range(10)])
    opened.clear()
    staged = commit_batch(sink, [f"{SOURCE}900{i:02d}.json" for i in range(10)])
    # Its own file, for the statistics add_files takes from the footer; none of the eight before.
    assert {p.removeprefix("file://") for p in opened} == {s.removeprefix("file://") for s in staged}
    table = sink.table(TABLE)
    assert table is not None
    assert len(table.scan().to_arrow()) == 9 * 20


def test_recommitting_a_source_still_replaces_its_rows(sink: IcebergSink) -> None:
    commit_batch(sink, [f"{SOURCE}00001.json", f"{SOURCE}00002.json"])
    commit_batch(sink, [f"{SOURCE}00002.json"])
    table = sink.table(TABLE)
    assert table is not None
    counts = table.scan().to_arrow()["_source_file"].value_counts().to_pylist()
    assert {c["values"]: c["counts"] for c in counts} == {f"{SOURCE}00001.json": 2, f"{SOURCE}00002.json": 2}


def test_a_table_an_older_agent_created_gets_the_property(sink: IcebergSink) -> None:
    schema = pa.schema([("id", pa.int64()), ("_source_file", pa.string())])
    sink.catalog.create_namespace_if_not_exists("bench")
    sink.catalog.create_table(TABLE, schema=schema, location=sink.location_for(TABLE))
    commit_batch(sink, [f"{SOURCE}00001.json"])
    table = sink.table(TABLE)
    assert table is not None
    assert {k: table.properties.get(k) for k in TABLE_PROPERTIES} == TABLE_PROPERTIES
