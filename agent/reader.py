"""Spark: a batch of source files -> one DataFrame with the metadata columns.

Text formats are read in FAILFAST mode, so a malformed record fails its file
(the worker isolates it) instead of silently becoming nulls; in RESCUE mode
malformed records are kept, as text, in `_rescued_data`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from autoloader.v1 import ingestion_pb2

Format = ingestion_pb2.Format
Schema = ingestion_pb2.Schema

METADATA_COLUMNS = ("_source_file", "_source_modified_at", "_ingested_at", "_run")
RESCUED = "_rescued_data"
_CORRUPT = "_corrupt_record"


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


def _read_path(column: Any) -> Any:
    """Spark's _metadata.file_path (a URI, percent-encoded the Java way) back to a plain path."""
    from pyspark.sql import functions as F

    path = F.regexp_replace(column, "^file:/+", "/")
    # Java leaves '+' unencoded, while url_decode would read it as a space.
    return F.url_decode(F.replace(path, F.lit("+"), F.lit("%2B")))


def explicit_schema(schema: Schema) -> str:
    """The ingestion's explicit columns as a Spark DDL string."""
    return ", ".join(f"`{c.name}` {c.type}{' NOT NULL' if c.required else ''}" for c in schema.columns)


def read_batch(spark: Any, fmt: Format, schema: Schema, files: list[SourceFile]) -> Any:
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
    by_path = F.create_map(*[x for f in files for x in (F.lit(local_path(f.local)), F.lit(f.uri))])
    modified = F.create_map(*[x for f in files for x in (F.lit(f.uri), F.lit(f.modified_time).cast("timestamp"))])
    runs = F.create_map(*[x for f in files for x in (F.lit(f.uri), F.lit(f.run))])
    source = F.element_at(by_path, _read_path(F.col("_metadata.file_path")))
    return (
        df.withColumn("_source_file", source)
        .withColumn("_source_modified_at", F.element_at(modified, F.col("_source_file")))
        .withColumn("_ingested_at", F.current_timestamp())
        .withColumn("_run", F.element_at(runs, F.col("_source_file")))
    )


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
