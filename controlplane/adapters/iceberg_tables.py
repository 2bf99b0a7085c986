"""Iceberg tables, as the committer uses them: describe, commit staged data files, recognise past commits.

The one invariant: a commit is applied only on top of the table state it was
built from. pyiceberg's snapshot producers require the branch to still point
at the snapshot the transaction loaded (`AssertRefSnapshotId`), and the
catalog swaps metadata with a compare-and-set. `commit()` checks the caller's
fence (does this replica still own the table?) after loading the table and
before committing, so a committer that was paused anywhere can only land a
commit if nothing was committed since its fence check; anyone who took over
commits first and the stale commit fails. Every snapshot names the commits it
carries (`autoloader.commits`), so an attempt whose outcome is unknown (a
crash, a lost connection) is recognised afterwards instead of being redone.
"""

from __future__ import annotations

import bisect
import logging
import os
import shutil
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any
from urllib.parse import urlparse

from pyiceberg import types as T
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError
from pyiceberg.expressions import AlwaysTrue, BooleanExpression, In, Or
from pyiceberg.io import load_file_io
from pyiceberg.manifest import ManifestContent, ManifestFile
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.transforms import (
    BucketTransform,
    DayTransform,
    HourTransform,
    IdentityTransform,
    MonthTransform,
    Transform,
    TruncateTransform,
    YearTransform,
)

from autoloader import files
from autoloader.columns import SOURCE_FILE
from autoloader.partitioning import parse_transform
from controlplane.domain.commits import STAGING, FenceLost, StagedBatch, TableInfo

log = logging.getLogger(__name__)

# Snapshot summary properties: the commits (intent ids) and the leases a snapshot carries.
COMMITS_PROPERTY = "autoloader.commits"
LEASES_PROPERTY = "autoloader.leases"
# Whole values as _source_file's bounds, not the default 16-character prefix, which the paths
# of one table share: with it, every commit's delete of its batch's rows found every data file
# of the table a candidate and read it (commits grew from 0.07 s to 0.6 s in 11 batches).
#
# No commit retries inside pyiceberg: on a conflict it refreshes the table and rebuilds the
# transaction on top of whatever landed since, which is exactly how a paused committer's stale
# batch would overwrite newer rows. Our committer retries itself, after checking its fence again.
TABLE_PROPERTIES = {f"write.metadata.metrics.column.{SOURCE_FILE}": "full", "commit.retry.num-retries": "0"}
# Snapshots this much older than a commit's intent cannot carry it (clock skew between hosts).
RECOGNITION_MARGIN_MS = 10 * 60 * 1000
# pyiceberg checks an IN predicate against a file's bounds only up to this many values; past it
# every file "might match" and a delete reads them all (pyiceberg.expressions.visitors).
IN_LIMIT = 200
# Manifests are immutable: their _source_file bounds are kept, this many manifests' worth.
BOUNDS_CACHE_MANIFESTS = 4096

Bounds = tuple[bytes | None, bytes | None]  # a data file's _source_file lower and upper bound


class PartitionUnsupported(Exception):
    """A partition transform this committer cannot apply."""


class IcebergTables:
    def __init__(self, catalog: Catalog, describe_ttl: float = 2.0) -> None:
        self.catalog = catalog
        self._ttl = describe_ttl
        self._described: dict[str, tuple[float, TableInfo]] = {}
        self._bounds: OrderedDict[tuple[str, int], list[Bounds]] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        """Releases the catalog's database connections (a SqlCatalog holds a pool)."""
        engine = getattr(self.catalog, "engine", None)
        if engine is not None:
            engine.dispose()

    def load(self, name: str) -> Table | None:
        try:
            return self.catalog.load_table(name)
        except NoSuchTableError:
            return None

    def describe(self, name: str) -> TableInfo:
        """The table as of at most `describe_ttl` seconds ago (this replica's commits refresh it)."""
        now = time.monotonic()
        with self._lock:
            cached = self._described.get(name)
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        return self._remember(name, self.load(name))

    def _remember(self, name: str, table: Table | None) -> TableInfo:
        if table is None:
            info = TableInfo(name, False, self._new_location(name), (), 0)
        else:
            schema = table.schema()
            info = TableInfo(
                name, True, str(table.location()), tuple(spark_types(schema).items()), schema.schema_id + 1
            )
        with self._lock:
            self._described[name] = (time.monotonic(), info)
        return info

    def _new_location(self, name: str) -> str:
        """Where the catalog puts a new table: its data is staged there before the table exists."""
        namespace, _, short = name.rpartition(".")
        warehouse = str(self.catalog.properties.get("warehouse", "")).rstrip("/")
        return f"{warehouse}/{namespace.replace('.', '/')}.db/{short}"

    def committed(self, table: Table, commit_ids: Iterable[str], since_ms: int) -> set[str]:
        """Which of these commits a snapshot of the table's main branch already carries.

        Walks back from the current snapshot to the first one older than `since_ms`
        (less a margin for clock skew), in memory: the metadata holds every snapshot.
        """
        wanted = set(commit_ids)
        found: set[str] = set()
        snapshot = table.current_snapshot()
        cutoff = since_ms - RECOGNITION_MARGIN_MS
        while snapshot is not None and wanted - found and snapshot.timestamp_ms >= cutoff:
            carried = (snapshot.summary.additional_properties if snapshot.summary else {}).get(COMMITS_PROPERTY, "")
            found.update(wanted.intersection(carried.split(",")))
            parent = snapshot.parent_snapshot_id
            snapshot = table.snapshot_by_id(parent) if parent is not None else None
        return found

    def commit(
        self,
        name: str,
        batches: Sequence[StagedBatch],
        partition_by: Sequence[tuple[str, str]],
        still_owner: Callable[[], bool],
        table: Table | None = None,
    ) -> int:
        """One commit for all `batches`: their sources' rows out, their data files in; returns the schema version.

        `table` is the state the caller loaded (and checked for already-committed
        batches); the commit applies on top of it or fails with CommitFailedException.
        Raises FenceLost if `still_owner()` says the table is no longer ours.
        """
        data_files = [path for batch in batches for path in batch.data_files]
        io = table.io if table is not None else load_file_io(self.catalog.properties, self._new_location(name))
        arrow_schema = _staged_schema(io, data_files)
        if table is None:
            if arrow_schema is None:
                raise ValueError("a table is created by a commit with data")  # the caller records such results
            table = self._create(name, arrow_schema, partition_by)
        if any(table.properties.get(k) != v for k, v in TABLE_PROPERTIES.items()):
            # A table an older version created: the properties first, in a commit of their own (no
            # snapshot), so that the data commit below is never retried by pyiceberg.
            with table.transaction() as tx:
                tx.set_properties(TABLE_PROPERTIES)
        if not still_owner():
            raise FenceLost(name)
        properties = {
            COMMITS_PROPERTY: ",".join(b.commit_id for b in batches),
            LEASES_PROPERTY: ",".join(sorted({b.lease for b in batches})),
        }
        sources = {source for batch in batches for source in batch.sources}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Delete operation did not match any records"
            with table.transaction() as tx:
                if arrow_schema is not None and _new_columns(table.schema(), arrow_schema):
                    with tx.update_schema() as update:
                        update.union_by_name(_optional(arrow_schema))
                if loaded := self._loaded_sources(table, sources):
                    tx.delete(_any_of(SOURCE_FILE, loaded), snapshot_properties=properties)
                if data_files and _adoptable(table):
                    tx.add_files(data_files, snapshot_properties=properties, check_duplicate_files=False)
                else:
                    for path in data_files:
                        tx.append(_read(io, path), snapshot_properties=properties)
        # The transaction left `table` at the committed metadata.
        info = self._remember(name, table)
        return info.schema_version

    def _loaded_sources(self, table: Table, sources: Collection[str]) -> list[str]:
        """The sources whose rows the table may hold: those inside some data file's _source_file bounds.

        Most commits load files the table has never seen, and deleting their (absent)
        rows by a predicate of a thousand values made pyiceberg read every data file
        of the table (IN_LIMIT): 320 files by a 5,000-file run's fifth commit. A file
        without bounds for the column may hold any source.
        """
        snapshot = table.current_snapshot()
        if snapshot is None or not sources:
            return []
        try:
            field_id = table.schema().find_field(SOURCE_FILE).field_id
        except ValueError:
            return []  # no such column: no row names a source
        ordered = sorted(source.encode() for source in sources)
        found: set[bytes] = set()
        for manifest in snapshot.manifests(table.io):
            if manifest.content != ManifestContent.DATA:
                continue  # delete files only take rows away
            for lower, upper in self._manifest_bounds(table, manifest, field_id):
                if lower is None or upper is None:
                    return sorted(sources)
                found.update(ordered[bisect.bisect_left(ordered, lower) : bisect.bisect_right(ordered, upper)])
                if len(found) == len(ordered):
                    return sorted(sources)
        return sorted(source.decode() for source in found)

    def _manifest_bounds(self, table: Table, manifest: ManifestFile, field_id: int) -> list[Bounds]:
        key = (manifest.manifest_path, field_id)
        with self._lock:
            cached = self._bounds.get(key)
            if cached is not None:
                self._bounds.move_to_end(key)
                return cached
        bounds = [
            ((entry.data_file.lower_bounds or {}).get(field_id), (entry.data_file.upper_bounds or {}).get(field_id))
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True)
        ]
        with self._lock:
            self._bounds[key] = bounds
            while len(self._bounds) > BOUNDS_CACHE_MANIFESTS:
                self._bounds.popitem(last=False)
        return bounds

    def _create(self, name: str, arrow_schema: Any, partition_by: Sequence[tuple[str, str]]) -> Table:
        namespace = name.rpartition(".")[0]
        self.catalog.create_namespace_if_not_exists(namespace)
        # At the location the batch was staged under, so the data files are inside the table.
        table = self.catalog.create_table_if_not_exists(
            name, schema=_optional(arrow_schema), location=self._new_location(name), properties=TABLE_PROPERTIES
        )
        if partition_by and not table.spec().fields:
            with table.update_spec() as spec:
                for column, transform in partition_by:
                    spec.add_field(column, iceberg_transform(transform))
            table = self.catalog.load_table(name)
        return table

    def drop(self, name: str) -> bool:
        """Drops the table and removes its files (data, metadata, leftover staging); False if it did not exist.

        pyiceberg's purge removes the files the metadata names; a local warehouse's table
        directory also holds staged data no snapshot names, so it goes as a whole.
        """
        table = self.load(name)
        if table is None:
            return False
        location = str(table.location())
        try:
            self.catalog.purge_table(name)
        except NoSuchTableError:
            return False
        with self._lock:
            self._described.pop(name, None)
        if location.startswith("file:") or location.startswith("/"):
            shutil.rmtree(urlparse(location).path if location.startswith("file:") else location, ignore_errors=True)
        return True

    def row_count(self, name: str) -> int:
        table = self.load(name)
        snapshot = table.current_snapshot() if table is not None else None
        if snapshot is None or snapshot.summary is None:
            return 0
        return int(snapshot.summary.additional_properties.get("total-records", 0))

    def empty(self, name: str, properties: dict[str, str]) -> None:
        table = self.load(name)
        if table is None or table.current_snapshot() is None:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Delete operation did not match any records"
            table.delete(AlwaysTrue(), snapshot_properties=properties)
        self._remember(name, table)

    def discard_files(self, paths: Iterable[str]) -> None:
        """Removes staged data files that will never be committed (a fenced batch, an aborted commit)."""
        for path in paths:
            files.remove(path)

    def cleanup_orphans(self, name: str, older_than_seconds: float, keep: Collection[str] = ()) -> int:
        """Deletes staging directories no snapshot references, older than the given age (local warehouses).

        `keep` names lease directories to spare whatever their age: their data waits in a
        pending intent (a committer outage longer than the age).

        The table's manifests are read only when some directory is old enough to be
        a candidate, and each manifest once, however many snapshots share it.
        """
        table = self.load(name)
        if table is None:
            return 0
        root = urlparse(f"{table.location().rstrip('/')}/data/{STAGING}")
        if root.scheme not in ("file", ""):
            return 0
        from pathlib import Path

        base = Path(root.path)
        if not base.is_dir():
            return 0
        now = time.time()
        spared = set(keep)
        candidates = [
            d for d in base.iterdir() if d.name not in spared and now - d.stat().st_mtime >= older_than_seconds
        ]
        if not candidates:
            return 0
        referenced = {urlparse(f).path if "://" in f else f for f in _referenced_files(table)}
        removed = 0
        for directory in candidates:
            if not any(str(p) in referenced for p in directory.rglob("*.parquet")):
                shutil.rmtree(directory, ignore_errors=True)
                removed += 1
        return removed


def _any_of(column: str, values: Sequence[str]) -> BooleanExpression:
    """column IN values, as IN predicates small enough for pyiceberg to check against bounds."""
    chunks = [In(term=column, literals=values[i : i + IN_LIMIT]) for i in range(0, len(values), IN_LIMIT)]
    return chunks[0] if len(chunks) == 1 else Or(*chunks)


def is_conflict(error: BaseException) -> bool:
    """Another commit landed first: reload and try again."""
    return isinstance(error, CommitFailedException)


def _referenced_files(table: Table) -> set[str]:
    """Every data file some snapshot still references (time travel needs them too)."""
    referenced: set[str] = set()
    seen: set[str] = set()
    for snapshot in table.snapshots():
        for manifest in snapshot.manifests(table.io):
            if manifest.manifest_path in seen:
                continue
            seen.add(manifest.manifest_path)
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=False):
                referenced.add(entry.data_file.file_path)
    return referenced


def _staged_schema(io: Any, paths: Sequence[str]) -> Any:
    """The union of the staged files' schemas (batches of one group may add different columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = []
    for path in paths:
        with io.new_input(path).open() as stream:
            schemas.append(pq.read_schema(stream).remove_metadata())
    if not schemas:
        return None
    return pa.unify_schemas(schemas, promote_options="permissive")


def _adoptable(table: Table) -> bool:
    """Whether staged files can join the table as they are.

    add_files infers a file's partition from its column bounds, which works for
    identity and the time and truncate transforms, not for bucket; a bucketed
    table gets the staged rows appended (pyiceberg writes them again).
    """
    return not any(isinstance(field.transform, BucketTransform) for field in table.spec().fields)


def _read(io: Any, path: str) -> Any:
    import pyarrow.parquet as pq

    with io.new_input(path).open() as stream:
        return pq.read_table(stream)


def _optional(arrow_schema: Any) -> Any:
    """Every column nullable: a later file may lack any column."""
    import pyarrow as pa

    return pa.schema([f.with_nullable(True) for f in arrow_schema])


def _new_columns(schema: Schema, arrow_schema: Any) -> list[str]:
    known = {f.name for f in schema.fields}
    return [f.name for f in arrow_schema if f.name not in known]


def iceberg_transform(text: str) -> Transform[Any, Any]:
    parsed = parse_transform(text)
    if parsed is None:
        raise PartitionUnsupported(f"partition transform {text!r} is not supported")
    simple: dict[str, Transform[Any, Any]] = {
        "identity": IdentityTransform(), "year": YearTransform(), "month": MonthTransform(),
        "day": DayTransform(), "hour": HourTransform(),
    }  # fmt: skip
    if parsed.kind == "truncate":
        return TruncateTransform(parsed.width)
    if parsed.kind == "bucket":
        return BucketTransform(parsed.width)
    return simple[parsed.kind]


def spark_types(schema: Schema) -> dict[str, str]:
    """The table's columns as Spark SQL type strings (what the agent aligns its rows to)."""
    return {f.name: _spark_type(f.field_type) for f in schema.fields}


def _spark_type(t: T.IcebergType) -> str:
    simple = {
        T.LongType: "bigint", T.IntegerType: "int", T.StringType: "string", T.DoubleType: "double",
        T.FloatType: "float", T.BooleanType: "boolean", T.DateType: "date", T.TimestamptzType: "timestamp",
        T.TimestampType: "timestamp_ntz", T.BinaryType: "binary",
    }  # fmt: skip
    for kind, name in simple.items():
        if isinstance(t, kind):
            return name
    if isinstance(t, T.DecimalType):
        return f"decimal({t.precision},{t.scale})"
    if isinstance(t, T.StructType):
        return "struct<" + ",".join(f"{f.name}:{_spark_type(f.field_type)}" for f in t.fields) + ">"
    if isinstance(t, T.ListType):
        return f"array<{_spark_type(t.element_type)}>"
    if isinstance(t, T.MapType):
        return f"map<{_spark_type(t.key_type)},{_spark_type(t.value_type)}>"
    return "string"


def open_catalog(name: str, properties: dict[str, str], database_url: str) -> Catalog:
    """The configured pyiceberg catalog; without a uri or type, a SqlCatalog in the control plane's database."""
    from pyiceberg.catalog import load_catalog

    properties = dict(properties)
    if "uri" not in properties and "type" not in properties:
        properties["type"] = "sql"
        properties["uri"] = _psycopg3(database_url)
    if properties.get("warehouse", "").startswith("file://"):
        os.makedirs(properties["warehouse"].removeprefix("file://"), exist_ok=True)
    return load_catalog(name, **properties)


def _psycopg3(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url
