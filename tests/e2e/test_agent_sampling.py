"""Schema inference from the heads of JSON-lines files, and what happens past them, on real Spark and Iceberg.

The agents here sample 300 bytes per file (a few lines) so the test files reach past their heads.
"""

from __future__ import annotations

import gzip
import json
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
HEAD = 300


def rows_of(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"id": i, "a": i, **extra} for i in range(n)]


def field_type(stack: Stack, table: str, name: str) -> str:
    return str(stack.table(table).schema().find_field(name).field_type)


@pytest.mark.parametrize("evolution", [Schema.EVOLUTION_ADD_NEW_COLUMNS, Schema.EVOLUTION_RESCUE])
def test_a_wider_type_past_the_heads_is_inferred_from_the_whole_files(
    stack: Stack, workdir: Path, evolution: int
) -> None:
    source = workdir / "src"
    # a is a whole number in the head; a fraction 200 rows on. FAILFAST (ADD_NEW_COLUMNS) fails
    # the sampled read, RESCUE would keep the row as malformed: both infer again from whole files.
    write_jsonl(source / "wider.json", [*rows_of(200), {"id": 200, "a": 1.5}])
    with gzip.open(source / "zipped.json.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in [*rows_of(200), {"id": 201, "a": 2.5}]))
    ingestion = stack.create("wider", source.as_uri(), JSON, schema=Schema(evolution=evolution),
                             source_fields={"glob": "*.json*"})  # fmt: skip
    stack.start_agent(infer_sample_bytes=HEAD)
    run = stack.run(ingestion)
    assert run.state == Run.STATE_SUCCEEDED, run
    assert field_type(stack, "e2e.wider", "a") == "double"
    rows = stack.rows("e2e.wider")
    assert len(rows) == 402
    assert sorted(r["a"] for r in rows if r["id"] >= 200) == [1.5, 2.5]
    assert sum(r["a"] == 199.0 for r in rows) == 2
    if evolution == Schema.EVOLUTION_RESCUE:
        assert all(r["_rescued_data"] is None for r in rows)  # nothing was malformed


def test_a_column_new_at_the_head_of_a_later_file_is_added_in_the_same_batch(stack: Stack, workdir: Path) -> None:
    source = workdir / "src"
    write_jsonl(source / "1-old.json", rows_of(100))
    write_jsonl(source / "2-new.json", rows_of(100, b="bee"))
    ingestion = stack.create("newer", source.as_uri(), JSON)
    stack.start_agent(infer_sample_bytes=HEAD)
    assert stack.run(ingestion).state == Run.STATE_SUCCEEDED
    rows = stack.rows("e2e.newer")
    assert len(rows) == 200
    assert sum(r["b"] == "bee" for r in rows) == 100


def test_a_key_past_every_head_is_read_when_hinted_or_inferred_from_whole_files(stack: Stack, workdir: Path) -> None:
    """The bound of sampling, and the two ways past it."""
    source = workdir / "src"
    write_jsonl(source / "rare.json", [*rows_of(100), {"id": 100, "a": 100, "rare": 7}])
    sampled = stack.create("sampled", source.as_uri(), JSON)
    hinted = stack.create("hinted", source.as_uri(), JSON, schema=Schema(hints={"rare": "int"}),
                          destination=ingestion_pb2.Destination(table="e2e.hinted"))  # fmt: skip
    whole = stack.create("whole", source.as_uri(), JSON, destination=ingestion_pb2.Destination(table="e2e.whole"))
    stack.start_agent(infer_sample_bytes=HEAD)
    for ingestion in (sampled, hinted):
        assert stack.run(ingestion).state == Run.STATE_SUCCEEDED
    stack.stop_agents()
    stack.start_agent("whole-files", infer_sample_bytes=0)
    assert stack.run(whole).state == Run.STATE_SUCCEEDED

    assert "rare" not in [f.name for f in stack.table("e2e.sampled").schema().fields]  # never in a head
    for table in ("e2e.hinted", "e2e.whole"):
        rows = {r["id"]: r for r in stack.rows(table)}
        assert len(rows) == 101
        assert rows[100]["rare"] == 7, table
        assert rows[0]["rare"] is None
    assert field_type(stack, "e2e.hinted", "rare") == "int"


def test_a_malformed_line_past_the_head_fails_only_its_file(stack: Stack, workdir: Path) -> None:
    source = workdir / "src"
    write_jsonl(source / "good.json", rows_of(100))
    bad = source / "bad.json"
    write_jsonl(bad, rows_of(100))
    with bad.open("a") as f:
        f.write('{"id": 100, "a": \n')
    ingestion = stack.create("malformed", source.as_uri(), JSON)
    stack.start_agent(infer_sample_bytes=HEAD)
    run = stack.run(ingestion)
    assert run.state == Run.STATE_PARTIALLY_SUCCEEDED, run
    files = {Path(f.path).name: f for f in stack.list_files(ingestion)}
    assert files["bad.json"].state == File.STATE_QUARANTINED
    assert "MalformedFile" in files["bad.json"].last_error
    assert files["good.json"].state == File.STATE_SUCCEEDED
    assert len(stack.rows("e2e.malformed")) == 100


def test_a_file_whose_rows_the_join_missed_fails_instead_of_committing_without_them(
    stack: Stack, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch with a path too long for a directory name cannot be laid out (agent.layout), so its
    source columns come from an inner join on the path as Spark spells it; a spelling it did not
    foresee must not drop a file's rows silently."""
    from agent import reader

    spellings = reader._spellings
    monkeypatch.setattr(reader, "_spellings", lambda p: ["nowhere"] if "victim" in p else spellings(p))
    source = workdir / "src"
    write_jsonl(source / "fine.json", rows_of(3))
    victim = "victim-" + "x" * 200 + ".json"
    write_jsonl(source / victim, rows_of(3))
    (source / "blank.json").write_text("\n\n")  # bytes but no rows: staging none of them is right
    ingestion = stack.create("unmatched", source.as_uri(), JSON)
    stack.start_agent()
    run = stack.run(ingestion)
    assert run.state == Run.STATE_PARTIALLY_SUCCEEDED, run
    files = {Path(f.path).name: f for f in stack.list_files(ingestion)}
    assert files[victim].state == File.STATE_QUARANTINED  # not retryable: the same agent fails again
    assert "UnmatchedRows" in files[victim].last_error
    assert files["fine.json"].state == File.STATE_SUCCEEDED
    assert files["blank.json"].state == File.STATE_SUCCEEDED
    assert len(stack.rows("e2e.unmatched")) == 3
