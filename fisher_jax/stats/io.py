"""Statistics records and their files, in one import (numpy + safetensors only, no JAX).

The pieces live by concern: :mod:`.records` (``MaskFisher``, ``FullFisher``, ``Grams``, losses),
:mod:`.files` (the ``.safetensors`` format: :func:`save_stats`, :func:`load_stats`),
:mod:`.fingerprints` (model fingerprints, record metadata), :mod:`.fits` (:func:`check_fits`) and
:mod:`.checkpoint` (resumable passes). This module re-exports them under their old home.
"""

from __future__ import annotations

from .checkpoint import Checkpointer
from .files import FORMAT, load_stats, read_stats_file, save_stats
from .fingerprints import ARCH_FIELDS, SHAPE_FIELDS, arch_dict, base_meta, fingerprint
from .fits import check_fits, check_mask_fisher_shape
from .records import (ESTIMATORS, KINDS, LOSSES, FullFisher, Grams, MaskFisher, Stats, check_estimator, kind_of,
                      loss_name, loss_of)

__all__ = [
    "ARCH_FIELDS", "Checkpointer", "ESTIMATORS", "FORMAT", "FullFisher", "Grams", "KINDS", "LOSSES", "MaskFisher", "SHAPE_FIELDS",
    "Stats", "arch_dict", "base_meta", "check_estimator", "check_fits", "check_mask_fisher_shape", "fingerprint", "kind_of",
    "load_stats", "loss_name", "loss_of", "read_stats_file", "save_stats",
]
