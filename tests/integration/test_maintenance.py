"""Expired request ids are purged in bounded batches; recent ones are kept."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import Engine, text

from controlplane.adapters.unit_of_work import SqlAlchemyUnitOfWork
from controlplane.service.maintenance import PURGE_BATCH, MaintenanceService


def _insert(engine: Engine, count: int, age: timedelta, prefix: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO idempotency_records (tenant, request_id, method, fingerprint, response, create_time) "
                "SELECT 'default', :prefix || g, 'CreateIngestion', 'f', '{}'::jsonb, now() - :age "
                "FROM generate_series(1, :count) AS g"
            ),
            {"prefix": prefix, "age": age, "count": count},
        )


def _count(engine: Engine, prefix: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM idempotency_records WHERE request_id LIKE :p"), {"p": prefix + "%"}
            ).scalar_one()
        )


def test_purges_only_expired_records_across_batches(
    engine: Engine, uow_factory: Callable[[], SqlAlchemyUnitOfWork]
) -> None:
    expired = PURGE_BATCH * 2 + 17
    _insert(engine, expired, timedelta(days=8), "old-")
    _insert(engine, 25, timedelta(days=6), "recent-")
    service = MaintenanceService(uow_factory, idempotency_retention=timedelta(days=7))

    assert service.purge_idempotency_records() == expired
    assert _count(engine, "old-") == 0
    assert _count(engine, "recent-") == 25
    assert service.purge_idempotency_records() == 0
