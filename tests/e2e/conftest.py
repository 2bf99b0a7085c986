"""End-to-end fixtures: a control plane, agents with real Spark, real Iceberg tables.

One local Spark session serves every in-process agent of the test session (a
JVM start costs ~10 s); each test gets its own database (control plane state
and the Iceberg SqlCatalog) and its own warehouse directory.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.config import AgentSettings
from agent.main import build_worker
from agent.worker import Worker
from autoloader.v1 import file_pb2, file_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc, run_pb2, run_pb2_grpc
from controlplane import bootstrap
from controlplane.config import ControlPlaneSettings

Run = run_pb2.Run
TERMINAL = (Run.STATE_SUCCEEDED, Run.STATE_PARTIALLY_SUCCEEDED, Run.STATE_FAILED, Run.STATE_CANCELLED)


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    from agent.engine import spark_session

    session = spark_session(AgentSettings(spark_master="local[2]"))
    yield session
    session.stop()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Traversable by the embedded PostgreSQL's user when running as root (unlike tmp_path)."""
    path = Path(tempfile.mkdtemp(prefix="al-e2e-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def plane_settings(database_url: str, state_dir: Path, **overrides: Any) -> ControlPlaneSettings:
    values: dict[str, Any] = {
        "database_url": database_url, "state_dir": state_dir, "listen_address": "127.0.0.1:0",
        "shutdown_grace": 1.0, "health_interval": 0.2, "lease_ttl": timedelta(seconds=6),
        "finalize_sweep_interval": 0.2, "discovery_poll": 0.2, "warehouse": (state_dir.parent / "warehouse").as_uri(),
        "commit_stale_after": timedelta(seconds=3), "commit_poll": 0.2,
    }  # fmt: skip
    values.update(overrides)
    return ControlPlaneSettings(**values)


@dataclass
class Stack:
    """A control plane plus the agents started on it, and helpers to drive them."""

    plane: bootstrap.ControlPlane
    database_url: str
    workdir: Path
    spark: Any
    channel: grpc.Channel
    agents: list[tuple[Worker, threading.Thread, grpc.Channel]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ingestions = ingestion_pb2_grpc.IngestionServiceStub(self.channel)
        self.runs = run_pb2_grpc.RunServiceStub(self.channel)
        self.files = file_pb2_grpc.FileServiceStub(self.channel)

    @property
    def warehouse(self) -> str:
        return (self.workdir / "warehouse").as_uri()

    def agent_settings(self, name: str, **overrides: Any) -> AgentSettings:
        values: dict[str, Any] = {
            "address": self.plane.address, "agent_name": name, "state_dir": self.workdir / "agent",
            "lease_wait": 0.5, "shutdown_grace": 5.0, "retry_initial": 0.1,
            "retry_max": 1.0,
        }  # fmt: skip
        values.update(overrides)
        return AgentSettings(**values)

    def start_agent(self, name: str = "agent-1", **overrides: Any) -> Worker:
        """An in-process agent on the shared Spark session."""
        worker, channel = build_worker(self.agent_settings(name, **overrides), spark=self.spark)
        thread = threading.Thread(target=worker.run, name=name, daemon=True)
        thread.start()
        self.agents.append((worker, thread, channel))
        return worker

    def stop_agents(self) -> None:
        for worker, thread, channel in self.agents:
            worker.stop.set()
            thread.join(60)
            channel.close()
        self.agents.clear()

    def create(self, ingestion_id: str, source: str, fmt: ingestion_pb2.Format, **fields: Any) -> str:
        fields.setdefault("destination", ingestion_pb2.Destination(table=f"e2e.{ingestion_id.replace('-', '_')}"))
        source_fields = fields.pop("source_fields", {})
        ingestion = ingestion_pb2.Ingestion(source=ingestion_pb2.Source(uri=source, **source_fields), format=fmt,
                                            **fields)  # fmt: skip
        request = ingestion_pb2.CreateIngestionRequest(ingestion_id=ingestion_id, ingestion=ingestion)
        return str(self.ingestions.CreateIngestion(request).ingestion.name)

    def run(self, ingestion: str, timeout: float = 180.0) -> Run:
        """Starts a run and waits until it ends."""
        run = self.runs.StartRun(run_pb2.StartRunRequest(ingestion=ingestion)).run
        return self.wait(run.name, timeout)

    def wait(self, run: str, timeout: float = 180.0) -> Run:
        deadline = time.monotonic() + timeout
        while True:
            current = self.runs.GetRun(run_pb2.GetRunRequest(name=run)).run
            if current.state in TERMINAL:
                return current
            if time.monotonic() > deadline:
                raise AssertionError(f"the run did not end in {timeout}s: {current}")
            time.sleep(0.2)

    def list_files(self, ingestion: str) -> list[file_pb2.File]:
        return list(self.files.ListFiles(file_pb2.ListFilesRequest(ingestion=ingestion, page_size=1000)).files)

    def table(self, name: str) -> Any:
        """The Iceberg table as pyiceberg loads it (not through Spark), from the control plane's catalog."""
        return self.plane.tables.load(name)

    def rows(self, table: str) -> list[dict[str, Any]]:
        loaded = self.table(table)
        assert loaded is not None, f"{table} does not exist"
        return list(loaded.scan().to_arrow().to_pylist())


@contextlib.contextmanager
def stack_factory(database_url: str, workdir: Path, spark: Any) -> Iterator[Callable[..., Stack]]:
    """make(**settings) -> a control plane on this test's database; every one made is stopped at the end.

    A test may replace a stack's plane (a restart): the one in place at the end is stopped. Without
    `spark`, in-process agents cannot be started (tests whose agents are processes).
    """
    stacks: list[Stack] = []

    def make(**overrides: Any) -> Stack:
        plane = bootstrap.start(plane_settings(database_url, workdir / "state", **overrides))
        stack = Stack(plane, database_url, workdir, spark, grpc.insecure_channel(plane.address))
        stacks.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in stacks:
            stack.stop_agents()
            stack.channel.close()
            stack.plane.stop(grace=0)


@pytest.fixture
def make_stack(database_url: str, workdir: Path, spark: Any) -> Iterator[Callable[..., Stack]]:
    with stack_factory(database_url, workdir, spark) as make:
        yield make


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    return make_stack()
