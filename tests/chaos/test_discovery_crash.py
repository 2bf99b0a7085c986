"""Discovery against real failures: control planes as separate `serve` processes on one database.

A 50,000-file local tree is listed in chunks of 500. The tests SIGKILL a
control plane mid-listing, run two replicas against one run, and SIGTERM one
mid-listing; after each, the files table must hold every file exactly once,
chunks committed before the failure must be untouched, and the listing must
have resumed after the cursor instead of starting over.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from sqlalchemy import Engine, text

from autoloader.v1 import ingestion_pb2, ingestion_pb2_grpc, run_pb2, run_pb2_grpc

pytestmark = pytest.mark.slow

AUTOLOADER = [sys.executable, "-m", "autoloader.cli.main"]
CHUNK = 500
# 10 x 10 leaf directories of 499 files, plus in every top directory one file
# per leaf directory named like it ("q03.json" sorts just before "q03/"), so
# files and directories interleave in the byte order the resume cursor relies on.
TOP, LEAVES, PER_LEAF = 10, 10, 499
TOTAL = TOP * LEAVES * (PER_LEAF + 1)
assert TOTAL == 50_000

T = TypeVar("T")


@dataclass(frozen=True)
class Tree:
    root: Path
    paths: frozenset[str]

    @property
    def uri(self) -> str:
        return f"file://{self.root}"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tree]:
    """50,000 empty *.json files in 110 directories (read-only for the tests).

    On tmpfs when there is one: creating 50,000 files on a busy disk can take
    most of a minute, on tmpfs about two seconds.
    """
    shm = Path("/dev/shm")  # noqa: S108 (mkdtemp below makes a private, unguessable directory)
    if shm.is_dir() and os.access(shm, os.W_OK):
        root = Path(tempfile.mkdtemp(prefix="al-tree-", dir=shm))
    else:
        root = tmp_path_factory.mktemp("tree")
    try:
        yield _make_tree(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _make_tree(root: Path) -> Tree:
    paths = []
    for p in range(TOP):
        top = root / f"p{p:02d}"
        top.mkdir()
        for q in range(LEAVES):
            leaf = top / f"q{q:02d}"
            leaf.mkdir()
            names = [top / f"q{q:02d}.json"] + [leaf / f"f{i:04d}.json" for i in range(PER_LEAF)]
            for name in names:
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644))
                paths.append(f"file://{name}")
    assert len(paths) == TOTAL
    return Tree(root, frozenset(paths))


class ServerProcess:
    """`autoloader serve` in its own process; stdout and stderr go to a log file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            [*AUTOLOADER, "serve"], env=env, stdout=self._log_file, stderr=subprocess.STDOUT, text=True
        )

    def text(self) -> str:
        return self.log.read_text()

    def wait_address(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"action=server.start address=(\S+)", self.text())
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited {self.process.returncode}:\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"serve did not start:\n{self.text()}")

    def sigkill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._log_file.close()


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.close()


@pytest.fixture
def start_server(
    servers: list[ServerProcess], database_url: str, tmp_path: Path
) -> Callable[..., tuple[ServerProcess, str]]:
    """Starts a control plane on the test's database; keyword arguments are AUTOLOADER_* settings."""

    def start(name: str, **settings: str) -> tuple[ServerProcess, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOLOADER_")}
        values = {
            "database_url": database_url,
            "listen_address": "127.0.0.1:0",
            "state_dir": str(tmp_path / "state"),
            "discovery_chunk_size": str(CHUNK),
            "discovery_stale_after": "PT3S",  # ISO 8601: a bare "3" is refused
            "shutdown_grace": "2",
            **settings,
        }
        env.update({f"AUTOLOADER_{k.upper()}": v for k, v in values.items()})
        server = ServerProcess(env, tmp_path / f"{name}.log")
        servers.append(server)
        return server, server.wait_address()

    return start


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def start_run(address: str, uri: str) -> str:
    source = ingestion_pb2.Source(uri=uri, glob="*.json", recursive=True)
    ingestion = ingestion_pb2.Ingestion(
        source=source,
        format=ingestion_pb2.Format(type=ingestion_pb2.Format.TYPE_JSON),
        destination=ingestion_pb2.Destination(table="raw.tree"),
    )
    with grpc.insecure_channel(address) as channel:
        ingestion_pb2_grpc.IngestionServiceStub(channel).CreateIngestion(
            ingestion_pb2.CreateIngestionRequest(ingestion=ingestion, ingestion_id="tree"), timeout=10
        )
        run = run_pb2_grpc.RunServiceStub(channel).StartRun(
            run_pb2.StartRunRequest(ingestion="ingestions/tree"), timeout=10
        )
    assert run.run.state == run_pb2.Run.STATE_DISCOVERING
    return run.run.name


def get_run(address: str, name: str) -> run_pb2.Run:
    with grpc.insecure_channel(address) as channel:
        return run_pb2_grpc.RunServiceStub(channel).GetRun(run_pb2.GetRunRequest(name=name), timeout=10).run


def scalar(engine: Engine, sql: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql)).scalar_one()


def run_row(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT state, discovery_owner, discovery_heartbeat_time, discovery_cursor, discovery_end_time "
                "FROM runs"
            )
        ).one()
    return dict(row._mapping)


def file_rows(engine: Engine) -> dict[str, tuple[int, datetime, datetime]]:
    """path -> (id, discover_time, update_time) of every file row."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT path, id, discover_time, update_time FROM files")).all()
    found = {path: (id_, discovered, updated) for path, id_, discovered, updated in rows}
    assert len(found) == len(rows), "duplicate paths in the files table"
    return found


def discovering_midway(engine: Engine, chunks: int) -> bool:
    """At least `chunks` chunks are committed and the run is still listing."""
    return scalar(engine, "SELECT count(*) FROM files") >= chunks * CHUNK and (
        scalar(engine, "SELECT state FROM runs") == "DISCOVERING"
    )


def log_events(log: str, action: str) -> list[dict[str, str]]:
    """key=value fields of every log line with this action."""
    events = []
    for line in log.splitlines():
        if f"action={action} " in line + " ":
            message, _, fields = line.rpartition("  ")
            events.append({"message": message, **dict(re.findall(r"(\w+)=(\S+)", fields))})
    return events


def assert_committed_prefix(committed: dict[str, Any], cursor: str | None, tree: Tree) -> None:
    """Only whole chunks are committed, they are the first paths in byte order, and the cursor is the last one."""
    count = len(committed)
    assert 0 < count < TOTAL, f"the failure did not land mid-listing ({count} of {TOTAL} files committed)"
    assert count % CHUNK == 0, f"{count} files committed: not a whole number of {CHUNK}-file chunks"
    in_order = sorted(tree.paths)
    assert set(committed) == set(in_order[:count]), "the committed files are not the first ones in byte order"
    assert cursor == in_order[count - 1]


def assert_complete(engine: Engine, tree: Tree) -> dict[str, tuple[int, datetime, datetime]]:
    assert scalar(engine, "SELECT count(*) FROM files") == TOTAL
    assert scalar(engine, "SELECT count(DISTINCT path) FROM files") == TOTAL
    assert scalar(engine, "SELECT count(DISTINCT run_pk) FROM files") == 1
    assert scalar(engine, "SELECT count(*) FROM files WHERE state <> 'PENDING'") == 0
    rows = file_rows(engine)
    missing, extra = tree.paths - rows.keys(), rows.keys() - tree.paths
    assert not missing, f"{len(missing)} files never discovered, such as {sorted(missing)[:3]}"
    assert not extra, f"{len(extra)} paths not in the tree, such as {sorted(extra)[:3]}"
    return rows


def assert_run_discovered(address: str, name: str) -> None:
    run = get_run(address, name)
    assert run.state == run_pb2.Run.STATE_RUNNING
    assert run.HasField("discovery_end_time")
    assert not run.HasField("end_time")
    assert run.error == ""
    assert run.file_counts.total == TOTAL
    assert run.file_counts.pending == TOTAL


def test_sigkill_mid_listing_resumes_after_the_cursor(
    tree: Tree, engine: Engine, start_server: Callable[..., tuple[ServerProcess, str]]
) -> None:
    first, address = start_server("first")
    name = start_run(address, tree.uri)
    wait_for(lambda: discovering_midway(engine, 2), 60, "the first chunks to commit")
    first.sigkill()

    killed = run_row(engine)
    assert killed["state"] == "DISCOVERING"
    assert killed["discovery_owner"] is not None  # the claim died with the process
    committed = file_rows(engine)
    assert_committed_prefix(committed, killed["discovery_cursor"], tree)
    [started] = log_events(first.text(), "discovery.start")
    assert started["owner"] == killed["discovery_owner"]
    assert log_events(first.text(), "discovery.end") == []

    second, address = start_server("second")
    # The dead owner's heartbeat must go stale (3 s) before the restart may claim the run.
    wait_for(lambda: get_run(address, name).state != run_pb2.Run.STATE_DISCOVERING, 60, "discovery to end", 0.1)
    assert_run_discovered(address, name)
    final = assert_complete(engine, tree)
    # Rows committed before the kill were neither rewritten nor re-inserted.
    assert {path: final[path] for path in committed} == committed

    log = second.text()
    [resumed] = log_events(log, "discovery.start")
    assert "discovery resumed" in resumed["message"]
    assert resumed["owner"] != killed["discovery_owner"]
    [ended] = log_events(log, "discovery.end")
    # Listed only what was after the cursor: no chunk was listed twice.
    assert ended["listed"] == ended["queued"] == str(TOTAL - len(committed))
    assert run_row(engine)["discovery_owner"] == resumed["owner"]
    assert "Traceback" not in log
    assert second.process.poll() is None


def test_two_replicas_list_a_run_once(
    tree: Tree, engine: Engine, start_server: Callable[..., tuple[ServerProcess, str]]
) -> None:
    # Both replicas look for claimable work every 50 ms, so the one not woken
    # by StartRun keeps trying to claim the run the other one is listing.
    one, address = start_server("one", discovery_poll="0.05", discovery_stale_after="PT5S")
    two, _ = start_server("two", discovery_poll="0.05", discovery_stale_after="PT5S")
    name = start_run(address, tree.uri)
    wait_for(lambda: get_run(address, name).state != run_pb2.Run.STATE_DISCOVERING, 90, "discovery to end", 0.1)
    assert_run_discovered(address, name)
    assert_complete(engine, tree)

    logs = {"one": one.text(), "two": two.text()}
    starts = [event for log in logs.values() for event in log_events(log, "discovery.start")]
    ends = [event for log in logs.values() for event in log_events(log, "discovery.end")]
    owners = sorted({event["owner"] for event in starts})
    assert len(starts) == 1, f"the run was claimed {len(starts)} times, by {owners}"
    assert len(ends) == 1, ends
    assert starts[0]["owner"] == ends[0]["owner"] == run_row(engine)["discovery_owner"]
    assert ends[0]["listed"] == ends[0]["queued"] == str(TOTAL)
    for log in logs.values():
        assert "action=discovery.lost" not in log
        assert "action=discovery.error" not in log
        assert "Traceback" not in log
    assert one.process.poll() is None
    assert two.process.poll() is None


def test_sigterm_mid_listing_hands_the_run_back_at_once(
    tree: Tree, engine: Engine, start_server: Callable[..., tuple[ServerProcess, str]]
) -> None:
    # A stale claim would block the restart for 10 minutes: only a released claim lets it resume now.
    first, address = start_server("first", discovery_stale_after="PT10M")
    name = start_run(address, tree.uri)
    wait_for(lambda: discovering_midway(engine, 10), 60, "ten chunks to commit")
    signalled = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(30) == 0, first.text()
    assert time.monotonic() - signalled < 10

    released = run_row(engine)
    assert released["state"] == "DISCOVERING"
    assert released["discovery_owner"] is None
    assert released["discovery_heartbeat_time"] is None
    committed = file_rows(engine)
    assert_committed_prefix(committed, released["discovery_cursor"], tree)
    log = first.text()
    assert len(log_events(log, "discovery.release")) == 1, log
    assert log_events(log, "discovery.end") == []
    assert "action=server.stop" in log
    assert "Traceback" not in log

    second, address = start_server("second", discovery_stale_after="PT10M")
    wait_for(lambda: log_events(second.text(), "discovery.start"), 10, "the restart to claim the run")
    wait_for(lambda: get_run(address, name).state != run_pb2.Run.STATE_DISCOVERING, 60, "discovery to end", 0.1)
    assert_run_discovered(address, name)
    final = assert_complete(engine, tree)
    assert {path: final[path] for path in committed} == committed

    log = second.text()
    [resumed] = log_events(log, "discovery.start")
    assert "discovery resumed" in resumed["message"]
    [ended] = log_events(log, "discovery.end")
    assert ended["listed"] == ended["queued"] == str(TOTAL - len(committed))
    assert "Traceback" not in log
