"""`autoloader serve` / `demo` as processes: embedded database, signals, restarts, bad databases."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .cli import AUTOLOADER, run_cli

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "orders.yaml"
pytestmark = pytest.mark.slow


class ServerProcess:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            [*AUTOLOADER, "serve"], env=env, stdout=self._log_file, stderr=subprocess.STDOUT, text=True
        )

    def wait_address(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"action=server.start address=(\S+)", self.log.read_text())
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited {self.process.returncode}:\n{self.log.read_text()}")
            time.sleep(0.1)
        raise AssertionError(f"serve did not start:\n{self.log.read_text()}")

    def terminate(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._log_file.close()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log_file.close()


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOLOADER_")}
    env.update({f"AUTOLOADER_{k.upper()}": v for k, v in settings.items()})
    return env


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.kill()


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)


def test_serve_embedded_then_restart_reuses_data(tmp_path: Path, state_dir: Path, servers: list[ServerProcess]) -> None:
    env = _env(state_dir=str(state_dir), listen_address="127.0.0.1:0", shutdown_grace="2")
    first = ServerProcess(env, tmp_path / "first.log")
    servers.append(first)
    address = first.wait_address()
    assert _health(address) == health_pb2.HealthCheckResponse.SERVING
    assert run_cli("ingestions", "create", "-f", EXAMPLE, address=address).code == 0
    started = time.monotonic()
    assert first.terminate() == 0
    assert time.monotonic() - started < 15
    log = first.log.read_text()
    assert "action=server.drain" in log
    assert "action=server.stop" in log
    assert "Traceback" not in log

    second = ServerProcess(env, tmp_path / "second.log")
    servers.append(second)
    address = second.wait_address()
    assert "from=empty" not in second.log.read_text()  # the schema was already there
    got = run_cli("ingestions", "get", "orders", address=address)
    assert got.code == 0, got.stderr
    assert second.terminate() == 0


def test_sigint_stops_gracefully(tmp_path: Path, state_dir: Path, servers: list[ServerProcess]) -> None:
    server = ServerProcess(_env(state_dir=str(state_dir), listen_address="127.0.0.1:0"), tmp_path / "log")
    servers.append(server)
    server.wait_address()
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(30) == 0


def test_unreachable_database_is_a_clear_startup_error(tmp_path: Path) -> None:
    env = _env(database_url=f"postgresql://nobody@/nowhere?host={tmp_path}", listen_address="127.0.0.1:0")
    done = subprocess.run([*AUTOLOADER, "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot reach the database" in done.stderr
    assert "Traceback" not in done.stderr


def test_refuses_a_schema_newer_than_the_code(database_url: str) -> None:
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    env = _env(database_url=database_url, listen_address="127.0.0.1:0")
    done = subprocess.run([*AUTOLOADER, "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "9999_from_the_future" in done.stderr
    assert "newer than this autoloader" in done.stderr


def test_port_in_use_is_a_clear_startup_error(control_plane_address: str, database_url: str) -> None:
    env = _env(database_url=database_url, listen_address=control_plane_address)
    done = subprocess.run([*AUTOLOADER, "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"cannot listen on {control_plane_address}" in done.stderr


@pytest.fixture
def control_plane_address(control_plane: object) -> str:
    return control_plane.address  # type: ignore[attr-defined,no-any-return]


@pytest.mark.timeout(600)
def test_demo_runs_the_whole_job_twice_loading_only_what_is_new(state_dir: Path) -> None:
    """Sample files -> ingestion -> run -> Iceberg rows; the second demo adds one file and loads only it."""
    rows = []
    for expected in ("created ingestions/demo-orders", "found existing ingestions/demo-orders"):
        done = subprocess.run(
            [*AUTOLOADER, "demo", "--state-dir", str(state_dir)],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert expected in done.stderr
        assert "SUCCEEDED" in done.stdout
        assert "order_id" in done.stdout  # rows read back from the table
        match = re.search(r"demo\.orders: (\d+) rows", done.stderr)
        assert match, done.stderr
        rows.append(int(match.group(1)))
    assert rows == [201, 202]  # 20 sample files of 10 rows + one new 1-row file per demo


def test_module_entry_point_help() -> None:
    done = subprocess.run([sys.executable, "-m", "autoloader.cli.main", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for command in ("serve", "up", "demo", "ingestions"):
        assert command in done.stdout


def test_bad_configuration_is_bad_input_not_a_traceback() -> None:
    env = _env(discovery_stale_after="soon", listen_address="127.0.0.1:0")
    done = subprocess.run([*AUTOLOADER, "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "bad configuration: AUTOLOADER_DISCOVERY_STALE_AFTER" in done.stderr
    assert "Traceback" not in done.stderr
