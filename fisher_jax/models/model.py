"""Model: a linen module, its parameter tree and its Hugging Face config, travelling together.

``Model`` is an immutable record; merges and training return new ones through ``replace``. The
jitted forward pass is cached per architecture (``ArchConfig`` is hashable), and jit itself caches
per input shape, so calling many merged models of one architecture compiles once per shape.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import convert
from .config import ArchConfig
from .encoder import SequenceClassifier


def ones_masks(arch: ArchConfig) -> dict[str, jax.Array]:
    """The all-ones mask collection: ``{"head": [L, H], "neuron": [L, I]}``."""
    return {
        "head": jnp.ones((arch.num_layers, arch.num_heads), jnp.float32),
        "neuron": jnp.ones((arch.num_layers, arch.intermediate_size), jnp.float32),
    }


def variables(params: Any, masks: Optional[dict] = None) -> dict[str, Any]:
    """``{"params": p}`` plus ``"masks"`` when given — the collection is passed like batch_stats."""
    return {"params": params} if masks is None else {"params": params, "masks": masks}


@functools.lru_cache(maxsize=None)
def module_for(arch: ArchConfig) -> SequenceClassifier:
    return SequenceClassifier(arch)


@functools.lru_cache(maxsize=None)
def _jitted_forward(arch: ArchConfig, output: str):
    module = module_for(arch)

    def forward(params, masks, input_ids, attention_mask, token_type_ids):
        return module.apply(variables(params, masks), input_ids, attention_mask, token_type_ids, output=output)

    return jax.jit(forward)


def _inputs(input_ids, attention_mask, token_type_ids) -> tuple[jax.Array, jax.Array, jax.Array]:
    """int32 arrays; no attention mask means every token is real, no token types means segment 0."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    token_type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else jnp.asarray(token_type_ids, jnp.int32)
    return input_ids, attention_mask, token_type_ids


def param_shapes(arch: ArchConfig) -> dict[str, Any]:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without computing an initialisation."""
    ids = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(lambda: module_for(arch).init(jax.random.PRNGKey(0), ids)["params"])


@functools.lru_cache(maxsize=None)
def _jitted_init(arch: ArchConfig):
    # One compiled program: run eagerly, every initialiser and the dummy forward pass compile op by op.
    ids = jnp.zeros((1, 8), jnp.int32)
    return jax.jit(lambda key: module_for(arch).init(key, ids)["params"])


def init_params(arch: ArchConfig, seed: int = 0) -> dict[str, Any]:
    """Freshly initialised parameters (HF-style N(0, 0.02) weights)."""
    params = _jitted_init(arch)(jax.random.PRNGKey(seed))
    return jax.tree_util.tree_map(np.asarray, params)


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A sequence classifier: ``params = {"body": ..., "head": ...}``; ``config`` is the HF config.

    Call it like a Hugging Face model: ``model(input_ids, attention_mask, token_type_ids, masks)``.
    """

    arch: ArchConfig
    params: dict[str, Any]
    config: Any  # transformers.PretrainedConfig
    source: Optional[str] = None  # folder the model came from (tokenizer files live there)
    source_dtype: Optional[str] = None  # float dtype of the checkpoint's weights (float16, bfloat16, ...)

    @property
    def module(self) -> SequenceClassifier:
        return module_for(self.arch)

    def replace(self, **changes: Any) -> "Model":
        return dataclasses.replace(self, **changes)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, masks=None) -> jax.Array:
        return _jitted_forward(self.arch, "logits")(self.params, masks, *_inputs(input_ids, attention_mask, token_type_ids))

    def hidden_states(self, input_ids, attention_mask=None, token_type_ids=None) -> jax.Array:
        """Last hidden states of the body ``[B, T, D]`` (HF's ``last_hidden_state``)."""
        return _jitted_forward(self.arch, "hidden")(self.params, None, *_inputs(input_ids, attention_mask, token_type_ids))

    def apply(self, params, batch: dict, masks=None, deterministic: bool = True, rngs=None) -> jax.Array:
        """Pure forward pass for use inside jit/grad/vmap: logits for a batch dict."""
        return self.module.apply(
            variables(params, masks),
            batch["input_ids"],
            batch.get("attention_mask"),
            batch.get("token_type_ids"),
            deterministic=deterministic,
            rngs=rngs,
        )

    def ones_masks(self) -> dict[str, jax.Array]:
        return ones_masks(self.arch)

    def with_dtype(self, dtype: str) -> "Model":
        """Same parameters (float32), computation in ``dtype`` (e.g. "bfloat16" on GPU/TPU)."""
        return self.replace(arch=dataclasses.replace(self.arch, dtype=dtype))

    def save_pretrained(self, path, tokenizer_from: Optional[str] = None, dtype: str = "float32") -> None:
        """Write a Hugging Face folder; ``dtype``: float32, float16, bfloat16 or "source" (the
        checkpoint's own float dtype, e.g. to give back a bf16 download as bf16)."""
        convert.write_pretrained(self.arch, self.params, self.config, path, source=self.source,
                                 tokenizer_from=tokenizer_from, dtype=convert.export_dtype(dtype, self.source_dtype))

    @property
    def num_labels(self) -> int:
        return self.arch.num_labels

    def __repr__(self) -> str:
        from ..tree import num_params

        return (f"Model({self.arch.model_type}, layers={self.arch.num_layers}, heads={self.arch.num_heads}, "
                f"hidden={self.arch.hidden_size}, labels={self.arch.num_labels}, params={num_params(self.params):,}, "
                f"source={self.source!r})")
