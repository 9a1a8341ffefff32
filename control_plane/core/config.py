"""Process settings: one `Settings`, env prefix `CP_`, nested groups joined with `__`.

Workflows never read settings; values reach them through payloads.
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values that are fine on a laptop and refused anywhere else.
PLACEHOLDER_SECRETS = frozenset({"", "change-me", "changeme", "secret", "dev-secret"})


class Environment(StrEnum):
    DEV = "dev"
    TEST = "test"
    PRODUCTION = "production"


class DatabaseSettings(BaseModel):
    # Empty means "the embedded PostgreSQL of `cpctl dev`".
    url: SecretStr = SecretStr("")
    pool_size: int = Field(default=10, ge=1, le=200)
    max_overflow: int = Field(default=10, ge=0, le=200)
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _async_driver(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if raw and not raw.startswith(("postgresql+asyncpg://", "postgresql://", "postgres://")):
            raise ValueError("must be a PostgreSQL URL (postgresql+asyncpg://user:pass@host/db)")
        if raw.startswith(("postgresql://", "postgres://")):
            raw = "postgresql+asyncpg://" + raw.split("://", 1)[1]
        return SecretStr(raw)


class RedisSettings(BaseModel):
    # Empty means "the embedded redis-server of `cpctl dev`".
    url: SecretStr = SecretStr("")

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if raw and not raw.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value


class TemporalSettings(BaseModel):
    address: str = "localhost:7233"
    namespace: str = "default"
    # Prefixes every task queue; lets several stacks (or tests) share one Temporal.
    task_queue_prefix: str = ""
    api_key: SecretStr | None = None
    tls: bool = False
    register_search_attributes: bool = True


class S3Settings(BaseModel):
    endpoint: str = ""
    access_key: SecretStr = SecretStr("")
    secret_key: SecretStr = SecretStr("")
    bucket: str = "control-plane"
    region: str = "us-east-1"
    secure: bool = True


class StorageSettings(BaseModel):
    # `file` keeps objects under `<data_dir>/objects` unless `path` says otherwise.
    backend: Literal["file", "s3"] = "file"
    path: Path | None = None
    multipart_chunk_bytes: int = Field(default=16 * 1024 * 1024, ge=5 * 1024 * 1024)


class AuthSettings(BaseModel):
    mode: Literal["local", "keycloak"] = "local"
    # Local mode signs access tokens with HS256. `jwt_secret` is the active key, named
    # `jwt_kid`; keys in `jwt_previous_keys` (kid -> secret) still verify during rotation.
    jwt_secret: SecretStr = SecretStr("dev-secret")
    jwt_kid: str = Field(default="k1", min_length=1, max_length=64)
    jwt_previous_keys: dict[str, SecretStr] = {}
    issuer: str = "control-plane"
    audience: str = "control-plane"
    access_token_minutes: int = Field(default=15, ge=1, le=24 * 60)
    refresh_token_days: int = Field(default=30, ge=1, le=365)
    # The bootstrap admin created on first start (local mode).
    bootstrap_tenant: str = "default"
    bootstrap_admin: str = "admin"


class KeycloakSettings(BaseModel):
    # Base URL the control plane uses to reach Keycloak (JWKS, admin API).
    url: str = ""
    # Base URL that appears in token issuers, when clients reach Keycloak elsewhere.
    public_url: str = ""
    audience: str = "control-plane"
    admin_realm: str = "master"
    client_id: str = "control-plane"
    client_secret: SecretStr = SecretStr("")
    jwks_cache_seconds: int = Field(default=300, ge=10)


class VaultSettings(BaseModel):
    # Master keys wrap each credential's data key: kid -> base64 of 32 random bytes.
    # The active key wraps new records; the others still unwrap until rotation re-wraps.
    master_keys: dict[str, SecretStr] = {}
    active_key: str = ""


class CodecSettings(BaseModel):
    # Temporal payload encryption (AES-GCM): kid -> base64 of 32 bytes; empty = off.
    keys: dict[str, SecretStr] = {}
    active_key: str = ""


class ApiSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    cors_origins: list[str] = []
    # Browsers of the Temporal Web UI call the payload codec endpoint from these origins.
    temporal_ui_origins: list[str] = ["http://127.0.0.1:8233", "http://localhost:8233"]
    # How often the SSE stream polls a workflow's progress query.
    events_poll_seconds: float = Field(default=0.5, gt=0, le=30)
    readiness_timeout_seconds: float = Field(default=2.0, gt=0, le=30)


class GatewaySettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    # When Redis (the shared rate limits) is unreachable: let requests through
    # unlimited, or refuse them with 503. Exposed as `cp_gateway_limiter_up`.
    limits_when_redis_down: Literal["fail_open", "fail_closed"] = "fail_closed"
    # Tokens reserved for the answer of a request that names no `max_tokens`.
    default_max_tokens: int = Field(default=1024, ge=1, le=10_000_000)
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    # How long a request to an endpoint at zero replicas waits for the woken replica.
    wake_timeout_seconds: float = Field(default=300.0, gt=0, le=3600)
    # Full reload of the routing table besides change notices (lost notices heal).
    reload_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Upstream connections kept per replica.
    pool_per_host: int = Field(default=256, ge=1, le=100_000)


class DevSettings(BaseModel):
    temporal_port: int = Field(default=7233, ge=1, le=65535)
    temporal_ui_port: int = Field(default=8233, ge=1, le=65535)
    # Back-off for restarting a crashed child: doubles from `restart_min` to `restart_max`.
    restart_min_seconds: float = Field(default=1.0, gt=0)
    restart_max_seconds: float = Field(default=30.0, gt=0)


class WorkerSettings(BaseModel):
    # Seconds a stopping worker gives running activities to finish or heartbeat out.
    graceful_shutdown_seconds: float = Field(default=30.0, ge=0)
    max_concurrent_activities: int = Field(default=50, ge=1)


class ModelSettings(BaseModel):
    # A Hugging Face mirror; empty: huggingface_hub's default (which honours HF_ENDPOINT).
    hf_endpoint: str | None = None
    # Partial downloads live here until complete (default `<data_dir>/staging`); a
    # worker restarted on the same machine resumes from them.
    staging_dir: Path | None = None
    catalog_sync_hours: float = Field(default=24.0, gt=0)
    rescan_hours: float = Field(default=24.0, gt=0)
    # Also run `modelscan` (when installed) and merge its findings.
    merge_modelscan: bool = False
    # Directories `local` model sources may read from (on the model workers). Empty:
    # local sources are refused, so a tenant cannot read the workers' own files.
    local_roots: list[Path] = Field(default_factory=list)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CP_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    environment: Environment = Environment.DEV
    data_dir: Path = Path(".cp-data")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # `None` picks console logs in dev and JSON elsewhere.
    log_json: bool | None = None

    database: DatabaseSettings = DatabaseSettings()
    redis: RedisSettings = RedisSettings()
    temporal: TemporalSettings = TemporalSettings()
    storage: StorageSettings = StorageSettings()
    s3: S3Settings = S3Settings()
    auth: AuthSettings = AuthSettings()
    keycloak: KeycloakSettings = KeycloakSettings()
    vault: VaultSettings = VaultSettings()
    codec: CodecSettings = CodecSettings()
    api: ApiSettings = ApiSettings()
    gateway: GatewaySettings = GatewaySettings()
    dev: DevSettings = DevSettings()
    worker: WorkerSettings = WorkerSettings()
    models: ModelSettings = ModelSettings()

    @model_validator(mode="after")
    def _production_needs_real_values(self) -> Settings:
        if self.environment is Environment.DEV or self.environment is Environment.TEST:
            return self
        problems: list[str] = []
        if self.auth.jwt_secret.get_secret_value() in PLACEHOLDER_SECRETS:
            problems.append("CP_AUTH__JWT_SECRET is a placeholder")
        if not self.database.url.get_secret_value():
            problems.append("CP_DATABASE__URL is required")
        if not self.redis.url.get_secret_value():
            problems.append("CP_REDIS__URL is required")
        if self.storage.backend == "s3" and self.s3.secret_key.get_secret_value() in (
            PLACEHOLDER_SECRETS
        ):
            problems.append("CP_S3__SECRET_KEY is a placeholder")
        if problems:
            raise ValueError(f"refusing to start in {self.environment}: " + "; ".join(problems))
        return self

    @property
    def json_logs(self) -> bool:
        if self.log_json is not None:
            return self.log_json
        return self.environment is not Environment.DEV

    @property
    def objects_dir(self) -> Path:
        return self.storage.path or (self.data_dir / "objects")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
