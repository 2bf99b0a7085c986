"""How the agent matches the paths Spark reports for the files it read to the files it was given."""

from __future__ import annotations

import pytest

from agent.reader import _plain_path, _spellings


@pytest.mark.parametrize(
    ("spark_path", "plain"),
    [
        ("file:///data/a%20b.json", "/data/a b.json"),
        ("file:/data/a%20b.json", "/data/a b.json"),
        ("file:/data/c+d.json", "/data/c+d.json"),  # '+' is a plus, not a space
        ("file:/data/e%252Bf.json", "/data/e%2Bf.json"),  # a literal '%2B' in the name
        ("file:/data/g%5B1%5D.json", "/data/g[1].json"),
        ("file:/data/%C3%A9.json", "/data/é.json"),
        ("file:/data/é.json", "/data/é.json"),  # Java's URI.toString leaves non-ASCII as it is
        ("file:/data/j%23k%3F.json", "/data/j#k?.json"),
        ("s3a://bucket/a%20b.json", "s3a://bucket/a b.json"),
    ],
)
def test_spark_paths_decode_to_plain_paths(spark_path: str, plain: str) -> None:
    assert _plain_path(spark_path) == plain


def test_a_local_file_is_matched_however_many_slashes_spark_writes() -> None:
    assert _spellings("file:///data/x%20y.json") == ["file:/data/x%20y.json", "file:///data/x%20y.json"]
    assert _spellings("file:/data/x.json") == ["file:/data/x.json", "file:///data/x.json"]
    assert _spellings("s3a://b/k.json") == ["s3a://b/k.json"]
