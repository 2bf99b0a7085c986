"""RefreshIngestion on a real control plane, catalog and table: FULL, NEW_ONLY, dry runs, retries, the reconciler.

The test plays the agent (tests/integration/test_commit_protocol.py's harness); the crash between the
saga's steps is in tests/e2e/test_refresh_saga.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from autoloader.v1 import ingestion_pb2 as pb
from autoloader.v1 import run_pb2
from tests.integration import test_commit_protocol as protocol
from tests.integration.test_commit_protocol import Plane, expected_rows
from tests.integration.test_leasing import TERMINAL

# The control-plane fixture of the commit protocol's tests (shared, not redefined).
make_plane = protocol.make_plane

pytestmark = pytest.mark.integration

Run = run_pb2.Run
FULL, NEW_ONLY = pb.RefreshIngestionRequest.MODE_FULL, pb.RefreshIngestionRequest.MODE_NEW_ONLY


def refresh(api: Plane, name: str, mode: int, *, dry_run: bool = False, request_id: str = "") -> Any:
    request = pb.RefreshIngestionRequest(name=name, mode=mode, dry_run=dry_run, request_id=request_id)  # type: ignore[arg-type]
    return api.ingestions.RefreshIngestion(request, timeout=30)


def load_all(api: Plane, agent: str = "a1") -> list[Any]:
    """Leases what is pending and reports it with its data, until nothing is left; the files loaded."""
    loaded = []
    while (got := api.lease(agent, wait=2)).files:
        assert api.report_data(agent, got, [api.stage(got)]).results
        loaded.extend(got.files)
    return loaded


def loaded_ingestion(api: Plane, files: int = 3) -> tuple[str, list[Any]]:
    """An ingestion whose first run loaded `files` files (2 rows each) and ended."""
    ingestion, run = api.running("refresh", files)
    loaded = load_all(api)
    assert api.wait_run(run, lambda r: r.state in TERMINAL).state == Run.STATE_SUCCEEDED
    assert api.rows() == expected_rows(loaded)
    return ingestion, loaded


def state_of(api: Plane, ingestion: str) -> int:
    return int(api.ingestions.GetIngestion(pb.GetIngestionRequest(name=ingestion)).ingestion.state)


def file_states(api: Plane) -> dict[str, str]:
    with api.engine.connect() as conn:
        return dict(conn.execute(text("SELECT path, state FROM files")).all())  # type: ignore[arg-type]


def test_a_dry_run_answers_what_would_happen_and_changes_nothing(make_plane: Callable[..., Plane]) -> None:
    api = make_plane()
    ingestion, loaded = loaded_ingestion(api)
    states, snapshots = file_states(api), [s.snapshot_id for s in api.snapshots()]
    for mode in (FULL, NEW_ONLY):
        answer = refresh(api, ingestion, mode, dry_run=True)
        assert answer.run == ""
        assert answer.table == "raw.orders"
        assert answer.table_rows == 6
        assert answer.files_queued == (3 if mode == FULL else 0)
        assert answer.bytes_queued == (sum(f.size_bytes for f in loaded) if mode == FULL else 0)
    assert file_states(api) == states
    assert [s.snapshot_id for s in api.snapshots()] == snapshots
    assert state_of(api, ingestion) == pb.Ingestion.STATE_ACTIVE


def test_full_empties_the_table_and_loads_every_file_again_once(make_plane: Callable[..., Plane]) -> None:
    api = make_plane()
    ingestion, loaded = loaded_ingestion(api)

    answer = refresh(api, ingestion, FULL, request_id="refresh-1")

    assert answer.files_queued == 3
    assert answer.table_rows == 6
    assert api.rows() == []
    assert set(file_states(api).values()) == {"PENDING"}
    run = api.get_run(answer.run)
    assert run.trigger == Run.TRIGGER_REFRESH
    assert state_of(api, ingestion) == pb.Ingestion.STATE_ACTIVE
    again = load_all(api)
    assert sorted(f.path for f in again) == sorted(f.path for f in loaded)
    assert api.wait_run(answer.run, lambda r: r.state in TERMINAL).state == Run.STATE_SUCCEEDED
    assert api.rows() == expected_rows(loaded)
    # A retry of the same request gets the same answer and empties nothing.
    assert refresh(api, ingestion, FULL, request_id="refresh-1") == answer
    assert api.rows() == expected_rows(loaded)


def test_new_only_empties_the_table_and_loads_only_what_is_new(make_plane: Callable[..., Plane]) -> None:
    api = make_plane()
    ingestion, loaded = loaded_ingestion(api)

    answer = refresh(api, ingestion, NEW_ONLY)

    assert answer.files_queued == 0
    assert api.rows() == []
    assert set(file_states(api).values()) == {"SUCCEEDED"}  # the history stays
    api.wait_run(answer.run, lambda r: r.state in TERMINAL)  # nothing new: the run ends at once
    api.write("refresh", [5], prefix="new")  # one file more
    run = api.start(ingestion)
    fresh = load_all(api)
    assert len(fresh) == 1
    assert fresh[0].path not in {f.path for f in loaded}
    assert api.wait_run(run.name, lambda r: r.state in TERMINAL).state == Run.STATE_SUCCEEDED
    assert api.rows() == expected_rows(fresh)


def test_refused_while_a_run_is_active_or_the_ingestion_is_paused(make_plane: Callable[..., Plane]) -> None:
    api = make_plane()
    ingestion, run = api.running("refresh", 2)
    with pytest.raises(grpc.RpcError) as caught:
        refresh(api, ingestion, FULL)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert run in caught.value.details()
    api.runs.CancelRun(run_pb2.CancelRunRequest(name=run))
    api.ingestions.PauseIngestion(pb.PauseIngestionRequest(name=ingestion))
    with pytest.raises(grpc.RpcError) as caught:
        refresh(api, ingestion, FULL, dry_run=True)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "PAUSED" in caught.value.details()


def test_the_reconciler_finishes_a_refresh_its_replica_left_half_way(make_plane: Callable[..., Plane]) -> None:
    """The intent committed and the replica gone before it emptied the table."""
    api = make_plane()
    ingestion, loaded = loaded_ingestion(api)
    with api.engine.begin() as conn:
        conn.execute(
            text("UPDATE ingestions SET state = 'REFRESHING', refresh_mode = 'FULL', "
                 "refresh_run_id = '20261202-000000-000abcd', update_time = now() - interval '1 hour'")
        )  # fmt: skip
    with pytest.raises(grpc.RpcError) as caught:
        refresh(api, ingestion, FULL)  # another request does not cut in
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    assert api.plane.refreshes.reconcile() == 1

    assert api.rows() == []
    assert state_of(api, ingestion) == pb.Ingestion.STATE_ACTIVE
    run = f"{ingestion}/runs/20261202-000000-000abcd"
    assert api.get_run(run).trigger == Run.TRIGGER_REFRESH
    assert load_all(api)
    assert api.wait_run(run, lambda r: r.state in TERMINAL).state == Run.STATE_SUCCEEDED
    assert api.rows() == expected_rows(loaded)
    assert api.plane.refreshes.reconcile() == 0
