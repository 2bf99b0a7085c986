"""Resource names: "ingestions/{ingestion}" and its children."""

from __future__ import annotations

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
