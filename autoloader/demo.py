"""`autoloader demo`: the whole path on one machine, with nothing to set up.

Starts the control plane on an embedded PostgreSQL and a free loopback port,
applies a sample ingestion through the public API (as any client would),
shows it, and shuts everything down. Running it again finds the ingestion
already there and leaves it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from autoloader.client import Client
from autoloader.specfile import parse_spec
from autoloader.v1 import ingestion_pb2 as pb

DEMO_ID = "demo-orders"


def demo_spec(state_dir: Path) -> pb.Ingestion:
    source = (state_dir / "demo" / "orders").resolve().as_uri()
    return parse_spec(
        f"""
displayName: Demo orders
source: {{uri: "{source}", glob: "*.json"}}
format: {{type: JSON}}
schema: {{evolution: ADD_NEW_COLUMNS}}
destination: {{table: demo.orders}}
""",
        "demo spec",
    )


def apply_demo(client: Client, state_dir: Path) -> tuple[pb.Ingestion, bool]:
    """Creates the demo ingestion unless it exists; returns it and whether it was created."""
    try:
        return client.get_ingestion(DEMO_ID), False
    except grpc.RpcError as exc:
        if exc.code() is not grpc.StatusCode.NOT_FOUND:
            raise
    return client.create_ingestion(demo_spec(state_dir), DEMO_ID), True
