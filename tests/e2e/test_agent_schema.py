"""Schema evolution modes, explicit schemas and hints, formats and partitioning, on real Spark and Iceberg."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from autoloader.v1 import file_pb2, ingestion_pb2

from .conftest import Run, Stack
from .test_agent_ingest import write_jsonl

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

Format = ingestion_pb2.Format
Schema = ingestion_pb2.Schema
File = file_pb2.File
JSON = Format(type=Format.TYPE_JSON)


def evolve(stack: Stack, workdir: Path, evolution: int) -> tuple[str, Run]:
    """First run: id, a (bigint). Second run: a file with a new column b, and one whose a is not a number."""
    source = workdir / "src"
    write_jsonl(source / "1-first.json", [{"id": 1, "a": 10}, {"id": 2, "a": 20}])
    ingestion = stack.create("evolve", source.as_uri(), JSON, schema=Schema(evolution=evolution))
    stack.start_agent()
    assert stack.run(ingestion).state == Run.STATE_SUCCEEDED
    write_jsonl(source / "2-new-column.json", [{"id": 3, "a": 30, "b": "bee"}])
    write_jsonl(source / "3-conflict.json", [{"id": 4, "a": "not a number"}, {"id": 5, "a": 50}])
    return ingestion, stack.run(ingestion)


def columns(stack: Stack, table: str) -> list[str]:
    return [f.name for f in stack.table(table).schema().fields]


def by_id(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {r["id"]: r for r in rows}


def test_add_new_columns_evolves_the_table_in_the_commit(stack: Stack, workdir: Path) -> None:
    ingestion, run = evolve(stack, workdir, Schema.EVOLUTION_ADD_NEW_COLUMNS)
    assert run.state == Run.STATE_SUCCEEDED, run
    assert "b" in columns(stack, "e2e.evolve")
    # The control plane records the table's schema version: 1 at creation, 2 after adding b.
    assert (
        stack.ingestions.GetIngestion(ingestion_pb2.GetIngestionRequest(name=ingestion)).ingestion.schema_version == 2
    )
    rows = by_id(stack.rows("e2e.evolve"))
    assert set(rows) == {1, 2, 3, 4, 5}
    assert rows[3]["b"] == "bee"
    assert rows[1]["b"] is None
    assert rows[5]["a"] == 50
    assert rows[4]["a"] is None  # a type conflict never crashes the agent


def test_rescue_keeps_new_columns_and_misfits_as_json(stack: Stack, workdir: Path) -> None:
    _, run = evolve(stack, workdir, Schema.EVOLUTION_RESCUE)
    assert run.state == Run.STATE_SUCCEEDED, run
    assert "b" not in columns(stack, "e2e.evolve")
    assert "_rescued_data" in columns(stack, "e2e.evolve")
    rows = by_id(stack.rows("e2e.evolve"))
    assert set(rows) == {1, 2, 3, 4, 5}
    assert rows[3]["_rescued_data"] is not None, rows
    assert json.loads(rows[3]["_rescued_data"]) == {"b": "bee"}
    assert json.loads(rows[4]["_rescued_data"]) == {"a": "not a number"}
    assert rows[4]["a"] is None
    assert rows[5]["_rescued_data"] is None
    assert rows[1]["_rescued_data"] is None


def test_fail_on_new_columns_fails_only_that_file_naming_the_columns(stack: Stack, workdir: Path) -> None:
    ingestion, run = evolve(stack, workdir, Schema.EVOLUTION_FAIL_ON_NEW_COLUMNS)
    assert run.state == Run.STATE_PARTIALLY_SUCCEEDED, run
    files = {Path(f.path).name: f for f in stack.list_files(ingestion)}
    assert files["2-new-column.json"].state == File.STATE_QUARANTINED  # not retryable: quarantined at once
    assert "b" in files["2-new-column.json"].last_error
    assert "NewColumnsRejected" in files["2-new-column.json"].last_error
    assert files["3-conflict.json"].state == File.STATE_SUCCEEDED
    assert set(by_id(stack.rows("e2e.evolve"))) == {1, 2, 4, 5}
    assert "b" not in columns(stack, "e2e.evolve")


def test_none_drops_new_columns(stack: Stack, workdir: Path) -> None:
    _, run = evolve(stack, workdir, Schema.EVOLUTION_NONE)
    assert run.state == Run.STATE_SUCCEEDED, run
    assert columns(stack, "e2e.evolve")[:2] == ["id", "a"] or set(columns(stack, "e2e.evolve")) >= {"id", "a"}
    assert "b" not in columns(stack, "e2e.evolve")
    assert set(by_id(stack.rows("e2e.evolve"))) == {1, 2, 3, 4, 5}


def test_explicit_schema_and_hints(stack: Stack, workdir: Path) -> None:
    source = workdir / "src"
    write_jsonl(source / "a.json", [{"id": 7, "amount": "12.50", "extra": 1}])
    explicit = stack.create(
        "explicit", source.as_uri(), JSON,
        schema=Schema(
            mode=Schema.MODE_EXPLICIT, evolution=Schema.EVOLUTION_NONE,
            columns=[ingestion_pb2.Column(name="id", type="bigint"),
                     ingestion_pb2.Column(name="amount", type="decimal(10,2)")],
        ),
    )  # fmt: skip
    hinted = stack.create(
        "hinted", source.as_uri(), JSON, schema=Schema(hints={"amount": "double"}),
        destination=ingestion_pb2.Destination(table="e2e.hinted"),
    )  # fmt: skip
    stack.start_agent()
    assert stack.run(explicit).state == Run.STATE_SUCCEEDED
    assert stack.run(hinted).state == Run.STATE_SUCCEEDED
    table = stack.table("e2e.explicit")
    assert [f.name for f in table.schema().fields][:2] == ["id", "amount"]
    assert "extra" not in [f.name for f in table.schema().fields]
    (row,) = stack.rows("e2e.explicit")
    assert row["id"] == 7
    assert str(row["amount"]) == "12.50"
    (hinted_row,) = stack.rows("e2e.hinted")
    assert hinted_row["amount"] == 12.5
    assert str(stack.table("e2e.hinted").schema().find_field("amount").field_type) == "double"


def test_csv_text_parquet_and_gzip(stack: Stack, workdir: Path, spark: Any) -> None:
    csv_dir, text_dir, parquet_dir = workdir / "csv", workdir / "text", workdir / "parquet"
    csv_dir.mkdir()
    (csv_dir / "a.csv").write_text("id;name\n1;'x;y'\n2;plain\n")
    with gzip.open(csv_dir / "b.csv.gz", "wt") as f:
        f.write("id;name\n3;zipped\n")
    text_dir.mkdir()
    (text_dir / "log.txt").write_text("first line\nsecond line\n")
    spark.createDataFrame([(10, "p"), (11, "q")], "id long, name string").coalesce(1).write.parquet(
        str(parquet_dir / "batch")
    )
    csv = stack.create(
        "csv", csv_dir.as_uri(), Format(type=Format.TYPE_CSV, header=True, delimiter=";", quote="'"),
        source_fields={"glob": "*.csv*"},
    )  # fmt: skip
    text = stack.create("text", text_dir.as_uri(), Format(type=Format.TYPE_TEXT), source_fields={"glob": "*.txt"})
    parquet = stack.create(
        "parquet", parquet_dir.as_uri(), Format(type=Format.TYPE_PARQUET),
        source_fields={"glob": "**/*.parquet", "recursive": True},
    )  # fmt: skip
    stack.start_agent()
    for ingestion in (csv, text, parquet):
        assert stack.run(ingestion).state == Run.STATE_SUCCEEDED, ingestion
    assert Counter((r["id"], r["name"]) for r in stack.rows("e2e.csv")) == Counter(
        {(1, "x;y"): 1, (2, "plain"): 1, (3, "zipped"): 1}
    )
    assert sorted(r["value"] for r in stack.rows("e2e.text")) == ["first line", "second line"]
    assert sorted((r["id"], r["name"]) for r in stack.rows("e2e.parquet")) == [(10, "p"), (11, "q")]


def test_partitioned_table(stack: Stack, workdir: Path) -> None:
    source = workdir / "src"
    for day in (1, 2, 3):
        rows = [{"id": day * 10 + i, "ts": f"2024-05-0{day}T0{i}:00:00Z", "country": "NL" if i % 2 else "DE"}
                for i in range(4)]  # fmt: skip
        write_jsonl(source / f"day-{day}.json", rows)
    ingestion = stack.create(
        "partitioned", source.as_uri(), JSON, schema=Schema(hints={"ts": "timestamp"}),
        destination=ingestion_pb2.Destination(
            table="e2e.partitioned",
            partition_by=[ingestion_pb2.PartitionField(column="ts", transform="day"),
                          ingestion_pb2.PartitionField(column="country")],
        ),
    )  # fmt: skip
    stack.start_agent()
    assert stack.run(ingestion).state == Run.STATE_SUCCEEDED
    table = stack.table("e2e.partitioned")
    assert [f.name for f in table.spec().fields] == ["ts_day", "country"]
    assert len(stack.rows("e2e.partitioned")) == 12
    # Partition pruning works: one day and one country is one data file.
    from pyiceberg.expressions import And, EqualTo, GreaterThanOrEqual, LessThan

    scan = table.scan(
        row_filter=And(
            And(GreaterThanOrEqual("ts", "2024-05-02T00:00:00+00:00"), LessThan("ts", "2024-05-03T00:00:00+00:00")),
            EqualTo("country", "NL"),
        )
    )
    tasks = list(scan.plan_files())
    assert len(tasks) == 1
    assert sorted(r["id"] for r in scan.to_arrow().to_pylist()) == [21, 23]


def test_bucket_partitioned_table(stack: Stack, workdir: Path) -> None:
    """Each data file holds one Iceberg bucket, as pyiceberg computes it."""
    source = workdir / "src"
    write_jsonl(source / "a.json", [{"id": i, "name": f"n{i}"} for i in range(40)])
    ingestion = stack.create(
        "bucketed", source.as_uri(), JSON,
        destination=ingestion_pb2.Destination(
            table="e2e.bucketed", partition_by=[ingestion_pb2.PartitionField(column="id", transform="bucket[4]")]
        ),
    )  # fmt: skip
    stack.start_agent()
    assert stack.run(ingestion).state == Run.STATE_SUCCEEDED
    table = stack.table("e2e.bucketed")
    assert sorted(r["id"] for r in stack.rows("e2e.bucketed")) == list(range(40))
    from pyiceberg.expressions import EqualTo

    # Pruning by bucket keeps exactly the file of id 7's bucket, and it holds id 7.
    tasks = list(table.scan(row_filter=EqualTo("id", 7)).plan_files())
    assert len(tasks) == 1
    assert 1 < len(list(table.scan().plan_files())) <= 4
    assert 7 in table.scan(row_filter=EqualTo("id", 7)).to_arrow().column("id").to_pylist()


@pytest.mark.parametrize("fmt", ["parquet", "orc"])
def test_files_with_different_columns_in_one_batch_keep_them_all(
    stack: Stack, workdir: Path, spark: Any, fmt: str
) -> None:
    """Spark reads one footer for the schema unless told to merge them: b would be lost."""
    source = workdir / "src"
    spark.createDataFrame([(1, "x")], "id long, a string").coalesce(1).write.format(fmt).save(str(source / "1"))
    spark.createDataFrame([(2, "y", 2.5)], "id long, a string, b double").coalesce(1).write.format(fmt).save(
        str(source / "2")
    )
    kind = {"parquet": Format.TYPE_PARQUET, "orc": Format.TYPE_ORC}[fmt]
    ingestion = stack.create(fmt, source.as_uri(), Format(type=kind),
                             source_fields={"glob": f"**/*.{fmt}", "recursive": True})  # fmt: skip
    stack.start_agent()
    assert stack.run(ingestion).state == Run.STATE_SUCCEEDED
    rows = by_id(stack.rows(f"e2e.{fmt}"))
    assert rows[2]["b"] == 2.5
    assert rows[1]["b"] is None
