"""Fingerprints of a model's architecture and weights, and the metadata every statistics record starts from.

numpy only (no JAX). Metadata (all kinds): ``kind`` (mask_fisher | full_fisher | gram),
``estimator``, ``num_examples``, ``task``, ``split``, ``fingerprint`` (see :func:`fingerprint`),
``arch`` (the shape-defining architecture fields), ``library_version``, ``created`` (UTC, ISO 8601).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any, Optional

import numpy as np

from .. import tree

# Architecture fields whose mismatch makes statistics meaningless for a model (an error).
SHAPE_FIELDS = ("model_type", "num_layers", "num_heads", "intermediate_size", "hidden_size", "embedding_size")
# Fields recorded (and hashed into the fingerprint) besides the shape fields.
ARCH_FIELDS = SHAPE_FIELDS + ("vocab_size", "max_position_embeddings", "type_vocab_size", "hidden_act", "num_labels")


# Fields of the newer families, recorded only where they differ from the encoders' defaults, so
# the fingerprints of the first four families (and their cached statistics) stay as they were.
EXTRA_ARCH_FIELDS = {"num_kv_heads": 0, "attn_head_dim": 0, "layer_windows": (), "pooling": "cls"}


def arch_dict(arch: Any) -> dict[str, Any]:
    """The recorded architecture fields of an ``ArchConfig`` (or a model)."""
    arch = getattr(arch, "arch", arch)
    out = {f: getattr(arch, f) for f in ARCH_FIELDS}
    for f, default in EXTRA_ARCH_FIELDS.items():
        value = getattr(arch, f, default)
        if value != default:
            out[f] = list(value) if isinstance(value, tuple) else value
    return out


def _sample(x: Any, n: int = 4096) -> bytes:
    a = np.asarray(x, dtype=np.float32).ravel()
    step = max(1, a.size // n)
    return np.ascontiguousarray(a[::step][:n]).tobytes()


def fingerprint(model: Any) -> str:
    """``"<arch>-<weights>"``: sha256 of the architecture fields + of a strided sample of a few tensors.

    Cheap (a few thousand numbers), stable across save/load, and different for any fine-tune or
    merge in practice: it samples the word embeddings, the first and last layer's query kernel and
    FFN output kernel, and the task head.
    """
    arch_hash = hashlib.sha256(json.dumps(arch_dict(model), sort_keys=True).encode()).hexdigest()
    flat = tree.flatten(model.params)
    names = sorted(flat)
    body = [n for n in names if n.startswith("body/")]
    layer_keys = [n for n in body if n.endswith(("query/kernel", "q_lin/kernel", "output/dense/kernel", "lin2/kernel",
                                                 "q_proj/kernel", "down_proj/kernel", "mlp/c_proj/kernel", "mlp/Wo/kernel"))]
    picks = [n for n in body if n.endswith("word_embeddings/embedding")]
    picks += layer_keys[:2] + layer_keys[-2:]
    picks += [n for n in names if n.startswith("head/") and n.endswith("kernel")][-1:]
    h = hashlib.sha256()
    for n in dict.fromkeys(picks):
        h.update(n.encode())
        h.update(_sample(flat[n]))
    return f"{arch_hash[:12]}-{h.hexdigest()[:16]}"


def base_meta(kind: str, model: Any, estimator: Optional[str] = None, **extra: Any) -> dict[str, Any]:
    """Metadata every statistics record starts from."""
    from .. import __version__

    meta = {
        "kind": kind,
        "estimator": estimator,
        "task": None,
        "split": None,
        "fingerprint": fingerprint(model),
        "arch": arch_dict(model),
        "library_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(extra)
    return meta


__all__ = ["ARCH_FIELDS", "SHAPE_FIELDS", "arch_dict", "base_meta", "fingerprint"]
