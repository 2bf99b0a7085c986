"""A batch's rows -> Parquet data files under the lease's staging location -> what was staged.

The agent never commits: it names the staged files and their per-source row
counts in its report, and the control plane commits them (or removes them when
the lease was lost). Each file holds a single value of every partition field,
so the committer can add the files as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.errors import PartitionUnsupported
from autoloader import files
from autoloader.columns import SOURCE_FILE
from autoloader.partitioning import parse_transform
from autoloader.v1 import ingestion_pb2, lease_pb2


@dataclass
class StagedData:
    prefix: str  # the directory of this piece of the batch
    counts: dict[str, int]  # rows per source file (its URI)
    data_files: list[lease_pb2.DataFile]  # the staged files with rows (Spark writes empty ones for empty inputs)


def stage(frame: Any, prefix: str, partition_by: list[ingestion_pb2.PartitionField]) -> StagedData:
    """Writes the frame as Parquet under prefix (one directory per partition value); returns what it holds."""
    from pyspark.sql import functions as F

    writer_frame = frame
    keys: list[str] = []
    for i, field in enumerate(partition_by):
        key = f"_p{i}"
        writer_frame = writer_frame.withColumn(key, _partition_key(F, frame, field.column, field.transform))
        keys.append(key)
    writer = writer_frame.write.mode("error")
    if keys:
        # The partition columns themselves stay in the files; the _p keys only group them.
        writer = writer.partitionBy(*keys)
    writer.parquet(prefix)
    return _read_staged(prefix, files.find(prefix, ".parquet"))


def discard(prefix: str) -> None:
    files.remove_tree(prefix)


def _partition_key(F: Any, frame: Any, column: str, text: str) -> Any:
    """A Spark expression with one value per Iceberg partition of the transform."""
    transform = parse_transform(text)
    if transform is None:
        raise PartitionUnsupported(f"partition transform {text!r} is not supported by this agent")
    col = F.col(column)
    if transform.kind == "identity":
        return col
    if transform.kind == "year":
        return F.year(col)
    if transform.kind == "month":
        return F.date_format(col, "yyyy-MM")
    if transform.kind == "day":
        return F.to_date(col)
    if transform.kind == "hour":
        return F.date_trunc("hour", col)
    if transform.kind == "truncate":
        if frame.schema[column].dataType.simpleString() in ("string", "binary"):
            return F.substring(col, 1, transform.width)
        return col - F.pmod(col, F.lit(transform.width))
    return _iceberg_bucket(frame.schema[column].dataType.simpleString(), transform.width)(col)


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


def _read_staged(prefix: str, uris: list[str]) -> StagedData:
    """What Spark staged, from each file's footer and its dictionary-encoded _source_file column.

    pyarrow reads that one column in milliseconds; a second Spark job over the
    staged files cost as much as a third of the write.
    """
    import pyarrow.parquet as pq

    staged = StagedData(prefix, {}, [])
    for uri in uris:
        with files.open_input(uri) as stream:
            parquet = pq.ParquetFile(stream)
            rows = parquet.metadata.num_rows
            if rows == 0:
                continue
            column = parquet.read(columns=[SOURCE_FILE]).column(0)
            for entry in column.value_counts().to_pylist():
                staged.counts[entry["values"]] = staged.counts.get(entry["values"], 0) + entry["counts"]
            stream.seek(0, 2)
            size = stream.tell()
        staged.data_files.append(lease_pb2.DataFile(path=uri, record_count=rows, size_bytes=size))
    return staged
