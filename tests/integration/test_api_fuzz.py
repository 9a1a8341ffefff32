"""Property-based fuzzing of every documented route, generated from the app's own
OpenAPI schema and sent over real HTTP to the API running on real dependencies:
no 5xx, and every response (status, content type, body) matches the schema.

Routes added by later issues join automatically. Requests carry a tenant admin's
bearer token, so the fuzzer reaches past authentication into every route.
"""

from __future__ import annotations

import asyncio

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from api.app import create_app
from control_plane.core.config import Settings
from control_plane.core.db import create_engine
from control_plane.credentials.providers import KUBECONFIG_EXAMPLE, SERVICE_ACCOUNT_KEY_EXAMPLE
from tests.fixtures.identity import IdentityFactory
from tests.fixtures.stack import ApiServer


@pytest.fixture
def admin_headers(settings: Settings) -> dict[str, str]:
    """A tenant admin in this test's database (sync test: its own short event loop)."""

    async def make() -> dict[str, str]:
        engine = create_engine(settings.database)
        try:
            factory = IdentityFactory(engine, settings)
            return (await factory.user(await factory.tenant(), admin=True)).headers
        finally:
            await engine.dispose()

    return asyncio.run(make())


# Fields checked by parsing (kubeconfig YAML, service-account JSON) get valid documents.
schemathesis.openapi.format("kubeconfig", st.just(KUBECONFIG_EXAMPLE))
schemathesis.openapi.format("gcp-service-account-key", st.just(SERVICE_ACCOUNT_KEY_EXAMPLE))

# Requests whose rules the JSON Schema cannot state: an endpoint's `engine_args` are
# checked by the chosen engine's own model (its keys depend on `engine`), and its
# autoscale policy and replica count must agree with each other. A router's targets and
# fallbacks each name exactly one thing, none twice, and no fallback is also a target.
# A usage report's window must end after it starts and span at most 366 days.
# A 422 there is the right answer to a schema-valid body; every other check still applies.
CROSS_FIELD_RULES = {
    ("POST", "/api/v1/endpoints"),
    ("POST", "/api/v1/routers"),
    ("PATCH", "/api/v1/routers/{router_id}"),
    ("GET", "/api/v1/usage"),
}

schema = schemathesis.openapi.from_dict(
    create_app(Settings(_env_file=None, environment="test")).openapi()
)


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_conforms_to_its_schema(
    case: schemathesis.Case,  # type: ignore[type-arg]
    api_server: ApiServer,
    admin_headers: dict[str, str],
) -> None:
    response = case.call(base_url=api_server.url, headers=admin_headers, timeout=30)
    excluded = []
    if (case.method.upper(), case.path) in CROSS_FIELD_RULES and response.status_code == 422:
        excluded.append(schemathesis.checks.positive_data_acceptance)
    case.validate_response(response, excluded_checks=excluded)
