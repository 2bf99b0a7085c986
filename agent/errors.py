"""What went wrong with a batch, and whether trying the same bytes again can help.

A file's failure is reported with a short type and a retryable flag: content
errors (malformed records, truncated or binary files, refused new columns)
quarantine the file at once; anything else is retried with backoff.
"""

from __future__ import annotations

import re

from agent.evolution import NewColumnsRejected
from agent.fetch import FetchError
from agent.reader import UnmatchedRows, UnsupportedFormat

# Spark errors about a file's content: retrying the same bytes cannot help.
_DATA_ERRORS = re.compile(
    r"Malformed|FAILFAST|EOFException|Unexpected end of input|not a Parquet file|NOT_A_PARQUET|corrupt|"
    r"Invalid UTF|CANNOT_PARSE|CANNOT_READ_FILE|FAILED_READ_FILE|incorrect header check|Not in GZIP format|"
    r"Could not read footer|magic number|decompress|UNABLE_TO_INFER_SCHEMA",
    re.IGNORECASE,
)


class LeaseGone(Exception):
    """The lease was lost or the batch abandoned: report nothing, stage nothing more."""


class SampleMismatch(Exception):
    """Rows a schema inferred from the files' heads could not hold; whole-file inference may."""


class PartitionUnsupported(Exception):
    """A partition transform this agent cannot group rows by."""


def classify(error: BaseException) -> tuple[str, bool]:
    """(error type, retryable) of a file that failed alone."""
    if isinstance(error, NewColumnsRejected):
        return "NewColumnsRejected", False
    # UnmatchedRows: this agent cannot attribute the file's rows, however often it tries.
    if isinstance(error, UnsupportedFormat | PartitionUnsupported | UnmatchedRows):
        return type(error).__name__, False
    if isinstance(error, FetchError):
        return "SourceUnavailable", True
    if _DATA_ERRORS.search(str(error)):
        return "MalformedFile", False
    return type(error).__name__, True


def message(error: BaseException) -> str:
    """The first meaningful lines of an error, without JVM stack traces."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(("at ", "JVM stacktrace", "..."))][:3]
    return (" ".join(kept) or type(error).__name__)[:1000]
