"""One agent inside this process, next to an in-process control plane (`up` and `demo`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass
class LocalAgent:
    worker: Any
    channel: grpc.Channel
    thread: threading.Thread
    grace: float

    def stop(self) -> None:
        """Stop leasing; let the current batch finish within the grace period, else release it."""
        self.worker.stop.set()
        self.thread.join(self.grace)
        if self.thread.is_alive():
            self.worker.abandon_current()
            self.thread.join(30)
        self.channel.close()


def start_agent(address: str, state_dir: Path, **overrides: Any) -> LocalAgent:
    """An agent (local Spark) leasing from `address`; the control plane commits what it stages."""
    from agent.config import AgentSettings
    from agent.main import build_worker

    settings = AgentSettings(address=address, state_dir=state_dir, **overrides)
    worker, channel = build_worker(settings)
    thread = threading.Thread(target=worker.run, name="agent", daemon=True)
    thread.start()
    return LocalAgent(worker, channel, thread, settings.shutdown_grace)
