"""The `transformers` engine's launch specs: a pure function of the request and the args,
checked without torch or a model."""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest

from control_plane.clusters.providers.kubernetes import replica_set_manifests
from control_plane.endpoints.engines import base, transformers_engine
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

MODEL_ID = uuid.UUID("00000000-0000-4000-8000-000000000003")
ENDPOINT_ID = uuid.UUID("12345678-1234-4234-8234-123456789abe")
MIB = 1024 * 1024
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS = 94 * MIB
# 30 layers x 3 KV heads x 64 dims x K and V x 2 bytes.
KV_PER_TOKEN = 30 * 3 * 64 * 2 * 2


def artifact(path: str, size: int = 1000) -> ArtifactFile:
    return ArtifactFile(path=path, object_key=f"k/{path}", sha256="0" * 64, size=size)


def files(*paths: str) -> ModelFiles:
    return ModelFiles(model_id=MODEL_ID, files=[artifact(p) for p in paths])


def smollm(**overrides: Any) -> ModelInfo:
    fields: dict[str, Any] = {
        "model_id": MODEL_ID,
        "name": "smollm2",
        "source_kind": "huggingface",
        "source_ref": "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
        "architecture": "llama",
        "modality": "text",
        "context_length": 8192,
        "weights_bytes": WEIGHTS,
        "kv_cache_bytes_per_token": KV_PER_TOKEN,
        "files": files(GGUF),
        **overrides,
    }
    return ModelInfo(**fields)


def request_for(
    cluster: ClusterKind = ClusterKind.LOCAL,
    model: ModelInfo | None = None,
    context_length: int | None = None,
) -> EngineRequest:
    return EngineRequest(
        engine=EngineKind.TRANSFORMERS,
        served_model_name="chat",
        cluster_kind=cluster,
        model=model or smollm(),
        context_length=context_length,
    )


def rendered(request: EngineRequest | None = None, **args: Any) -> LaunchSpec:
    return transformers_engine.render(
        request or request_for(), transformers_engine.TransformersArgs.model_validate(args)
    )


def flag(command: list[str], name: str) -> str | None:
    if name not in command:
        return None
    return command[command.index(name) + 1]


class TestEngine:
    def test_is_the_transformers_engine_and_needs_a_model(self) -> None:
        engine = base.engine_for(EngineKind.TRANSFORMERS)
        assert engine is transformers_engine.ENGINE
        assert EngineKind.TRANSFORMERS.value == "transformers"
        assert engine.needs_model
        assert engine.args is transformers_engine.TransformersArgs


class TestLocalLaunch:
    def test_runs_the_server_module_with_the_workers_python(self) -> None:
        command = rendered().command
        assert command[:3] == [PYTHON_PLACEHOLDER, "-m", transformers_engine.MODULE]
        assert transformers_engine.MODULE == "control_plane.endpoints.engines.transformers_server"

    def test_placeholders_for_port_and_model_dir(self) -> None:
        command = rendered().command
        assert flag(command, "--port") == PORT_PLACEHOLDER
        assert flag(command, "--model-dir") == MODEL_DIR_PLACEHOLDER
        assert flag(command, "--host") == "127.0.0.1"

    def test_serves_the_endpoint_name(self) -> None:
        spec = rendered()
        assert spec.engine is EngineKind.TRANSFORMERS
        assert spec.served_model_name == "chat"
        assert flag(spec.command, "--served-model-name") == "chat"

    def test_default_args(self) -> None:
        command = rendered().command
        assert flag(command, "--dtype") == "float32"
        assert flag(command, "--threads") == "2"
        assert flag(command, "--max-concurrency") == "1"
        assert flag(command, "--max-queue") == "16"
        assert flag(command, "--default-max-tokens") == "256"
        assert flag(command, "--max-tokens-limit") == "4096"
        assert flag(command, "--max-model-len") == "8192"
        assert "--gguf-file" not in command
        assert "--json-logs" not in command

    def test_args_reach_the_command(self) -> None:
        command = rendered(
            dtype="bfloat16",
            threads=3,
            max_concurrency=2,
            max_queue=0,
            default_max_tokens=32,
            max_tokens_limit=64,
            max_model_len=1024,
            gguf_file=GGUF,
        ).command
        assert flag(command, "--dtype") == "bfloat16"
        assert flag(command, "--threads") == "3"
        assert flag(command, "--max-concurrency") == "2"
        assert flag(command, "--max-queue") == "0"
        assert flag(command, "--default-max-tokens") == "32"
        assert flag(command, "--max-tokens-limit") == "64"
        assert flag(command, "--max-model-len") == "1024"
        assert flag(command, "--gguf-file") == GGUF

    def test_threads_follow_whole_cpus_by_default(self) -> None:
        assert flag(rendered(cpu=4).command, "--threads") == "4"
        assert flag(rendered(cpu=2.5).command, "--threads") == "2"
        assert flag(rendered(cpu=0.5).command, "--threads") == "1"

    def test_carries_the_model_files_and_no_image(self) -> None:
        spec = rendered()
        assert spec.model_files == files(GGUF)
        assert spec.image is None

    def test_probe_generates_one_token(self) -> None:
        spec = rendered()
        assert spec.probe_path == "/v1/completions"
        assert spec.probe_body == {"model": "chat", "prompt": "ping", "max_tokens": 1}
        assert spec.health_path == "/health"
        assert spec.metrics_path == "/metrics"

    def test_waits_long_for_a_slow_cpu_load(self) -> None:
        assert rendered().startup_timeout_s == 300
        assert rendered(startup_timeout_s=900).startup_timeout_s == 900

    def test_never_reaches_a_hub(self) -> None:
        env = rendered().env
        assert env["HF_HUB_OFFLINE"] == "1"
        assert env["TRANSFORMERS_OFFLINE"] == "1"


class TestContext:
    def test_the_endpoints_context_when_shorter(self) -> None:
        spec = rendered(request_for(context_length=2048))
        assert flag(spec.command, "--max-model-len") == "2048"

    def test_the_models_context_when_the_endpoint_asks_more(self) -> None:
        spec = rendered(request_for(context_length=100_000))
        assert flag(spec.command, "--max-model-len") == "8192"

    def test_none_when_unknown(self) -> None:
        spec = rendered(request_for(model=smollm(context_length=None)))
        assert "--max-model-len" not in spec.command

    def test_max_model_len_beyond_the_model_is_refused(self) -> None:
        with pytest.raises(EngineArgsError, match="exceeds the context length"):
            rendered(max_model_len=10_000)


class TestResources:
    def test_cpu_and_memory_from_args(self) -> None:
        resources = rendered(cpu=3, memory_mb=3000).resources
        assert resources.cpu == 3
        assert resources.memory_mb == 3000
        assert resources.gpus == 0

    def test_a_gguf_is_sized_dequantized_with_its_load_peak_and_kv_cache(self) -> None:
        # 94 MiB of ~4.5-bit blocks as float32, twice while loading, plus a float32 KV
        # cache for 8192 tokens (360 MiB).
        weights = 94 * 32 / 4.5 * 2
        kv_cache = KV_PER_TOKEN * 2 * 8192 / MIB
        expected = transformers_engine.RUNTIME_MB + math.ceil(weights + kv_cache)
        assert rendered().resources.memory_mb == expected

    def test_the_kv_cache_grows_with_concurrency_and_shrinks_with_context(self) -> None:
        one = rendered().resources.memory_mb
        assert rendered(max_concurrency=2).resources.memory_mb == one + 360
        assert rendered(max_model_len=4096).resources.memory_mb == one - 180

    def test_a_checkpoint_doubles_to_float32(self) -> None:
        model = smollm(
            architecture="LlamaForCausalLM",
            kv_cache_bytes_per_token=None,
            files=files("config.json", "model.safetensors"),
        )
        spec = rendered(request_for(model=model))
        assert spec.resources.memory_mb == transformers_engine.RUNTIME_MB + 2 * 94

    def test_bfloat16_halves_it(self) -> None:
        model = smollm(kv_cache_bytes_per_token=None, files=files("config.json", "a.safetensors"))
        spec = rendered(request_for(model=model), dtype="bfloat16")
        assert spec.resources.memory_mb == transformers_engine.RUNTIME_MB + 94

    def test_memory_without_known_weights(self) -> None:
        spec = rendered(request_for(model=smollm(weights_bytes=None)))
        assert spec.resources.memory_mb == transformers_engine.FALLBACK_MEMORY_MB


class TestGgufFile:
    def test_a_named_file_must_be_in_the_model(self) -> None:
        with pytest.raises(EngineArgsError, match=r"no file 'other\.gguf'"):
            rendered(gguf_file="other.gguf")

    def test_several_gguf_files_without_a_checkpoint_need_a_name(self) -> None:
        model = smollm(files=files("a.Q4_0.gguf", "a.Q8_0.gguf"))
        with pytest.raises(EngineArgsError, match="gguf_file"):
            rendered(request_for(model=model))
        spec = rendered(request_for(model=model), gguf_file="a.Q8_0.gguf")
        assert flag(spec.command, "--gguf-file") == "a.Q8_0.gguf"

    def test_several_gguf_files_beside_a_checkpoint_load_the_checkpoint(self) -> None:
        model = smollm(files=files("config.json", "model.safetensors", "a.gguf", "b.gguf"))
        spec = rendered(request_for(model=model, context_length=16), max_concurrency=1)
        # Sized as a checkpoint: twice the weights, no load peak.
        kv_cache = math.ceil(KV_PER_TOKEN * 2 * 16 / MIB)
        assert spec.resources.memory_mb == transformers_engine.RUNTIME_MB + 2 * 94 + kv_cache

    @pytest.mark.parametrize(
        "path",
        ["/etc/x.gguf", "../x.gguf", "a/../x.gguf", "model.bin", "a//x.gguf", "a\\x.gguf"],
    )
    def test_refuses_paths_outside_the_directory_or_not_gguf(self, path: str) -> None:
        with pytest.raises(EngineArgsError, match="gguf_file"):
            base.parse_args(EngineKind.TRANSFORMERS, {"gguf_file": path})

    def test_a_file_in_a_subdirectory(self) -> None:
        model = smollm(files=files("q4/a.gguf", "q8/a.gguf"))
        spec = rendered(request_for(model=model), gguf_file="q4/a.gguf")
        assert flag(spec.command, "--gguf-file") == "q4/a.gguf"


class TestKubernetesLaunch:
    def test_plain_python_the_image_and_all_interfaces(self) -> None:
        spec = rendered(request_for(ClusterKind.KUBERNETES), model_dir="/models/smollm2")
        assert spec.command[:3] == ["python", "-m", transformers_engine.MODULE]
        assert flag(spec.command, "--host") == "0.0.0.0"
        assert flag(spec.command, "--model-dir") == "/models/smollm2"
        assert "--json-logs" in spec.command
        assert spec.image == transformers_engine.DEFAULT_IMAGE
        assert spec.model_files is None
        custom = rendered(request_for(ClusterKind.KUBERNETES), model_dir="/m", image="r/t:1")
        assert custom.image == "r/t:1"

    def test_the_manifests_take_the_spec(self) -> None:
        spec = rendered(request_for(ClusterKind.KUBERNETES), model_dir="/models/smollm2")
        replica_set = ReplicaSetSpec(
            endpoint_id=ENDPOINT_ID, name=replica_set_name(ENDPOINT_ID), launch=spec, replicas=1
        )
        deployment, _ = replica_set_manifests(replica_set, "serving")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert flag(container["command"] + container.get("args", []), "--port") == "8000"

    def test_needs_the_model_dir_inside_the_container(self) -> None:
        with pytest.raises(EngineArgsError, match="model_dir"):
            rendered(request_for(ClusterKind.KUBERNETES))


class TestWhatItServes:
    @pytest.mark.parametrize(
        "architecture", [None, "llama", "qwen2", "LlamaForCausalLM", "GPT2LMHeadModel"]
    )
    def test_accepts_language_models(self, architecture: str | None) -> None:
        rendered(request_for(model=smollm(architecture=architecture)))

    @pytest.mark.parametrize("modality", [None, "text"])
    def test_accepts_text_models(self, modality: str | None) -> None:
        rendered(request_for(model=smollm(modality=modality)))

    @pytest.mark.parametrize("modality", ["audio", "image-text", "image"])
    def test_refuses_other_modalities(self, modality: str) -> None:
        with pytest.raises(EngineArgsError, match=modality):
            rendered(request_for(model=smollm(modality=modality)))

    @pytest.mark.parametrize(
        "architecture",
        [
            "BertModel",
            "RobertaForSequenceClassification",
            "BertForMaskedLM",
            "T5ForConditionalGeneration",
            "nomic-bert",
        ],
    )
    def test_refuses_models_that_do_not_generate(self, architecture: str) -> None:
        with pytest.raises(EngineArgsError, match="does not generate text"):
            rendered(request_for(model=smollm(architecture=architecture)))


class TestArgsThroughTheRegistry:
    def test_parses_known_args(self) -> None:
        args = base.parse_args(EngineKind.TRANSFORMERS, {"max_concurrency": 2, "cpu": 1})
        assert isinstance(args, transformers_engine.TransformersArgs)
        assert args.max_concurrency == 2

    def test_refuses_an_unknown_arg(self) -> None:
        with pytest.raises(EngineArgsError, match="max_batch_size"):
            base.parse_args(EngineKind.TRANSFORMERS, {"max_batch_size": 8})

    @pytest.mark.parametrize(
        "raw",
        [
            {"max_concurrency": 0},
            {"max_queue": -1},
            {"default_max_tokens": 0},
            {"default_max_tokens": 512, "max_tokens_limit": 256},
            {"threads": 0},
            {"cpu": 0},
            {"memory_mb": 1},
            {"dtype": "float16"},
            {"startup_timeout_s": 1},
            {"image": ""},
        ],
    )
    def test_refuses_out_of_bounds(self, raw: dict[str, Any]) -> None:
        with pytest.raises(EngineArgsError, match="invalid engine_args for transformers"):
            base.parse_args(EngineKind.TRANSFORMERS, raw)

    def test_render_needs_a_model(self) -> None:
        request = request_for().model_copy(update={"model": None})
        with pytest.raises(EngineArgsError, match="needs a model"):
            base.render(request, {})

    def test_render_through_the_registry(self) -> None:
        spec = base.render(request_for(), {"threads": 1})
        assert flag(spec.command, "--threads") == "1"
