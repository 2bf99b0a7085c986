"""A batch's files under directories that name their metadata columns' values.

Spark reads `root/_ingested_at=V/_run=V/_source_file=V/_source_modified_at=V/name` with
those four as partition columns: constants of the file, which the scan appends to each
row as it appends `_metadata`, at no cost per row (in the order they nest: the reader puts
them back in PARTITION_COLUMNS' order). Attaching them by joining every row's
path to the batch's files cost a third of the write (docs/benchmarks.md).

The directories hold symbolic links to the files, so nothing is copied, named so that
Hadoop can read files whose own names it cannot parse. A value Spark could not read back
exactly from a directory name - a name over the file system's 255 bytes, or non-ASCII
when Python or the JVM does not name files in UTF-8 - makes `lay_out` answer None, and
the reader attaches the columns by the join instead.
"""

from __future__ import annotations

import contextlib
import os
import re
from datetime import UTC, datetime
from pathlib import Path

PARTITION_COLUMNS = (
    ("_source_file", "string"),
    ("_source_modified_at", "timestamp"),
    ("_ingested_at", "timestamp"),
    ("_run", "string"),
)
# How they nest (indexes into PARTITION_COLUMNS): a batch's files share their _ingested_at and
# _run, so outermost those are two directories for the batch and each file adds two, not four.
# Each directory is a metadata write the file system journals, and a busy disk makes those
# cost a millisecond each.
NESTING = (2, 3, 0, 1)
NULL = "__HIVE_DEFAULT_PARTITION__"  # how Spark names a null partition value
_MAX_NAME_BYTES = 255
# Spark unescapes %XX in partition directory names, one byte to one character: every ASCII
# character but these is escaped, and non-ASCII ones are left as they are.
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_ESCAPES = {code: f"%{code:02X}" for code in range(128) if chr(code) not in _SAFE}
_EXTENSION = re.compile(r"\.[A-Za-z0-9]+")


def directory_name(column: str, value: str | None, utf8_names: bool = False) -> str | None:
    """`column=value` as a directory Spark reads back as exactly `value`; None if it can't.

    utf8_names: whether Python and Spark's JVM both name files in UTF-8, so a non-ASCII
    value survives as it is.
    """
    if value is None:
        return f"{column}={NULL}"
    if not (value.isascii() or utf8_names):
        return None
    name = f"{column}={value.translate(_ESCAPES)}"
    return name if len(name.encode("utf-8", "surrogatepass")) <= _MAX_NAME_BYTES else None


def timestamp_value(moment: datetime | None) -> str | None:
    """A partition value Spark casts to this instant whatever the session's time zone."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00:00")


def lay_out(files: list[tuple[str, tuple[str | None, ...]]], root: Path, utf8_names: bool = False) -> list[str] | None:
    """Links each (local path, values of PARTITION_COLUMNS) under root; the links' paths.

    None, with nothing created, if a value cannot be a directory name (see directory_name).
    """
    names = []
    for path, values in files:
        parts = [
            directory_name(column, value, utf8_names)
            for (column, _), value in zip(PARTITION_COLUMNS, values, strict=True)
        ]
        if any(part is None for part in parts) or not Path(path).is_absolute():
            return None
        names.append((path, [parts[i] for i in NESTING]))
    root.mkdir(parents=True, exist_ok=True)
    links = []
    made: set[str] = set()
    for index, (path, parts) in enumerate(names):
        # os and strings, not pathlib (parents=True tries each missing level twice): this runs for
        # every file of every batch.
        directory = str(root)
        for part in parts:
            directory = f"{directory}/{part}"
            if directory not in made:
                with contextlib.suppress(FileExistsError):  # the same file twice in a batch
                    os.mkdir(directory)
                made.add(directory)
        # Named by position: Hadoop cannot read a name with ':' (or '?', '#'), common in object
        # keys. The extension stays: it names the codec (.gz, .bz2).
        suffix = os.path.splitext(path)[1]
        link = f"{directory}/{index}{suffix if _EXTENSION.fullmatch(suffix) else ''}"
        os.symlink(path, link)
        links.append(link)
    return links
