"""Resource names: "ingestions/{ingestion}" and its children."""

from __future__ import annotations

import re

from controlplane.domain.errors import InvalidArgument
from controlplane.domain.validation import INGESTION_ID


def parse_ingestion_name(name: str, field: str = "name") -> str:
    """Returns the ingestion id of "ingestions/{id}"; a bare id is accepted too."""
    ingestion_id = name.removeprefix("ingestions/")
    if not name:
        raise InvalidArgument.field(field, "is required: ingestions/{ingestion}")
    if not INGESTION_ID.fullmatch(ingestion_id):
        raise InvalidArgument.field(field, f"{name!r} is not an ingestion name: ingestions/{{ingestion}}")
    return ingestion_id


_RUN_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9]{3}[0-9a-f]{4}")


def parse_run_name(name: str, field: str = "name") -> tuple[str, str]:
    """ "ingestions/{ingestion}/runs/{run}" -> (ingestion id, run id)."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "ingestions" or parts[2] != "runs":
        raise InvalidArgument.field(field, f"{name!r} is not a run name: ingestions/{{ingestion}}/runs/{{run}}")
    if not INGESTION_ID.fullmatch(parts[1]) or not _RUN_ID.fullmatch(parts[3]):
        raise InvalidArgument.field(field, f"{name!r} is not a run name: ingestions/{{ingestion}}/runs/{{run}}")
    return parts[1], parts[3]


def parse_file_name(name: str, field: str = "name") -> tuple[str, int]:
    """ "ingestions/{ingestion}/files/{file}" -> (ingestion id, file id)."""
    parts = name.split("/")
    if (
        len(parts) != 4
        or parts[0] != "ingestions"
        or parts[2] != "files"
        or not INGESTION_ID.fullmatch(parts[1])
        or not re.fullmatch(r"[0-9]{1,18}", parts[3])
    ):
        raise InvalidArgument.field(field, f"{name!r} is not a file name: ingestions/{{ingestion}}/files/{{file}}")
    return parts[1], int(parts[3])
