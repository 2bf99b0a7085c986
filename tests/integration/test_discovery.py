"""Discovery over gRPC against local directories and a real PostgreSQL: globs, recursion,
modified_after, a 10,000-file tree, change detection, streaming in chunks, cancellation
mid-listing, unlistable sources, and resuming a listing another replica abandoned."""

from __future__ import annotations

import fnmatch
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import Engine, text

from autoloader.v1 import file_pb2, file_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc, run_pb2, run_pb2_grpc
from controlplane import bootstrap
from controlplane.adapters import storage
from controlplane.adapters.storage import ListingError, SourceLister
from controlplane.adapters.unit_of_work import SqlAlchemyUnitOfWork
from controlplane.config import ControlPlaneSettings
from controlplane.domain.ingestion import Destination, Format, FormatType, Ingestion, IngestionSpec, Source
from controlplane.domain.runs import ListedFile, Trigger
from controlplane.service.changes import ChangeFeed
from controlplane.service.discovery import DiscoveryService
from controlplane.service.runs import open_run

from .helpers import valid_ingestion

pytestmark = pytest.mark.integration

Run = run_pb2.Run
File = file_pb2.File
UowFactory = Callable[[], SqlAlchemyUnitOfWork]
ACTIVE = (Run.STATE_DISCOVERING, Run.STATE_RUNNING)
TERMINAL = (Run.STATE_SUCCEEDED, Run.STATE_PARTIALLY_SUCCEEDED, Run.STATE_FAILED, Run.STATE_CANCELLED)


# --- helpers -----------------------------------------------------------------------------------------


@dataclass
class Api:
    ingestions: ingestion_pb2_grpc.IngestionServiceStub
    runs: run_pb2_grpc.RunServiceStub
    files: file_pb2_grpc.FileServiceStub

    @classmethod
    def on(cls, channel: grpc.Channel) -> Api:
        return cls(
            ingestion_pb2_grpc.IngestionServiceStub(channel),
            run_pb2_grpc.RunServiceStub(channel),
            file_pb2_grpc.FileServiceStub(channel),
        )

    def create(
        self,
        ingestion_id: str,
        root: Path | str,
        glob: str = "",
        recursive: bool = True,
        modified_after: datetime | None = None,
    ) -> str:
        uri = root if isinstance(root, str) else f"file://{root}"
        source = ingestion_pb2.Source(uri=uri, glob=glob, recursive=recursive)
        if modified_after is not None:
            source.modified_after.FromDatetime(modified_after)
        request = ingestion_pb2.CreateIngestionRequest(
            ingestion=valid_ingestion(source=source), ingestion_id=ingestion_id
        )
        return str(self.ingestions.CreateIngestion(request).ingestion.name)

    def start(self, ingestion: str) -> Run:
        return self.runs.StartRun(run_pb2.StartRunRequest(ingestion=ingestion)).run

    def get(self, run: str) -> Run:
        return self.runs.GetRun(run_pb2.GetRunRequest(name=run)).run

    def wait(self, run: str, done: Callable[[Run], bool], timeout: float = 60.0) -> Run:
        deadline = time.monotonic() + timeout
        while True:
            current = self.get(run)
            if done(current):
                return current
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting; last seen: {current}")
            time.sleep(0.05)

    def discovered(self, run: str, timeout: float = 60.0) -> Run:
        """The run once discovery has ended (RUNNING or terminal)."""
        return self.wait(run, lambda r: r.state != Run.STATE_DISCOVERING, timeout)

    def list_files(self, ingestion: str, **filters: Any) -> list[File]:
        files: list[File] = []
        token = ""
        while True:
            request = file_pb2.ListFilesRequest(ingestion=ingestion, page_size=1000, page_token=token, **filters)
            reply = self.files.ListFiles(request)
            files.extend(reply.files)
            token = reply.next_page_token
            if not token:
                return files


def paths(files: list[File]) -> set[str]:
    found = [f.path for f in files]
    assert len(found) == len(set(found)), "a path is listed twice"
    return set(found)


def run_pk(engine: Engine, run_name: str) -> uuid.UUID:
    with engine.connect() as conn:
        found = conn.execute(text("SELECT id FROM runs WHERE run_id = :r"), {"r": run_name.rsplit("/", 1)[1]})
        return uuid.UUID(str(found.scalar_one()))


def execute(engine: Engine, statement: str, **params: Any) -> int:
    with engine.begin() as conn:
        return int(conn.execute(text(statement), params).rowcount)


def finish_all_files(engine: Engine, uow_factory: UowFactory, run_name: str) -> None:
    """What agents would do: every file of the run SUCCEEDED, then the run finalized."""
    pk = run_pk(engine, run_name)
    execute(engine, "UPDATE files SET state = 'SUCCEEDED' WHERE run_pk = :r", r=pk)
    with uow_factory() as uow:
        assert uow.runs.finalize_if_done(pk) is not None
        uow.commit()


def touch(path: Path, content: bytes = b"", mtime: datetime | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    if mtime is not None:
        seconds = mtime.timestamp()
        os.utime(path, (seconds, seconds))


@dataclass(frozen=True)
class BigTree:
    root: Path
    matching: frozenset[str]  # URIs of the files a "*.json" recursive ingestion must find
    total_files: int

    @property
    def uri(self) -> str:
        return f"file://{self.root}"


REGIONS, MONTHS, PER_LEAF = 20, 10, 49
HIDDEN = ("_SUCCESS", ".part-0.json.crc", "_temporary/part-9.json", ".hidden/part-8.json", ".x.json")


def build_big_tree(root: Path) -> BigTree:
    """10,000 empty files in 200 leaf directories: names with spaces, non-ASCII names, files that do
    not match the glob, and one hidden file (or file in a hidden directory) per leaf."""
    matching = set()
    total = 0
    for r in range(REGIONS):
        for m in range(MONTHS):
            leaf = root / f"region {r:02d}" / f"日付=2024-{m + 1:02d}"
            leaf.mkdir(parents=True)
            for i in range(PER_LEAF):
                name = [f"part {i}.json", f"données-{i}.json", f"part-{i}.csv", f"注文_{i}.json", f"part-{i}.json"][
                    i % 5
                ]
                (leaf / name).touch()
                if fnmatch.fnmatchcase(name, "*.json"):
                    matching.add(f"file://{leaf}/{name}")
            hidden = leaf / HIDDEN[(r * MONTHS + m) % len(HIDDEN)]
            hidden.parent.mkdir(exist_ok=True)
            hidden.touch()
            total += PER_LEAF + 1
    assert total == 10_000
    assert len(matching) == REGIONS * MONTHS * 39
    return BigTree(root, frozenset(matching), total)


@pytest.fixture
def api(channel: grpc.Channel) -> Api:
    return Api.on(channel)


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> BigTree:
    """Shared by the tests of this module (creating 10,000 files is slow on some disks): a test that
    changes files puts them back as they were."""
    return build_big_tree(tmp_path_factory.mktemp("big"))


@pytest.fixture
def small_chunk_plane(create_database: Callable[[], str], tmp_path: Path) -> Iterator[bootstrap.ControlPlane]:
    """A control plane that commits discovery in chunks of 100 files."""
    settings = ControlPlaneSettings(
        database_url=create_database(),
        state_dir=tmp_path / "state",
        listen_address="127.0.0.1:0",
        shutdown_grace=1.0,
        health_interval=0.2,
        discovery_chunk_size=100,
        discovery_poll=0.2,
    )
    plane = bootstrap.start(settings)
    yield plane
    plane.stop(grace=0)


@pytest.fixture
def small_chunk_api(small_chunk_plane: bootstrap.ControlPlane) -> Iterator[Api]:
    with grpc.insecure_channel(small_chunk_plane.address) as channel:
        yield Api.on(channel)


# --- what is discovered -------------------------------------------------------------------------------


def test_ten_thousand_files_exactly_the_matching_ones(api: Api, big_tree: BigTree) -> None:
    ingestion = api.create("big", big_tree.root, glob="*.json", recursive=True)
    run = api.start(ingestion)
    assert run.state == Run.STATE_DISCOVERING
    ended = api.discovered(run.name)
    assert ended.state == Run.STATE_RUNNING, ended.error
    assert ended.error == ""
    assert ended.file_counts.total == len(big_tree.matching)
    assert ended.file_counts.pending == len(big_tree.matching)
    files = api.list_files(ingestion)
    assert paths(files) == big_tree.matching
    assert {f.state for f in files} == {File.STATE_PENDING}
    assert {f.run for f in files} == {run.name}
    assert all(f.size_bytes == 0 and f.etag and f.HasField("modified_time") for f in files)
    assert not any("/_" in p or "/." in p for p in paths(files))


def test_unchanged_tree_queues_nothing_and_ten_touched_files_are_queued_again(
    api: Api, big_tree: BigTree, engine: Engine, uow_factory: UowFactory
) -> None:
    ingestion = api.create("big", big_tree.root, glob="*.json", recursive=True)
    first = api.discovered(api.start(ingestion).name)
    assert first.file_counts.total == len(big_tree.matching)
    finish_all_files(engine, uow_factory, first.name)
    assert api.get(first.name).state == Run.STATE_SUCCEEDED

    # Nothing changed: the run lists everything, queues nothing and ends at once.
    second = api.start(ingestion)
    ended = api.wait(second.name, lambda r: r.state in TERMINAL)
    assert ended.state == Run.STATE_SUCCEEDED, ended
    assert ended.file_counts.total == 0
    assert ended.HasField("discovery_end_time")
    assert ended.HasField("end_time")
    assert api.list_files(ingestion, run=second.name) == []
    before = {f.path: f for f in api.list_files(ingestion)}
    assert len(before) == len(big_tree.matching)
    assert {f.state for f in before.values()} == {File.STATE_SUCCEEDED}
    assert {f.run for f in before.values()} == {first.name}

    # Touch exactly 10 files: 5 change size, 5 change only their mtime.
    chosen = sorted(big_tree.matching)[::780][:10]
    assert len(chosen) == 10
    originals = {uri: Path(uri.removeprefix("file://")).stat().st_mtime_ns for uri in chosen}
    try:
        for i, uri in enumerate(chosen):
            path = Path(uri.removeprefix("file://"))
            if i % 2:
                path.write_bytes(b"changed")
            else:
                os.utime(path, (1_000_000_000 + i, 1_000_000_000 + i))
        third = api.discovered(api.start(ingestion).name)
    finally:
        for uri, mtime_ns in originals.items():
            path = Path(uri.removeprefix("file://"))
            path.write_bytes(b"")
            os.utime(path, ns=(mtime_ns, mtime_ns))
    assert third.state == Run.STATE_RUNNING
    assert third.file_counts.total == 10
    assert third.file_counts.pending == 10
    queued = api.list_files(ingestion, run=third.name)
    assert paths(queued) == set(chosen)
    assert {f.state for f in queued} == {File.STATE_PENDING}
    assert {f.run for f in queued} == {third.name}
    assert {f.size_bytes for f in queued} == {0, len(b"changed")}

    after = {f.path: f for f in api.list_files(ingestion)}
    assert set(after) == set(before)
    untouched = [p for p in after if p not in chosen]
    changed_elsewhere = [p for p in untouched if after[p] != before[p]]
    assert changed_elsewhere == []
    for uri in chosen:
        assert after[uri].name == before[uri].name, "a changed file keeps its row (and name)"

    # The earlier result is kept in the history as superseded.
    attempts = api.files.ListFileAttempts(file_pb2.ListFileAttemptsRequest(file=after[chosen[1]].name)).attempts
    assert [a.outcome for a in attempts] == [file_pb2.FileAttempt.OUTCOME_SUPERSEDED]
    assert "SUCCEEDED" in attempts[0].error_message
    untouched_attempts = api.files.ListFileAttempts(file_pb2.ListFileAttemptsRequest(file=after[untouched[0]].name))
    assert list(untouched_attempts.attempts) == []


def _small_tree(root: Path) -> dict[str, Path]:
    names = [
        "top.csv",
        "top.json",
        "a/x.csv",
        "a/y.json",
        "a/deep/z.csv",
        "b/x.csv",
        "b/w.txt",
        "c/x.csv",
        "with space/é.csv",
        "_SUCCESS",
        ".hidden.csv",
        "a/_temporary/t.csv",
        "a/.crc/u.csv",
        "b/_committed.csv",
    ]
    made = {}
    for name in names:
        touch(root / name)
        made[name] = root / name
    return made


@pytest.mark.parametrize(
    ("glob", "recursive", "expected"),
    [
        ("", False, {"top.csv", "top.json"}),
        ("*.csv", False, {"top.csv"}),
        ("*.csv", True, {"top.csv", "a/x.csv", "a/deep/z.csv", "b/x.csv", "c/x.csv", "with space/é.csv"}),
        ("", True, {"top.csv", "top.json", "a/x.csv", "a/y.json", "a/deep/z.csv", "b/x.csv", "b/w.txt", "c/x.csv",
                    "with space/é.csv"}),
        ("{a,b}/*.csv", False, {"a/x.csv", "b/x.csv"}),
        ("**/x.csv", False, {"a/x.csv", "b/x.csv", "c/x.csv"}),
        ("*/*.json", True, {"a/y.json"}),
        ("with space/*", False, {"with space/é.csv"}),
    ],
)  # fmt: skip
def test_glob_and_recursive(api: Api, tmp_path: Path, glob: str, recursive: bool, expected: set[str]) -> None:
    root = tmp_path / "src"
    _small_tree(root)
    ingestion = api.create("globs", root, glob=glob, recursive=recursive)
    run = api.discovered(api.start(ingestion).name)
    assert paths(api.list_files(ingestion)) == {f"file://{root}/{n}" for n in expected}
    assert run.file_counts.total == len(expected)


def test_modified_after(api: Api, tmp_path: Path) -> None:
    root = tmp_path / "src"
    cutoff = datetime(2024, 6, 1, tzinfo=UTC)
    touch(root / "old.json", mtime=cutoff - timedelta(days=1))
    touch(root / "sub/old.json", mtime=cutoff - timedelta(seconds=1))
    touch(root / "new.json", mtime=cutoff + timedelta(seconds=1))
    touch(root / "sub/new.json", mtime=cutoff + timedelta(days=30))
    ingestion = api.create("recent", root, recursive=True, modified_after=cutoff)
    run = api.discovered(api.start(ingestion).name)
    files = api.list_files(ingestion)
    assert paths(files) == {f"file://{root}/new.json", f"file://{root}/sub/new.json"}
    assert run.file_counts.total == 2
    by_path = {f.path: f.modified_time.ToDatetime(tzinfo=UTC) for f in files}
    assert by_path[f"file://{root}/new.json"] == cutoff + timedelta(seconds=1)


def test_a_file_skipped_by_a_cancelled_run_is_queued_by_the_next(api: Api, tmp_path: Path) -> None:
    root = tmp_path / "src"
    for i in range(5):
        touch(root / f"f{i}.json")
    ingestion = api.create("again", root)
    first = api.discovered(api.start(ingestion).name)
    api.runs.CancelRun(run_pb2.CancelRunRequest(name=first.name))
    assert {f.state for f in api.list_files(ingestion)} == {File.STATE_SKIPPED}
    second = api.discovered(api.start(ingestion).name)
    assert second.state == Run.STATE_RUNNING
    assert second.file_counts.pending == 5
    files = api.list_files(ingestion)
    assert len(files) == 5
    assert {(f.state, f.run) for f in files} == {(File.STATE_PENDING, second.name)}


# --- streaming in chunks ------------------------------------------------------------------------------


def _watch(api: Api, run: str, timeout: float = 60.0) -> list[Run]:
    return [m.run for m in api.runs.WatchRun(run_pb2.WatchRunRequest(name=run), timeout=timeout)]


def test_files_are_visible_while_the_listing_goes_on(
    small_chunk_api: Api, big_tree: BigTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = small_chunk_api
    # Slow each directory read down a little so that a 10,000-file listing spans many watch updates
    # (at least 0.5 s apart): at 5 ms a fast machine listed the tree within three of them.
    real = storage._local_list_dir

    def slow_list_dir(uri: str) -> list[storage.Entry]:
        time.sleep(0.015)
        return real(uri)

    monkeypatch.setattr(storage, "_local_list_dir", slow_list_dir)
    ingestion = api.create("big", big_tree.root, glob="*.json")
    run = api.start(ingestion)
    seen: list[Run] = []
    listed_mid_discovery: list[int] = []
    for message in api.runs.WatchRun(run_pb2.WatchRunRequest(name=run.name), timeout=60):
        seen.append(message.run)
        if message.run.state == Run.STATE_DISCOVERING and message.run.file_counts.total and not listed_mid_discovery:
            page = api.files.ListFiles(file_pb2.ListFilesRequest(ingestion=ingestion, page_size=1000))
            listed_mid_discovery.append(len(page.files))
        if message.run.state == Run.STATE_RUNNING:
            # No agent will finish it: cancel, so that the stream ends with the run.
            api.runs.CancelRun(run_pb2.CancelRunRequest(name=run.name))
    discovering = [r.file_counts.total for r in seen if r.state == Run.STATE_DISCOVERING]
    growing = [t for t in discovering if 0 < t < len(big_tree.matching)]
    assert len(set(growing)) >= 3, f"totals seen while discovering: {discovering}"
    assert discovering == sorted(discovering)
    assert all(t % 100 == 0 for t in growing), f"counts move by whole chunks: {growing}"
    assert listed_mid_discovery
    assert listed_mid_discovery[0] > 0
    assert [r.state for r in seen[-2:]] == [Run.STATE_RUNNING, Run.STATE_CANCELLED]
    assert seen[-2].file_counts.total == len(big_tree.matching)
    assert seen[-2].file_counts.pending == len(big_tree.matching)


class Gate:
    """Lets the local lister read `open_for` directories, then blocks it until released."""

    def __init__(self, open_for: int) -> None:
        self.open_for = open_for
        self.reads = 0
        self.released = threading.Event()
        self.blocked = threading.Event()
        self.real = storage._local_list_dir

    def __call__(self, uri: str) -> list[storage.Entry]:
        self.reads += 1
        if self.reads > self.open_for:
            self.blocked.set()
            self.released.wait(timeout=30)
        return self.real(uri)


def _file_rows(engine: Engine, ingestion: str) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT f.state, r.run_id FROM files f JOIN ingestions i ON i.id = f.ingestion_pk "
                "LEFT JOIN runs r ON r.id = f.run_pk WHERE i.ingestion_id = :i"
            ),
            {"i": ingestion.removeprefix("ingestions/")},
        ).all()
    return [(str(s), str(r)) for s, r in rows]


def test_cancel_during_discovery_stops_the_listing_and_skips_what_was_found(
    small_chunk_api: Api, small_chunk_plane: bootstrap.ControlPlane, big_tree: BigTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = small_chunk_api
    gate = Gate(open_for=12)  # the root, a region, ten leaves of 39 matching files: 3 chunks of 100 committed
    monkeypatch.setattr(storage, "_local_list_dir", gate)
    engine = small_chunk_plane.engine
    ingestion = api.create("big", big_tree.root, glob="*.json")
    try:
        run = api.start(ingestion)
        assert gate.blocked.wait(timeout=30)
        mid = api.wait(run.name, lambda r: r.file_counts.total >= 300)
        assert mid.state == Run.STATE_DISCOVERING
        cancelled = api.runs.CancelRun(run_pb2.CancelRunRequest(name=run.name)).run
        assert cancelled.state == Run.STATE_CANCELLED
        found = cancelled.file_counts.total
        assert 300 <= found < len(big_tree.matching)
        assert cancelled.file_counts.skipped == found
        assert cancelled.file_counts.pending == 0
    finally:
        gate.released.set()
    # The listing stops at its next chunk: no file is added or queued after the cancel.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        rows = _file_rows(engine, ingestion)
        assert len(rows) == found
        assert {state for state, _ in rows} == {"SKIPPED"}
        time.sleep(0.1)
    final = api.get(run.name)
    assert final.state == Run.STATE_CANCELLED
    assert final.file_counts.total == found
    assert final.file_counts.skipped == found
    assert final.HasField("end_time")
    # Discovery is free for the next run, which queues the skipped files and the rest of the tree.
    monkeypatch.setattr(storage, "_local_list_dir", gate.real)
    second = api.discovered(api.start(ingestion).name)
    assert second.state == Run.STATE_RUNNING
    assert second.file_counts.pending == len(big_tree.matching)
    assert paths(api.list_files(ingestion)) == big_tree.matching


# --- sources that cannot be listed ----------------------------------------------------------------------


def test_missing_directory_fails_the_run_with_a_readable_error(api: Api, tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    ingestion = api.create("missing", missing)
    run = api.wait(api.start(ingestion).name, lambda r: r.state in TERMINAL)
    assert run.state == Run.STATE_FAILED
    assert str(missing) in run.error
    assert "does not exist" in run.error
    assert run.file_counts.total == 0
    assert run.HasField("end_time")
    assert run.HasField("discovery_end_time")
    # The ingestion can run again once the directory exists.
    touch(missing / "now.json")
    again = api.discovered(api.start(ingestion).name)
    assert again.state == Run.STATE_RUNNING
    assert again.file_counts.total == 1


def test_a_file_uri_that_is_a_file_fails_the_run(api: Api, tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    touch(plain, b"{}")
    ingestion = api.create("plain", plain)
    run = api.wait(api.start(ingestion).name, lambda r: r.state in TERMINAL)
    assert run.state == Run.STATE_FAILED
    assert str(plain) in run.error
    assert "not a directory" in run.error
    assert run.file_counts.total == 0


def test_unlistable_source_does_not_block_other_ingestions(api: Api, tmp_path: Path) -> None:
    bad = api.create("bad", tmp_path / "nope")
    good_root = tmp_path / "good"
    touch(good_root / "a.json")
    good = api.create("good", good_root)
    bad_run = api.start(bad)
    good_run = api.start(good)
    assert api.wait(bad_run.name, lambda r: r.state in TERMINAL).state == Run.STATE_FAILED
    assert api.discovered(good_run.name).file_counts.total == 1


def test_a_file_name_that_is_not_utf8_does_not_wedge_discovery(small_chunk_api: Api, tmp_path: Path) -> None:
    """Linux allows any bytes in a name. Such a file must not leave the run DISCOVERING forever:
    it is skipped (and the rest discovered) or the run fails with a readable error."""
    api = small_chunk_api
    root = tmp_path / "src"
    touch(root / "good.json")
    bad = os.path.join(os.fsencode(root), b"caf\xe9.json")
    with open(bad, "wb"):
        pass
    ingestion = api.create("latin1", root)
    run = api.wait(api.start(ingestion).name, lambda r: r.state != Run.STATE_DISCOVERING, timeout=8)
    if run.state == Run.STATE_FAILED:
        assert run.error
    else:
        assert run.state == Run.STATE_RUNNING
        assert f"file://{root}/good.json" in paths(api.list_files(ingestion))


# --- resuming an abandoned listing ----------------------------------------------------------------------


class ReplicaCrash(BaseException):
    """The process dying mid-listing: nothing in it gets to handle this."""


class RecordingLister:
    """The real lister, remembering each cursor; optionally dies after `crash_after` files."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.real = SourceLister()
        self.crash_after = crash_after
        self.cursors: list[str | None] = []

    def list(self, source: Source, after: str | None = None) -> Iterator[ListedFile]:
        self.cursors.append(after)
        for i, listed in enumerate(self.real.list(source, after)):
            if self.crash_after is not None and i == self.crash_after:
                raise ReplicaCrash("replica crashed")
            yield listed


def test_an_abandoned_listing_is_resumed_after_its_cursor(
    uow_factory: UowFactory, engine: Engine, tmp_path: Path
) -> None:
    root = tmp_path / "src"
    expected = set()
    for d in range(5):
        for i in range(10):
            touch(root / f"d{d}" / f"f{i}.json")
            expected.add(f"file://{root}/d{d}/f{i}.json")
    spec = IngestionSpec(
        source=Source(uri=f"file://{root}", recursive=True),
        format=Format(type=FormatType.JSON),
        destination=Destination(table="raw.t"),
    )
    with uow_factory() as uow:
        ingestion = Ingestion(tenant="default", ingestion_id="resume", spec=spec)
        uow.ingestions.add(ingestion)
        run = open_run(uow, ingestion, Trigger.MANUAL, discovering=True)
        uow.commit()

    crashing = RecordingLister(crash_after=25)
    first = DiscoveryService(uow_factory, crashing, (ListingError,), ChangeFeed(), owner="cp-a", chunk_size=10)
    with pytest.raises(ReplicaCrash, match="replica crashed"):
        first.discover_next()
    with engine.connect() as conn:
        state, owner, cursor = conn.execute(
            text("SELECT state, discovery_owner, discovery_cursor FROM runs WHERE id = :r"), {"r": run.id}
        ).one()
        committed = sorted(conn.execute(text("SELECT path FROM files")).scalars())
    assert (state, owner) == ("DISCOVERING", "cp-a")
    listed_order = sorted(expected, key=lambda p: p.encode())
    assert committed == listed_order[:20]
    assert cursor == listed_order[19]

    # A live claim is not taken over; a stale one is.
    patient = DiscoveryService(uow_factory, RecordingLister(), (ListingError,), ChangeFeed(), owner="cp-b")
    assert patient.claim() is None
    resuming = RecordingLister()
    second = DiscoveryService(
        uow_factory, resuming, (ListingError,), ChangeFeed(), owner="cp-b", chunk_size=10, stale_after=timedelta(0)
    )
    assert second.discover_next()
    assert resuming.cursors == [listed_order[19]]
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT path, state FROM files")).all()
        state, discovery_end = conn.execute(
            text("SELECT state, discovery_end_time FROM runs WHERE id = :r"), {"r": run.id}
        ).one()
    assert sorted(p for p, _ in rows) == sorted(expected)
    assert {s for _, s in rows} == {"PENDING"}
    assert state == "RUNNING"
    assert discovery_end is not None
    assert second.discover_next() is False
    # Replaying the whole listing into the same run changes nothing.
    with uow_factory() as uow:
        listed = list(SourceLister().list(spec.source))
        assert uow.files.upsert_discovered(ingestion.id, run.id, listed) == 0
        uow.commit()


def test_timestamps_and_sizes_of_discovered_files(api: Api, tmp_path: Path) -> None:
    root = tmp_path / "src"
    when = datetime(2023, 3, 4, 5, 6, 7, tzinfo=UTC)
    touch(root / "a.json", b"12345", mtime=when)
    ingestion = api.create("meta", root)
    run = api.discovered(api.start(ingestion).name)
    (f,) = api.list_files(ingestion)
    assert f.size_bytes == 5
    assert f.modified_time == _ts(when)
    assert f.state == File.STATE_PENDING
    assert f.run == run.name
    assert f.attempts == 0
    assert f.HasField("discover_time")
    assert f.name.startswith(f"{ingestion}/files/")


def _ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp
