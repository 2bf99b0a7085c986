"""DeleteIngestion with drop_table on a real control plane and catalog: rows and table go together, or not at all.

The crash between the saga's steps, finished by the reconciler, is in tests/e2e/test_delete_saga.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pytest
from sqlalchemy import Engine, text

from autoloader.v1 import ingestion_pb2 as pb
from autoloader.v1 import run_pb2
from controlplane import bootstrap
from tests.integration.helpers import error_info
from tests.integration.test_leasing import Api

pytestmark = pytest.mark.integration

TABLE = "raw.orders"  # valid_ingestion's destination


@pytest.fixture
def api(control_plane: bootstrap.ControlPlane, channel: grpc.Channel, engine: Engine, tmp_path: Path) -> Api:
    return Api(control_plane.address, channel, engine, tmp_path / "src")


@pytest.fixture
def table(control_plane: bootstrap.ControlPlane) -> Any:
    """The destination table with three rows, as the committer would have made it."""
    tables = control_plane.tables
    tables.catalog.create_namespace_if_not_exists("raw")
    rows = pa.table({"id": [1, 2, 3], "_source_file": ["file:///a.json"] * 3})
    created = tables.catalog.create_table(TABLE, schema=rows.schema, location=tables.describe(TABLE).location)
    created.append(rows)
    return created


def delete(api: Api, name: str, request_id: str = "", **fields: Any) -> pb.DeleteIngestionResponse:
    request = pb.DeleteIngestionRequest(name=name, drop_table=True, request_id=request_id, **fields)
    return api.ingestions.DeleteIngestion(request, timeout=30)


def refused(call: Any, code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    return caught.value


def table_directory(control_plane: bootstrap.ControlPlane) -> Path:
    return Path(control_plane.tables.describe(TABLE).location.removeprefix("file://"))


def state_of(api: Api, name: str) -> int:
    return int(api.ingestions.GetIngestion(pb.GetIngestionRequest(name=name)).ingestion.state)


def test_the_table_and_the_rows_go_together(api: Api, control_plane: bootstrap.ControlPlane, table: Any) -> None:
    name = api.create("orders")
    (table_directory(control_plane) / "data" / "_staging" / "lease-that-died").mkdir(parents=True)

    delete(api, name, request_id="delete-1")

    assert control_plane.tables.load(TABLE) is None
    assert not table_directory(control_plane).exists(), "the table's files (staging leftovers too) stayed"
    refused(lambda: api.ingestions.GetIngestion(pb.GetIngestionRequest(name=name)), grpc.StatusCode.NOT_FOUND)
    # A retry of the same request gets the same answer; a new one finds nothing.
    delete(api, name, request_id="delete-1")
    refused(lambda: delete(api, name, request_id="delete-2"), grpc.StatusCode.NOT_FOUND)
    api.create("orders")  # the name and the table are free again


def test_refused_while_a_run_is_active_and_nothing_changes(api: Api, control_plane: bootstrap.ControlPlane,
                                                           table: Any) -> None:  # fmt: skip
    ingestion, run = api.running("orders", 2)
    error = refused(lambda: delete(api, ingestion), grpc.StatusCode.FAILED_PRECONDITION)
    assert run in error.details()
    assert state_of(api, ingestion) == pb.Ingestion.STATE_ACTIVE
    assert len(control_plane.tables.load(TABLE).scan().to_arrow()) == 3

    api.runs.CancelRun(run_pb2.CancelRunRequest(name=run))
    delete(api, ingestion)
    assert control_plane.tables.load(TABLE) is None


def test_refused_when_another_ingestion_writes_to_the_table(api: Api, control_plane: bootstrap.ControlPlane,
                                                            table: Any) -> None:  # fmt: skip
    name = api.create("orders")
    other = api.create("orders-too")
    error = refused(lambda: delete(api, name), grpc.StatusCode.FAILED_PRECONDITION)
    assert other in error.details()
    assert error_info(error).domain == "autoloader.v1"
    assert control_plane.tables.load(TABLE) is not None
    # Without drop_table it goes (the table stays, the other ingestion's).
    api.ingestions.DeleteIngestion(pb.DeleteIngestionRequest(name=name))
    assert control_plane.tables.load(TABLE) is not None


def test_a_catalog_that_fails_the_drop_leaves_everything_as_it_was(
    api: Api, control_plane: bootstrap.ControlPlane, table: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = api.create("orders")
    api.ingestions.PauseIngestion(pb.PauseIngestionRequest(name=name))
    drop = control_plane.tables.drop

    def unreachable(table: str) -> bool:
        raise ConnectionError("catalog unreachable")

    monkeypatch.setattr(control_plane.tables, "drop", unreachable)
    error = refused(lambda: delete(api, name, request_id="try-1"), grpc.StatusCode.UNAVAILABLE)
    assert "catalog unreachable" in error.details()
    # Compensated: the ingestion as it was (paused), the table whole, and the request not recorded as done.
    assert state_of(api, name) == pb.Ingestion.STATE_PAUSED
    assert len(control_plane.tables.load(TABLE).scan().to_arrow()) == 3

    monkeypatch.setattr(control_plane.tables, "drop", drop)
    delete(api, name, request_id="try-1")
    assert control_plane.tables.load(TABLE) is None
    refused(lambda: api.ingestions.GetIngestion(pb.GetIngestionRequest(name=name)), grpc.StatusCode.NOT_FOUND)


def test_an_ingestion_whose_table_was_never_created_is_deleted(api: Api, control_plane: bootstrap.ControlPlane) -> None:
    name = api.create("orders")
    delete(api, name)
    refused(lambda: api.ingestions.GetIngestion(pb.GetIngestionRequest(name=name)), grpc.StatusCode.NOT_FOUND)


def test_the_reconciler_finishes_a_deletion_its_replica_left_half_way(
    api: Api, control_plane: bootstrap.ControlPlane, table: Any, engine: Engine
) -> None:
    """The intent committed and the replica gone (the crash itself: tests/e2e/test_delete_saga.py)."""
    name = api.create("orders")
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE ingestions SET state = 'DELETING', drop_table_on_delete = true, "
                 "update_time = now() - interval '1 hour'")
        )  # fmt: skip
    # A plain delete (or another client's) does not cut in.
    refused(lambda: api.ingestions.DeleteIngestion(pb.DeleteIngestionRequest(name=name)),
            grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    assert control_plane.deletions.reconcile() == 1
    assert control_plane.tables.load(TABLE) is None
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM ingestions")).scalar_one() == 0
    assert control_plane.deletions.reconcile() == 0
