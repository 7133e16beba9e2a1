"""ArchConfig: the frozen, hashable architecture description the linen modules are built from.

Hugging Face configs are mutable and family-specific (``dim``/``n_layers`` for DistilBERT,
``embedding_size`` for ELECTRA); the modules want one static, hashable record so that jitted
functions can be cached per architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import FisherJaxError

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "distilbert", "electra")

# Hugging Face's prefix for the base model inside *ForSequenceClassification checkpoints.
BASE_PREFIX = {"bert": "bert", "roberta": "roberta", "distilbert": "distilbert", "electra": "electra"}
HF_CLASS = {
    "bert": "BertForSequenceClassification",
    "roberta": "RobertaForSequenceClassification",
    "distilbert": "DistilBertForSequenceClassification",
    "electra": "ElectraForSequenceClassification",
}


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int  # 0: no token-type embeddings (DistilBERT)
    embedding_size: int  # != hidden_size only for ELECTRA with an embedding projection
    hidden_act: str
    layer_norm_eps: float
    pad_token_id: int
    num_labels: int
    hidden_dropout: float
    attention_dropout: float
    classifier_dropout: float
    dtype: str = "float32"  # compute dtype; parameters always stay float32

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @classmethod
    def from_hf(cls, config: Any, num_labels: int | None = None, dtype: str = "float32") -> "ArchConfig":
        """Build from a transformers ``PretrainedConfig``."""
        mt = getattr(config, "model_type", None)
        if mt not in SUPPORTED_MODEL_TYPES:
            raise FisherJaxError(
                f"unsupported model_type '{mt}': fisher_jax supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        labels = int(num_labels if num_labels is not None else config.num_labels)
        if mt == "distilbert":
            return cls(
                model_type=mt,
                vocab_size=config.vocab_size,
                hidden_size=config.dim,
                num_layers=config.n_layers,
                num_heads=config.n_heads,
                intermediate_size=config.hidden_dim,
                max_position_embeddings=config.max_position_embeddings,
                type_vocab_size=0,
                embedding_size=config.dim,
                hidden_act=config.activation,
                layer_norm_eps=1e-12,  # hard-coded in transformers' DistilBERT
                pad_token_id=config.pad_token_id or 0,
                num_labels=labels,
                hidden_dropout=config.dropout,
                attention_dropout=config.attention_dropout,
                classifier_dropout=config.seq_classif_dropout,
                dtype=dtype,
            )
        classifier_dropout = getattr(config, "classifier_dropout", None)
        return cls(
            model_type=mt,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_position_embeddings,
            type_vocab_size=config.type_vocab_size,
            embedding_size=getattr(config, "embedding_size", None) or config.hidden_size,
            hidden_act=config.hidden_act,
            layer_norm_eps=config.layer_norm_eps,
            pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0,
            num_labels=labels,
            hidden_dropout=config.hidden_dropout_prob,
            attention_dropout=config.attention_probs_dropout_prob,
            classifier_dropout=classifier_dropout if classifier_dropout is not None else config.hidden_dropout_prob,
            dtype=dtype,
        )
