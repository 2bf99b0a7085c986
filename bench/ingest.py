"""Ingestion throughput through control plane + agent vs plain Spark on the same data.

    python bench/ingest.py            # ~200 MB of JSON lines in 50 files, and 2,000 files of 10 KB
    python bench/ingest.py --quick    # ~12 MB in 8 files, and 100 files of 10 KB (about a minute)

"ours" runs a real control plane (embedded PostgreSQL) and one agent in this process: StartRun,
discovery, leases, Spark reading the files, Parquet staged in the table's location, one Iceberg
commit per batch (delete the batch's source files' rows + add the files), and the reports, timed
from StartRun until the run has ended. "baseline" is `spark.read.json(dir).write.parquet(out)` on
the same files with the same Spark session (so the JVM is warm for both; each side runs once to
warm up first). Both infer the JSON schema. Printed: MB/s and files/s for both, and the ratios;
the BENCH line is the large-file MB/s figure.
"""

from __future__ import annotations

import os

# Before grpc is imported: pyspark forks to launch its JVM, and gRPC's fork handlers make a small
# share of such children abort (see autoloader/__init__.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import grpc

from autoloader.v1 import ingestion_pb2 as pb
from autoloader.v1 import ingestion_pb2_grpc, run_pb2, run_pb2_grpc

ACTIVE = (run_pb2.Run.STATE_DISCOVERING, run_pb2.Run.STATE_RUNNING)


def write_files(directory: Path, files: int, bytes_per_file: int, seed: int) -> int:
    """JSON-lines files of about bytes_per_file each; returns the total size."""
    rng = random.Random(seed)  # noqa: S311 - test data
    directory.mkdir(parents=True)
    total = 0
    for i in range(files):
        lines = []
        size = 0
        n = 0
        while size < bytes_per_file:
            line = json.dumps(
                {"id": i * 10_000_000 + n, "customer": f"c{rng.randrange(100_000)}", "amount": rng.random() * 1000,
                 "sku": f"SKU-{rng.randrange(500)}", "ts": f"2024-05-{1 + n % 28:02d}T12:00:00Z",
                 "note": "x" * rng.randrange(10, 80)}
            )  # fmt: skip
            lines.append(line)
            size += len(line) + 1
            n += 1
        (directory / f"part-{i:05d}.json").write_text("\n".join(lines) + "\n")
        total += size
    return total


def ours(address: str, source: Path, ingestion_id: str, table: str) -> float:
    """Seconds from StartRun until the run ended (SUCCEEDED required)."""
    with grpc.insecure_channel(address) as channel:
        ingestion_pb2_grpc.IngestionServiceStub(channel).CreateIngestion(
            pb.CreateIngestionRequest(
                ingestion_id=ingestion_id,
                ingestion=pb.Ingestion(
                    source=pb.Source(uri=source.as_uri(), glob="*.json"),
                    format=pb.Format(type=pb.Format.TYPE_JSON),
                    destination=pb.Destination(table=table),
                ),
            )
        )
        runs = run_pb2_grpc.RunServiceStub(channel)
        started = time.perf_counter()
        run = runs.StartRun(run_pb2.StartRunRequest(ingestion=f"ingestions/{ingestion_id}")).run
        while run.state in ACTIVE:
            time.sleep(0.05)
            run = runs.GetRun(run_pb2.GetRunRequest(name=run.name)).run
        elapsed = time.perf_counter() - started
        if run.state != run_pb2.Run.STATE_SUCCEEDED:
            raise SystemExit(f"run ended {run_pb2.Run.State.Name(run.state)}: {run.error} {run.first_errors}")
        return elapsed


def baseline(spark: object, source: Path, out: Path) -> float:
    started = time.perf_counter()
    spark.read.json(str(source)).write.parquet(str(out))  # type: ignore[attr-defined]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~12 MB in 8 files and 100 small files")
    args = parser.parse_args()
    large_files, large_bytes = (8, 1_500_000) if args.quick else (50, 4_000_000)
    small_files, small_bytes = (100, 10_000) if args.quick else (2_000, 10_000)
    warmup_files, warmup_bytes = (2, 500_000) if args.quick else (4, 1_000_000)

    from autoloader.local import start_agent
    from controlplane import bootstrap, logs
    from controlplane.config import ControlPlaneSettings

    logs.configure("WARNING")
    work = Path(tempfile.mkdtemp(prefix="al-bench-ingest-"))
    work.chmod(0o755)
    sets = {}
    for label, files, size in (("warmup", warmup_files, warmup_bytes), ("large", large_files, large_bytes),
                               ("small", small_files, small_bytes)):  # fmt: skip
        for side in ("ours", "base"):
            sets[(label, side)] = write_files(work / label / side, files, size, seed=hash(label) & 0xFFFF)
    plane = bootstrap.start(ControlPlaneSettings(state_dir=work / "state", listen_address="127.0.0.1:0"))
    agent = None
    results: dict[str, tuple[float, float, int, int]] = {}
    try:
        agent = start_agent(plane.address, plane.database_url, work / "state", lease_wait=1.0)
        spark = agent.worker._spark
        for label, files in (("warmup", warmup_files), ("large", large_files), ("small", small_files)):
            # Baseline first: the JVM's JIT warms up on the earlier job, which favours the later one.
            t_base = baseline(spark, work / label / "base", work / "out" / label)
            t_ours = ours(plane.address, work / label / "ours", f"bench-{label}", f"bench.{label}")
            results[label] = (t_ours, t_base, sets[(label, "ours")], files)
            if label != "warmup":
                mb = sets[(label, "ours")] / 1e6
                print(
                    f"{label}: {files} files, {mb:,.1f} MB: ours {mb / t_ours:,.1f} MB/s "
                    f"({files / t_ours:,.1f} files/s), spark {mb / t_base:,.1f} MB/s ({files / t_base:,.1f} files/s), "
                    f"ratio {t_base / t_ours:.3f}",
                    flush=True,
                )
    finally:
        if agent is not None:
            agent.stop()
        plane.stop(grace=0)
        shutil.rmtree(work, ignore_errors=True)
    t_ours, t_base, size, _ = results["large"]
    mb = size / 1e6
    print(f"BENCH ingest ours={mb / t_ours:.2f} baseline={mb / t_base:.2f} ratio={t_base / t_ours:.3f} unit=MB/s")


if __name__ == "__main__":
    main()
