"""`autoloader agent`: one agent process, stopped gracefully by SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import grpc

from agent.config import AgentSettings
from agent.engine import spark_session
from agent.protocol import LeaseClient
from agent.worker import Worker

log = logging.getLogger(__name__)
# 10,000 leased files with 4 KB paths and their metadata fit.
MAX_ANSWER_BYTES = 64 * 1024 * 1024


def control_plane_channel(address: str) -> grpc.Channel:
    """The agent's channel: it reconnects within a second of the control plane coming back.

    gRPC's default reconnect backoff grows to minutes; a lease's heartbeat has only its TTL.
    A lease of 10,000 files (the most limits allow) with long object keys is over gRPC's
    default 4 MB answer: refused, it would be a lease granted and never delivered.
    """
    return grpc.insecure_channel(address, options=[
        ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.max_receive_message_length", MAX_ANSWER_BYTES),
    ])  # fmt: skip


def build_worker(settings: AgentSettings, *, stop: threading.Event | None = None,
                 spark: Any = None) -> tuple[Worker, grpc.Channel]:  # fmt: skip
    """An agent needs the control plane's address and access to storage: no database, no catalog."""
    stop = stop or threading.Event()
    # Spark first: its JVM is launched with a fork, best done before any gRPC channel exists.
    spark = spark if spark is not None else spark_session(settings)
    channel = control_plane_channel(settings.address)
    metadata: tuple[tuple[str, str], ...] = ()
    if settings.token is not None:
        metadata = (("authorization", f"Bearer {settings.token.get_secret_value()}"),)
    client = LeaseClient(
        channel, settings.agent_name, stop, retry_initial=settings.retry_initial, retry_max=settings.retry_max,
        metadata=metadata,
    )  # fmt: skip
    worker = Worker(
        client,
        spark,
        credentials=settings.credentials,
        max_files=settings.max_files,
        max_bytes=settings.max_bytes,
        infer_sample_bytes=settings.infer_sample_bytes,
        lease_wait=settings.lease_wait,
        shutdown_grace=settings.shutdown_grace,
        stop=stop,
    )
    return worker, channel


def run(settings: AgentSettings) -> None:
    """Runs until SIGTERM/SIGINT: stop leasing, let the batch finish within the grace period, else release it."""
    stop = threading.Event()
    worker, channel = build_worker(settings, stop=stop)
    thread = threading.Thread(target=worker.run, name="agent", daemon=True)

    def on_signal(signum: int, frame: Any) -> None:
        log.info("stopping (signal %d)", signum, extra={"action": "agent.signal"})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread.start()
    while thread.is_alive() and not stop.wait(0.5):
        pass
    thread.join(settings.shutdown_grace)
    if thread.is_alive():
        worker.abandon_current()
        thread.join(30)
    channel.close()
