"""Structural rules (DESIGN.md "Transactions", STYLE.md 1, 2, 14), checked on the source tree."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("controlplane", "agent", "autoloader")
FORBIDDEN_IN_DOMAIN = ("sqlalchemy", "grpc")

_TRANSACTION_CALL = re.compile(r"\.\s*(commit|rollback)\s*\(")


def transaction_calls(source: str) -> list[tuple[int, str]]:
    """(line number, line) of every `.commit(` / `.rollback(` in source, comments and strings included."""
    return [
        (number, line.strip())
        for number, line in enumerate(source.splitlines(), start=1)
        if _TRANSACTION_CALL.search(line)
    ]


def repository_modules() -> list[Path]:
    return sorted(
        path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "repositor" in path.relative_to(ROOT).as_posix().lower()
    )


def forbidden_imports(source: str, forbidden: tuple[str, ...] = FORBIDDEN_IN_DOMAIN) -> list[str]:
    """Absolute imports of the forbidden top-level packages (or their grpc_* relatives) in source."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if any(top == f or top.startswith(f + "_") for f in forbidden):
                found.append(name)
    return found


# --- repositories never commit or roll back --------------------------------------------------------------------------


def test_repository_modules_are_found() -> None:
    found = {p.relative_to(ROOT).as_posix() for p in repository_modules()}
    assert "controlplane/adapters/repositories.py" in found


@pytest.mark.parametrize("path", repository_modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_repositories_never_commit_or_roll_back(path: Path) -> None:
    assert transaction_calls(path.read_text()) == []


@pytest.mark.parametrize(
    "source",
    [
        "session.commit()",
        "self._session.rollback()",
        "def f(s):\n    x = 1\n    s.commit ()\n",
        "conn . rollback()",
        "self._session.commit(  )  # oops",
    ],
)
def test_transaction_scanner_detects_calls(source: str) -> None:
    assert transaction_calls(source) != []


def test_transaction_scanner_reports_the_line() -> None:
    source = "a = 1\nb = 2\nsession.commit()\n"
    assert transaction_calls(source) == [(3, "session.commit()")]


@pytest.mark.parametrize(
    "source", ["commit_once(uow)", "self.committed = True", "def commit(self) -> None: ...", "session.flush()"]
)
def test_transaction_scanner_ignores_look_alikes(source: str) -> None:
    assert transaction_calls(source) == []


# --- the domain imports neither SQLAlchemy nor grpc ---------------------------------------------------------------


DOMAIN_MODULES = sorted((ROOT / "controlplane" / "domain").rglob("*.py"))


def test_domain_modules_are_found() -> None:
    names = {p.name for p in DOMAIN_MODULES}
    assert {"errors.py", "ingestion.py", "validation.py", "masks.py", "paging.py"} <= names


@pytest.mark.parametrize("path", DOMAIN_MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_domain_does_not_import_sqlalchemy_or_grpc(path: Path) -> None:
    assert forbidden_imports(path.read_text()) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import sqlalchemy", ["sqlalchemy"]),
        ("import sqlalchemy.orm as orm", ["sqlalchemy.orm"]),
        ("from sqlalchemy import select", ["sqlalchemy"]),
        ("from sqlalchemy.orm import Session", ["sqlalchemy.orm"]),
        ("import os, grpc", ["grpc"]),
        ("from grpc_status import rpc_status", ["grpc_status"]),
        ("def f():\n    import grpc\n", ["grpc"]),
        ("if TYPE_CHECKING:\n    from sqlalchemy import Engine\n", ["sqlalchemy"]),
        ("import grpcio_like_but_not", []),
        ("from . import sqlalchemy", []),
        ("import sqlalchemy_utils", ["sqlalchemy_utils"]),
        ("from controlplane.domain import errors", []),
    ],
)
def test_import_scanner(source: str, expected: list[str]) -> None:
    assert forbidden_imports(source) == expected


AGENT_MODULES = sorted((ROOT / "agent").rglob("*.py"))
# An agent talks to the control plane over gRPC and to storage; never to its database or catalog.
FORBIDDEN_IN_AGENT = ("controlplane", "sqlalchemy", "psycopg", "alembic")


def test_agent_modules_are_found() -> None:
    assert {"worker.py", "stage.py", "errors.py", "protocol.py"} <= {p.name for p in AGENT_MODULES}


@pytest.mark.parametrize("path", AGENT_MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_agent_imports_neither_the_control_plane_nor_a_database(path: Path) -> None:
    assert forbidden_imports(path.read_text(), FORBIDDEN_IN_AGENT) == []


def test_the_agent_opens_no_catalog() -> None:
    """pyiceberg's types and transforms are fine (bucket partitioning); its catalogs are the control plane's."""
    for path in AGENT_MODULES:
        source = path.read_text()
        assert "pyiceberg.catalog" not in source, path
        assert "load_catalog" not in source, path


def test_importing_the_agent_loads_no_control_plane_module() -> None:
    code = textwrap.dedent(
        """
        import sys
        import agent.main, agent.worker, agent.stage
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("controlplane", "sqlalchemy", "psycopg")))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_importing_the_domain_loads_neither_sqlalchemy_nor_grpc() -> None:
    """Transitively too: no domain module may pull them in through another package."""
    modules = [f"controlplane.domain.{p.stem}" for p in DOMAIN_MODULES if p.stem != "__init__"]
    code = textwrap.dedent(
        f"""
        import importlib, sys
        for name in {modules!r}:
            importlib.import_module(name)
        print(sorted({{m.split(".")[0] for m in sys.modules if m.split(".")[0].startswith(("sqlalchemy", "grpc"))}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- importing bootstrap connects to nothing and starts nothing ----------------------------------------------------

_IMPORT_PROBE = """
import json, os, socket, sys, threading

# Heavy third-party packages first: their own import-time behaviour is not bootstrap's doing.
import grpc, psycopg, sqlalchemy  # noqa: F401

connections = []
_connect = socket.socket.connect
def recording_connect(self, address):
    connections.append(repr(address))
    return _connect(self, address)
socket.socket.connect = recording_connect
_pg_connect = psycopg.connect
def recording_pg_connect(*args, **kwargs):
    connections.append("psycopg.connect")
    return _pg_connect(*args, **kwargs)
psycopg.connect = recording_pg_connect
_pg_class_connect = psycopg.Connection.connect.__func__
def recording_pg_class_connect(cls, *args, **kwargs):
    connections.append("psycopg.Connection.connect")
    return _pg_class_connect(cls, *args, **kwargs)
psycopg.Connection.connect = classmethod(recording_pg_class_connect)

def os_threads():
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else -1

threads_before = {t.ident for t in threading.enumerate()}
os_threads_before = os_threads()

import controlplane.bootstrap  # noqa: E402,F401

print(json.dumps({
    "connections": connections,
    "new_threads": [t.name for t in threading.enumerate() if t.ident not in threads_before],
    "os_threads_before": os_threads_before,
    "os_threads_after": os_threads(),
    "state_dir_exists": os.path.exists(os.environ["AUTOLOADER_STATE_DIR"]),
}))
"""


def test_importing_bootstrap_connects_to_nothing_and_starts_no_threads(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOLOADER_")}
    # TEST-NET-3 (RFC 5737): a connection attempt would hang until the timeout instead of failing fast.
    env["AUTOLOADER_DATABASE_URL"] = "postgresql://nobody:secret@203.0.113.1:5432/nowhere"
    env["AUTOLOADER_STATE_DIR"] = str(tmp_path / "state")
    env["AUTOLOADER_LISTEN_ADDRESS"] = "127.0.0.1:1"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["connections"] == []
    assert report["new_threads"] == []
    assert report["os_threads_after"] == report["os_threads_before"]
    assert report["state_dir_exists"] is False
    assert elapsed < 20, f"importing bootstrap took {elapsed:.1f}s"
