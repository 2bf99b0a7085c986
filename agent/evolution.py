"""A batch's columns against the table's: what each evolution mode does with the difference.

ADD_NEW_COLUMNS  new columns are added to the table in the batch's own commit.
RESCUE           new columns, and values that do not fit the table's type, go into
                 `_rescued_data` as JSON text; the table's columns never change.
FAIL_ON_NEW_COLUMNS  a batch with new columns fails (non-retryably), naming them.
NONE             new columns are dropped.

Columns the table has and the batch lacks are null. A value whose type conflicts
with the table's column is converted with try_cast: it never crashes the agent,
and in RESCUE mode the original value is kept in `_rescued_data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.reader import METADATA_COLUMNS, RESCUED
from autoloader.v1 import ingestion_pb2

Schema = ingestion_pb2.Schema


class NewColumnsRejected(Exception):
    """FAIL_ON_NEW_COLUMNS and the batch has columns the table does not."""

    def __init__(self, columns: list[str]) -> None:
        super().__init__(f"new columns not allowed by FAIL_ON_NEW_COLUMNS: {', '.join(columns)}")
        self.columns = columns


@dataclass(frozen=True)
class Aligned:
    frame: Any
    added: list[str]  # columns the table gains in this commit


def align(df: Any, table_columns: dict[str, str] | None, evolution: int) -> Aligned:
    """`table_columns` maps the table's column names to Spark SQL types; None if there is no table yet."""
    from pyspark.sql import functions as F

    data = [c for c in df.columns if c not in METADATA_COLUMNS and c != RESCUED]
    if table_columns is None:
        return Aligned(_ordered(df, data, evolution), data)
    known = {c.lower() for c in table_columns}
    new = [c for c in data if c.lower() not in known]
    if new and evolution == Schema.EVOLUTION_FAIL_ON_NEW_COLUMNS:
        raise NewColumnsRejected(new)
    rescued: list[Any] = []
    converted: dict[str, Any] = {}
    present = {c.lower(): c for c in df.columns}
    for name, type_ in table_columns.items():
        if name in METADATA_COLUMNS or name == RESCUED:
            continue
        source = present.get(name.lower())
        if source is None:
            converted[name] = F.lit(None).cast(type_)
        elif _spark_type(df, source) != type_:
            cast = F.expr(f"try_cast(`{source}` AS {type_})")
            # The original text of a value that did not fit the table's type.
            rescued.append(F.when(cast.isNull() & F.col(source).isNotNull(), F.col(source).cast("string")).alias(name))
            converted[name] = cast
        elif source != name:
            converted[name] = F.col(source)
    added: list[str] = []
    if evolution == Schema.EVOLUTION_RESCUE:
        # Rescue first: it reads the original values, which the conversions below replace.
        rescued.extend(F.col(c).alias(c) for c in new)
        df = _rescue(df, rescued).drop(*new)
    elif evolution == Schema.EVOLUTION_NONE:
        df = df.drop(*new)
    else:
        added = new
    if converted:
        df = df.withColumns(converted)
    columns = [c for c in table_columns if c not in METADATA_COLUMNS and c != RESCUED] + added
    if evolution == Schema.EVOLUTION_RESCUE or RESCUED in table_columns:
        columns.append(RESCUED)
    return Aligned(df.select(*columns, *METADATA_COLUMNS), added)


def _ordered(df: Any, data: list[str], evolution: int) -> Any:
    from pyspark.sql import functions as F

    if evolution == Schema.EVOLUTION_RESCUE:
        if RESCUED not in df.columns:
            df = df.withColumn(RESCUED, F.lit(None).cast("string"))
        return df.select(*data, RESCUED, *METADATA_COLUMNS)
    return df.select(*data, *METADATA_COLUMNS)


def _rescue(df: Any, values: list[Any]) -> Any:
    """Merges `values` (non-null ones only) into _rescued_data as a JSON object text."""
    from pyspark.sql import functions as F

    existing = F.col(RESCUED) if RESCUED in df.columns else F.lit(None).cast("string")
    if not values:
        return df.withColumn(RESCUED, existing)
    packed = F.to_json(F.struct(*values))  # nulls are omitted: {} when nothing was rescued
    merged = F.when(packed == F.lit("{}"), existing).otherwise(
        F.when(existing.isNull(), packed).otherwise(F.to_json(F.struct(existing.alias("_malformed"), *values)))
    )
    return df.withColumn(RESCUED, merged)


def _spark_type(df: Any, column: str) -> str:
    return str(df.schema[column].dataType.simpleString())
