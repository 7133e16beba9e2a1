"""ModernBERT (``model_type: modernbert``): rotary, fused Wqkv and GeGLU Wi, alternating local/global attention."""

from __future__ import annotations

from typing import Any

from .. import layout as L
from ..config import ArchConfig
from . import Family, Rename, TorchHooks, hf_sizes
from .bert import common_options


def _modules():
    from ..modernbert import ModernBertBody, ModernBertHead

    return ModernBertBody, ModernBertHead


def _arch(config: Any, num_labels: int, dtype: str) -> ArchConfig:
    types = list(config.layer_types)
    rope = config.rope_parameters
    windows = tuple(int(config.sliding_window) if t == "sliding_attention" else 0 for t in types)
    pad = config.pad_token_id
    return ArchConfig(
        model_type="modernbert", **hf_sizes(config), intermediate_size=config.intermediate_size,
        type_vocab_size=0, embedding_size=config.hidden_size, hidden_act=config.hidden_activation,
        layer_norm_eps=config.norm_eps, pad_token_id=0 if pad is None else int(pad), num_labels=num_labels,
        hidden_dropout=float(config.mlp_dropout), attention_dropout=float(config.attention_dropout),
        classifier_dropout=float(config.classifier_dropout), dtype=dtype, positions="rotary", head_kind="modernbert",
        qkv_bias=bool(config.attention_bias), out_bias=bool(config.norm_bias), mlp_bias=bool(config.mlp_bias),
        layer_windows=windows if any(windows) else (),
        layer_thetas=tuple(float(rope[t]["rope_theta"]) for t in types),
        pooling=config.classifier_pooling, classifier_bias=bool(config.classifier_bias),
        classifier_act=config.classifier_activation,
    )


def _options(config: Any) -> list[str]:
    bad = common_options(config)
    for kind, params in (getattr(config, "rope_parameters", None) or {}).items():
        if (params or {}).get("rope_type", "default") != "default":
            bad.append(f"rope_parameters.{kind}.rope_type: {params['rope_type']}")
    if getattr(config, "classifier_pooling", "cls") not in ("cls", "mean"):
        bad.append(f"classifier_pooling: {config.classifier_pooling}")
    return bad


MODERNBERT = Family(
    model_type="modernbert", hf_class="ModernBertForSequenceClassification", base_prefix="model", arch=_arch,
    modules=_modules, layer_prefix="layers/{i}",
    layer_roles=(
        ("attn/q_proj", L.QUERY), ("attn/k_proj", L.KEY), ("attn/v_proj", L.VALUE), ("attn/Wo", L.ATTN_OUT),
        ("attn_norm", L.ATTN_LN), ("mlp/Wi_act", L.FFN_GATE), ("mlp/Wi_gate", L.FFN_IN), ("mlp/Wo", L.FFN_OUT),
        ("mlp_norm", L.FFN_LN),
    ),
    outer_roles=(("embeddings", L.EMBEDDINGS), ("final_norm", L.FINAL_LN)),
    torch=TorchHooks(layers="layers", attn_out="attn.Wo", ffn_out="mlp.Wo", token_types=False),
    embeddings_hf="embeddings",
    renames=(
        Rename("embeddings/word_embeddings", "embeddings.tok_embeddings"),
        # Wqkv [3 * hidden, hidden]: q, k, v stacked; Wi [2 * I, hidden]: the activated half, then the gate.
        Rename("layers/{i}/attn/q_proj", "layers.{i}.attn.Wqkv", 0, 3),
        Rename("layers/{i}/attn/k_proj", "layers.{i}.attn.Wqkv", 1, 3),
        Rename("layers/{i}/attn/v_proj", "layers.{i}.attn.Wqkv", 2, 3),
        Rename("layers/{i}/mlp/Wi_act", "layers.{i}.mlp.Wi", 0, 2),
        Rename("layers/{i}/mlp/Wi_gate", "layers.{i}.mlp.Wi", 1, 2),
    ),
    options=_options,
)

FAMILIES = (MODERNBERT,)
