"""One registry entry per model family: everything fisher_jax knows about it, in one place.

A :class:`Family` holds the HF config -> :class:`~fisher_jax.models.config.ArchConfig` parsing,
the options the models do not implement (one-line errors), the linen body and head (imported
lazily, so this package needs neither flax nor torch), the Flax <-> Hugging Face name mapping
(renames, fused projections, Conv1D layout), the parameter-role layout used by statistics and
merges, the HF class name, and the module names the PyTorch reference hooks. A new family is a new
module here plus its entry in ``REGISTRY``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple, Optional

from ...errors import FisherJaxError
from ..config import SUPPORTED_MODEL_TYPES, ArchConfig


class HFRef(NamedTuple):
    """Where a Flax leaf lives in a Hugging Face state dict.

    ``key``: the HF tensor; ``transpose``: PyTorch ``Linear`` layout ``[out, in]`` (Flax kernels are
    ``[in, out]``); the Flax leaf is slice ``part`` of ``parts`` equal slices of the HF tensor's
    last axis *in Flax layout* (fused projections: GPT-2's ``c_attn`` holds q, k, v). ``groups``:
    that axis reads ``[groups, parts, size]`` (DeBERTa v1's ``in_proj`` interleaves q, k, v per
    head); 0 means one group per attention head (resolved with the model's ``num_heads``).
    """

    key: str
    transpose: bool
    part: int = 0
    parts: int = 1
    groups: int = 1


@dataclasses.dataclass(frozen=True)
class Rename:
    """A Flax module path pattern and its HF module path (``{i}``: the layer index).

    With ``leaf`` set, the rename applies to that Flax leaf only and ``hf`` names the whole HF
    tensor (DeBERTa v1 keeps the query bias as ``attention.self.q_bias``, beside ``in_proj``).
    """

    flax: str
    hf: str
    part: int = 0
    parts: int = 1
    groups: int = 1
    leaf: str = ""

    @staticmethod
    def _rx(pattern: str) -> re.Pattern:
        return re.compile(re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)"))

    def to_hf(self, module: str) -> Optional[str]:
        """The HF module of a Flax module path, or None if this rename does not apply."""
        m = self._rx(self.flax).fullmatch(module)
        return None if m is None else self.hf.replace("{i}", m.groupdict().get("i") or "")

    def to_flax(self, module: str) -> Optional[str]:
        """The Flax module path of an HF module (no prefix), or None if this rename does not apply."""
        m = self._rx(self.hf).fullmatch(module)
        return None if m is None else self.flax.replace("{i}", m.groupdict().get("i") or "")


@dataclasses.dataclass(frozen=True)
class TorchHooks:
    """Module names the PyTorch reference (``fisher_jax.reference.torch``) hooks, relative to the
    base model (``layers``) and to one layer (``attn_out``, ``ffn_out``: the modules whose *inputs*
    are the masked per-head context and FFN activation)."""

    layers: str
    attn_out: str
    ffn_out: str
    token_types: bool = True  # whether the HF forward pass takes token_type_ids
    causal: bool = False  # decoders: the reference builds a causal (and sliding-window) 4-D mask
    plain_mask: bool = False  # the HF forward reads a 0/1 attention mask only (DeBERTa: no additive 4-D mask)


def hf_sizes(config: Any) -> dict[str, int]:
    """The :class:`ArchConfig` sizes every transformers config answers by one name: ``vocab_size``,
    ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``max_position_embeddings``
    (DistilBERT's ``dim``/``n_layers``/``n_heads`` and GPT-2's ``n_embd``/``n_layer``/``n_head``/
    ``n_positions`` through the config's ``attribute_map``)."""
    return dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
                num_heads=config.num_attention_heads, max_position_embeddings=config.max_position_embeddings)


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    hf_class: str  # the *ForSequenceClassification class save_pretrained names
    base_prefix: str  # HF prefix of the body inside the classifier (``bert``, ``transformer``, ``model``)
    arch: Callable[[Any, int, str], ArchConfig]  # (HF config, num_labels, dtype) -> ArchConfig
    modules: Callable[[], tuple[type, type]]  # () -> (Body, Head) linen classes, imported lazily
    layer_prefix: str  # Flax body path of layer i, with {i}: "encoder/layer/{i}"
    layer_roles: tuple[tuple[str, str], ...]  # (module path inside a layer, layout role)
    outer_roles: tuple[tuple[str, str], ...]  # (body module path prefix outside layers, layout role)
    torch: TorchHooks
    embeddings_hf: str  # HF module of the word embeddings (finds body-only checkpoints without prefix)
    renames: tuple[Rename, ...] = ()
    conv1d_body: bool = False  # GPT-2: body kernels stored [in, out] (transformers' Conv1D)
    options: Callable[[Any], list[str]] = lambda config: []  # unsupported options set in a config

    # ----------------------------------------------------------------- checks
    def check_options(self, config: Any) -> None:
        """One-line error naming the first config option the Flax model does not implement."""
        bad = self.options(config)
        if bad:
            raise FisherJaxError(f"{self.model_type}: config option {bad[0]} is not implemented by fisher_jax "
                                 "(the logits would differ from transformers')")

    # ----------------------------------------------------------------- names
    def hf_ref(self, flax_path: str) -> HFRef:
        """``body/encoder/layer/0/attention/self/query/kernel`` -> ``bert.encoder.layer.0.attention.self.query.weight``."""
        scope, rest = flax_path.split("/", 1)
        module, leaf = rest.rsplit("/", 1)
        hf_leaf = "bias" if leaf == "bias" else "weight"
        transpose = leaf == "kernel" and not (self.conv1d_body and scope == "body")
        if scope != "body":
            return HFRef(f"{module.replace('/', '.')}.{hf_leaf}", transpose)
        for r in self.renames:
            if r.leaf and r.leaf != leaf:
                continue
            hf = r.to_hf(module)
            if hf is not None:
                key = f"{self.base_prefix}.{hf}" if r.leaf else f"{self.base_prefix}.{hf}.{hf_leaf}"
                return HFRef(key, transpose, r.part, r.parts, r.groups)
        return HFRef(f"{self.base_prefix}.{module.replace('/', '.')}.{hf_leaf}", transpose)

    def flax_leaf(self, hf_name: str) -> Optional[str]:
        """The body Flax leaf path of an HF tensor (no prefix) renamed leaf by leaf (``...q_bias``), or None."""
        for r in self.renames:
            if r.leaf:
                module = r.to_flax(hf_name)
                if module is not None:
                    return f"{module}/{r.leaf}"
        return None

    def head_interleaved(self, hf_module: str) -> bool:
        """Whether a fused HF projection interleaves its parts per attention head (``groups == 0``)."""
        return any(not r.leaf and r.groups == 0 and r.to_flax(hf_module) is not None for r in self.renames)

    def flax_modules(self, hf_module: str) -> list[str]:
        """Body Flax module paths of a body HF module (no prefix): several for a fused projection."""
        hits = [(r.part, r.to_flax(hf_module)) for r in self.renames if not r.leaf]
        hits = sorted((p, f) for p, f in hits if f is not None)
        return [f for _, f in hits] if hits else [hf_module.replace(".", "/")]

    # ----------------------------------------------------------------- layout
    def role(self, path: str) -> Optional[tuple[Optional[int], str, str]]:
        """``(layer, role, leaf)`` of a body path (no ``body/``) of this family, or None if not its own."""
        module, leaf = path.rsplit("/", 1)
        head, _, tail = self.layer_prefix.partition("{i}")
        m = re.fullmatch(re.escape(head) + r"(\d+)" + re.escape(tail) + r"/(.+)", module)
        if m:
            for pattern, role in self.layer_roles:
                if m.group(2) == pattern:
                    return int(m.group(1)), role, leaf
            return None
        for prefix, role in self.outer_roles:
            if module == prefix or module.startswith(prefix + "/"):
                return None, role, leaf
        return None


def _registry() -> dict[str, Family]:
    from . import bert, deberta, decoder, modernbert

    entries = {f.model_type: f for f in (*bert.FAMILIES, *deberta.FAMILIES, *modernbert.FAMILIES, *decoder.FAMILIES)}
    assert set(entries) == set(SUPPORTED_MODEL_TYPES), "config.SUPPORTED_MODEL_TYPES is out of date"
    return {mt: entries[mt] for mt in SUPPORTED_MODEL_TYPES}


REGISTRY: dict[str, Family] = _registry()


def family(model_type: Optional[str], where: str = "") -> Family:
    """The registry entry of ``model_type``; a one-line error listing the supported ones otherwise."""
    if model_type in REGISTRY:
        return REGISTRY[model_type]
    from ...tree import did_you_mean

    at = f" in '{where}'" if where else ""
    raise FisherJaxError(
        f"unsupported model_type '{model_type}'{at}: fisher_jax supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        f"{did_you_mean(str(model_type), list(REGISTRY))}"
    )


__all__ = ["REGISTRY", "Family", "HFRef", "Rename", "TorchHooks", "family", "hf_sizes"]
