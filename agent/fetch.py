"""Object-store files as local paths for a local Spark.

A local Spark reads file:// directly. This Spark build cannot read s3a:// (no
hadoop-aws), so other schemes are copied through fsspec into a temporary
directory first; a cluster behind Spark Connect reads object stores itself.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from urllib.parse import urlparse

from autoloader.storage_options import MissingCredentials, fsspec_protocol, storage_options


class FetchError(Exception):
    """A file could not be fetched (missing, denied, unreachable)."""


class FetchedSources:
    """`with FetchedSources(...) as fetched: fetched.local(uri)`; the copies are removed on exit."""

    def __init__(
        self,
        uris: list[str],
        credentials: Mapping[str, Mapping[str, str]],
        credentials_ref: str,
        options: Mapping[str, str],
        scratch: Path | None = None,
    ) -> None:
        self._uris = uris
        try:
            self._options = storage_options(options, credentials, credentials_ref)
        except MissingCredentials:
            raise FetchError(f"credentials {credentials_ref!r} are not configured on this agent") from None
        self._scratch = scratch
        self._dir: Path | None = None
        self._local: dict[str, str] = {}

    def __enter__(self) -> FetchedSources:
        remote = [u for u in self._uris if urlparse(u).scheme not in ("file", "")]
        if remote:
            self._dir = Path(tempfile.mkdtemp(prefix="autoloader-staging-", dir=self._scratch))
            self._fetch(remote)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def local(self, uri: str) -> str:
        """A path Spark can read for `uri`."""
        return self._local.get(uri, uri)

    def _fetch(self, uris: list[str]) -> None:
        import fsspec

        assert self._dir is not None
        scheme = urlparse(uris[0]).scheme
        try:
            fs = fsspec.filesystem(fsspec_protocol(scheme), **self._options)
        except ImportError as exc:
            raise FetchError(f"{scheme}:// needs an extra package: {exc.name}") from None
        for i, uri in enumerate(uris):
            # Keep the file name: Spark picks the codec by its extension (.gz, .bz2, ...).
            target = self._dir / f"{i:06d}" / Path(urlparse(uri).path).name
            target.parent.mkdir()
            try:
                fs.get_file(uri, str(target))
            except FileNotFoundError:
                raise FetchError(f"{uri} no longer exists") from None
            except Exception as exc:
                raise FetchError(f"cannot fetch {uri}: {type(exc).__name__}: {exc}") from None
            self._local[uri] = f"file://{target}"
