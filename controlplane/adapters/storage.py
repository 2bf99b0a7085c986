"""Listing source files: a streaming, resumable walk in byte order of the full path.

Each directory is read on its own and its entries sorted by name (a directory
by name + "/"), so a depth-first walk yields paths in byte order. That makes
a resume cursor exact: skip every path <= cursor, and whole subtrees that sort
before it. Memory is bounded by the largest single directory, never by the
whole tree.

Local directories are read with os.scandir (the fast path); everything else
through fsspec (s3fs for s3://; gcsfs and adlfs when installed).
"""

from __future__ import annotations

import logging
import os
import re
import stat as stat_module
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from autoloader.storage_options import MissingCredentials, fsspec_protocol, storage_options
from controlplane.domain.ingestion import Source
from controlplane.domain.runs import ListedFile

log = logging.getLogger(__name__)


class ListingError(Exception):
    """The source could not be listed; the message is meant for the run's error."""


@dataclass(frozen=True)
class Entry:
    name: str
    is_dir: bool
    size: int = 0
    modified_time: datetime | None = None
    etag: str = ""


ListDir = Callable[[str], list[Entry]]


def glob_to_regex(glob: str) -> re.Pattern[str]:
    """Glob over '/'-separated paths: * and ? stay within a segment, **/ spans
    segments, [abc] classes, {a,b} alternatives."""
    i, out, depth = 0, [], 0
    while i < len(glob):
        ch = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[" and glob.find("]", i + 2) != -1:
            end = glob.find("]", i + 2)  # "[]a]" holds "]"
            body = glob[i + 1 : end]
            negate = body[0] in "!^"
            # Ranges ("0-9") stay ranges; a class never matches the separator.
            members = (body[1:] if negate else body).replace("\\", "\\\\").replace("[", "\\[").replace("^", "\\^")
            out.append(f"[^/{members}]" if negate else f"(?!/)[{members}]")
            i = end
        elif ch == "{":
            out.append("(?:")
            depth += 1
        elif ch == "}" and depth:
            out.append(")")
            depth -= 1
        elif ch == "," and depth:
            out.append("|")
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out))


class FileMatcher:
    """Which relative paths an ingestion's source selects.

    A glob without '/' matches file names (at any depth when recursive); a glob
    with '/' matches the whole path relative to the source URI. Names starting
    with '.' or '_' (_SUCCESS, .crc, _temporary/) are never data, as in Spark.
    """

    def __init__(self, source: Source) -> None:
        self._pattern = glob_to_regex(source.glob) if source.glob else None
        self._by_path = "/" in source.glob
        self.descend = source.recursive or self._by_path
        self._modified_after = source.modified_after

    @staticmethod
    def hidden(name: str) -> bool:
        return name.startswith((".", "_"))

    def matches(self, relative: str, entry: Entry) -> bool:
        if self._modified_after is not None and (
            entry.modified_time is None or entry.modified_time < self._modified_after
        ):
            return False
        if self._pattern is None:
            return True
        return bool(self._pattern.fullmatch(relative if self._by_path else entry.name))


def walk(root: str, list_dir: ListDir, matcher: FileMatcher, after: str | None = None) -> Iterator[ListedFile]:
    """Yields matching files under root (a URI without trailing '/') in byte order, strictly after `after`."""

    def visit(directory: str, relative: str) -> Iterator[ListedFile]:
        try:
            listed = list_dir(directory)
        except FileNotFoundError:
            if not relative:
                raise  # the source itself is missing
            return  # a sub-directory removed while we listed
        entries = [e for e in listed if not FileMatcher.hidden(e.name)]
        entries.sort(key=lambda e: e.name + "/" if e.is_dir else e.name)
        for entry in entries:
            path = f"{directory}/{entry.name}"
            rel = f"{relative}{entry.name}"
            if entry.is_dir:
                if not matcher.descend:
                    continue
                prefix = path + "/"
                if after is not None and after > prefix and not after.startswith(prefix):
                    continue  # the whole subtree sorts before the cursor
                yield from visit(path, rel + "/")
            elif (after is None or path > after) and matcher.matches(rel, entry):
                yield ListedFile(path=path, size_bytes=entry.size, modified_time=entry.modified_time, etag=entry.etag)

    yield from visit(root.rstrip("/"), "")


def _local_list_dir(uri: str) -> list[Entry]:
    directory = uri.removeprefix("file://")
    entries = []
    with os.scandir(directory) as scanner:
        for item in scanner:
            if _undecodable(item.name):
                log.warning(
                    "skipped a name that is not valid UTF-8: %r", item.path, extra={"action": "discovery.bad_name"}
                )
                continue
            try:
                info = item.stat()
            except FileNotFoundError:
                continue  # removed while we listed
            if stat_module.S_ISDIR(info.st_mode):
                entries.append(Entry(item.name, True))
            elif stat_module.S_ISREG(info.st_mode):
                entries.append(
                    Entry(
                        item.name,
                        False,
                        info.st_size,
                        _from_ns(info.st_mtime_ns),
                        f"{info.st_size}-{info.st_mtime_ns}",
                    )
                )
    return entries


def _undecodable(name: str) -> bool:
    # os.scandir hands undecodable bytes over as lone surrogates; no URI, database
    # or reader downstream can carry such a name.
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _from_ns(ns: int) -> datetime:
    # Exact to the microsecond (a float of seconds since 1970 is not).
    return datetime.fromtimestamp(ns // 10**9, UTC).replace(microsecond=(ns // 1000) % 10**6)


def _fsspec_list_dir(fs: Any, scheme: str) -> ListDir:
    def list_dir(uri: str) -> list[Entry]:
        bucket_path = uri.split("://", 1)[1]
        entries = []
        for info in fs.ls(bucket_path, detail=True, refresh=True):
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            if info.get("type") == "directory":
                entries.append(Entry(name, True))
            else:
                modified = info.get("LastModified") or info.get("mtime") or info.get("updated")
                if isinstance(modified, str):
                    modified = datetime.fromisoformat(modified.replace("Z", "+00:00"))
                elif isinstance(modified, int | float):
                    modified = datetime.fromtimestamp(modified, UTC)
                etag = str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or "").strip('"')
                entries.append(Entry(name, False, int(info.get("size") or 0), modified, etag))
        return entries

    return list_dir


class SourceLister:
    """Lists an ingestion's source. `credentials` maps credentials_ref -> storage options."""

    def __init__(self, credentials: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self._credentials = dict(credentials or {})

    def list(self, source: Source, after: str | None = None) -> Iterator[ListedFile]:
        root = source.uri.rstrip("/")
        scheme = urlsplit(root).scheme.lower()
        list_dir = self._list_dir_for(scheme, source)
        try:
            yield from walk(root, list_dir, FileMatcher(source), after)
        except FileNotFoundError:
            raise ListingError(f"{source.uri} does not exist") from None
        except NotADirectoryError:
            raise ListingError(f"{source.uri} is not a directory") from None
        except PermissionError as exc:
            raise ListingError(f"access to {source.uri} was denied: {_reason(exc)}") from None
        except ListingError:
            raise
        except Exception as exc:
            raise ListingError(f"cannot list {source.uri}: {type(exc).__name__}: {_reason(exc)}") from None

    def _list_dir_for(self, scheme: str, source: Source) -> ListDir:
        if scheme == "file":
            return _local_list_dir
        try:
            options = storage_options(source.options, self._credentials, source.credentials_ref)
        except MissingCredentials:
            raise ListingError(
                f"credentials {source.credentials_ref!r} are not configured on the control plane"
            ) from None
        try:
            import fsspec

            fs = fsspec.filesystem(fsspec_protocol(scheme), skip_instance_cache=True, **options)
        except ImportError as exc:
            raise ListingError(f"{scheme}:// needs an extra package: {exc.name} (pip install {exc.name})") from None
        except (TypeError, ValueError) as exc:
            raise ListingError(f"bad storage options for {scheme}://: {exc}") from None
        return _fsspec_list_dir(fs, scheme)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
