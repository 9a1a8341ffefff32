"""The Kubernetes cluster provider against a stand-in Kubernetes API server.

No Kubernetes API server can run where these tests run, so `tests.fixtures.kube` stands
in for one: a real HTTP(S) server answering the real REST paths with the JSON the API
server sends. Only that network boundary is replaced; the provider runs with the official
`kubernetes` client, its kubeconfig and in-cluster loaders, and urllib3, unchanged.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3.util.connection
import yaml
from kubernetes.config import incluster_config

from control_plane.clusters.providers.base import (
    ClusterAuthError,
    ClusterProvider,
    ClusterUnreachable,
    InvalidClusterConfig,
    ProviderError,
)
from control_plane.clusters.providers.kubernetes import KubernetesProvider, server_url_of
from tests.fixtures.kube import KubeApiServer, make_node
from workflows.contracts.clusters import NodeInfo, Platform, namespace_for

TIMEOUT = 2.0


def conforms(provider: KubernetesProvider) -> ClusterProvider:
    """mypy checks here that the provider satisfies the `ClusterProvider` protocol."""
    return provider


@pytest.fixture
def cluster_id() -> uuid.UUID:
    return uuid.uuid4()


@pytest.fixture
def namespace(cluster_id: uuid.UUID) -> str:
    return namespace_for(cluster_id)


@pytest.fixture
def provider(
    kube_api: KubeApiServer, cluster_id: uuid.UUID, namespace: str
) -> Iterator[KubernetesProvider]:
    built = KubernetesProvider.from_kubeconfig(
        kube_api.kubeconfig(), cluster_id=cluster_id, namespace=namespace, request_timeout=TIMEOUT
    )
    try:
        yield built
    finally:
        built.close()


def build(kubeconfig: str, namespace: str = "cp-test") -> KubernetesProvider:
    return KubernetesProvider.from_kubeconfig(
        kubeconfig, cluster_id=uuid.uuid4(), namespace=namespace, request_timeout=TIMEOUT
    )


def kubeconfig_with(kube_api: KubeApiServer, change: Callable[[dict[str, Any]], None]) -> str:
    document = yaml.safe_load(kube_api.kubeconfig())
    change(document)
    return yaml.safe_dump(document)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def discovered(provider: KubernetesProvider, name: str) -> NodeInfo:
    inventory = await provider.discover()
    return next(node for node in inventory.nodes if node.name == name)


class TestServerUrlOf:
    def test_the_current_contexts_server(self) -> None:
        kubeconfig = yaml.safe_dump(
            {
                "clusters": [
                    {"name": "a", "cluster": {"server": "https://a.example:6443"}},
                    {"name": "b", "cluster": {"server": "https://b.example:6443/"}},
                ],
                "contexts": [
                    {"name": "ctx-a", "context": {"cluster": "a"}},
                    {"name": "ctx-b", "context": {"cluster": "b"}},
                ],
                "current-context": "ctx-b",
            }
        )
        assert server_url_of(kubeconfig) == "https://b.example:6443"

    def test_the_only_context_when_none_is_current(self) -> None:
        kubeconfig = yaml.safe_dump(
            {
                "clusters": [{"name": "a", "cluster": {"server": "https://a.example:6443"}}],
                "contexts": [{"name": "ctx-a", "context": {"cluster": "a"}}],
            }
        )
        assert server_url_of(kubeconfig) == "https://a.example:6443"

    def test_several_contexts_and_none_current_is_invalid(self) -> None:
        kubeconfig = yaml.safe_dump(
            {
                "clusters": [{"name": "a", "cluster": {"server": "https://a.example:6443"}}],
                "contexts": [
                    {"name": "one", "context": {"cluster": "a"}},
                    {"name": "two", "context": {"cluster": "a"}},
                ],
            }
        )
        with pytest.raises(InvalidClusterConfig, match="2 contexts and no current-context"):
            server_url_of(kubeconfig)

    def test_a_cluster_without_server_is_invalid(self) -> None:
        kubeconfig = yaml.safe_dump(
            {
                "clusters": [{"name": "a", "cluster": {"certificate-authority-data": "c2VjcmV0"}}],
                "contexts": [{"name": "ctx", "context": {"cluster": "a"}}],
                "current-context": "ctx",
            }
        )
        with pytest.raises(InvalidClusterConfig, match="no server URL") as raised:
            server_url_of(kubeconfig)
        assert "c2VjcmV0" not in str(raised.value)

    def test_a_current_context_that_is_not_defined_is_invalid(self) -> None:
        kubeconfig = yaml.safe_dump(
            {
                "clusters": [{"name": "a", "cluster": {"server": "https://a.example:6443"}}],
                "contexts": [{"name": "ctx", "context": {"cluster": "a"}}],
                "current-context": "gone",
            }
        )
        with pytest.raises(InvalidClusterConfig, match="'gone' is not defined"):
            server_url_of(kubeconfig)


class TestInvalidKubeconfig:
    def test_text_that_is_not_yaml(self) -> None:
        with pytest.raises(InvalidClusterConfig, match="not valid YAML") as raised:
            build("users: [{token: sekret-token-value\n  - : ][")
        assert "sekret" not in str(raised.value)

    def test_no_contexts(self, kube_api: KubeApiServer) -> None:
        kubeconfig = kubeconfig_with(kube_api, lambda doc: doc.update(contexts=[]))
        with pytest.raises(InvalidClusterConfig, match="no contexts"):
            build(kubeconfig)

    def test_context_pointing_at_a_missing_cluster(self, kube_api: KubeApiServer) -> None:
        def change(doc: dict[str, Any]) -> None:
            doc["contexts"][0]["context"]["cluster"] = "elsewhere"

        with pytest.raises(InvalidClusterConfig, match="cluster 'elsewhere'") as raised:
            build(kubeconfig_with(kube_api, change))
        assert kube_api.token not in str(raised.value)

    def test_context_pointing_at_a_missing_user(self, kube_api: KubeApiServer) -> None:
        def change(doc: dict[str, Any]) -> None:
            doc["contexts"][0]["context"]["user"] = "nobody"

        with pytest.raises(InvalidClusterConfig, match="user 'nobody'"):
            build(kubeconfig_with(kube_api, change))

    def test_certificate_authority_data_that_is_not_base64(self) -> None:
        kubeconfig = yaml.safe_dump(
            {
                "clusters": [
                    {
                        "name": "a",
                        "cluster": {
                            "server": "https://a.example:6443",
                            "certificate-authority-data": "%%% not base64 %%%",
                        },
                    }
                ],
                "contexts": [{"name": "ctx", "context": {"cluster": "a"}}],
                "current-context": "ctx",
            }
        )
        with pytest.raises(InvalidClusterConfig, match="not valid base64"):
            build(kubeconfig)

    def test_certificate_authority_data_that_is_not_a_certificate(self) -> None:
        kubeconfig = yaml.safe_dump(
            {
                "clusters": [
                    {
                        "name": "a",
                        "cluster": {
                            "server": "https://a.example:6443",
                            "certificate-authority-data": b64(b"garbage, not a PEM block"),
                        },
                    }
                ],
                "contexts": [{"name": "ctx", "context": {"cluster": "a"}}],
                "current-context": "ctx",
            }
        )
        with pytest.raises(InvalidClusterConfig, match="not a PEM certificate"):
            build(kubeconfig)

    def test_client_certificate_data_that_is_not_a_certificate(
        self, kube_api_tls: KubeApiServer
    ) -> None:
        def change(doc: dict[str, Any]) -> None:
            doc["users"][0]["user"] = {
                "client-certificate-data": b64(b"not a certificate"),
                "client-key-data": b64(b"not a key"),
            }

        with pytest.raises(InvalidClusterConfig, match="client-certificate-data"):
            build(kubeconfig_with(kube_api_tls, change))

    def test_exec_credential_plugins_are_refused(self, kube_api: KubeApiServer) -> None:
        def change(doc: dict[str, Any]) -> None:
            doc["users"][0]["user"] = {
                "exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "id"}
            }

        with pytest.raises(InvalidClusterConfig, match=r"credential plugin \(exec\)"):
            build(kubeconfig_with(kube_api, change))

    def test_token_files_on_the_control_plane_host_are_refused(
        self, kube_api: KubeApiServer
    ) -> None:
        def change(doc: dict[str, Any]) -> None:
            doc["users"][0]["user"] = {"tokenFile": "/var/run/secrets/token"}

        with pytest.raises(InvalidClusterConfig, match=r"local file \(tokenFile\)"):
            build(kubeconfig_with(kube_api, change))

    def test_certificate_authority_files_are_refused(self, kube_api: KubeApiServer) -> None:
        def change(doc: dict[str, Any]) -> None:
            doc["clusters"][0]["cluster"]["certificate-authority"] = "/etc/ssl/ca.crt"

        with pytest.raises(InvalidClusterConfig, match="certificate-authority-data"):
            build(kubeconfig_with(kube_api, change))

    def test_an_invalid_namespace_name(self, kube_api: KubeApiServer) -> None:
        with pytest.raises(InvalidClusterConfig, match="not a valid namespace name"):
            build(kube_api.kubeconfig(), namespace="Not_A_Namespace")

    def test_in_cluster_outside_a_pod(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
        with pytest.raises(InvalidClusterConfig, match="not running in a Kubernetes pod"):
            KubernetesProvider.in_cluster(cluster_id=uuid.uuid4(), namespace="cp-test")


class TestConnect:
    async def test_through_the_protocol(self, provider: KubernetesProvider) -> None:
        assert (await conforms(provider).connect()).version == "v1.31.2"

    async def test_version_and_server_url(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        connection = await provider.connect()
        assert connection.version == "v1.31.2"
        assert connection.server_url == kube_api.url

    async def test_a_plain_cluster_is_kubernetes(self, provider: KubernetesProvider) -> None:
        assert (await provider.connect()).platform == Platform.KUBERNETES

    async def test_openshift_api_groups_mean_openshift(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        kube_api.openshift = True
        assert (await provider.connect()).platform == Platform.OPENSHIFT

    async def test_the_kubeconfig_token_is_sent(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        await provider.connect()
        assert kube_api.requests
        assert all(seen.authorized for seen in kube_api.requests)

    async def test_over_tls_with_the_kubeconfig_ca(self, kube_api_tls: KubeApiServer) -> None:
        provider = build(kube_api_tls.kubeconfig())
        try:
            connection = await provider.connect()
        finally:
            provider.close()
        assert connection.server_url.startswith("https://")

    async def test_an_unknown_certificate_authority_is_unreachable(
        self, kube_api_tls: KubeApiServer
    ) -> None:
        other = KubeApiServer(tls=True)
        try:
            provider = build(other.kubeconfig(server=kube_api_tls.url, token=kube_api_tls.token))
        finally:
            other.close()
        try:
            with pytest.raises(ClusterUnreachable, match="certificate verify failed"):
                await provider.connect()
        finally:
            provider.close()

    async def test_in_cluster_with_the_pods_service_account(
        self, kube_api_tls: KubeApiServer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        token_file = tmp_path / "token"
        token_file.write_text(kube_api_tls.token)
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(kube_api_tls.port))
        monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token_file))
        monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(kube_api_tls.ca_file()))
        provider = KubernetesProvider.in_cluster(cluster_id=uuid.uuid4(), namespace="cp-test")
        try:
            connection = await provider.connect()
        finally:
            provider.close()
        assert connection.server_url == kube_api_tls.url
        assert all(seen.authorized for seen in kube_api_tls.requests)


class TestDiscover:
    async def test_cpu_and_memory_quantities(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        kube_api.nodes = [
            make_node(
                "cpu-1",
                cpu="4",
                memory="16Gi",
                allocatable_cpu="3500m",
                allocatable_memory="16384Ki",
            )
        ]
        node = await discovered(provider, "cpu-1")
        assert (node.cpu_cores, node.memory_mb) == (4.0, 16384)
        assert (node.allocatable_cpu, node.allocatable_memory_mb) == (3.5, 16)

    async def test_the_connection_comes_with_the_nodes(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        kube_api.nodes = [make_node("a"), make_node("b")]
        inventory = await provider.discover()
        assert inventory.connection.server_url == kube_api.url
        assert [node.name for node in inventory.nodes] == ["a", "b"]

    async def test_node_labels(self, kube_api: KubeApiServer, provider: KubernetesProvider) -> None:
        kube_api.nodes = [make_node("a", labels={"topology.kubernetes.io/zone": "eu-west-1a"})]
        node = await discovered(provider, "a")
        assert node.labels["topology.kubernetes.io/zone"] == "eu-west-1a"
        assert node.labels["kubernetes.io/hostname"] == "a"

    async def test_nvidia_gpus_from_feature_discovery_labels(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        kube_api.nodes = [
            make_node(
                "gpu-1",
                extended={"nvidia.com/gpu": "8"},
                allocatable_extended={"nvidia.com/gpu": "7"},
                labels={
                    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                    "nvidia.com/gpu.memory": "81559",
                    "nvidia.com/cuda.driver.major": "550",
                    "nvidia.com/cuda.driver.minor": "54",
                    "nvidia.com/cuda.driver.rev": "15",
                    "nvidia.com/cuda.runtime.major": "12",
                    "nvidia.com/cuda.runtime.minor": "4",
                },
            )
        ]
        [gpu] = (await discovered(provider, "gpu-1")).accelerators
        assert gpu.vendor == "nvidia"
        assert gpu.model == "NVIDIA-H100-80GB-HBM3"
        assert (gpu.count, gpu.allocatable, gpu.memory_mb) == (8, 7, 81559)
        assert (gpu.driver_version, gpu.cuda_version) == ("550.54.15", "12.4")

    async def test_nvidia_full_version_labels_win(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        kube_api.nodes = [
            make_node(
                "gpu-1",
                extended={"nvidia.com/gpu": "1"},
                labels={
                    "nvidia.com/cuda.driver-version.full": "560.35.03",
                    "nvidia.com/cuda.driver.major": "560",
                    "nvidia.com/cuda.runtime-version.full": "12.6",
                },
            )
        ]
        [gpu] = (await discovered(provider, "gpu-1")).accelerators
        assert (gpu.driver_version, gpu.cuda_version) == ("560.35.03", "12.6")

    async def test_nvidia_gpus_without_labels(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        kube_api.nodes = [make_node("gpu-1", extended={"nvidia.com/gpu": "2"})]
        [gpu] = (await discovered(provider, "gpu-1")).accelerators
        assert (gpu.model, gpu.memory_mb, gpu.count) == ("unknown", 0, 2)
        assert (gpu.driver_version, gpu.cuda_version) == (None, None)

    async def test_amd_gpus(self, kube_api: KubeApiServer, provider: KubernetesProvider) -> None:
        kube_api.nodes = [
            make_node(
                "mi-1",
                extended={"amd.com/gpu": "4"},
                labels={
                    "amd.com/gpu.product-name": "AMD_Instinct_MI210",
                    "amd.com/gpu.vram": "64G",
                },
            )
        ]
        [gpu] = (await discovered(provider, "mi-1")).accelerators
        assert (gpu.vendor, gpu.model) == ("amd", "AMD_Instinct_MI210")
        assert (gpu.count, gpu.allocatable, gpu.memory_mb) == (4, 4, 65536)

    async def test_amd_vram_that_cannot_be_read_is_zero(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        kube_api.nodes = [
            make_node("mi-1", extended={"amd.com/gpu": "1"}, labels={"amd.com/gpu.vram": "lots"})
        ]
        [gpu] = (await discovered(provider, "mi-1")).accelerators
        assert (gpu.model, gpu.memory_mb) == ("unknown", 0)

    async def test_a_gpu_resource_with_count_zero_is_skipped(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        kube_api.nodes = [make_node("gpu-1", extended={"nvidia.com/gpu": "0"})]
        assert (await discovered(provider, "gpu-1")).accelerators == []

    async def test_a_ready_node(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        kube_api.nodes = [make_node("a")]
        node = await discovered(provider, "a")
        assert (node.ready, node.reason) == (True, "")

    async def test_a_not_ready_node_says_why(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        kube_api.nodes = [
            make_node(
                "a",
                ready=False,
                ready_reason="KubeletNotReady",
                ready_message="PLEG is not healthy",
            )
        ]
        node = await discovered(provider, "a")
        assert not node.ready
        assert node.reason == "Ready=False: KubeletNotReady PLEG is not healthy"

    async def test_a_node_whose_kubelet_stopped_reporting(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        kube_api.nodes = [
            make_node(
                "a",
                ready=False,
                ready_status="Unknown",
                ready_reason="NodeStatusUnknown",
                ready_message="Kubelet stopped posting node status.",
            )
        ]
        node = await discovered(provider, "a")
        assert not node.ready
        assert node.reason.startswith("Ready=Unknown: NodeStatusUnknown")

    async def test_a_cordoned_node_is_not_ready(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        kube_api.nodes = [make_node("a", cordoned=True)]
        node = await discovered(provider, "a")
        assert (node.ready, node.reason) == (False, "cordoned")


class TestPrepare:
    async def test_creates_a_labelled_namespace_and_a_service_account(
        self,
        kube_api: KubeApiServer,
        provider: KubernetesProvider,
        cluster_id: uuid.UUID,
        namespace: str,
    ) -> None:
        result = await provider.prepare()
        assert result.created == [
            f"namespace/{namespace}",
            f"serviceaccount/{namespace}/control-plane",
        ]
        labels = kube_api.namespaces[namespace]["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "control-plane"
        assert labels["cp/cluster"] == str(cluster_id)
        assert (namespace, "control-plane") in kube_api.service_accounts

    async def test_twice_creates_everything_once(
        self, kube_api: KubeApiServer, provider: KubernetesProvider, namespace: str
    ) -> None:
        await provider.prepare()
        again = await provider.prepare()
        assert again.created == []
        assert "already existed" in again.detail
        assert kube_api.count("POST", "/api/v1/namespaces") == 2
        assert list(kube_api.namespaces).count(namespace) == 1
        ours = [key for key in kube_api.service_accounts if key == (namespace, "control-plane")]
        assert len(ours) == 1

    async def test_an_existing_namespace_is_used_as_it_is(
        self, kube_api: KubeApiServer, provider: KubernetesProvider, namespace: str
    ) -> None:
        kube_api.add_namespace(namespace, labels={"owner": "someone-else"})
        result = await provider.prepare()
        assert result.created == [f"serviceaccount/{namespace}/control-plane"]
        assert "cp/cluster" not in kube_api.namespaces[namespace]["metadata"]["labels"]

    async def test_a_namespace_being_deleted_is_worth_retrying(
        self, kube_api: KubeApiServer, provider: KubernetesProvider, namespace: str
    ) -> None:
        kube_api.add_namespace(namespace, phase="Terminating")
        with pytest.raises(ClusterUnreachable, match="being deleted"):
            await provider.prepare()


class TestSmokeCheck:
    async def test_after_prepare(
        self, kube_api: KubeApiServer, provider: KubernetesProvider, namespace: str
    ) -> None:
        await provider.prepare()
        described = await provider.smoke_check()
        assert namespace in described
        assert "control-plane" in described
        assert kube_api.count("GET", f"/api/v1/namespaces/{namespace}/pods") == 1

    async def test_without_the_namespace(
        self, provider: KubernetesProvider, namespace: str
    ) -> None:
        with pytest.raises(ClusterUnreachable, match=f"namespace {namespace} not found"):
            await provider.smoke_check()

    async def test_without_the_service_account(
        self, kube_api: KubeApiServer, provider: KubernetesProvider, namespace: str
    ) -> None:
        kube_api.add_namespace(namespace)
        with pytest.raises(ClusterUnreachable, match="service account control-plane not found"):
            await provider.smoke_check()


class TestTeardown:
    async def test_removes_our_namespace(
        self, kube_api: KubeApiServer, provider: KubernetesProvider, namespace: str
    ) -> None:
        await provider.prepare()
        assert await provider.teardown() == [f"namespace/{namespace}"]
        assert namespace not in kube_api.namespaces
        assert (namespace, "control-plane") not in kube_api.service_accounts

    async def test_nothing_to_remove(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        assert await provider.teardown() == []
        assert kube_api.count("DELETE") == 0

    async def test_a_foreign_namespace_of_the_same_name_is_left_alone(
        self, kube_api: KubeApiServer, provider: KubernetesProvider, namespace: str
    ) -> None:
        kube_api.add_namespace(namespace, labels={"owner": "someone-else"})
        assert await provider.teardown() == []
        assert namespace in kube_api.namespaces
        assert kube_api.count("DELETE") == 0

    async def test_another_clusters_namespace_is_left_alone(
        self, kube_api: KubeApiServer, provider: KubernetesProvider, namespace: str
    ) -> None:
        kube_api.add_namespace(namespace, labels={"cp/cluster": str(uuid.uuid4())})
        assert await provider.teardown() == []
        assert namespace in kube_api.namespaces


class TestCredentialsRefused:
    async def test_a_wrong_token(self, kube_api: KubeApiServer) -> None:
        provider = build(kube_api.kubeconfig(token="not-the-token"))
        try:
            with pytest.raises(ClusterAuthError, match="401") as raised:
                await provider.connect()
        finally:
            provider.close()
        assert "not-the-token" not in str(raised.value)

    async def test_forbidden(self, kube_api: KubeApiServer, provider: KubernetesProvider) -> None:
        kube_api.fail_with(403)
        with pytest.raises(ClusterAuthError, match="403"):
            await provider.discover()


class TestUnreachable:
    async def test_a_stopped_server_fails_fast_without_retries(
        self,
        kube_api: KubeApiServer,
        provider: KubernetesProvider,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        attempts: list[object] = []
        real_connect = urllib3.util.connection.create_connection

        def counting_connect(*args: Any, **kwargs: Any) -> Any:
            attempts.append(args[0])
            return real_connect(*args, **kwargs)

        monkeypatch.setattr(urllib3.util.connection, "create_connection", counting_connect)
        kube_api.stop()
        started = time.monotonic()
        with pytest.raises(ClusterUnreachable, match="connection refused") as raised:
            await provider.connect()
        assert time.monotonic() - started < 5
        assert len(attempts) == 1
        assert str(raised.value) == f"cannot reach {kube_api.url}: connection refused"

    async def test_a_dropped_connection_is_not_retried(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        kube_api.drop_connections()
        with pytest.raises(ClusterUnreachable, match="dropped"):
            await provider.connect()
        assert kube_api.count() == 1

    async def test_service_unavailable(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        kube_api.fail_with(503)
        with pytest.raises(ClusterUnreachable, match="503"):
            await provider.connect()
        assert kube_api.count() == 1

    async def test_too_many_requests(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        kube_api.fail_with(429)
        with pytest.raises(ClusterUnreachable, match="429"):
            await provider.connect()

    async def test_a_server_that_does_not_answer_in_time(
        self, kube_api: KubeApiServer, cluster_id: uuid.UUID, namespace: str
    ) -> None:
        provider = KubernetesProvider.from_kubeconfig(
            kube_api.kubeconfig(), cluster_id=cluster_id, namespace=namespace, request_timeout=0.3
        )
        kube_api.delay(5)
        started = time.monotonic()
        try:
            with pytest.raises(ClusterUnreachable, match="no answer within 0.3 s"):
                await provider.connect()
        finally:
            provider.close()
        assert time.monotonic() - started < 3

    async def test_recovers_when_the_server_is_back(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        await provider.connect()
        kube_api.stop()
        with pytest.raises(ClusterUnreachable):
            await provider.connect()
        kube_api.start()
        assert (await provider.connect()).version == "v1.31.2"


class TestOtherRefusals:
    async def test_an_unexpected_status_is_a_plain_provider_error(
        self, kube_api: KubeApiServer, provider: KubernetesProvider
    ) -> None:
        kube_api.fail_with(404)
        with pytest.raises(ProviderError, match="GET /version .* answered 404") as raised:
            await provider.connect()
        assert not isinstance(
            raised.value, ClusterUnreachable | ClusterAuthError | InvalidClusterConfig
        )
