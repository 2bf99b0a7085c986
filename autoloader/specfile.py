"""Ingestion spec files: YAML or JSON in the proto3 JSON mapping of autoloader.v1.Ingestion.

Enum values may be written in full (TYPE_JSON, EVOLUTION_RESCUE) or short
(JSON, RESCUE, json); field names in lowerCamelCase or snake_case.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from autoloader.v1 import ingestion_pb2 as pb


class SpecError(Exception):
    """The spec file cannot be read or does not describe an ingestion."""


def load_spec(path: Path | str) -> pb.Ingestion:
    """Reads a spec file ("-" reads standard input)."""
    try:
        text = Path("/dev/stdin").read_text() if str(path) == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return parse_spec(text, str(path))


def parse_spec(text: str, origin: str = "spec") -> pb.Ingestion:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{origin} is not valid YAML or JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{origin} must be a mapping of ingestion fields (source, format, destination, ...)")
    data = expand_enums(data, pb.Ingestion.DESCRIPTOR)
    message = pb.Ingestion()
    try:
        json_format.ParseDict(_jsonable(data), message)
    except json_format.ParseError as exc:
        raise SpecError(f"{origin}: {exc}") from exc
    return message


def _jsonable(value: Any) -> Any:
    """YAML gives datetimes for timestamps; the JSON mapping wants RFC 3339 strings."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        text = value.isoformat()
        return text if ("+" in text[10:] or text.endswith("Z")) else text + "Z"
    return value


def _enum_prefix(enum: EnumDescriptor) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def _expand_enum(value: Any, enum: EnumDescriptor) -> Any:
    if not isinstance(value, str) or value in enum.values_by_name:
        return value
    candidate = _enum_prefix(enum) + value.upper()
    return candidate if candidate in enum.values_by_name else value


def _fields(descriptor: Descriptor, key: str) -> FieldDescriptor | None:
    return descriptor.fields_by_name.get(key) or next((f for f in descriptor.fields if f.json_name == key), None)


def expand_enums(data: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    """Returns data with short enum values ("JSON") replaced by full names ("TYPE_JSON")."""
    result: dict[str, Any] = {}
    for key, value in data.items():
        field = _fields(descriptor, key) if isinstance(key, str) else None
        if field is None:
            result[key] = value
        elif field.enum_type is not None:
            result[key] = (
                [_expand_enum(v, field.enum_type) for v in value]
                if isinstance(value, list)
                else (_expand_enum(value, field.enum_type))
            )
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            nested = field.message_type
            if isinstance(value, list):
                result[key] = [expand_enums(v, nested) if isinstance(v, dict) else v for v in value]
            elif isinstance(value, dict):
                result[key] = expand_enums(value, nested)
            else:
                result[key] = value
        else:
            result[key] = value
    return result


def leaf_paths(data: dict[str, Any], descriptor: Descriptor, prefix: str = "") -> Iterator[str]:
    """Update-mask paths (snake_case) of the fields a spec dict sets.

    Nested messages contribute their leaves; maps, lists and well-known types
    (timestamps, durations) are one path each.
    """
    for key, value in data.items():
        field = _fields(descriptor, key)
        if field is None:
            continue
        path = f"{prefix}{field.name}"
        nested = field.message_type
        if (
            nested is not None
            and not nested.GetOptions().map_entry
            and not field.is_repeated
            and not nested.full_name.startswith("google.protobuf.")
            and isinstance(value, dict)
            and value
        ):
            yield from leaf_paths(value, nested, path + ".")
        else:
            yield path
