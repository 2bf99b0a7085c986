"""An agent process on Spark Connect (AUTOLOADER_SPARK_REMOTE) against a local Spark Connect server.

The server is the installed pyspark's own (sbin/start-connect-server.sh, local[1],
a free loopback port); it daemonizes, so it is stopped by the pid it writes. The
agent process then runs no JVM of its own: Spark work happens in the server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from autoloader.v1 import file_pb2
from controlplane import bootstrap

from .conftest import TERMINAL, Run, Stack, plane_settings
from .test_agent_processes import (
    JSON,
    JVM_OPTIONS,
    AgentProcesses,
    Limits,
    assert_clean_log,
    assert_table_equals_source,
    get_run,
    history,
    start_run,
    wait_until,
    write_files,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(400)]

START_TIMEOUT = 120.0


@dataclass
class ConnectServer:
    url: str
    logs: Path

    def log(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-6000:]}" for p in self.logs.glob("*.out"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def connect_server() -> Iterator[ConnectServer]:
    import pyspark

    home = Path(pyspark.__file__).parent
    logs = Path(tempfile.mkdtemp(prefix="al-connect-"))
    port = free_port()
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOG_DIR": str(logs), "SPARK_PID_DIR": str(logs),
           "SPARK_IDENT_STRING": f"al{port}", "JAVA_TOOL_OPTIONS": JVM_OPTIONS}  # fmt: skip
    command = [
        "bash", str(home / "sbin" / "start-connect-server.sh"), "--master", "local[1]",
        "--conf", f"spark.connect.grpc.binding.port={port}", "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
        "--conf", "spark.ui.enabled=false",
    ]  # fmt: skip
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    server = ConnectServer(f"sc://127.0.0.1:{port}", logs)
    pid_files = list(logs.glob("*.pid"))
    pid = int(pid_files[0].read_text().strip()) if pid_files else None
    try:
        assert started.returncode == 0, f"blocked: {started.stdout}{started.stderr}{server.log()}"
        assert pid is not None, f"blocked: no pid file\n{started.stdout}{started.stderr}{server.log()}"
        deadline = time.monotonic() + START_TIMEOUT
        while not accepts(port):
            assert alive(pid), f"blocked: the Spark Connect server exited\n{server.log()}"
            assert time.monotonic() < deadline, f"blocked: no Spark Connect server on {port}\n{server.log()}"
            time.sleep(0.5)
        yield server
    finally:
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(logs, ignore_errors=True)


@pytest.fixture
def plane_stack(database_url: str, workdir: Path) -> Iterator[Stack]:
    """A control plane without the in-process Spark session (this module needs none)."""
    plane = bootstrap.start(plane_settings(database_url, workdir / "state"))
    channel = grpc.insecure_channel(plane.address)
    try:
        yield Stack(plane, database_url, workdir, None, channel)
    finally:
        channel.close()
        plane.stop(grace=0)


def test_agent_process_on_spark_connect_loads_files_exactly_once(
    connect_server: ConnectServer, plane_stack: Stack, workdir: Path
) -> None:
    stack = plane_stack
    files = write_files(workdir / "src", [1, 1500, 40, 900, 7, 2000, 300, 10, 1200, 64] * 2, seed=11)
    # One attempt per file and small leases: a failing file is reported (and fails the test) within seconds,
    # not after retries with backoff and a long split of its batch.
    ingestion = stack.create(
        "connect", (workdir / "src").as_uri(), JSON, source_fields={"glob": "*.json"},
        limits=Limits(max_files_per_lease=5, max_attempts=1),
    )  # fmt: skip
    processes = AgentProcesses(workdir / "agents")
    try:
        agent = processes.start(stack, "remote", AUTOLOADER_SPARK_REMOTE=connect_server.url)
        run = start_run(stack, ingestion)

        def ended_or_failing() -> bool:
            current = get_run(stack, run)
            counts = current.file_counts
            errors = [e.error for e in current.first_errors]
            assert counts.failed == counts.quarantined == 0, f"files failed: {errors}\n{agent.tail(20)}"
            return current.state in TERMINAL

        wait_until(ended_or_failing, 180, "the run to end", agent)
        final = get_run(stack, run)
        assert final.state == Run.STATE_SUCCEEDED, (final, agent.tail(), connect_server.log())
        assert final.file_counts.succeeded == 20
        assert final.records == sum(len(rows) for rows in files.values())
        assert_table_equals_source(stack, "e2e.connect", files)
        succeeded = (agent.agent, file_pb2.FileAttempt.OUTCOME_SUCCEEDED)
        assert {tuple(t) for t in history(stack, ingestion).values()} == {(succeeded,)}
        assert agent.running(), agent.tail()
        assert_clean_log(agent)
        # The agent ran no JVM of its own: it started no Spark driver (whose banner a local session prints).
        assert "log4j" not in agent.log(), agent.tail()
        rows = stack.rows("e2e.connect")
        assert all(r["_ingested_at"] is not None and r["_source_modified_at"] is not None for r in rows)
    finally:
        processes.kill_all()
