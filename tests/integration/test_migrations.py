"""Alembic migrations against a real PostgreSQL: head equals the ORM metadata, both ways, safely across replicas."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, make_url, text

from controlplane.adapters.database import make_engine
from controlplane.adapters.migrations import downgrade, head_revision, upgrade
from controlplane.adapters.orm import Base
from controlplane.domain.errors import FailedPrecondition

pytestmark = pytest.mark.integration

ORM_TABLES = {table.name for table in Base.metadata.sorted_tables}


def _admin_url(postgres_url: str) -> str:
    return make_url(postgres_url).set(database="postgres").render_as_string(hide_password=False)


@pytest.fixture
def empty_database_url(postgres_url: str) -> Iterator[str]:
    """A brand-new database made from template1 (not from the migrated template): no tables at all."""
    name = f"m_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(_admin_url(postgres_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(_admin_url(postgres_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_engine(empty_database_url: str) -> Iterator[Engine]:
    engine = make_engine(empty_database_url, pool_size=2)
    yield engine
    engine.dispose()


def schema_diff(engine: Engine, **opts: Any) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts=opts)
        return list(compare_metadata(context, Base.metadata))


def relations(engine: Engine) -> dict[str, tuple[str, int]]:
    """name -> (kind, oid) of every table, index, sequence and view in the public schema."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.relname, c.relkind, c.oid::bigint FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"
            )
        )
        return {name: (kind, oid) for name, kind, oid in rows}


def tables(engine: Engine) -> set[str]:
    return {name for name, (kind, _) in relations(engine).items() if kind in ("r", "p")}


def version_rows(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())


def test_database_starts_empty(empty_engine: Engine) -> None:
    assert relations(empty_engine) == {}


def test_upgrade_yields_exactly_the_orm_metadata(empty_engine: Engine) -> None:
    assert upgrade(empty_engine) == head_revision()
    assert tables(empty_engine) == ORM_TABLES | {"alembic_version"}
    assert schema_diff(empty_engine) == []
    assert schema_diff(empty_engine, compare_type=True, compare_server_default=True) == []
    assert version_rows(empty_engine) == [head_revision()]


def test_named_constraints_follow_the_naming_convention(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    names = set(relations(empty_engine))
    assert {"pk_ingestions", "uq_ingestions_tenant_ingestion_id", "ix_files_claimable"} <= names
    assert "uq_runs_one_active_per_ingestion" in names


def test_downgrade_to_base_removes_everything(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    downgrade(empty_engine, "base")
    left = relations(empty_engine)
    assert set(left) <= {"alembic_version", "alembic_version_pkc"}
    if "alembic_version" in left:
        assert version_rows(empty_engine) == []
    # and back up again
    assert upgrade(empty_engine) == head_revision()
    assert tables(empty_engine) == ORM_TABLES | {"alembic_version"}
    assert schema_diff(empty_engine, compare_type=True, compare_server_default=True) == []


def test_upgrade_twice_is_a_no_op(empty_engine: Engine) -> None:
    head = upgrade(empty_engine)
    before = relations(empty_engine)
    assert upgrade(empty_engine) == head
    # Same objects with the same oids: nothing was dropped and recreated.
    assert relations(empty_engine) == before
    assert version_rows(empty_engine) == [head]


def test_unknown_revision_is_refused_as_newer(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    before = relations(empty_engine)
    with pytest.raises(FailedPrecondition) as caught:
        upgrade(empty_engine)
    assert "newer" in caught.value.message
    assert "9999_future" in caught.value.message
    assert head_revision() in caught.value.message
    assert version_rows(empty_engine) == ["9999_future"]
    assert relations(empty_engine) == before


def test_concurrent_upgrades_on_an_empty_database_both_succeed(empty_database_url: str) -> None:
    """Replicas starting together: the advisory lock makes one migrate and the others find it done."""
    threads_count = 4
    # A replica that waits on another's DDL locks (not the advisory lock) fails after 20 s instead of hanging.
    url = make_url(empty_database_url).update_query_dict({"options": "-c lock_timeout=20s"})
    engines = [make_engine(url.render_as_string(hide_password=False), pool_size=1) for _ in range(threads_count)]
    barrier = threading.Barrier(threads_count)
    results: list[str] = []
    failures: list[BaseException] = []

    def run(engine: Engine) -> None:
        try:
            barrier.wait(timeout=30)
            results.append(upgrade(engine))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=40)
        assert not any(t.is_alive() for t in threads), "an upgrade hung"
        assert failures == []
        assert results == [head_revision()] * threads_count
        assert tables(engines[0]) == ORM_TABLES | {"alembic_version"}
        assert version_rows(engines[0]) == [head_revision()]
        assert schema_diff(engines[0], compare_type=True, compare_server_default=True) == []
    finally:
        for engine in engines:
            engine.dispose()
