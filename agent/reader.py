"""Spark: a batch of source files -> one DataFrame with the metadata columns.

Text formats are read in FAILFAST mode, so a malformed record fails its file
(the worker isolates it) instead of silently becoming nulls; in RESCUE mode
malformed records are kept, as text, in `_rescued_data`.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from autoloader.v1 import ingestion_pb2

Format = ingestion_pb2.Format
Schema = ingestion_pb2.Schema

METADATA_COLUMNS = ("_source_file", "_source_modified_at", "_ingested_at", "_run")
RESCUED = "_rescued_data"
_CORRUPT = "_corrupt_record"
_SPARK_PATH = "_autoloader_spark_path"


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
    _rows_read: Any  # a pyspark Observation of the rows Spark read

    def rows_read(self) -> int:
        """How many rows Spark read from the files; only once the frame has been written."""
        return int(self._rows_read.get["rows"])


def read_batch(spark: Any, fmt: Format, schema: Schema, files: list[SourceFile]) -> BatchFrame:
    """The files' rows with their source columns plus _source_file, _source_modified_at, _ingested_at, _run."""
    from pyspark.sql import functions as F

    rescue = schema.evolution == Schema.EVOLUTION_RESCUE
    reader = spark.read
    if schema.mode == Schema.MODE_EXPLICIT and schema.columns:
        ddl = explicit_schema(schema)
        if rescue and fmt.type in (Format.TYPE_JSON, Format.TYPE_CSV):
            ddl += f", `{_CORRUPT}` string"
        reader = reader.schema(ddl)
    reader = _with_options(reader, fmt, rescue)
    paths = [_glob_escaped(local_path(f.local)) for f in files]
    read = {
        Format.TYPE_JSON: reader.json,
        Format.TYPE_CSV: reader.csv,
        Format.TYPE_PARQUET: lambda p: reader.parquet(*p),  # varargs, unlike the others
        Format.TYPE_ORC: reader.orc,
        Format.TYPE_TEXT: reader.text,
    }.get(fmt.type)
    if read is None:
        raise UnsupportedFormat(f"format {Format.Type.Name(fmt.type)} is not supported by this agent's Spark")
    df = read(paths)
    if rescue and _CORRUPT in df.columns:
        df = df.withColumnRenamed(_CORRUPT, RESCUED)
    for name, type_ in schema.hints.items():
        if name in df.columns:
            df = df.withColumn(name, F.expr(f"try_cast(`{name}` AS {type_})"))
    from pyspark.sql import Observation

    # Counted as the rows stream through the write: no extra pass.
    rows_read = Observation(f"rows-read-{uuid.uuid4().hex}")
    df = df.observe(rows_read, F.count(F.lit(1)).alias("rows"))
    return BatchFrame(_with_source_columns(spark, df, files), rows_read)


def _with_source_columns(spark: Any, df: Any, files: list[SourceFile]) -> Any:
    """Adds each row's _source_file, _source_modified_at and _run by joining on its file's path.

    The small side is keyed by the paths as Spark spells them (from inputFiles(), no
    scan), so each row costs one hash probe on its raw _metadata.file_path. Decoding
    that path per row and looking it up in literal maps made the write half again as
    slow, and so does an outer join; with this inner join a row whose path matched
    no key would be dropped, which the worker detects (rows written < rows read) and
    fails the batch for.
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
        .drop(_SPARK_PATH)
        .withColumn("_ingested_at", F.current_timestamp())
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
    if fmt.type == Format.TYPE_CSV:
        reader = reader.option("header", fmt.header).option("inferSchema", True)
        for option, value in (("sep", fmt.delimiter), ("quote", fmt.quote), ("escape", fmt.escape)):
            if value:
                reader = reader.option(option, value)
    return reader
