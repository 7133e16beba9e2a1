"""fisher_jax: merge fine-tuned transformers in JAX (Fisher mask nodes, RegMean, baselines).

The public API (SPEC §7) is loaded lazily so that ``import fisher_jax`` stays cheap and the CLI's
``--help`` does not pay for JAX start-up.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_API = {
    "FisherJaxError": "fisher_jax.errors",
    "Model": "fisher_jax.models.model",
    "from_pretrained": "fisher_jax.models.hub",
    "load_tokenizer": "fisher_jax.models.hub",
    "ones_masks": "fisher_jax.models.model",
    "MaskFisher": "fisher_jax.stats.fisher",
    "mask_fisher": "fisher_jax.stats.fisher",
    "full_fisher": "fisher_jax.stats.fisher",
    "gram_stats": "fisher_jax.stats.gram",
    "save_stats": "fisher_jax.stats.io",
    "load_stats": "fisher_jax.stats.io",
    "merge": "fisher_jax.merging",
    "tree_map_with_names": "fisher_jax.tree",
    "use_cpu_cores": "fisher_jax.parallel",
}

_SUBMODULES = ("cli", "data", "errors", "experiment", "merging", "models", "parallel", "reference", "stats", "train",
               "tree")

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"fisher_jax.{name}")
    raise AttributeError(f"module 'fisher_jax' has no attribute '{name}'")
