"""The agent loop: lease (long-poll) -> process -> commit to Iceberg -> report, until stopped.

A batch that fails is split in halves and each half retried, down to single
files, so a poison file fails alone with its own error and the others commit.
Nothing is committed once the lease may be lost (the heartbeat says so); an
abandoned batch is neither committed nor reported, and its staged files are
removed. On stop the current batch may finish within the grace period; after
that it is abandoned and its files released (no attempt spent).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from agent.evolution import NewColumnsRejected, align
from agent.heartbeat import Heartbeat
from agent.protocol import Batch, LeaseClient, Stopped
from agent.reader import SourceFile, UnmatchedRows, UnsupportedFormat, local_path, read_batch, samples
from agent.sampling import HEAD_BYTES
from agent.sink import IcebergSink, PartitionUnsupported, Staged, spark_types
from agent.staging import StagedFiles, StagingError
from autoloader.v1 import lease_pb2

log = logging.getLogger(__name__)

Outcome = lease_pb2.ReportFileResultRequest
# Test-only fault injection: "crash_after_commit" or "crash_before_commit" exits the process there.
FAULT = "AUTOLOADER_TEST_FAULT"
ORPHAN_SWEEP_EVERY = 3600.0
# Staging directories older than this that no snapshot references were abandoned: no batch
# runs that long without its lease being lost (it is then never committed).
ORPHAN_AGE = 6 * 3600.0
# Spark errors about a file's content: retrying the same bytes cannot help.
_DATA_ERRORS = re.compile(
    r"Malformed|FAILFAST|EOFException|Unexpected end of input|not a Parquet file|NOT_A_PARQUET|corrupt|"
    r"Invalid UTF|CANNOT_PARSE|CANNOT_READ_FILE|FAILED_READ_FILE|incorrect header check|Not in GZIP format|"
    r"Could not read footer|magic number|decompress|UNABLE_TO_INFER_SCHEMA",
    re.IGNORECASE,
)


class LeaseGone(Exception):
    """The lease was lost or the batch abandoned: do not commit, do not report."""


class SampleMismatch(Exception):
    """Rows a schema inferred from the files' heads could not hold; whole-file inference may."""


@dataclass
class BatchOutcome:
    results: dict[str, lease_pb2.FileResult] = field(default_factory=dict)
    committed_files: int = 0
    schema_version: int = 0  # the table's schema version after the batch's commits


class Worker:
    def __init__(
        self,
        client: LeaseClient,
        spark: Any,
        sink: IcebergSink,
        *,
        credentials: dict[str, dict[str, str]] | None = None,
        max_files: int = 0,
        max_bytes: int = 0,
        infer_sample_bytes: int = HEAD_BYTES,
        lease_wait: float = 20.0,
        shutdown_grace: float = 30.0,
        stop: threading.Event | None = None,
        on_batch: Callable[[Batch, BatchOutcome], None] | None = None,
    ) -> None:
        self._client = client
        self._spark = spark
        self.sink = sink
        self._credentials = credentials or {}
        self._max_files = max_files
        self._max_bytes = max_bytes
        self._sample_bytes = infer_sample_bytes
        self._wait = lease_wait
        self._grace = shutdown_grace
        self.stop = stop or threading.Event()
        self._abandon = threading.Event()
        self._busy = threading.Event()  # a batch is in progress
        self._on_batch = on_batch
        self._commit_lock = threading.Lock()
        self._cleaned: dict[str, float] = {}  # table -> when its orphaned staging files were last removed

    def run(self) -> None:
        """Leases and processes batches until `stop` is set."""
        log.info("agent started", extra={"action": "agent.start", "agent": self._client.agent})
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
            self.process(batch)
        log.info("agent stopped", extra={"action": "agent.stop", "agent": self._client.agent})

    def abandon_current(self) -> None:
        """Called when the grace period ran out: the batch in progress commits nothing, and soon.

        Spark jobs are cancelled until the batch has returned (its files are then
        released): a job that starts after one cancellation, because the batch was
        between two jobs, is cancelled by the next one.
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
        if not self.stop.is_set():
            self._abandon.clear()  # a pending abandon (the grace period ran out) stays set
        self._busy.set()
        try:
            return self._process_batch(batch)
        finally:
            self._busy.clear()

    def _process_batch(self, batch: Batch) -> BatchOutcome:
        started = time.monotonic()
        outcome = BatchOutcome()
        with Heartbeat(self._client, batch.lease) as heartbeat:
            try:
                sample = self._sample_bytes > 0 and samples(batch.ingestion.format, batch.ingestion.schema)
                self._process(batch, list(batch.files), heartbeat, outcome, sample)
            except LeaseGone:
                if self._abandon.is_set() and not heartbeat.lost.is_set():
                    released = self._client.release(batch.lease.name)
                    log.warning("batch abandoned on shutdown; %d files released", released,
                                extra={"action": "agent.release", "lease": batch.lease.name})  # fmt: skip
                else:
                    log.warning("lease lost; batch abandoned", extra={"action": "agent.abandon",
                                                                      "lease": batch.lease.name})  # fmt: skip
                return outcome
        if outcome.results:
            answers = self._client.report(batch.lease.name, list(outcome.results.values()), outcome.schema_version)
            lost = [a.file for a in answers if a.lease_lost]
            if lost:
                log.warning("%d results were fenced (lease lost)", len(lost), extra={"action": "agent.fenced"})
        failed = sum(r.outcome == Outcome.OUTCOME_FAILED for r in outcome.results.values())
        log.info(
            "batch done: %d files, %d failed, %.1fs", len(batch.files), failed, time.monotonic() - started,
            extra={"action": "agent.batch", "lease": batch.lease.name},
        )  # fmt: skip
        if outcome.committed_files:
            self._remove_orphans(batch.ingestion.destination.table)
        if self._on_batch is not None:
            self._on_batch(batch, outcome)
        return outcome

    def _remove_orphans(self, table: str) -> None:
        """Hourly per table: staged files of batches that crashed before their commit."""
        now = time.monotonic()
        if now - self._cleaned.get(table, -ORPHAN_SWEEP_EVERY) < ORPHAN_SWEEP_EVERY:
            return
        self._cleaned[table] = now
        try:
            removed = self.sink.cleanup_orphans(table, ORPHAN_AGE)
        except Exception:
            log.exception("could not remove orphaned staging files", extra={"action": "agent.orphans"})
            return
        if removed:
            log.info("removed %d orphaned staging directories of %s", removed, table,
                     extra={"action": "agent.orphans"})  # fmt: skip

    def _process(
        self,
        batch: Batch,
        files: list[lease_pb2.LeasedFile],
        heartbeat: Heartbeat,
        outcome: BatchOutcome,
        sample: bool,
    ) -> None:
        try:
            counts = self._ingest(batch, files, heartbeat, sample)
        except LeaseGone:
            raise
        except Exception as error:
            if self._abandon.is_set() or not heartbeat.still_held():
                raise LeaseGone() from error
            if sample and not isinstance(error, StagingError):
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
        for f in files:
            outcome.results[f.name] = lease_pb2.FileResult(
                file=f.name, attempt=f.attempt, outcome=Outcome.OUTCOME_SUCCEEDED,
                records=counts.get(f.path, 0), bytes=f.size_bytes,
            )  # fmt: skip
        outcome.committed_files += len(files)
        outcome.schema_version = max(outcome.schema_version, self.sink.schema_version)

    def _check_held(self, heartbeat: Heartbeat) -> None:
        """Between Spark jobs: a batch abandoned or without its lease goes no further."""
        if self._abandon.is_set() or not heartbeat.still_held():
            raise LeaseGone()

    @contextlib.contextmanager
    def _layout_root(self) -> Iterator[Path | None]:
        """A directory for the batch's links (agent.layout), if this Spark reads the agent's disk."""
        if type(self._spark).__module__.startswith("pyspark.sql.connect"):
            yield None  # a Spark Connect server may run elsewhere
            return
        with tempfile.TemporaryDirectory(prefix="autoloader-batch-") as root:
            yield Path(root)

    def _ingest(
        self, batch: Batch, files: list[lease_pb2.LeasedFile], heartbeat: Heartbeat, sample: bool
    ) -> dict[str, int]:
        """Reads, stages and commits `files`; returns records per source path."""
        self._check_held(heartbeat)
        ingestion = batch.ingestion
        name = ingestion.destination.table
        uris = [f.path for f in files]
        source = ingestion.source
        with (
            StagedFiles(uris, self._credentials, source.credentials_ref, dict(source.options)) as staged,
            self._layout_root() as layout_root,
        ):
            sources = [
                SourceFile(
                    uri=f.path, local=staged.local(f.path),
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
            table = self.sink.table(name)
            aligned = align(read.frame, spark_types(table.schema()) if table else None, ingestion.schema.evolution)
            location = str(table.location()) if table is not None else self.sink.location_for(name)
            prefix = self.sink.staging_prefix(location, batch.lease.name)
            try:
                written = _write(aligned.frame, prefix, list(ingestion.destination.partition_by))
                contents = _read_staged(written)
                # A file Spark named in a way the join did not match (reader._with_source_columns)
                # lost all its rows: fail rather than commit the batch without them.
                unstaged = [staged.local(f.path) for f in files if f.size_bytes and not contents.counts.get(f.path)]
                if unstaged and (rows := read.rows_in(unstaged)):
                    raise UnmatchedRows(f"Spark read {rows} rows of {len(unstaged)} files and staged none of them")
                if malformed := read.rows_malformed():
                    # RESCUE keeps a row that does not fit the schema whole, as malformed; one that
                    # does not fit a schema from the heads may fit the whole files' (a wider type).
                    raise SampleMismatch(f"{malformed} rows did not fit the sampled schema")
                with self._commit_lock:
                    self._check_held(heartbeat)
                    _fault("crash_before_commit")
                    # Rows to add, or a table whose rows of these files must go (a file now empty).
                    # Empty files alone do not create a table: it would have no columns but ours.
                    if contents.data_files or table is not None:
                        adopted = self.sink.commit(
                            name, Staged(location, prefix, contents.data_files), contents.arrow_schema, uris,
                            batch.lease.name, list(ingestion.destination.partition_by),
                        )  # fmt: skip
                        if not adopted:
                            self.sink.discard(prefix)
                    _fault("crash_after_commit")
            except BaseException:
                self.sink.discard(prefix)
                raise
        return contents.counts


def _write(frame: Any, prefix: str, partition_by: list[Any]) -> list[str]:
    """Writes the frame as Parquet under prefix; returns the data files (URIs)."""
    from pyspark.sql import functions as F

    writer_frame = frame
    keys: list[str] = []
    for i, field_ in enumerate(partition_by):
        key = f"_p{i}"
        key_expr = _partition_key(F, frame, field_.column, field_.transform or "identity")
        writer_frame = writer_frame.withColumn(key, key_expr)
        keys.append(key)
    writer = writer_frame.write.mode("error")
    if keys:
        # One directory per partition value, so each file holds a single value (the partition
        # columns themselves stay in the files; the _p keys only group them).
        writer = writer.partitionBy(*keys)
    writer.parquet(prefix)
    return _parquet_files(prefix)


def _partition_key(F: Any, frame: Any, column: str, transform: str) -> Any:
    """A Spark expression with one value per Iceberg partition of `transform`."""
    col = F.col(column)
    kind, _, width = transform.partition("[")
    if kind == "identity":
        return col
    if kind == "year":
        return F.year(col)
    if kind == "month":
        return F.date_format(col, "yyyy-MM")
    if kind == "day":
        return F.to_date(col)
    if kind == "hour":
        return F.date_trunc("hour", col)
    if kind == "truncate":
        w = int(width.rstrip("]"))
        if frame.schema[column].dataType.simpleString() in ("string", "binary"):
            return F.substring(col, 1, w)
        return col - F.pmod(col, F.lit(w))
    if kind == "bucket":
        return _iceberg_bucket(frame.schema[column].dataType.simpleString(), int(width.rstrip("]")))(col)
    raise PartitionUnsupported(f"partition transform {transform!r} is not supported by this agent")


def _iceberg_bucket(spark_type: str, buckets: int) -> Any:
    """Iceberg's bucket transform (murmur3 of the value's Iceberg encoding) as a vectorized UDF.

    Spark's own hash() uses another seed and encoding, so the grouping must come
    from pyiceberg for each file to hold a single Iceberg bucket.
    """
    import pandas as pd
    from pyiceberg import types as T
    from pyiceberg.transforms import BucketTransform
    from pyspark.sql.pandas.functions import pandas_udf

    iceberg_types: dict[str, T.PrimitiveType] = {
        "int": T.IntegerType(), "bigint": T.LongType(), "string": T.StringType(), "date": T.DateType(),
        "binary": T.BinaryType(), "timestamp": T.TimestamptzType(), "timestamp_ntz": T.TimestampType(),
    }  # fmt: skip
    source = iceberg_types.get(spark_type)
    if source is None:
        raise PartitionUnsupported(f"bucket[{buckets}] is not supported on a {spark_type} column by this agent")
    bucket = BucketTransform(buckets).transform(source)

    def iceberg_bucket(values: Any) -> Any:
        return values.map(lambda v: None if v is None or v is pd.NaT else bucket(_iceberg_value(v))).astype("Int32")

    # Real classes, not the strings `from __future__ import annotations` leaves: pyspark reads them.
    iceberg_bucket.__annotations__ = {"values": pd.Series, "return": pd.Series}
    return pandas_udf(iceberg_bucket, "int")  # type: ignore[call-overload]


def _iceberg_value(value: Any) -> Any:
    """pandas values as pyiceberg's bucket function takes them (dates as days, timestamps as micros)."""
    import datetime as dt

    import pandas as pd

    if isinstance(value, pd.Timestamp):
        return int(value.value // 1000)
    if isinstance(value, dt.datetime):
        return int(value.timestamp() * 1_000_000)
    if isinstance(value, dt.date):
        return (value - dt.date(1970, 1, 1)).days
    if hasattr(value, "item"):
        return value.item()  # numpy scalars
    return value


def _parquet_files(prefix: str) -> list[str]:
    parsed = urlparse(prefix)
    if parsed.scheme in ("file", ""):
        from pathlib import Path

        # Plain file:// paths, not percent-encoded: pyiceberg and pyarrow take them verbatim.
        return sorted(f"file://{p}" for p in Path(parsed.path).rglob("*.parquet"))
    import fsspec

    fs, path = fsspec.core.url_to_fs(prefix)
    return sorted(f"{parsed.scheme}://{p}" for p in fs.find(path) if p.endswith(".parquet"))


@dataclass
class StagedContents:
    counts: dict[str, int]  # rows per source file (its URI)
    data_files: list[str]  # the staged files with rows (Spark writes empty ones for empty inputs)
    arrow_schema: Any  # the staged files' schema; None when Spark wrote none


def _read_staged(files: list[str]) -> StagedContents:
    """What Spark staged, from each file's footer and its dictionary-encoded _source_file column.

    pyarrow reads that one column in milliseconds; a second Spark job over the
    staged files cost as much as a third of the write.
    """
    import pyarrow.parquet as pq

    contents = StagedContents({}, [], None)
    for uri in files:
        staged = pq.ParquetFile(local_path(uri))
        if contents.arrow_schema is None:
            contents.arrow_schema = staged.schema_arrow.remove_metadata()
        if staged.metadata.num_rows == 0:
            continue
        contents.data_files.append(uri)
        column = staged.read(columns=["_source_file"]).column(0)
        for entry in column.value_counts().to_pylist():
            contents.counts[entry["values"]] = contents.counts.get(entry["values"], 0) + entry["counts"]
    return contents


def _failure(file: lease_pb2.LeasedFile, error: BaseException) -> lease_pb2.FileResult:
    kind, retryable = _classify(error)
    return lease_pb2.FileResult(
        file=file.name, attempt=file.attempt, outcome=Outcome.OUTCOME_FAILED,
        error=lease_pb2.FileErrorDetail(type=kind, message=_message(error), retryable=retryable),
    )  # fmt: skip


def _classify(error: BaseException) -> tuple[str, bool]:
    if isinstance(error, NewColumnsRejected):
        return "NewColumnsRejected", False
    # UnmatchedRows: this agent cannot attribute the file's rows, however often it tries.
    if isinstance(error, (UnsupportedFormat, PartitionUnsupported, UnmatchedRows)):
        return type(error).__name__, False
    if isinstance(error, StagingError):
        return "SourceUnavailable", True
    text = str(error)
    if _DATA_ERRORS.search(text):
        return "MalformedFile", False
    return type(error).__name__, True


def _message(error: BaseException) -> str:
    """The first meaningful lines of an error, without JVM stack traces."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(("at ", "JVM stacktrace", "..."))][:3]
    return (" ".join(kept) or type(error).__name__)[:1000]


def _fault(point: str) -> None:
    if os.environ.get(FAULT) == point:
        log.warning("test fault: exiting at %s", point, extra={"action": "agent.fault"})
        os._exit(17)
