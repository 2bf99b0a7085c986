"""What every command shares: the global options, reached from any sub-command's context."""

from __future__ import annotations

from dataclasses import dataclass

import typer

from autoloader.cli.output import OutputFormat
from autoloader.client import Client


@dataclass
class Globals:
    address: str
    token: str | None
    output: OutputFormat

    def client(self) -> Client:
        return Client(self.address, token=self.token)


def globals_of(ctx: typer.Context) -> Globals:
    """The options given before the sub-command (set by the root callback)."""
    return ctx.find_root().obj  # type: ignore[no-any-return]
