"""Local defaults every process shares."""

from __future__ import annotations

from pathlib import Path


def default_state_dir() -> Path:
    """Where the embedded database, the local warehouse and agents' scratch space live by default."""
    return Path.home() / ".autoloader"
