"""Our columns as partition values of linked directories (agent.layout) equal the join's values."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.reader import METADATA_COLUMNS, SourceFile, _utf8_file_names, read_batch
from autoloader.v1 import ingestion_pb2

Format = ingestion_pb2.Format
Schema = ingestion_pb2.Schema
JSON = Format(type=Format.TYPE_JSON)
# Names with characters the directory names must escape, and one a glob would expand.
NAMES = ["plain.json", "a b+c%20d=e.json", "s'd\"x.json", "br[ack]{et}*.json"]


def source_files(directory: Path, names: list[str], write: Any) -> list[SourceFile]:
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i, name in enumerate(names):
        path = directory / name
        write(path, i)
        modified = None if i == 1 else datetime(2024, 5, 1 + i, 12, 30, 15, 123456 + i, tzinfo=UTC)
        uri = f"file://{path}"
        files.append(SourceFile(uri=uri, local=uri, modified_time=modified, run=f"run-{i % 2}"))
    return files


def json_lines(path: Path, i: int) -> None:
    path.write_text("".join(json.dumps({"id": i * 100 + n, "name": f"n{n}"}) + "\n" for n in range(5)))


def rows(frame: Any) -> list[tuple[Any, ...]]:
    return sorted(tuple(r) for r in frame.drop("_ingested_at").collect())


@pytest.mark.parametrize("sample_bytes", [0, 65536], ids=["whole-file inference", "sampled"])
def test_the_layout_attaches_what_the_join_attaches(spark: Any, workdir: Path, sample_bytes: int) -> None:
    files = source_files(workdir / "src", NAMES, json_lines)
    laid = read_batch(spark, JSON, Schema(), files, sample_bytes, workdir / "layout")
    joined = read_batch(spark, JSON, Schema(), files, sample_bytes)
    assert all("_source_file=" in p for p in laid.frame.inputFiles())  # read through the links
    assert not any("_source_file=" in p for p in joined.frame.inputFiles())
    assert laid.frame.columns == joined.frame.columns == ["id", "name", *METADATA_COLUMNS]
    assert laid.frame.schema.simpleString() == joined.frame.schema.simpleString()
    assert rows(laid.frame) == rows(joined.frame)
    by_uri = {r["_source_file"]: r for r in laid.frame.collect()}
    for f in files:
        got = by_uri[f.uri]
        assert (got["_source_modified_at"], got["_run"]) == (
            f.modified_time.replace(tzinfo=None) if f.modified_time else None,
            f.run,
        )  # the session is in UTC: naive UTC, to the microsecond
    (ingested_at,) = {r["_ingested_at"] for r in laid.frame.collect()}
    assert abs(ingested_at.replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds() < 120
    assert laid.rows_in([files[0].uri]) == 5


def test_a_name_hadoop_cannot_parse_is_read_through_its_link(spark: Any, workdir: Path) -> None:
    files = source_files(workdir / "src", ["2024-05-01T12:00:00.json", "q?h#s.json"], json_lines)
    read = read_batch(spark, JSON, Schema(), files, 65536, workdir / "layout")
    assert sorted(r["_source_file"] for r in read.frame.collect()) == sorted([files[0].uri] * 5 + [files[1].uri] * 5)


def test_a_non_ascii_path_is_laid_out_where_python_and_the_jvm_name_files_in_utf8(spark: Any, workdir: Path) -> None:
    files = source_files(workdir / "src", ["plain.json", "naïve-€.json"], json_lines)
    read = read_batch(spark, JSON, Schema(), files, 0, workdir / "layout")
    laid_out = all("_source_file=" in p for p in read.frame.inputFiles())
    assert laid_out == _utf8_file_names(spark)  # else the join, which reads the files' own names
    assert sorted(r["_source_file"] for r in read.frame.collect()) == sorted([f.uri for f in files for _ in range(5)])


def test_a_value_too_long_for_a_directory_name_takes_the_join(spark: Any, workdir: Path) -> None:
    files = source_files(workdir / "src", ["plain.json", "x" * 200 + ".json"], json_lines)
    read = read_batch(spark, JSON, Schema(), files, 0, workdir / "layout")
    assert not any("_source_file=" in p for p in read.frame.inputFiles())
    assert sorted(r["_source_file"] for r in read.frame.collect()) == sorted([f.uri for f in files for _ in range(5)])


def test_a_csv_column_named_like_ours_keeps_its_place_and_ours_replaces_it(spark: Any, workdir: Path) -> None:
    def csv(path: Path, i: int) -> None:
        path.write_text("id,_run,name\n" + "".join(f"{i * 10 + n},theirs,n{n}\n" for n in range(3)))

    files = source_files(workdir / "src", ["a.csv", "b.csv"], csv)
    fmt = Format(type=Format.TYPE_CSV, header=True)
    read = read_batch(spark, fmt, Schema(), files, 0, workdir / "layout")
    assert read.frame.columns == ["id", "name", *METADATA_COLUMNS]
    got = sorted((r["id"], r["name"], r["_run"]) for r in read.frame.collect())
    assert got == [(n, f"n{n}", "run-0") for n in range(3)] + [(10 + n, f"n{n}", "run-1") for n in range(3)]


def test_parquet_and_explicit_schemas_read_through_the_layout(spark: Any, workdir: Path) -> None:
    def parquet(path: Path, i: int) -> None:
        spark.createDataFrame([(i, f"p{i}")], "id long, name string").toPandas().to_parquet(path)

    files = source_files(workdir / "src", ["a.parquet", "b b.parquet"], parquet)
    read = read_batch(spark, Format(type=Format.TYPE_PARQUET), Schema(), files, 0, workdir / "l1")
    assert sorted((r["id"], r["_source_file"]) for r in read.frame.collect()) == [(0, files[0].uri), (1, files[1].uri)]

    explicit = Schema(mode=Schema.MODE_EXPLICIT, columns=[ingestion_pb2.Column(name="id", type="bigint")])
    read = read_batch(spark, Format(type=Format.TYPE_PARQUET), explicit, files, 0, workdir / "l2")
    assert read.frame.columns == ["id", *METADATA_COLUMNS]
    assert all("_source_file=" in p for p in read.frame.inputFiles())
    assert sorted(r["id"] for r in read.frame.collect()) == [0, 1]
