"""The directory names that carry a file's metadata values to Spark as partition values."""

from __future__ import annotations

import urllib.parse
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from agent.layout import NESTING, NULL, PARTITION_COLUMNS, directory_name, lay_out, timestamp_value

VALUES = ("file:///src/a.json", "2024-05-01 12:00:00.000000+00:00", "2026-11-30 01:02:03.456789+00:00", "run-1")


def test_every_character_but_a_few_is_escaped_so_a_name_is_one_safe_path_component() -> None:
    value = "s3://bkt/a b/c+d%20e=f?g#h[i]{j}*k\\l'm\"n:o.json"
    name = directory_name("_source_file", value)
    assert name is not None
    column, _, escaped = name.partition("=")
    assert column == "_source_file"
    assert set(escaped) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-%")
    assert urllib.parse.unquote(escaped) == value  # Spark undoes %XX the same way for ASCII


def test_a_null_is_spark_s_null_partition_and_unrepresentable_values_are_refused() -> None:
    assert directory_name("_source_modified_at", None) == f"_source_modified_at={NULL}"
    assert directory_name("_source_file", "file:///src/é.json") is None  # the JVM may decode names otherwise
    # Where Python and the JVM both name files in UTF-8, non-ASCII stays as it is, and counts in bytes.
    assert (
        directory_name("_source_file", "file:///src/é.json", utf8_names=True)
        == "_source_file=file%3A%2F%2F%2Fsrc%2Fé.json"
    )
    assert directory_name("_source_file", "s3://b/" + "é" * 115, utf8_names=True) is None  # 255 characters, 370 bytes
    assert directory_name("_source_file", "s3://b/" + "k" * 230) is None  # over 255 bytes
    assert directory_name("_source_file", "s3://b/" + "k" * 200) is not None


def test_timestamps_name_their_instant_in_utc_to_the_microsecond() -> None:
    assert timestamp_value(None) is None
    moment = datetime(2024, 5, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert timestamp_value(moment) == "2024-05-01 12:00:00.123456+00:00"
    assert timestamp_value(datetime(2024, 5, 1, 12)) == "2024-05-01 12:00:00.000000+00:00"  # naive: UTC
    assert timestamp_value(datetime(2024, 5, 1, 12, tzinfo=UTC)) == "2024-05-01 12:00:00.000000+00:00"


def test_files_are_linked_under_their_values_directories_in_column_order(tmp_path: Path) -> None:
    sources = [tmp_path / "a.json", tmp_path / "2024-05-01T12:00:00.json.gz", tmp_path / "b.json:v2"]
    for source in sources:
        source.write_text("{}\n")
    root = tmp_path / "layout"
    links = lay_out([(str(s), (s.as_uri(), *VALUES[1:])) for s in sources], root)
    assert links is not None
    for link, source in zip(links, sources, strict=True):
        parts = Path(link).relative_to(root).parts
        assert [p.partition("=")[0] for p in parts[:-1]] == [PARTITION_COLUMNS[i][0] for i in NESTING]
        assert Path(link).is_symlink()
        assert Path(link).resolve() == source.resolve()
    # Named by position, keeping the extension (the codec) when it is one.
    assert [Path(link).name for link in links] == ["0.json", "1.gz", "2"]


def test_one_unrepresentable_value_lays_out_nothing(tmp_path: Path) -> None:
    good, bad = tmp_path / "a.json", tmp_path / "b.json"
    good.write_text("{}\n")
    bad.write_text("{}\n")
    root = tmp_path / "layout"
    root.mkdir()
    files = [(str(good), VALUES), (str(bad), ("file:///src/ü.json", *VALUES[1:]))]
    assert lay_out(files, root) is None
    assert not any(root.iterdir())
    assert lay_out([("relative/a.json", VALUES)], root) is None  # not a local path Spark reads as such
