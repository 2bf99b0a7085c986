"""controlplane.adapters.storage: globs, the file matcher, and the resumable byte-ordered walk.

Pure tests: an in-memory tree stands in for the storage (plus a few real directories
under tmp_path for the local fast path)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controlplane.adapters.storage import (
    Entry,
    FileMatcher,
    ListingError,
    SourceLister,
    glob_to_regex,
    walk,
)
from controlplane.domain.ingestion import Source

ROOT = "mem://bucket/root"
T0 = datetime(2024, 1, 1, tzinfo=UTC)

# A tree as nested dicts: a dict is a directory, an int is a file (its size; mtime = T0 + size seconds).
Tree = dict[str, "Tree | int"]


class MemoryStore:
    """list_dir over a nested dict; records which directories were read."""

    def __init__(self, tree: Tree, root: str = ROOT) -> None:
        self.tree = tree
        self.root = root
        self.listed: list[str] = []

    def __call__(self, uri: str) -> list[Entry]:
        self.listed.append(uri)
        if uri != self.root and not uri.startswith(self.root + "/"):
            raise FileNotFoundError(uri)
        node: Tree | int = self.tree
        for part in [p for p in uri.removeprefix(self.root).split("/") if p]:
            if not isinstance(node, dict) or part not in node:
                raise FileNotFoundError(uri)
            node = node[part]
        if not isinstance(node, dict):
            raise NotADirectoryError(uri)
        return [
            Entry(name, True)
            if isinstance(child, dict)
            else Entry(name, False, child, T0 + timedelta(seconds=child), f"etag-{child}")
            for name, child in node.items()
        ]


def all_files(tree: Tree, prefix: str = ROOT) -> Iterator[str]:
    """Every file path of the tree (hidden ones included), in no particular order."""
    for name, child in tree.items():
        if isinstance(child, dict):
            yield from all_files(child, f"{prefix}/{name}")
        else:
            yield f"{prefix}/{name}"


def visible(path: str, root: str = ROOT) -> bool:
    return not any(part.startswith((".", "_")) for part in path.removeprefix(root + "/").split("/"))


def byte_order(paths: Iterator[str] | list[str]) -> list[str]:
    return sorted(paths, key=lambda p: p.encode("utf-8"))


def listed(tree: Tree, source: Source | None = None, after: str | None = None) -> list[str]:
    matcher = FileMatcher(source or Source(uri=ROOT, recursive=True))
    return [f.path for f in walk(ROOT, MemoryStore(tree), matcher, after)]


# Names chosen so that sorting entries by name alone (or directories without their "/")
# gives a different order than the byte order of full paths.
TRICKY: Tree = {
    "a": {"b": 1, "a": 2, "c d": 3},
    "a.txt": 4,
    "a-1": 5,
    "a b": 6,
    "a0": {"x": 7},
    "ab": 8,
    "A": 9,
    "Z": {"z": 10},
    "z": 11,
    "é": 12,
    "éa": {"1": 13},
    "日本": {"東京.json": 14, "大阪": {"x.json": 15}},
    "😀.json": 16,
    "ü-dir": {"nested": {"deep": {"f": 17}}},
    "a!": 18,
    "a~": 19,
    "data": {"2024": {"01": {"x.json": 20, "y.json": 21}, "02": {}}, "2024-old": 22, "2024.bak": 23},
}


# --- glob_to_regex ----------------------------------------------------------------------------------

GLOB_CASES = [
    # (glob, path, matches)
    ("*.json", "a.json", True),
    ("*.json", ".json", True),
    ("*.json", "a.jsonl", False),
    ("*.json", "a/b.json", False),
    ("*.json", "a.json/x", False),
    ("*", "anything at all", True),
    ("*", "a/b", False),
    ("?.csv", "a.csv", True),
    ("?.csv", "ab.csv", False),
    ("?.csv", "/.csv", False),
    ("a?c", "a/c", False),
    ("**/*.csv", "x.csv", True),
    ("**/*.csv", "a/x.csv", True),
    ("**/*.csv", "a/b/c/x.csv", True),
    ("**/*.csv", "a/b/c/x.json", False),
    ("data/**", "data/x", True),
    ("data/**", "data/a/b/c", True),
    ("data/**", "other/x", False),
    ("year=*/*.csv", "year=2024/a.csv", True),
    ("year=*/*.csv", "year=2024/m=1/a.csv", False),
    ("year=*/*.csv", "a.csv", False),
    ("[abc].txt", "b.txt", True),
    ("[abc].txt", "d.txt", False),
    ("[abc].txt", "ab.txt", False),
    ("[!abc].txt", "d.txt", True),
    ("[!abc].txt", "a.txt", False),
    ("a[!b]c", "a/c", False),
    ("[0-9].txt", "5.txt", True),
    ("[0-9].txt", "0.txt", True),
    ("[0-9].txt", "x.txt", False),
    ("[0-9].txt", "-.txt", False),
    ("part-[a-c]*", "part-b-001", True),
    ("part-[a-c]*", "part-d-001", False),
    ("{a,b}/*.csv", "a/x.csv", True),
    ("{a,b}/*.csv", "b/x.csv", True),
    ("{a,b}/*.csv", "c/x.csv", False),
    ("*.{csv,json}", "x.json", True),
    ("*.{csv,json}", "x.csv", True),
    ("*.{csv,json}", "x.parquet", False),
    ("{*.csv,sub/*.json}", "sub/x.json", True),
    ("{*.csv,sub/*.json}", "x.csv", True),
    ("{*.csv,sub/*.json}", "sub/x.csv", False),
    ("a,b.txt", "a,b.txt", True),
    ("(x)+.txt", "(x)+.txt", True),
    ("(x)+.txt", "xx.txt", False),
    ("a.b", "axb", False),
    ("a$^|\\d.txt", "a$^|\\d.txt", True),
    ("données-*.json", "données-1.json", True),
    ("日本/*", "日本/東京.json", True),
    ("with space *.json", "with space 1.json", True),
]


@pytest.mark.parametrize(("glob", "path", "matches"), GLOB_CASES)
def test_glob_to_regex(glob: str, path: str, matches: bool) -> None:
    assert bool(glob_to_regex(glob).fullmatch(path)) is matches


# --- FileMatcher ------------------------------------------------------------------------------------


def entry(name: str, modified: datetime | None = T0) -> Entry:
    return Entry(name, False, 1, modified)


def test_hidden_names() -> None:
    for name in (".x", ".crc", "_SUCCESS", "_temporary", "_", ".", "._meta.json"):
        assert FileMatcher.hidden(name), name
    for name in ("x", "a_b", "x.", "a.json", "SUCCESS", "é", "-x", " x"):
        assert not FileMatcher.hidden(name), name


def test_glob_without_slash_matches_names_at_any_depth_when_recursive() -> None:
    matcher = FileMatcher(Source(uri=ROOT, glob="*.csv", recursive=True))
    assert matcher.descend
    assert matcher.matches("x.csv", entry("x.csv"))
    assert matcher.matches("a/b/x.csv", entry("x.csv"))
    assert not matcher.matches("a/b/x.json", entry("x.json"))


def test_glob_without_slash_does_not_descend_unless_recursive() -> None:
    assert not FileMatcher(Source(uri=ROOT, glob="*.csv")).descend
    assert not FileMatcher(Source(uri=ROOT)).descend
    assert FileMatcher(Source(uri=ROOT, recursive=True)).descend


def test_glob_with_slash_matches_the_relative_path_and_descends() -> None:
    matcher = FileMatcher(Source(uri=ROOT, glob="year=*/*.csv"))
    assert matcher.descend
    assert matcher.matches("year=2024/x.csv", entry("x.csv"))
    assert not matcher.matches("x.csv", entry("x.csv"))
    assert not matcher.matches("other/year=2024/x.csv", entry("x.csv"))


def test_no_glob_matches_everything() -> None:
    matcher = FileMatcher(Source(uri=ROOT, recursive=True))
    assert matcher.matches("a/b/anything", entry("anything"))
    assert matcher.matches("x", entry("x", None))


def test_modified_after_keeps_only_newer_files() -> None:
    matcher = FileMatcher(Source(uri=ROOT, modified_after=T0))
    assert matcher.matches("new", entry("new", T0 + timedelta(microseconds=1)))
    assert matcher.matches("newer", entry("newer", T0 + timedelta(days=400)))
    assert not matcher.matches("old", entry("old", T0 - timedelta(microseconds=1)))
    assert not matcher.matches("ancient", entry("ancient", datetime(1970, 1, 1, tzinfo=UTC)))
    # A file without a modification time cannot be shown to be newer.
    assert not matcher.matches("unknown", entry("unknown", None))


def test_modified_after_and_glob_both_apply() -> None:
    matcher = FileMatcher(Source(uri=ROOT, glob="*.csv", modified_after=T0))
    assert matcher.matches("a.csv", entry("a.csv", T0 + timedelta(seconds=1)))
    assert not matcher.matches("a.json", entry("a.json", T0 + timedelta(seconds=1)))
    assert not matcher.matches("a.csv", entry("a.csv", T0 - timedelta(seconds=1)))


# --- walk: order --------------------------------------------------------------------------------------


def test_walk_yields_byte_order_of_full_paths() -> None:
    paths = listed(TRICKY)
    expected = byte_order(all_files(TRICKY))
    assert paths == expected
    # Spot checks of the orderings that trip up a naive sort.
    assert paths.index(f"{ROOT}/a b") < paths.index(f"{ROOT}/a!") < paths.index(f"{ROOT}/a-1")
    assert paths.index(f"{ROOT}/a-1") < paths.index(f"{ROOT}/a.txt") < paths.index(f"{ROOT}/a/a")
    assert paths.index(f"{ROOT}/a/c d") < paths.index(f"{ROOT}/a0/x") < paths.index(f"{ROOT}/ab")
    assert paths.index(f"{ROOT}/data/2024-old") < paths.index(f"{ROOT}/data/2024.bak")
    assert paths.index(f"{ROOT}/data/2024.bak") < paths.index(f"{ROOT}/data/2024/01/x.json")
    assert paths.index(f"{ROOT}/z") < paths.index(f"{ROOT}/é") < paths.index(f"{ROOT}/éa/1")
    assert paths.index(f"{ROOT}/éa/1") < paths.index(f"{ROOT}/日本/大阪/x.json")
    assert paths[-1] == f"{ROOT}/😀.json"


def test_walk_yields_sizes_times_and_etags() -> None:
    files = list(walk(ROOT, MemoryStore({"d": {"f": 7}}), FileMatcher(Source(uri=ROOT, recursive=True))))
    assert len(files) == 1
    (f,) = files
    assert (f.path, f.size_bytes, f.modified_time, f.etag) == (f"{ROOT}/d/f", 7, T0 + timedelta(seconds=7), "etag-7")


def test_walk_of_an_empty_root_yields_nothing() -> None:
    assert listed({}) == []
    assert listed({"empty": {}, "also": {"empty": {}}}) == []


def test_root_with_trailing_slash_gives_the_same_paths() -> None:
    store = MemoryStore(TRICKY)
    paths = [f.path for f in walk(ROOT + "/", store, FileMatcher(Source(uri=ROOT, recursive=True)))]
    assert paths == byte_order(all_files(TRICKY))


# --- walk: resume after a cursor -----------------------------------------------------------------------


def cursors_for(paths: list[str]) -> list[str]:
    """Every file path, every directory (with and without '/'), and strings between and around them."""
    found = set(paths)
    for path in paths:
        parts = path.removeprefix(ROOT + "/").split("/")
        for i in range(1, len(parts)):
            directory = ROOT + "/" + "/".join(parts[:i])
            found.update({directory, directory + "/"})
        found.update({path + "\x00", path[:-1], path + "~"})
    found.update({"", ROOT, ROOT + "/", ROOT + "/\U0010ffff", "\U0010ffff"})
    return sorted(found)


def test_resume_after_every_cursor_yields_exactly_the_rest() -> None:
    full = listed(TRICKY)
    problems = []
    for cursor in cursors_for(full):
        expected = [p for p in full if p > cursor]
        got = listed(TRICKY, after=cursor)
        if got != expected:
            problems.append(f"after {cursor!r}: got {got[:3]}..., expected {expected[:3]}...")
    assert problems == []


def test_resume_with_a_glob_and_hidden_files() -> None:
    tree: Tree = {
        "a": {"x.csv": 1, "_SUCCESS": 2, "y.json": 3, ".x.csv": 4},
        "b": {"_temporary": {"z.csv": 5}, "z.csv": 6},
        "c.csv": 7,
    }
    source = Source(uri=ROOT, glob="*.csv", recursive=True)
    full = listed(tree, source)
    assert full == [f"{ROOT}/a/x.csv", f"{ROOT}/b/z.csv", f"{ROOT}/c.csv"]
    for cursor in cursors_for(byte_order(all_files(tree))):
        assert listed(tree, source, after=cursor) == [p for p in full if p > cursor], cursor


def test_resume_skips_subtrees_before_the_cursor_without_reading_them() -> None:
    store = MemoryStore(TRICKY)
    cursor = f"{ROOT}/data/2024/01/x.json"
    matcher = FileMatcher(Source(uri=ROOT, recursive=True))
    paths = [f.path for f in walk(ROOT, store, matcher, after=cursor)]
    assert paths == [p for p in byte_order(all_files(TRICKY)) if p > cursor]
    # Only the root and the directories on the way to the cursor (or after it) are read.
    before = [d for d in store.listed if d != ROOT and not cursor.startswith(d + "/") and d + "/" < cursor]
    assert before == []
    assert f"{ROOT}/a" not in store.listed
    assert f"{ROOT}/Z" not in store.listed
    assert f"{ROOT}/data/2024/01" in store.listed
    assert f"{ROOT}/日本" in store.listed


# --- walk: what is skipped ---------------------------------------------------------------------------


def test_hidden_files_and_directories_are_skipped() -> None:
    tree: Tree = {
        ".x": 1,
        "_SUCCESS": 2,
        "_temporary": {"part-0.json": 3},
        ".git": {"config": 4},
        "ok.json": 5,
        "dir": {"_committed_1": 6, ".crc": 7, "part-1.json": 8, "_tmp": {"y": 9}},
        "under_score": 10,
        "dot.in.name": 11,
    }
    paths = listed(tree)
    assert paths == [f"{ROOT}/dir/part-1.json", f"{ROOT}/dot.in.name", f"{ROOT}/ok.json", f"{ROOT}/under_score"]
    assert paths == byte_order(p for p in all_files(tree) if visible(p))


def test_hidden_directories_are_not_even_read() -> None:
    store = MemoryStore({"_temporary": {"a": 1}, ".git": {"b": 2}, "x": 3})
    assert [f.path for f in walk(ROOT, store, FileMatcher(Source(uri=ROOT, recursive=True)))] == [f"{ROOT}/x"]
    assert store.listed == [ROOT]


def test_not_recursive_lists_the_top_level_only() -> None:
    store = MemoryStore(TRICKY)
    paths = [f.path for f in walk(ROOT, store, FileMatcher(Source(uri=ROOT)))]
    assert paths == byte_order(f"{ROOT}/{n}" for n, child in TRICKY.items() if not isinstance(child, dict))
    assert store.listed == [ROOT]


def test_glob_with_slash_selects_by_relative_path() -> None:
    source = Source(uri=ROOT, glob="data/*/01/*.json")
    assert listed(TRICKY, source) == [f"{ROOT}/data/2024/01/x.json", f"{ROOT}/data/2024/01/y.json"]


def test_glob_without_slash_recursive_selects_names_everywhere() -> None:
    source = Source(uri=ROOT, glob="*.json", recursive=True)
    expected = byte_order(p for p in all_files(TRICKY) if p.endswith(".json"))
    assert listed(TRICKY, source) == expected
    assert len(expected) == 5


def test_modified_after_in_a_walk() -> None:
    source = Source(uri=ROOT, recursive=True, modified_after=T0 + timedelta(seconds=15))
    # File sizes double as their mtime offsets in seconds: sizes >= 15 are at or after the cutoff.
    expected = byte_order(p for p in all_files(TRICKY) if _size(TRICKY, p) >= 15)
    assert listed(TRICKY, source) == expected
    assert len(expected) == 9


def _size(tree: Tree, path: str) -> int:
    node: Tree | int = tree
    for part in path.removeprefix(ROOT + "/").split("/"):
        assert isinstance(node, dict)
        node = node[part]
    assert isinstance(node, int)
    return node


def test_a_missing_root_raises_but_a_vanished_subdirectory_is_skipped() -> None:
    matcher = FileMatcher(Source(uri=ROOT, recursive=True))
    with pytest.raises(FileNotFoundError):
        list(walk(ROOT + "/nope", MemoryStore(TRICKY), matcher))

    class Vanishing(MemoryStore):
        def __call__(self, uri: str) -> list[Entry]:
            if uri == f"{ROOT}/a":
                self.listed.append(uri)
                raise FileNotFoundError(uri)
            return super().__call__(uri)

    paths = [f.path for f in walk(ROOT, Vanishing(TRICKY), matcher)]
    assert paths == [p for p in byte_order(all_files(TRICKY)) if not p.startswith(f"{ROOT}/a/")]


# --- local directories through SourceLister -------------------------------------------------------


def _make(root: Path, relative: str, size: int = 0, mtime_ns: int | None = None) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def test_local_listing_in_byte_order_with_sizes_and_exact_times(tmp_path: Path) -> None:
    names = ["a", "a.txt", "a-1", "a b", "a/b", "a/c d.json", "é", "日本/東京.json", "z/_SUCCESS", "z/.crc", "Z"]
    mtime_ns = 1_700_000_000_123_456_789
    for i, name in enumerate(names):
        if name == "a":
            continue  # a directory
        _make(tmp_path, name, size=i, mtime_ns=mtime_ns + i * 1000)
    uri = f"file://{tmp_path}"
    files = list(SourceLister().list(Source(uri=uri, recursive=True)))
    expected = byte_order(f"{uri}/{n}" for n in names if n != "a" and visible(n, ""))
    assert [f.path for f in files] == expected
    by_path = {f.path: f for f in files}
    f = by_path[f"{uri}/a/c d.json"]
    i = names.index("a/c d.json")
    assert f.size_bytes == i
    ns = mtime_ns + i * 1000
    assert f.modified_time == datetime.fromtimestamp(ns // 10**9, UTC).replace(microsecond=(ns // 1000) % 10**6)
    assert f.etag == f"{i}-{ns}"


def test_local_listing_resumes_after_every_cursor(tmp_path: Path) -> None:
    for name in ["a-1", "a.txt", "a/b", "a/c/d", "a b", "b", "é/x", "日本", "_x/y", ".z"]:
        _make(tmp_path, name)
    uri = f"file://{tmp_path}"
    lister = SourceLister()
    source = Source(uri=uri, recursive=True)
    full = [f.path for f in lister.list(source)]
    assert full == byte_order([f"{uri}/{n}" for n in ["a-1", "a.txt", "a/b", "a/c/d", "a b", "b", "é/x", "日本"]])
    for cursor in [*full, f"{uri}/a", f"{uri}/a/", f"{uri}/a/c", f"{uri}/é", f"{uri}/~", uri]:
        assert [f.path for f in lister.list(source, after=cursor)] == [p for p in full if p > cursor], cursor


def test_local_modified_after(tmp_path: Path) -> None:
    cutoff = datetime(2024, 6, 1, tzinfo=UTC)
    cutoff_ns = int(cutoff.timestamp()) * 10**9
    _make(tmp_path, "old.json", mtime_ns=cutoff_ns - 10**9)
    _make(tmp_path, "new.json", mtime_ns=cutoff_ns + 10**9)
    _make(tmp_path, "sub/new.json", mtime_ns=cutoff_ns + 5 * 10**9)
    _make(tmp_path, "sub/old.json", mtime_ns=cutoff_ns - 5 * 10**9)
    uri = f"file://{tmp_path}"
    files = SourceLister().list(Source(uri=uri, recursive=True, modified_after=cutoff))
    assert [f.path for f in files] == [f"{uri}/new.json", f"{uri}/sub/new.json"]


def test_listing_errors_are_readable(tmp_path: Path) -> None:
    missing = f"file://{tmp_path}/missing"
    with pytest.raises(ListingError, match=r"does not exist") as caught:
        list(SourceLister().list(Source(uri=missing, recursive=True)))
    assert f"{tmp_path}/missing" in str(caught.value)
    _make(tmp_path, "plain.txt")
    not_dir = f"file://{tmp_path}/plain.txt"
    with pytest.raises(ListingError, match=r"not a directory") as caught:
        list(SourceLister().list(Source(uri=not_dir)))
    assert f"{tmp_path}/plain.txt" in str(caught.value)


def test_unknown_credentials_are_a_listing_error() -> None:
    with pytest.raises(ListingError, match=r"credentials 'nope' are not configured"):
        list(SourceLister().list(Source(uri="s3://bucket/x", credentials_ref="nope")))
