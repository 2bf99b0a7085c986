"""Run the real `autoloader` command line in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

AUTOLOADER = [sys.executable, "-m", "autoloader.cli.main"]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, address: str | None = None, stdin: str | None = None, timeout: float = 60) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOLOADER_")}
    env["COLUMNS"] = "200"  # keep tables on one line per row
    if address:
        env["AUTOLOADER_ADDRESS"] = address
    done = subprocess.run(
        [*AUTOLOADER, *map(str, args)], input=stdin, capture_output=True, text=True, timeout=timeout, env=env
    )
    return Result(done.returncode, done.stdout, done.stderr)
