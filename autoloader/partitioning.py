"""The partition-transform grammar of ingestion specs, shared by validation, the agent and the committer.

`identity` (default), `year`, `month`, `day`, `hour`, `bucket[N]`, `truncate[W]`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TRANSFORM = re.compile(r"^(identity|year|month|day|hour|bucket\[(\d{1,7})\]|truncate\[(\d{1,7})\])$")
KINDS = ("identity", "year", "month", "day", "hour", "bucket", "truncate")


@dataclass(frozen=True)
class Transform:
    kind: str  # one of KINDS
    width: int = 0  # N of bucket[N], W of truncate[W]; 0 otherwise


def parse_transform(text: str) -> Transform | None:
    """The transform `text` names ("" is identity), or None if it is not one."""
    match = TRANSFORM.fullmatch(text or "identity")
    if match is None:
        return None
    kind = match.group(1).partition("[")[0]
    width = match.group(2) or match.group(3)
    return Transform(kind, int(width) if width else 0)
