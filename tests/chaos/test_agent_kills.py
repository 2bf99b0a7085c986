"""The write path under chaos: agent processes SIGKILLed in turn mid-batch, and a control plane restart.

Three `autoloader agent` processes (each with its own JVM, killed with it through its process
group) load 2,000 small JSON files in leases of 50. Every few seconds the next agent that holds
a lease is killed and replaced by a new one under a new name; halfway through (in time or in
files), the control plane stops at once and a new one starts on the same address and database.
Then the agents are left alone to finish. Whatever was killed mid-read, mid-stage, mid-report or
mid-commit, the run must succeed on its own with every file loaded exactly once (docs/write-path.md,
"effectively once").
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from controlplane import bootstrap
from tests.e2e import test_agent_processes as processes_module
from tests.e2e.conftest import TERMINAL, Run, Stack, plane_settings
from tests.e2e.test_agent_processes import (
    STARTUP,
    AgentProcess,
    AgentProcesses,
    assert_clean_log,
    assert_table_equals_source,
    create,
    get_run,
    list_agents,
    start_run,
    wait_until,
    write_files,
)

# The agent-process fixtures (shared, not redefined).
agents = processes_module.agents
make_plane = processes_module.make_plane

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(480)]

FILES = 2000
FILES_PER_LEASE = 50
LEASE_TTL = timedelta(seconds=6)
# How long agents are killed for (the run may end sooner), and the pause between two kills.
CHAOS_SECONDS = 75.0
KILL_EVERY = (2.0, 4.0)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Traversable by the embedded PostgreSQL's user when running as root (unlike tmp_path)."""
    path = Path(tempfile.mkdtemp(prefix="al-chaos-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def sql(database_url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as conn:
        return list(conn.execute(query).fetchall())


def lease_holders(stack: Stack) -> set[str] | None:
    """The agents holding files now, or None while the control plane is down."""
    try:
        return {name for name, agent in list_agents(stack).items() if agent.leased_files > 0}
    except grpc.RpcError:
        return None


def run_state(stack: Stack, run: str) -> int | None:
    try:
        return int(get_run(stack, run).state)
    except grpc.RpcError:
        return None


def succeeded(stack: Stack, run: str) -> int:
    try:
        return int(get_run(stack, run).file_counts.succeeded)
    except grpc.RpcError:
        return 0


def test_agents_killed_in_turn_and_a_control_plane_restart_lose_and_duplicate_nothing(
    make_plane: Callable[..., Stack], agents: AgentProcesses, workdir: Path, database_url: str
) -> None:
    rng = random.Random(17)
    stack = make_plane(lease_ttl=LEASE_TTL)
    live: list[AgentProcess] = [agents.start(stack, f"agent-{i}") for i in range(3)]  # JVMs start meanwhile
    sizes = [rng.randint(2, 5) for _ in range(FILES)]
    files = write_files(workdir / "src", sizes, seed=17)
    ingestion = create(stack, "chaos", (workdir / "src").as_uri(), FILES_PER_LEASE)
    started = time.monotonic()
    run = start_run(stack, ingestion)
    wait_until(lambda: get_run(stack, run).file_counts.succeeded > 0, STARTUP, "the first batch", *live)

    # Kill in turn: the next agent (in slot order) that holds a lease, while another agent has been
    # seen working (so the run goes on); its replacement's JVM starts at once.
    kills, turn, generation = 0, 0, len(live)
    warm: set[str] = set()
    restarted_at: float | None = None
    chaos_started = time.monotonic()
    next_kill = chaos_started + rng.uniform(*KILL_EVERY)
    while time.monotonic() - chaos_started < CHAOS_SECONDS:
        if run_state(stack, run) in TERMINAL:
            break
        holders = lease_holders(stack)
        if holders is not None:
            warm |= holders
        now = time.monotonic()
        halfway = now - chaos_started > CHAOS_SECONDS / 2 or succeeded(stack, run) >= FILES // 2
        if restarted_at is None and halfway:
            address = stack.plane.address
            stack.plane.stop(grace=0)
            time.sleep(1.0)
            stack.plane = bootstrap.start(
                plane_settings(database_url, workdir / "state", listen_address=address, lease_ttl=LEASE_TTL)
            )
            restarted_at = now - chaos_started
            assert run_state(stack, run) not in TERMINAL, "the run ended before the control plane restart"
            continue
        if holders is None or now < next_kill:
            time.sleep(0.25)
            continue
        for offset in range(len(live)):
            slot = (turn + offset) % len(live)
            victim = live[slot]
            others_working = any(p.agent in warm for p in live if p is not victim)
            if victim.agent in holders and others_working:
                victim.kill()
                kills += 1
                live[slot] = agents.start(stack, f"agent-{generation}")
                generation += 1
                turn = slot + 1
                next_kill = time.monotonic() + rng.uniform(*KILL_EVERY)
                break
        time.sleep(0.25)
    chaos = time.monotonic() - chaos_started

    final = stack.wait(run, timeout=240)
    runtime = time.monotonic() - started
    assert kills >= 3, f"only {kills} agents were killed mid-batch in {chaos:.0f}s"
    assert restarted_at is not None, f"the run ended before the control plane restart ({chaos:.0f}s)"

    assert final.state == Run.STATE_SUCCEEDED, final
    counts = final.file_counts
    assert (counts.total, counts.succeeded, counts.failed, counts.quarantined) == (FILES, FILES, 0, 0), counts
    assert final.records == sum(sizes)
    assert_table_equals_source(stack, "e2e.chaos", files)
    states = dict(sql(database_url, "SELECT state, count(*) FROM files GROUP BY state"))
    assert states == {"SUCCEEDED": FILES}, states
    records = dict(sql(database_url, "SELECT path, records FROM files"))
    assert records == {uri: len(rows) for uri, rows in files.items()}
    outcomes = dict(sql(database_url, "SELECT outcome, count(*) FROM file_attempts GROUP BY outcome"))
    assert "FAILED" not in outcomes, outcomes
    assert outcomes["SUCCEEDED"] == FILES, outcomes  # one success per file: nothing loaded twice
    commits = dict(sql(database_url, "SELECT state, count(*) FROM commits GROUP BY state"))
    assert set(commits) == {"COMMITTED"}, commits  # none PENDING or ABORTED

    ((expiries,),) = sql(database_url, "SELECT sum(lease_expiries) FROM files")
    ((leases,),) = sql(database_url, "SELECT count(*) FROM leases")
    snapshots = len(stack.table("e2e.chaos").snapshots())
    assert expiries > 0, "no lease expired: no kill hit a batch"
    print(
        f"\nchaos: {FILES} files, {kills} kills in {chaos:.0f}s, control plane restarted at {restarted_at:.0f}s, "
        f"{leases} leases, {commits['COMMITTED']} batches committed, {snapshots} snapshots "
        f"({1000 * snapshots / FILES:.0f} per 1,000 files), {expiries} lease expiries, attempts {outcomes}, "
        f"runtime {runtime:.0f}s"
    )
    for process in live:
        assert process.running(), process.tail()
        assert_clean_log(process)
