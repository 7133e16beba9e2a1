"""Whether statistics fit a model: architecture and shapes must match (error), weights should (warning)."""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np

from .. import tree
from ..errors import FisherJaxError
from .fingerprints import SHAPE_FIELDS, arch_dict, fingerprint
from .records import Stats, kind_of


def _describe(a: Mapping[str, Any]) -> str:
    return (f"{a.get('model_type')} with {a.get('num_layers')} layers x {a.get('num_heads')} heads, "
            f"FFN {a.get('intermediate_size')}, hidden {a.get('hidden_size')}")


def check_mask_fisher_shape(mask_fisher: Any, num_layers: int, num_heads: int, intermediate_size: int,
                            what: str = "mask Fisher") -> None:
    """Raise ``FisherJaxError`` unless ``mask_fisher.head`` is ``[L, H]`` and ``.neuron`` is ``[L, I]``.

    ``what`` names the record in the message (``"fishers[1]"``); the one check of a mask Fisher's
    shape against an architecture, for the statistics files and the merges alike.
    """
    want_h, want_n = (int(num_layers), int(num_heads)), (int(num_layers), int(intermediate_size))
    head, neuron = np.shape(mask_fisher.head), np.shape(mask_fisher.neuron)
    if head != want_h or neuron != want_n:
        raise FisherJaxError(
            f"{what} has head {head} and neuron {neuron}, but the model needs head {want_h} and neuron {want_n}: "
            "statistics for another model"
        )


def check_fits(stats: Stats, model: Any) -> None:
    """Raise ``FisherJaxError`` unless ``stats`` fit ``model``'s architecture and shapes.

    Statistics of another architecture (layers, heads, FFN width, hidden size, family) are an
    error. Same shapes but a different weights fingerprint (e.g. the stats were computed on another
    fine-tune, or before a merge) is only a warning: legitimate, but worth knowing.
    """
    kind = kind_of(stats)
    meta = getattr(stats, "meta", {}) or {}
    want = arch_dict(model)
    have = meta.get("arch")
    if have:
        diff = [f for f in SHAPE_FIELDS if f in have and have[f] != want[f]]
        if diff:
            raise FisherJaxError(
                f"{kind} statistics were computed for a {_describe(have)}, but the model is a {_describe(want)} "
                f"(mismatch in {', '.join(diff)})"
            )
    if kind == "mask_fisher":
        check_mask_fisher_shape(stats, want["num_layers"], want["num_heads"], want["intermediate_size"])
    elif kind == "full_fisher":
        try:
            tree.check_same_structure(tree.flatten(stats["body"]), tree.flatten(model.params["body"]),
                                      what="full Fisher and model body")
        except FisherJaxError as e:
            raise FisherJaxError(f"{e}: statistics for another model") from None
    else:
        body = tree.flatten(model.params["body"])
        for key, g in stats.items():
            kernel = body.get(f"{key}/kernel")
            if kernel is None:
                raise FisherJaxError(f"Gram '{key}' names no Dense layer of this model's body"
                                     f"{tree.did_you_mean(key + '/kernel', body)}")
            d = int(np.shape(kernel)[0])
            if np.shape(g) != (d, d):
                raise FisherJaxError(f"Gram '{key}' has shape {tuple(np.shape(g))} but the layer's input is {d}-dim: "
                                     "statistics for another model")
    fp = meta.get("fingerprint")
    if fp:
        mine = fingerprint(model)
        if fp != mine:
            warnings.warn(
                f"{kind} statistics were computed on different weights (fingerprint {fp}, model {mine}); "
                "fine if they belong to this model before a merge or fine-tune",
                stacklevel=2,
            )


__all__ = ["check_fits", "check_mask_fisher_shape"]
