"""The engine's pool pings a connection on checkout only if it sat idle: a dead idle connection
is replaced transparently; a dead connection used a moment ago fails its statement once, and the
disconnect makes the pool replace every connection it held."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import psycopg
import pytest
from sqlalchemy import Connection, Engine, exc, text

from controlplane.adapters import database

pytestmark = pytest.mark.integration

PID = text("SELECT pg_backend_pid()")


@pytest.fixture
def make_engine(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[float], Engine]]:
    """make(idle_after) -> the control plane's engine, pinging connections idle that long."""
    engines: list[Engine] = []

    def make(idle_after: float) -> Engine:
        monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", idle_after)
        engine = database.make_engine(database_url, pool_size=3)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def terminate(database_url: str, pids: list[int]) -> None:
    """Kills the backends from another connection and waits until they are gone."""
    with psycopg.connect(database_url, autocommit=True) as admin:
        for pid in pids:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        deadline = time.monotonic() + 10
        while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchone() != (0,):
            assert time.monotonic() < deadline, "the backends did not exit"
            time.sleep(0.01)


def pooled_pids(engine: Engine, count: int) -> list[int]:
    """Checks out `count` connections at once (so `count` distinct ones), returns their backends."""
    with ExitStack() as stack:
        connections: list[Connection] = [stack.enter_context(engine.connect()) for _ in range(count)]
        return [conn.execute(PID).scalar_one() for conn in connections]


def test_dead_idle_connections_are_replaced_on_checkout(
    make_engine: Callable[[float], Engine], database_url: str
) -> None:
    engine = make_engine(0.2)
    old = pooled_pids(engine, 3)
    assert len(set(old)) == 3
    assert engine.pool.checkedin() == 3  # type: ignore[attr-defined]
    time.sleep(0.3)  # idle longer than the threshold
    terminate(database_url, old)

    # Every checkout pings its idle connection, finds it dead and reconnects: no error at all.
    new = pooled_pids(engine, 3)
    assert len(set(new)) == 3
    assert not set(new) & set(old)
    assert engine.pool.checkedin() == 3  # type: ignore[attr-defined]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1


def test_dead_busy_connection_fails_once_then_the_pool_reconnects(
    make_engine: Callable[[float], Engine], database_url: str
) -> None:
    engine = make_engine(60.0)  # nothing in this test sits idle that long: no pings
    old = pooled_pids(engine, 2)
    assert len(set(old)) == 2
    terminate(database_url, old)

    # A connection used a moment ago is not pinged: its statement meets the dead backend.
    with engine.connect() as conn, pytest.raises(exc.OperationalError) as caught:
        conn.execute(PID)
    assert caught.value.connection_invalidated

    # The disconnect invalidated the pool: the next uses reconnect, the other dead connection included.
    new = pooled_pids(engine, 2)
    assert len(set(new)) == 2
    assert not set(new) & set(old)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1


def test_a_live_idle_connection_is_kept(make_engine: Callable[[float], Engine]) -> None:
    engine = make_engine(0.1)
    (first,) = pooled_pids(engine, 1)
    time.sleep(0.2)
    (again,) = pooled_pids(engine, 1)  # pinged, alive: the same backend
    assert again == first


def test_the_ping_never_shows_as_an_open_transaction(make_engine: Callable[[float], Engine], database_url: str) -> None:
    """A ping inside a transaction is 'idle in transaction' until its rollback arrives, and tests and
    operators watch for exactly that state. One thread checks out (and so pings) in a loop while
    another samples the backend's state."""
    engine = make_engine(0.0)
    (backend,) = pooled_pids(engine, 1)
    stop = threading.Event()

    def check_out_in_a_loop() -> None:
        while not stop.is_set():
            with engine.connect():
                pass

    states: Counter[str] = Counter()
    checkouts = threading.Thread(target=check_out_in_a_loop)
    checkouts.start()
    try:
        with psycopg.connect(database_url, autocommit=True) as watcher:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                row = watcher.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (backend,)).fetchone()
                assert row is not None
                states[row[0]] += 1
    finally:
        stop.set()
        checkouts.join()
    assert states["idle"] > 0
    assert "idle in transaction" not in states, states
