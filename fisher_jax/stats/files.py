"""Statistics files: one ``.safetensors`` file per record, JSON metadata in its header.

A statistics file holds the arrays under flat names, plus JSON metadata in the safetensors header
(``metadata["fisher_jax"]``, a string). numpy and safetensors only — no JAX — so statistics can
be inspected anywhere::

    from safetensors import safe_open
    with safe_open("rte.fisher.safetensors", framework="np") as f:
        meta = json.loads(f.metadata()["fisher_jax"]); head = f.get_tensor("head")

Array names: mask Fisher ``head`` ``[L, H]`` and ``neuron`` ``[L, I]``; full Fisher the body
paths (``body/encoder/layer/0/attention/self/query/kernel``...); Grams the Dense module paths
(``encoder/layer/0/attention/self/query``), each distinct array stored once: query, key and
value share one Gram, and ``meta["aliases"]`` maps ``.../key`` and ``.../value`` to ``.../query``.
Metadata: :mod:`.fingerprints`; Fishers add ``loss`` (``cross_entropy`` | ``mse``; older files:
see :func:`.records.loss_of`) and, for regression's ``expected``/``sampled`` estimators,
``noise_variance`` (the Gaussian likelihood's sigma^2).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .. import tree
from ..errors import FisherJaxError
from .records import KINDS, FullFisher, Grams, MaskFisher, Stats, kind_of

FORMAT = "fisher_jax.stats/1"


def save_stats(path: Union[str, os.PathLike], stats: Stats, *, task: Optional[str] = None,
               split: Optional[str] = None) -> Path:
    """Write ``stats`` to a ``.safetensors`` file (atomically); ``task``/``split`` override the metadata.

    Returns the path written.
    """
    from safetensors.numpy import save_file

    kind = kind_of(stats)
    meta = dict(getattr(stats, "meta", {}) or {})
    meta["kind"] = kind
    if task is not None:
        meta["task"] = task
    if split is not None:
        meta["split"] = split
    meta["num_examples"] = int(getattr(stats, "num_examples", meta.get("num_examples", 0)) or 0)
    if kind == "mask_fisher":
        arrays = {"head": stats.head, "neuron": stats.neuron}
    elif kind == "full_fisher":
        arrays = tree.flatten({"body": stats["body"]})
    else:
        meta["num_tokens"] = int(getattr(stats, "num_tokens", meta.get("num_tokens", 0)) or 0)
        owners: dict[int, str] = {}
        aliases: dict[str, str] = {}
        arrays = {}
        for key, g in stats.items():
            if id(g) in owners:  # q/k/v: one array, stored once
                aliases[key] = owners[id(g)]
            else:
                owners[id(g)] = key
                arrays[key] = g
        meta["aliases"] = aliases
        meta["order"] = list(stats)  # safetensors sorts names; keep the layer order
    arrays = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp), metadata={"format": FORMAT, "kind": kind, "fisher_jax": json.dumps(tree.jsonable(meta))})
    os.replace(tmp, path)
    return path


def read_stats_file(path: Union[str, os.PathLike]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, meta)`` of a statistics file; every failure is a one-line ``FisherJaxError``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FisherJaxError(f"statistics file '{path}' does not exist")
    try:
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError / OSError on bad files
        raise FisherJaxError(f"cannot read statistics file '{path}' (corrupt or not safetensors): {e}") from None
    if "fisher_jax" not in header:
        raise FisherJaxError(f"'{path}' is a safetensors file but not a fisher_jax statistics file (no metadata)")
    try:
        meta = json.loads(header["fisher_jax"])
    except json.JSONDecodeError as e:
        raise FisherJaxError(f"statistics file '{path}' has corrupt metadata: {e}") from None
    if meta.get("kind") not in KINDS:
        raise FisherJaxError(f"statistics file '{path}' has unknown kind {meta.get('kind')!r}")
    return arrays, meta


def load_stats(path: Union[str, os.PathLike]) -> Stats:
    """Read a file written by :func:`save_stats` back into a MaskFisher, FullFisher or Grams."""
    arrays, meta = read_stats_file(path)
    kind = meta["kind"]
    n = int(meta.get("num_examples", 0))
    if kind == "mask_fisher":
        missing = {"head", "neuron"} - set(arrays)
        if missing:
            raise FisherJaxError(f"mask Fisher file '{path}' lacks {sorted(missing)}")
        return MaskFisher(arrays["head"], arrays["neuron"], n, meta)
    if kind == "full_fisher":
        if not arrays or not all(k.startswith("body/") for k in arrays):
            raise FisherJaxError(f"full Fisher file '{path}' holds no body tensors")
        return FullFisher(tree.unflatten(arrays)["body"], n, meta)
    grams = dict(arrays)
    for alias, owner in meta.get("aliases", {}).items():
        if owner not in grams:
            raise FisherJaxError(f"Gram file '{path}': '{alias}' refers to missing '{owner}'")
        grams[alias] = grams[owner]  # the same object, as gram_stats returns it
    order = [k for k in meta.get("order", []) if k in grams]
    grams = {k: grams[k] for k in order + sorted(set(grams) - set(order))}
    return Grams(grams, meta.get("num_tokens", 0), n, meta)


__all__ = ["FORMAT", "load_stats", "read_stats_file", "save_stats"]
