"""The heads schema inference reads: whole lines, decompressed, bounded."""

from __future__ import annotations

import bz2
import gzip
import zlib
from pathlib import Path

import pytest

from agent.sampling import pooled_sample, sample_paths

LINES = b"".join(b'{"id": %d, "note": "%s"}\n' % (i, b"x" * 20) for i in range(100))


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    (tmp_path / "scratch").mkdir()
    return tmp_path / "scratch"


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_a_file_within_the_head_is_its_own_sample(tmp_path: Path, scratch: Path) -> None:
    small = write(tmp_path / "small.json", LINES[:200])
    assert sample_paths([small], 1024, scratch) == [small]
    assert list(scratch.iterdir()) == []


def test_a_larger_file_is_cut_after_its_last_whole_line_in_the_head(tmp_path: Path, scratch: Path) -> None:
    big = write(tmp_path / "big.json", LINES)
    (sample,) = sample_paths([big], 1000, scratch)
    head = Path(sample).read_bytes()
    assert len(head) <= 1000
    assert head.endswith(b"\n")
    assert LINES.startswith(head)
    assert len(LINES[: len(head) + LINES[len(head) :].index(b"\n") + 1]) > 1000  # no further whole line fits


@pytest.mark.parametrize(
    ("name", "compress"),
    [("a.json.gz", gzip.compress), ("a.json.bz2", bz2.compress), ("a.json.deflate", zlib.compress)],
)
def test_compressed_files_are_sampled_decompressed(tmp_path: Path, scratch: Path, name: str, compress: object) -> None:
    packed = write(tmp_path / name, compress(LINES))  # type: ignore[operator]
    (sample,) = sample_paths([packed], 1000, scratch)
    assert sample.endswith(".json")  # no codec extension: Spark reads it as it is
    head = Path(sample).read_bytes()
    assert 0 < len(head) <= 1000
    assert LINES.startswith(head)
    assert head.endswith(b"\n")


def test_a_small_compressed_file_is_sampled_whole_and_decompressed(tmp_path: Path, scratch: Path) -> None:
    packed = write(tmp_path / "a.json.gz", gzip.compress(LINES[:300]))
    (sample,) = sample_paths([packed], 1000, scratch)
    assert Path(sample).read_bytes() == LINES[:300]


def test_unreadable_heads_leave_the_whole_file_to_spark(tmp_path: Path, scratch: Path) -> None:
    truncated = write(tmp_path / "cut.json.gz", gzip.compress(LINES)[:30])
    not_gzip = write(tmp_path / "fake.json.gz", LINES)
    other_codec = write(tmp_path / "a.json.zst", b"\x28\xb5\x2f\xfd" + LINES)
    one_long_line = write(tmp_path / "long.json", b'{"note": "' + b"y" * 5000 + b'"}\n')
    paths = [truncated, not_gzip, other_codec, one_long_line]
    assert sample_paths(paths, 1000, scratch) == paths


def test_each_file_has_its_own_head(tmp_path: Path, scratch: Path) -> None:
    first = write(tmp_path / "1.json", LINES)
    second = write(tmp_path / "2.json", LINES.replace(b'"note"', b'"other"'))
    heads = sample_paths([first, second], 500, scratch)
    assert len(set(heads)) == 2
    assert b'"note"' in Path(heads[0]).read_bytes()
    assert b'"other"' in Path(heads[1]).read_bytes()


def test_pooled_heads_are_the_same_lines_in_as_many_files_as_pools(tmp_path: Path, scratch: Path) -> None:
    small = write(tmp_path / "small.json", b"\xef\xbb\xbf" + LINES[:200].rstrip(b"\n"))  # BOM, no final newline
    big = write(tmp_path / "big.json", LINES)
    packed = write(tmp_path / "a.json.gz", gzip.compress(LINES))
    empty = write(tmp_path / "empty.json", b"")
    pooled = pooled_sample([small, big, packed, empty], 1000, scratch, pools=2)
    assert len(pooled) == 2
    assert all(Path(p).parent == scratch for p in pooled)
    lines = sorted(b"".join(Path(p).read_bytes() for p in pooled).splitlines(keepends=True))
    (tmp_path / "heads").mkdir()
    heads = [Path(p).read_bytes() for p in sample_paths([big, packed], 1000, tmp_path / "heads")]
    expected = LINES[:200].rstrip(b"\n") + b"\n" + b"".join(heads)  # the BOM is Hadoop's to skip, and skipped
    assert lines == sorted(expected.splitlines(keepends=True))


def test_pooling_leaves_to_spark_the_files_python_cannot_sample(tmp_path: Path, scratch: Path) -> None:
    truncated = write(tmp_path / "cut.json.gz", gzip.compress(LINES)[:30])
    other_codec = write(tmp_path / "a.json.zst", b"\x28\xb5\x2f\xfd" + LINES)
    one_long_line = write(tmp_path / "long.json", b'{"note": "' + b"y" * 5000 + b'"}\n')
    small = write(tmp_path / "small.json", LINES[: LINES.index(b"\n") + 1])
    pooled = pooled_sample([truncated, other_codec, one_long_line, small], 1000, scratch, pools=4)
    assert pooled[1:] == [truncated, other_codec, one_long_line]
    assert Path(pooled[0]).read_bytes() == LINES[: LINES.index(b"\n") + 1]


def test_a_batch_of_empty_files_pools_into_one_empty_file(tmp_path: Path, scratch: Path) -> None:
    empty = write(tmp_path / "empty.json", b"")
    (pooled,) = pooled_sample([empty, empty], 1000, scratch, pools=2)
    assert Path(pooled).read_bytes() == b""
