"""The one place that wires settings, database, services and the gRPC server.

Nothing connects to anything at import time; `start()` does it all and
returns a handle whose `stop()` undoes it in reverse.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from autoloader.v1 import (
    file_pb2,
    file_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    lease_pb2,
    lease_pb2_grpc,
    run_pb2,
    run_pb2_grpc,
)
from controlplane.adapters import migrations
from controlplane.adapters.database import make_engine, make_session_factory
from controlplane.adapters.embedded_postgres import EmbeddedPostgres
from controlplane.adapters.iceberg_tables import IcebergTables, is_conflict, open_catalog
from controlplane.adapters.storage import ListingError, SourceLister
from controlplane.adapters.unit_of_work import SqlAlchemyUnitOfWork
from controlplane.api.errors import ErrorInterceptor
from controlplane.api.health import HealthMonitor
from controlplane.api.ingestions import IngestionServicer
from controlplane.api.leases import LeaseServicer
from controlplane.api.runs import FileServicer, RunServicer
from controlplane.config import ControlPlaneSettings
from controlplane.domain.errors import DatabaseUnavailable
from controlplane.service.changes import ChangeFeed
from controlplane.service.commits import CommitLoop, CommitService
from controlplane.service.deletions import IngestionDeletions
from controlplane.service.discovery import DiscoveryLoop, DiscoveryService
from controlplane.service.files import FileService
from controlplane.service.ingestions import IngestionService
from controlplane.service.leases import LeaseService
from controlplane.service.maintenance import MaintenanceLoop, MaintenanceService
from controlplane.service.refreshes import IngestionRefreshes
from controlplane.service.runs import RunService

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    ingestion_pb2.DESCRIPTOR.services_by_name["IngestionService"].full_name,
    run_pb2.DESCRIPTOR.services_by_name["RunService"].full_name,
    file_pb2.DESCRIPTOR.services_by_name["FileService"].full_name,
    lease_pb2.DESCRIPTOR.services_by_name["LeaseService"].full_name,
)
# Keepalive settings that let agents' long-polls and streams survive idle NATs.
_SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # grpc enables SO_REUSEPORT by default: a second control plane on the same
    # port would silently share its traffic instead of failing to start.
    ("grpc.so_reuseport", 0),
]


class StartupError(Exception):
    """The control plane could not start; the message says why, for a person."""


@dataclass
class ControlPlane:
    server: grpc.Server
    executor: futures.ThreadPoolExecutor
    port: int
    engine: Engine
    health: HealthMonitor
    maintenance: MaintenanceLoop
    discovery: DiscoveryLoop
    committer: CommitLoop
    tables: IcebergTables
    deletions: IngestionDeletions
    refreshes: IngestionRefreshes
    embedded: EmbeddedPostgres | None
    settings: ControlPlaneSettings
    # Where the data lives (the embedded server's URL when embedded); for agents on this machine.
    database_url: str = field(default="", repr=False)
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        host = self.settings.listen_address.rpartition(":")[0] or "127.0.0.1"
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Drain (health NOT_SERVING), let in-flight calls finish, then release everything."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("draining", extra={"action": "server.drain"})
        self.health.drain()
        self.server.stop(self.settings.shutdown_grace if grace is None else grace).wait()
        # Handlers of cancelled calls may still be running; let them return their
        # database connections before the pool is disposed.
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.discovery.stop()
        self.committer.stop()
        self.maintenance.stop()
        self.tables.close()
        self.engine.dispose()
        if self.embedded is not None:
            self.embedded.stop()
        log.info("stopped", extra={"action": "server.stop"})

    def wait(self) -> None:
        self.server.wait_for_termination()


def _database_url(settings: ControlPlaneSettings) -> tuple[str, EmbeddedPostgres | None]:
    if settings.database_url is not None:
        return settings.database_url.get_secret_value(), None
    embedded = EmbeddedPostgres(settings.state_dir)
    try:
        return embedded.start(), embedded
    except Exception as exc:
        raise StartupError(f"could not start the embedded PostgreSQL in {embedded.pgdata}: {exc}") from exc


def _migrate(engine: Engine) -> None:
    try:
        migrations.upgrade(engine)
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise StartupError(f"cannot reach the database: {reason}") from exc
    except Exception as exc:
        message = getattr(exc, "message", None) or str(exc)
        raise StartupError(message) from exc


def _spark_has_avro(settings: ControlPlaneSettings) -> bool:
    """Avro needs the spark-avro package; the pyspark wheel does not ship it."""
    if settings.spark_avro is not None:
        return settings.spark_avro
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("pyspark")
    if spec is None or not spec.submodule_search_locations:
        return False
    jars = Path(next(iter(spec.submodule_search_locations))) / "jars"
    return any(jars.glob("spark-avro_*.jar"))


def start(settings: ControlPlaneSettings) -> ControlPlane:
    url, embedded = _database_url(settings)
    engine = make_engine(url, pool_size=settings.db_pool_size)
    try:
        _migrate(engine)
        session_factory = make_session_factory(engine)

        def probe() -> None:
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
            except OperationalError as exc:
                raise DatabaseUnavailable() from exc

        health = HealthMonitor(probe, SERVICE_NAMES, settings.health_interval)
        executor = futures.ThreadPoolExecutor(max_workers=settings.grpc_workers, thread_name_prefix="rpc")
        server = grpc.server(
            executor,
            interceptors=[ErrorInterceptor()],
            options=_SERVER_OPTIONS,
        )

        def uow_factory() -> SqlAlchemyUnitOfWork:
            return SqlAlchemyUnitOfWork(session_factory)

        properties = settings.catalog_properties()
        properties.setdefault("warehouse", settings.warehouse_uri())
        try:
            tables = IcebergTables(open_catalog(settings.catalog_name, properties, url))
        except Exception as exc:
            raise StartupError(f"cannot open the Iceberg catalog: {exc}") from exc
        deletions = IngestionDeletions(uow_factory, tables, stale_after=settings.saga_stale_after)
        ingestions = IngestionService(uow_factory, avro=_spark_has_avro(settings), deletions=deletions)
        run_changes, discovery_wakeup = ChangeFeed(), ChangeFeed()
        refreshes = IngestionRefreshes(uow_factory, tables, discovery_wakeup, stale_after=settings.saga_stale_after)
        runs = RunService(uow_factory, run_changes, discovery_wakeup)
        files = FileService(uow_factory, run_changes)
        commits = CommitService(
            uow_factory, tables, run_changes, stale_after=settings.commit_stale_after, is_conflict=is_conflict,
            orphan_age=settings.orphan_age.total_seconds(), orphan_every=settings.orphan_sweep_interval,
            linger=settings.commit_linger,
        )  # fmt: skip
        committer = CommitLoop(commits, poll=settings.commit_poll)
        leases = LeaseService(uow_factory, run_changes, ttl=settings.lease_ttl, commits=commits)
        discovery = DiscoveryLoop(
            DiscoveryService(
                uow_factory,
                SourceLister(settings.credentials),
                (ListingError,),
                run_changes,
                chunk_size=settings.discovery_chunk_size,
                stale_after=settings.discovery_stale_after,
            ),
            discovery_wakeup,
            poll=settings.discovery_poll,
        )
        housekeeping = MaintenanceService(uow_factory, settings.idempotency_retention, run_changes)
        maintenance = MaintenanceLoop(
            [
                (housekeeping.purge_idempotency_records, settings.maintenance_interval),
                (housekeeping.finalize_finished_runs, settings.finalize_sweep_interval),
                (deletions.reconcile, settings.reconcile_interval),
                (refreshes.reconcile, settings.reconcile_interval),
            ]
        )
        ingestion_pb2_grpc.add_IngestionServiceServicer_to_server(IngestionServicer(ingestions, refreshes), server)
        run_pb2_grpc.add_RunServiceServicer_to_server(RunServicer(runs), server)
        file_pb2_grpc.add_FileServiceServicer_to_server(FileServicer(files), server)
        lease_pb2_grpc.add_LeaseServiceServicer_to_server(LeaseServicer(leases), server)
        health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
        reflection.enable_server_reflection((*SERVICE_NAMES, "grpc.health.v1.Health", reflection.SERVICE_NAME), server)
        try:
            port = server.add_insecure_port(settings.listen_address)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {settings.listen_address}: {exc}") from exc
        if port == 0:
            raise StartupError(f"cannot listen on {settings.listen_address} (in use, or not a local address?)")
        server.start()
        health.start()
        maintenance.start()
        discovery.start()
        committer.start()
    except BaseException:
        engine.dispose()
        if embedded is not None:
            embedded.stop()
        raise
    plane = ControlPlane(
        server,
        executor,
        port,
        engine,
        health,
        maintenance,
        discovery,
        committer,
        tables,
        deletions,
        refreshes,
        embedded,
        settings,
        database_url=url,
    )
    log.info("serving", extra={"action": "server.start", "address": plane.address})
    return plane


def wait_for_signal(plane: ControlPlane, before_stop: Callable[[], None] | None = None) -> None:
    """Blocks until SIGTERM or SIGINT, then shuts the control plane down gracefully (after `before_stop`)."""
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name, extra={"action": "server.signal"})
        done.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        done.wait()
    finally:
        try:
            if before_stop is not None:
                before_stop()
        finally:
            plane.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(settings: ControlPlaneSettings) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    wait_for_signal(start(settings))
