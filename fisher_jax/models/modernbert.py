"""Linen modules for ModernBERT sequence classifiers (Warner et al. 2024).

Pre-LayerNorm encoder (no LayerNorm biases by default, none before layer 0's attention),
rotary positions with one theta for global and one for local layers, local layers attending
within ``|i - j| <= sliding_window`` (``local_attention // 2``), a fused ``Wqkv`` split into
q/k/v Dense layers at load, a GeGLU feed-forward whose fused ``Wi`` is split into the activated
half (``Wi_act``) and the linear half (``Wi_gate``): ``Wo(act(Wi_act x) * Wi_gate x)``. The
classifier pools token 0 (``cls``) or the mean over real tokens (``mean``), then dense -> act ->
LayerNorm -> dropout -> classifier.

Mask nodes: head h's context before ``attn/Wo``; FFN unit i after ``act(Wi_act x) * Wi_gate x``,
before ``mlp/Wo``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .config import ArchConfig
from .decoder import Attention, GatedMLP, TokenEmbeddings, pre_norm_block
from .encoder import _dense, activation, classify, layer_masks


def _norm(cfg: ArchConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_bias=cfg.out_bias, name=name, dtype=jnp.float32,
                        param_dtype=jnp.float32)


class ModernBertLayer(nn.Module):
    """Pre-LayerNorm block (:func:`~fisher_jax.models.decoder.pre_norm_block`): bidirectional rotary
    attention (local layers see ``|i - j| <= window``), then the GeGLU MLP (``Wi_act`` is the activated half)."""

    cfg: ArchConfig
    index: int

    @nn.compact
    def __call__(self, x, key_valid, q_idx, head_mask, neuron_mask, deterministic: bool):
        cfg, i = self.cfg, self.index
        norm_1 = (lambda h: h) if i == 0 else _norm(cfg, "attn_norm")  # layer 0: no norm (HF's Identity)
        window = cfg.layer_windows[i] if cfg.layer_windows else 0
        attn = Attention(cfg, "Wo", cfg.qkv_bias, cfg.layer_thetas[i], window, causal=False,
                         out_dropout=cfg.attention_dropout, name="attn")
        mlp = GatedMLP(cfg, ("Wi_act", "Wi_gate", "Wo"), name="mlp")
        return pre_norm_block(x, q_idx, norm_1, attn, _norm(cfg, "mlp_norm"), mlp, key_valid, head_mask, neuron_mask,
                              deterministic)


class _Layers(nn.Module):
    cfg: ArchConfig

    @nn.compact
    def __call__(self, x, key_valid, masks, deterministic: bool, first_token_only: bool):
        last = self.cfg.num_layers - 1
        q0 = jnp.zeros(x.shape[:-2], jnp.int32)
        for i in range(self.cfg.num_layers):
            head_mask, neuron_mask = layer_masks(masks, i)
            q_idx = q0 if first_token_only and i == last else None
            x = ModernBertLayer(self.cfg, i, name=str(i))(x, key_valid, q_idx, head_mask, neuron_mask, deterministic)
        return x


class ModernBertBody(nn.Module):
    """Embeddings (token embedding, LayerNorm, dropout), layers, final norm -> (sequence, pooled).

    ``pooled``: token 0 (``cls``) or the attention-masked mean (``mean``). With ``first_token_only``
    and ``cls`` pooling the last layer computes token 0's row alone.
    """

    cfg: ArchConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, masks, deterministic: bool,
                 first_token_only: bool = False):
        cfg = self.cfg
        emb = TokenEmbeddings(cfg, _norm, name="embeddings")(input_ids, deterministic)
        only0 = first_token_only and cfg.pooling == "cls"
        x = _Layers(cfg, name="layers")(emb, attention_mask, masks, deterministic, only0)
        x = _norm(cfg, "final_norm")(x)
        if cfg.pooling == "mean":
            m = attention_mask.astype(x.dtype)[..., None]
            pooled = (x * m).sum(axis=-2) / m.sum(axis=-2)
        else:
            pooled = x[..., 0, :]
        return x, pooled


class ModernBertHead(nn.Module):
    """``classifier(drop(norm(act(dense(pooled)))))`` (transformers' ModernBertPredictionHead + classifier)."""

    cfg: ArchConfig

    @nn.compact
    def __call__(self, seq, pooled, deterministic: bool):
        cfg = self.cfg
        return classify(cfg, _Prediction(cfg, name="head")(pooled), deterministic)


class _Prediction(nn.Module):
    cfg: ArchConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        x = _dense(cfg, cfg.hidden_size, "dense", cfg.classifier_bias)(x)
        return _norm(cfg, "norm")(activation(cfg.classifier_act)(x))
