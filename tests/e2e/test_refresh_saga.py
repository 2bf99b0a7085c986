"""RefreshIngestion (FULL), the control plane killed between the saga's steps (`autoloader serve` subprocess).

After a restart and one reconciler pass the refresh is finished: the table is empty,
the known files are queued in the refresh's run, and the ingestion is ACTIVE. The
table and the file states agree: every row to come will come through that run.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pyarrow as pa
import pytest

from autoloader.v1 import file_pb2, file_pb2_grpc, ingestion_pb2_grpc, run_pb2, run_pb2_grpc
from autoloader.v1 import ingestion_pb2 as pb
from tests.integration.helpers import valid_ingestion

from .test_delete_saga import assert_crashed, saga_plane
from .test_write_path import ServedPlane

pytestmark = pytest.mark.e2e

TABLE = "raw.orders"  # valid_ingestion's destination
Run = run_pb2.Run


def wait_for(condition: object, what: str, served: ServedPlane, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{served.log()}"
        time.sleep(0.2)


@pytest.mark.parametrize("fault", ["refresh_after_intent", "refresh_after_empty"])
def test_a_refresh_cut_short_by_a_crash_is_finished_by_the_reconciler(
    fault: str, database_url: str, workdir: Path
) -> None:
    source = workdir / "src"
    source.mkdir()
    for i in range(2):
        (source / f"f{i}.json").write_text('{"n": 1}\n')
    served = saga_plane(database_url, workdir)
    try:
        served.start(fault)
        with grpc.insecure_channel(served.address) as channel:
            ingestions = ingestion_pb2_grpc.IngestionServiceStub(channel)
            runs = run_pb2_grpc.RunServiceStub(channel)
            spec = valid_ingestion(source=pb.Source(uri=source.as_uri(), glob="*.json"))
            name = ingestions.CreateIngestion(
                pb.CreateIngestionRequest(ingestion=spec, ingestion_id="orders")
            ).ingestion.name
            # Known files, out of any active run: discovered by a run, which is then cancelled.
            first = runs.StartRun(run_pb2.StartRunRequest(ingestion=name)).run.name
            wait_for(lambda: runs.GetRun(run_pb2.GetRunRequest(name=first)).run.state == Run.STATE_RUNNING,
                     "the first run's discovery", served)  # fmt: skip
            runs.CancelRun(run_pb2.CancelRunRequest(name=first))
            served.tables.catalog.create_namespace_if_not_exists("raw")
            rows = pa.table({"id": [1, 2], "_source_file": [(source / "f0.json").as_uri()] * 2})
            location = served.tables.describe(TABLE).location
            served.tables.catalog.create_table(TABLE, schema=rows.schema, location=location).append(rows)

            request = pb.RefreshIngestionRequest(name=name, mode=pb.RefreshIngestionRequest.MODE_FULL)
            with pytest.raises(grpc.RpcError) as caught:
                ingestions.RefreshIngestion(request, timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert_crashed(served, fault)
        assert (served.tables.row_count(TABLE) == 0) == (fault == "refresh_after_empty")

        served.start()
        with grpc.insecure_channel(served.address) as channel:
            ingestions = ingestion_pb2_grpc.IngestionServiceStub(channel)
            runs = run_pb2_grpc.RunServiceStub(channel)
            files = file_pb2_grpc.FileServiceStub(channel)

            def refreshed() -> bool:
                ingestion = ingestions.GetIngestion(pb.GetIngestionRequest(name=name)).ingestion
                return ingestion.state == pb.Ingestion.STATE_ACTIVE

            wait_for(refreshed, "the refresh to be finished", served)
            listed = runs.ListRuns(run_pb2.ListRunsRequest(ingestion=name)).runs
            (refresh_run,) = [r for r in listed if r.trigger == Run.TRIGGER_REFRESH]
            known = files.ListFiles(file_pb2.ListFilesRequest(ingestion=name)).files
            assert {(f.state, f.run) for f in known} == {(file_pb2.File.STATE_PENDING, refresh_run.name)}
            assert len(known) == 2
        assert served.tables.row_count(TABLE) == 0
        assert "action=ingestion.reconcile" in served.log()
    finally:
        served.stop()
