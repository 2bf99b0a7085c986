"""Agents as real processes (`autoloader agent`): several at once, crashes, SIGTERM, a control plane restart.

Each agent process starts its own JVM (~10-15 s), so every test keeps to one or
two of them; they are killed (with their JVM: each runs in its own process
group) when the test ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from autoloader.v1 import file_pb2, ingestion_pb2, lease_pb2, lease_pb2_grpc, run_pb2
from controlplane import bootstrap

from .conftest import TERMINAL, Run, Stack, plane_settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(400)]

Format = ingestion_pb2.Format
Limits = ingestion_pb2.Limits
File = file_pb2.File
Attempt = file_pb2.FileAttempt
JSON = Format(type=Format.TYPE_JSON)
CREDENTIALS = {"moto": {"key": "testing", "secret": "testing"}}
SOURCE_COLUMNS = ("id", "name", "amount", "ok", "note")
JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
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
    stack: Stack
    directory: Path
    started: list[AgentProcess] = field(default_factory=list)

    def start(self, name: str, **env: str) -> AgentProcess:
        state = self.directory / name
        state.mkdir(parents=True, exist_ok=True)
        variables = {
            **os.environ,
            "AUTOLOADER_ADDRESS": self.stack.plane.address,
            "AUTOLOADER_AGENT_NAME": name,
            "AUTOLOADER_DATABASE_URL": self.stack.database_url,
            "AUTOLOADER_WAREHOUSE": self.stack.warehouse,
            "AUTOLOADER_STATE_DIR": str(state),
            "AUTOLOADER_SPARK_MASTER": "local[1]",
            "AUTOLOADER_SPARK_DRIVER_MEMORY": "1g",
            "AUTOLOADER_LEASE_WAIT": "1",
            "AUTOLOADER_RETRY_INITIAL": "0.2",
            "AUTOLOADER_RETRY_MAX": "1",
            # Test-only JVM tuning: C1 only roughly halves a short-lived JVM's start and first batches here.
            "JAVA_TOOL_OPTIONS": JVM_OPTIONS,
            # Works around the fork bug shown by test_spark_launch_is_not_broken_by_the_grpc_channel (below).
            "GRPC_ENABLE_FORK_SUPPORT": "false",
            **env,
        }
        log_path = Path("/tmp/al-logs") / f"{name}.stderr"
        log_path.parent.mkdir(exist_ok=True)  # DEBUG
        with log_path.open("wb") as stderr:
            popen = subprocess.Popen(
                [sys.executable, "-m", "autoloader.cli.main", "agent"],
                env=variables, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True,
            )  # fmt: skip
        process = AgentProcess(name, popen, log_path)
        self.started.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.started:
            process.kill()


@pytest.fixture
def agents(stack: Stack, workdir: Path) -> Iterator[AgentProcesses]:
    processes = AgentProcesses(stack, workdir / "agents")
    try:
        yield processes
    finally:
        processes.kill_all()


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
    from pyiceberg.exceptions import NoSuchTableError

    try:
        return {r["_source_file"] for r in stack.rows(table)}
    except NoSuchTableError:
        return None


def assert_clean_log(process: AgentProcess) -> None:
    assert "Traceback" not in process.log(), process.tail(200)


# --- moto S3 -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_environment(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> None:
    """Credentials come only from settings (inherited by agent processes), never the developer's AWS setup."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(workdir / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(workdir / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


# --- tests -------------------------------------------------------------------------------------


def test_two_agent_processes_load_local_and_s3_files_exactly_once(
    make_stack: Callable[..., Stack], workdir: Path, moto_endpoint: str, aws_environment: None
) -> None:
    stack = make_stack(credentials=CREDENTIALS)
    processes = AgentProcesses(stack, workdir / "agents")
    try:
        rng = random.Random(7)
        sizes = [1, 2000, *(rng.choice([rng.randint(1, 20), rng.randint(100, 2000)]) for _ in range(198))]
        local = write_files(workdir / "local", sizes[:100], seed=1)

        s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
        bucket = f"al-{uuid.uuid4().hex[:12]}"
        s3.create_bucket(Bucket=bucket)
        remote_rows = write_files(workdir / "s3-source", sizes[100:], seed=2)
        remote: dict[str, list[dict[str, Any]]] = {}
        uploads: list[tuple[str, bytes]] = []
        for uri, rows in remote_rows.items():
            key = f"prefix/{uri.rpartition('/')[2]}"
            remote[f"s3://{bucket}/{key}"] = rows
            uploads.append((key, jsonl(rows)))
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), uploads))

        local_ingestion = create(stack, "local-files", (workdir / "local").as_uri(), 15)
        s3_ingestion = create(stack, "s3-files", f"s3://{bucket}/prefix", 15, credentials_ref="moto",
                              options={"endpoint_url": moto_endpoint})  # fmt: skip
        p1 = processes.start("p1", AUTOLOADER_CREDENTIALS=json.dumps(CREDENTIALS))
        p2 = processes.start("p2", AUTOLOADER_CREDENTIALS=json.dumps(CREDENTIALS))
        runs = {start_run(stack, local_ingestion): local, start_run(stack, s3_ingestion): remote}

        def ended() -> bool:
            return all(get_run(stack, run).state in TERMINAL for run in runs)

        wait_until(ended, 240, "both runs to end", p1, p2)
        for run, files in runs.items():
            final = get_run(stack, run)
            assert final.state == Run.STATE_SUCCEEDED, (final, p1.tail(), p2.tail())
            assert final.file_counts.succeeded == final.file_counts.total == 100
            assert final.records == sum(len(rows) for rows in files.values())
        assert_table_equals_source(stack, "e2e.local_files", local)
        assert_table_equals_source(stack, "e2e.s3_files", remote)

        # Both processes did work: every file succeeded once, and each agent loaded some of them.
        workers: Counter[str] = Counter()
        for ingestion in (local_ingestion, s3_ingestion):
            for path, tries in history(stack, ingestion).items():
                assert [outcome for _, outcome in tries] == [Attempt.OUTCOME_SUCCEEDED], (path, tries)
                workers[tries[0][0]] += 1
        assert set(workers) == {p1.agent, p2.agent}, workers
        assert set(list_agents(stack)) >= {p1.agent, p2.agent}
        assert p1.running(), p1.tail()
        assert p2.running(), p2.tail()
        assert_clean_log(p1)
        assert_clean_log(p2)
    finally:
        processes.kill_all()


def test_crash_after_commit_before_report_is_reloaded_without_duplicates(
    stack: Stack, agents: AgentProcesses, workdir: Path
) -> None:
    files = write_files(workdir / "src", [300, 1, 1200, 50, 800, 7, 400, 999, 20, 650], seed=3)
    ingestion = create(stack, "after-commit", (workdir / "src").as_uri(), 4)
    crasher = agents.start("crasher", AUTOLOADER_TEST_FAULT="crash_after_commit")
    run = start_run(stack, ingestion)
    assert crasher.wait(STARTUP) == 17, crasher.tail()
    assert "test fault: exiting at crash_after_commit" in crasher.log()

    # The crashed batch is in the table, and its files are still leased (never reported).
    committed = table_files(stack, "e2e.after_commit")
    assert committed, "the crashing agent committed nothing"
    assert len(committed) <= 4
    assert_table_equals_source(stack, "e2e.after_commit", {uri: files[uri] for uri in committed})
    leased = {f.path for f in stack.list_files(ingestion) if f.state == File.STATE_LEASED}
    assert leased == committed

    stack.start_agent("rescuer")
    final = stack.wait(run, timeout=120)
    assert final.state == Run.STATE_SUCCEEDED, final
    assert final.file_counts.succeeded == 10
    assert_table_equals_source(stack, "e2e.after_commit", files)
    for path, tries in history(stack, ingestion).items():
        if path in committed:
            assert tries == [
                (crasher.agent, Attempt.OUTCOME_LEASE_EXPIRED),
                ("agents/rescuer", Attempt.OUTCOME_SUCCEEDED),
            ], path
        else:
            assert tries == [("agents/rescuer", Attempt.OUTCOME_SUCCEEDED)], path
    by_path = {f.path: f for f in stack.list_files(ingestion)}
    assert {by_path[uri].lease_expiries for uri in committed} == {1}
    assert all(by_path[uri].records == len(rows) for uri, rows in files.items())


def test_crash_before_commit_leaves_nothing_and_is_reloaded(
    stack: Stack, agents: AgentProcesses, workdir: Path
) -> None:
    files = write_files(workdir / "src", [500, 3, 1500, 40, 777, 1, 250, 1000], seed=4)
    ingestion = create(stack, "before-commit", (workdir / "src").as_uri(), 4)
    crasher = agents.start("crasher", AUTOLOADER_TEST_FAULT="crash_before_commit")
    run = start_run(stack, ingestion)
    assert crasher.wait(STARTUP) == 17, crasher.tail()
    assert "test fault: exiting at crash_before_commit" in crasher.log()
    # The first batch would have created the table: it does not exist.
    assert table_files(stack, "e2e.before_commit") is None
    leased = {f.path for f in stack.list_files(ingestion) if f.state == File.STATE_LEASED}
    assert 1 <= len(leased) <= 4

    stack.start_agent("rescuer")
    final = stack.wait(run, timeout=120)
    assert final.state == Run.STATE_SUCCEEDED, final
    assert_table_equals_source(stack, "e2e.before_commit", files)
    for path, tries in history(stack, ingestion).items():
        expected = [("agents/rescuer", Attempt.OUTCOME_SUCCEEDED)]
        if path in leased:
            expected.insert(0, (crasher.agent, Attempt.OUTCOME_LEASE_EXPIRED))
        assert tries == expected, path
    # Only committed snapshots reference data files: the crashed batch's staged Parquet is not in the table.
    table = stack.table("e2e.before_commit")
    assert all(s.summary["autoloader.lease"].startswith("leases/") for s in table.snapshots())


def test_sigterm_mid_batch_releases_or_finishes_the_batch_and_exits_cleanly(
    stack: Stack, agents: AgentProcesses, workdir: Path
) -> None:
    # Big files, two per lease: a batch takes several seconds on local[1].
    files = write_files(workdir / "src", [60_000] * 8, seed=5)
    ingestion = create(stack, "sigterm", (workdir / "src").as_uri(), 2)
    impatient = agents.start("impatient", AUTOLOADER_SHUTDOWN_GRACE="0")
    patient = agents.start("patient", AUTOLOADER_SHUTDOWN_GRACE="120")
    run = start_run(stack, ingestion)
    wait_until(lambda: holds_lease(stack, impatient) and holds_lease(stack, patient), STARTUP,
               "both agents to hold a lease", impatient, patient)  # fmt: skip
    time.sleep(1.0)  # well into the batches (each takes several seconds)
    signalled = time.time()
    impatient.popen.send_signal(signal.SIGTERM)
    patient.popen.send_signal(signal.SIGTERM)
    assert impatient.wait(45) == 0, impatient.tail()
    impatient_exit = time.time() - signalled
    assert patient.wait(90) == 0, patient.tail()
    assert "batch abandoned on shutdown" in impatient.log(), impatient.tail()
    assert "batch abandoned" not in patient.log(), patient.tail()

    # The abandoned batch went back to PENDING without spending an attempt; the finished one was reported.
    by_path = {f.path: f for f in stack.list_files(ingestion)}
    released = {
        p for p, tries in history(stack, ingestion).items() if (impatient.agent, Attempt.OUTCOME_RELEASED) in tries
    }
    finished = {
        p for p, tries in history(stack, ingestion).items() if (patient.agent, Attempt.OUTCOME_SUCCEEDED) in tries
    }
    assert released, impatient.tail()
    assert finished, patient.tail()
    for path, tries in history(stack, ingestion).items():
        assert Attempt.OUTCOME_LEASE_EXPIRED not in [o for _, o in tries], (path, tries)
        assert all(agent == patient.agent for agent, o in tries if o == Attempt.OUTCOME_SUCCEEDED), (path, tries)
        assert all(agent == impatient.agent for agent, o in tries if o == Attempt.OUTCOME_RELEASED), (path, tries)
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
    # Without grace the agent does not wait for its batch.
    assert impatient_exit < 30, impatient_exit
    assert_table_equals_source(stack, "e2e.sigterm", {p: files[p] for p in finished})
    assert_clean_log(impatient)
    assert_clean_log(patient)

    stack.start_agent("finisher")
    final = stack.wait(run, timeout=180)
    assert final.state == Run.STATE_SUCCEEDED, final
    assert_table_equals_source(stack, "e2e.sigterm", files)
    for path in released:
        assert attempts(stack, by_path[path].name)[-1].agent == "agents/finisher"


def test_agent_process_survives_a_control_plane_restart(
    stack: Stack, agents: AgentProcesses, workdir: Path, database_url: str
) -> None:
    files = write_files(workdir / "src", [2000, 1500, 1, 1800, 900, 2000, 30, 1200] * 3, seed=6)
    ingestion = create(stack, "restart", (workdir / "src").as_uri(), 3)
    agent = agents.start("survivor")
    run = start_run(stack, ingestion)

    def some_done() -> bool:
        return get_run(stack, run).file_counts.succeeded >= 3

    wait_until(some_done, STARTUP, "the first batches", agent)
    before = get_run(stack, run)
    assert before.state == Run.STATE_RUNNING, before
    address = stack.plane.address
    stack.plane.stop(grace=0)
    time.sleep(2.5)
    assert agent.running(), agent.tail()
    stack.plane = bootstrap.start(plane_settings(database_url, workdir / "state", listen_address=address))
    assert stack.plane.address == address

    final = stack.wait(run, timeout=180)
    assert final.state == Run.STATE_SUCCEEDED, (final, agent.tail())
    assert final.file_counts.succeeded == len(files)
    assert_table_equals_source(stack, "e2e.restart", files)
    assert agent.running(), agent.tail()
    log = agent.log()
    assert "control plane unavailable" in log or "could not extend" in log, agent.tail()
    assert_clean_log(agent)
    for path, tries in history(stack, ingestion).items():
        assert {a for a, _ in tries} == {agent.agent}, (path, tries)
        assert tries[-1][1] == Attempt.OUTCOME_SUCCEEDED, (path, tries)
