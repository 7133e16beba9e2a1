"""Linen modules for decoder language models as sequence classifiers: GPT-2 and the Llama family
(Llama, Qwen2, Mistral).

As transformers' ``*ForSequenceClassification``: causal self-attention over the whole sequence,
then a bias-free ``score`` layer on the hidden state of the *last non-padding token*, found as
transformers finds it: the rightmost position whose id is not ``pad_token_id`` (without a pad
token in the config: the rightmost position the attention mask keeps), which is right for left
and right padding alike. Positions
count from 0 at the first position whatever the padding (transformers' default ``position_ids``).

Mask nodes (SPEC §1, same collection as the encoders): the head mask scales query head h's
context before the output projection (``attn/c_proj``, ``self_attn/o_proj``); the neuron mask
scales FFN unit i after its nonlinearity, for gated FFNs after ``act(gate) * up``, before the down
projection. Grouped-query attention keeps one mask entry per *query* head.
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import ArchConfig
from .encoder import (PlainFFN, _dense, _layer_norm, activation, attention_context, layer_masks, mask_units,
                      word_rows)


class RMSNorm(nn.Module):
    """``scale * x / sqrt(mean(x^2) + eps)`` in float32 (Zhang & Sennrich 2019; Llama's ``LlamaRMSNorm``)."""

    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * y.astype(x.dtype)


def read_index(cfg: ArchConfig, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
    """Index of the token the score head reads, per row: the rightmost id != pad (transformers'
    rule; 0 for an all-padding row). Without a pad token in the config, the rightmost position
    whose attention mask is 1 (transformers reads the last slot, and refuses padded batches)."""
    pos = jnp.arange(input_ids.shape[-1], dtype=jnp.int32)
    if cfg.read_pad_id >= 0:
        real = input_ids != cfg.read_pad_id
    else:
        real = jnp.ones_like(input_ids, bool) if attention_mask is None else attention_mask.astype(bool)
    return jnp.argmax(pos * real.astype(jnp.int32), axis=-1).astype(jnp.int32)


def _take_row(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[..., idx, :]`` per leading index, keeping a length-1 sequence axis: ``[..., 1, D]``."""
    return jnp.take_along_axis(x, idx[..., None, None].astype(jnp.int32), axis=-2)


def rotary(x: jax.Array, pos: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), transformers' half-split convention:
    ``x cos(p w) + rotate_half(x) sin(p w)``, ``w_j = theta^(-2j/d)``, ``rotate_half([a, b]) = [-b, a]``.

    ``x [..., T, H, D]``, ``pos [..., T]`` (integers).
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = pos.astype(jnp.float32)[..., None] * inv_freq  # [..., T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]  # [..., T, 1, D]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def causal_attend(cfg: ArchConfig, q, k, v, q_pos, key_valid, window: int, head_mask: Optional[jax.Array],
                  deterministic: bool, module: nn.Module, causal: bool = True):
    """softmax(q k^T / sqrt(d) + causal/window/padding mask) v, then the head mask.

    ``q [..., Tq, H, D]`` at positions ``q_pos [..., Tq]``; ``k, v [..., T, KV, D]`` at positions
    0..T-1, ``key_valid [..., T]`` (the attention mask). Query head h reads key/value head
    ``h // (H / KV)`` (transformers' ``repeat_kv``). Key j is seen by query i when
    ``j <= i`` and, with a sliding window w, ``j > i - w``; with ``causal=False`` (ModernBERT's
    local layers) when ``|i - j| <= w``.
    """
    rep = q.shape[-2] // k.shape[-2]
    if rep > 1:
        k, v = jnp.repeat(k, rep, axis=-2), jnp.repeat(v, rep, axis=-2)
    q, k, v = (jnp.swapaxes(a, -3, -2) for a in (q, k, v))  # [..., H, T, D]
    scores = jnp.einsum("...hqd,...hkd->...hqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(q.shape[-1]))
    k_pos = jnp.arange(k.shape[-2], dtype=jnp.int32)
    if causal:
        allowed = k_pos <= q_pos[..., :, None]  # [..., Tq, T]
        if window:
            allowed = allowed & (k_pos > q_pos[..., :, None] - window)
    else:
        allowed = jnp.abs(k_pos - q_pos[..., :, None]) <= (window if window else k.shape[-2])
    allowed = allowed & key_valid[..., None, :].astype(bool)
    scores = jnp.where(allowed[..., None, :, :], scores, jnp.finfo(jnp.float32).min)
    return attention_context(cfg, scores, v, head_mask, deterministic, module)  # [..., Tq, H, D]


def _split_heads(x, heads: int, d: int):
    return x.reshape(x.shape[:-1] + (heads, d))


def _queries(x, h, q_idx):
    """(normalised query rows, residual rows, their positions): all rows, or the one at ``q_idx``."""
    t = x.shape[-2]
    if q_idx is None:
        return h, x, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), x.shape[:-1])
    return _take_row(h, q_idx), _take_row(x, q_idx), q_idx[..., None]


class Attention(nn.Module):
    """``out(attend(q_proj(hq), k_proj(h), v_proj(h)))``, then dropout: GPT-2's, the Llama family's and
    ModernBERT's self-attention (GPT-2's fused ``c_attn`` is held as the three Dense layers).

    ``cfg.kv_heads`` key/value heads (grouped-query attention), rotary positions with ``theta``
    (None: none; GPT-2's positions are in its embeddings), the mask of :func:`causal_attend`
    (``window``, ``causal``), the output projection ``out_name`` with bias ``out_bias``, and
    dropout ``out_dropout`` after it (None: no dropout layer).
    """

    cfg: ArchConfig
    out_name: str
    out_bias: bool
    theta: Optional[float] = None
    window: int = 0
    causal: bool = True
    out_dropout: Optional[float] = None

    @nn.compact
    def __call__(self, h, hq, q_pos, key_valid, head_mask, deterministic: bool):
        cfg = self.cfg
        H, KV, d = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        q = _split_heads(_dense(cfg, H * d, "q_proj", cfg.qkv_bias)(hq), H, d)
        k = _split_heads(_dense(cfg, KV * d, "k_proj", cfg.qkv_bias)(h), KV, d)
        v = _split_heads(_dense(cfg, KV * d, "v_proj", cfg.qkv_bias)(h), KV, d)
        if self.theta is not None:
            k_pos = jnp.broadcast_to(jnp.arange(h.shape[-2], dtype=jnp.int32), h.shape[:-1])
            q, k = rotary(q, q_pos, self.theta), rotary(k, k_pos, self.theta)
        ctx = causal_attend(cfg, q, k, v, q_pos, key_valid, self.window, head_mask, deterministic, self, self.causal)
        out = _dense(cfg, cfg.hidden_size, self.out_name, self.out_bias)(ctx.reshape(ctx.shape[:-2] + (H * d,)))
        if self.out_dropout is None:
            return out
        return nn.Dropout(self.out_dropout)(out, deterministic=deterministic)


def pre_norm_block(x, q_idx, norm_1, attn, norm_2, mlp, key_valid, head_mask, neuron_mask, deterministic: bool):
    """``x' = x + attn(norm_1(x))``, then ``x' + mlp(norm_2(x'))``: the pre-norm block of GPT-2, the
    Llama family and ModernBERT. ``q_idx`` restricts the output (and the queries) to one row per
    sequence (:func:`_queries`); keys and values still see every row."""
    h = norm_1(x)
    hq, xq, q_pos = _queries(x, h, q_idx)
    x = xq + attn(h, hq, q_pos, key_valid, head_mask, deterministic)
    return x + mlp(norm_2(x), neuron_mask, deterministic)


# --------------------------------------------------------------------------- GPT-2
class GPT2Block(nn.Module):
    """Pre-LayerNorm block (:func:`pre_norm_block`): ``ln_1``, ``attn`` (c_proj), ``ln_2``, ``mlp`` (c_fc, c_proj)."""

    cfg: ArchConfig
    window: int = 0  # GPT-2 has none; the field keeps one block signature for _Blocks

    @nn.compact
    def __call__(self, x, key_valid, q_idx, head_mask, neuron_mask, deterministic: bool):
        cfg = self.cfg
        attn = Attention(cfg, "c_proj", cfg.out_bias, out_dropout=cfg.hidden_dropout, name="attn")
        mlp = PlainFFN(cfg, "c_fc", "c_proj", name="mlp")
        return pre_norm_block(x, q_idx, _layer_norm(cfg, "ln_1"), attn, _layer_norm(cfg, "ln_2"), mlp, key_valid,
                              head_mask, neuron_mask, deterministic)


# --------------------------------------------------------------------------- Llama family
class GatedMLP(nn.Module):
    """Gated FFN (Shazeer 2020) ``down(drop(act(gate(x)) * up(x)))``; the neuron mask scales ``act(gate) * up``.

    ``names``: the (gate, up, down) Dense layers: Llama's SwiGLU ``gate_proj``/``up_proj``/``down_proj``,
    ModernBERT's GeGLU ``Wi_act``/``Wi_gate``/``Wo`` (Llama-family configs have no dropout here).
    """

    cfg: ArchConfig
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    @nn.compact
    def __call__(self, x, neuron_mask, deterministic: bool):
        cfg = self.cfg
        gate_name, up_name, down_name = self.names
        gate = _dense(cfg, cfg.intermediate_size, gate_name, cfg.mlp_bias)(x)
        up = _dense(cfg, cfg.intermediate_size, up_name, cfg.mlp_bias)(x)
        h = mask_units(activation(cfg.hidden_act)(gate) * up, neuron_mask)
        h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
        return _dense(cfg, cfg.hidden_size, down_name, cfg.mlp_bias)(h)


class LlamaBlock(nn.Module):
    """Pre-RMSNorm block (:func:`pre_norm_block`): rotary grouped-query attention (Qwen2: q/k/v biases;
    Mistral: a sliding ``window``), then the gated MLP."""

    cfg: ArchConfig
    window: int = 0

    @nn.compact
    def __call__(self, x, key_valid, q_idx, head_mask, neuron_mask, deterministic: bool):
        cfg = self.cfg
        attn = Attention(cfg, "o_proj", cfg.out_bias, cfg.rope_theta, self.window, name="self_attn")
        norm_1 = RMSNorm(cfg.layer_norm_eps, name="input_layernorm")
        norm_2 = RMSNorm(cfg.layer_norm_eps, name="post_attention_layernorm")
        return pre_norm_block(x, q_idx, norm_1, attn, norm_2, GatedMLP(cfg, name="mlp"), key_valid, head_mask,
                              neuron_mask, deterministic)


# --------------------------------------------------------------------------- body and head
class TokenEmbeddings(nn.Module):
    """``drop(norm(word rows [+ positions]))``: the decoders' and ModernBERT's embeddings.

    GPT-2 adds learned positions 0..T-1 (``position_embeddings``). ``norm``: a builder
    ``(cfg, name) -> module`` of the LayerNorm applied to the sum as submodule ``norm``
    (ModernBERT's); the Llama family has neither.
    """

    cfg: ArchConfig
    norm: Optional[Callable[[ArchConfig, str], nn.Module]] = None

    @nn.compact
    def __call__(self, input_ids, deterministic: bool):
        cfg = self.cfg
        x = word_rows(self, cfg, input_ids, cfg.hidden_size)
        if cfg.positions == "learned_causal":  # GPT-2: positions 0..T-1 whatever the padding
            pos = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
            x = x + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings",
                             param_dtype=jnp.float32, embedding_init=nn.initializers.normal(0.02))(pos)
        if self.norm is not None:
            x = self.norm(cfg, "norm")(x)
        x = x.astype(jnp.dtype(cfg.dtype))
        return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class DecoderBody(nn.Module):
    """Embeddings, L causal blocks, final norm. Returns ``(sequence output, read-token state)``.

    With ``first_token_only`` (set for logits: the name is the encoders') the last block computes
    the read token's row alone (keys and values still see every token) and the sequence output is
    that row, ``[..., 1, D]``.
    """

    cfg: ArchConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, masks, deterministic: bool,
                 first_token_only: bool = False):
        cfg = self.cfg
        gpt2 = cfg.positions == "learned_causal"
        x = TokenEmbeddings(cfg, name="embeddings")(input_ids, deterministic)
        idx = read_index(cfg, input_ids, attention_mask)
        x = _Blocks(cfg, name="h" if gpt2 else "layers")(x, attention_mask, idx, masks, deterministic, first_token_only)
        x = _layer_norm(cfg, "ln_f")(x) if gpt2 else RMSNorm(cfg.layer_norm_eps, name="norm")(x)
        pooled = x[..., 0, :] if first_token_only else _take_row(x, idx)[..., 0, :]
        return x, pooled


class _Blocks(nn.Module):
    """Blocks named "0".."L-1" (HF's ``h.{i}`` / ``layers.{i}``); row ``i`` of each mask goes to block ``i``."""

    cfg: ArchConfig

    @nn.compact
    def __call__(self, x, attention_mask, idx, masks, deterministic: bool, first_token_only: bool):
        cfg = self.cfg
        block = GPT2Block if cfg.positions == "learned_causal" else LlamaBlock
        windows = cfg.layer_windows or (0,) * cfg.num_layers
        last = cfg.num_layers - 1
        for i in range(cfg.num_layers):
            head_mask, neuron_mask = layer_masks(masks, i)
            q_idx = idx if first_token_only and i == last else None
            x = block(cfg, windows[i], name=str(i))(x, attention_mask, q_idx, head_mask, neuron_mask, deterministic)
        return x


class ScoreHead(nn.Module):
    """transformers' ``score``: a bias-free Dense on the read token's hidden state."""

    cfg: ArchConfig

    @nn.compact
    def __call__(self, seq, pooled, deterministic: bool):
        return _dense(self.cfg, self.cfg.num_labels, "score", bias=False)(pooled)
