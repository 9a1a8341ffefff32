"""The `vllm` engine's launch specs, and the Kubernetes manifests of a vLLM replica set.

Both are pure functions of their inputs: no cluster, no GPU, no vLLM needed.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from control_plane.clusters.providers.kubernetes import (
    InvalidReplicaSpec,
    replica_set_manifests,
)
from control_plane.endpoints.engines import vllm
from control_plane.endpoints.engines.base import EngineArgsError, EngineRequest, ModelInfo
from workflows.contracts.clusters import ClusterKind
from workflows.contracts.endpoints import (
    LABEL_ENDPOINT,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    MODEL_DIR_PLACEHOLDER,
    PORT_PLACEHOLDER,
    ArtifactFile,
    EngineKind,
    LaunchSpec,
    ModelFiles,
    ReplicaSetSpec,
    replica_set_name,
)

MODEL_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
ENDPOINT_ID = uuid.UUID("12345678-1234-4234-8234-123456789abc")
REVISION = "0123456789abcdef0123456789abcdef01234567"


def hf_model(**overrides: Any) -> ModelInfo:
    fields: dict[str, Any] = {
        "model_id": MODEL_ID,
        "name": "qwen",
        "source_kind": "huggingface",
        "source_ref": "Qwen/Qwen2.5-0.5B-Instruct",
        "pinned_revision": REVISION,
        "context_length": 32768,
        "weights_bytes": 988 * 1024 * 1024,
        **overrides,
    }
    return ModelInfo(**fields)


def request_for(
    cluster: ClusterKind = ClusterKind.KUBERNETES,
    model: ModelInfo | None = None,
    context_length: int | None = None,
) -> EngineRequest:
    return EngineRequest(
        engine=EngineKind.VLLM,
        served_model_name="chat",
        cluster_kind=cluster,
        model=model or hf_model(),
        context_length=context_length,
    )


def rendered(request: EngineRequest | None = None, **args: Any) -> LaunchSpec:
    return vllm.render(request or request_for(), vllm.VllmArgs.model_validate(args))


def flag(command: list[str], name: str) -> str | None:
    """The value after `name` in an argument vector, None when the flag is absent."""
    if name not in command:
        return None
    return command[command.index(name) + 1]


def spec_of(launch: LaunchSpec, replicas: int = 2) -> ReplicaSetSpec:
    return ReplicaSetSpec(
        endpoint_id=ENDPOINT_ID,
        name=replica_set_name(ENDPOINT_ID),
        launch=launch,
        replicas=replicas,
        labels={"team": "nlp"},
    )


class TestCommand:
    def test_serves_the_pinned_repository_on_kubernetes(self) -> None:
        command = rendered().command
        assert command[:3] == ["vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct"]
        assert flag(command, "--revision") == REVISION
        assert flag(command, "--tokenizer-revision") == REVISION
        assert flag(command, "--served-model-name") == "chat"
        assert flag(command, "--host") == "0.0.0.0"
        assert flag(command, "--port") == PORT_PLACEHOLDER

    def test_defaults(self) -> None:
        launch = rendered()
        assert flag(launch.command, "--tensor-parallel-size") == "1"
        assert flag(launch.command, "--gpu-memory-utilization") == "0.9"
        for absent in ("--dtype", "--enable-auto-tool-choice", "--tool-call-parser"):
            assert absent not in launch.command
        assert launch.engine is EngineKind.VLLM
        assert launch.image == vllm.DEFAULT_IMAGE
        assert launch.health_path == "/health"
        assert launch.metrics_path == "/metrics"
        assert launch.startup_timeout_s == 900
        assert launch.probe_path == "/v1/completions"
        assert launch.probe_body == {"model": "chat", "prompt": "ping", "max_tokens": 1}

    def test_optional_flags(self) -> None:
        command = rendered(
            dtype="bfloat16",
            max_num_seqs=64,
            tool_call_parser="hermes",
            enable_auto_tool_choice=True,
            reasoning_parser="deepseek_r1",
            gpu_memory_utilization=0.85,
        ).command
        assert flag(command, "--dtype") == "bfloat16"
        assert flag(command, "--max-num-seqs") == "64"
        assert "--enable-auto-tool-choice" in command
        assert flag(command, "--tool-call-parser") == "hermes"
        assert flag(command, "--reasoning-parser") == "deepseek_r1"
        assert flag(command, "--gpu-memory-utilization") == "0.85"

    def test_extra_args_come_last(self) -> None:
        command = rendered(extra_args=["--enforce-eager", "--seed", "7"]).command
        assert command[-3:] == ["--enforce-eager", "--seed", "7"]

    def test_local_replicas_serve_the_materialised_files_on_loopback(self) -> None:
        files = ModelFiles(
            model_id=MODEL_ID,
            files=[ArtifactFile(path="model.safetensors", object_key="k", sha256="0" * 64, size=1)],
        )
        launch = rendered(request_for(ClusterKind.LOCAL, hf_model(files=files)))
        assert launch.command[2] == MODEL_DIR_PLACEHOLDER
        assert "--revision" not in launch.command
        assert flag(launch.command, "--host") == "127.0.0.1"
        assert launch.image is None
        assert launch.model_files == files

    @pytest.mark.parametrize("source_kind", ["local", "s3", "url"])
    def test_other_sources_are_refused_on_kubernetes(self, source_kind: str) -> None:
        model = hf_model(source_kind=source_kind, source_ref="s3://bucket/model")
        with pytest.raises(EngineArgsError, match="only Hugging Face models"):
            rendered(request_for(model=model))

    @pytest.mark.parametrize("source_kind", ["local", "s3"])
    def test_other_sources_are_served_from_files_locally(self, source_kind: str) -> None:
        model = hf_model(source_kind=source_kind, source_ref="s3://bucket/model")
        assert rendered(request_for(ClusterKind.LOCAL, model)).command[2] == MODEL_DIR_PLACEHOLDER

    def test_an_unpinned_model_is_refused_on_kubernetes(self) -> None:
        with pytest.raises(EngineArgsError, match="not pinned"):
            rendered(request_for(model=hf_model(pinned_revision=None)))

    def test_without_a_model(self) -> None:
        request = request_for().model_copy(update={"model": None})
        with pytest.raises(EngineArgsError, match="needs a model"):
            rendered(request)


class TestResources:
    @pytest.mark.parametrize("size", [1, 2, 8])
    def test_tensor_parallel_size_is_the_gpu_count(self, size: int) -> None:
        launch = rendered(tensor_parallel_size=size)
        assert launch.resources.gpus == size
        assert flag(launch.command, "--tensor-parallel-size") == str(size)

    def test_memory_follows_the_weights(self) -> None:
        small = rendered().resources.memory_mb
        large = rendered(request_for(model=hf_model(weights_bytes=140 * 1024**3)))
        assert small == vllm.MIN_MEMORY_MB
        assert large.resources.memory_mb == 140 * 1024 * 5 // 4 + vllm.OVERHEAD_MEMORY_MB

    def test_memory_when_the_weights_are_unknown(self) -> None:
        launch = rendered(request_for(model=hf_model(weights_bytes=None)))
        assert launch.resources.memory_mb == vllm.DEFAULT_MEMORY_MB

    def test_explicit_cpu_and_memory(self) -> None:
        resources = rendered(cpu=8, memory_mb=65536).resources
        assert (resources.cpu, resources.memory_mb) == (8, 65536)


class TestMaxModelLen:
    def test_the_smaller_of_requested_and_model_context(self) -> None:
        launch = rendered(request_for(context_length=8192))
        assert flag(launch.command, "--max-model-len") == "8192"

    def test_a_request_beyond_the_model_is_capped(self) -> None:
        launch = rendered(request_for(context_length=1_000_000))
        assert flag(launch.command, "--max-model-len") == "32768"

    def test_the_model_context_alone(self) -> None:
        assert flag(rendered().command, "--max-model-len") == "32768"

    def test_the_requested_context_alone(self) -> None:
        model = hf_model(context_length=None)
        launch = rendered(request_for(model=model, context_length=4096))
        assert flag(launch.command, "--max-model-len") == "4096"

    def test_left_to_vllm_when_nothing_is_known(self) -> None:
        launch = rendered(request_for(model=hf_model(context_length=None)))
        assert "--max-model-len" not in launch.command

    def test_explicit_value_wins(self) -> None:
        launch = rendered(request_for(context_length=8192), max_model_len=2048)
        assert flag(launch.command, "--max-model-len") == "2048"

    def test_explicit_value_beyond_the_model_is_refused(self) -> None:
        with pytest.raises(EngineArgsError, match="exceeds the context length"):
            rendered(max_model_len=65536)


class TestArgsRefused:
    @pytest.mark.parametrize(
        "args",
        [
            {"tensor_parallel_size": 0},
            {"tensor_parallel_size": 65},
            {"gpu_memory_utilization": 0},
            {"gpu_memory_utilization": 1.5},
            {"dtype": "int4"},
            {"tool_call_parser": "hermes; rm -rf /"},
            {"reasoning_parser": "../x"},
            {"enable_auto_tool_choice": True},
            {"max_num_seqs": 0},
            {"tensor_parallel_size": True},
            {"unknown": 1},
        ],
    )
    def test_invalid_values(self, args: dict[str, Any]) -> None:
        with pytest.raises(ValidationError):
            vllm.VllmArgs.model_validate(args)

    @pytest.mark.parametrize(
        "arg",
        [
            "--port",
            "--port=9000",
            "--host",
            "--served-model-name",
            "--served_model_name=x",
            "--serv",
            "--model",
            "--api-key",
            "-tp",
            "--tensor-parallel-size=2",
            "--config",
        ],
    )
    def test_extra_args_we_set_ourselves(self, arg: str) -> None:
        with pytest.raises(ValidationError, match="cannot be passed in extra_args"):
            vllm.VllmArgs.model_validate({"extra_args": [arg, "1"]})

    def test_extra_args_with_control_characters(self) -> None:
        with pytest.raises(ValidationError, match="control characters"):
            vllm.VllmArgs.model_validate({"extra_args": ["--seed\n7"]})

    def test_ordinary_extra_args_pass(self) -> None:
        args = vllm.VllmArgs.model_validate(
            {"extra_args": ["--enforce-eager", "--model-impl", "vllm", "--seed=1"]}
        )
        assert args.extra_args == ["--enforce-eager", "--model-impl", "vllm", "--seed=1"]


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


class TestManifests:
    def test_names_and_labels(self) -> None:
        spec = spec_of(rendered())
        deployment, service = replica_set_manifests(spec, "cp-abc")
        expected = {
            "team": "nlp",
            LABEL_ENDPOINT: str(ENDPOINT_ID),
            LABEL_MANAGED_BY: MANAGED_BY,
            "app.kubernetes.io/name": spec.name,
        }
        for manifest in (deployment, service):
            assert manifest["metadata"] == {
                "name": "cp-ep-123456781234",
                "namespace": "cp-abc",
                "labels": expected,
            }
        assert deployment["spec"]["template"]["metadata"]["labels"] == expected
        assert deployment["spec"]["selector"] == {"matchLabels": {LABEL_ENDPOINT: str(ENDPOINT_ID)}}
        assert service["spec"]["selector"] == {LABEL_ENDPOINT: str(ENDPOINT_ID)}

    def test_spec_labels_cannot_override_ours(self) -> None:
        spec = spec_of(rendered()).model_copy(update={"labels": {LABEL_ENDPOINT: "other"}})
        deployment, _ = replica_set_manifests(spec, "cp-abc")
        assert deployment["metadata"]["labels"][LABEL_ENDPOINT] == str(ENDPOINT_ID)

    def test_deterministic(self) -> None:
        spec = spec_of(rendered(tensor_parallel_size=2))
        assert replica_set_manifests(spec, "cp-abc") == replica_set_manifests(spec, "cp-abc")

    def test_container(self) -> None:
        launch = rendered(tensor_parallel_size=2)
        deployment, _ = replica_set_manifests(spec_of(launch, replicas=3), "cp-abc")
        assert deployment["spec"]["replicas"] == 3
        assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
        container = container_of(deployment)
        assert container["name"] == "engine"
        assert container["image"] == vllm.DEFAULT_IMAGE
        assert flag(container["command"], "--port") == "8000"
        assert PORT_PLACEHOLDER not in " ".join(container["command"])
        assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
        assert {"name": "VLLM_NO_USAGE_STATS", "value": "1"} in container["env"]

    def test_gpu_limits_and_shared_memory(self) -> None:
        deployment, _ = replica_set_manifests(spec_of(rendered(tensor_parallel_size=4)), "ns")
        container = container_of(deployment)
        memory = f"{vllm.MIN_MEMORY_MB}Mi"
        assert container["resources"] == {
            "requests": {"cpu": "4000m", "memory": memory},
            "limits": {"cpu": "4000m", "memory": memory, "nvidia.com/gpu": "4"},
        }
        pod = deployment["spec"]["template"]["spec"]
        assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
        assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]

    def test_no_gpu_no_shared_memory_volume(self) -> None:
        launch = rendered().model_copy(
            update={"resources": rendered().resources.model_copy(update={"gpus": 0})}
        )
        deployment, _ = replica_set_manifests(spec_of(launch), "ns")
        container = container_of(deployment)
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert deployment["spec"]["template"]["spec"]["volumes"] == []
        assert container["volumeMounts"] == []

    def test_another_gpu_resource(self) -> None:
        launch = rendered()
        launch = launch.model_copy(
            update={
                "resources": launch.resources.model_copy(update={"gpu_resource": "amd.com/gpu"})
            }
        )
        container = container_of(replica_set_manifests(spec_of(launch), "ns")[0])
        assert container["resources"]["limits"]["amd.com/gpu"] == "1"

    def test_probes(self) -> None:
        container = container_of(replica_set_manifests(spec_of(rendered()), "ns")[0])
        health = {"path": "/health", "port": 8000, "scheme": "HTTP"}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == health
        startup = container["startupProbe"]
        # The startup probe allows the whole startup timeout before the pod is restarted.
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 900

    def test_service(self) -> None:
        _, service = replica_set_manifests(spec_of(rendered()), "ns")
        assert service["spec"]["type"] == "ClusterIP"
        assert service["spec"]["ports"] == [
            {"name": "http", "port": 80, "targetPort": 8000, "protocol": "TCP"}
        ]

    def test_python_placeholder(self) -> None:
        launch = rendered().model_copy(
            update={"command": ["{python}", "-m", "server", "--port={port}"]}
        )
        container = container_of(replica_set_manifests(spec_of(launch), "ns")[0])
        assert container["command"] == ["python", "-m", "server", "--port=8000"]

    def test_a_spec_without_image_is_refused(self) -> None:
        launch = rendered(request_for(ClusterKind.LOCAL))
        with pytest.raises(InvalidReplicaSpec, match="no container image"):
            replica_set_manifests(spec_of(launch), "ns")

    def test_a_command_needing_local_files_is_refused(self) -> None:
        launch = rendered(request_for(ClusterKind.LOCAL)).model_copy(update={"image": "img"})
        with pytest.raises(InvalidReplicaSpec, match=r"\{model_dir\}"):
            replica_set_manifests(spec_of(launch), "ns")


class TestTokenAndCache:
    def test_token_from_a_secret_and_a_shared_download_cache(self) -> None:
        launch = rendered(hf_token_secret="hf-token", model_cache_claim="hf-cache")
        assert launch.secret_env["HF_TOKEN"].secret == "hf-token"
        deployment, _ = replica_set_manifests(spec_of(launch), "ns")
        container = container_of(deployment)
        assert {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}},
        } in container["env"]
        assert {"name": "HF_HOME", "value": vllm.CACHE_MOUNT_PATH} in container["env"]
        pod = deployment["spec"]["template"]["spec"]
        assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}} in pod[
            "volumes"
        ]
        assert {"name": "model-cache", "mountPath": vllm.CACHE_MOUNT_PATH} in container[
            "volumeMounts"
        ]
        # The token's value is nowhere in what the control plane sends.
        assert "secretKeyRef" in str(container["env"])

    def test_another_key_of_the_secret(self) -> None:
        launch = rendered(hf_token_secret="tokens", hf_token_secret_key="hub.token")
        assert launch.secret_env["HF_TOKEN"].key == "hub.token"
        assert launch.cache_volume is None
        assert "HF_HOME" not in launch.env

    @pytest.mark.parametrize(
        "args", [{"hf_token_secret": "hf-token"}, {"model_cache_claim": "hf-cache"}]
    )
    def test_refused_on_a_local_cluster(self, args: dict[str, Any]) -> None:
        with pytest.raises(EngineArgsError, match="Kubernetes objects"):
            rendered(request_for(cluster=ClusterKind.LOCAL), **args)

    @pytest.mark.parametrize(
        "args",
        [
            {"hf_token_secret": "Not_A_Name"},
            {"model_cache_claim": "-bad"},
            {"hf_token_secret": "ok", "hf_token_secret_key": "a/b"},
        ],
    )
    def test_invalid_names(self, args: dict[str, Any]) -> None:
        with pytest.raises(ValidationError):
            vllm.VllmArgs.model_validate(args)

    def test_an_env_name_set_twice_is_refused(self) -> None:
        launch = rendered(hf_token_secret="hf-token")
        with pytest.raises(ValidationError, match="HF_TOKEN set both"):
            LaunchSpec.model_validate(
                {**launch.model_dump(), "env": {**launch.env, "HF_TOKEN": "x"}}
            )
