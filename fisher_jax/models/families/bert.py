"""BERT-style encoders: BERT, RoBERTa, XLM-RoBERTa (a RoBERTa under another name), ELECTRA, DistilBERT."""

from __future__ import annotations

from typing import Any

from ..config import ArchConfig
from . import Family, TorchHooks, hf_sizes
from .. import layout as L


def _modules():
    from ..encoder import Body, Head

    return Body, Head


def common_options(config: Any) -> list[str]:
    """Options no fisher_jax family implements (``problem_type`` other than single-label/regression)."""
    pt = getattr(config, "problem_type", None)
    return [f"problem_type: {pt}"] if pt not in (None, "single_label_classification", "regression") else []


def _encoder_options(config: Any) -> list[str]:
    bad = common_options(config)
    pet = getattr(config, "position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        bad.append(f"position_embedding_type: {pet}")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        bad.append("is_decoder/add_cross_attention: true")
    return bad


def _dropout(config: Any) -> float:
    d = getattr(config, "classifier_dropout", None)
    return d if d is not None else config.hidden_dropout_prob


def _bert_like(head_kind: str, positions: str = "absolute"):
    def arch(config: Any, num_labels: int, dtype: str) -> ArchConfig:
        return ArchConfig(
            model_type=config.model_type,
            **hf_sizes(config),
            intermediate_size=config.intermediate_size,
            type_vocab_size=config.type_vocab_size,
            embedding_size=getattr(config, "embedding_size", None) or config.hidden_size,
            hidden_act=config.hidden_act,
            layer_norm_eps=config.layer_norm_eps,
            pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0,
            num_labels=num_labels,
            hidden_dropout=config.hidden_dropout_prob,
            attention_dropout=config.attention_probs_dropout_prob,
            classifier_dropout=_dropout(config),
            dtype=dtype,
            positions=positions,
            head_kind=head_kind,
        )

    return arch


def _distil_arch(config: Any, num_labels: int, dtype: str) -> ArchConfig:
    return ArchConfig(
        model_type="distilbert",
        **hf_sizes(config),
        intermediate_size=config.hidden_dim,
        type_vocab_size=0,
        embedding_size=config.dim,
        hidden_act=config.activation,
        layer_norm_eps=1e-12,  # hard-coded in transformers' DistilBERT
        pad_token_id=config.pad_token_id or 0,
        num_labels=num_labels,
        hidden_dropout=config.dropout,
        attention_dropout=config.attention_dropout,
        classifier_dropout=config.seq_classif_dropout,
        dtype=dtype,
        head_kind="distil",
    )


def _distil_options(config: Any) -> list[str]:
    bad = common_options(config)
    if getattr(config, "sinusoidal_pos_embds", False):
        bad.append("sinusoidal_pos_embds: true")
    return bad


BERT_LAYER_ROLES = (
    ("attention/self/query", L.QUERY), ("attention/self/key", L.KEY), ("attention/self/value", L.VALUE),
    ("attention/output/dense", L.ATTN_OUT), ("attention/output/LayerNorm", L.ATTN_LN),
    ("intermediate/dense", L.FFN_IN), ("output/dense", L.FFN_OUT), ("output/LayerNorm", L.FFN_LN),
)
DISTIL_LAYER_ROLES = (
    ("attention/q_lin", L.QUERY), ("attention/k_lin", L.KEY), ("attention/v_lin", L.VALUE),
    ("attention/out_lin", L.ATTN_OUT), ("sa_layer_norm", L.ATTN_LN),
    ("ffn/lin1", L.FFN_IN), ("ffn/lin2", L.FFN_OUT), ("output_layer_norm", L.FFN_LN),
)
_OUTER = (("embeddings", L.EMBEDDINGS), ("embeddings_project", L.EMBEDDINGS), ("pooler", L.POOLER))
_BERT_TORCH = TorchHooks(layers="encoder.layer", attn_out="attention.output.dense", ffn_out="output.dense")


def _bert_family(model_type: str, hf_class: str, prefix: str, head_kind: str, positions: str = "absolute") -> Family:
    return Family(
        model_type=model_type, hf_class=hf_class, base_prefix=prefix, arch=_bert_like(head_kind, positions),
        modules=_modules, layer_prefix="encoder/layer/{i}", layer_roles=BERT_LAYER_ROLES, outer_roles=_OUTER,
        torch=_BERT_TORCH, embeddings_hf="embeddings", options=_encoder_options,
    )


FAMILIES = (
    _bert_family("bert", "BertForSequenceClassification", "bert", "pooler"),
    _bert_family("roberta", "RobertaForSequenceClassification", "roberta", "roberta", "padding_offset"),
    _bert_family("xlm-roberta", "XLMRobertaForSequenceClassification", "roberta", "roberta", "padding_offset"),
    _bert_family("electra", "ElectraForSequenceClassification", "electra", "electra"),
    Family(
        model_type="distilbert", hf_class="DistilBertForSequenceClassification", base_prefix="distilbert",
        arch=_distil_arch, modules=_modules, layer_prefix="transformer/layer/{i}", layer_roles=DISTIL_LAYER_ROLES,
        outer_roles=_OUTER,
        torch=TorchHooks(layers="transformer.layer", attn_out="attention.out_lin", ffn_out="ffn.lin2", token_types=False),
        embeddings_hf="embeddings", options=_distil_options,
    ),
)
