"""Discovery throughput through the control plane vs a raw os.scandir walk of the same tree.

    python bench/discovery.py            # 100,000 files, plus peak RSS while discovering 1,000,000
    python bench/discovery.py --quick    # 20,000 files, RSS over 100,000 (under a minute)

Also "rediscovery": the same tree listed again once every file is loaded and unchanged (what each
scheduled run of a quiet source costs), against the same walk.

"ours" is files/s from StartRun until the run leaves DISCOVERING (listing + upserting every
file into PostgreSQL + committing), measured with a real control plane on an embedded
PostgreSQL; "baseline" is files/s of an os.scandir walk that stats every file, on the same
tree in the same run. The RSS figure is the peak resident memory of a separate `autoloader
serve` process while it discovers the large tree.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil

from autoloader.v1 import ingestion_pb2 as pb
from autoloader.v1 import ingestion_pb2_grpc, run_pb2, run_pb2_grpc


def make_tree(root: Path, files: int, per_dir: int = 1000) -> None:
    """Empty files in nested directories (fast: no data written)."""
    for i in range(files):
        directory = root / f"d{i // per_dir // 100:03d}" / f"e{i // per_dir:04d}"
        if i % per_dir == 0:
            directory.mkdir(parents=True, exist_ok=True)
        os.close(os.open(directory / f"file-{i:07d}.json", os.O_CREAT | os.O_WRONLY, 0o644))


def scandir_walk(root: Path) -> int:
    count = 0
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    entry.stat()
                    count += 1
    return count


def discover(address: str, root: Path, ingestion_id: str) -> float:
    """Seconds from StartRun until discovery ended, for a new ingestion of `root`."""
    with grpc.insecure_channel(address) as channel:
        ingestions = ingestion_pb2_grpc.IngestionServiceStub(channel)
        ingestions.CreateIngestion(
            pb.CreateIngestionRequest(
                ingestion_id=ingestion_id,
                ingestion=pb.Ingestion(
                    source=pb.Source(uri=root.as_uri(), glob="*.json", recursive=True),
                    format=pb.Format(type=pb.Format.TYPE_JSON),
                    destination=pb.Destination(table="bench.files"),
                ),
            )
        )
    return rediscover(address, ingestion_id)


def rediscover(address: str, ingestion_id: str) -> float:
    """Seconds from StartRun until discovery ended, for an existing ingestion."""
    with grpc.insecure_channel(address) as channel:
        runs = run_pb2_grpc.RunServiceStub(channel)
        started = time.perf_counter()
        run = runs.StartRun(run_pb2.StartRunRequest(ingestion=f"ingestions/{ingestion_id}")).run
        for update in runs.WatchRun(run_pb2.WatchRunRequest(name=run.name)):
            if update.run.state != run_pb2.Run.STATE_DISCOVERING:
                elapsed = time.perf_counter() - started
                if update.run.state not in (run_pb2.Run.STATE_RUNNING, run_pb2.Run.STATE_SUCCEEDED):
                    raise SystemExit(f"discovery failed: {update.run.error}")
                return elapsed
    raise SystemExit("watch ended early")


def mark_loaded(database_url: str, ingestion_id: str) -> None:
    """As if agents had loaded every file and the run had ended (no agents in this benchmark)."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        ingestion = conn.execute("SELECT id FROM ingestions WHERE ingestion_id = %s", (ingestion_id,)).fetchone()
        assert ingestion is not None
        conn.execute("UPDATE files SET state = 'SUCCEEDED' WHERE ingestion_pk = %s", ingestion)
        conn.execute("UPDATE runs SET state = 'SUCCEEDED', end_time = now() WHERE ingestion_pk = %s", ingestion)
        conn.execute("VACUUM ANALYZE files")


def measure_rss(database_url: str, root: Path, files: int, state: Path) -> float:
    """Peak RSS (MB) of a separate control-plane process while it discovers `root`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOLOADER_")}
    env.update(AUTOLOADER_DATABASE_URL=database_url, AUTOLOADER_LISTEN_ADDRESS="127.0.0.1:0",
               AUTOLOADER_STATE_DIR=str(state))  # fmt: skip
    log = state / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "autoloader.cli.main", "serve"], env=env, stderr=out)
    try:
        address = None
        while address is None:
            match = re.search(r"action=server.start address=(\S+)", log.read_text())
            address = match.group(1) if match else None
            if server.poll() is not None:
                raise SystemExit(log.read_text())
            time.sleep(0.1)
        process = psutil.Process(server.pid)
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, process.memory_info().rss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        seconds = discover(address, root, "rss")
        done.set()
        sampler.join()
        print(f"rss: {files} files discovered in {seconds:.1f}s ({files / seconds:,.0f} files/s), "
              f"peak RSS {peak / 2**20:.0f} MB")  # fmt: skip
        return peak / 2**20
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small trees, under a minute")
    args = parser.parse_args()
    files = 20_000 if args.quick else 100_000
    rss_files = 100_000 if args.quick else 1_000_000

    from autoloader import logs
    from controlplane import bootstrap
    from controlplane.config import ControlPlaneSettings

    logs.configure("WARNING")
    work = Path(tempfile.mkdtemp(prefix="al-bench-"))
    work.chmod(0o755)
    # The trees go to tmpfs when there is one: creating a million files on disk takes
    # many minutes, and both sides read the same tree, so the ratio is unaffected.
    # The database stays on disk.
    shm = "/dev/shm"  # noqa: S108 - a private mkdtemp below it, removed at the end
    trees = Path(tempfile.mkdtemp(prefix="al-bench-trees-", dir=shm if os.access(shm, os.W_OK) else None))
    trees.chmod(0o755)
    try:
        tree = trees / "tree"
        make_tree(tree, files)
        scandir_walk(tree)  # warm the dentry cache for both sides alike
        started = time.perf_counter()
        assert scandir_walk(tree) == files
        baseline = files / (time.perf_counter() - started)

        plane = bootstrap.start(ControlPlaneSettings(state_dir=work / "state", listen_address="127.0.0.1:0"))
        try:
            ours = files / discover(plane.address, tree, "speed")
            database_url = plane.embedded.start() if plane.embedded else ""
            # The same tree again, every file already loaded and unchanged: what every scheduled run pays.
            mark_loaded(database_url, "speed")
            scandir_walk(tree)
            started = time.perf_counter()
            scandir_walk(tree)
            rebaseline = files / (time.perf_counter() - started)
            again = files / rediscover(plane.address, "speed")
            big = trees / "big"
            started = time.perf_counter()
            make_tree(big, rss_files)
            print(f"made {rss_files:,} files in {time.perf_counter() - started:.0f}s")
            measure_rss(database_url, big, rss_files, work)
        finally:
            plane.stop(grace=0)
        print(f"discovery of {files:,} files: ours {ours:,.0f} files/s, os.scandir walk {baseline:,.0f} files/s")
        print(f"rediscovery of the same {files:,} files, all loaded: ours {again:,.0f} files/s, "
              f"os.scandir walk {rebaseline:,.0f} files/s")  # fmt: skip
        print(
            f"BENCH rediscovery ours={again:.0f} baseline={rebaseline:.0f} ratio={again / rebaseline:.3f} unit=files/s"
        )
        print(f"BENCH discovery ours={ours:.0f} baseline={baseline:.0f} ratio={ours / baseline:.3f} unit=files/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(trees, ignore_errors=True)


if __name__ == "__main__":
    main()
