"""Spark: a batch of source files -> one DataFrame with the metadata columns.

Text formats are read in FAILFAST mode, so a malformed record fails its file
(the worker isolates it) instead of silently becoming nulls; in RESCUE mode
malformed records are kept, as text, in `_rescued_data`.
"""

from __future__ import annotations

import functools
import re
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from agent.layout import PARTITION_COLUMNS, lay_out, timestamp_value
from agent.sampling import pooled_sample
from autoloader.v1 import ingestion_pb2

Format = ingestion_pb2.Format
Schema = ingestion_pb2.Schema

METADATA_COLUMNS = tuple(name for name, _ in PARTITION_COLUMNS)
RESCUED = "_rescued_data"
_CORRUPT = "_corrupt_record"
_SPARK_PATH = "_autoloader_spark_path"
_SHADOWED = "_autoloader_shadowed"


@dataclass(frozen=True)
class SourceFile:
    uri: str  # as the control plane knows it: the value of _source_file
    local: str  # what Spark reads
    modified_time: datetime | None
    run: str  # the run's id


def local_path(uri: str) -> str:
    """A file:// URI (as the control plane lists it: not percent-encoded) as a plain path."""
    return uri.removeprefix("file://") if uri.startswith("file://") else uri


def _glob_escaped(path: str) -> str:
    # Spark expands glob characters in the paths it is given; ours name single files.
    return re.sub(r"([\\\[\]{}*?])", r"\\\1", path)


def _plain_path(spark_path: str) -> str:
    """A path as Spark names a file it read (a URI, percent-encoded the Java way) as a plain path.

    Java leaves '+' unencoded and unquote() leaves it too (it is not a form decoder).
    """
    if spark_path.startswith("file:"):
        return "/" + unquote(spark_path.removeprefix("file:")).lstrip("/")
    return unquote(spark_path)


def _spellings(spark_path: str) -> list[str]:
    """The ways Spark spells one file: inputFiles() says file:///p where _metadata.file_path says file:/p."""
    if spark_path.startswith("file:"):
        rest = spark_path.removeprefix("file:").lstrip("/")
        return [f"file:/{rest}", f"file:///{rest}"]
    return [spark_path]


def explicit_schema(schema: Schema) -> str:
    """The ingestion's explicit columns as a Spark DDL string."""
    return ", ".join(f"`{c.name}` {c.type}{' NOT NULL' if c.required else ''}" for c in schema.columns)


@dataclass(frozen=True)
class BatchFrame:
    frame: Any  # the files' rows with their source columns and ours
    _read: Callable[[list[str]], Any]  # local paths -> their rows, read as the frame reads them
    _malformed: Any = None  # with a sampled schema and RESCUE: a pyspark Observation

    def rows_in(self, paths: list[str]) -> int:
        """How many rows Spark reads from these of the batch's files (a job of its own)."""
        return int(self._read([local_path(p) for p in paths]).count())

    def rows_malformed(self) -> int:
        """With a sampled schema and RESCUE, the rows Spark could not parse (kept whole in
        _rescued_data); otherwise 0. Once the frame is written."""
        return int(self._malformed.get["malformed"]) if self._malformed is not None else 0


def samples(fmt: Format, schema: Schema) -> bool:
    """Whether read_batch infers this batch's schema from the heads of its files (agent.sampling).

    JSON lines only: a multiline document cannot be cut, and a head cut at a newline
    byte is whole lines only in an encoding that keeps ASCII's newline.
    """
    explicit = schema.mode == Schema.MODE_EXPLICIT and bool(schema.columns)
    ascii_newlines = fmt.encoding.lower().replace("-", "").replace("_", "") in ("", "utf8", "ascii", "usascii")
    return fmt.type == Format.TYPE_JSON and not fmt.multiline and ascii_newlines and not explicit


def read_batch(
    spark: Any, fmt: Format, schema: Schema, files: list[SourceFile], sample_bytes: int = 0, scratch: Path | None = None
) -> BatchFrame:
    """The files' rows with their source columns plus _source_file, _source_modified_at, _ingested_at, _run.

    With sample_bytes (and a batch that `samples`), the schema is inferred from the
    first sample_bytes of each file, not from all of them. With scratch (a directory
    the Spark session can read, kept until the frame is written), the files are read
    through links that carry our columns as partition values (agent.layout).
    """
    from pyspark.sql import Observation
    from pyspark.sql import functions as F

    if fmt.type not in _LOADERS:
        raise UnsupportedFormat(f"format {Format.Type.Name(fmt.type)} is not supported by this agent's Spark")
    rescue = schema.evolution == Schema.EVOLUTION_RESCUE
    plain_paths = [local_path(f.local) for f in files]
    ingested_at = datetime.now(UTC)
    links = None
    if scratch is not None:
        links = lay_out(
            [(p, (f.uri, timestamp_value(f.modified_time), timestamp_value(ingested_at), f.run))
             for p, f in zip(plain_paths, files, strict=True)],
            scratch,
            _utf8_file_names(spark),
        )  # fmt: skip
    # Inference reads the links too: Hadoop reads them where it cannot parse the files' own names.
    readable = dict(zip(plain_paths, links or plain_paths, strict=True))
    sampled = bool(sample_bytes) and samples(fmt, schema)
    data_schema: Any = None  # a DDL string or a StructType; None: Spark infers it as it reads
    if schema.mode == Schema.MODE_EXPLICIT and schema.columns:
        data_schema = explicit_schema(schema)
        if rescue and fmt.type in (Format.TYPE_JSON, Format.TYPE_CSV):
            data_schema += f", `{_CORRUPT}` string"
    elif sampled:
        data_schema = _sampled_schema(spark, fmt, schema, list(readable.values()), sample_bytes)

    def read(paths: list[str], with_schema: Any = data_schema, **options: str) -> Any:
        """The rows of these of the batch's files (local paths), as the batch reads them."""
        reader = spark.read if with_schema is None else spark.read.schema(with_schema)
        escaped = [_glob_escaped(readable.get(p, p)) for p in paths]
        return _LOADERS[fmt.type](_with_options(reader, fmt, rescue).options(**options), escaped)

    if links is not None:
        # Spark infers the data columns as the plain read would: from the files, not their directories.
        inferred = data_schema if data_schema is not None else read(plain_paths).schema
        assert scratch is not None
        # The directory, not its thousand links: Spark lists it in a fraction of the time it takes to
        # check and index the links one by one (0.3 s against 0.5 s for 1,000 files).
        root = spark.read.schema(_with_partition_columns(spark, inferred))
        df = _LOADERS[fmt.type](_with_options(root, fmt, rescue).option("basePath", str(scratch)),
                                [_glob_escaped(str(scratch))])  # fmt: skip
        # Spark appends partition columns in the order the directories nest (layout.NESTING); this
        # projection folds into align's.
        data = [c for c in df.columns if c not in METADATA_COLUMNS and not c.startswith(_SHADOWED)]
        df = df.select(*[F.col("`{}`".format(c.replace("`", "``"))) for c in data], *METADATA_COLUMNS)
    else:
        df = _with_source_columns(spark, read(plain_paths), files, ingested_at)
    if rescue and _CORRUPT in df.columns:
        df = df.withColumnRenamed(_CORRUPT, RESCUED)
    for name, type_ in schema.hints.items():
        if name in df.columns:
            df = df.withColumn(name, F.expr(f"try_cast(`{name}` AS {type_})"))
    if sampled and rescue:
        # A row past the heads that does not fit the sampled schema is kept whole, as malformed:
        # counted as the rows stream through the write, so the worker can infer again.
        malformed = Observation(f"malformed-{uuid.uuid4().hex}")
        df = df.observe(malformed, F.count(RESCUED).alias("malformed"))
        return BatchFrame(df, read, malformed)
    return BatchFrame(df, read)


@functools.cache
def _utf8_file_names(spark: Any) -> bool:
    """Whether Python and the session's JVM both name files in UTF-8 (a link's directories are
    named by one and read by the other)."""
    jvm = spark.sparkContext._jvm.java.lang.System.getProperty("sun.jnu.encoding")
    return all(str(e).lower().replace("-", "") == "utf8" for e in (jvm, sys.getfilesystemencoding()))


_LOADERS: dict[int, Callable[[Any, list[str]], Any]] = {
    Format.TYPE_JSON: lambda reader, paths: reader.json(paths),
    Format.TYPE_CSV: lambda reader, paths: reader.csv(paths),
    Format.TYPE_PARQUET: lambda reader, paths: reader.parquet(*paths),  # varargs, unlike the others
    Format.TYPE_ORC: lambda reader, paths: reader.orc(paths),
    Format.TYPE_TEXT: lambda reader, paths: reader.text(paths),
}


def _with_partition_columns(spark: Any, data_schema: Any) -> Any:
    """The data columns, then ours (read from the links' directories).

    A source column named like one of ours is read under another name and dropped:
    ours replace it, and CSV columns are matched by position, so it must stay in place.
    """
    from pyspark.sql.types import StructField, StructType

    if isinstance(data_schema, str):
        data_schema = spark.createDataFrame([], data_schema).schema
    ours = {name for name, _ in PARTITION_COLUMNS}
    fields = [
        StructField(f"{_SHADOWED}{f.name}", f.dataType, f.nullable) if f.name in ours else f for f in data_schema.fields
    ]
    return StructType(fields + [StructField(name, _partition_type(type_)) for name, type_ in PARTITION_COLUMNS])


def _partition_type(name: str) -> Any:
    from pyspark.sql.types import StringType, TimestampType

    return {"string": StringType(), "timestamp": TimestampType()}[name]


def _sampled_schema(spark: Any, fmt: Format, schema: Schema, paths: list[str], sample_bytes: int) -> Any:
    """The schema Spark infers from the files' heads, with the columns the read needs beyond them.

    Hinted columns the heads lack are read too (a hint names a column the user knows
    of, however rare), and RESCUE needs the corrupt-record column whether or not the
    heads had a malformed line.
    """
    from pyspark.sql.types import StringType

    rescue = schema.evolution == Schema.EVOLUTION_RESCUE
    with tempfile.TemporaryDirectory(prefix="autoloader-sample-") as scratch:
        sample = pooled_sample(paths, sample_bytes, Path(scratch), _parallelism(spark))
        inferred = _with_options(spark.read, fmt, rescue).json([_glob_escaped(p) for p in sample]).schema
    present = {name.lower() for name in inferred.fieldNames()}
    missing = {name: type_ for name, type_ in schema.hints.items() if name.lower() not in present}
    if missing:
        declared = spark.createDataFrame([], ", ".join(f"`{n}` {t}" for n, t in missing.items())).schema
        for field_ in declared.fields:
            inferred = inferred.add(field_)
    if rescue and _CORRUPT not in inferred.fieldNames():
        inferred = inferred.add(_CORRUPT, StringType())
    return inferred


def _parallelism(spark: Any) -> int:
    """How many tasks Spark runs at once here: one pool of heads for each (Spark Connect: 2)."""
    try:
        return max(1, int(spark.sparkContext.defaultParallelism))
    except Exception:  # Spark Connect has no SparkContext
        return 2


def _with_source_columns(spark: Any, df: Any, files: list[SourceFile], ingested_at: datetime) -> Any:
    """Adds our columns to a frame read from the files themselves, joining each row's path to its file.

    For batches agent.layout cannot lay out, or a Spark that cannot see the agent's disk;
    the layout costs nothing per row, this join a third of the write.

    The small side is keyed by the paths as Spark spells them (from inputFiles(), no
    scan), so each row costs one hash probe on its raw _metadata.file_path. Decoding
    that path per row and looking it up in literal maps made the write half again as
    slow, and so does an outer join. With this inner join, the rows of a file whose
    path Spark spelled in a way no key matches would be dropped, all of them (the
    path is the file's): the worker checks every file that staged no rows.
    """
    from pyspark.sql import functions as F

    by_path = {local_path(f.local): f for f in files}
    keys = []
    for spark_path in df.inputFiles():
        source = by_path.get(_plain_path(spark_path))
        if source is None:
            raise UnmatchedRows(f"Spark read {spark_path}, which is none of the batch's files")
        keys += [(key, source.uri, source.modified_time, source.run) for key in _spellings(spark_path)]
    sources = spark.createDataFrame(
        keys, f"{_SPARK_PATH} string, _source_file string, _source_modified_at timestamp, _run string"
    )
    data = df.drop(*[c for c in METADATA_COLUMNS if c in df.columns])  # ours replace same-named source columns
    return (
        data.withColumn(_SPARK_PATH, F.col("_metadata.file_path"))
        .join(F.broadcast(sources), _SPARK_PATH)
        .withColumn("_ingested_at", F.lit(ingested_at))
        .select(*data.columns, *METADATA_COLUMNS)
    )


class UnmatchedRows(Exception):
    """Rows Spark read that could not be attributed to one of the batch's files."""


class UnsupportedFormat(Exception):
    pass


def _with_options(reader: Any, fmt: Format, rescue: bool) -> Any:
    if fmt.type in (Format.TYPE_JSON, Format.TYPE_CSV):
        reader = reader.option("mode", "PERMISSIVE" if rescue else "FAILFAST")
        if rescue:
            reader = reader.option("columnNameOfCorruptRecord", _CORRUPT)
        reader = reader.option("multiLine", fmt.multiline)
        if fmt.encoding:
            reader = reader.option("encoding", fmt.encoding)
    if fmt.type in (Format.TYPE_PARQUET, Format.TYPE_ORC):
        # Every file's footer: by default Spark takes the schema of one file and drops the
        # columns only others have.
        reader = reader.option("mergeSchema", True)
    if fmt.type == Format.TYPE_CSV:
        reader = reader.option("header", fmt.header).option("inferSchema", True)
        for option, value in (("sep", fmt.delimiter), ("quote", fmt.quote), ("escape", fmt.escape)):
            if value:
                reader = reader.option(option, value)
    return reader
