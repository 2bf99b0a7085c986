"""Agent settings (environment, prefix AUTOLOADER_), with each default's reason."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.sampling import HEAD_BYTES
from autoloader.paths import default_state_dir


def default_agent_name() -> str:
    # host + pid: unique per process on a host, readable in `agents list`.
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:100] or "host"
    return f"{host}-{os.getpid()}"


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUTOLOADER_", extra="ignore")

    # The control plane.
    address: str = "127.0.0.1:50051"
    token: SecretStr | None = None
    agent_name: str = Field(default_factory=default_agent_name)
    state_dir: Path = Field(default_factory=default_state_dir)
    # Spark: a Spark Connect URL (sc://host:15002) or a master URL; local by default.
    spark_remote: str = ""
    spark_master: str = "local[*]"
    # Source credentials by name, as on the control plane (credentials_ref -> fsspec options).
    credentials: dict[str, dict[str, str]] = Field(default_factory=dict, repr=False)
    # Per lease: 0 takes the ingestion's limits.
    max_files: int = Field(default=0, ge=0, le=10_000)
    max_bytes: int = Field(default=0, ge=0)
    # Schema inference for JSON lines reads the first this many bytes of each file (whole lines);
    # 0 infers from whole files. A key first seen deeper inside a file is not seen (README, Schema).
    infer_sample_bytes: int = Field(default=HEAD_BYTES, ge=0)
    # Long-poll for work this long per LeaseFiles call (seconds).
    lease_wait: float = Field(default=20.0, ge=0, le=60)
    # On SIGTERM: finish the current batch if it ends within this many seconds, else release it.
    shutdown_grace: float = Field(default=30.0, ge=0)
    # Capped exponential backoff (seconds) while the control plane is unavailable.
    retry_initial: float = Field(default=0.5, gt=0)
    retry_max: float = Field(default=30.0, gt=0)
    log_level: str = "INFO"
