"""The production path under docker/: compose stack, image, realm, dashboards.

No Docker engine runs where these tests run, so they validate the files themselves:
the compose file's structure and environment, the settings it produces, the Keycloak
realm, the Prometheus and Grafana provisioning and the Dockerfile. When the `docker
compose` CLI is installed, compose's own validator runs too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from control_plane.core.config import Environment, Settings
from workflows.queues import ALL_QUEUES

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
REALM_FILE = DOCKER / "keycloak" / "control-plane-realm.json"
PROMETHEUS_FILE = DOCKER / "prometheus" / "prometheus.yml"
DATASOURCES_FILE = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARDS_FILE = DOCKER / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
API_DASHBOARD = DOCKER / "grafana" / "dashboards" / "control-plane-api.json"

ONE_SHOT_SERVICES = {"migrate", "minio-init", "temporal-search-attributes"}
SEARCH_ATTRIBUTES = ("CpProjectId", "CpResourceKind", "CpResourceId")
PLACEHOLDER = "change-me"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
REQUIRED_VARIABLE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]+\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY$|PWD|TOKEN")


def dummy_value(name: str) -> str:
    """A stand-in that is URL-safe, long enough for MinIO and not a known placeholder."""
    return f"dummy-{name.lower().replace('_', '-')}-0123456789"


def interpolate(value: str) -> str:
    """Resolve compose variables the way `docker compose` does, with dummy values."""

    def resolve(match: re.Match[str]) -> str:
        if match["op"] in (":-", "-"):
            return match["arg"]
        return dummy_value(match["name"])

    parts = value.split("$$")
    return "$".join(VARIABLE.sub(resolve, part) for part in parts)


def strings_in(node: Any) -> list[str]:
    """Every string in a loaded YAML document, keys included (comments are gone)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*strings_in(k), *strings_in(v))]
    if isinstance(node, list):
        return [s for item in node for s in strings_in(item)]
    return [node] if isinstance(node, str) else []


def variables_in(document: Any, ops: tuple[str | None, ...] | None = None) -> set[str]:
    """Names of the compose variables a document uses (`$$` is a literal dollar)."""
    return {
        m["name"]
        for text in strings_in(document)
        for m in VARIABLE.finditer(text.replace("$$", ""))
        if ops is None or m["op"] in ops
    }


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def setting_exists(variable: str) -> bool:
    """Whether a CP_ variable names a field of Settings (extra env vars are ignored)."""
    model: type[BaseModel] = Settings
    *groups, leaf = variable.removeprefix("CP_").lower().split("__")
    for group in groups:
        field = model.model_fields.get(group)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        model = annotation
    return leaf in model.model_fields


def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


@pytest.fixture(scope="module")
def long_running(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if s.get("restart") != "no"}


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments) pairs, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


@pytest.fixture(scope="module")
def realm() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(REALM_FILE.read_text())
    return document


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(API_DASHBOARD.read_text())
    return document


def _compose_cli() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    try:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return docker if probe.returncode == 0 else None


class TestComposeStructure:
    def test_is_a_yaml_mapping_of_services(self, compose: dict[str, Any]) -> None:
        assert isinstance(compose, dict)
        assert isinstance(compose["services"], dict)
        assert compose["services"]

    def test_every_service_has_an_image_or_a_build(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        missing = [name for name, s in services.items() if "image" not in s and "build" not in s]
        assert missing == []

    def test_one_shot_services_are_marked_never_restart(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        one_shot = {name for name, s in services.items() if s.get("restart") == "no"}
        assert one_shot == ONE_SHOT_SERVICES

    def test_every_long_running_service_restarts_and_has_a_healthcheck(
        self, long_running: dict[str, dict[str, Any]]
    ) -> None:
        for name, service in long_running.items():
            assert service.get("restart") == "unless-stopped", name
            test = service.get("healthcheck", {}).get("test")
            assert test, f"{name} has no healthcheck"
            assert not service["healthcheck"].get("disable", False), name

    def test_every_dependency_exists_and_waits_on_a_condition(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        for name, service in services.items():
            depends_on = service.get("depends_on", {})
            assert isinstance(depends_on, dict), f"{name}: depends_on must use conditions"
            for target, spec in depends_on.items():
                assert target in services, f"{name} depends on unknown {target}"
                expected = (
                    "service_completed_successfully"
                    if target in ONE_SHOT_SERVICES
                    else "service_healthy"
                )
                assert spec.get("condition") == expected, f"{name} -> {target}"

    def test_postgres_redis_and_temporal_are_health_checked_natively(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        assert "pg_isready" in str(services["postgres"]["healthcheck"]["test"])
        assert "redis-cli ping" in str(services["redis"]["healthcheck"]["test"])
        assert "temporal operator cluster health" in str(services["temporal"]["healthcheck"])

    def test_temporal_keeps_its_state_in_the_postgres_service(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        env = environment_of(services["temporal"])
        assert env["DB"] == "postgres12"
        assert env["POSTGRES_SEEDS"] == "postgres"
        assert services["temporal"]["depends_on"]["postgres"]["condition"] == "service_healthy"

    def test_search_attributes_are_registered_as_keywords(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        job = services["temporal-search-attributes"]
        script = " ".join(job["command"])
        assert "temporal operator search-attribute create" in script
        assert "--type Keyword" in script
        for name in SEARCH_ATTRIBUTES:
            assert name in script

    def test_migrations_run_once_before_api_and_workers(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        assert services["migrate"]["command"] == ["db", "upgrade"]
        assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
        for name, service in services.items():
            if name == "api" or name.startswith("worker-"):
                assert "migrate" in service["depends_on"], name

    def test_api_binds_all_interfaces_and_probes_readiness_without_curl(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        api = services["api"]
        assert api["command"] == ["api", "--host", "0.0.0.0"]
        probe = " ".join(api["healthcheck"]["test"])
        assert "urllib" in probe
        assert "http://localhost:8000/readyz" in probe
        for dependency in ("migrate", "temporal", "redis"):
            assert dependency in api["depends_on"]

    def test_compose_cli_accepts_the_file(self, compose: dict[str, Any]) -> None:
        docker = _compose_cli()
        if docker is None:
            pytest.skip("the docker compose CLI is not installed here")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CP_")}
        env.update({name: dummy_value(name) for name in variables_in(compose)})
        result = subprocess.run(
            [docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr


class TestWorkerPools:
    def test_one_worker_service_per_queue(self, services: dict[str, dict[str, Any]]) -> None:
        workers = {name for name in services if name.startswith("worker-")}
        assert workers == {f"worker-{q.value.removeprefix('cp-')}" for q in ALL_QUEUES}

    def test_each_worker_polls_its_own_queue(self, services: dict[str, dict[str, Any]]) -> None:
        for queue in ALL_QUEUES:
            service = services[f"worker-{queue.value.removeprefix('cp-')}"]
            assert service["command"] == ["worker", "--queue", queue.value]

    def test_workers_are_checked_through_their_process(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        for queue in ALL_QUEUES:
            test = services[f"worker-{queue.value.removeprefix('cp-')}"]["healthcheck"]["test"]
            assert test[:3] == ["CMD", "python", "-c"]
            assert "/proc" in test[3]
            compile(test[3], "worker-healthcheck", "exec")

    def test_workers_get_time_to_drain_activities(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        for queue in ALL_QUEUES:
            service = services[f"worker-{queue.value.removeprefix('cp-')}"]
            assert service["stop_grace_period"] == "45s"


class TestControlPlaneEnvironment:
    def test_every_cp_variable_names_a_real_setting(
        self, services: dict[str, dict[str, Any]], compose: dict[str, Any]
    ) -> None:
        names = set(compose["x-cp-env"])
        for service in services.values():
            names |= {k for k in environment_of(service) if k.startswith("CP_")}
        unknown = sorted(name for name in names if not setting_exists(name))
        assert unknown == []

    def test_control_plane_services_share_one_image_and_environment(
        self, services: dict[str, dict[str, Any]], compose: dict[str, Any]
    ) -> None:
        shared = {k: str(v) for k, v in compose["x-cp-env"].items()}
        cp_services = ["migrate", "api", *(n for n in services if n.startswith("worker-"))]
        images = {services[name]["image"] for name in cp_services}
        assert len(images) == 1
        for name in cp_services:
            assert environment_of(services[name]) == shared, name
            assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"

    def test_shared_environment_builds_production_settings(
        self, compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name in list(os.environ):
            if name.startswith("CP_"):
                monkeypatch.delenv(name)
        for name, value in compose["x-cp-env"].items():
            monkeypatch.setenv(name, interpolate(str(value)))

        settings = Settings(_env_file=None)

        assert settings.environment == Environment.PRODUCTION
        assert settings.temporal.address == "temporal:7233"
        assert settings.temporal.namespace == "default"
        assert settings.redis.url.get_secret_value() == "redis://redis:6379/0"
        database_url = settings.database.url.get_secret_value()
        assert database_url.startswith("postgresql+asyncpg://control_plane:")
        assert database_url.endswith("@postgres:5432/control_plane")
        assert settings.storage.backend == "s3"
        assert settings.s3.endpoint == "minio:9000"
        assert settings.s3.secure is False
        assert settings.s3.bucket == "control-plane"
        assert settings.auth.mode == "keycloak"
        assert settings.keycloak.url == "http://keycloak:8080"
        assert settings.keycloak.client_id == "control-plane"
        assert settings.auth.jwt_secret.get_secret_value() == dummy_value("CP_AUTH__JWT_SECRET")

    def test_env_example_placeholders_are_refused_in_production(
        self, compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        example = env_example()
        for name in list(os.environ):
            if name.startswith("CP_"):
                monkeypatch.delenv(name)
        for name, value in compose["x-cp-env"].items():
            resolved = VARIABLE.sub(lambda m: example[m["name"]], str(value).replace("$$", "$"))
            monkeypatch.setenv(name, resolved)

        with pytest.raises(ValidationError, match="placeholder"):
            Settings(_env_file=None)


class TestSecrets:
    def test_secret_values_come_from_required_variables(
        self, services: dict[str, dict[str, Any]], compose: dict[str, Any]
    ) -> None:
        environments = {"x-cp-env": {k: str(v) for k, v in compose["x-cp-env"].items()}}
        environments |= {name: environment_of(s) for name, s in services.items()}
        for owner, env in environments.items():
            for key, value in env.items():
                # `*_ACTIVE_KEY` names a key id, not a key.
                if SECRET_NAME.search(key) and not key.endswith("_ACTIVE_KEY"):
                    # A secret is a required variable, or a document made around one
                    # (the vault's `{"k1": "${...}"}`).
                    assert REQUIRED_VARIABLE.search(value), f"{owner}: {key}={value!r}"

    def test_database_password_is_a_required_variable(self, compose: dict[str, Any]) -> None:
        url = compose["x-cp-env"]["CP_DATABASE__URL"]
        credentials = re.fullmatch(r"postgresql\+asyncpg://(\$\{[^}]+\}):(\$\{[^}]+\})@.+", url)
        assert credentials is not None, url
        assert REQUIRED_VARIABLE.fullmatch(credentials[2])

    def test_env_example_documents_every_variable(self, compose: dict[str, Any]) -> None:
        assert variables_in(compose) <= set(env_example())

    def test_env_example_holds_placeholders_for_every_required_variable(
        self, compose: dict[str, Any]
    ) -> None:
        required = variables_in(compose, ops=(":?", "?"))
        example = env_example()
        assert required
        for name in required:
            assert example[name] == PLACEHOLDER, name

    def test_local_env_file_is_git_ignored(self) -> None:
        ignored = (DOCKER / ".gitignore").read_text().split()
        assert ".env" in ignored


class TestKeycloakRealm:
    def test_realm_is_named_control_plane(self, realm: dict[str, Any]) -> None:
        assert realm["realm"] == "control-plane"
        assert realm["enabled"] is True

    def test_realm_roles(self, realm: dict[str, Any]) -> None:
        names = {role["name"] for role in realm["roles"]["realm"]}
        assert {"admin", "owner", "member", "viewer"} <= names

    def test_control_plane_client_is_confidential_with_a_service_account(
        self, realm: dict[str, Any]
    ) -> None:
        client = next(c for c in realm["clients"] if c["clientId"] == "control-plane")
        assert client["publicClient"] is False
        assert client["serviceAccountsEnabled"] is True
        assert all(
            uri.startswith("http://localhost") or "127.0.0.1" in uri
            for uri in client["redirectUris"]
        )
        # Keycloak substitutes the environment variable at import: no secret in the file.
        assert client["secret"] == "${CP_KEYCLOAK__CLIENT_SECRET}"

    def test_cpctl_client_is_public_with_direct_access_grants(self, realm: dict[str, Any]) -> None:
        client = next(c for c in realm["clients"] if c["clientId"] == "cpctl")
        assert client["publicClient"] is True
        assert client["directAccessGrantsEnabled"] is True

    def test_demo_user_password_is_temporary(self, realm: dict[str, Any]) -> None:
        demo = next(u for u in realm["users"] if u["username"] == "demo")
        assert [c["temporary"] for c in demo["credentials"]] == [True]

    def test_keycloak_imports_the_realm_directory(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        keycloak = services["keycloak"]
        assert keycloak["command"] == ["start-dev", "--import-realm"]
        assert "./keycloak:/opt/keycloak/data/import:ro" in keycloak["volumes"]
        assert "CP_KEYCLOAK__CLIENT_SECRET" in environment_of(keycloak)


class TestObservability:
    def test_prometheus_scrapes_the_api_metrics(self, services: dict[str, dict[str, Any]]) -> None:
        config = yaml.safe_load(PROMETHEUS_FILE.read_text())
        api_job = next(job for job in config["scrape_configs"] if job["job_name"] == "api")
        assert api_job["metrics_path"] == "/metrics"
        discovery = api_job["dns_sd_configs"][0]
        assert discovery["names"] == ["api"]
        assert discovery["port"] == 8000
        assert any("prometheus.yml" in v for v in services["prometheus"]["volumes"])

    def test_grafana_provisions_the_prometheus_datasource(self, dashboard: dict[str, Any]) -> None:
        datasources = yaml.safe_load(DATASOURCES_FILE.read_text())["datasources"]
        prometheus = next(ds for ds in datasources if ds["type"] == "prometheus")
        assert prometheus["url"] == "http://prometheus:9090"
        used = {p["datasource"]["uid"] for p in dashboard["panels"]}
        assert used == {prometheus["uid"]}

    def test_grafana_loads_dashboards_from_the_mounted_folder(
        self, services: dict[str, dict[str, Any]]
    ) -> None:
        providers = yaml.safe_load(DASHBOARDS_FILE.read_text())["providers"]
        path = providers[0]["options"]["path"]
        assert f"./grafana/dashboards:{path}:ro" in services["grafana"]["volumes"]

    def test_api_dashboard_uses_the_instrumentator_metrics(self, dashboard: dict[str, Any]) -> None:
        assert dashboard["title"] == "control-plane API"
        queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        assert any("http_requests_total" in q and "by (handler)" in q for q in queries)
        assert any('status=~"5.."' in q for q in queries)
        for quantile in ("0.5", "0.95", "0.99"):
            assert any(
                f"histogram_quantile({quantile}," in q
                and "http_request_duration_seconds_bucket" in q
                and "handler" in q
                for q in queries
            ), quantile


class TestDockerfile:
    def test_is_multi_stage_on_python_311_slim(self, instructions: list[tuple[str, str]]) -> None:
        args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
        stages = [a for op, a in instructions if op == "FROM"]
        assert len(stages) >= 2
        assert args["PYTHON_IMAGE"] == "python:3.11-slim"

    def test_installs_the_project_with_uv_without_test_extras(
        self, instructions: list[tuple[str, str]]
    ) -> None:
        runs = " ".join(a for op, a in instructions if op == "RUN")
        assert "uv pip install" in runs
        assert "[test]" not in runs
        # Only the inference image adds an extra: the embeddings engines' CPU torch.
        assert re.findall(r"--extra (\S+)", runs) == ["embeddings"]
        assert "download.pytorch.org/whl/cpu" in " ".join(
            a for op, a in instructions if op == "ARG"
        )

    def test_runs_as_a_non_root_user(self, instructions: list[tuple[str, str]]) -> None:
        args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
        user = [a for op, a in instructions if op == "USER"][-1]
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], user)
        uid = resolved.split(":", 1)[0]
        assert uid not in ("root", "0")

    def test_entry_point_is_cpctl(self, instructions: list[tuple[str, str]]) -> None:
        entrypoint = [a for op, a in instructions if op == "ENTRYPOINT"][-1]
        assert json.loads(entrypoint) == ["cpctl"]

    def test_build_context_leaves_out_local_state_and_caches(self) -> None:
        patterns = {
            line.strip()
            for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        }
        for pattern in ("**/.venv", "**/.cp-data", "**/.git", "**/__pycache__"):
            assert pattern in patterns
        assert "*" in patterns
