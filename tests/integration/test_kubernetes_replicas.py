"""Replica sets on Kubernetes (`KubernetesProvider` as a `ReplicaProvider`) against the
stand-in API server of `tests.fixtures.kube`.

The stand-in runs no controller: tests add the pods a Deployment would have with
`kube_api.add_pod_for(...)`, in the state each scenario needs.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from control_plane.clusters.providers.base import (
    ClusterAuthError,
    ClusterUnreachable,
    ProviderError,
    ReplicaNotFound,
    ReplicaProvider,
)
from control_plane.clusters.providers.kubernetes import (
    InvalidReplicaSpec,
    KubernetesProvider,
    replica_set_manifests,
)
from control_plane.endpoints.engines import vllm
from control_plane.endpoints.engines.base import EngineRequest, ModelInfo
from tests.fixtures.kube import KubeApiServer
from workflows.contracts.clusters import ClusterKind, namespace_for
from workflows.contracts.endpoints import (
    LABEL_ENDPOINT,
    EngineKind,
    LaunchSpec,
    ReplicaSetSpec,
    ReplicaState,
    replica_set_name,
)

TIMEOUT = 2.0


def conforms(provider: KubernetesProvider) -> ReplicaProvider:
    """mypy checks here that the provider satisfies the `ReplicaProvider` protocol."""
    return provider


def vllm_launch(tensor_parallel_size: int = 1) -> LaunchSpec:
    request = EngineRequest(
        engine=EngineKind.VLLM,
        served_model_name="chat",
        cluster_kind=ClusterKind.KUBERNETES,
        model=ModelInfo(
            model_id=uuid.uuid4(),
            name="qwen",
            source_kind="huggingface",
            source_ref="Qwen/Qwen2.5-0.5B-Instruct",
            pinned_revision="a" * 40,
            context_length=32768,
        ),
    )
    args = vllm.VllmArgs(tensor_parallel_size=tensor_parallel_size)
    return vllm.render(request, args)


def replica_set(replicas: int = 1, *, endpoint_id: uuid.UUID | None = None) -> ReplicaSetSpec:
    endpoint_id = endpoint_id or uuid.uuid4()
    return ReplicaSetSpec(
        endpoint_id=endpoint_id,
        name=replica_set_name(endpoint_id),
        launch=vllm_launch(),
        replicas=replicas,
    )


@pytest.fixture
def namespace(kube_api: KubeApiServer) -> str:
    name = namespace_for(uuid.uuid4())
    kube_api.add_namespace(name)
    return name


@pytest.fixture
def provider(kube_api: KubeApiServer, namespace: str) -> Iterator[KubernetesProvider]:
    built = KubernetesProvider.from_kubeconfig(
        kube_api.kubeconfig(),
        cluster_id=uuid.uuid4(),
        namespace=namespace,
        request_timeout=TIMEOUT,
    )
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def spec() -> ReplicaSetSpec:
    return replica_set()


def stored(store: dict[tuple[str, str], dict[str, Any]], namespace: str) -> list[str]:
    return sorted(name for ns, name in store if ns == namespace)


class TestEnsure:
    async def test_creates_the_deployment_and_service(
        self,
        provider: KubernetesProvider,
        kube_api: KubeApiServer,
        namespace: str,
        spec: ReplicaSetSpec,
    ) -> None:
        assert await provider.ensure_replicas(spec) == []
        deployment, service = replica_set_manifests(spec, namespace)
        created = kube_api.deployments[(namespace, spec.name)]
        assert created["spec"] == deployment["spec"]
        assert created["metadata"]["labels"] == deployment["metadata"]["labels"]
        exposed = kube_api.services[(namespace, spec.name)]
        assert exposed["spec"]["ports"] == service["spec"]["ports"]
        assert exposed["spec"]["selector"] == {LABEL_ENDPOINT: str(spec.endpoint_id)}
        assert kube_api.count("PATCH") == 0

    async def test_a_second_call_patches_the_replica_count(
        self,
        provider: KubernetesProvider,
        kube_api: KubeApiServer,
        namespace: str,
        spec: ReplicaSetSpec,
    ) -> None:
        await provider.ensure_replicas(spec)
        cluster_ip = kube_api.services[(namespace, spec.name)]["spec"]["clusterIP"]
        await provider.ensure_replicas(spec.model_copy(update={"replicas": 3}))
        assert stored(kube_api.deployments, namespace) == [spec.name]
        assert stored(kube_api.services, namespace) == [spec.name]
        deployment = kube_api.deployments[(namespace, spec.name)]
        assert deployment["spec"]["replicas"] == 3
        assert deployment["metadata"]["generation"] == 2
        # The address clients already use survives the patch.
        assert kube_api.services[(namespace, spec.name)]["spec"]["clusterIP"] == cluster_ip
        path = f"/apis/apps/v1/namespaces/{namespace}/deployments/{spec.name}"
        assert kube_api.count("PATCH", path) == 1

    async def test_an_unchanged_spec_changes_nothing(
        self,
        provider: KubernetesProvider,
        kube_api: KubeApiServer,
        namespace: str,
        spec: ReplicaSetSpec,
    ) -> None:
        await provider.ensure_replicas(spec)
        before = kube_api.deployments[(namespace, spec.name)]["metadata"]["resourceVersion"]
        await provider.ensure_replicas(spec)
        after = kube_api.deployments[(namespace, spec.name)]["metadata"]
        assert after["resourceVersion"] == before
        assert after["generation"] == 1

    async def test_a_new_template_replaces_the_old_one(
        self,
        provider: KubernetesProvider,
        kube_api: KubeApiServer,
        namespace: str,
        spec: ReplicaSetSpec,
    ) -> None:
        await provider.ensure_replicas(spec)
        launch = spec.launch.model_copy(
            update={
                "resources": spec.launch.resources.model_copy(update={"gpus": 0}),
                "env": {"ONLY": "this"},
            }
        )
        await provider.ensure_replicas(spec.model_copy(update={"launch": launch}))
        pod = kube_api.deployments[(namespace, spec.name)]["spec"]["template"]["spec"]
        assert pod["volumes"] == []
        assert pod["containers"][0]["env"] == [{"name": "ONLY", "value": "this"}]
        assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]

    async def test_returns_the_replicas(
        self,
        provider: KubernetesProvider,
        kube_api: KubeApiServer,
        spec: ReplicaSetSpec,
    ) -> None:
        await provider.ensure_replicas(spec)
        pod = kube_api.add_pod_for(spec.name)
        replicas = await provider.ensure_replicas(spec)
        assert [r.name for r in replicas] == [pod["metadata"]["name"]]

    async def test_an_invalid_spec_sends_nothing(
        self, provider: KubernetesProvider, kube_api: KubeApiServer, spec: ReplicaSetSpec
    ) -> None:
        launch = spec.launch.model_copy(update={"image": None})
        with pytest.raises(InvalidReplicaSpec, match="no container image"):
            await provider.ensure_replicas(spec.model_copy(update={"launch": launch}))
        assert kube_api.count() == 0

    async def test_a_missing_namespace_is_reported(
        self, kube_api: KubeApiServer, spec: ReplicaSetSpec
    ) -> None:
        provider = KubernetesProvider.from_kubeconfig(
            kube_api.kubeconfig(), cluster_id=uuid.uuid4(), namespace="cp-missing"
        )
        try:
            with pytest.raises(ProviderError, match='namespaces "cp-missing" not found'):
                await provider.ensure_replicas(spec)
        finally:
            provider.close()


class TestList:
    async def test_a_ready_replica(
        self, provider: KubernetesProvider, kube_api: KubeApiServer, spec: ReplicaSetSpec
    ) -> None:
        await provider.ensure_replicas(spec)
        pod = kube_api.add_pod_for(spec.name, node="gpu-node-3")
        [replica] = await provider.list_replicas(spec)
        assert replica.name == pod["metadata"]["name"]
        assert replica.state is ReplicaState.READY
        assert replica.url == f"http://{pod['status']['podIP']}:8000"
        assert replica.port == 8000
        assert replica.node == "gpu-node-3"
        assert replica.started_at is not None
        assert replica.restarts == 0
        assert replica.reason == ""

    async def test_a_starting_replica(
        self, provider: KubernetesProvider, kube_api: KubeApiServer, spec: ReplicaSetSpec
    ) -> None:
        await provider.ensure_replicas(spec)
        kube_api.add_pod_for(spec.name, state="starting")
        [replica] = await provider.list_replicas(spec)
        assert replica.state is ReplicaState.STARTING

    async def test_not_ready_past_the_startup_timeout_is_unhealthy(
        self, provider: KubernetesProvider, kube_api: KubeApiServer, spec: ReplicaSetSpec
    ) -> None:
        await provider.ensure_replicas(spec)
        long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(
            seconds=spec.launch.startup_timeout_s + 60
        )
        kube_api.add_pod_for(spec.name, state="starting", started_at=long_ago)
        [replica] = await provider.list_replicas(spec)
        assert replica.state is ReplicaState.UNHEALTHY

    async def test_a_crash_looping_replica_has_exited(
        self, provider: KubernetesProvider, kube_api: KubeApiServer, spec: ReplicaSetSpec
    ) -> None:
        await provider.ensure_replicas(spec)
        kube_api.add_pod_for(spec.name, state="crashloop", restarts=4)
        [replica] = await provider.list_replicas(spec)
        assert replica.state is ReplicaState.EXITED
        assert replica.restarts == 4
        assert replica.reason.startswith("CrashLoopBackOff: back-off")
        assert "last exit: Error (exit code 1)" in replica.reason

    async def test_an_evicted_replica_has_exited(
        self, provider: KubernetesProvider, kube_api: KubeApiServer, spec: ReplicaSetSpec
    ) -> None:
        await provider.ensure_replicas(spec)
        kube_api.add_pod_for(spec.name, state="evicted")
        [replica] = await provider.list_replicas(spec)
        assert replica.state is ReplicaState.EXITED
        assert replica.reason.startswith("Evicted: The node was low on resource: memory")

    async def test_an_unschedulable_replica_says_why(
        self, provider: KubernetesProvider, kube_api: KubeApiServer, spec: ReplicaSetSpec
    ) -> None:
        await provider.ensure_replicas(spec)
        kube_api.add_pod_for(spec.name, state="unschedulable")
        [replica] = await provider.list_replicas(spec)
        assert replica.state is ReplicaState.STARTING
        assert replica.url is None
        assert replica.node is None
        assert "Insufficient nvidia.com/gpu" in replica.reason

    async def test_only_the_sets_own_pods(
        self,
        provider: KubernetesProvider,
        kube_api: KubeApiServer,
        namespace: str,
        spec: ReplicaSetSpec,
    ) -> None:
        other = replica_set()
        await provider.ensure_replicas(spec)
        await provider.ensure_replicas(other)
        mine = [kube_api.add_pod_for(spec.name)["metadata"]["name"] for _ in range(2)]
        kube_api.add_pod_for(other.name)
        replicas = await provider.list_replicas(spec)
        assert [r.name for r in replicas] == sorted(mine)
        [seen] = [r for r in kube_api.requests if r.path == f"/api/v1/namespaces/{namespace}/pods"][
            -1:
        ]
        assert seen.query["labelSelector"] == [f"{LABEL_ENDPOINT}={spec.endpoint_id}"]

    async def test_pods_being_deleted_are_left_out(
        self, provider: KubernetesProvider, kube_api: KubeApiServer, spec: ReplicaSetSpec
    ) -> None:
        await provider.ensure_replicas(spec)
        leaving = kube_api.add_pod_for(spec.name)
        staying = kube_api.add_pod_for(spec.name, state="starting")
        with kube_api.lock:
            leaving["metadata"]["deletionTimestamp"] = leaving["metadata"]["creationTimestamp"]
        replicas = await provider.list_replicas(spec)
        assert [r.name for r in replicas] == [staying["metadata"]["name"]]

    async def test_no_pods(self, provider: KubernetesProvider, spec: ReplicaSetSpec) -> None:
        assert await provider.list_replicas(spec) == []


class TestLogs:
    async def test_the_last_lines_of_each_replica(
        self, provider: KubernetesProvider, kube_api: KubeApiServer, spec: ReplicaSetSpec
    ) -> None:
        await provider.ensure_replicas(spec)
        lines = "".join(f"line {n}\n" for n in range(1, 6))
        first = kube_api.add_pod_for(spec.name, log=lines)["metadata"]["name"]
        second = kube_api.add_pod_for(spec.name, log="only\n")["metadata"]["name"]
        logs = await provider.replica_logs(spec.name, None, 2)
        assert logs == {first: "line 4\nline 5\n", second: "only\n"}

    async def test_a_named_replica(
        self, provider: KubernetesProvider, kube_api: KubeApiServer, spec: ReplicaSetSpec
    ) -> None:
        await provider.ensure_replicas(spec)
        wanted = kube_api.add_pod_for(spec.name, log="wanted\n")["metadata"]["name"]
        kube_api.add_pod_for(spec.name, log="other\n")
        assert await provider.replica_logs(spec.name, wanted, 10) == {wanted: "wanted\n"}

    async def test_an_unknown_replica(
        self, provider: KubernetesProvider, kube_api: KubeApiServer, spec: ReplicaSetSpec
    ) -> None:
        await provider.ensure_replicas(spec)
        other = replica_set()
        await provider.ensure_replicas(other)
        foreign = kube_api.add_pod_for(other.name)["metadata"]["name"]
        with pytest.raises(ReplicaNotFound):
            await provider.replica_logs(spec.name, "nope", 10)
        # A pod of another set is not this set's replica either.
        with pytest.raises(ReplicaNotFound):
            await provider.replica_logs(spec.name, foreign, 10)

    async def test_log_text_is_returned_verbatim(
        self, provider: KubernetesProvider, kube_api: KubeApiServer, spec: ReplicaSetSpec
    ) -> None:
        await provider.ensure_replicas(spec)
        text = '{"level": "info", "msg": "Uvicorn running"}\n'
        name = kube_api.add_pod_for(spec.name, log=text)["metadata"]["name"]
        assert await provider.replica_logs(spec.name, name, 10) == {name: text}

    async def test_a_replica_that_never_ran_has_an_empty_log(
        self, provider: KubernetesProvider, kube_api: KubeApiServer, spec: ReplicaSetSpec
    ) -> None:
        await provider.ensure_replicas(spec)
        name = kube_api.add_pod_for(spec.name, state="unschedulable")["metadata"]["name"]
        assert await provider.replica_logs(spec.name, None, 10) == {name: ""}

    async def test_a_crash_looping_replica_shows_its_last_run(
        self, provider: KubernetesProvider, kube_api: KubeApiServer, spec: ReplicaSetSpec
    ) -> None:
        await provider.ensure_replicas(spec)
        name = kube_api.add_pod_for(
            spec.name, state="crashloop", log="CUDA out of memory\n", previous_log="older\n"
        )["metadata"]["name"]
        assert await provider.replica_logs(spec.name, name, 10) == {name: "CUDA out of memory\n"}


class TestDelete:
    async def test_removes_the_deployment_the_service_and_the_pods(
        self,
        provider: KubernetesProvider,
        kube_api: KubeApiServer,
        namespace: str,
        spec: ReplicaSetSpec,
    ) -> None:
        await provider.ensure_replicas(spec)
        kube_api.add_pod_for(spec.name)
        removed = await provider.delete_replicas(spec.name)
        assert removed == [
            f"deployment/{namespace}/{spec.name}",
            f"service/{namespace}/{spec.name}",
        ]
        assert stored(kube_api.deployments, namespace) == []
        assert stored(kube_api.services, namespace) == []
        assert await provider.list_replicas(spec) == []

    async def test_missing_is_success(
        self, provider: KubernetesProvider, spec: ReplicaSetSpec
    ) -> None:
        await provider.ensure_replicas(spec)
        await provider.delete_replicas(spec.name)
        assert await provider.delete_replicas(spec.name) == []

    async def test_another_set_is_left_alone(
        self,
        provider: KubernetesProvider,
        kube_api: KubeApiServer,
        namespace: str,
        spec: ReplicaSetSpec,
    ) -> None:
        other = replica_set()
        await provider.ensure_replicas(spec)
        await provider.ensure_replicas(other)
        kept = kube_api.add_pod_for(other.name)["metadata"]["name"]
        await provider.delete_replicas(spec.name)
        assert stored(kube_api.deployments, namespace) == [other.name]
        assert [r.name for r in await provider.list_replicas(other)] == [kept]


class TestRefusals:
    async def test_a_refused_token(
        self, kube_api: KubeApiServer, namespace: str, spec: ReplicaSetSpec
    ) -> None:
        provider = KubernetesProvider.from_kubeconfig(
            kube_api.kubeconfig(token="not-the-token"),
            cluster_id=uuid.uuid4(),
            namespace=namespace,
        )
        try:
            with pytest.raises(ClusterAuthError, match="401"):
                await provider.ensure_replicas(spec)
        finally:
            provider.close()
        assert kube_api.deployments == {}

    @pytest.mark.parametrize(
        "call",
        ["ensure", "list", "logs", "delete"],
    )
    async def test_forbidden(
        self, provider: KubernetesProvider, kube_api: KubeApiServer, spec: ReplicaSetSpec, call: str
    ) -> None:
        kube_api.fail_with(403)
        with pytest.raises(ClusterAuthError, match="403"):
            await self._run(provider, spec, call)

    @pytest.mark.parametrize("call", ["ensure", "list", "logs", "delete"])
    async def test_an_outage(
        self, provider: KubernetesProvider, kube_api: KubeApiServer, spec: ReplicaSetSpec, call: str
    ) -> None:
        kube_api.fail_with(503)
        with pytest.raises(ClusterUnreachable, match="503"):
            await self._run(provider, spec, call)

    async def _run(self, provider: KubernetesProvider, spec: ReplicaSetSpec, call: str) -> None:
        if call == "ensure":
            await provider.ensure_replicas(spec)
        elif call == "list":
            await provider.list_replicas(spec)
        elif call == "logs":
            await provider.replica_logs(spec.name, None, 10)
        else:
            await provider.delete_replicas(spec.name)
