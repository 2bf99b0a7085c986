"""Files by URI: the one place that tells a local path (file://) from an object store (fsspec).

Discovery lists `file://` URIs without percent-encoding (`file:///data/a b.json`),
so a local URI's path is the text after the scheme, as it is.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


def is_local(uri: str) -> bool:
    return urlparse(uri).scheme in ("file", "")


def local_path(uri: str) -> str:
    """A file:// URI (as the control plane lists it: not percent-encoded) as a plain path."""
    return uri.removeprefix("file://") if uri.startswith("file://") else uri


def _fs(uri: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(uri)  # type: ignore[no-any-return]


def find(prefix: str, suffix: str) -> list[str]:
    """The URIs of the files under `prefix` whose names end with `suffix`, sorted."""
    if is_local(prefix):
        return sorted(f"file://{p}" for p in Path(local_path(prefix)).rglob(f"*{suffix}"))
    scheme = urlparse(prefix).scheme
    fs, path = _fs(prefix)
    return sorted(f"{scheme}://{p}" for p in fs.find(path) if p.endswith(suffix))


def remove(uri: str) -> None:
    """Removes one file; a missing one is not an error."""
    if is_local(uri):
        Path(local_path(uri)).unlink(missing_ok=True)
        return
    fs, path = _fs(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)


def remove_tree(prefix: str) -> None:
    """Removes everything under `prefix`; a missing one is not an error."""
    if is_local(prefix):
        shutil.rmtree(local_path(prefix), ignore_errors=True)
        return
    fs, path = _fs(prefix)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def open_input(uri: str) -> Any:
    """A binary stream of the file."""
    if is_local(uri):
        return open(local_path(uri), "rb")
    fs, path = _fs(uri)
    return fs.open(path, "rb")
