"""`autoloader demo`: the whole path on one machine, with nothing to set up.

Starts the control plane on an embedded PostgreSQL and a free loopback port,
writes sample files, applies a sample ingestion through the public API (as any
client would), runs a discovery of the files, shows what it found, and shuts
everything down. Running it again finds the ingestion already there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from autoloader.client import Client
from autoloader.specfile import parse_spec
from autoloader.v1 import ingestion_pb2 as pb
from autoloader.v1 import run_pb2

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


SAMPLE_FILES = 20


def write_sample_files(state_dir: Path) -> Path:
    """JSON-lines order files under the demo source; each call adds one more, as a live export would."""
    directory = state_dir / "demo" / "orders"
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(1, SAMPLE_FILES + 1):
        path = directory / f"orders-{i:04d}.json"
        if not path.exists():
            rows = (f'{{"order_id": {i * 100 + n}, "amount": {n * 7 % 50}.5, "sku": "SKU-{n % 5}"}}' for n in range(10))
            path.write_text("\n".join(rows) + "\n")
    extra = directory / f"orders-{datetime.now(UTC):%Y%m%d-%H%M%S-%f}.json"
    extra.write_text('{"order_id": 1, "amount": 1.0, "sku": "SKU-new"}\n')
    return directory


def start_demo_run(client: Client, ingestion: pb.Ingestion) -> run_pb2.Run:
    """Starts a run, cancelling a leftover one from an interrupted earlier demo."""
    try:
        return client.start_run(ingestion.name)
    except grpc.RpcError as exc:
        if exc.code() is not grpc.StatusCode.FAILED_PRECONDITION:
            raise
        for active in client.list_runs(ingestion.name, filter="state = RUNNING OR state = DISCOVERING"):
            client.cancel_run(active.name)
        return client.start_run(ingestion.name)


def show_table(tables: Any, table_name: str, rows: int = 5) -> None:
    """Prints the table's row count and a few rows, read back from Iceberg with pyiceberg."""
    from rich.table import Table

    from autoloader.cli.output import console, err_console

    table = tables.load(table_name)
    if table is None:
        err_console.print(f"{table_name} has not been created (no rows were loaded)")
        return
    data = table.scan().to_arrow()
    err_console.print(f"\n{table_name}: {data.num_rows} rows (Iceberg snapshot {table.current_snapshot().snapshot_id})")
    view = Table(*data.column_names)
    for row in data.slice(0, rows).to_pylist():
        view.add_row(*(str(v) for v in row.values()))
    console.print(view)
