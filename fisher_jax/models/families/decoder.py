"""Decoder language models as sequence classifiers: GPT-2 and the Llama family (Llama, Qwen2, Mistral)."""

from __future__ import annotations

from typing import Any

from .. import layout as L
from ..config import ArchConfig
from . import Family, Rename, TorchHooks, hf_sizes
from .bert import common_options


def _modules():
    from ..decoder import DecoderBody, ScoreHead

    return DecoderBody, ScoreHead


def _pad(config: Any) -> tuple[int, int]:
    pad = getattr(config, "pad_token_id", None)
    return (0, -1) if pad is None else (int(pad), int(pad))


# --------------------------------------------------------------------------- GPT-2
def _gpt2_arch(config: Any, num_labels: int, dtype: str) -> ArchConfig:
    pad, read = _pad(config)
    return ArchConfig(
        model_type="gpt2", **hf_sizes(config), intermediate_size=config.n_inner or 4 * config.n_embd,
        type_vocab_size=0, embedding_size=config.n_embd,
        hidden_act=config.activation_function, layer_norm_eps=config.layer_norm_epsilon, pad_token_id=pad,
        num_labels=num_labels, hidden_dropout=config.resid_pdrop, attention_dropout=config.attn_pdrop,
        classifier_dropout=0.0, dtype=dtype, positions="learned_causal", head_kind="score", read_pad_id=read,
    )


def _gpt2_options(config: Any) -> list[str]:
    bad = common_options(config)
    if not getattr(config, "scale_attn_weights", True):
        bad.append("scale_attn_weights: false")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        bad.append("scale_attn_by_inverse_layer_idx: true")
    if getattr(config, "add_cross_attention", False):
        bad.append("add_cross_attention: true")
    return bad


GPT2_LAYER_ROLES = (
    ("attn/q_proj", L.QUERY), ("attn/k_proj", L.KEY), ("attn/v_proj", L.VALUE), ("attn/c_proj", L.ATTN_OUT),
    ("ln_1", L.ATTN_LN), ("mlp/c_fc", L.FFN_IN), ("mlp/c_proj", L.FFN_OUT), ("ln_2", L.FFN_LN),
)

GPT2 = Family(
    model_type="gpt2", hf_class="GPT2ForSequenceClassification", base_prefix="transformer", arch=_gpt2_arch,
    modules=_modules, layer_prefix="h/{i}", layer_roles=GPT2_LAYER_ROLES,
    outer_roles=(("embeddings", L.EMBEDDINGS), ("ln_f", L.FINAL_LN)),
    torch=TorchHooks(layers="h", attn_out="attn.c_proj", ffn_out="mlp.c_proj", token_types=False, causal=True),
    embeddings_hf="wte",
    renames=(
        Rename("embeddings/word_embeddings", "wte"), Rename("embeddings/position_embeddings", "wpe"),
        # The fused c_attn (Conv1D [in, 3 * hidden]: q, k, v side by side) is three Flax Dense layers,
        # so Grams, Fishers and node weights see plain query/key/value projections.
        Rename("h/{i}/attn/q_proj", "h.{i}.attn.c_attn", 0, 3),
        Rename("h/{i}/attn/k_proj", "h.{i}.attn.c_attn", 1, 3),
        Rename("h/{i}/attn/v_proj", "h.{i}.attn.c_attn", 2, 3),
    ),
    conv1d_body=True, options=_gpt2_options,
)


# --------------------------------------------------------------------------- Llama family
def _rope(config: Any) -> tuple[str, float]:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    return kind, float(theta)


def _windows(config: Any, model_type: str) -> tuple[int, ...]:
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or 0
    if model_type == "mistral":
        return (int(window),) * n if window else ()
    if model_type == "qwen2":
        types = getattr(config, "layer_types", None) or ["full_attention"] * n
        ws = tuple(int(window) if t == "sliding_attention" and window else 0 for t in types)
        return ws if any(ws) else ()
    return ()


def _llama_arch(config: Any, num_labels: int, dtype: str) -> ArchConfig:
    mt = config.model_type
    pad, read = _pad(config)
    qwen = mt == "qwen2"
    bias = bool(getattr(config, "attention_bias", False))
    return ArchConfig(
        model_type=mt, **hf_sizes(config), intermediate_size=config.intermediate_size,
        type_vocab_size=0, embedding_size=config.hidden_size, hidden_act=config.hidden_act,
        layer_norm_eps=config.rms_norm_eps, pad_token_id=pad, num_labels=num_labels, hidden_dropout=0.0,
        attention_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0), classifier_dropout=0.0,
        dtype=dtype, positions="rotary", head_kind="score",
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        attn_head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        qkv_bias=True if qwen else bias, out_bias=False if qwen else bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)), rope_theta=_rope(config)[1],
        layer_windows=_windows(config, mt), read_pad_id=read,
    )


def _llama_options(config: Any) -> list[str]:
    bad = common_options(config)
    kind, _ = _rope(config)
    if kind != "default":
        bad.append(f"rope_parameters.rope_type: {kind}")
    if (getattr(config, "pretraining_tp", 1) or 1) > 1:
        bad.append(f"pretraining_tp: {config.pretraining_tp}")
    partial = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor")
    if partial not in (None, 1, 1.0):
        bad.append(f"rope_parameters.partial_rotary_factor: {partial}")
    return bad


LLAMA_LAYER_ROLES = (
    ("self_attn/q_proj", L.QUERY), ("self_attn/k_proj", L.KEY), ("self_attn/v_proj", L.VALUE),
    ("self_attn/o_proj", L.ATTN_OUT), ("input_layernorm", L.ATTN_LN),
    ("mlp/gate_proj", L.FFN_GATE), ("mlp/up_proj", L.FFN_IN), ("mlp/down_proj", L.FFN_OUT),
    ("post_attention_layernorm", L.FFN_LN),
)


def _llama_family(model_type: str, hf_class: str) -> Family:
    return Family(
        model_type=model_type, hf_class=hf_class, base_prefix="model", arch=_llama_arch, modules=_modules,
        layer_prefix="layers/{i}", layer_roles=LLAMA_LAYER_ROLES,
        outer_roles=(("embeddings", L.EMBEDDINGS), ("norm", L.FINAL_LN)),
        torch=TorchHooks(layers="layers", attn_out="self_attn.o_proj", ffn_out="mlp.down_proj", token_types=False,
                         causal=True),
        embeddings_hf="embed_tokens", renames=(Rename("embeddings/word_embeddings", "embed_tokens"),),
        options=_llama_options,
    )


FAMILIES = (
    GPT2,
    _llama_family("llama", "LlamaForSequenceClassification"),
    _llama_family("qwen2", "Qwen2ForSequenceClassification"),
    _llama_family("mistral", "MistralForSequenceClassification"),
)
