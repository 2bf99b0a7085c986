"""An agent outlives outages: started before its control plane, or while the database is down, it waits and retries.

The agent's LeaseService client (agent.protocol) against a real control plane;
no Spark needed. Nothing it does can fail on a database error of its own: it has
no database.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from sqlalchemy import Engine, make_url, text

from agent.main import control_plane_channel
from agent.protocol import Batch, LeaseClient
from autoloader.v1 import ingestion_pb2
from controlplane import bootstrap
from controlplane.config import ControlPlaneSettings

from .test_leasing import Api

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def control_plane(database_url: str, engine: Engine, tmp_path: Path, address: str = "127.0.0.1:0") -> Iterator[Api]:
    plane = bootstrap.start(
        ControlPlaneSettings(database_url=database_url, listen_address=address, state_dir=tmp_path / "state",
                             shutdown_grace=0.5, health_interval=0.5)
    )  # fmt: skip
    channel = grpc.insecure_channel(plane.address)
    try:
        yield Api(plane.address, channel, engine, tmp_path / "src")
    finally:
        channel.close()
        plane.stop(grace=0)


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def lease_in_thread(client: LeaseClient) -> tuple[threading.Thread, list[Batch | None], list[BaseException]]:
    batches: list[Batch | None] = []
    errors: list[BaseException] = []

    def lease() -> None:
        try:
            batches.append(client.lease(wait=1))
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=lease, daemon=True)
    thread.start()
    return thread, batches, errors


@pytest.fixture
def admin(postgres_url: str) -> Iterator[psycopg.Connection]:
    url = make_url(postgres_url).set(database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as conn:
        yield conn


def test_an_agent_started_while_the_database_is_down_waits_and_then_leases(
    database_url: str, engine: Engine, tmp_path: Path, admin: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    name = make_url(database_url).database
    with control_plane(database_url, engine, tmp_path) as api:
        api.running("outage", 2)
        stop = threading.Event()
        channel = control_plane_channel(api.address)
        client = LeaseClient(channel, "patient", stop, retry_initial=0.05, retry_max=0.2)
        # The database goes away: no new connections, and the pool's are cut.
        admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            with caplog.at_level(logging.WARNING, logger="agent.protocol"):
                thread, batches, errors = lease_in_thread(client)
                thread.join(3)
                assert thread.is_alive(), (batches, errors)  # still waiting, not failed
                assert not errors
                retries = [r for r in caplog.records if getattr(r, "action", "") == "agent.retry"]
                assert retries, "the agent did not log its retries"
                assert all("UNAVAILABLE" in r.getMessage() for r in retries)
        finally:
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        thread.join(30)
        assert not errors, errors
        assert batches[0] is not None
        assert len(batches[0].files) == 2
        channel.close()


def test_an_agent_started_before_its_control_plane_waits_for_it(
    database_url: str, engine: Engine, tmp_path: Path
) -> None:
    address = free_address()
    stop = threading.Event()
    channel = control_plane_channel(address)
    client = LeaseClient(channel, "early", stop, retry_initial=0.05, retry_max=0.2)
    thread, batches, errors = lease_in_thread(client)
    thread.join(2)
    assert thread.is_alive()
    assert not errors
    with control_plane(database_url, engine, tmp_path, address) as api:
        api.running("late", 3)
        thread.join(30)
        assert not errors, errors
        assert batches
        assert batches[0] is not None
        assert len(batches[0].files) == 3
    channel.close()


def test_an_agent_receives_a_lease_larger_than_grpcs_default_message_limit(
    database_url: str, engine: Engine, tmp_path: Path
) -> None:
    """2,500 files with 2 KB object keys make a 5 MB LeaseFiles answer; gRPC refuses more than 4 MB by default.

    A refused answer would be a lease granted and never delivered, retried (RESOURCE_EXHAUSTED) until it expires.
    """
    with control_plane(database_url, engine, tmp_path) as api:
        api.running("wide", 1, limits=ingestion_pb2.Limits(max_files_per_lease=5000))  # a run with a file stays open
        api.add_rows("wide", 2500)
        with engine.begin() as conn:
            conn.execute(text("UPDATE files SET path = path || '/' || repeat('k', 2000)"))
        channel = control_plane_channel(api.address)
        try:
            batch = LeaseClient(channel, "wide-agent", threading.Event()).lease(0, 5000)
        finally:
            channel.close()
    assert batch is not None
    assert len(batch.files) == 2501
    assert sum(len(f.path) for f in batch.files) > 5_000_000
