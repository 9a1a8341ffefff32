"""The `embeddings` engine's launch specs: a pure function of the request and the args,
checked without torch or a model."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from control_plane.clusters.providers.kubernetes import replica_set_manifests
from control_plane.endpoints.engines import base, embeddings
from control_plane.endpoints.engines.base import EngineArgsError, EngineRequest, ModelInfo
from workflows.contracts.clusters import ClusterKind
from workflows.contracts.endpoints import (
    MODEL_DIR_PLACEHOLDER,
    PORT_PLACEHOLDER,
    PYTHON_PLACEHOLDER,
    ArtifactFile,
    EngineKind,
    LaunchSpec,
    ModelFiles,
    ReplicaSetSpec,
    replica_set_name,
)

MODEL_ID = uuid.UUID("00000000-0000-4000-8000-000000000002")
ENDPOINT_ID = uuid.UUID("12345678-1234-4234-8234-123456789abd")
FILES = ModelFiles(
    model_id=MODEL_ID,
    files=[
        ArtifactFile(path="config.json", object_key="k/config.json", sha256="0" * 64, size=612),
        ArtifactFile(
            path="model.safetensors", object_key="k/model", sha256="1" * 64, size=90_868_376
        ),
    ],
)


def minilm(**overrides: Any) -> ModelInfo:
    fields: dict[str, Any] = {
        "model_id": MODEL_ID,
        "name": "minilm",
        "source_kind": "huggingface",
        "source_ref": "sentence-transformers/all-MiniLM-L6-v2",
        "architecture": "BertModel",
        "modality": "text",
        "weights_bytes": 90_868_376,
        "files": FILES,
        **overrides,
    }
    return ModelInfo(**fields)


def request_for(
    cluster: ClusterKind = ClusterKind.LOCAL, model: ModelInfo | None = None
) -> EngineRequest:
    return EngineRequest(
        engine=EngineKind.EMBEDDINGS,
        served_model_name="embed",
        cluster_kind=cluster,
        model=model or minilm(),
    )


def rendered(request: EngineRequest | None = None, **args: Any) -> LaunchSpec:
    return embeddings.render(
        request or request_for(), embeddings.EmbeddingsArgs.model_validate(args)
    )


def flag(command: list[str], name: str) -> str | None:
    if name not in command:
        return None
    return command[command.index(name) + 1]


class TestEngine:
    def test_is_the_embeddings_engine_and_needs_a_model(self) -> None:
        assert embeddings.ENGINE.kind is EngineKind.EMBEDDINGS
        assert embeddings.ENGINE.needs_model
        assert embeddings.ENGINE.args is embeddings.EmbeddingsArgs


class TestLocalLaunch:
    def test_runs_the_server_module_with_the_workers_python(self) -> None:
        command = rendered().command
        assert command[:3] == [PYTHON_PLACEHOLDER, "-m", embeddings.MODULE]
        assert embeddings.MODULE == "control_plane.endpoints.engines.embeddings_server"

    def test_placeholders_for_port_and_model_dir(self) -> None:
        command = rendered().command
        assert flag(command, "--port") == PORT_PLACEHOLDER
        assert flag(command, "--model-dir") == MODEL_DIR_PLACEHOLDER
        assert flag(command, "--host") == "127.0.0.1"

    def test_serves_the_endpoint_name(self) -> None:
        spec = rendered()
        assert spec.engine is EngineKind.EMBEDDINGS
        assert spec.served_model_name == "embed"
        assert flag(spec.command, "--served-model-name") == "embed"

    def test_default_args(self) -> None:
        command = rendered().command
        assert flag(command, "--max-batch-size") == "64"
        assert flag(command, "--max-batch-wait-ms") == "5.0"
        assert flag(command, "--max-input-items") == "2048"
        assert flag(command, "--threads") == "2"
        assert "--json-logs" not in command

    def test_args_reach_the_command(self) -> None:
        command = rendered(
            max_batch_size=16, max_batch_wait_ms=0, max_input_items=100, threads=3
        ).command
        assert flag(command, "--max-batch-size") == "16"
        assert flag(command, "--max-batch-wait-ms") == "0.0"
        assert flag(command, "--max-input-items") == "100"
        assert flag(command, "--threads") == "3"

    def test_threads_follow_whole_cpus_by_default(self) -> None:
        assert flag(rendered(cpu=4).command, "--threads") == "4"
        assert flag(rendered(cpu=2.5).command, "--threads") == "2"
        assert flag(rendered(cpu=0.5).command, "--threads") == "1"

    def test_carries_the_model_files_and_no_image(self) -> None:
        spec = rendered()
        assert spec.model_files == FILES
        assert spec.image is None

    def test_probe_embeds_one_word(self) -> None:
        spec = rendered()
        assert spec.probe_path == "/v1/embeddings"
        assert spec.probe_body == {"model": "embed", "input": "ping"}
        assert spec.health_path == "/health"
        assert spec.metrics_path == "/metrics"
        assert 60 <= spec.startup_timeout_s <= 300

    def test_never_reaches_a_hub(self) -> None:
        assert rendered().env["HF_HUB_OFFLINE"] == "1"


class TestResources:
    def test_cpu_and_memory_from_args(self) -> None:
        resources = rendered(cpu=3, memory_mb=3000).resources
        assert resources.cpu == 3
        assert resources.memory_mb == 3000
        assert resources.gpus == 0

    def test_memory_from_the_weights_by_default(self) -> None:
        # The runtime, plus twice MiniLM's 87 MiB of weights.
        assert rendered().resources.memory_mb == embeddings.RUNTIME_MB + 174

    def test_memory_without_known_weights(self) -> None:
        spec = rendered(request_for(model=minilm(weights_bytes=None)))
        assert spec.resources.memory_mb == embeddings.FALLBACK_MEMORY_MB


class TestKubernetesLaunch:
    def test_plain_python_the_image_and_all_interfaces(self) -> None:
        spec = rendered(request_for(ClusterKind.KUBERNETES), model_dir="/models/minilm")
        assert spec.command[:3] == ["python", "-m", embeddings.MODULE]
        assert flag(spec.command, "--host") == "0.0.0.0"
        assert flag(spec.command, "--model-dir") == "/models/minilm"
        assert "--json-logs" in spec.command
        assert spec.image == embeddings.DEFAULT_IMAGE
        assert rendered(
            request_for(ClusterKind.KUBERNETES), model_dir="/m", image="registry/e:1"
        ).image == ("registry/e:1")

    def test_the_manifests_take_the_spec(self) -> None:
        spec = rendered(request_for(ClusterKind.KUBERNETES), model_dir="/models/minilm")
        replica_set = ReplicaSetSpec(
            endpoint_id=ENDPOINT_ID, name=replica_set_name(ENDPOINT_ID), launch=spec, replicas=1
        )
        deployment, _ = replica_set_manifests(replica_set, "serving")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert flag(container["command"] + container.get("args", []), "--port") == "8000"

    def test_needs_the_model_dir_inside_the_container(self) -> None:
        with pytest.raises(EngineArgsError, match="model_dir"):
            rendered(request_for(ClusterKind.KUBERNETES))


class TestModality:
    @pytest.mark.parametrize("modality", [None, "text", "image-text"])
    def test_accepts_text_models(self, modality: str | None) -> None:
        rendered(request_for(model=minilm(modality=modality)))

    def test_refuses_an_audio_model(self) -> None:
        with pytest.raises(EngineArgsError, match="audio"):
            rendered(request_for(model=minilm(modality="audio")))


class TestArgsThroughTheRegistry:
    def test_parses_known_args(self) -> None:
        args = base.parse_args(EngineKind.EMBEDDINGS, {"max_batch_size": 8, "cpu": 1})
        assert isinstance(args, embeddings.EmbeddingsArgs)
        assert args.max_batch_size == 8

    def test_refuses_an_unknown_arg(self) -> None:
        with pytest.raises(EngineArgsError, match="max_batch"):
            base.parse_args(EngineKind.EMBEDDINGS, {"max_batch": 8})

    @pytest.mark.parametrize(
        "raw",
        [
            {"max_batch_size": 0},
            {"max_batch_wait_ms": -1},
            {"max_input_items": 0},
            {"threads": 0},
            {"cpu": 0},
            {"memory_mb": 1},
            {"image": ""},
        ],
    )
    def test_refuses_out_of_bounds(self, raw: dict[str, Any]) -> None:
        with pytest.raises(EngineArgsError, match="invalid engine_args for embeddings"):
            base.parse_args(EngineKind.EMBEDDINGS, raw)

    def test_render_needs_a_model(self) -> None:
        request = request_for().model_copy(update={"model": None})
        with pytest.raises(EngineArgsError, match="needs a model"):
            base.render(request, {})

    def test_render_through_the_registry(self) -> None:
        spec = base.render(request_for(), {"threads": 1})
        assert flag(spec.command, "--threads") == "1"
