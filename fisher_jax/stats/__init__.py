"""Statistics of fine-tuned models: mask Fisher, full Fisher, RegMean Grams, and their files.

Names load lazily so that ``fisher_jax.stats.io`` (numpy + safetensors only) can be used
without importing JAX.
"""

from __future__ import annotations

import importlib

_API = {
    "MaskFisher": "fisher_jax.stats.io",
    "FullFisher": "fisher_jax.stats.io",
    "Grams": "fisher_jax.stats.io",
    "save_stats": "fisher_jax.stats.io",
    "load_stats": "fisher_jax.stats.io",
    "check_fits": "fisher_jax.stats.io",
    "fingerprint": "fisher_jax.stats.io",
    "mask_fisher": "fisher_jax.stats.fisher",
    "full_fisher": "fisher_jax.stats.fisher",
    "ESTIMATORS": "fisher_jax.stats.fisher",
    "gram_stats": "fisher_jax.stats.gram",
    "data_mesh": "fisher_jax.parallel",
    "plot_mask_fisher": "fisher_jax.stats.plots",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fisher_jax.stats' has no attribute '{name}'")


def __dir__():
    return __all__
