"""PyTorch reference implementation (the optional ``[torch]`` extra) and JAX-vs-PyTorch comparisons.

Importing this package never imports torch: :mod:`fisher_jax.reference.torch` (the reference
pipeline on transformers models) is loaded on first use of one of its names, and raises a
:class:`~fisher_jax.errors.FisherJaxError` telling to ``pip install 'fisher-jax[torch]'`` when torch
is missing. :mod:`fisher_jax.reference.compare` runs both pipelines side by side.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from ..errors import FisherJaxError

_TORCH_NAMES = (
    "MaskHooks", "body_parameters", "fisher_nodes_merge", "full_fisher", "geometry", "gram_stats", "load_model",
    "mask_fisher", "node_weight", "predict", "regmean_merge", "simple_merge", "state_dict_numpy", "with_state_dict",
)

__all__ = ["FisherJaxError", "require_torch", "torch_available", *_TORCH_NAMES]


def torch_available() -> bool:
    """True when torch can be imported (without importing it)."""
    return importlib.util.find_spec("torch") is not None


def require_torch() -> Any:
    """The :mod:`fisher_jax.reference.torch` module; a one-line FisherJaxError when torch is missing."""
    if not torch_available():
        raise FisherJaxError(
            "the PyTorch reference needs torch, which is not installed: pip install 'fisher-jax[torch]'"
        )
    return importlib.import_module("fisher_jax.reference.torch")


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        return getattr(require_torch(), name)
    raise AttributeError(f"module 'fisher_jax.reference' has no attribute '{name}'")
