"""ArchConfig: the frozen, hashable architecture description the linen modules are built from.

Hugging Face configs are mutable and family-specific (``dim``/``n_layers`` for DistilBERT,
``n_embd`` for GPT-2, ``num_key_value_heads`` for Llama); the modules want one static, hashable
record so that jitted functions can be cached per architecture. Each family's entry in
:mod:`fisher_jax.models.families` builds it from the HF config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Kept literal (not read from the registry) so that importing this module stays free of flax;
# tests/test_families.py checks it against fisher_jax.models.families.REGISTRY.
SUPPORTED_MODEL_TYPES = (
    "bert", "roberta", "distilbert", "electra", "xlm-roberta", "deberta", "deberta-v2", "modernbert", "gpt2", "llama",
    "qwen2", "mistral",
)


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int  # 0: no token-type embeddings (DistilBERT, decoders)
    embedding_size: int  # != hidden_size only for ELECTRA with an embedding projection
    hidden_act: str
    layer_norm_eps: float
    pad_token_id: int
    num_labels: int
    hidden_dropout: float
    attention_dropout: float
    classifier_dropout: float
    dtype: str = "float32"  # compute dtype; parameters always stay float32
    # Fields below matter for some families only; the defaults are the BERT encoder's.
    positions: str = "absolute"  # "absolute" | "padding_offset" (RoBERTa) | "rotary" | "learned_causal" (GPT-2) | "none"
    head_kind: str = "pooler"  # "pooler" (BERT) | "distil" | "roberta" | "electra" | "modernbert" | "deberta" | "score"
    num_kv_heads: int = 0  # grouped-query attention: key/value heads (0: num_heads)
    attn_head_dim: int = 0  # 0: hidden_size // num_heads (Llama-family configs may set head_dim)
    qkv_bias: bool = True  # ModernBERT: attention_bias (Wqkv and Wo)
    out_bias: bool = True  # ModernBERT: norm_bias (its LayerNorms)
    mlp_bias: bool = True
    rope_theta: float = 10000.0
    layer_windows: tuple[int, ...] = ()  # per layer sliding window (0: full causal); () for none
    read_pad_id: int = -1  # decoders: token id the score head skips when finding the last token (-1: none)
    layer_thetas: tuple[float, ...] = ()  # per layer rotary theta (ModernBERT: global and local differ)
    pooling: str = "cls"  # ModernBERT's classifier pooling: "cls" | "mean"
    classifier_bias: bool = True
    classifier_act: str = "gelu"  # ModernBERT's classifier activation; DeBERTa's pooler_hidden_act
    # DeBERTa (He et al. 2021) disentangled attention; rel_attention False: plain content attention.
    rel_attention: bool = False
    pos_att: tuple[str, ...] = ()  # "c2p", "p2c"
    max_relative_positions: int = 0
    position_buckets: int = 0  # v2: log buckets (0: raw distances)
    share_att_key: bool = False  # v2: positions projected by query_proj / key_proj
    norm_rel_ebd: bool = False  # v2: LayerNorm on the relative embeddings
    pooler_dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def causal(self) -> bool:
        return self.head_kind == "score"

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @classmethod
    def from_hf(cls, config: Any, num_labels: int | None = None, dtype: str = "float32") -> "ArchConfig":
        """Build from a transformers ``PretrainedConfig`` (through the family's registry entry)."""
        from .families import family

        fam = family(getattr(config, "model_type", None))
        fam.check_options(config)
        labels = int(num_labels if num_labels is not None else config.num_labels)
        return fam.arch(config, labels, dtype)
