"""DeleteIngestion with drop_table, the control plane killed between the saga's steps (`autoloader serve` subprocess).

After a restart and one reconciler pass there is no orphan on either side: the
ingestion's rows and its table are both gone (the deletion was accepted, so the
reconciler finishes it forward).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
import pyarrow as pa
import pytest

from autoloader.v1 import ingestion_pb2 as pb
from autoloader.v1 import ingestion_pb2_grpc
from tests.integration.helpers import valid_ingestion

from .test_write_path import ServedPlane

pytestmark = pytest.mark.e2e

TABLE = "raw.orders"  # valid_ingestion's destination


def saga_plane(database_url: str, workdir: Path) -> ServedPlane:
    """`serve` whose reconciler takes over a saga silent for a second."""
    warehouse = (workdir / "warehouse").as_uri()
    return ServedPlane(workdir / "served", database_url, warehouse, saga_stale_after="1", reconcile_interval="0.3")


def assert_crashed(served: ServedPlane, fault: str) -> None:
    assert served.popen is not None
    try:
        assert served.popen.wait(30) == 17, served.log()
    except subprocess.TimeoutExpired:
        raise AssertionError(f"serve did not crash at {fault}:\n{served.log()}") from None


@pytest.mark.parametrize("fault", ["delete_after_intent", "delete_after_drop"])
def test_a_deletion_cut_short_by_a_crash_is_finished_by_the_reconciler(
    fault: str, database_url: str, workdir: Path
) -> None:
    served = saga_plane(database_url, workdir)
    try:
        served.start(fault)
        with grpc.insecure_channel(served.address) as channel:
            stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
            name = stub.CreateIngestion(
                pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id="orders")
            ).ingestion.name
            served.tables.catalog.create_namespace_if_not_exists("raw")
            rows = pa.table({"id": [1, 2], "_source_file": ["file:///a.json"] * 2})
            location = served.tables.describe(TABLE).location
            served.tables.catalog.create_table(TABLE, schema=rows.schema, location=location).append(rows)

            with pytest.raises(grpc.RpcError) as caught:
                stub.DeleteIngestion(pb.DeleteIngestionRequest(name=name, drop_table=True), timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert_crashed(served, fault)
        # Half-way: the intent is recorded, the table gone or not depending on the step.
        assert (served.tables.load(TABLE) is None) == (fault == "delete_after_drop")

        served.start()
        with grpc.insecure_channel(served.address) as channel:
            stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
            deadline = time.monotonic() + 30
            while (code := lookup(stub, name)) == grpc.StatusCode.OK:
                assert time.monotonic() < deadline, f"the deletion was never finished:\n{served.log()}"
                time.sleep(0.2)
            assert code == grpc.StatusCode.NOT_FOUND
        assert served.tables.load(TABLE) is None
        assert not Path(location.removeprefix("file://")).exists()
        assert "action=ingestion.reconcile" in served.log()
    finally:
        served.stop()


def lookup(stub: ingestion_pb2_grpc.IngestionServiceStub, name: str) -> grpc.StatusCode:
    try:
        stub.GetIngestion(pb.GetIngestionRequest(name=name), timeout=10)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK
