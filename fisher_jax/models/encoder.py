"""Linen modules for BERT, RoBERTa, XLM-RoBERTa, ELECTRA (discriminator) and DistilBERT sequence classifiers.

Module names mirror Hugging Face's so the weight mapping is mechanical (see ARCHITECTURE.md).
The mask-node collection ``masks`` (``head [L, H]``, ``neuron [L, I]``) is read only when it is
passed, so the unmasked forward pass has no extra multiplies and equals the HF model exactly.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import ArchConfig

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        from ..errors import FisherJaxError

        raise FisherJaxError(f"unsupported hidden_act '{name}' (supported: {', '.join(_ACTIVATIONS)})") from None


def _dense(cfg: ArchConfig, features: int, name: str, bias: bool = True) -> nn.Dense:
    # HF initialises Linear weights N(0, 0.02); match it so fresh heads behave like HF's.
    return nn.Dense(
        features,
        name=name,
        use_bias=bias,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(0.02),
    )


def _layer_norm(cfg: ArchConfig, name: str) -> nn.LayerNorm:
    # LayerNorm statistics in float32 even under bfloat16 compute.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name=name, dtype=jnp.float32, param_dtype=jnp.float32)


def _embed(cfg: ArchConfig, num: int, features: int, name: str) -> nn.Embed:
    return nn.Embed(num, features, name=name, param_dtype=jnp.float32, embedding_init=nn.initializers.normal(0.02))


def layer_masks(masks: Optional[dict], i: int) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
    """Layer ``i``'s ``(head [H], neuron [I])`` mask rows; ``(None, None)`` without a ``masks`` collection."""
    if masks is None:
        return None, None
    return masks["head"][i], masks["neuron"][i]


def mask_units(h: jax.Array, neuron_mask: Optional[jax.Array]) -> jax.Array:
    """``h * m`` per FFN unit (SPEC §1: after the nonlinearity, before the output projection)."""
    return h if neuron_mask is None else h * neuron_mask.astype(h.dtype)


def classify(cfg: ArchConfig, x: jax.Array, deterministic: bool) -> jax.Array:
    """``classifier(dropout(x))`` with ``classifier_dropout``: the last step of the encoder heads.

    Called inside a head's compact ``__call__``: the dropout and the ``classifier`` Dense are its submodules.
    """
    x = nn.Dropout(cfg.classifier_dropout)(x, deterministic=deterministic)
    return _dense(cfg, cfg.num_labels, "classifier")(x)


def word_rows(module: nn.Module, cfg: ArchConfig, input_ids, features: int):
    """The looked-up word-embedding rows, every family's ``word_embeddings`` table, marked with
    ``perturb`` (a no-op unless a "perturbations" collection is passed): the full Fisher
    differentiates these rows instead of the whole table (stats/fisher.py)."""
    x = _embed(cfg, cfg.vocab_size, features, "word_embeddings")(input_ids)
    return module.perturb("word_rows", x)


class Embeddings(nn.Module):
    cfg: ArchConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        cfg = self.cfg
        e = cfg.embedding_size
        x = word_rows(self, cfg, input_ids, e)
        if cfg.positions == "padding_offset":
            # RoBERTa counts positions from pad_token_id + 1 and gives padding the padding position.
            not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            position_ids = jnp.cumsum(not_pad, axis=-1) * not_pad + cfg.pad_token_id
        else:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        x = x + _embed(cfg, cfg.max_position_embeddings, e, "position_embeddings")(position_ids)
        if cfg.type_vocab_size > 0:
            x = x + _embed(cfg, cfg.type_vocab_size, e, "token_type_embeddings")(token_type_ids)
        x = _layer_norm(cfg, "LayerNorm")(x)
        return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
    """Multi-head self-attention over Dense layers named ``names`` (q, k, v[, output projection])."""

    cfg: ArchConfig
    names: tuple[str, ...]

    @nn.compact
    def __call__(self, x, queries, bias, head_mask: Optional[jax.Array], deterministic: bool):
        """``queries``: the rows that ask (``x`` itself, or a slice of it); keys and values come from all of ``x``."""
        cfg = self.cfg
        heads = (cfg.num_heads, cfg.head_dim)
        q = _dense(cfg, cfg.hidden_size, self.names[0])(queries).reshape(queries.shape[:-1] + heads)
        k, v = (_dense(cfg, cfg.hidden_size, n)(x).reshape(x.shape[:-1] + heads) for n in self.names[1:3])
        ctx = _attend(cfg, q, k, v, bias, head_mask, deterministic, self).reshape(queries.shape[:-1] + (cfg.hidden_size,))
        if len(self.names) == 4:  # DistilBERT keeps its output projection beside q/k/v
            ctx = _dense(cfg, cfg.hidden_size, self.names[3])(ctx)
        return ctx


class BertAttention(nn.Module):
    cfg: ArchConfig

    @nn.compact
    def __call__(self, x, queries, bias, head_mask, deterministic: bool):
        ctx = SelfAttention(self.cfg, ("query", "key", "value"), name="self")(x, queries, bias, head_mask, deterministic)
        return BertOutput(self.cfg, name="output")(ctx, queries, deterministic)


class BertOutput(nn.Module):
    """Dense -> dropout -> residual -> LayerNorm (used after attention and after the FFN)."""

    cfg: ArchConfig

    @nn.compact
    def __call__(self, h, residual, deterministic: bool):
        h = _dense(self.cfg, self.cfg.hidden_size, "dense")(h)
        h = nn.Dropout(self.cfg.hidden_dropout)(h, deterministic=deterministic)
        return _layer_norm(self.cfg, "LayerNorm")(h + residual)


class Intermediate(nn.Module):
    cfg: ArchConfig

    @nn.compact
    def __call__(self, x, neuron_mask):
        return mask_units(activation(self.cfg.hidden_act)(_dense(self.cfg, self.cfg.intermediate_size, "dense")(x)),
                          neuron_mask)


class BertLayer(nn.Module):
    cfg: ArchConfig

    @nn.compact
    def __call__(self, x, queries, bias, head_mask, neuron_mask, deterministic: bool):
        a = BertAttention(self.cfg, name="attention")(x, queries, bias, head_mask, deterministic)
        h = Intermediate(self.cfg, name="intermediate")(a, neuron_mask)
        return BertOutput(self.cfg, name="output")(h, a, deterministic)


class DistilLayer(nn.Module):
    cfg: ArchConfig

    @nn.compact
    def __call__(self, x, queries, bias, head_mask, neuron_mask, deterministic: bool):
        cfg = self.cfg
        ctx = SelfAttention(cfg, ("q_lin", "k_lin", "v_lin", "out_lin"), name="attention")(
            x, queries, bias, head_mask, deterministic)
        a = _layer_norm(cfg, "sa_layer_norm")(ctx + queries)
        h = PlainFFN(cfg, name="ffn")(a, neuron_mask, deterministic)
        return _layer_norm(cfg, "output_layer_norm")(h + a)


class PlainFFN(nn.Module):
    """``drop(out(mask * act(in(x))))``: DistilBERT's ``lin1/lin2`` and GPT-2's ``c_fc/c_proj``."""

    cfg: ArchConfig
    in_name: str = "lin1"
    out_name: str = "lin2"

    @nn.compact
    def __call__(self, x, neuron_mask, deterministic: bool):
        cfg = self.cfg
        h = mask_units(activation(cfg.hidden_act)(_dense(cfg, cfg.intermediate_size, self.in_name)(x)), neuron_mask)
        h = _dense(cfg, cfg.hidden_size, self.out_name)(h)
        return nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)


def _attend(cfg: ArchConfig, q, k, v, bias, head_mask, deterministic: bool, module: nn.Module):
    """softmax(QK^T / sqrt(d)) V per head, then the head mask (SPEC §1: after softmax and dropout).

    ``q, k, v``: ``[..., T, H, D]`` (any leading axes, none for one example); returns the same shape.
    """
    # Heads are moved in front of the sequence axis before both products: with the einsums written
    # on [B, T, H, D] directly, XLA's CPU backend picks a transposed layout for probs @ V and fuses
    # the softmax into that product, which made the forward pass slower (benchmarks/RESULTS.md:
    # Measurements behind the speed rules). Same numbers either way.
    q, k, v = (jnp.swapaxes(a, -3, -2) for a in (q, k, v))
    scores = jnp.einsum("...hqd,...hkd->...hqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(cfg.head_dim))
    # where() rather than an additive mask: a fully padded row gives a uniform softmax, not NaN.
    scores = jnp.where(bias, scores, jnp.finfo(jnp.float32).min)
    return attention_context(cfg, scores, v, head_mask, deterministic, module)


def attention_context(cfg: ArchConfig, scores, v, head_mask, deterministic: bool, module: nn.Module):
    """``[..., Tq, H, D]`` context from masked float32 ``scores [..., H, Tq, T]`` and ``v [..., H, T, D]``:
    softmax, attention dropout, ``probs @ v``, then the head mask (SPEC §1: on each head's context)."""
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if not deterministic and cfg.attention_dropout > 0:
        keep = 1.0 - cfg.attention_dropout
        mask = jax.random.bernoulli(module.make_rng("dropout"), keep, probs.shape)
        probs = jnp.where(mask, probs / keep, 0).astype(v.dtype)
    ctx = jnp.einsum("...hqk,...hkd->...hqd", probs, v)
    if head_mask is not None:
        ctx = ctx * head_mask[:, None, None].astype(ctx.dtype)
    return jnp.swapaxes(ctx, -3, -2)


class LayerStack(nn.Module):
    """Layers named "0".."L-1" (HF's ``layer.{i}``); row ``i`` of each mask goes to layer ``i``.

    ``first_token_only``: the last layer computes its output for token 0 alone (keys and values
    still see every token). Every classification head reads only token 0, so the logits, and every
    gradient of them, are unchanged, while the last layer's queries, attention output and FFN shrink
    from T rows to one — about 1/L of the work of a forward or backward pass.
    """

    cfg: ArchConfig

    @nn.compact
    def __call__(self, x, bias, masks, deterministic: bool, first_token_only: bool = False):
        layer_cls = DistilLayer if self.cfg.head_kind == "distil" else BertLayer
        last = self.cfg.num_layers - 1
        for i in range(self.cfg.num_layers):
            head_mask, neuron_mask = layer_masks(masks, i)
            queries = x[..., :1, :] if first_token_only and i == last else x
            x = layer_cls(self.cfg, name=str(i))(x, queries, bias, head_mask, neuron_mask, deterministic)
        return x


class _Container(nn.Module):
    """A named level with one child, so paths read ``encoder/layer/{i}`` as in HF."""

    cfg: ArchConfig

    @nn.compact
    def __call__(self, x, bias, masks, deterministic: bool, first_token_only: bool = False):
        return LayerStack(self.cfg, name="layer")(x, bias, masks, deterministic, first_token_only)


class Body(nn.Module):
    """The shared encoder: what merges average. Returns (sequence output, BERT pooler or None).

    With ``first_token_only`` the sequence output is ``[B, 1, hidden]``: token 0 only (see ``LayerStack``).
    """

    cfg: ArchConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, masks, deterministic: bool,
                 first_token_only: bool = False):
        cfg = self.cfg
        x = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids, deterministic)
        if cfg.embedding_size != cfg.hidden_size:  # ELECTRA's small-embedding projection
            x = _dense(cfg, cfg.hidden_size, "embeddings_project")(x)
        bias = attention_mask[..., None, None, :].astype(bool)
        name = "transformer" if cfg.head_kind == "distil" else "encoder"
        x = _Container(cfg, name=name)(x, bias, masks, deterministic, first_token_only)
        pooled = None
        if cfg.head_kind == "pooler":
            pooled = jnp.tanh(Pooler(cfg, name="pooler")(x[..., 0, :]))
        return x, pooled


class Head(nn.Module):
    """The task head of each family's *ForSequenceClassification (never merged)."""

    cfg: ArchConfig

    @nn.compact
    def __call__(self, seq, pooled, deterministic: bool):
        cfg = self.cfg
        if cfg.head_kind == "pooler":
            return classify(cfg, pooled, deterministic)
        x = seq[..., 0, :]
        if cfg.head_kind == "distil":
            return classify(cfg, jax.nn.relu(_dense(cfg, cfg.hidden_size, "pre_classifier")(x)), deterministic)
        return _ClassificationHead(cfg, name="classifier")(x, deterministic)


class _ClassificationHead(nn.Module):
    """RoBERTa (tanh) and ELECTRA (exact GELU) heads: dropout, dense, act, dropout, out_proj."""

    cfg: ArchConfig

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.cfg
        drop = nn.Dropout(cfg.classifier_dropout)
        x = _dense(cfg, cfg.hidden_size, "dense")(drop(x, deterministic=deterministic))
        x = jnp.tanh(x) if cfg.head_kind == "roberta" else activation("gelu")(x)
        return _dense(cfg, cfg.num_labels, "out_proj")(drop(x, deterministic=deterministic))


class SequenceClassifier(nn.Module):
    """``{"params": {"body", "head"}, "masks"?: {"head", "neuron"}}`` -> logits ``[B, num_labels]``.

    Inputs ``[B, T]``, or ``[T]`` for one example (logits ``[num_labels]``): the per-example
    Fisher vmaps the model over unbatched rows (see ``stats/fisher.py``).

    ``output="hidden"`` returns the body's last hidden states instead (no head parameters needed).
    """

    cfg: ArchConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True,
                 output: str = "logits"):
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        masks = None
        if self.has_variable("masks", "head"):
            masks = {"head": self.get_variable("masks", "head"), "neuron": self.get_variable("masks", "neuron")}
        from .families import family

        body_cls, head_cls = family(self.cfg.model_type).modules()
        # The heads read one token (token 0; decoders the last real one), so the logits need the
        # last layer's output for that token alone.
        seq, pooled = body_cls(self.cfg, name="body")(input_ids, attention_mask, token_type_ids, masks, deterministic,
                                                      first_token_only=output == "logits")
        if output == "hidden":
            return seq
        return head_cls(self.cfg, name="head")(seq, pooled, deterministic)


class Pooler(nn.Module):
    """``dense(x)`` to ``hidden_size``: BERT's pooler before its tanh, DeBERTa's ContextPooler before its act."""

    cfg: ArchConfig

    @nn.compact
    def __call__(self, x):
        return _dense(self.cfg, self.cfg.hidden_size, "dense")(x)
