"""The agent loop: lease (long-poll) -> read and stage -> report with the staged data, until stopped.

The agent writes data and the control plane commits it: a batch's rows are
staged as Parquet under the lease's staging location and sent with the
results; the control plane commits them only while the lease still holds every
file (agents never open the catalog). A batch that fails is split in halves
and each half retried, down to single files, so a poison file fails alone with
its own error and the others are staged. A batch whose lease is lost (the
heartbeat says so) is abandoned: no report, its staged files removed. On stop
the current batch may finish within the grace period; after that it is
abandoned and its files released (no attempt spent).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import grpc

from agent.errors import LeaseGone, SampleMismatch, classify, message
from agent.evolution import align
from agent.fetch import FetchedSources, FetchError
from agent.heartbeat import Heartbeat
from agent.protocol import Batch, LeaseClient, Stopped
from agent.reader import SourceFile, UnmatchedRows, read_batch, samples
from agent.sampling import HEAD_BYTES
from agent.stage import StagedData, discard, stage
from autoloader.faults import crash_point, pause_point
from autoloader.v1 import lease_pb2

log = logging.getLogger(__name__)

Outcome = lease_pb2.ReportFileResultRequest


@dataclass
class BatchOutcome:
    results: dict[str, lease_pb2.FileResult] = field(default_factory=dict)
    staged: list[StagedData] = field(default_factory=list)  # the pieces that read and staged cleanly
    fenced: int = 0  # results the control plane refused: the lease no longer held the files

    @property
    def data_files(self) -> list[lease_pb2.DataFile]:
        return [f for piece in self.staged for f in piece.data_files]


@dataclass
class PendingReport:
    """A batch read and staged (or given up on), its report still to make (or skip)."""

    batch: Batch
    outcome: BatchOutcome
    started: float  # monotonic
    cleanup: contextlib.ExitStack  # stops the heartbeat once the report is answered
    heartbeat: Heartbeat
    gone: LeaseGone | None = None  # why the batch goes unreported


class Worker:
    def __init__(
        self,
        client: LeaseClient,
        spark: Any,
        *,
        credentials: dict[str, dict[str, str]] | None = None,
        max_files: int = 0,
        max_bytes: int = 0,
        infer_sample_bytes: int = HEAD_BYTES,
        lease_wait: float = 20.0,
        shutdown_grace: float = 30.0,
        stop: threading.Event | None = None,
    ) -> None:
        self._client = client
        self._spark = spark
        self._credentials = credentials or {}
        self._max_files = max_files
        self._max_bytes = max_bytes
        self._sample_bytes = infer_sample_bytes
        self._wait = lease_wait
        self._grace = shutdown_grace
        self.stop = stop or threading.Event()
        self._abandon = threading.Event()
        self._busy = threading.Event()  # a batch is in progress

    def run(self) -> None:
        """Leases and processes batches until `stop` is set.

        A batch's report (which returns once the control plane has committed its
        data) is made in the background while the next batch is leased and read:
        the commit costs the agent no time, and reports from several agents that
        wait together are committed together. Reports go one at a time, in order.
        """
        log.info("agent started", extra={"action": "agent.start", "agent": self._client.agent})
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="report") as reporter:
            reporting: Future[BatchOutcome] | None = None
            while not self.stop.is_set():
                try:
                    batch = self._client.lease(self._wait, self._max_files, self._max_bytes)
                except Stopped:
                    break
                if batch is None:
                    continue
                if self.stop.is_set():
                    # Leased by a poll that was in flight when we were told to stop: hand it back.
                    self._client.release(batch.lease.name)
                    break
                pending = self._read_and_stage(batch)
                if reporting is not None:
                    reporting.result()
                reporting = reporter.submit(self._report, pending)
            if reporting is not None:
                reporting.result()
        log.info("agent stopped", extra={"action": "agent.stop", "agent": self._client.agent})

    def abandon_current(self) -> None:
        """Called when the grace period ran out: the batch being read commits nothing, and soon.

        Spark jobs are cancelled until the batch has returned (its files are then
        released): a job that starts after one cancellation, because the batch was
        between two jobs, is cancelled by the next one. A report already sent is
        waited for: its data is the control plane's to commit.
        """
        self._abandon.set()
        threading.Thread(target=self._cancel_jobs_until_idle, name="abandon", daemon=True).start()

    def _cancel_jobs_until_idle(self) -> None:
        while self._busy.is_set() and self._abandon.is_set():
            try:
                self._spark.sparkContext.cancelAllJobs()
            except Exception:
                with contextlib.suppress(Exception):  # best effort; the batch checks the flag between jobs
                    self._spark.interruptAll()  # Spark Connect has no SparkContext
            time.sleep(0.2)

    def process(self, batch: Batch) -> BatchOutcome:
        """One batch, from reading it to its report's answer."""
        return self._report(self._read_and_stage(batch))

    def _read_and_stage(self, batch: Batch) -> PendingReport:
        """Reads the batch and stages its rows; its heartbeat runs on until `_report` is done with it."""
        if not self.stop.is_set():
            self._abandon.clear()  # a pending abandon (the grace period ran out) stays set
        cleanup = contextlib.ExitStack()
        heartbeat = cleanup.enter_context(Heartbeat(self._client, batch.lease))
        pending = PendingReport(batch, BatchOutcome(), time.monotonic(), cleanup, heartbeat)
        self._busy.set()
        try:
            sample = self._sample_bytes > 0 and samples(batch.ingestion.format, batch.ingestion.schema)
            self._process(batch, list(batch.files), heartbeat, pending.outcome, sample)
            self._check_held(heartbeat)
        except LeaseGone as gone:
            pending.gone = gone
        except BaseException:
            pending.cleanup.close()
            raise
        finally:
            self._busy.clear()
        return pending

    def _report(self, pending: PendingReport) -> BatchOutcome:
        batch, outcome = pending.batch, pending.outcome
        with pending.cleanup:
            if pending.gone is None and outcome.results:
                crash_point("agent_before_report")
                pause_point("agent_before_report")
                # The heartbeat runs on while the control plane commits: the files stay ours.
                try:
                    answers = self._client.report(batch.lease.name, list(outcome.results.values()),
                                                  outcome.data_files)  # fmt: skip
                except grpc.RpcError as error:
                    # Refused (not unavailable: those are retried): nothing was accepted.
                    pending.gone = LeaseGone(f"the report was refused: {error.code().name} {error.details()}")
                else:
                    crash_point("agent_after_report")
                    outcome.fenced = sum(a.lease_lost for a in answers)
            if pending.gone is not None:
                self._give_up(pending, pending.gone)
                return outcome
        if outcome.fenced:
            # The control plane removed the staged files; another agent holds the files now.
            log.warning("%d results were fenced: the lease no longer held their files", outcome.fenced,
                        extra={"action": "agent.fenced", "lease": batch.lease.name})  # fmt: skip
        failed = sum(r.outcome == Outcome.OUTCOME_FAILED for r in outcome.results.values())
        log.info(
            "batch done: %d files, %d failed, %d staged files, %.1fs", len(batch.files), failed,
            len(outcome.data_files), time.monotonic() - pending.started,
            extra={"action": "agent.batch", "lease": batch.lease.name},
        )  # fmt: skip
        return outcome

    def _give_up(self, pending: PendingReport, gone: LeaseGone) -> None:
        """No report (or a refused one): the staged files go, and the files back if we still hold them."""
        self._discard(pending.outcome)
        lease = pending.batch.lease.name
        if self._abandon.is_set() and not pending.heartbeat.lost.is_set():
            released = self._client.release(lease)
            log.warning("batch abandoned on shutdown; %d files released", released,
                        extra={"action": "agent.release", "lease": lease})  # fmt: skip
        else:
            log.warning("batch abandoned: %s", gone or "the lease was lost",
                        extra={"action": "agent.abandon", "lease": lease})  # fmt: skip

    @staticmethod
    def _discard(outcome: BatchOutcome) -> None:
        for piece in outcome.staged:
            discard(piece.prefix)
        outcome.staged.clear()

    def _process(
        self,
        batch: Batch,
        files: list[lease_pb2.LeasedFile],
        heartbeat: Heartbeat,
        outcome: BatchOutcome,
        sample: bool,
    ) -> None:
        try:
            staged = self._ingest(batch, files, heartbeat, sample)
        except LeaseGone:
            raise
        except Exception as error:
            if self._abandon.is_set() or not heartbeat.still_held():
                raise LeaseGone(f"{type(error).__name__} after the lease was lost") from error
            if sample and not isinstance(error, FetchError):
                # The schema came from the files' heads and rows past them did not fit it (a wider
                # type, a malformed line): the whole files decide, for the batch and its halves.
                log.info("batch of %d failed with a sampled schema (%s); inferring from whole files",
                         len(files), type(error).__name__, extra={"action": "agent.resample",
                                                                  "lease": batch.lease.name})  # fmt: skip
                self._process(batch, files, heartbeat, outcome, sample=False)
                return
            if len(files) == 1:
                outcome.results[files[0].name] = _failure(files[0], error)
                return
            # Isolate the poison: each half commits or splits again.
            middle = len(files) // 2
            log.info("batch of %d failed (%s); retrying halves", len(files), type(error).__name__,
                     extra={"action": "agent.split", "lease": batch.lease.name})  # fmt: skip
            self._process(batch, files[:middle], heartbeat, outcome, sample)
            self._process(batch, files[middle:], heartbeat, outcome, sample)
            return
        outcome.staged.append(staged)
        for f in files:
            outcome.results[f.name] = lease_pb2.FileResult(
                file=f.name, attempt=f.attempt, outcome=Outcome.OUTCOME_SUCCEEDED,
                records=staged.counts.get(f.path, 0), bytes=f.size_bytes,
            )  # fmt: skip

    def _check_held(self, heartbeat: Heartbeat) -> None:
        """Between Spark jobs: a batch abandoned or without its lease goes no further (it would be fenced)."""
        if self._abandon.is_set():
            raise LeaseGone("the grace period ran out")
        if not heartbeat.still_held():
            raise LeaseGone("the lease was lost")

    @contextlib.contextmanager
    def _layout_root(self) -> Iterator[Path | None]:
        """A directory for the batch's links (agent.layout), if this Spark reads the agent's disk."""
        if type(self._spark).__module__.startswith("pyspark.sql.connect"):
            yield None  # a Spark Connect server may run elsewhere
            return
        # Links and directories only, on tmpfs when there is one: a busy disk journals each of these
        # metadata writes at up to a millisecond (1,000 links took 1.4-3.6 s on disk, 80 ms on tmpfs).
        scratch = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else None  # noqa: S108 - a private mkdtemp
        with tempfile.TemporaryDirectory(prefix="autoloader-batch-", dir=scratch) as root:
            yield Path(root)

    def _ingest(
        self, batch: Batch, files: list[lease_pb2.LeasedFile], heartbeat: Heartbeat, sample: bool
    ) -> StagedData:
        """Reads `files` and stages their rows under the lease's staging location."""
        self._check_held(heartbeat)
        ingestion, target = batch.ingestion, batch.target
        source = ingestion.source
        with (
            FetchedSources([f.path for f in files], self._credentials, source.credentials_ref,
                           dict(source.options)) as fetched,
            self._layout_root() as layout_root,
        ):  # fmt: skip
            sources = [
                SourceFile(
                    uri=f.path, local=fetched.local(f.path),
                    modified_time=f.modified_time.ToDatetime(tzinfo=UTC) if f.HasField("modified_time") else None,
                    run=f.run.rpartition("/")[2],
                )
                for f in files
            ]  # fmt: skip
            sample_bytes = self._sample_bytes if sample else 0
            read = read_batch(
                self._spark, ingestion.format, ingestion.schema, sources, sample_bytes, layout_root
            )  # infers
            self._check_held(heartbeat)
            columns = {c.name: c.type for c in target.columns} if target.exists else None
            aligned = align(read.frame, columns, ingestion.schema.evolution)
            prefix = f"{target.staging_location.rstrip('/')}/{uuid.uuid4().hex[:12]}"
            try:
                staged = stage(aligned.frame, prefix, list(target.partition_by))
                # A file Spark named in a way the join did not match (reader._with_source_columns)
                # lost all its rows: fail rather than report the batch without them.
                unstaged = [fetched.local(f.path) for f in files if f.size_bytes and not staged.counts.get(f.path)]
                if unstaged and (rows := read.rows_in(unstaged)):
                    raise UnmatchedRows(f"Spark read {rows} rows of {len(unstaged)} files and staged none of them")
                if malformed := read.rows_malformed():
                    # RESCUE keeps a row that does not fit the schema whole, as malformed; one that
                    # does not fit a schema from the heads may fit the whole files' (a wider type).
                    raise SampleMismatch(f"{malformed} rows did not fit the sampled schema")
            except BaseException:
                discard(prefix)
                raise
        return staged


def _failure(file: lease_pb2.LeasedFile, error: BaseException) -> lease_pb2.FileResult:
    kind, retryable = classify(error)
    return lease_pb2.FileResult(
        file=file.name, attempt=file.attempt, outcome=Outcome.OUTCOME_FAILED,
        error=lease_pb2.FileErrorDetail(type=kind, message=message(error), retryable=retryable),
    )  # fmt: skip
