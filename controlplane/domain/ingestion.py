"""The ingestion entity: its spec (what the user asked for) and its lifecycle."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from controlplane.domain.errors import WrongState


class FormatType(StrEnum):
    JSON = "JSON"
    CSV = "CSV"
    PARQUET = "PARQUET"
    AVRO = "AVRO"
    ORC = "ORC"
    TEXT = "TEXT"


class Compression(StrEnum):
    AUTO = "AUTO"
    NONE = "NONE"
    GZIP = "GZIP"
    BZIP2 = "BZIP2"
    ZSTD = "ZSTD"
    SNAPPY = "SNAPPY"
    LZ4 = "LZ4"
    DEFLATE = "DEFLATE"


class SchemaMode(StrEnum):
    INFER = "INFER"
    EXPLICIT = "EXPLICIT"


class Evolution(StrEnum):
    ADD_NEW_COLUMNS = "ADD_NEW_COLUMNS"
    RESCUE = "RESCUE"
    FAIL_ON_NEW_COLUMNS = "FAIL_ON_NEW_COLUMNS"
    NONE = "NONE"


class ErrorMode(StrEnum):
    CONTINUE = "CONTINUE"
    FAIL_RUN = "FAIL_RUN"


class IngestionState(StrEnum):
    PROVISIONING = "PROVISIONING"
    ACTIVE = "ACTIVE"
    PAUSED = "PAUSED"
    REFRESHING = "REFRESHING"
    ERROR = "ERROR"
    DELETING = "DELETING"


class RefreshMode(StrEnum):
    FULL = "FULL"  # every known file loads again
    NEW_ONLY = "NEW_ONLY"  # the history stays: only files discovered from now on load


class _Value(BaseModel):
    # Frozen value objects: a spec is replaced, never edited in place.
    model_config = ConfigDict(frozen=True, extra="forbid")


class Source(_Value):
    uri: str = ""
    glob: str = ""
    recursive: bool = False
    modified_after: datetime | None = None
    credentials_ref: str = ""
    options: dict[str, str] = Field(default_factory=dict)


class Format(_Value):
    type: FormatType | None = None
    header: bool = False
    delimiter: str = ""
    quote: str = ""
    escape: str = ""
    multiline: bool = False
    encoding: str = ""
    compression: Compression = Compression.AUTO


class Column(_Value):
    name: str = ""
    type: str = ""
    required: bool = False


class Schema(_Value):
    mode: SchemaMode = SchemaMode.INFER
    columns: tuple[Column, ...] = ()
    hints: dict[str, str] = Field(default_factory=dict)
    evolution: Evolution = Evolution.ADD_NEW_COLUMNS


class PartitionField(_Value):
    column: str = ""
    transform: str = "identity"


class Destination(_Value):
    table: str = ""
    partition_by: tuple[PartitionField, ...] = ()

    @property
    def namespace(self) -> str:
        return self.table.rpartition(".")[0]

    @property
    def table_name(self) -> str:
        return self.table.rpartition(".")[2]


class Schedule(_Value):
    cron: str = ""
    time_zone: str = "UTC"


# Small files cost a batch's fixed costs (two Spark jobs, a commit) per lease: 1,000 amortizes them
# (as Databricks' maxFilesPerTrigger); maxBytesPerLease bounds a batch of large files.
DEFAULT_MAX_FILES_PER_LEASE = 1000
DEFAULT_MAX_BYTES_PER_LEASE = 1 << 30
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_RETRY_BACKOFF_INITIAL = timedelta(seconds=30)
DEFAULT_RETRY_BACKOFF_MAX = timedelta(hours=1)


class Limits(_Value):
    # Zero means "the default"; IngestionSpec.with_defaults() fills them in.
    max_files_per_lease: int = 0
    max_bytes_per_lease: int = 0
    max_attempts: int = 0


class ErrorPolicy(_Value):
    mode: ErrorMode = ErrorMode.CONTINUE
    retry_backoff_initial: timedelta = timedelta(0)
    retry_backoff_max: timedelta = timedelta(0)


class IngestionSpec(_Value):
    """Everything a user sets on an ingestion."""

    display_name: str = ""
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    source: Source = Source()
    format: Format = Format()
    row_schema: Schema = Schema()
    destination: Destination = Destination()
    schedule: Schedule | None = None
    limits: Limits = Limits()
    error_policy: ErrorPolicy = ErrorPolicy()

    def with_defaults(self) -> IngestionSpec:
        """The spec with every unset limit and policy value replaced by its default."""
        limits = self.limits
        policy = self.error_policy
        schedule = self.schedule
        return self.model_copy(
            update={
                "limits": Limits(
                    max_files_per_lease=limits.max_files_per_lease or DEFAULT_MAX_FILES_PER_LEASE,
                    max_bytes_per_lease=limits.max_bytes_per_lease or DEFAULT_MAX_BYTES_PER_LEASE,
                    max_attempts=limits.max_attempts or DEFAULT_MAX_ATTEMPTS,
                ),
                "error_policy": ErrorPolicy(
                    mode=policy.mode,
                    retry_backoff_initial=policy.retry_backoff_initial or DEFAULT_RETRY_BACKOFF_INITIAL,
                    retry_backoff_max=policy.retry_backoff_max or DEFAULT_RETRY_BACKOFF_MAX,
                ),
                "schedule": (Schedule(cron=schedule.cron, time_zone=schedule.time_zone or "UTC") if schedule else None),
            }
        )


class FileCounts(_Value):
    pending: int = 0
    leased: int = 0
    succeeded: int = 0
    failed: int = 0
    quarantined: int = 0
    skipped: int = 0


class Ingestion(BaseModel):
    """An ingestion as stored: the spec plus the state the control plane owns."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    tenant: str
    ingestion_id: str
    spec: IngestionSpec
    state: IngestionState = IngestionState.ACTIVE
    state_message: str = ""
    schema_version: int = 0
    # Bumped on every change; the etag clients see.
    version: int = 1
    last_run: str = ""
    next_run_time: datetime | None = None
    prefect_deployment_id: str = ""
    drop_table_on_delete: bool = False  # with state DELETING: the table goes too
    refresh_mode: RefreshMode | None = None  # with state REFRESHING
    refresh_run_id: str = ""  # with state REFRESHING: the run the refresh starts
    create_time: datetime | None = None
    update_time: datetime | None = None
    file_counts: FileCounts = FileCounts()

    @property
    def name(self) -> str:
        return f"ingestions/{self.ingestion_id}"

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'

    def pause(self) -> None:
        """ACTIVE -> PAUSED; pausing a paused ingestion changes nothing."""
        if self.state is IngestionState.PAUSED:
            return
        self._require(IngestionState.ACTIVE, "pause")
        self.state = IngestionState.PAUSED

    def resume(self) -> None:
        """PAUSED -> ACTIVE; resuming an active ingestion changes nothing."""
        if self.state is IngestionState.ACTIVE:
            return
        self._require(IngestionState.PAUSED, "resume")
        self.state = IngestionState.ACTIVE

    def _require(self, state: IngestionState, action: str) -> None:
        if self.state is not state:
            raise WrongState(
                f"cannot {action} {self.name}: it is {self.state.value}, not {state.value}",
                metadata={"ingestion": self.name, "state": self.state.value},
            )
