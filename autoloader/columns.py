"""The columns autoloader adds to every row, known to the agent (which writes them) and the control plane.

The control plane replaces a source file's rows by deleting on `_source_file`;
the agent fills it with the file's URI exactly as discovery listed it.
"""

from __future__ import annotations

SOURCE_FILE = "_source_file"
SOURCE_MODIFIED_AT = "_source_modified_at"
INGESTED_AT = "_ingested_at"
RUN = "_run"
RESCUED = "_rescued_data"

# Name and Spark type of each column the agent appends, in order.
METADATA_COLUMNS: tuple[tuple[str, str], ...] = (
    (SOURCE_FILE, "string"),
    (SOURCE_MODIFIED_AT, "timestamp"),
    (INGESTED_AT, "timestamp"),
    (RUN, "string"),
)
METADATA_COLUMN_NAMES = tuple(name for name, _ in METADATA_COLUMNS)
