"""Leasing throughput through the control plane vs raw SQL on the same database.

    python bench/lease.py            # 1, 2, 4, 8 agents; 4,000 files per measurement
    python bench/lease.py --quick    # 1 and 4 agents; 1,000 files (under a minute)

"ours" is files/s for N no-op agent processes that each loop LeaseFiles (wait 0) and then
ReportFileResult(SUCCEEDED) per file, through a real gRPC control plane on an embedded
PostgreSQL, until nothing is left to lease. "baseline" is the same N processes doing the same
work with psycopg directly on the same database: the control plane's own batch-claim statement
(FOR UPDATE SKIP LOCKED) plus a commit, then one fenced UPDATE plus a commit per file; no gRPC,
no ORM, no lease/agent/attempt rows. Files live in a RUNNING run of an ACTIVE ingestion and are
reset to PENDING (and the run to RUNNING) before every measurement; agents are separate
processes (spawn) so the server has its GIL to itself, and they connect before the clock starts.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import grpc
import psycopg

from autoloader.v1 import ingestion_pb2 as pb
from autoloader.v1 import ingestion_pb2_grpc, lease_pb2, lease_pb2_grpc, run_pb2, run_pb2_grpc

INGESTION = "lease-bench"
BATCH = 100  # files per lease, both sides
SUCCEEDED = lease_pb2.ReportFileResultRequest.OUTCOME_SUCCEEDED

_REPORT = """
    UPDATE files SET state = 'SUCCEEDED', lease_pk = NULL, lease_expire_time = NULL, update_time = now(),
                     last_error = '', records = 1
    WHERE id = %(id)s AND lease_pk = %(lease)s AND attempts = %(attempt)s AND state = 'LEASED'
"""

_RESET = [
    """UPDATE files SET state = 'PENDING', attempts = 0, lease_expiries = 0, lease_pk = NULL,
           lease_expire_time = NULL, next_attempt_at = now(), records = 0, last_error = ''
       WHERE ingestion_pk = %(ingestion)s""",
    "UPDATE runs SET state = 'RUNNING', end_time = NULL, final_counts = NULL WHERE id = %(run)s",
    "DELETE FROM file_attempts",
    "DELETE FROM leases",
]


def _psycopg_sql(statement: str) -> str:
    """A SQLAlchemy text() statement (:name parameters) in psycopg's %(name)s style."""
    return re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", statement.replace("%", "%%"))


def grpc_agent(address: str, agent: str, go: Event, done: Any, batched: bool = False) -> None:
    with grpc.insecure_channel(address) as channel:
        leases = lease_pb2_grpc.LeaseServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        go.wait()
        count = 0
        while True:
            got = leases.LeaseFiles(
                lease_pb2.LeaseFilesRequest(agent=agent, max_files=BATCH, ingestion=f"ingestions/{INGESTION}")
            )
            if not got.files:
                break
            if batched:
                results = [
                    lease_pb2.FileResult(file=f.name, attempt=f.attempt, outcome=SUCCEEDED, records=1)
                    for f in got.files
                ]
                reply = leases.ReportFileResults(
                    lease_pb2.ReportFileResultsRequest(lease=got.lease.name, agent=agent, results=results)
                )
                count += sum(not r.lease_lost for r in reply.results)
                continue
            for f in got.files:
                leases.ReportFileResult(
                    lease_pb2.ReportFileResultRequest(
                        lease=got.lease.name, agent=agent, file=f.name, attempt=f.attempt, outcome=SUCCEEDED, records=1
                    )
                )
                count += 1
    done.put(count)


def sql_agent(url: str, claim: str, params: dict[str, Any], go: Event, done: Any) -> None:
    with psycopg.connect(url) as conn:
        go.wait()
        count = 0
        while True:
            lease = uuid.uuid4()
            rows = conn.execute(claim, {**params, "lease": lease}).fetchall()
            conn.commit()
            if not rows:
                break
            for row in rows:  # RETURNING f.id, f.path, f.size_bytes, f.etag, f.modified_time, f.attempts, ...
                conn.execute(_REPORT, {"id": row[0], "lease": lease, "attempt": row[5]})
                conn.commit()
                count += 1
    done.put(count)


def measure(
    target: Callable[..., None],
    args: Callable[[int], tuple[Any, ...]],
    agents: int,
    files: int,
    **options: Any,
) -> float:
    """files/s for `agents` processes running target until nothing is left; checks every file was done once."""
    ctx = mp.get_context("spawn")
    go, done = ctx.Event(), ctx.Queue()
    processes = [ctx.Process(target=target, args=(*args(i), go, done), kwargs=options) for i in range(agents)]
    for p in processes:
        p.start()
    time.sleep(2.0)  # let every process import and connect before the clock starts
    started = time.perf_counter()
    go.set()
    counts = [done.get(timeout=600) for _ in processes]
    elapsed = time.perf_counter() - started
    for p in processes:
        p.join(30)
    if sum(counts) != files:
        raise SystemExit(f"{target.__name__}: {sum(counts)} files reported, expected {files}")
    return files / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 and 4 agents, 1,000 files, under a minute")
    parser.add_argument("--files", type=int, help="files per measurement")
    parser.add_argument("--agents", type=int, nargs="+", help="agent counts to measure")
    args = parser.parse_args()
    files = args.files or (1_000 if args.quick else 4_000)
    agent_counts = args.agents or ([1, 4] if args.quick else [1, 2, 4, 8])

    from autoloader import logs
    from controlplane import bootstrap
    from controlplane.adapters.lease_repository import _CLAIM
    from controlplane.config import ControlPlaneSettings
    from controlplane.domain.leases import MAX_LEASE_EXPIRIES

    logs.configure("WARNING")
    work = Path(tempfile.mkdtemp(prefix="al-bench-lease-"))
    source = work / "source"
    source.mkdir()
    for i in range(files):
        os.close(os.open(source / f"file-{i:07d}.json", os.O_CREAT | os.O_WRONLY, 0o644))
    plane = bootstrap.start(ControlPlaneSettings(state_dir=work / "state", listen_address="127.0.0.1:0"))
    try:
        url = plane.embedded.start() if plane.embedded else plane.engine.url.render_as_string(hide_password=False)
        url = url.replace("postgresql+psycopg://", "postgresql://")
        with grpc.insecure_channel(plane.address) as channel:
            ingestion_pb2_grpc.IngestionServiceStub(channel).CreateIngestion(
                pb.CreateIngestionRequest(
                    ingestion_id=INGESTION,
                    ingestion=pb.Ingestion(
                        source=pb.Source(uri=source.as_uri(), glob="*.json"),
                        format=pb.Format(type=pb.Format.TYPE_JSON),
                        destination=pb.Destination(table="bench.lease"),
                        limits=pb.Limits(max_files_per_lease=BATCH),
                    ),
                )
            )
            runs = run_pb2_grpc.RunServiceStub(channel)
            run = runs.StartRun(run_pb2.StartRunRequest(ingestion=f"ingestions/{INGESTION}")).run
            while runs.GetRun(run_pb2.GetRunRequest(name=run.name)).run.state != run_pb2.Run.STATE_RUNNING:
                time.sleep(0.05)
        with psycopg.connect(url, autocommit=True) as conn:
            ingestion_pk, run_pk = conn.execute(
                "SELECT r.ingestion_pk, r.id FROM runs r JOIN ingestions i ON i.id = r.ingestion_pk"
                " WHERE i.ingestion_id = %s AND r.state = 'RUNNING'",
                (INGESTION,),
            ).fetchone() or (None, None)
            assert run_pk is not None

            def reset() -> None:
                for statement in _RESET:
                    conn.execute(statement, {"ingestion": ingestion_pk, "run": run_pk})
                conn.execute("VACUUM ANALYZE files")
                conn.execute("VACUUM ANALYZE runs")

            claim = _psycopg_sql(str(_CLAIM.text))
            params = {
                "ingestion": ingestion_pk, "max_files": BATCH, "max_bytes": 1 << 30, "ttl": timedelta(seconds=60),
                "max_expiries": MAX_LEASE_EXPIRIES,
            }  # fmt: skip
            results: dict[int, tuple[float, float, float]] = {}
            for n in agent_counts:
                reset()
                ours = measure(grpc_agent, lambda i: (plane.address, f"agents/bench-{i}"), n, files)
                reset()
                batched = measure(grpc_agent, lambda i: (plane.address, f"agents/bench-{i}"), n, files, batched=True)
                reset()
                baseline = measure(sql_agent, lambda i: (url, claim, params), n, files)
                results[n] = (ours, batched, baseline)
                print(f"{n} agents, {files:,} files: ours {ours:,.0f} files/s (one ReportFileResult per file), "
                      f"{batched:,.0f} files/s (one ReportFileResults per lease), raw SQL {baseline:,.0f} files/s; "
                      f"ratios {ours / baseline:.3f} and {batched / baseline:.3f}", flush=True)  # fmt: skip
    finally:
        plane.stop(grace=0)
        shutil.rmtree(work, ignore_errors=True)
    n = 4 if 4 in results else agent_counts[-1]
    ours, batched, baseline = results[n]
    # What agents do (one ReportFileResults per lease), then the one-call-per-file form.
    print(f"BENCH lease ours={batched:.0f} baseline={baseline:.0f} ratio={batched / baseline:.3f} unit=files/s")
    print(f"BENCH lease_per_file ours={ours:.0f} baseline={baseline:.0f} ratio={ours / baseline:.3f} unit=files/s")


if __name__ == "__main__":
    main()
