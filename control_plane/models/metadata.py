"""What a model is and how much memory it needs, from the files that describe it.

Pure functions, no I/O: the caller reads `config.json`, the safetensors headers, the
GGUF metadata and the file listing, and passes the parsed values in.

Rules worth knowing when reading the numbers:

* Parameter count is the number of logical weights, summed over tensors:
  - float and 8-bit tensors count one parameter per element;
  - packed 4-bit (or 2/3/8-bit) GPTQ/AWQ/compressed-tensors weights (`*.qweight`,
    `*.weight_packed`, stored as I32/U32) count `32 / bits` parameters per element,
    `bits` coming from `quantization_config` (4 when absent);
  - bitsandbytes 4-bit weights and MXFP4 `*_blocks` (U8) count two per element;
  - quantization side data (scales, zero points, `g_idx`, `absmax`...) and buffers
    (integer tensors such as `position_ids`, rotary `inv_freq`) are not parameters.
  Every tensor still counts towards `weights_bytes`, which is what has to be loaded.
* `weights_bytes` is the sum of tensor bytes (bits per element of each dtype, GGML block
  sizes for GGUF tensor types) or, when the tensors are unknown, the sum of the sizes
  of the weight files (one format family only, so a repository shipping both
  safetensors and `.bin` copies is not counted twice).
* `kv_cache_bytes_per_token` = 2 (K and V) x layers x KV heads x head dim x bytes per
  element. The element is 2 bytes (fp16/bf16, what serving runtimes use by default even
  for fp32 checkpoints) or 1 byte when the checkpoint ships an FP8 KV-cache scheme.
  Multi-head latent attention (DeepSeek V2/V3) caches one compressed latent per layer
  instead: layers x (kv_lora_rank + qk_rope_head_dim) x bytes. Encoder-only models
  (BERT family) keep no KV cache: 0. Sliding windows are ignored, so the figure is an
  upper bound.
* `estimate_memory` adds `overhead_fraction` (10 % by default) of weights + KV cache for
  what the runtime needs besides them: activations, CUDA graphs, allocator
  fragmentation.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from control_plane.models.scanner.safetensors_header import DTYPE_BITS
from workflows.contracts.models import MemoryEstimate, ModelMetadataInfo

# One tensor of a safetensors header (or GGUF tensor info): dtype name and shape.
TensorEntry = tuple[str, Sequence[int]]

MIB = 1024 * 1024
# When neither the caller nor the model names a context length, size the KV cache for a
# modest one rather than none: the model would not serve without any.
FALLBACK_CONTEXT_LENGTH = 4096
DEFAULT_KV_BYTES = 2

# GGML block-quantized tensor types (GGUF): (elements per block, bytes per block).
_GGML_BLOCKS: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q8_1": (32, 40),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
    "Q8_K": (256, 292),
    "IQ2_XXS": (256, 66),
    "IQ2_XS": (256, 74),
    "IQ2_S": (256, 82),
    "IQ3_XXS": (256, 98),
    "IQ3_S": (256, 110),
    "IQ1_S": (256, 50),
    "IQ1_M": (256, 56),
    "IQ4_NL": (32, 18),
    "IQ4_XS": (256, 136),
    "TQ1_0": (256, 54),
    "TQ2_0": (256, 66),
    "MXFP4": (32, 17),
}
_FLOAT_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
# `general.file_type` of GGUF files: the quantization mix llama.cpp wrote.
_GGUF_FILE_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
}
_GGUF_UNQUANTIZED = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

# Tensors that hold quantization side data rather than weights.
_QUANT_SIDE_SUFFIXES = (
    ".scales",
    ".qzeros",
    ".g_idx",
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    "weight_scale",
    "weight_scale_inv",
    "weight_scale_2",
    "weight_zero_point",
    "weight_global_scale",
    "weight_shape",
    "input_scale",
    "input_global_scale",
    "k_scale",
    "v_scale",
    "_scales",
    ".SCB",
    "bitsandbytes__nf4",
    "bitsandbytes__fp4",
    ".weight_format",
)
_BUFFER_SUFFIXES = (
    "position_ids",
    "num_batches_tracked",
    "inv_freq",
    ".attn.bias",  # GPT-2's causal mask
    ".attn.masked_bias",
)
_PACKED_SUFFIXES = (".qweight", ".weight_packed")

_CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "model_max_length",
    "n_ctx",
    "max_target_positions",
)
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
_HEAD_KEYS = (
    "num_attention_heads",
    "n_head",
    "num_heads",
    "n_heads",
    "decoder_attention_heads",
)
_KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "n_kv_heads")
# Where multimodal and wrapper configs keep their language model.
_TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config")
_ROPE_EXTENSIONS = {"linear", "yarn", "dynamic"}

# Encoder-only families: no autoregressive KV cache, served as embedders or rerankers.
_ENCODER_MODEL_TYPES = {
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "albert",
    "electra",
    "deberta",
    "deberta-v2",
    "mpnet",
    "camembert",
    "nomic_bert",
    "modernbert",
    "new",
    "jina_bert",
}
_ENCODER_GGUF_ARCHS = {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "modern-bert"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
# Files with weight-like suffixes that are not the model: trainer state, exports.
_NOT_WEIGHTS = re.compile(
    r"(^|/)(training_args\.bin|optimizer\.pt|scheduler\.pt|rng_state[^/]*\.pth)$"
    r"|(^|/)(onnx|openvino|coreml)/"
)


def extract_metadata(
    config: Mapping[str, Any] | None,
    tensors: Mapping[str, TensorEntry] | None,
    *,
    gguf: Mapping[str, Any] | None = None,
    file_sizes: Mapping[str, int] | None = None,
    card: Mapping[str, Any] | None = None,
) -> ModelMetadataInfo:
    """Everything we can tell from the inputs given; fields stay None when unknown.

    `config` is a transformers `config.json`; `tensors` the tensors of all weight files
    (name -> (dtype, shape)); `gguf` the GGUF key/value metadata; `file_sizes` the
    repository listing (path -> bytes; for a GGUF repository holding several
    quantizations, only the files of the chosen one); `card` the model card metadata
    (`pipeline_tag`, `library_name`, `tags`...). Config values win over GGUF ones where
    both exist.
    """
    cfg: Mapping[str, Any] = config or {}
    text = _text_config(cfg)
    g = _gguf_fields(gguf) if gguf else {}

    architectures = cfg.get("architectures")
    architecture = (
        architectures[0]
        if isinstance(architectures, list) and architectures and isinstance(architectures[0], str)
        else None
    )
    model_type = _str(cfg.get("model_type"))
    gguf_arch = g.get("architecture")
    hidden = _first_int(text, cfg, keys=_HIDDEN_KEYS) or g.get("hidden")
    layers = _first_int(text, cfg, keys=_LAYER_KEYS) or g.get("layers")
    heads = _first_int(text, cfg, keys=_HEAD_KEYS) or g.get("heads")
    kv_heads = _kv_heads(text, cfg) or g.get("kv_heads") or heads
    head_dim = _first_int(text, cfg, keys=("head_dim",)) or g.get("head_dim")
    if head_dim is None and hidden and heads:
        head_dim = hidden // heads
    context = _context_length(text, cfg) or g.get("context")

    quant_bits = _quant_bits(cfg.get("quantization_config"))
    quantization = _quantization_name(cfg.get("quantization_config")) or g.get("quantization")
    dtype = _config_dtype(cfg, text) or g.get("dtype")

    parameter_count: int | None = None
    weights_bytes: int | None = None
    if tensors:
        parameter_count = _count_parameters(tensors, quant_bits, quantization)
        weights_bytes = _tensor_bytes(tensors)
        if dtype is None and not gguf:
            dtype = _dominant_float_dtype(tensors)
    if parameter_count is None:
        parameter_count = g.get("parameter_count")
    if weights_bytes is None and file_sizes:
        weights_bytes = _weight_file_bytes(file_sizes)

    family = model_type or gguf_arch
    encoder_only = (model_type in _ENCODER_MODEL_TYPES) or (
        model_type is None and gguf_arch in _ENCODER_GGUF_ARCHS
    )
    kv_bytes = _kv_element_bytes(cfg.get("quantization_config"))
    kv_per_token: int | None
    if encoder_only:
        kv_per_token = 0
    elif (mla := _mla_latent(text, cfg)) is not None and layers:
        kv_per_token = layers * mla * kv_bytes
    elif layers and kv_heads and head_dim:
        kv_per_token = 2 * layers * kv_heads * head_dim * kv_bytes
    else:
        kv_per_token = None

    endpoints, modality = _serving(
        architecture=architecture,
        model_type=family,
        config=cfg,
        card=card or {},
        gguf_arch=gguf_arch,
        gguf_pooling=bool(g.get("pooling")),
        encoder_only=encoder_only,
    )

    meta = ModelMetadataInfo(
        architecture=architecture or gguf_arch,
        model_type=family,
        parameter_count=parameter_count,
        dtype=dtype,
        context_length=context,
        quantization=quantization,
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        weights_bytes=weights_bytes,
        kv_cache_bytes_per_token=kv_per_token,
        endpoints=endpoints,
        modality=modality,
    )
    meta.memory = estimate_memory(meta)
    return meta


def estimate_memory(
    meta: ModelMetadataInfo,
    *,
    context_length: int | None = None,
    batch_size: int = 1,
    overhead_fraction: float = 0.1,
) -> MemoryEstimate | None:
    """Memory one replica needs: weights + KV cache for `batch_size` sequences of
    `context_length` tokens (default the model's own, else 4096) + overhead.

    None when the weights' size is unknown: a guess would mislead placement.
    """
    if meta.weights_bytes is None:
        return None
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if context_length is not None and context_length < 0:
        raise ValueError(f"context_length must not be negative, got {context_length}")
    if overhead_fraction < 0:
        raise ValueError(f"overhead_fraction must not be negative, got {overhead_fraction}")
    context = context_length
    if context is None:
        context = meta.context_length or FALLBACK_CONTEXT_LENGTH
    per_token = meta.kv_cache_bytes_per_token or 0
    kv_total = per_token * context * batch_size
    # Via the decimal string so that 0.1 means one tenth, not its binary approximation
    # (which would round every exact tenth up by a byte).
    overhead = math.ceil((meta.weights_bytes + kv_total) * Fraction(str(overhead_fraction)))
    return MemoryEstimate(
        weights_bytes=meta.weights_bytes,
        kv_cache_bytes_per_token=per_token,
        context_length=context,
        batch_size=batch_size,
        total_bytes=meta.weights_bytes + kv_total + overhead,
    )


def memory_mb_for(
    meta: ModelMetadataInfo, context_length: int | None = None, batch_size: int = 1
) -> int:
    """Per-replica memory in MiB (rounded up) for placement; raises when unknown."""
    estimate = estimate_memory(meta, context_length=context_length, batch_size=batch_size)
    if estimate is None:
        raise ValueError("the model's weight size is unknown; cannot size its memory")
    return max(1, math.ceil(estimate.total_bytes / MIB))


# --- config.json -----------------------------------------------------------------------


def _text_config(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in _TEXT_CONFIG_KEYS:
        nested = cfg.get(key)
        if isinstance(nested, Mapping):
            return nested
    return {}


def _index(value: Any) -> int | None:
    # bool is an int subclass; `true` is never a size. operator.index also takes the
    # numpy integers a GGUF reader may hand over.
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _int(value: Any) -> int | None:
    """A positive integer, or None."""
    number = _index(value)
    return number if number is not None and number > 0 else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _first_int(*sources: Mapping[str, Any], keys: Iterable[str]) -> int | None:
    # The nested language-model config first: it describes the part that generates.
    keys = tuple(keys)
    for source in sources:
        for key in keys:
            if (value := _int(source.get(key))) is not None:
                return value
    return None


def _kv_heads(text: Mapping[str, Any], cfg: Mapping[str, Any]) -> int | None:
    for source in (text, cfg):
        if (value := _first_int(source, keys=_KV_HEAD_KEYS)) is not None:
            return value
        if source.get("multi_query_attention") and (
            value := _int(source.get("multi_query_group_num"))
        ):
            return value
        if source.get("multi_query") is True:
            return 1
    return None


def _context_length(text: Mapping[str, Any], cfg: Mapping[str, Any]) -> int | None:
    for source in (text, cfg):
        base = _first_int(source, keys=_CONTEXT_KEYS)
        if base is None:
            continue
        rope = source.get("rope_scaling") or source.get("rope_parameters")
        if isinstance(rope, Mapping):
            kind = rope.get("rope_type") or rope.get("type")
            factor = rope.get("factor")
            original = _int(rope.get("original_max_position_embeddings")) or _int(
                source.get("original_max_position_embeddings")
            )
            # Without the original length we cannot tell whether max_position_embeddings
            # is already the extended one (it is for llama3/longrope), so leave it.
            if (
                kind in _ROPE_EXTENSIONS
                and isinstance(factor, int | float)
                and not isinstance(factor, bool)
                and factor > 1
                and original
            ):
                base = max(base, int(original * factor))
        return base
    return None


def _config_dtype(cfg: Mapping[str, Any], text: Mapping[str, Any]) -> str | None:
    for source in (cfg, text):
        for key in ("torch_dtype", "dtype"):
            value = source.get(key)
            if isinstance(value, str) and value and value != "auto":
                return value.removeprefix("torch.")
    return None


def _quant_bits(qc: Any) -> int | None:
    if not isinstance(qc, Mapping):
        return None
    for key in ("bits", "w_bit", "wbits", "weight_bits", "num_bits"):
        if (bits := _int(qc.get(key))) is not None:
            return bits
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        return 4
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        return 8
    groups = qc.get("config_groups")
    if isinstance(groups, Mapping):
        for group in groups.values():
            weights = group.get("weights") if isinstance(group, Mapping) else None
            if isinstance(weights, Mapping) and (bits := _int(weights.get("num_bits"))):
                return bits
    return None


def _quantization_name(qc: Any) -> str | None:
    """`<method>-<bits>bit` (`awq-4bit`, `bitsandbytes-8bit`), or the method alone when
    its name already says the format (`fp8`, `mxfp4`)."""
    if not isinstance(qc, Mapping):
        return None
    method = _str(qc.get("quant_method")) or _str(qc.get("quant_algo"))
    if method is None:
        return None
    method = method.lower().replace("_", "-")
    if method == "modelopt":
        algo = _str(qc.get("quant_algo"))
        return algo.lower() if algo else "modelopt"
    if method in {"fp8", "fbgemm-fp8", "mxfp4", "nvfp4", "fp4"}:
        return method
    bits = _quant_bits(qc)
    return f"{method}-{bits}bit" if bits else method


def _kv_element_bytes(qc: Any) -> int:
    if isinstance(qc, Mapping):
        scheme = qc.get("kv_cache_scheme")
        if isinstance(scheme, Mapping) and _int(scheme.get("num_bits")) == 8:
            return 1
        algo = qc.get("kv_cache_quant_algo")
        if isinstance(algo, str) and algo.upper().startswith("FP8"):
            return 1
    return DEFAULT_KV_BYTES


def _mla_latent(text: Mapping[str, Any], cfg: Mapping[str, Any]) -> int | None:
    for source in (text, cfg):
        rank = _int(source.get("kv_lora_rank"))
        if rank is not None:
            return rank + (_int(source.get("qk_rope_head_dim")) or 0)
    return None


# --- tensors ---------------------------------------------------------------------------


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def _tensor_nbytes(dtype: str, numel: int) -> int | None:
    dtype = dtype.upper()
    if (bits := DTYPE_BITS.get(dtype)) is not None:
        return math.ceil(numel * bits / 8)
    if (block := _GGML_BLOCKS.get(dtype)) is not None:
        per_block, block_bytes = block
        return math.ceil(numel / per_block) * block_bytes
    return None


def _count_parameters(
    tensors: Mapping[str, TensorEntry], quant_bits: int | None, quantization: str | None
) -> int:
    total = 0
    bnb_4bit = quantization == "bitsandbytes-4bit"
    for name, (raw_dtype, shape) in tensors.items():
        dtype = raw_dtype.upper()
        numel = _numel(shape)
        if name.endswith(_QUANT_SIDE_SUFFIXES) or name.endswith(_BUFFER_SUFFIXES):
            continue
        if name.endswith(_PACKED_SUFFIXES) and dtype in {"I32", "U32"}:
            total += numel * 32 // (quant_bits or 4)
        elif dtype in {"I16", "I32", "I64", "U16", "U32", "U64", "BOOL"}:
            continue  # integer tensors that are not packed weights are buffers
        elif dtype == "U8" and (name.endswith("_blocks") or (bnb_4bit and name.endswith("weight"))):
            total += numel * 2
        else:
            total += numel
    return total


def _tensor_bytes(tensors: Mapping[str, TensorEntry]) -> int | None:
    total = 0
    for dtype, shape in tensors.values():
        nbytes = _tensor_nbytes(dtype, _numel(shape))
        if nbytes is None:
            return None  # an unknown dtype: the file sizes are the better answer
        total += nbytes
    return total


def _dominant_float_dtype(tensors: Mapping[str, TensorEntry]) -> str | None:
    by_dtype: dict[str, int] = {}
    for dtype, shape in tensors.values():
        name = _FLOAT_DTYPE_NAMES.get(dtype.upper())
        if name is not None:
            by_dtype[name] = by_dtype.get(name, 0) + (_tensor_nbytes(dtype, _numel(shape)) or 0)
    if not by_dtype:
        return None
    return max(sorted(by_dtype), key=lambda name: by_dtype[name])


def _weight_file_bytes(file_sizes: Mapping[str, int]) -> int | None:
    families: dict[str, int] = {}
    for path, size in file_sizes.items():
        lowered = path.lower()
        if not lowered.endswith(_WEIGHT_SUFFIXES) or _NOT_WEIGHTS.search(lowered):
            continue
        family = "torch" if lowered.endswith((".bin", ".pt", ".pth")) else lowered.rsplit(".")[-1]
        families[family] = families.get(family, 0) + size
    # Repositories often carry the same weights in several formats; count the one a
    # runtime would load.
    for family in ("safetensors", "gguf", "torch"):
        if family in families:
            return families[family]
    return None


# --- GGUF ------------------------------------------------------------------------------


def _gguf_fields(gguf: Mapping[str, Any]) -> dict[str, Any]:
    arch = _str(gguf.get("general.architecture"))
    out: dict[str, Any] = {"architecture": arch}
    if arch:

        def key(suffix: str) -> Any:
            return gguf.get(f"{arch}.{suffix}")

        out["context"] = _int(key("context_length"))
        out["layers"] = _int(key("block_count"))
        out["hidden"] = _int(key("embedding_length"))
        out["heads"] = _per_layer_max(key("attention.head_count"))
        out["kv_heads"] = _per_layer_max(key("attention.head_count_kv"))
        out["head_dim"] = _int(key("attention.key_length"))
        out["pooling"] = key("pooling_type") is not None
    out["parameter_count"] = _int(gguf.get("general.parameter_count"))
    file_type = _index(gguf.get("general.file_type"))
    if file_type is not None:
        name = _GGUF_FILE_TYPES.get(file_type)
        if name in _GGUF_UNQUANTIZED:
            out["dtype"] = _GGUF_UNQUANTIZED[name]
        elif name is not None:
            out["quantization"] = name
    return out


def _per_layer_max(value: Any) -> int | None:
    # Some GGUFs give per-layer head counts (0 for layers without attention); the
    # largest bounds the cache.
    if isinstance(value, list):
        counts = [v for v in (_int(x) for x in value) if v is not None]
        return max(counts) if counts else None
    return _int(value)


# --- what it serves --------------------------------------------------------------------


def _serving(
    *,
    architecture: str | None,
    model_type: str | None,
    config: Mapping[str, Any],
    card: Mapping[str, Any],
    gguf_arch: str | None,
    gguf_pooling: bool,
    encoder_only: bool,
) -> tuple[list[str], str | None]:
    pipeline = _str(card.get("pipeline_tag"))
    library = _str(card.get("library_name"))
    raw_tags = card.get("tags")
    tags = (
        {t.lower() for t in raw_tags if isinstance(t, str)} if isinstance(raw_tags, list) else set()
    )
    names = " ".join(
        v.lower()
        for v in (
            config.get("_name_or_path"),
            card.get("model_name"),
            card.get("model_id"),
            card.get("base_model"),
        )
        if isinstance(v, str)
    )
    arch = architecture or ""

    vision = any(k in config for k in ("vision_config", "vision_tower", "mm_vision_tower"))
    audio = model_type == "whisper" or "audio_config" in config
    if vision or pipeline == "image-text-to-text":
        modality: str | None = "image-text"
    elif audio or pipeline == "automatic-speech-recognition":
        modality = "audio"
    elif architecture or model_type or gguf_arch:
        modality = "text"
    else:
        modality = None

    rerank_hint = "rerank" in names or any("rerank" in t for t in tags) or "cross-encoder" in tags
    if pipeline == "text-ranking" or (arch.endswith("ForSequenceClassification") and rerank_hint):
        return ["rerank"], modality
    bare_backbone = arch.endswith("Model") and "For" not in arch and "LMHead" not in arch
    if (
        pipeline in {"feature-extraction", "sentence-similarity"}
        or library == "sentence-transformers"
        or "sentence-transformers" in tags
        or gguf_pooling
        or (bare_backbone and modality == "text")
        or (not architecture and gguf_arch in _ENCODER_GGUF_ARCHS)
    ):
        return ["embedding"], modality
    if pipeline == "automatic-speech-recognition" or audio:
        return ["transcription"], modality
    if (
        pipeline in {"text-generation", "image-text-to-text"}
        or arch.endswith(("ForCausalLM", "LMHeadModel"))
        or (arch.endswith("ForConditionalGeneration") and vision)
        or (not architecture and gguf_arch is not None and not encoder_only)
    ):
        return ["chat", "completion"], modality
    if pipeline == "text2text-generation" or arch.endswith("ForConditionalGeneration"):
        return ["completion"], modality
    return [], modality
