"""Migrate the database to this code's schema on start, safely across replicas."""

from __future__ import annotations

import logging
from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from controlplane.domain.errors import FailedPrecondition

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key: replicas starting together migrate one at a time.
_MIGRATION_LOCK = 0x6175746F6C6F6164  # "autoload"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("migrations")))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def upgrade(engine: Engine) -> str:
    """Upgrades to head in one transaction; refuses a schema newer than this code."""
    config = alembic_config()
    script = ScriptDirectory.from_config(config)
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        current = MigrationContext.configure(conn).get_current_revision()
        if current is not None and current not in {rev.revision for rev in script.walk_revisions()}:
            raise FailedPrecondition(
                f"the database schema is at revision {current}, newer than this autoloader "
                f"(which knows up to {script.get_current_head()}); upgrade autoloader or use another database"
            )
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
        head = script.get_current_head()
    if current != head:
        log.info("database migrated", extra={"action": "db.migrate", "from": current or "empty", "to": head})
    assert head is not None
    return head


def downgrade(engine: Engine, revision: str = "base") -> None:
    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)
