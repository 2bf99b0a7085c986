"""Control-plane settings, read once in bootstrap (environment prefix AUTOLOADER_)."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from autoloader.paths import default_state_dir


def _seconds_or_iso(value: object) -> object:
    """Durations from the environment: plain seconds ("30", "2.5") or ISO 8601 ("PT30S", "P7D")."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
        return float(value)
    return value


Duration = Annotated[timedelta, BeforeValidator(_seconds_or_iso)]


class ControlPlaneSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUTOLOADER_", extra="ignore")

    # Unset: an embedded PostgreSQL under state_dir.
    database_url: SecretStr | None = None
    state_dir: Path = Field(default_factory=default_state_dir)
    listen_address: str = "127.0.0.1:50051"
    # Seconds a process gets to finish its work on SIGTERM: the control plane's in-flight calls (a
    # report waits for its commit), an agent's current batch. One meaning on every process.
    shutdown_grace: float = 30.0
    # Seconds between database health probes.
    health_interval: float = 2.0
    db_pool_size: int = 10
    grpc_workers: int = 32
    # How long a request id is remembered: a retry later than this is a new request.
    idempotency_retention: Duration = timedelta(days=7)
    # Seconds between housekeeping rounds (purging expired request ids).
    maintenance_interval: float = 3600.0
    # Seconds between sweeps that end runs whose last files were reported concurrently
    # (or whose last reporter crashed before ending the run).
    finalize_sweep_interval: float = 1.0
    # Files per discovery transaction; agents may start on each chunk as soon as it commits.
    discovery_chunk_size: int = 1000
    # A discovery whose replica has been silent this long is taken over by another.
    discovery_stale_after: Duration = timedelta(seconds=30)
    # Seconds between checks for discovery work started on other replicas.
    discovery_poll: float = 2.0
    # Source credentials by name (credentials_ref -> fsspec storage options), as JSON:
    # AUTOLOADER_CREDENTIALS='{"shop": {"key": "...", "secret": "..."}}'. Never returned by the API.
    credentials: dict[str, dict[str, str]] = Field(default_factory=dict, repr=False)
    # How long a lease lasts without an extension; agents extend at a third of it.
    lease_ttl: Duration = timedelta(seconds=60)
    # Whether the agents' Spark can read Avro (spark-avro). Unset: whether this machine's pyspark has it.
    spark_avro: bool | None = None
    # Iceberg: the warehouse (default: state_dir/warehouse) and pyiceberg catalog properties
    # (AUTOLOADER_CATALOG_URI, AUTOLOADER_CATALOG_TYPE=rest, ...). Without them the catalog is a
    # SqlCatalog in this control plane's database. Agents never open it.
    warehouse: str = ""
    catalog_name: str = "autoloader"
    # A replica committing to a table that has been silent this long is taken over by another.
    commit_stale_after: Duration = timedelta(seconds=10)
    # Seconds between checks for commits to make (intents written on other replicas, silent owners).
    commit_poll: float = 0.5
    # Group commit: how long a table's first waiting batch may wait for the batches other agents
    # are still working on, so that one snapshot carries them all (0: commit each at once).
    commit_linger: Duration = timedelta(seconds=1)
    # Sagas (a deletion that drops the table): a step silent this long, its replica presumed dead,
    # is finished by the reconciler of any replica, which looks every reconcile_interval seconds.
    saga_stale_after: Duration = timedelta(seconds=30)
    reconcile_interval: float = 10.0
    # Staged data older than this that no snapshot references is removed (its batch never committed).
    orphan_age: Duration = timedelta(hours=6)
    # Seconds between a table's sweeps for such staged data (after a commit to it).
    orphan_sweep_interval: float = 3600.0
    log_format: str = "text"
    log_level: str = "INFO"

    def catalog_properties(self) -> dict[str, str]:
        """AUTOLOADER_CATALOG_<KEY>=value -> {key: value} (pyiceberg property names, lower case; __ is .)."""
        prefix = "AUTOLOADER_CATALOG_"
        reserved = {"AUTOLOADER_CATALOG_NAME"}
        return {
            key[len(prefix) :].lower().replace("__", "."): value
            for key, value in os.environ.items()
            if key.startswith(prefix) and key not in reserved
        }

    def warehouse_uri(self) -> str:
        return self.warehouse or (self.state_dir / "warehouse").resolve().as_uri()
