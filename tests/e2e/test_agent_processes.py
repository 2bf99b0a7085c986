"""Agents as real processes (`autoloader agent`): two at once, crashes, SIGTERM, a control plane restart.

Each agent process starts its own JVM (~10-20 s on a 2-core machine, plus a slow
first batch), so the tests keep to few of them, and start the JVMs of agents that
are needed later early: such an agent is pointed at a second control plane
(same database) that is started only when its turn comes, and retries until
then. Agents are killed (with their JVM: each runs in its own process group)
when the test ends, whatever happened. No test here uses the in-process Spark
session of the e2e fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

from autoloader.v1 import file_pb2, ingestion_pb2, lease_pb2, lease_pb2_grpc, run_pb2
from controlplane import bootstrap

from .conftest import TERMINAL, Run, Stack, plane_settings, stack_factory

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(400)]

Format = ingestion_pb2.Format
Limits = ingestion_pb2.Limits
File = file_pb2.File
Attempt = file_pb2.FileAttempt
JSON = Format(type=Format.TYPE_JSON)
CREDENTIALS = {"moto": {"key": "testing", "secret": "testing"}}
SOURCE_COLUMNS = ("id", "name", "amount", "ok", "note")
# Test-only JVM tuning: C1 only roughly halves a short-lived JVM's start and first batches here.
JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
AGENT_COMMAND = ("-m", "autoloader.cli.main", "agent")
# An agent's JVM start plus its first batch on this 2-core machine, with room to spare.
STARTUP = 120.0


# --- agent processes ---------------------------------------------------------------------------


@dataclass
class AgentProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def agent(self) -> str:
        return f"agents/{self.name}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 60) -> str:
        return f"--- {self.name} stderr (last {lines} lines) ---\n" + "\n".join(self.log().splitlines()[-lines:])

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout}s\n{self.tail()}") from None

    def kill(self) -> None:
        """The agent and its JVM (its own process group, which we started)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(30)


@dataclass
class AgentProcesses:
    directory: Path
    started: list[AgentProcess] = field(default_factory=list)

    def start(
        self, stack: Stack, name: str, address: str = "", command: tuple[str, ...] = AGENT_COMMAND, **env: str
    ) -> AgentProcess:
        """`autoloader agent` (or python `command`) for `stack`'s database and warehouse, talking to `address`."""
        state = self.directory / name
        state.mkdir(parents=True, exist_ok=True)
        variables = {
            **os.environ,
            "AUTOLOADER_ADDRESS": address or stack.plane.address,
            "AUTOLOADER_AGENT_NAME": name,
            "AUTOLOADER_STATE_DIR": str(state),
            "AUTOLOADER_SPARK_MASTER": "local[1]",
            "AUTOLOADER_SPARK_DRIVER_MEMORY": "1g",
            "AUTOLOADER_LEASE_WAIT": "1",
            "AUTOLOADER_RETRY_INITIAL": "0.2",
            "AUTOLOADER_RETRY_MAX": "1",
            "JAVA_TOOL_OPTIONS": JVM_OPTIONS,
            # Works around the fork bug shown by test_spark_launch_is_not_broken_by_the_grpc_channel (below).
            **env,
        }
        log_path = self.directory / f"{name}.stderr"
        with log_path.open("wb") as stderr:
            popen = subprocess.Popen(
                [sys.executable, *command],
                env=variables, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True,
            )  # fmt: skip
        process = AgentProcess(name, popen, log_path)
        self.started.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.started:
            process.kill()


@pytest.fixture
def agents(workdir: Path) -> Iterator[AgentProcesses]:
    processes = AgentProcesses(workdir / "agents")
    try:
        yield processes
    finally:
        processes.kill_all()


@pytest.fixture
def make_plane(database_url: str, workdir: Path) -> Iterator[Callable[..., Stack]]:
    """Control planes without the in-process Spark session: no agent here needs it."""
    with stack_factory(database_url, workdir, None) as make:
        yield make


@pytest.fixture
def stack(make_plane: Callable[..., Stack]) -> Stack:
    return make_plane()


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# --- data and control-plane helpers ------------------------------------------------------------


def file_rows(index: int, count: int, rng: random.Random) -> list[dict[str, Any]]:
    return [
        {"id": j, "name": f"f{index}-r{j}", "amount": round(rng.uniform(-1000, 1000), 2), "ok": rng.random() < 0.5,
         "note": None if j % 7 == 0 else rng.choice(["a", "bb", "ccc ü", 'quote " \\ slash'])}
        for j in range(count)
    ]  # fmt: skip


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def write_files(directory: Path, sizes: list[int], seed: int = 1) -> dict[str, list[dict[str, Any]]]:
    """part-NNN.json files with sizes[i] rows each; returns their rows by file:// URI (as _source_file)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[dict[str, Any]]] = {}
    for i, size in enumerate(sizes):
        path = directory / f"part-{i:03d}.json"
        rows = file_rows(i, size, rng)
        path.write_bytes(jsonl(rows))
        files[path.as_uri()] = rows
    return files


def source_multiset(files: dict[str, list[dict[str, Any]]]) -> Counter[tuple[Any, ...]]:
    return Counter((*(r[c] for c in SOURCE_COLUMNS), uri) for uri, rows in files.items() for r in rows)


def table_multiset(rows: list[dict[str, Any]]) -> Counter[tuple[Any, ...]]:
    return Counter((*(r[c] for c in SOURCE_COLUMNS), r["_source_file"]) for r in rows)


def assert_table_equals_source(stack: Stack, table: str, files: dict[str, list[dict[str, Any]]]) -> None:
    rows = stack.rows(table)
    duplicates = [key for key, n in Counter((r["_source_file"], r["id"]) for r in rows).items() if n > 1]
    assert not duplicates, f"{len(duplicates)} (_source_file, id) pairs are duplicated, e.g. {duplicates[:5]}"
    assert len(rows) == sum(len(r) for r in files.values())
    expected, actual = source_multiset(files), table_multiset(rows)
    assert actual == expected, (
        f"missing {list((expected - actual).items())[:3]}, extra {list((actual - expected).items())[:3]}"
    )


def create(stack: Stack, ingestion_id: str, uri: str, files_per_lease: int, **source: Any) -> str:
    return stack.create(
        ingestion_id, uri, JSON, limits=Limits(max_files_per_lease=files_per_lease),
        source_fields={"glob": "*.json", **source},
    )  # fmt: skip


def start_run(stack: Stack, ingestion: str) -> str:
    return str(stack.runs.StartRun(run_pb2.StartRunRequest(ingestion=ingestion)).run.name)


def get_run(stack: Stack, run: str) -> run_pb2.Run:
    return stack.runs.GetRun(run_pb2.GetRunRequest(name=run)).run


def attempts(stack: Stack, file: str) -> list[file_pb2.FileAttempt]:
    return list(stack.files.ListFileAttempts(file_pb2.ListFileAttemptsRequest(file=file)).attempts)


def history(stack: Stack, ingestion: str) -> dict[str, list[tuple[str, int]]]:
    """Every file's attempts as (agent, outcome), by path."""
    return {f.path: [(a.agent, a.outcome) for a in attempts(stack, f.name)] for f in stack.list_files(ingestion)}


def list_agents(stack: Stack) -> dict[str, lease_pb2.Agent]:
    stub = lease_pb2_grpc.LeaseServiceStub(stack.channel)
    return {a.name: a for a in stub.ListAgents(lease_pb2.ListAgentsRequest(), timeout=10).agents}


def wait_until(condition: Callable[[], bool], timeout: float, what: str, *processes: AgentProcess) -> None:
    """Polls `condition`; fails early (with their logs) if an agent process exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        for process in processes:
            if not process.running():
                raise AssertionError(f"{process.name} exited ({process.popen.returncode}) while waiting for {what}\n"
                                     f"{process.tail()}")  # fmt: skip
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n" +
                                 "\n".join(p.tail() for p in processes))  # fmt: skip
        time.sleep(0.2)


def holds_lease(stack: Stack, process: AgentProcess) -> bool:
    agent = list_agents(stack).get(process.agent)
    return agent is not None and agent.leased_files > 0


def table_files(stack: Stack, table: str) -> set[str] | None:
    """The _source_file values in the table, or None if it does not exist."""
    if stack.table(table) is None:
        return None
    return {r["_source_file"] for r in stack.rows(table)}


def committed_leases(stack: Stack, table: str) -> set[str]:
    """The leases whose data the table's snapshots carry (none if it does not exist)."""
    loaded = stack.table(table)
    if loaded is None:
        return set()
    return {lease for s in loaded.snapshots() for lease in s.summary["autoloader.leases"].split(",")}


def assert_clean_log(process: AgentProcess) -> None:
    assert "Traceback" not in process.log(), process.tail(200)


# --- moto S3 -----------------------------------------------------------------------------------


# --- tests -------------------------------------------------------------------------------------


def succeeded_files(stack: Stack, runs: list[str]) -> int:
    return sum(get_run(stack, run).file_counts.succeeded for run in runs)


def test_two_agent_processes_load_local_and_s3_files_exactly_once_across_a_control_plane_restart(
    make_plane: Callable[..., Stack], agents: AgentProcesses, workdir: Path, database_url: str,
    moto_endpoint: str, aws_environment: None,
) -> None:  # fmt: skip
    stack = make_plane(credentials=CREDENTIALS)
    # The JVMs start while the files are written.
    p1 = agents.start(stack, "p1", AUTOLOADER_CREDENTIALS=json.dumps(CREDENTIALS))
    p2 = agents.start(stack, "p2", AUTOLOADER_CREDENTIALS=json.dumps(CREDENTIALS))
    rng = random.Random(7)
    sizes = [1, 2000, *(rng.choice([rng.randint(1, 20), rng.randint(100, 2000)]) for _ in range(198))]
    local = write_files(workdir / "local", sizes[:100], seed=1)

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
    bucket = f"al-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    remote: dict[str, list[dict[str, Any]]] = {}
    uploads: list[tuple[str, bytes]] = []
    for uri, rows in write_files(workdir / "s3-source", sizes[100:], seed=2).items():
        key = f"prefix/{uri.rpartition('/')[2]}"
        remote[f"s3://{bucket}/{key}"] = rows
        uploads.append((key, jsonl(rows)))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), uploads))

    local_ingestion = create(stack, "local-files", (workdir / "local").as_uri(), 25)
    s3_ingestion = create(stack, "s3-files", f"s3://{bucket}/prefix", 25, credentials_ref="moto",
                          options={"endpoint_url": moto_endpoint})  # fmt: skip
    runs = {start_run(stack, local_ingestion): local, start_run(stack, s3_ingestion): remote}

    # Once the first batch is in, the control plane restarts on the same address and database.
    wait_until(lambda: succeeded_files(stack, list(runs)) >= 25, STARTUP, "the first batch", p1, p2)
    address = stack.plane.address
    stack.plane.stop(grace=0)
    time.sleep(1.0)
    stack.plane = bootstrap.start(
        plane_settings(database_url, workdir / "state", credentials=CREDENTIALS, listen_address=address)
    )
    left = 200 - succeeded_files(stack, list(runs))
    assert left > 0, "the runs ended before the restart"

    wait_until(lambda: all(get_run(stack, run).state in TERMINAL for run in runs), 240, "both runs to end", p1, p2)
    for run, files in runs.items():
        final = get_run(stack, run)
        assert final.state == Run.STATE_SUCCEEDED, (final, p1.tail(), p2.tail())
        assert final.file_counts.succeeded == final.file_counts.total == 100
        assert final.records == sum(len(rows) for rows in files.values())
    assert_table_equals_source(stack, "e2e.local_files", local)
    assert_table_equals_source(stack, "e2e.s3_files", remote)

    # Every file succeeded at its first attempt, restart or not; both processes did some of them.
    workers: Counter[str] = Counter()
    for ingestion in (local_ingestion, s3_ingestion):
        for path, tries in history(stack, ingestion).items():
            assert [outcome for _, outcome in tries] == [Attempt.OUTCOME_SUCCEEDED], (path, tries)
            workers[tries[0][0]] += 1
    assert set(workers) == {p1.agent, p2.agent}, workers
    assert set(list_agents(stack)) >= {p1.agent, p2.agent}
    # The agents rode out the restart (the last `left` files were reported to the new plane).
    for process in (p1, p2):
        assert process.running(), process.tail()
        assert_clean_log(process)


def test_agents_that_die_before_and_after_their_report_leave_each_file_loaded_exactly_once(
    stack: Stack, make_plane: Callable[..., Stack], agents: AgentProcesses, workdir: Path
) -> None:
    """Two agents die on their first batch: one with its data staged and not sent, one right after its answer.

    They run side by side, each with one lease of 4 files. The rescuer's JVM starts during their batches,
    but it talks to a second control plane (same database) that only starts once both have crashed.
    Either may already hold its next lease (an agent leases its next batch while it reports): those
    files are left leased too, and expire.
    """
    sizes = [300, 1, 1200, 50, 800, 7, 400, 999, 20, 650, 1500, 3]
    files = write_files(workdir / "src", sizes, seed=3)
    ingestion = create(stack, "crashes", (workdir / "src").as_uri(), 4)
    after = agents.start(stack, "after-report", AUTOLOADER_TEST_FAULT="agent_after_report")
    before = agents.start(stack, "before-report", AUTOLOADER_TEST_FAULT="agent_before_report")
    run = start_run(stack, ingestion)
    wait_until(lambda: holds_lease(stack, after) and holds_lease(stack, before), STARTUP, "both crashers' leases")
    second = free_address()
    rescuer = agents.start(stack, "rescuer", address=second)  # its JVM starts while the crashers work
    assert after.wait(STARTUP) == 17, after.tail()
    assert before.wait(STARTUP) == 17, before.tail()
    assert "test fault: exiting at agent_after_report" in after.log(), after.tail()
    assert "test fault: exiting at agent_before_report" in before.log(), before.tail()

    # The answered batch is committed and recorded; the unsent one left nothing in the table, and its
    # files stay leased until the lease expires.
    committed = table_files(stack, "e2e.crashes")
    assert committed is not None
    assert len(committed) == 4
    assert_table_equals_source(stack, "e2e.crashes", {uri: files[uri] for uri in committed})
    states = {f.path: f.state for f in stack.list_files(ingestion)}
    assert {states[uri] for uri in committed} == {File.STATE_SUCCEEDED}
    leased = {path for path, state in states.items() if state == File.STATE_LEASED}
    assert len(leased) in (4, 8), leased
    assert not leased & committed
    # Staged data is on disk: the committed batch's (adopted in place) and the unsent one's, which no
    # snapshot references and the committer's orphan sweep removes later (and the next batch's, if
    # Spark had begun writing it).
    staging = Path(stack.table("e2e.crashes").location().removeprefix("file://")) / "data" / "_staging"
    staged = {f"leases/{d.name}" for d in staging.iterdir()}
    assert committed_leases(stack, "e2e.crashes") < staged
    assert 2 <= len(staged) <= 1 + len(leased) // 4, staged

    make_plane(listen_address=second)
    final = stack.wait(run, timeout=150)
    assert final.state == Run.STATE_SUCCEEDED, (final, rescuer.tail())
    assert final.file_counts.succeeded == len(files)
    assert final.records == sum(sizes)
    assert_table_equals_source(stack, "e2e.crashes", files)
    rescued = (rescuer.agent, Attempt.OUTCOME_SUCCEEDED)
    for path, tries in history(stack, ingestion).items():
        if path in committed:
            assert tries == [(after.agent, Attempt.OUTCOME_SUCCEEDED)], path
        elif path in leased:
            assert tries[1:] == [rescued], (path, tries)
            assert tries[0][1] == Attempt.OUTCOME_LEASE_EXPIRED, (path, tries)
        else:
            assert tries == [rescued], path
    expired_by = Counter(tries[0][0] for path, tries in history(stack, ingestion).items() if path in leased)
    assert expired_by[before.agent] >= 4, expired_by
    assert set(expired_by) <= {before.agent, after.agent}, expired_by
    by_path = {f.path: f for f in stack.list_files(ingestion)}
    assert {uri: by_path[uri].lease_expiries for uri in files} == {uri: int(uri in leased) for uri in files}


def test_sigterm_mid_batch_releases_or_finishes_the_batch_and_exits_cleanly(
    stack: Stack, make_plane: Callable[..., Stack], agents: AgentProcesses, workdir: Path
) -> None:
    # Two files of 8k rows per lease: a fresh JVM's first batch takes well over 5 s here.
    files = write_files(workdir / "src", [8_000] * 6, seed=5)
    ingestion = create(stack, "sigterm", (workdir / "src").as_uri(), 2)
    impatient = agents.start(stack, "impatient", AUTOLOADER_SHUTDOWN_GRACE="0")
    patient = agents.start(stack, "patient", AUTOLOADER_SHUTDOWN_GRACE="120")
    run = start_run(stack, ingestion)
    wait_until(lambda: holds_lease(stack, impatient) and holds_lease(stack, patient), STARTUP,
               "both agents to hold a lease", impatient, patient)  # fmt: skip
    time.sleep(1.0)  # well into the batches
    signalled = time.time()
    impatient.popen.send_signal(signal.SIGTERM)
    patient.popen.send_signal(signal.SIGTERM)
    second = free_address()
    finisher = agents.start(stack, "finisher", address=second)  # starts its JVM, idle until that plane is up
    assert impatient.wait(45) == 0, impatient.tail()
    impatient_exit = time.time() - signalled
    assert patient.wait(90) == 0, patient.tail()
    assert "batch abandoned on shutdown" in impatient.log(), impatient.tail()
    assert "batch abandoned" not in patient.log(), patient.tail()
    # Bounded: the agent gives an abandoned batch 30 s to wind down. (It should take a moment, but a batch
    # abandoned between two Spark jobs runs on: see test_the_end_of_the_grace_period_is_honoured.)
    assert impatient_exit < 45, impatient_exit

    # The abandoned batch went back to PENDING without spending an attempt; the finished one was reported.
    tries_by_path = history(stack, ingestion)
    by_path = {f.path: f for f in stack.list_files(ingestion)}
    released = {p for p, tries in tries_by_path.items() if (impatient.agent, Attempt.OUTCOME_RELEASED) in tries}
    finished = {p for p, tries in tries_by_path.items() if (patient.agent, Attempt.OUTCOME_SUCCEEDED) in tries}
    assert released, impatient.tail()
    assert finished, patient.tail()
    for path, tries in tries_by_path.items():
        assert tries in (
            [],
            [(impatient.agent, Attempt.OUTCOME_RELEASED)],
            [(patient.agent, Attempt.OUTCOME_SUCCEEDED)],
        ), (path, tries)
    for path in released:
        assert by_path[path].state == File.STATE_PENDING, by_path[path]
        assert by_path[path].attempts == 0, by_path[path]
    for path in finished:
        assert by_path[path].state == File.STATE_SUCCEEDED
    # The patient agent's last batch was in flight when it was told to stop, and was still reported.
    last = max((a for f in by_path.values() for a in attempts(stack, f.name) if a.agent == patient.agent),
               key=lambda a: a.start_time.ToDatetime())  # fmt: skip
    assert last.outcome == Attempt.OUTCOME_SUCCEEDED
    assert last.start_time.ToDatetime().timestamp() < signalled < last.end_time.ToDatetime().timestamp(), last
    assert_table_equals_source(stack, "e2e.sigterm", {p: files[p] for p in finished})
    assert_clean_log(impatient)
    assert_clean_log(patient)

    make_plane(listen_address=second)
    final = stack.wait(run, timeout=180)
    assert final.state == Run.STATE_SUCCEEDED, (final, finisher.tail())
    assert_table_equals_source(stack, "e2e.sigterm", files)
    for path, tries in history(stack, ingestion).items():
        assert tries[-1] == (finisher.agent if path not in finished else patient.agent, Attempt.OUTCOME_SUCCEEDED)
    assert {f.path: f.attempts for f in stack.list_files(ingestion)} == dict.fromkeys(files, 1)
    assert finisher.running(), finisher.tail()
    assert_clean_log(finisher)


# What `autoloader agent` does on SIGTERM with AUTOLOADER_SHUTDOWN_GRACE=0 (agent/main.py run(): stop.set() from
# the signal handler, then worker.abandon_current() once the grace period is over), at two precise moments:
#  1. while a batch is between Spark jobs (here: right before its first one; in a fresh JVM, ~10 s of jobs follow);
#  2. while the agent's LeaseFiles long-poll is in flight, and the poll then returns files.
SHUTDOWN_PROBE = """
import json, time
from agent.config import AgentSettings
from agent.main import build_worker
from autoloader import logs

logs.configure("INFO")
worker, channel = build_worker(AgentSettings())
client, spark = worker._client, worker._spark
events = {}

def sigterm_and_grace_over(moment):
    events[moment] = time.time()
    worker.stop.set()
    worker.abandon_current()

class Session:
    def __getattr__(self, name):
        return getattr(spark, name)

    @property
    def read(self):
        if "between_jobs" not in events:
            sigterm_and_grace_over("between_jobs")
        return spark.read

def lease(*args, **kwargs):
    batch = real_lease(*args, **kwargs)
    if batch is not None and "during_poll" not in events:
        events["poll_lease"] = batch.lease.name
        sigterm_and_grace_over("during_poll")
    return batch

worker._spark = Session()
worker.run()  # 1: ends after its first batch (stop is set)
worker._spark = spark
worker.stop.clear()
real_lease, client.lease = client.lease, lease
worker.run()  # 2: ends after the batch leased during the poll
print("PROBE " + json.dumps(events), flush=True)
channel.close()
"""


def test_the_end_of_the_grace_period_is_honoured(stack: Stack, agents: AgentProcesses, workdir: Path) -> None:
    files = write_files(workdir / "src", [2_000] * 4, seed=9)
    ingestion = create(stack, "grace", (workdir / "src").as_uri(), 2)
    start_run(stack, ingestion)
    probe = agents.start(stack, "probe", command=("-c", SHUTDOWN_PROBE), AUTOLOADER_SHUTDOWN_GRACE="0")
    assert probe.wait(STARTUP) == 0, probe.tail()
    lines = [line for line in probe.log().splitlines() if line.startswith("PROBE ")]
    assert lines, probe.tail()
    events = json.loads(lines[-1].removeprefix("PROBE "))
    assert set(events) == {"between_jobs", "during_poll", "poll_lease"}, events
    assert_clean_log(probe)

    problems: list[str] = []
    by_lease: dict[str, list[tuple[str, int, float]]] = {}
    for f in stack.list_files(ingestion):
        for a in attempts(stack, f.name):
            by_lease.setdefault(a.lease, []).append((f.path, a.outcome, a.end_time.ToDatetime().timestamp()))
    assert len(by_lease) == 2, by_lease
    during_poll = by_lease.pop(events["poll_lease"])
    (between_jobs,) = by_lease.values()
    between_jobs_lease = next(iter(by_lease))
    committed = committed_leases(stack, "e2e.grace")
    # 1. The batch abandoned before its Spark jobs is released at once, not after running them.
    assert {outcome for _, outcome, _ in between_jobs} == {Attempt.OUTCOME_RELEASED}, between_jobs
    assert between_jobs_lease not in committed
    released_after = max(end for _, _, end in between_jobs) - events["between_jobs"]
    # Cancelling cannot interrupt Spark's planning of a job, only the job: a few seconds in a cold JVM.
    # Without cancelling, the batch's remaining jobs ran first (10-26 s here).
    if released_after > 8.0:
        problems.append(f"the batch abandoned between Spark jobs was released only {released_after:.1f}s later")
    # 2. A batch leased after the signal is given back untouched.
    outcomes = {outcome for _, outcome, _ in during_poll}
    if outcomes != {Attempt.OUTCOME_RELEASED} or events["poll_lease"] in committed:
        problems.append(f"the batch leased during the poll was processed: outcomes {outcomes}, committed: "
                        f"{events['poll_lease'] in committed}")  # fmt: skip
    assert len(files) == 4
    assert not problems, "; ".join(problems)


# --- the agent's JVM launch and gRPC -----------------------------------------------------------

FORK_PROBE = """
import signal, subprocess, sys
import agent.main as main
from agent.config import AgentSettings

failures = []

def spark_session(settings):
    # What pyspark's launch_gateway does to start the JVM: Popen with a preexec_fn, i.e. a fork()
    # that runs Python (and gRPC's fork handlers) in the child before exec.
    for _ in range(int(sys.argv[1])):
        child = subprocess.Popen(["true"], stdin=subprocess.PIPE,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        child.stdin.close()
        if child.wait() != 0:
            failures.append(child.returncode)
    return object()

main.spark_session = spark_session
main.build_worker(AgentSettings(address="127.0.0.1:9", state_dir=sys.argv[2]))
print(len(failures), sorted(set(failures)))
"""


def test_spark_launch_is_not_broken_by_the_grpc_channel(workdir: Path) -> None:
    """The agent starts its JVM after build_worker opened the channel; every such launch must succeed.

    The JVM launch is replaced by 300 launches of `true` the way pyspark starts the JVM, so a failure
    rate of ~2% shows up in every run (and one launch costs milliseconds, not a JVM).
    """
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    probe = subprocess.run(
        [sys.executable, "-c", FORK_PROBE, "300", str(workdir)], env=env, capture_output=True, text=True, timeout=120
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    failed, codes = probe.stdout.split(maxsplit=1)
    assert int(failed) == 0, f"{failed} of 300 JVM launches died ({codes.strip()}): {probe.stderr[-1500:]}"


def test_a_control_plane_restart_shorter_than_the_ttl_costs_no_lease(
    make_plane: Callable[..., Stack], workdir: Path, database_url: str
) -> None:
    """The heartbeat waits for the control plane to come back and retries soon after a failure."""
    import threading

    from agent.heartbeat import Heartbeat
    from agent.main import control_plane_channel
    from agent.protocol import LeaseClient

    stack = make_plane(lease_ttl=timedelta(seconds=12))  # extended every 4 s
    source = workdir / "one"
    source.mkdir()
    (source / "a.json").write_text('{"id": 1}\n')
    ingestion = stack.create("restart", source.as_uri(), ingestion_pb2.Format(type=ingestion_pb2.Format.TYPE_JSON))
    start_run(stack, ingestion)
    channel = control_plane_channel(stack.plane.address)
    client = LeaseClient(channel, "hb", threading.Event(), retry_initial=0.1, retry_max=1.0)
    batch = None
    deadline = time.monotonic() + 30
    while batch is None and time.monotonic() < deadline:
        batch = client.lease(1.0, 0, 0)
    assert batch is not None
    first_expiry = batch.lease.expire_time.ToDatetime()
    try:
        with Heartbeat(client, batch.lease) as heartbeat:
            address = stack.plane.address
            stack.plane.stop(grace=0)
            # Down across two extensions (4 s, 8 s): a heartbeat that only tried every interval
            # would next try at 12 s, when the lease has expired.
            time.sleep(8.5)
            stack.plane = bootstrap.start(
                plane_settings(database_url, workdir / "state", listen_address=address, lease_ttl=timedelta(seconds=12))
            )
            time.sleep(1.5)
            # Extended while its first expiry (12 s) is still ahead: the attempt at 4 s waited for
            # the control plane, instead of failing at once and again at 8 s.
            assert heartbeat.expires > first_expiry.replace(tzinfo=UTC)
            time.sleep(3.0)  # past the first expiry
            assert not heartbeat.lost.is_set()
            assert heartbeat.still_held()
        assert client.extend(batch.lease.name).expire_time.ToDatetime() > first_expiry  # still ours
    finally:
        channel.close()
