"""Field-mask updates over nested dicts (the JSON form of a spec).

A path names a field ("format.delimiter") or a whole message ("limits"). The
value at that path is copied from the patch to the current spec; everything
else is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from controlplane.domain.errors import FieldViolation, InvalidArgument


def apply_mask(
    current: Mapping[str, Any],
    patch: Mapping[str, Any],
    paths: Iterable[str],
    *,
    mutable: Iterable[str],
    immutable: Iterable[str],
) -> dict[str, Any]:
    """Returns current with the values at `paths` taken from patch.

    `mutable` lists every path that may change (messages and their fields); a
    path under an immutable or output-only field, or an unknown one, is an
    InvalidArgument.
    """
    mutable_paths = frozenset(mutable)
    immutable_paths = frozenset(immutable)
    paths = list(paths)
    violations: list[FieldViolation] = []
    if not paths:
        violations.append(FieldViolation("update_mask", "is required: name the fields to change"))
    for path in paths:
        if _covered(path, immutable_paths):
            violations.append(FieldViolation("update_mask", f"{path!r} cannot be changed after creation"))
        elif any(m.startswith(path + ".") for m in immutable_paths):
            violations.append(FieldViolation("update_mask", f"{path!r} includes fields that cannot change"))
        elif path not in mutable_paths:
            # Exact paths only: "limits.max_attempts.x" or "limits.bogus" name nothing.
            violations.append(FieldViolation("update_mask", f"unknown or read-only field {path!r}"))
    if violations:
        raise InvalidArgument(violations=violations)
    result = _deep_copy(current)
    for path in paths:
        *parents, leaf = path.split(".")
        source: Any = patch
        target = result
        for part in parents:
            source = source.get(part) if isinstance(source, Mapping) else None
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        value = source.get(leaf) if isinstance(source, Mapping) else None
        if value is None:
            target.pop(leaf, None)
        else:
            target[leaf] = _deep_copy(value) if isinstance(value, Mapping) else value
    return result


def _covered(path: str, prefixes: frozenset[str]) -> bool:
    parts = path.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts) + 1))


def _deep_copy(value: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in value.items()}
