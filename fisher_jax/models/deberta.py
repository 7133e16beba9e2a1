"""Linen modules for DeBERTa (v1) and DeBERTa-v2/v3 sequence classifiers (He et al., ICLR 2021).

Post-LayerNorm BERT layers whose self-attention adds disentangled relative-position terms to the
content scores (transformers' ``DisentangledSelfAttention``), for query i and key j:

    s_ij = [ q_i . k_j  +  c2p: q_i . Kr[idx(i, j)]  +  p2c: k_j . Qr[idx'(i, j)] ] / sqrt(d * (1 + #terms))

with ``Kr``/``Qr`` the relative embedding table projected per head, ``idx(i, j) = clip(delta(i - j)
+ S, 0, 2S - 1)``, ``idx'(i, j) = clip(-delta(j - i) + S, 0, 2S - 1)``, ``delta`` the identity (v1)
or v2's log buckets, ``S`` the attention span (v1: ``min(T, max_relative_positions)``; v2:
``position_buckets`` or ``max_relative_positions``). v1 projects positions with ``pos_proj`` (c2p,
no bias) and ``pos_q_proj`` (p2c); v2 with ``pos_key_proj`` / ``pos_query_proj``, or with
``key_proj`` / ``query_proj`` themselves under ``share_att_key``, and can LayerNorm the table
(``norm_rel_ebd: layer_norm``). Embeddings are zeroed at padding; query rows of padding see no key.

The relative-position projections are applied to a *parameter* (the table), not to the data, so
they are plain ``kernel``/``bias`` parameters rather than ``nn.Dense`` calls: they have no RegMean
Gram (their merge is the simple mean) and the Gram capture only ever sees per-token inputs.

Mask nodes: head h's context before ``attention/output/dense``; FFN unit i after the activation,
before ``output/dense`` (as BERT). Head: ``ContextPooler`` (token 0 -> dense -> act) -> classifier.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .config import ArchConfig
from .encoder import (BertOutput, Intermediate, Pooler, _dense, _embed, _layer_norm, activation, attention_context,
                      classify, layer_masks, word_rows)


def log_bucket_position(relative: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
    """transformers' ``make_log_bucket_position``: distances beyond ``mid = bucket_size // 2`` go to
    ``sign(r) * (ceil(log(|r| / mid) / log((max_position - 1) / mid) * (mid - 1)) + mid)``.

    In float32 as transformers computes it (the ceil must see the same rounding); odd in ``r``.
    """
    rel = np.asarray(relative, np.int64)
    mid = bucket_size // 2
    abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel))
    ratio = np.log(abs_pos.astype(np.float32) / np.float32(mid)) / np.log(np.float32((max_position - 1) / mid))
    log_pos = np.ceil(ratio * np.float32(mid - 1)) + np.float32(mid)
    return np.where(abs_pos <= mid, rel.astype(np.float32), log_pos * np.sign(rel)).astype(np.int64)


def attention_span(cfg: ArchConfig, num_keys: int) -> int:
    """``S``: v2 ``position_buckets`` (or ``max_relative_positions``); v1 ``min(T, max_relative_positions)``."""
    if cfg.model_type == "deberta-v2":
        return cfg.position_buckets or cfg.max_relative_positions
    return min(num_keys, cfg.max_relative_positions)


def relative_indices(cfg: ArchConfig, query_pos: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """``(c2p, p2c)`` integer tables ``[Tq, T]`` into the ``2S`` projected relative embeddings.

    c2p: ``clip(delta(i - j) + S)``; p2c: ``clip(-delta(j - i) + S)`` (transformers gathers the
    p2c term on the key rows with the transposed distance). Static: built with numpy at trace time.
    """
    span = attention_span(cfg, num_keys)
    k = np.arange(num_keys)
    q = np.asarray(query_pos)[:, None]

    def delta(r):
        if cfg.position_buckets:
            return log_bucket_position(r, cfg.position_buckets, cfg.max_relative_positions)
        return r

    c2p = np.clip(delta(q - k[None, :]) + span, 0, 2 * span - 1)
    p2c = np.clip(-delta(k[None, :] - q) + span, 0, 2 * span - 1)
    return c2p.astype(np.int32), p2c.astype(np.int32)


class RelProjection(nn.Module):
    """``x W + b`` on the relative embedding table, parameters laid out as ``nn.Dense``'s (``kernel [in, out]``)."""

    cfg: ArchConfig
    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
        return _project(x, kernel, bias, self.cfg)


def _project(x, kernel, bias, cfg: ArchConfig):
    dt = jnp.dtype(cfg.dtype)
    y = jnp.dot(x.astype(dt), kernel.astype(dt))
    return y if bias is None else y + bias.astype(dt)


class DisentangledSelfAttention(nn.Module):
    """Content attention plus the c2p / p2c relative terms; returns the masked context ``[..., Tq, H*d]``."""

    cfg: ArchConfig

    @nn.compact
    def __call__(self, x, queries, query_pos, keep, rel, head_mask, deterministic: bool):
        cfg = self.cfg
        H, d = cfg.num_heads, cfg.head_dim
        v1 = cfg.model_type == "deberta"
        q_dense = _dense(cfg, H * d, "query_proj")
        k_dense = nn.Dense(H * d, name="key_proj", use_bias=not v1, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
                           kernel_init=nn.initializers.normal(0.02))
        q = q_dense(queries).reshape(queries.shape[:-1] + (H, d))
        k = k_dense(x).reshape(x.shape[:-1] + (H, d))
        v = _dense(cfg, H * d, "value_proj")(x).reshape(x.shape[:-1] + (H, d))
        scale = np.sqrt(np.float32(d) * np.float32(1 + len(cfg.pos_att))).astype(np.float32)
        q, k, v = (jnp.swapaxes(a, -3, -2) for a in (q, k, v))  # [..., H, T, d]
        scores = jnp.einsum("...hqd,...hkd->...hqk", q, k).astype(jnp.float32)
        if cfg.rel_attention and cfg.pos_att:
            scores = scores + self._relative(q, k, rel, q_dense, k_dense, query_pos, x.shape[-2], deterministic)
        scores = scores / scale
        # where() rather than an additive mask: a fully masked (padding) query row gets a uniform softmax.
        scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        ctx = attention_context(cfg, scores, v, head_mask, deterministic, self)
        return ctx.reshape(ctx.shape[:-2] + (H * d,))

    def _relative(self, q, k, rel, q_dense, k_dense, query_pos, num_keys: int, deterministic: bool):
        """The c2p and p2c terms ``[..., H, Tq, T]`` (unscaled) from the relative table ``rel [2S', hidden]``."""
        cfg = self.cfg
        H, d = cfg.num_heads, cfg.head_dim
        span = attention_span(cfg, num_keys)
        if cfg.model_type == "deberta":  # v1 keeps 2 * max_relative_positions rows, centred on distance 0
            rel = rel[cfg.max_relative_positions - span:cfg.max_relative_positions + span]
        else:
            rel = rel[:2 * span]
        rel = nn.Dropout(cfg.hidden_dropout)(rel, deterministic=deterministic)
        c2p_idx, p2c_idx = relative_indices(cfg, query_pos, num_keys)
        v1 = cfg.model_type == "deberta"

        def shared(dense):  # share_att_key: the content projection's own parameters (no second Dense call)
            p = dense.variables["params"]
            return _project(rel, p["kernel"], p.get("bias"), cfg)

        total = 0.0
        if "c2p" in cfg.pos_att:
            if cfg.share_att_key:
                pos_k = shared(k_dense)
            else:
                pos_k = RelProjection(cfg, H * d, use_bias=not v1, name="pos_proj" if v1 else "pos_key_proj")(rel)
            pos_k = pos_k.reshape(pos_k.shape[:-1] + (H, d))
            c2p = jnp.einsum("...hqd,shd->...hqs", q, pos_k).astype(jnp.float32)  # [..., H, Tq, 2S]
            idx = jnp.broadcast_to(jnp.asarray(c2p_idx), c2p.shape[:-1] + (num_keys,))
            total = total + jnp.take_along_axis(c2p, idx, axis=-1)
        if "p2c" in cfg.pos_att:
            if cfg.share_att_key:
                pos_q = shared(q_dense)
            else:
                pos_q = RelProjection(cfg, H * d, name="pos_q_proj" if v1 else "pos_query_proj")(rel)
            pos_q = pos_q.reshape(pos_q.shape[:-1] + (H, d))
            p2c = jnp.einsum("...hkd,shd->...hks", k, pos_q).astype(jnp.float32)  # [..., H, T, 2S]
            idx = jnp.broadcast_to(jnp.asarray(p2c_idx.T), p2c.shape[:-1] + (len(c2p_idx),))
            total = total + jnp.swapaxes(jnp.take_along_axis(p2c, idx, axis=-1), -1, -2)
        return total


class DebertaAttention(nn.Module):
    cfg: ArchConfig

    @nn.compact
    def __call__(self, x, queries, query_pos, keep, rel, head_mask, deterministic: bool):
        ctx = DisentangledSelfAttention(self.cfg, name="self")(x, queries, query_pos, keep, rel, head_mask,
                                                                deterministic)
        return BertOutput(self.cfg, name="output")(ctx, queries, deterministic)


class DebertaLayer(nn.Module):
    cfg: ArchConfig

    @nn.compact
    def __call__(self, x, queries, query_pos, keep, rel, head_mask, neuron_mask, deterministic: bool):
        a = DebertaAttention(self.cfg, name="attention")(x, queries, query_pos, keep, rel, head_mask, deterministic)
        h = Intermediate(self.cfg, name="intermediate")(a, neuron_mask)
        return BertOutput(self.cfg, name="output")(h, a, deterministic)


class DebertaEncoder(nn.Module):
    """``layer/{i}`` plus the relative embedding table (``rel_embeddings``, v2 optionally LayerNormed).

    ``first_token_only``: the last layer computes token 0's row alone (keys, values and the p2c
    term still see every token), as in ``encoder.LayerStack``.
    """

    cfg: ArchConfig

    @nn.compact
    def __call__(self, x, attention_mask, masks, deterministic: bool, first_token_only: bool):
        cfg = self.cfg
        rel = None
        if cfg.rel_attention:
            rows = 2 * (cfg.position_buckets or cfg.max_relative_positions)
            rel = _embed(cfg, rows, cfg.hidden_size, "rel_embeddings").embedding
            if cfg.norm_rel_ebd:
                rel = _layer_norm(cfg, "LayerNorm")(rel)
            rel = rel.astype(jnp.dtype(cfg.dtype))
        m = attention_mask.astype(bool)
        T = x.shape[-2]
        layers = _Layers(cfg, name="layer")
        return layers(x, m, rel, masks, deterministic, first_token_only, T)


class _Layers(nn.Module):
    cfg: ArchConfig

    @nn.compact
    def __call__(self, x, m, rel, masks, deterministic: bool, first_token_only: bool, T: int):
        last = self.cfg.num_layers - 1
        for i in range(self.cfg.num_layers):
            head_mask, neuron_mask = layer_masks(masks, i)
            only0 = first_token_only and i == last
            queries = x[..., :1, :] if only0 else x
            query_pos = np.arange(1 if only0 else T)
            # transformers' mask is m_i * m_j: padding query rows attend to nothing (uniform softmax).
            mq = m[..., :1] if only0 else m
            keep = (mq[..., :, None] & m[..., None, :])[..., None, :, :]  # [..., 1, Tq, T]
            x = DebertaLayer(self.cfg, name=str(i))(x, queries, query_pos, keep, rel, head_mask, neuron_mask,
                                                    deterministic)
        return x


class DebertaEmbeddings(nn.Module):
    cfg: ArchConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, attention_mask, deterministic: bool):
        cfg = self.cfg
        e = cfg.embedding_size
        x = word_rows(self, cfg, input_ids, e)
        if cfg.positions == "absolute":  # position_biased_input
            pos = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
            x = x + _embed(cfg, cfg.max_position_embeddings, e, "position_embeddings")(pos)
        if cfg.type_vocab_size > 0:
            x = x + _embed(cfg, cfg.type_vocab_size, e, "token_type_embeddings")(token_type_ids)
        if e != cfg.hidden_size:
            x = nn.Dense(cfg.hidden_size, use_bias=False, name="embed_proj", dtype=jnp.dtype(cfg.dtype),
                         param_dtype=jnp.float32, kernel_init=nn.initializers.normal(0.02))(x)
        x = _layer_norm(cfg, "LayerNorm")(x)
        x = (x * attention_mask[..., None].astype(x.dtype)).astype(jnp.dtype(cfg.dtype))
        return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class DebertaBody(nn.Module):
    """Embeddings and the encoder -> (sequence output, None); the pooler belongs to the head (as in HF)."""

    cfg: ArchConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, masks, deterministic: bool,
                 first_token_only: bool = False):
        x = DebertaEmbeddings(self.cfg, name="embeddings")(input_ids, token_type_ids, attention_mask, deterministic)
        x = DebertaEncoder(self.cfg, name="encoder")(x, attention_mask, masks, deterministic, first_token_only)
        return x, None


class DebertaHead(nn.Module):
    """``classifier(drop(act(pooler.dense(drop(token 0)))))``: transformers' ContextPooler + classifier."""

    cfg: ArchConfig

    @nn.compact
    def __call__(self, seq, pooled, deterministic: bool):
        cfg = self.cfg
        x = nn.Dropout(cfg.pooler_dropout)(seq[..., 0, :], deterministic=deterministic)
        x = activation(cfg.classifier_act)(Pooler(cfg, name="pooler")(x))
        return classify(cfg, x, deterministic)
