"""Ingestion use cases: create, read, list, update, delete, pause, resume."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from controlplane.domain.errors import FailedPrecondition, InvalidArgument
from controlplane.domain.idempotency import RequestKey
from controlplane.domain.ingestion import FormatType, Ingestion, IngestionSpec, IngestionState
from controlplane.domain.masks import apply_mask
from controlplane.domain.paging import next_page_token, page_request, parse_state_filter
from controlplane.domain.validation import check_ingestion_id, validate_spec
from controlplane.service.deletions import IngestionDeletions
from controlplane.service.idempotency import commit_once
from controlplane.service.lookups import check_etag, require_ingestion, require_not_deleting
from controlplane.service.ports import UnitOfWork

log = logging.getLogger(__name__)

# Update-mask paths by API name. A path may name a message (all its fields) or one field.
MUTABLE_PATHS = frozenset(
    {
        "display_name", "description", "labels",
        "source.glob", "source.recursive", "source.modified_after", "source.credentials_ref", "source.options",
        "format", "format.type", "format.header", "format.delimiter", "format.quote", "format.escape",
        "format.multiline", "format.encoding", "format.compression",
        "schema", "schema.mode", "schema.columns", "schema.hints", "schema.evolution",
        "schedule", "schedule.cron", "schedule.time_zone",
        "limits", "limits.max_files_per_lease", "limits.max_bytes_per_lease", "limits.max_attempts",
        "error_policy", "error_policy.mode", "error_policy.retry_backoff_initial", "error_policy.retry_backoff_max",
    }
)  # fmt: skip
IMMUTABLE_PATHS = frozenset({"source.uri", "destination", "destination.table", "destination.partition_by"})
# API field names that the domain spells differently.
_DOMAIN_NAMES = {"schema": "row_schema"}


def _domain_path(path: str) -> str:
    head, _, rest = path.partition(".")
    head = _DOMAIN_NAMES.get(head, head)
    return f"{head}.{rest}" if rest else head


def _dump(ingestion: Ingestion) -> dict[str, Any]:
    return ingestion.model_dump(mode="json")


def _load(data: dict[str, Any]) -> Ingestion:
    return Ingestion.model_validate(data)


class IngestionService:
    def __init__(
        self, uow_factory: Callable[[], UnitOfWork], *, avro: bool = False, deletions: IngestionDeletions | None = None
    ) -> None:
        self._avro = avro
        self._uow_factory = uow_factory
        self._deletions = deletions  # None: no catalog (tests of the API alone), so no drop_table

    def _check_engine_supports(self, spec: IngestionSpec) -> None:
        if spec.format.type is FormatType.AVRO and not self._avro:
            raise InvalidArgument.field(
                "format.type",
                "AVRO needs spark-avro in the agents' Spark, which this deployment's Spark does not include; "
                "set AUTOLOADER_SPARK_AVRO=true on the control plane if your agents' Spark has it",
            )

    def create(
        self, tenant: str, spec: IngestionSpec, ingestion_id: str = "", key: RequestKey | None = None
    ) -> Ingestion:
        if ingestion_id:
            check_ingestion_id(ingestion_id)
        validate_spec(spec)
        self._check_engine_supports(spec)

        def work() -> Ingestion:
            ingestion = Ingestion(
                tenant=tenant,
                ingestion_id=ingestion_id or _generated_id(spec),
                spec=spec.with_defaults(),
                state=IngestionState.ACTIVE,
            )
            uow.ingestions.add(ingestion)
            return ingestion

        with self._uow_factory() as uow:
            outcome = commit_once(uow, tenant, "CreateIngestion", key, work, _dump, _load)
        if not outcome.replayed:
            log.info("ingestion created", extra={"action": "ingestion.create", "ingestion": outcome.result.name})
        return outcome.result

    def get(self, tenant: str, ingestion_id: str) -> Ingestion:
        with self._uow_factory() as uow:
            ingestion = require_ingestion(uow, tenant, ingestion_id)
            return uow.ingestions.with_file_counts([ingestion])[0]

    def list(self, tenant: str, page_size: int, page_token: str, filter_: str) -> tuple[list[Ingestion], str]:
        states = parse_state_filter(filter_, IngestionState)
        query = f"{tenant}|{','.join(sorted(s.value for s in states))}"
        page = page_request(page_size, page_token, query)
        with self._uow_factory() as uow:
            # One extra row tells whether another page exists.
            rows = uow.ingestions.list_after(tenant, states=states, after=page.after, limit=page.size + 1)
            items = uow.ingestions.with_file_counts(rows[: page.size])
        token = next_page_token(items[-1].ingestion_id, query) if len(rows) > page.size else ""
        return items, token

    def update(
        self,
        tenant: str,
        ingestion_id: str,
        patch: IngestionSpec,
        paths: Sequence[str],
        etag: str = "",
        key: RequestKey | None = None,
    ) -> Ingestion:
        def work() -> Ingestion:
            ingestion = require_ingestion(uow, tenant, ingestion_id, for_update=True)
            check_etag(ingestion, etag)
            require_not_deleting(ingestion)
            merged = apply_mask(
                ingestion.spec.model_dump(),
                patch.model_dump(),
                [_domain_path(p) for p in paths],
                mutable={_domain_path(p) for p in MUTABLE_PATHS},
                immutable={_domain_path(p) for p in IMMUTABLE_PATHS},
            )
            spec = IngestionSpec.model_validate(merged)
            validate_spec(spec)
            self._check_engine_supports(spec)
            ingestion.spec = spec.with_defaults()
            return uow.ingestions.with_file_counts([uow.ingestions.save(ingestion)])[0]

        with self._uow_factory() as uow:
            outcome = commit_once(uow, tenant, "UpdateIngestion", key, work, _dump, _load)
        if not outcome.replayed:
            log.info(
                "ingestion updated",
                extra={"action": "ingestion.update", "ingestion": outcome.result.name, "paths": ",".join(paths)},
            )
        return outcome.result

    def delete(
        self, tenant: str, ingestion_id: str, etag: str = "", drop_table: bool = False, key: RequestKey | None = None
    ) -> None:
        if drop_table:
            if self._deletions is None:
                raise FailedPrecondition(
                    "drop_table needs an Iceberg catalog, and none is configured; delete without drop_table",
                    metadata={"ingestion": f"ingestions/{ingestion_id}"},
                )
            self._deletions.delete_with_table(tenant, ingestion_id, etag, key)  # a saga (service/deletions.py)
            return

        def work() -> None:
            ingestion = require_ingestion(uow, tenant, ingestion_id, for_update=True)
            check_etag(ingestion, etag)
            require_not_deleting(ingestion)
            uow.ingestions.delete(ingestion)

        with self._uow_factory() as uow:
            outcome = commit_once(uow, tenant, "DeleteIngestion", key, work, lambda _: {}, lambda _: None)
        if not outcome.replayed:
            name = f"ingestions/{ingestion_id}"
            log.info("ingestion deleted", extra={"action": "ingestion.delete", "ingestion": name})

    def pause(self, tenant: str, ingestion_id: str, key: RequestKey | None = None) -> Ingestion:
        return self._transition(tenant, ingestion_id, key, "PauseIngestion", "ingestion.pause", Ingestion.pause)

    def resume(self, tenant: str, ingestion_id: str, key: RequestKey | None = None) -> Ingestion:
        return self._transition(tenant, ingestion_id, key, "ResumeIngestion", "ingestion.resume", Ingestion.resume)

    def _transition(
        self,
        tenant: str,
        ingestion_id: str,
        key: RequestKey | None,
        method: str,
        action: str,
        change: Callable[[Ingestion], None],
    ) -> Ingestion:
        def work() -> Ingestion:
            ingestion = require_ingestion(uow, tenant, ingestion_id, for_update=True)
            before = ingestion.state
            change(ingestion)
            if ingestion.state is not before:
                uow.ingestions.save(ingestion)
            return uow.ingestions.with_file_counts([ingestion])[0]

        with self._uow_factory() as uow:
            outcome = commit_once(uow, tenant, method, key, work, _dump, _load)
        if not outcome.replayed:
            result = outcome.result
            log.info("ingestion %s", result.state.value.lower(), extra={"action": action, "ingestion": result.name})
        return outcome.result


def _generated_id(spec: IngestionSpec) -> str:
    """A readable id from the table name plus a random suffix, e.g. "orders-3f9a1c"."""
    slug = re.sub(r"[^a-z0-9]+", "-", spec.destination.table_name.lower()).strip("-")[:50] or "ingestion"
    if not slug[0].isalpha():
        slug = f"i-{slug}"[:50]
    return f"{slug}-{secrets.token_hex(3)}"
