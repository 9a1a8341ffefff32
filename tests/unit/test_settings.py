"""Settings: `CP_` prefix, nested groups, secrets, and refusal of placeholders outside dev."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from control_plane.core.config import Settings


def build(**env: str) -> Settings:
    return Settings(_env_file=None, **env)  # type: ignore[arg-type]


class TestEnvironmentVariables:
    def test_nested_groups_use_double_underscore(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CP_TEMPORAL__ADDRESS", "temporal.internal:7233")
        monkeypatch.setenv("CP_API__PORT", "9001")
        monkeypatch.setenv("CP_DATABASE__URL", "postgresql://cp:pw@db/cp")
        settings = build()
        assert settings.temporal.address == "temporal.internal:7233"
        assert settings.api.port == 9001

    def test_database_url_is_normalised_to_the_async_driver(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("CP_DATABASE__URL", "postgres://cp:pw@db/cp")
        url = build().database.url.get_secret_value()
        assert url == "postgresql+asyncpg://cp:pw@db/cp"

    def test_secrets_never_render_in_repr(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CP_DATABASE__URL", "postgresql://cp:hunter2@db/cp")
        monkeypatch.setenv("CP_AUTH__JWT_SECRET", "hunter3")
        text = repr(build()) + str(build().model_dump())
        assert "hunter2" not in text
        assert "hunter3" not in text


class TestValidation:
    def test_unknown_database_scheme_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CP_DATABASE__URL", "mysql://db/cp")
        with pytest.raises(ValidationError, match="must be a PostgreSQL URL"):
            build()

    def test_bad_redis_scheme_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CP_REDIS__URL", "http://cache")
        with pytest.raises(ValidationError, match="redis://"):
            build()

    def test_port_out_of_range_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CP_API__PORT", "70000")
        with pytest.raises(ValidationError, match="api.port"):
            build()

    def test_production_refuses_placeholder_secrets_and_missing_urls(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("CP_ENVIRONMENT", "production")
        with pytest.raises(ValidationError) as excinfo:
            build()
        message = str(excinfo.value)
        assert "CP_AUTH__JWT_SECRET is a placeholder" in message
        assert "CP_DATABASE__URL is required" in message
        assert "CP_REDIS__URL is required" in message

    def test_production_accepts_real_values(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CP_ENVIRONMENT", "production")
        monkeypatch.setenv("CP_AUTH__JWT_SECRET", "a-long-random-value-from-a-vault")
        monkeypatch.setenv("CP_DATABASE__URL", "postgresql://cp:pw@db/cp")
        monkeypatch.setenv("CP_REDIS__URL", "redis://cache:6379/0")
        settings = build()
        assert settings.json_logs is True

    def test_dev_logs_to_console(self) -> None:
        assert build().json_logs is False
