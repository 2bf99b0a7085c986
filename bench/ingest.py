"""Ingestion throughput through control plane + agent vs plain Spark on the same data.

    python bench/ingest.py            # ~200 MB of JSON lines in 50 files (best of 5), and 5,000 files of 10 KB
    python bench/ingest.py --quick    # ~12 MB in 8 files, and 1,000 files of 10 KB (about a minute)
    python bench/ingest.py --max-files-per-lease 100    # the ingestion's limits.max_files_per_lease

"ours" runs a real control plane (embedded PostgreSQL) and one agent in this process: StartRun,
discovery, leases, Spark reading the files, Parquet staged under the lease's staging location, the
reports with the staged files, and the control plane's commits (the batches pending for a table in
one Iceberg transaction: delete their source files' rows, add the files), timed from the run's
create_time to its end_time as the control plane records them. "baseline" is
`spark.read.json(dir).write.parquet(out)` on the same files with the same Spark session (so the
JVM is warm for both; each side runs once to warm up first). Each side infers the JSON schema as it
does by default: the agent from the first 64 KiB of every file, plain Spark from every row. The
large files go through both sides several times, alternating, and each side's best time counts:
single runs on a shared 2-core machine vary by a third. Printed: MB/s and files/s for both, and the
ratios. Two BENCH lines: `ingest_small` (files/s over the small files) and then `ingest` (MB/s over
the large ones).
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


def ours(address: str, source: Path, ingestion_id: str, table: str, files_per_lease: int = 0) -> float:
    """Seconds from the run's creation (StartRun) to its end, as the control plane recorded them."""
    with grpc.insecure_channel(address) as channel:
        ingestion_pb2_grpc.IngestionServiceStub(channel).CreateIngestion(
            pb.CreateIngestionRequest(
                ingestion_id=ingestion_id,
                ingestion=pb.Ingestion(
                    source=pb.Source(uri=source.as_uri(), glob="*.json"),
                    format=pb.Format(type=pb.Format.TYPE_JSON),
                    destination=pb.Destination(table=table),
                    limits=pb.Limits(max_files_per_lease=files_per_lease),  # 0: the default (100)
                ),
            )
        )
        runs = run_pb2_grpc.RunServiceStub(channel)
        run = runs.StartRun(run_pb2.StartRunRequest(ingestion=f"ingestions/{ingestion_id}")).run
        while run.state in ACTIVE:
            # Slow polling: the run's own timestamps time it, and on 2 cores a fast poll would take
            # CPU from Spark.
            time.sleep(0.5)
            run = runs.GetRun(run_pb2.GetRunRequest(name=run.name)).run
        if run.state != run_pb2.Run.STATE_SUCCEEDED:
            raise SystemExit(f"run ended {run_pb2.Run.State.Name(run.state)}: {run.error} {run.first_errors}")
        return (run.end_time.ToNanoseconds() - run.create_time.ToNanoseconds()) / 1e9


def baseline(spark: object, source: Path, out: Path) -> float:
    started = time.perf_counter()
    spark.read.json(str(source)).write.parquet(str(out))  # type: ignore[attr-defined]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~12 MB in 8 files and 1,000 small files")
    parser.add_argument("--rounds", type=int, default=0, help="large-file rounds per side, best kept (5; quick: 2)")
    parser.add_argument("--small-rounds", type=int, default=1, help="small-file rounds per side, best kept (1)")
    parser.add_argument("--small-files", type=int, default=0, help="how many 10 KB files (5,000; quick: 1,000)")
    parser.add_argument(
        "--max-files-per-lease",
        type=int,
        default=0,
        help="the ingestions' limits.max_files_per_lease (default: the control plane's, 1,000)",
    )
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 5)
    large_files, large_bytes = (8, 1_500_000) if args.quick else (50, 4_000_000)
    small_files, small_bytes = (args.small_files or (1_000 if args.quick else 5_000)), 10_000
    warmup_files, warmup_bytes = (2, 500_000) if args.quick else (4, 1_000_000)

    from autoloader import logs
    from autoloader.local import start_agent
    from controlplane import bootstrap
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
        agent = start_agent(plane.address, work / "state", lease_wait=1.0)
        spark = agent.worker._spark
        for label, files, rounds in (("warmup", warmup_files, 1), ("large", large_files, args.rounds),
                                     ("small", small_files, args.small_rounds)):  # fmt: skip
            times_base, times_ours = [], []
            for r in range(rounds):
                # Baseline first: the JVM's JIT warms up on the earlier job, which favours the later one.
                times_base.append(baseline(spark, work / label / "base", work / "out" / f"{label}-{r}"))
                # A new ingestion (and table) each round: the files are new to it.
                source = work / label / "ours"
                times_ours.append(
                    ours(plane.address, source, f"bench-{label}-{r}", f"bench.{label}_{r}", args.max_files_per_lease)
                )
            t_ours, t_base = min(times_ours), min(times_base)
            results[label] = (t_ours, t_base, sets[(label, "ours")], files)
            if label != "warmup":
                # The committer's work for the set: snapshots per 1,000 files, commit conflicts.
                snapshots = sum(len(plane.tables.load(f"bench.{label}_{r}").snapshots()) for r in range(rounds))
                stats = plane.committer.service.stats
                print(
                    f"{label}: {snapshots * 1000 / (files * rounds):.1f} snapshots per 1,000 files; committer so far: "
                    f"{stats.commits} commits of {stats.batches} batches, {stats.conflicts} conflicts"
                )
                mb = sets[(label, "ours")] / 1e6
                print(
                    f"{label}: {files} files, {mb:,.1f} MB, best of {rounds}: ours {mb / t_ours:,.1f} MB/s "
                    f"({files / t_ours:,.1f} files/s), spark {mb / t_base:,.1f} MB/s ({files / t_base:,.1f} files/s), "
                    f"ratio {t_base / t_ours:.3f}  [ours {' '.join(f'{t:.1f}' for t in times_ours)} s, "
                    f"spark {' '.join(f'{t:.1f}' for t in times_base)} s]",
                    flush=True,
                )
    finally:
        if agent is not None:
            agent.stop()
        plane.stop(grace=0)
        shutil.rmtree(work, ignore_errors=True)
    t_ours, t_base, _, files = results["small"]
    print(
        f"BENCH ingest_small ours={files / t_ours:.2f} baseline={files / t_base:.2f} ratio={t_base / t_ours:.3f} "
        "unit=files/s"
    )
    t_ours, t_base, size, _ = results["large"]
    mb = size / 1e6
    print(f"BENCH ingest ours={mb / t_ours:.2f} baseline={mb / t_base:.2f} ratio={t_base / t_ours:.3f} unit=MB/s")


if __name__ == "__main__":
    main()
