"""DeBERTa (``model_type: deberta``) and DeBERTa-v2/v3 (``deberta-v2``): disentangled attention.

v1 fuses q, k, v into ``in_proj`` (no bias; rows interleaved per head: ``[q_h, k_h, v_h]`` for each
head h) with separate ``q_bias`` / ``v_bias``; the Flax model splits them into ``query_proj``
(bias = ``q_bias``), ``key_proj`` (no bias) and ``value_proj`` (bias = ``v_bias``) at load and
interleaves them back at export. v2 has the three projections already. The relative-position
projections (v1 ``pos_proj`` / ``pos_q_proj``, v2 ``pos_key_proj`` / ``pos_query_proj``) take the
key / query role: head h's columns only enter head h's scores.
"""

from __future__ import annotations

from typing import Any

from .. import layout as L
from ..config import ArchConfig
from . import Family, Rename, TorchHooks, hf_sizes
from .bert import BERT_LAYER_ROLES, common_options


def _modules():
    from ..deberta import DebertaBody, DebertaHead

    return DebertaBody, DebertaHead


def _pos_att(config: Any) -> tuple[str, ...]:
    """The relative terms in use, in a fixed order (transformers only tests membership)."""
    kinds = config.pos_att_type or []
    if isinstance(kinds, str):
        kinds = [x.strip() for x in kinds.lower().split("|")]
    return tuple(k for k in ("c2p", "p2c") if k in kinds)


def _arch(config: Any, num_labels: int, dtype: str) -> ArchConfig:
    v2 = config.model_type == "deberta-v2"
    rel = bool(getattr(config, "relative_attention", False))
    mrp = int(getattr(config, "max_relative_positions", -1))
    mrp = mrp if mrp >= 1 else int(config.max_position_embeddings)
    buckets = int(getattr(config, "position_buckets", -1)) if v2 else -1
    norm_kinds = [x.strip() for x in str(getattr(config, "norm_rel_ebd", "none")).lower().split("|")]
    norm_rel = v2 and "layer_norm" in norm_kinds
    drop = getattr(config, "cls_dropout", None)
    pad = config.pad_token_id
    head_dim = int(getattr(config, "attention_head_size", 0) or 0) if v2 else 0
    return ArchConfig(
        model_type=config.model_type, **hf_sizes(config), intermediate_size=config.intermediate_size,
        type_vocab_size=config.type_vocab_size,
        embedding_size=getattr(config, "embedding_size", None) or config.hidden_size,
        hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps, pad_token_id=0 if pad is None else int(pad),
        num_labels=num_labels, hidden_dropout=config.hidden_dropout_prob,
        attention_dropout=config.attention_probs_dropout_prob,
        classifier_dropout=config.hidden_dropout_prob if drop is None else float(drop), dtype=dtype,
        positions="absolute" if getattr(config, "position_biased_input", True) else "none", head_kind="deberta",
        attn_head_dim=head_dim if head_dim and head_dim != config.hidden_size // config.num_attention_heads else 0,
        classifier_act=config.pooler_hidden_act, rel_attention=rel, pos_att=_pos_att(config) if rel else (),
        max_relative_positions=mrp if rel else 0, position_buckets=buckets if rel and buckets > 0 else 0,
        share_att_key=bool(getattr(config, "share_att_key", False)) if v2 else False,
        norm_rel_ebd=bool(norm_rel and rel),
        pooler_dropout=float(getattr(config, "pooler_dropout", 0.0)),
    )


def _options(config: Any) -> list[str]:
    bad = common_options(config)
    if getattr(config, "talking_head", False):
        bad.append("talking_head: true")
    if getattr(config, "conv_kernel_size", 0) and config.model_type == "deberta-v2":
        bad.append(f"conv_kernel_size: {config.conv_kernel_size}")
    pooler = getattr(config, "pooler_hidden_size", config.hidden_size)
    if pooler != config.hidden_size:
        bad.append(f"pooler_hidden_size: {pooler}")
    kinds = config.pos_att_type or []
    kinds = [x.strip() for x in kinds.lower().split("|")] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in kinds if k not in ("c2p", "p2c")]
    # v1 scales by 1 + len(pos_att_type), unknown terms included; v2 counts c2p and p2c only (and ignores the rest).
    if unknown and config.model_type == "deberta" and getattr(config, "relative_attention", False):
        bad.append(f"pos_att_type: {unknown[0]}")
    return bad


def _layer_roles(pos_key: str, pos_query: str) -> tuple[tuple[str, str], ...]:
    self_ = "attention/self/"
    return (
        (self_ + "query_proj", L.QUERY), (self_ + "key_proj", L.KEY), (self_ + "value_proj", L.VALUE),
        (self_ + pos_key, L.KEY), (self_ + pos_query, L.QUERY),
        *((p, r) for p, r in BERT_LAYER_ROLES if not p.startswith(self_)),
    )


_OUTER = (("embeddings", L.EMBEDDINGS), ("encoder/rel_embeddings", L.EMBEDDINGS), ("encoder/LayerNorm", L.EMBEDDINGS))
_TORCH = TorchHooks(layers="encoder.layer", attn_out="attention.output.dense", ffn_out="output.dense", plain_mask=True)
_SELF = "encoder/layer/{i}/attention/self/"
_HF_SELF = "encoder.layer.{i}.attention.self."

DEBERTA = Family(
    model_type="deberta", hf_class="DebertaForSequenceClassification", base_prefix="deberta", arch=_arch,
    modules=_modules, layer_prefix="encoder/layer/{i}", layer_roles=_layer_roles("pos_proj", "pos_q_proj"),
    outer_roles=_OUTER, torch=_TORCH, embeddings_hf="embeddings",
    renames=(
        # Leaf renames first: the biases live beside in_proj, which has none.
        Rename(_SELF + "query_proj", _HF_SELF + "q_bias", leaf="bias"),
        Rename(_SELF + "value_proj", _HF_SELF + "v_bias", leaf="bias"),
        # in_proj [3 * all, hidden]: per head h, rows [q_h | k_h | v_h] (transformers chunks [B, T, H, 3d]).
        Rename(_SELF + "query_proj", _HF_SELF + "in_proj", 0, 3, groups=0),
        Rename(_SELF + "key_proj", _HF_SELF + "in_proj", 1, 3, groups=0),
        Rename(_SELF + "value_proj", _HF_SELF + "in_proj", 2, 3, groups=0),
    ),
    options=_options,
)

DEBERTA_V2 = Family(
    model_type="deberta-v2", hf_class="DebertaV2ForSequenceClassification", base_prefix="deberta", arch=_arch,
    modules=_modules, layer_prefix="encoder/layer/{i}", layer_roles=_layer_roles("pos_key_proj", "pos_query_proj"),
    outer_roles=_OUTER, torch=_TORCH, embeddings_hf="embeddings", options=_options,
)

FAMILIES = (DEBERTA, DEBERTA_V2)
