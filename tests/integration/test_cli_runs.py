"""`autoloader runs ...` and `autoloader files ...` against a real control plane, in a subprocess.

Sources are local directories (file://); no agent runs, so discovered files stay PENDING.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from autoloader.client import Client
from autoloader.v1 import ingestion_pb2 as pb
from autoloader.v1 import run_pb2
from controlplane.bootstrap import ControlPlane

from .cli import AUTOLOADER, run_cli

UNKNOWN_RUN = "ingestions/orders/runs/20200101-000000-000abcd"


@pytest.fixture
def address(control_plane: ControlPlane) -> str:
    return control_plane.address


def make_ingestion(address: str, tmp_path: Path, ingestion_id: str, files: int) -> Path:
    """An ingestion over a new directory holding `files` JSON files (a-1.json, ..., the last one b-N.json).

    Made with the SDK in-process: every CLI call costs a second of interpreter start-up.
    """
    source = tmp_path / ingestion_id
    source.mkdir()
    for i in range(1, files + 1):
        prefix = "b" if i == files and files > 1 else "a"
        (source / f"{prefix}-{i}.json").write_text(json.dumps({"id": i}) + "\n")
    spec = pb.Ingestion(
        source=pb.Source(uri=f"file://{source}", glob="*.json"),
        format=pb.Format(type=pb.Format.TYPE_JSON),
        destination=pb.Destination(table=f"raw.{ingestion_id}"),
    )
    with Client(address) as client:
        client.create_ingestion(spec, ingestion_id)
    return source


def start_running(address: str, ingestion: str) -> str:
    """Starts a run (SDK) and waits until discovery is done; returns its name."""
    with Client(address) as client:
        name = client.start_run(ingestion).name
    wait_for_state(address, name, run_pb2.Run.STATE_RUNNING)
    return name


def cli_json(address: str, *args: str) -> Any:
    result = run_cli("-o", "json", *args, address=address)
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def wait_for_state(address: str, run: str, state: int, timeout: float = 15) -> run_pb2.Run:
    """Polls the run (in-process, fast) until it reaches `state`."""
    deadline = time.monotonic() + timeout
    with Client(address) as client:
        while True:
            current = client.get_run(run)
            if current.state == state:
                return current
            assert time.monotonic() < deadline, f"{run} still {run_pb2.Run.State.Name(current.state)}"
            time.sleep(0.05)


def test_start_watch_on_empty_directory_succeeds(address: str, tmp_path: Path) -> None:
    make_ingestion(address, tmp_path, "empty", files=0)
    started = run_cli("-o", "json", "runs", "start", "empty", "--watch", address=address)
    assert started.code == 0, started.stderr
    run = json.loads(started.stdout)
    assert run["state"] == "STATE_SUCCEEDED"
    assert run["trigger"] == "TRIGGER_MANUAL"
    assert run["name"].startswith("ingestions/empty/runs/")
    assert "endTime" in run
    assert f"started {run['name']}" in started.stderr
    assert f"{run['name']}: SUCCEEDED, 0/0 files" in started.stderr  # plain progress: stderr is not a terminal

    # A finished run: watch prints it at once; exit 0 because it succeeded.
    short = run["name"].removeprefix("ingestions/")
    watched = run_cli("runs", "watch", short, address=address)
    assert watched.code == 0, watched.stderr
    assert "SUCCEEDED" in watched.stdout

    table = run_cli("runs", "list", "empty", address=address)
    assert table.code == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "STATE", "TRIGGER", "FILES", "RECORDS", "STARTED", "ENDED"]
    assert row.split()[:5] == [run["name"].rsplit("/", 1)[-1], "SUCCEEDED", "MANUAL", "0/0", "0"]


def test_run_lifecycle_start_list_cancel_retry(address: str, tmp_path: Path) -> None:
    source = make_ingestion(address, tmp_path, "orders", files=3)
    first = cli_json(address, "runs", "start", "orders", "--request-id", "start-1")
    name = first["name"]
    assert first["state"] in ("STATE_DISCOVERING", "STATE_RUNNING")
    wait_for_state(address, name, run_pb2.Run.STATE_RUNNING)
    # The same request id returns the first run instead of failing with RUN_IN_PROGRESS.
    assert cli_json(address, "runs", "start", "orders", "--request-id", "start-1")["name"] == name

    got = cli_json(address, "runs", "get", name.removeprefix("ingestions/"))
    assert got["name"] == name
    assert got["state"] == "STATE_RUNNING"
    assert got["fileCounts"]["total"] == got["fileCounts"]["pending"] == "3"  # int64: a string in proto3 JSON
    listed = cli_json(address, "runs", "list", "ingestions/orders")["runs"]
    assert [r["name"] for r in listed] == [name]

    files = cli_json(address, "files", "list", "orders")["files"]
    assert sorted(f["path"] for f in files) == [f"file://{source}/{p}" for p in ("a-1.json", "a-2.json", "b-3.json")]
    assert {f["state"] for f in files} == {"STATE_PENDING"}
    assert {f["run"] for f in files} == {name}
    assert len(cli_json(address, "files", "list", "orders", "--prefix", "a-")["files"]) == 2  # relative to the source
    by_run = cli_json(address, "files", "list", "orders", "--state", "PENDING", "--run", name.rsplit("/", 1)[-1])
    assert len(by_run["files"]) == 3

    table = run_cli("files", "list", "orders", "--prefix", f"file://{source}/b", address=address)
    assert table.code == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == ["ID", "STATE", "SIZE", "MODIFIED", "ATTEMPTS", "PATH", "ERROR"]
    assert row.split()[1:4] == ["PENDING", "10", "B"]
    assert row.split()[-2:] == [f"file://{source}/b-3.json", "-"]

    busy = run_cli("runs", "start", "orders", address=address)
    assert busy.code == 1
    assert "RUN_IN_PROGRESS" in busy.stderr
    assert name in busy.stderr

    cancelled = cli_json(address, "runs", "cancel", name)
    assert cancelled["state"] == "STATE_CANCELLED"
    assert cancelled["fileCounts"]["skipped"] == "3"
    skipped = cli_json(address, "files", "list", "orders", "--state", "failed", "--state", "skipped")["files"]
    assert len(skipped) == 3
    watched = run_cli("-o", "json", "runs", "watch", name, address=address)
    assert watched.code == 1  # a run that did not succeed
    assert json.loads(watched.stdout)["state"] == "STATE_CANCELLED"
    assert "ended CANCELLED" in watched.stderr

    retried = run_cli("files", "retry", "orders", "--state", "skipped", address=address)
    assert retried.code == 0, retried.stderr
    assert retried.stdout.startswith("queued 3 files in ingestions/orders/runs/")
    second = retried.stdout.split()[-1]
    assert second != name
    again = cli_json(address, "runs", "get", second)
    assert again["trigger"] == "TRIGGER_RETRY"
    assert again["state"] == "STATE_RUNNING"
    assert again["fileCounts"]["pending"] == "3"
    only_running = cli_json(address, "runs", "list", "orders", "--state", "running", "--state", "discovering")
    assert [r["name"] for r in only_running["runs"]] == [second]

    file_id = files[0]["name"].rsplit("/", 1)[-1]
    assert cli_json(address, "files", "attempts", f"orders/files/{file_id}") == {"attempts": []}


def test_retry_chosen_files_by_id_and_path(address: str, tmp_path: Path) -> None:
    make_ingestion(address, tmp_path, "picked", files=3)
    run = start_running(address, "picked")
    with Client(address) as client:
        client.cancel_run(run)
        files = {f.path.rsplit("/", 1)[-1]: f.name for f in client.list_files("picked", page_size=1)}  # 3 pages

    assert len(files) == 3
    file_id = files["a-1.json"].rsplit("/", 1)[-1]
    result = cli_json(address, "files", "retry", "picked", "--path", file_id, "--path", "b-3.json")
    assert result["filesQueued"] == "2"
    with Client(address) as client:
        queued = [f.name for f in client.list_files("picked", states=["pending"], run=result["run"])]
        runs = [r.name for r in client.list_runs("picked", page_size=1)]
    assert sorted(queued) == sorted([files["a-1.json"], files["b-3.json"]])
    assert runs == [result["run"], run]

    missing = run_cli("files", "retry", "picked", "--path", "nope.json", address=address)
    assert missing.code == 1
    assert "no file" in missing.stderr
    future = run_cli("files", "retry", "picked", "--state", "skipped", "--modified-after", "2999-01-01T00:00:00Z",
                     address=address)  # fmt: skip
    assert future.code == 0, future.stderr
    assert future.stdout.strip() == "nothing to retry"


BAD_COMMANDS = [
    (("runs", "get", "nonsense"), 2, "not a run name"),
    (("runs", "watch", "orders/runs/x"), 2, "not a run name"),
    (("files", "attempts", "orders/files/abc"), 2, "not a file name"),
    (("files", "list", "orders", "--state", "bogus"), 2, "bogus"),
    (("files", "retry", "orders", "--modified-after", "yesterday"), 2, "not an ISO 8601 time"),
    (("runs", "get", UNKNOWN_RUN), 1, "NOT_FOUND"),
    (("runs", "watch", UNKNOWN_RUN.removeprefix("ingestions/")), 1, "NOT_FOUND"),
    (("files", "attempts", "orders/files/999"), 1, "NOT_FOUND"),
]


def test_bad_names_exit_2_unknown_resources_exit_1(address: str, tmp_path: Path) -> None:
    make_ingestion(address, tmp_path, "orders", files=0)
    # Independent commands, each a fresh process: run them side by side.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: run_cli(*case[0], address=address), BAD_COMMANDS))
    for (args, code, expected), result in zip(BAD_COMMANDS, results, strict=True):
        assert (result.code, expected in result.stderr) == (code, True), f"{args}: {result.stderr}"
        assert "Traceback" not in result.stderr


def test_ctrl_c_stops_watching_but_not_the_run(address: str, tmp_path: Path) -> None:
    make_ingestion(address, tmp_path, "long", files=1)
    run = start_running(address, "long")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOLOADER_")}
    with subprocess.Popen(
        [*AUTOLOADER, "--address", address, "runs", "watch", run],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as watcher:
        try:
            assert watcher.stderr is not None
            ready, _, _ = select.select([watcher.stderr], [], [], 20)
            assert ready, "no progress line within 20 s"
            assert f"{run}: RUNNING, 0/1 files" in watcher.stderr.readline()
            watcher.send_signal(signal.SIGINT)
            stdout, stderr = watcher.communicate(timeout=20)
        finally:
            if watcher.poll() is None:
                watcher.kill()
    assert watcher.returncode == 130, stderr
    assert "stopped watching; the run goes on" in stderr
    assert "Traceback" not in stderr
    assert stdout == ""
    with Client(address) as client:
        assert client.get_run(run).state == run_pb2.Run.STATE_RUNNING
