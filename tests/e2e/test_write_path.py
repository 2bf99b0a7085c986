"""The write path end to end: agents stage, the control plane commits, and crashes at every step.

What docs/write-path.md promises ("effectively once"): after any crash the table holds each
source file's latest loaded content exactly once, and agrees with the file states. Each test
drives one failure of the protocol with the real pieces (agent processes with their own JVMs,
or in-process agents on the shared Spark session; a control plane in process or as a `serve`
subprocess; PostgreSQL; Iceberg tables read back with pyiceberg) and checks exactly that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grpc
import psutil
import psycopg
import pyarrow.parquet as pq
import pytest

from agent.main import control_plane_channel
from autoloader.v1 import file_pb2, run_pb2
from controlplane.adapters.iceberg_tables import COMMITS_PROPERTY, LEASES_PROPERTY, IcebergTables, open_catalog

from . import test_agent_processes as processes_module
from .conftest import TERMINAL, Run, Stack
from .test_agent_processes import (
    STARTUP,
    AgentProcess,
    AgentProcesses,
    assert_clean_log,
    assert_table_equals_source,
    create,
    file_rows,
    free_address,
    history,
    jsonl,
    start_run,
    wait_until,
    write_files,
)

# The agent-process fixtures (shared, not redefined).
agents = processes_module.agents
make_plane = processes_module.make_plane

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]

File = file_pb2.File
Attempt = file_pb2.FileAttempt
SERVE = (sys.executable, "-m", "autoloader.cli.main", "serve")


# --- fixtures ----------------------------------------------------------------------------------


# --- helpers -----------------------------------------------------------------------------------


def sql(database_url: str, query: str, **params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return list(cursor.fetchall()) if cursor.description is not None else []


def commit_states(database_url: str) -> dict[str, int]:
    return dict(sql(database_url, "SELECT state, count(*) FROM commits GROUP BY state"))  # type: ignore[arg-type]


def snapshots_carrying(table: Any, commit_id: str) -> int:
    return sum(commit_id in carried(s, COMMITS_PROPERTY) for s in table.snapshots())


def carried(snapshot: Any, prop: str) -> list[str]:
    summary = snapshot.summary.additional_properties if snapshot.summary else {}
    return [c for c in summary.get(prop, "").split(",") if c]


def stopped(process: AgentProcess) -> bool:
    """The agent's python process stopped itself (SIGSTOP): state T."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(process.popen.pid).status() == psutil.STATUS_STOPPED
    return False


def parquet_under(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.parquet")) if directory.exists() else []


def local_path(uri: str) -> Path:
    return Path(urlparse(uri).path)


def all_files(stack: Stack, ingestion: str) -> dict[str, File]:
    return {f.path: f for f in stack.list_files(ingestion)}


def explain(stack: Stack, table: str, *processes: AgentProcess) -> str:
    """What the database and the table say, for a failure's message."""
    lines = ["commits (id, lease, state, created, data files):"]
    query = "SELECT id, lease_pk, state, create_time, data_files FROM commits ORDER BY create_time"
    for row in sql(stack.database_url, query):
        lines.append(f"  {row[0]} {row[1]} {row[2]} {row[3]} {[d.get('path') for d in row[4]]}")
    lines.append("leases (id, agent):")
    lines += [
        f"  {r[0]} {r[1]}" for r in sql(stack.database_url, "SELECT id, agent_id FROM leases ORDER BY create_time")
    ]
    lines.append("files (path, state, size, records, lease, commit):")
    for row in sql(stack.database_url, "SELECT path, state, size_bytes, records, lease_pk, commit_pk FROM files"):
        lines.append(f"  {row}")
    with contextlib.suppress(Exception):
        for snapshot in stack.table(table).snapshots():
            summary = snapshot.summary
            lines.append(f"snapshot {snapshot.snapshot_id} {summary.operation if summary else ''} "
                         f"{carried(snapshot, LEASES_PROPERTY)} {carried(snapshot, COMMITS_PROPERTY)}")  # fmt: skip
    return "\n".join(lines + [p.tail(40) for p in processes])


@contextlib.contextmanager
def explained(stack: Stack, table: str, *processes: AgentProcess) -> Iterator[None]:
    try:
        yield
    except AssertionError as error:
        raise AssertionError(f"{error}\n{explain(stack, table, *processes)}") from None


# --- 1. the adversary: a paused agent past its lease, a newer version loaded meanwhile -----------


def test_an_agent_paused_past_its_lease_is_fenced_and_the_newer_content_stands(
    make_plane: Callable[..., Stack], agents: AgentProcesses, workdir: Path, database_url: str
) -> None:
    """P1 stages all 6 files and is frozen (SIGSTOP) just before its report, its heartbeat too.

    Its lease expires, one file is rewritten with other rows, P2 loads everything (the new content);
    a second run reloads the rewritten file. Only then P1 resumes and sends its stale report: it
    must be fenced, its staged data removed, and the table must hold the latest contents only.
    """
    ttl = timedelta(seconds=5)
    stack = make_plane(lease_ttl=ttl)
    source = workdir / "src"
    files = write_files(source, [5, 8, 3, 12, 7, 4], seed=11)
    ingestion = create(stack, "paused", source.as_uri(), 100)
    p1 = agents.start(stack, "p1", AUTOLOADER_TEST_PAUSE="agent_before_report")
    # P2's JVM starts now too, but its control plane (same database) only once P1 is frozen.
    second = free_address()
    p2 = agents.start(stack, "p2", address=second)
    run = start_run(stack, ingestion)
    try:
        wait_until(lambda: stopped(p1), STARTUP, "p1 to stop itself before its report", p1)
        by_path = all_files(stack, ingestion)
        assert {f.state for f in by_path.values()} == {File.STATE_LEASED}, by_path
        (lease,) = {row[0] for row in sql(database_url, "SELECT DISTINCT lease_pk FROM files")}
        assert sql(database_url, "SELECT agent_id FROM leases WHERE id = %(id)s", id=lease) == [("p1",)]

        # A newer version of one file, with more rows: P1 staged the old one.
        rewritten = next(uri for uri in files if uri.endswith("part-003.json"))
        new_rows = [{**r, "name": f"v2-{r['name']}"} for r in file_rows(3, 21, random.Random(99))]
        local_path(rewritten).write_bytes(jsonl(new_rows))
        modified = time.time() + 5
        os.utime(local_path(rewritten), (modified, modified))
        latest = {**files, rewritten: new_rows}
        time.sleep(ttl.total_seconds() + 1)  # P1's lease is over; P1 is still frozen
        # Frozen before its report, so nothing of P1's reached the control plane (a report sent as
        # the pause took effect would have been accepted: the lease still held).
        sent = sql(database_url, "SELECT create_time FROM commits")
        pause = [line[:24] for line in p1.log().splitlines() if "action=test.pause" in line]
        assert not sent, (
            f"p1's report reached the control plane at {sent[0][0]} although p1 paused itself before it "
            f"(logged at {pause}): AUTOLOADER_TEST_PAUSE=agent_before_report did not stop the reporting thread"
        )
        assert {f.state for f in stack.list_files(ingestion)} == {File.STATE_LEASED}

        make_plane(listen_address=second, lease_ttl=ttl)
        first = stack.wait(run, timeout=STARTUP + 60)
        assert first.state == Run.STATE_SUCCEEDED, (first, p2.tail())
        with explained(stack, "e2e.paused", p1, p2):
            assert_table_equals_source(stack, "e2e.paused", latest)
        # The rewritten file changed after its discovery: the next run's discovery queues it again.
        second_run = stack.wait(start_run(stack, ingestion), timeout=120)
        assert second_run.state == Run.STATE_SUCCEEDED, (second_run, p2.tail())
        assert second_run.file_counts.total == second_run.file_counts.succeeded == 1, second_run
        assert_table_equals_source(stack, "e2e.paused", latest)

        # P1's staged data of the old version is still where it put it (nobody committed or removed it).
        location = local_path(str(stack.table("e2e.paused").location()))
        staging = location / "data" / "_staging" / str(lease)
        staged = pq.ParquetDataset([str(f) for f in parquet_under(staging)]).read().to_pylist()
        assert Counter(r["_source_file"] for r in staged) == {uri: len(rows) for uri, rows in files.items()}, (
            f"p1 did not stage the old contents under {staging}: {p1.tail()}"
        )
        assert stopped(p1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p1.popen.pid, signal.SIGCONT)

    wait_until(lambda: "results were fenced" in p1.log() or "batch abandoned" in p1.log(), 60,
               "p1's report to be answered", p1)  # fmt: skip
    assert "6 results were fenced" in p1.log(), p1.tail()
    assert "action=agent.fenced" in p1.log(), p1.tail()

    with explained(stack, "e2e.paused", p1, p2):
        assert_table_equals_source(stack, "e2e.paused", latest)
    by_path = all_files(stack, ingestion)
    assert {uri: (f.state, f.records) for uri, f in by_path.items()} == {
        uri: (File.STATE_SUCCEEDED, len(rows)) for uri, rows in latest.items()
    }
    for path, tries in history(stack, ingestion).items():
        assert (p1.agent, Attempt.OUTCOME_LEASE_EXPIRED) in tries, (path, tries)
        assert (p1.agent, Attempt.OUTCOME_SUCCEEDED) not in tries, (path, tries)
        assert tries[-1] == (p2.agent, Attempt.OUTCOME_SUCCEEDED), (path, tries)
    assert parquet_under(staging) == [], "the fenced report's staged files were not removed"
    table = stack.table("e2e.paused")
    assert all(f"leases/{lease}" not in carried(s, LEASES_PROPERTY) for s in table.snapshots())
    assert p1.running(), p1.tail()  # it goes on leasing
    assert_clean_log(p1)
    assert_clean_log(p2)


# --- 2. the control plane dies at each step of the commit protocol --------------------------------


class ServedPlane:
    """`autoloader serve` as a subprocess on a fixed address; restartable, optionally with a fault."""

    def __init__(self, directory: Path, database_url: str, warehouse: str, **settings: str) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.address = free_address()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOLOADER_")}
        self.env.update({
            "AUTOLOADER_DATABASE_URL": database_url, "AUTOLOADER_STATE_DIR": str(directory / "state"),
            "AUTOLOADER_WAREHOUSE": warehouse, "AUTOLOADER_LISTEN_ADDRESS": self.address,
            "AUTOLOADER_SHUTDOWN_GRACE": "1", "AUTOLOADER_HEALTH_INTERVAL": "0.2",
            "AUTOLOADER_DISCOVERY_POLL": "0.2", "AUTOLOADER_COMMIT_STALE_AFTER": "2",
            "AUTOLOADER_COMMIT_POLL": "0.2", "AUTOLOADER_FINALIZE_SWEEP_INTERVAL": "0.2",
            **{f"AUTOLOADER_{k.upper()}": v for k, v in settings.items()},
        })  # fmt: skip
        # The control plane owns the catalog; the test reads the tables from the same one.
        self.tables = IcebergTables(open_catalog("autoloader", {"warehouse": warehouse}, database_url))
        self.popen: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self, fault: str = "") -> None:
        env = dict(self.env)
        if fault:
            env["AUTOLOADER_TEST_FAULT"] = fault
        log_path = self.directory / f"serve-{len(self.logs)}.log"
        self.logs.append(log_path)
        with log_path.open("wb") as out:
            self.popen = subprocess.Popen(SERVE, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + 90
        while "action=server.start" not in self.log():
            if self.popen.poll() is not None:
                raise AssertionError(f"serve exited {self.popen.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"serve did not start:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.logs[-1].read_text(errors="replace")

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.tables.close()


@pytest.fixture
def served(database_url: str, workdir: Path) -> Iterator[ServedPlane]:
    plane = ServedPlane(workdir / "served", database_url, (workdir / "warehouse").as_uri(), lease_ttl="30")
    try:
        yield plane
    finally:
        plane.stop()


def wait_run(stack: Stack, run: str, timeout: float) -> run_pb2.Run:
    """Like Stack.wait, riding out a control plane that is down."""
    deadline = time.monotonic() + timeout
    current = None
    while time.monotonic() < deadline:
        try:
            current = stack.runs.GetRun(run_pb2.GetRunRequest(name=run), timeout=10)
        except grpc.RpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
        else:
            if current.run.state in TERMINAL:
                return current.run
        time.sleep(0.3)
    raise AssertionError(f"the run did not end in {timeout}s: {current}")


@pytest.mark.parametrize("fault", ["plane_after_intent", "plane_after_iceberg_commit", "plane_after_settle"])
def test_a_control_plane_crash_at_each_commit_step_loads_every_file_exactly_once(
    fault: str, served: ServedPlane, spark: Any, database_url: str, workdir: Path
) -> None:
    """One in-process agent, 12 files in leases of 4; `serve` exits at `fault` on the first report.

    Restarted on the same address without the fault, it finishes (or recognises) the commit in
    doubt; the agent retries its report meanwhile and keeps its lease (TTL 30 s).
    """
    served.start(fault)
    channel = control_plane_channel(served.address)
    stack = Stack(served, database_url, workdir, spark, channel)  # type: ignore[arg-type]
    try:
        sizes = [30, 1, 120, 5, 80, 7, 40, 99, 2, 65, 150, 3]
        files = write_files(workdir / "src", sizes, seed=21)
        table_name = "e2e.plane_crash"
        ingestion = create(stack, "plane-crash", (workdir / "src").as_uri(), 4)
        run = start_run(stack, ingestion)
        stack.start_agent("steady")
        assert served.popen is not None
        try:
            code = served.popen.wait(STARTUP)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve did not crash at {fault}:\n{served.log()}") from None
        assert code == 17, served.log()
        assert f"test fault: exiting at {fault}" in served.log()

        # What the crash left: one intent (the first report's), in the state of its step.
        (intent,) = sql(database_url, "SELECT id, state FROM commits")
        commit_id, state = str(intent[0]), intent[1]
        table = served.tables.load(table_name)
        landed = snapshots_carrying(table, commit_id) if table is not None else 0
        held = sql(database_url, "SELECT count(*) FROM files WHERE commit_pk = %(c)s", c=intent[0])[0][0]
        if fault == "plane_after_intent":
            assert (state, landed, held) == ("PENDING", 0, 4)
        elif fault == "plane_after_iceberg_commit":
            assert (state, landed, held) == ("PENDING", 1, 4)
        else:
            assert (state, landed, held) == ("COMMITTED", 1, 0)

        served.start()  # same address, same database, no fault
        final = wait_run(stack, run, timeout=180)
        assert final.state == Run.STATE_SUCCEEDED, (final, served.log())
        assert final.file_counts.succeeded == final.file_counts.total == len(files)
        assert final.records == sum(sizes)
        assert_table_equals_source(stack, table_name, files)
        by_path = all_files(stack, ingestion)
        assert not [p for p, f in by_path.items() if f.state == File.STATE_LEASED]
        assert {p: f.records for p, f in by_path.items()} == {p: len(rows) for p, rows in files.items()}
        # The agent rode the crash out on the same lease: one attempt per file, its own.
        for path, tries in history(stack, ingestion).items():
            assert tries == [("agents/steady", Attempt.OUTCOME_SUCCEEDED)], (path, tries)
        assert commit_states(database_url) == {"COMMITTED": 3}
        # The intent in doubt went in once: recognised by its snapshot, not committed again.
        table = stack.table(table_name)
        assert snapshots_carrying(table, commit_id) == 1, [s.summary for s in table.snapshots()]
        for (other,) in sql(database_url, "SELECT id FROM commits"):
            assert snapshots_carrying(table, str(other)) == 1, other
        if fault == "plane_after_iceberg_commit":
            assert "action=commit.recognised" in served.log(), served.log()
        for log in served.logs:
            assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        stack.stop_agents()
        channel.close()


# --- 3. group commit: four agents, one table --------------------------------------------------------


class Actions(logging.Handler):
    """Counts the `action` of every record of a logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[str(getattr(record, "action", ""))] += 1


@contextlib.contextmanager
def counting_actions(name: str) -> Iterator[Actions]:
    logger = logging.getLogger(name)
    handler, level = Actions(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def another_replica_owns(database_url: str, table: str) -> Iterator[threading.Event]:
    """Another control plane owns the table's commits and heartbeats until the event is set (then goes silent).

    Meanwhile the intents of the table only queue; once its heartbeat is stale, ours takes the table over.
    """
    silent = threading.Event()
    own = """
        INSERT INTO table_committers (table_name, owner, heartbeat_time) VALUES (%(t)s, 'committer-other', now())
        ON CONFLICT (table_name) DO UPDATE SET owner = 'committer-other', heartbeat_time = now()
    """

    def heartbeat() -> None:
        while not silent.wait(0.3):
            sql(database_url, "UPDATE table_committers SET heartbeat_time = now() "
                              "WHERE table_name = %(t)s AND owner = 'committer-other'", t=table)  # fmt: skip

    sql(database_url, own, t=table)
    thread = threading.Thread(target=heartbeat, name="other-replica", daemon=True)
    thread.start()
    try:
        yield silent
    finally:
        silent.set()
        thread.join(10)


def pending_intents(database_url: str) -> set[str]:
    return {str(row[0]) for row in sql(database_url, "SELECT id FROM commits WHERE state = 'PENDING'")}


def test_four_agents_on_one_table_share_commits(
    make_stack: Callable[..., Stack], workdir: Path, database_url: str
) -> None:
    """400 small files in leases of 20, four in-process agents on one table.

    The first four batches find the table owned by another replica, so their intents queue; once its
    heartbeat goes stale ours takes over and must commit the four as one. After that, a report waits
    up to the linger for the batches the other agents are working on, and those commit together.
    """
    stack = make_stack()
    rng = random.Random(5)
    sizes = [rng.randint(1, 5) for _ in range(400)]
    files = write_files(workdir / "src", sizes, seed=5)
    ingestion = create(stack, "group", (workdir / "src").as_uri(), 20)
    started = time.monotonic()
    with counting_actions("controlplane.service.commits") as actions:
        with another_replica_owns(database_url, "e2e.group") as silent:
            run = start_run(stack, ingestion)
            for i in range(4):
                stack.start_agent(f"agent-{i}")
            # Each agent waits for its report's commit: four pending intents are all four agents'.
            wait_until(lambda: len(pending_intents(database_url)) == 4, STARTUP, "four pending intents")
            held = pending_intents(database_url)
            silent.set()
        final = stack.wait(run, timeout=300)
    elapsed = time.monotonic() - started
    assert final.state == Run.STATE_SUCCEEDED, final
    assert final.file_counts.succeeded == final.file_counts.total == len(files)
    assert_table_equals_source(stack, "e2e.group", files)

    outcomes = dict(sql(database_url, "SELECT outcome, count(*) FROM file_attempts GROUP BY outcome"))
    assert outcomes == {"SUCCEEDED": len(files)}, outcomes  # nothing FAILED, expired or released
    (leases,) = sql(database_url, "SELECT count(DISTINCT lease_pk) FROM file_attempts")[0]
    intents = {str(row[0]) for row in sql(database_url, "SELECT id FROM commits")}
    assert commit_states(database_url) == {"COMMITTED": len(intents)}  # none ABORTED
    assert len(intents) == leases, (len(intents), leases)  # one intent per batch
    batches = len(intents)

    snapshots = stack.table("e2e.group").snapshots()
    commits = [frozenset(carried(s, COMMITS_PROPERTY)) for s in snapshots]
    carried_ids = Counter(i for group in set(commits) for i in group)
    # Every intent is in exactly one commit, and nothing else is; the four queued ones in the same.
    assert set(carried_ids) == intents
    assert max(carried_ids.values()) == 1, carried_ids.most_common(3)
    assert held in commits, f"the four intents queued together were not committed together: {commits}"
    # Each commit made one snapshot (new files: nothing to delete).
    assert len(snapshots) == len(set(commits)), [s.summary for s in snapshots]
    # Far fewer commits than batches: reports wait together because agents pipeline and the committer
    # lingers (1 s by default) while other agents are still working on the table.
    assert 2 * len(commits) <= batches, f"{len(commits)} commits for {batches} batches"
    natural = [g for g in commits if g != held]
    conflicts = actions.counts["commit.conflict"]
    print(
        f"\ngroup commit: {len(files)} files, {batches} batches, {len(commits)} commits, {len(snapshots)} snapshots "
        f"= {1000 * len(snapshots) / len(files):.0f} per 1,000 files; batches per commit: "
        f"{sorted(Counter(len(g) for g in commits).items())}; after the takeover: {len(natural)} commits of "
        f"{batches - len(held)} batches; {conflicts} conflicts; {elapsed:.1f}s"
    )
    assert actions.counts["commit.abort"] == actions.counts["commit.split"] == 0
