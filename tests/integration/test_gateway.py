"""The gateway end to end: real simulator endpoints deployed by `DeployEndpoint` on the
local cluster, routers and API keys made through the real API, the gateway of
`cpctl gateway` (in a thread here, as real processes for the shared-limit test) in
front, the official `openai` client and plain HTTP as callers, real Redis and
PostgreSQL underneath. Nothing is mocked."""

from __future__ import annotations

import asyncio
import collections
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.gateway.main import create_gateway
from control_plane.core.config import Settings
from control_plane.core.db import create_engine, create_sessionmaker, session_scope
from control_plane.devstack.services import free_port
from control_plane.models.tables import Model
from tests.fixtures.identity import IdentityFactory
from tests.fixtures.stack import ApiServer, StartWorkers
from tests.integration.test_clusters_kubernetes import worker_process_env
from tests.integration.test_clusters_local import onboard_local, wait_for_cluster
from tests.integration.test_endpoints_local import wait_for_endpoint
from tests.integration.test_models_resume import log_tail, stop
from workflows.queues import ALL_QUEUES

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]
FAST = {"ttft_ms": 0, "itl_ms": 0, "output_tokens": 5}


class Stack:
    def __init__(self, api: httpx.AsyncClient, gateway: ApiServer) -> None:
        self.api = api
        self.gateway = gateway
        self.project_id = ""
        self.cluster_id = ""

    async def setup(self, start_workers: StartWorkers) -> None:
        await start_workers(ALL_QUEUES)
        cluster = await onboard_local(self.api)
        await wait_for_cluster(self.api, cluster["id"], "available")
        self.cluster_id = str(cluster["id"])
        response = await self.api.post("/api/v1/projects", json={"name": "gw"})
        assert response.status_code == 201, response.text
        self.project_id = str(response.json()["id"])

    async def endpoint(self, name: str, **fields: Any) -> dict[str, Any]:
        payload = {
            "project_id": self.project_id,
            "cluster_id": self.cluster_id,
            "name": name,
            "engine": "simulator",
            "engine_args": FAST,
            "reconcile_interval_s": 0.5,
            **fields,
        }
        response = await self.api.post("/api/v1/endpoints", json=payload)
        assert response.status_code == 202, response.text
        created: dict[str, Any] = response.json()
        return created

    async def running(self, *endpoints: dict[str, Any]) -> None:
        for endpoint in endpoints:
            await wait_for_endpoint(self.api, endpoint["id"], lambda b: b["status"] == "running")

    async def router(self, name: str, targets: list[dict[str, Any]], **fields: Any) -> str:
        response = await self.api.post(
            "/api/v1/routers",
            json={"project_id": self.project_id, "name": name, "targets": targets, **fields},
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    async def key(self, **fields: Any) -> tuple[str, str]:
        response = await self.api.post(
            f"/api/v1/projects/{self.project_id}/api-keys", json={"name": "k", **fields}
        )
        assert response.status_code == 201, response.text
        body = response.json()
        return str(body["id"]), str(body["key"])

    def client(self, key: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"{self.gateway.url}/v1",
            headers={"authorization": f"Bearer {key}"},
            timeout=60,
            limits=httpx.Limits(max_connections=200),
        )

    async def until_routable(self, key: str, model: str, within: float = 10) -> None:
        """The gateway learns of new keys, routers and endpoints from change notices."""
        deadline = asyncio.get_running_loop().time() + within
        async with self.client(key) as client:
            while True:
                response = await client.post(
                    "/chat/completions", json={"model": model, "messages": CHAT}
                )
                if response.status_code == 200:
                    return
                assert asyncio.get_running_loop().time() < deadline, response.text
                await asyncio.sleep(0.1)


@pytest.fixture
def stack(api: httpx.AsyncClient, gateway_server: ApiServer) -> Stack:
    return Stack(api, gateway_server)


class TestOpenAIClient:
    async def test_sync_async_streaming_through_a_router(
        self, stack: Stack, start_workers: StartWorkers, identities: IdentityFactory
    ) -> None:
        await stack.setup(start_workers)
        a, b = await stack.endpoint("sim-a"), await stack.endpoint("sim-b")
        await stack.running(a, b)
        await stack.router("chat", [{"endpoint_id": a["id"]}, {"endpoint_id": b["id"]}])
        _, key = await stack.key()
        await stack.until_routable(key, "chat")
        base = f"{stack.gateway.url}/v1"

        async with openai.AsyncOpenAI(base_url=base, api_key=key) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="chat", messages=CHAT
            )
            chat = raw.parse()
            assert chat.choices[0].message.content
            assert raw.headers["x-cp-target"] in ("sim-a", "sim-b")
            assert float(raw.headers["x-cp-overhead-ms"]) >= 0
            stream = await client.chat.completions.create(
                model="chat",
                messages=CHAT,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            assert chunks[-1].usage is not None
            assert chunks[-1].usage.completion_tokens == 5
            # Usage the client did not ask for (the gateway asks for it) is not passed on.
            plain = await client.chat.completions.create(model="chat", messages=CHAT, stream=True)
            assert all(c.usage is None and c.choices for c in [c async for c in plain])
            completion = await client.completions.create(model="sim-a", prompt="x")
            assert completion.choices[0].text
            models = await client.models.list()
            assert {m.id for m in models.data} == {"chat", "sim-a", "sim-b"}

        def sync_calls() -> None:
            with openai.OpenAI(base_url=base, api_key=key) as client:
                answer = client.chat.completions.create(model="chat", messages=CHAT)
                assert answer.choices[0].message.content
                pieces = client.chat.completions.create(model="chat", messages=CHAT, stream=True)
                assert "".join(c.choices[0].delta.content or "" for c in pieces)
                with pytest.raises(openai.NotFoundError):
                    client.chat.completions.create(model="nothing", messages=CHAT)
            with openai.OpenAI(base_url=base, api_key=key + "x") as client:
                with pytest.raises(openai.AuthenticationError):
                    client.chat.completions.create(model="chat", messages=CHAT)

        await asyncio.to_thread(sync_calls)

        async with httpx.AsyncClient() as plain_client:
            metrics = (await plain_client.get(f"{stack.gateway.url}/metrics")).text
        assert 'cp_gateway_requests_total{route="chat"' in metrics

        # Every answered request becomes a usage record (written in batches, within ~1 s).
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            report = await stack.api.get(
                "/api/v1/usage", params={"project_id": stack.project_id, "group_by": "model"}
            )
            assert report.status_code == 200, report.text
            groups = {g["key"]: g for g in report.json()["groups"]}
            if groups.get("chat", {}).get("requests", 0) >= 6:
                break
            assert asyncio.get_running_loop().time() < deadline, report.json()
            await asyncio.sleep(0.3)
        assert groups["chat"]["completion_tokens"] >= 5
        assert groups["nothing"]["errors"] == groups["nothing"]["requests"] == 1

    async def test_weighted_split_and_least_busy(
        self, stack: Stack, start_workers: StartWorkers, identities: IdentityFactory
    ) -> None:
        await stack.setup(start_workers)
        a, b = await stack.endpoint("w-a"), await stack.endpoint("w-b")
        slow = await stack.endpoint("w-slow", engine_args={**FAST, "ttft_ms": 3000})
        await stack.running(a, b, slow)
        await stack.router(
            "split",
            [{"endpoint_id": a["id"], "weight": 1}, {"endpoint_id": b["id"], "weight": 3}],
            retries=0,
        )
        _, key = await stack.key()
        await stack.until_routable(key, "split")
        counts: collections.Counter[str] = collections.Counter()
        async with stack.client(key) as client:

            async def one(body: dict[str, Any]) -> str:
                response = await client.post("/completions", json=body)
                assert response.status_code == 200, response.text
                return response.headers["x-cp-target"]

            fast = {"model": "split", "prompt": "x", "max_tokens": 1}
            for _ in range(20):
                counts.update(await asyncio.gather(*(one(fast) for _ in range(100))))
            assert sum(counts.values()) == 2000
            share = counts["w-b"] / 2000
            assert 0.70 <= share <= 0.80, counts

            # least_busy: five requests sent to w-slow by name hold it busy for 3 s; the
            # router's requests all go to the idle w-a meanwhile.
            response = await stack.api.patch(
                f"/api/v1/routers/{await router_id(stack, 'split')}",
                json={
                    "strategy": "least_busy",
                    "targets": [{"endpoint_id": a["id"]}, {"endpoint_id": slow["id"]}],
                },
            )
            assert response.status_code == 200, response.text
            await asyncio.sleep(1)
            held = [
                asyncio.create_task(one({"model": "w-slow", "prompt": "x", "max_tokens": 1}))
                for _ in range(5)
            ]
            await asyncio.sleep(0.5)
            chosen = [
                await one({"model": "split", "prompt": "x", "max_tokens": 1}) for _ in range(10)
            ]
            assert chosen == ["w-a"] * 10
            assert await asyncio.gather(*held) == ["w-slow"] * 5


class TestSharedLeastBusy:
    async def test_least_busy_sees_the_load_other_gateway_processes_put_on_a_target(
        self,
        stack: Stack,
        start_workers: StartWorkers,
        identities: IdentityFactory,
        settings: Settings,
    ) -> None:
        """Gateway one keeps `lb-slow` busy with requests sent to it by name; gateway two
        (its own routing table, the same Redis) routes a `least_busy` router over
        `lb-slow` and `lb-fast`: it sends everything to `lb-fast`, which it could only
        know from the counts gateway one shares."""
        await stack.setup(start_workers)
        slow = await stack.endpoint(
            "lb-slow", engine_args={**FAST, "ttft_ms": 5000, "max_concurrency": 64}
        )
        fast = await stack.endpoint("lb-fast")
        await stack.running(slow, fast)
        await stack.router(
            "lb", [{"endpoint_id": slow["id"]}, {"endpoint_id": fast["id"]}], strategy="least_busy"
        )
        _, key = await stack.key()
        await stack.until_routable(key, "lb")
        other = ApiServer(settings, create_gateway(settings))
        await asyncio.to_thread(other.start)
        try:
            async with (
                stack.client(key) as first,
                httpx.AsyncClient(
                    base_url=f"{other.url}/v1",
                    headers={"authorization": f"Bearer {key}"},
                    timeout=60,
                ) as second,
            ):
                body = {"model": "lb-slow", "prompt": "x", "max_tokens": 1}
                busy = [
                    asyncio.create_task(first.post("/completions", json=body)) for _ in range(6)
                ]
                await asyncio.sleep(0.8)
                targets = []
                for _ in range(10):
                    response = await second.post(
                        "/completions", json={"model": "lb", "prompt": "x", "max_tokens": 1}
                    )
                    assert response.status_code == 200, response.text
                    targets.append(response.headers["x-cp-target"])
                    await asyncio.sleep(0.02)
                assert targets == ["lb-fast"] * 10
                assert all(r.status_code == 200 for r in await asyncio.gather(*busy))
        finally:
            await asyncio.to_thread(other.stop)


PROVIDER_KEY = "sk-provider-test-key"


def provider_stand_in(seen: list[dict[str, Any]]) -> Starlette:
    """An OpenAI-compatible provider (the real one is out of reach here): checks the
    key the gateway sends and answers like the provider does; `seen` records calls."""

    async def chat(request: Request) -> Response:
        body = await request.json()
        seen.append({"authorization": request.headers.get("authorization"), **body})
        if request.headers.get("authorization") != f"Bearer {PROVIDER_KEY}":
            error = {"error": {"message": "bad key", "type": "invalid_request_error"}}
            return JSONResponse(error, status_code=401)
        return JSONResponse(
            {
                "id": "chatcmpl-stand-in",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "from the provider"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
            }
        )

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


class TestCloudTargets:
    async def test_a_cloud_model_as_target_and_as_fallback(
        self,
        stack: Stack,
        start_workers: StartWorkers,
        identities: IdentityFactory,
        settings: Settings,
        admin: Any,
    ) -> None:
        """A cloud model of the project (its row put in the `ready` state onboarding
        leaves it in; onboarding has its own tests) behind a router: the gateway calls
        the provider with the stored credential's key and the provider's model id."""
        await stack.setup(start_workers)
        seen: list[dict[str, Any]] = []
        provider = ApiServer(settings, provider_stand_in(seen))
        await asyncio.to_thread(provider.start)
        try:
            credential = await stack.api.post(
                f"/api/v1/projects/{stack.project_id}/credentials",
                json={
                    "name": "provider",
                    "provider": "openai",
                    "api_key": PROVIDER_KEY,
                    "base_url": f"{provider.url}/v1",
                },
            )
            assert credential.status_code == 201, credential.text
            engine = create_engine(settings.database)
            try:
                async with session_scope(create_sessionmaker(engine)) as session:
                    model = Model(
                        tenant_id=admin.user.tenant_id,
                        project_id=uuid.UUID(stack.project_id),
                        name="hosted",
                        source_kind="cloud",
                        source_ref="openai/gpt-test",
                        credential_id=uuid.UUID(credential.json()["id"]),
                        status="ready",
                        modality="text",
                    )
                    session.add(model)
            finally:
                await engine.dispose()
            bad = await stack.endpoint(
                "flaky", engine_args={**FAST, "fail_rate": 1, "fail_after": 1}
            )
            await stack.running(bad)
            await stack.router("hosted-only", [{"model_id": str(model.id)}])
            await stack.router(
                "hybrid",
                [{"endpoint_id": bad["id"]}],
                fallbacks=[{"model_id": str(model.id)}],
                retries=0,
            )
            _, key = await stack.key()
            await stack.until_routable(key, "hosted-only")
            async with openai.AsyncOpenAI(
                base_url=f"{stack.gateway.url}/v1", api_key=key
            ) as client:
                raw = await client.chat.completions.with_raw_response.create(
                    model="hosted-only", messages=CHAT
                )
                assert raw.headers["x-cp-target"] == "hosted"
                assert raw.parse().choices[0].message.content == "from the provider"
                fallen = await client.chat.completions.with_raw_response.create(
                    model="hybrid", messages=CHAT
                )
                assert fallen.headers["x-cp-target"] == "hosted"
            assert seen
            assert all(call["authorization"] == f"Bearer {PROVIDER_KEY}" for call in seen)
            assert all(call["model"] == "gpt-test" for call in seen)
            # A cloud model is reached through routers only, not by its name.
            async with stack.client(key) as plain:
                response = await plain.post(
                    "/chat/completions", json={"model": "hosted", "messages": CHAT}
                )
                assert response.status_code == 404
        finally:
            await asyncio.to_thread(provider.stop)


async def router_id(stack: Stack, name: str) -> str:
    response = await stack.api.get("/api/v1/routers", params={"project_id": stack.project_id})
    [found] = [r for r in response.json()["items"] if r["name"] == name]
    return str(found["id"])


class TestFailures:
    async def test_cooldown_fallback_and_broken_streams(
        self, stack: Stack, start_workers: StartWorkers, identities: IdentityFactory
    ) -> None:
        await stack.setup(start_workers)
        # Fails every request after the deploy's probe.
        bad = await stack.endpoint("bad", engine_args={**FAST, "fail_rate": 1, "fail_after": 1})
        good = await stack.endpoint("good")
        broken = await stack.endpoint("broken", engine_args={**FAST, "fail_mid_stream": True})
        await stack.running(bad, good, broken)
        await stack.router(
            "safe",
            [{"endpoint_id": bad["id"], "weight": 100}],
            fallbacks=[{"endpoint_id": good["id"]}],
            retries=0,
            cooldown={"allowed_fails": 1, "window_s": 60, "cooldown_s": 30},
        )
        await stack.router(
            "fragile", [{"endpoint_id": broken["id"]}], fallbacks=[{"endpoint_id": good["id"]}]
        )
        _, key = await stack.key()
        await stack.until_routable(key, "safe")
        async with stack.client(key) as client:
            targets = []
            for _ in range(4):
                response = await client.post(
                    "/chat/completions", json={"model": "safe", "messages": CHAT}
                )
                assert response.status_code == 200, response.text
                targets.append(response.headers["x-cp-target"])
            assert targets == ["good"] * 4
            metrics = (await client.get(f"{stack.gateway.url}/metrics")).text
            # Two failures (allowed_fails 1) put `bad` in cooldown: it is not tried again.
            assert 'cp_gateway_target_cooling{route="safe",target="bad"} 1.0' in metrics
            assert (
                'cp_gateway_upstream_errors_total{kind="status",route="safe",target="bad"} 2.0'
                in metrics
            )

            # A stream whose first target fails before its first byte falls back.
            async with client.stream(
                "POST",
                "/chat/completions",
                json={"model": "safe", "messages": CHAT, "stream": True},
            ) as response:
                assert response.status_code == 200
                assert response.headers["x-cp-target"] == "good"
                assert (await response.aread()).endswith(b"data: [DONE]\n\n")

        # After the first byte there is no fallback: the client sees the stream break.
        async with openai.AsyncOpenAI(base_url=f"{stack.gateway.url}/v1", api_key=key) as oa:
            stream = await oa.chat.completions.create(model="fragile", messages=CHAT, stream=True)
            seen: list[Any] = []

            async def read_all() -> None:
                async for chunk in stream:
                    seen.append(chunk)

            with pytest.raises(openai.APIError, match="stream broke"):
                await read_all()
            assert seen, "the first chunk arrived before the break"


class TestChanges:
    async def test_revocation_and_router_edits_apply_without_restart(
        self, stack: Stack, start_workers: StartWorkers, identities: IdentityFactory
    ) -> None:
        await stack.setup(start_workers)
        a, b = await stack.endpoint("e-a"), await stack.endpoint("e-b")
        await stack.running(a, b)
        router = await stack.router("edit", [{"endpoint_id": a["id"]}])
        key_id, key = await stack.key()
        await stack.until_routable(key, "edit")
        async with stack.client(key) as client:
            body = {"model": "edit", "messages": CHAT}
            assert (await client.post("/chat/completions", json=body)).headers[
                "x-cp-target"
            ] == "e-a"
            response = await stack.api.patch(
                f"/api/v1/routers/{router}", json={"targets": [{"endpoint_id": b["id"]}]}
            )
            assert response.status_code == 200, response.text
            await asyncio.sleep(1)
            for _ in range(5):
                response = await client.post("/chat/completions", json=body)
                assert response.headers["x-cp-target"] == "e-b"

            revoked = await stack.api.post(
                f"/api/v1/projects/{stack.project_id}/api-keys/{key_id}/revoke"
            )
            assert revoked.status_code == 200
            await asyncio.sleep(1)
            response = await client.post("/chat/completions", json=body)
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "authentication_error"

    async def test_scale_from_zero_through_the_gateway(
        self, stack: Stack, start_workers: StartWorkers, identities: IdentityFactory
    ) -> None:
        await stack.setup(start_workers)
        sleepy = await stack.endpoint(
            "sleepy",
            engine_args={**FAST, "load_time_s": 1},
            autoscale={
                "min_replicas": 0,
                "max_replicas": 1,
                "scale_down_stabilization_s": 0,
                "scale_to_zero_after_s": 3,
            },
        )
        await wait_for_endpoint(
            stack.api,
            sleepy["id"],
            lambda b: b["status"] == "idle" and b["replicas"] == [],
            within=60,
        )
        _, key = await stack.key()
        await asyncio.sleep(1)
        async with stack.client(key) as client:
            response = await client.post(
                "/chat/completions", json={"model": "sleepy", "messages": CHAT}
            )
        assert response.status_code == 200, response.text
        assert response.headers["x-cp-target"] == "sleepy"
        body = await wait_for_endpoint(stack.api, sleepy["id"], lambda b: True)
        assert any(e["trigger"] == "wake" for e in body["scaling_events"])


async def spawn_gateways(settings: Settings, port: int, log: Path) -> asyncio.subprocess.Process:
    env = {**worker_process_env(settings), "CP_GATEWAY__PORT": str(port)}
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "control_plane.cli",
            "gateway",
            "--workers",
            "4",
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )


class TestSharedLimits:
    @pytest.mark.timeout(300)
    async def test_rpm_and_tpm_hold_across_four_gateway_processes(
        self,
        stack: Stack,
        start_workers: StartWorkers,
        identities: IdentityFactory,
        settings: Settings,
        tmp_path: Path,
    ) -> None:
        """1,000 concurrent requests with an RPM of 100 through 4 gateway processes (one
        port, `cpctl gateway --workers 4`) sharing one Redis: exactly 100 succeed; with a
        TPM limit, concurrent large `max_tokens` requests never reserve more than it."""
        await stack.setup(start_workers)
        roomy = {**FAST, "max_concurrency": 1000, "max_queue": 1000}
        sim = await stack.endpoint("limited", engine_args=roomy)
        # Answers after 2 s: every TPM request reserves before any settles.
        slow = await stack.endpoint("slow", engine_args={**roomy, "ttft_ms": 2000})
        await stack.running(sim, slow)
        _, rpm_key = await stack.key(rpm_limit=100)
        _, tpm_key = await stack.key(tpm_limit=10_000)
        port = free_port()
        log = tmp_path / "gateways.log"
        process = await spawn_gateways(settings, port, log)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            async with httpx.AsyncClient(
                base_url=url, timeout=60, limits=httpx.Limits(max_connections=300)
            ) as client:
                deadline = asyncio.get_running_loop().time() + 60
                while True:
                    try:
                        if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert process.returncode is None, log_tail(log)
                    assert asyncio.get_running_loop().time() < deadline, log_tail(log)
                    await asyncio.sleep(0.2)

                async def one(key: str, body: dict[str, Any]) -> httpx.Response:
                    return await client.post(
                        "/completions", json=body, headers={"authorization": f"Bearer {key}"}
                    )

                small = {"model": "limited", "prompt": "x", "max_tokens": 1}
                responses = await asyncio.gather(*(one(rpm_key, small) for _ in range(1000)))
                codes = collections.Counter(r.status_code for r in responses)
                assert codes == {200: 100, 429: 900}, codes
                refused = next(r for r in responses if r.status_code == 429)
                assert int(refused.headers["retry-after"]) >= 1
                assert "requests" in refused.json()["error"]["message"]

                large = {"model": "slow", "prompt": "x", "max_tokens": 3000}
                responses = await asyncio.gather(*(one(tpm_key, large) for _ in range(40)))
                codes = collections.Counter(r.status_code for r in responses)
                # Each reserves about 3,000 tokens of the 10,000: never a fourth at once.
                assert codes[200] == 3, codes
                assert codes[429] == 37, codes
        finally:
            await stop(process)
        assert "Traceback" not in log_tail(log, 100_000), log_tail(log)
