"""Statistics of fine-tuned models: mask Fisher, full Fisher, RegMean Grams, and their files.

Names load lazily so that the records and their files (``records``, ``files``, ``fingerprints``,
``fits``; numpy + safetensors only, re-exported together by ``fisher_jax.stats.io``) can be used
without importing JAX.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_API = {
    "MaskFisher": "fisher_jax.stats.records",
    "FullFisher": "fisher_jax.stats.records",
    "Grams": "fisher_jax.stats.records",
    "save_stats": "fisher_jax.stats.files",
    "load_stats": "fisher_jax.stats.files",
    "check_fits": "fisher_jax.stats.fits",
    "fingerprint": "fisher_jax.stats.fingerprints",
    "mask_fisher": "fisher_jax.stats.fisher",
    "full_fisher": "fisher_jax.stats.fisher",
    "ESTIMATORS": "fisher_jax.stats.records",
    "gram_stats": "fisher_jax.stats.gram",
    "data_mesh": "fisher_jax.parallel",
    "plot_mask_fisher": "fisher_jax.stats.plots",
}

__all__ = sorted(_API)
__getattr__, __dir__ = lazy_exports(__name__, _API)
