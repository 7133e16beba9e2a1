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
from .decoder import _dense, _queries, _split_heads, causal_attend, rotary
from .encoder import activation, word_rows


def _norm(cfg: ArchConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_bias=cfg.out_bias, name=name, dtype=jnp.float32,
                        param_dtype=jnp.float32)


class ModernBertLayer(nn.Module):
    cfg: ArchConfig
    index: int

    @nn.compact
    def __call__(self, x, key_valid, q_idx, head_mask, neuron_mask, deterministic: bool):
        cfg = self.cfg
        h = x if self.index == 0 else _norm(cfg, "attn_norm")(x)  # layer 0: no norm (HF's Identity)
        hq, xq, q_pos = _queries(x, h, q_idx)
        out = _Attn(cfg, self.index, name="attn")(h, hq, q_pos, key_valid, head_mask, deterministic)
        x = xq + out
        return x + _MLP(cfg, name="mlp")(_norm(cfg, "mlp_norm")(x), neuron_mask, deterministic)


class _Attn(nn.Module):
    """Bidirectional rotary attention; local layers see ``|i - j| <= window``."""

    cfg: ArchConfig
    index: int

    @nn.compact
    def __call__(self, h, hq, q_pos, key_valid, head_mask, deterministic: bool):
        cfg = self.cfg
        H, d = cfg.num_heads, cfg.head_dim
        q = _split_heads(_dense(cfg, H * d, "q_proj", cfg.qkv_bias)(hq), H, d)
        k = _split_heads(_dense(cfg, H * d, "k_proj", cfg.qkv_bias)(h), H, d)
        v = _split_heads(_dense(cfg, H * d, "v_proj", cfg.qkv_bias)(h), H, d)
        theta = cfg.layer_thetas[self.index]
        k_pos = jnp.broadcast_to(jnp.arange(h.shape[-2], dtype=jnp.int32), h.shape[:-1])
        q, k = rotary(q, q_pos, theta), rotary(k, k_pos, theta)
        window = cfg.layer_windows[self.index] if cfg.layer_windows else 0
        ctx = causal_attend(cfg, q, k, v, q_pos, key_valid, window, head_mask, deterministic, self, causal=False)
        out = _dense(cfg, cfg.hidden_size, "Wo", cfg.qkv_bias)(ctx.reshape(ctx.shape[:-2] + (H * d,)))
        return nn.Dropout(cfg.attention_dropout)(out, deterministic=deterministic)


class _MLP(nn.Module):
    cfg: ArchConfig

    @nn.compact
    def __call__(self, x, neuron_mask, deterministic: bool):
        cfg = self.cfg
        a = _dense(cfg, cfg.intermediate_size, "Wi_act", cfg.mlp_bias)(x)
        g = _dense(cfg, cfg.intermediate_size, "Wi_gate", cfg.mlp_bias)(x)
        h = activation(cfg.hidden_act)(a) * g
        if neuron_mask is not None:
            h = h * neuron_mask.astype(h.dtype)
        h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
        return _dense(cfg, cfg.hidden_size, "Wo", cfg.mlp_bias)(h)


class _Layers(nn.Module):
    cfg: ArchConfig

    @nn.compact
    def __call__(self, x, key_valid, masks, deterministic: bool, first_token_only: bool):
        last = self.cfg.num_layers - 1
        q0 = jnp.zeros(x.shape[:-2], jnp.int32)
        for i in range(self.cfg.num_layers):
            head_mask = masks["head"][i] if masks is not None else None
            neuron_mask = masks["neuron"][i] if masks is not None else None
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
        emb = _Embeddings(cfg, name="embeddings")(input_ids, deterministic)
        only0 = first_token_only and cfg.pooling == "cls"
        x = _Layers(cfg, name="layers")(emb, attention_mask, masks, deterministic, only0)
        x = _norm(cfg, "final_norm")(x)
        if cfg.pooling == "mean":
            m = attention_mask.astype(x.dtype)[..., None]
            pooled = (x * m).sum(axis=-2) / m.sum(axis=-2)
        else:
            pooled = x[..., 0, :]
        return x, pooled


class _Embeddings(nn.Module):
    cfg: ArchConfig

    @nn.compact
    def __call__(self, input_ids, deterministic: bool):
        cfg = self.cfg
        x = word_rows(self, cfg, input_ids, cfg.hidden_size)
        x = _norm(cfg, "norm")(x).astype(jnp.dtype(cfg.dtype))
        return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class ModernBertHead(nn.Module):
    """``classifier(drop(norm(act(dense(pooled)))))`` (transformers' ModernBertPredictionHead + classifier)."""

    cfg: ArchConfig

    @nn.compact
    def __call__(self, seq, pooled, deterministic: bool):
        cfg = self.cfg
        x = _Prediction(cfg, name="head")(pooled)
        x = nn.Dropout(cfg.classifier_dropout)(x, deterministic=deterministic)
        return _dense(cfg, cfg.num_labels, "classifier")(x)


class _Prediction(nn.Module):
    cfg: ArchConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        x = _dense(cfg, cfg.hidden_size, "dense", cfg.classifier_bias)(x)
        return _norm(cfg, "norm")(activation(cfg.classifier_act)(x))
