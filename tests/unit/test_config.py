"""Settings come from AUTOLOADER_* variables; durations take seconds or ISO 8601."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from controlplane.config import ControlPlaneSettings


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("3", timedelta(seconds=3)), ("2.5", timedelta(seconds=2.5)), ("PT5S", timedelta(seconds=5)),
     ("P7D", timedelta(days=7)), ("00:01:00", timedelta(minutes=1))],
)  # fmt: skip
def test_durations_accept_seconds_and_iso(monkeypatch: pytest.MonkeyPatch, raw: str, expected: timedelta) -> None:
    monkeypatch.setenv("AUTOLOADER_DISCOVERY_STALE_AFTER", raw)
    monkeypatch.setenv("AUTOLOADER_IDEMPOTENCY_RETENTION", raw)
    settings = ControlPlaneSettings()
    assert settings.discovery_stale_after == expected
    assert settings.idempotency_retention == expected


def test_bad_duration_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOLOADER_DISCOVERY_STALE_AFTER", "soon")
    with pytest.raises(ValidationError, match="discovery_stale_after"):
        ControlPlaneSettings()


def test_credentials_are_json_and_not_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOLOADER_CREDENTIALS", '{"shop": {"key": "AKIA", "secret": "s3cr3t"}}')
    settings = ControlPlaneSettings()
    assert settings.credentials == {"shop": {"key": "AKIA", "secret": "s3cr3t"}}
    assert "s3cr3t" not in repr(settings)


def test_database_url_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOLOADER_DATABASE_URL", "postgresql://u:hunter2@db/x")
    settings = ControlPlaneSettings()
    assert "hunter2" not in repr(settings)
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value().endswith("@db/x")
