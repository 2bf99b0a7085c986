"""`autoloader agents list` against a real control plane, in a subprocess."""

from __future__ import annotations

import json

import grpc
from google.protobuf.duration_pb2 import Duration

from autoloader.v1 import lease_pb2, lease_pb2_grpc
from controlplane.bootstrap import ControlPlane

from .cli import run_cli


def test_agents_list_shows_an_agent_after_its_first_call(control_plane: ControlPlane) -> None:
    with grpc.insecure_channel(control_plane.address) as channel:
        reply = lease_pb2_grpc.LeaseServiceStub(channel).LeaseFiles(
            lease_pb2.LeaseFilesRequest(agent="agents/bench-1", wait=Duration(seconds=0))
        )
    assert not reply.files  # nothing to lease: the call only made the agent known

    result = run_cli("-o", "json", "agents", "list", address=control_plane.address)
    assert result.code == 0, result.stderr
    agents = {a["name"]: a for a in json.loads(result.stdout)["agents"]}
    assert "agents/bench-1" in agents
    assert agents["agents/bench-1"]["lastSeenTime"]

    table = run_cli("agents", "list", address=control_plane.address)
    assert table.code == 0, table.stderr
    header = table.stdout.splitlines()[0].split()
    assert header == ["NAME", "HOST", "LAST", "SEEN", "LEASES", "FILES"]
    assert "bench-1" in table.stdout
