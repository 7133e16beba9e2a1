"""Merging fine-tuned bodies: pure functions over body trees, and ``merge`` over Models (SPEC §3, §7).

The functions in :data:`METHODS` take a list of body trees (``params["body"]``) and return a
merged body tree; they never see task heads and never modify their inputs. :func:`merge` is the
public entry point over :class:`fisher_jax.Model` objects: it validates the models and the
statistics, merges the bodies and gives every model the merged body with its own head.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from ..errors import FisherJaxError
from ..tree import check_same_structure, did_you_mean, flatten, unflatten
from .fisher_nodes import MAPPINGS, MaskFisher, fisher_nodes, node_weights, normalized_node_fishers
from .methods import (
    NORMALIZATIONS,
    dare,
    dare_keep_mask,
    fisher,
    resolve_normalize,
    scale_mix_warning,
    simple,
    task_arithmetic,
    ties,
    weighted_average,
)
from .regmean import regmean

METHODS: dict[str, Callable[..., dict[str, Any]]] = {
    "simple": simple,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "fisher": fisher,
    "fisher_nodes": fisher_nodes,
    "regmean": regmean,
}

# Statistics each method cannot run without: keyword -> what to pass.
_REQUIRED = {
    "task_arithmetic": {"base": "the pre-trained model (or its params) the models were fine-tuned from"},
    "ties": {"base": "the pre-trained model (or its params) the models were fine-tuned from"},
    "dare": {"base": "the pre-trained model (or its params) the models were fine-tuned from"},
    "fisher": {"fishers": "one full Fisher per model (fj.full_fisher)"},
    "fisher_nodes": {"fishers": "one mask Fisher per model (fj.mask_fisher)"},
    "regmean": {"grams": "one Gram set per model (fj.gram_stats)"},
}


def _method(method: str) -> Callable[..., dict[str, Any]]:
    key = str(method).strip().lower().replace("-", "_")
    if key not in METHODS:
        raise FisherJaxError(
            f"unknown merge method '{method}'{did_you_mean(key, METHODS)}; choose from {', '.join(METHODS)}"
        )
    return METHODS[key]


def _body_of(obj: Any, what: str) -> Mapping[str, Any]:
    """The body tree of a Model, a params dict ``{"body": ..., ...}`` or a bare body tree."""
    params = getattr(obj, "params", obj)
    if not isinstance(params, Mapping):
        raise FisherJaxError(f"{what} is a {type(obj).__name__}, not a model, a params dict or a body tree")
    body = params.get("body", params)
    if not isinstance(body, Mapping) or not body:
        raise FisherJaxError(f"{what} has no parameters under 'body'")
    return body


def _check_finite(body: Mapping[str, Any], what: str) -> None:
    for name, leaf in flatten(body).items():
        if not bool(jnp.all(jnp.isfinite(jnp.asarray(leaf)))):
            raise FisherJaxError(f"{what} has NaN/inf values at '{name}'")


def _check_count(stats: Any, keyword: str, n: int) -> list[Any]:
    if isinstance(stats, (Mapping, str)) or not isinstance(stats, Sequence):
        raise FisherJaxError(f"{keyword}= must be a list with one entry per model ({n}), got {type(stats).__name__}")
    if len(stats) != n:
        raise FisherJaxError(f"{keyword}= has {len(stats)} entries for {n} models")
    return list(stats)


def _prepare(name: str, fn: Callable[..., Any], models: Sequence[Any], bodies: list[Mapping[str, Any]], kw: dict,
             report: Optional[dict] = None) -> dict:
    """Validate ``merge``'s keywords for ``fn`` and turn Models/params into the pure function's inputs."""
    kw = dict(kw)
    accepted = [p for p in list(inspect.signature(fn).parameters)[1:] if p != "diagnostics"]
    if name == "fisher_nodes":  # SPEC §7 spells the statistics `fishers=` for every method
        if "fishers" in kw and "mask_fishers" in kw:
            raise FisherJaxError("pass mask Fishers as fishers= or mask_fishers=, not both")
        if "mask_fishers" in kw:
            kw["fishers"] = kw.pop("mask_fishers")
        accepted = ["fishers" if p == "mask_fishers" else p for p in accepted]
    for key in kw:
        if key not in accepted:
            raise FisherJaxError(
                f"merge method '{name}' takes no keyword '{key}'{did_you_mean(key, accepted)}; "
                f"it accepts: {', '.join(accepted) or 'nothing'}"
            )
    for key, what in _REQUIRED.get(name, {}).items():
        if kw.get(key) is None:
            raise FisherJaxError(f"merge method '{name}' needs {key}=: {what}")

    n = len(bodies)
    if "base" in kw:
        base = _body_of(kw["base"], "base")
        check_same_structure(bodies[0], base, what="model 0 and base bodies")
        _check_finite(base, "base")
        kw["base"] = base
    if name == "fisher":
        trees = []
        fishers = _check_count(kw["fishers"], "fishers", n)
        resolve_normalize(kw.get("normalize", False))  # a bad value fails before the Fishers are checked
        mixed = scale_mix_warning(fishers, kw.get("normalize", False))
        if mixed:
            warn(report, mixed)
        for j, f in enumerate(fishers):
            if hasattr(f, "head") and hasattr(f, "neuron"):
                raise FisherJaxError(f"fishers[{j}] is a mask Fisher; use method 'fisher_nodes' (method 'fisher' needs full Fisher trees)")
            tree = _body_of(f, f"fishers[{j}]")
            check_same_structure(bodies[0], tree, what=f"model 0 body and fishers[{j}]")
            for leaf_name, leaf in flatten(tree).items():
                arr = jnp.asarray(leaf)
                if not bool(jnp.all(jnp.isfinite(arr))):
                    raise FisherJaxError(f"fishers[{j}] has NaN/inf values at '{leaf_name}'")
                if bool(jnp.any(arr < 0)):
                    raise FisherJaxError(f"fishers[{j}] has negative values at '{leaf_name}'; a diagonal Fisher is >= 0")
            trees.append(tree)
        kw["fishers"] = trees
    if name == "fisher_nodes":
        mfs = _check_count(kw.pop("fishers"), "fishers", n)
        arch = getattr(models[0], "arch", None)
        for j, mf in enumerate(mfs):
            if not (hasattr(mf, "head") and hasattr(mf, "neuron")):
                raise FisherJaxError(
                    f"fishers[{j}] is a {type(mf).__name__}, not a mask Fisher (.head [L, H], .neuron [L, I]); "
                    f"full Fisher trees go to method 'fisher'"
                )
            if arch is not None:
                want_h = (arch.num_layers, arch.num_heads)
                want_n = (arch.num_layers, arch.intermediate_size)
                if np.shape(mf.head) != want_h or np.shape(mf.neuron) != want_n:
                    raise FisherJaxError(
                        f"fishers[{j}] has head {np.shape(mf.head)} and neuron {np.shape(mf.neuron)}, but the models have "
                        f"head {want_h} and neuron {want_n} (statistics for another model?)"
                    )
        if arch is not None and kw.get("num_heads") is None:
            kw["num_heads"] = arch.num_heads
        resolve_normalize(kw.get("normalize", False))
        mixed = scale_mix_warning(mfs, kw.get("normalize", False))
        if mixed:
            warn(report, mixed)
        kw["mask_fishers"] = mfs
    if name == "regmean":
        kw["grams"] = _check_count(kw["grams"], "grams", n)
    return kw


def warn(report: Optional[dict], message: str) -> None:
    """A merge-time warning: issued with :func:`warnings.warn` and recorded in ``report["warnings"]``."""
    warnings.warn(message, stacklevel=3)
    if report is not None:
        report.setdefault("warnings", []).append(message)


def merge(method: str, models: Sequence[Any], *, report: Optional[dict] = None, **kw: Any) -> list[Any]:
    """Merge the bodies of ``models`` with ``method``; one model per input, each with its own head.

    ``method`` is one of :data:`METHODS`; ``kw`` are the method's keywords (SPEC §7):
    ``base=`` (a Model or params dict) for task_arithmetic/ties/dare, ``fishers=[...]`` for fisher
    (full Fisher trees, ``{"body": tree}`` or the body tree) and fisher_nodes (mask Fishers),
    ``grams=[...]`` for regmean, plus ``lam``, ``mapping``, ``alpha``, ``density``,
    ``drop_rate``, ``seed`` ... as each method's function documents. Every input problem raises a
    one-line :class:`~fisher_jax.errors.FisherJaxError`.
    """
    fn = _method(method)
    name = next(k for k, v in METHODS.items() if v is fn)
    models = list(models)
    if len(models) < 2:
        raise FisherJaxError(f"merging needs at least two models, got {len(models)}")
    bodies = [_body_of(m, f"model {j}") for j, m in enumerate(models)]
    for j in range(1, len(bodies)):
        check_same_structure(bodies[0], bodies[j], what=f"model 0 and model {j} bodies")
    for j, body in enumerate(bodies):
        _check_finite(body, f"model {j}")
    for j, m in enumerate(models):
        if not (hasattr(m, "replace") and isinstance(getattr(m, "params", None), Mapping) and "head" in m.params):
            raise FisherJaxError(
                f"model {j} is a {type(m).__name__}, not a Model with params {{'body', 'head'}}; "
                f"merge plain body trees with fisher_jax.merging.{name}()"
            )
    kwargs = _prepare(name, fn, models, bodies, kw, report)
    if report is not None:
        report.setdefault("method", name)
        report.setdefault("warnings", [])
    if "diagnostics" in inspect.signature(fn).parameters:
        kwargs["diagnostics"] = report.setdefault("diagnostics", {}) if report is not None else None
    merged = fn(bodies, **kwargs)
    if report is not None and kwargs.get("diagnostics") is not None:
        report["warnings"].extend(kwargs["diagnostics"].pop("warnings", []))  # already warned by the method
    out = []
    for m in models:
        # A fresh dict per model (arrays are shared and immutable), so editing one tree cannot leak.
        out.append(m.replace(params={"body": unflatten(flatten(merged)), "head": m.params["head"]}))
    return out


__all__ = [
    "MAPPINGS",
    "METHODS",
    "NORMALIZATIONS",
    "MaskFisher",
    "dare",
    "dare_keep_mask",
    "fisher",
    "fisher_nodes",
    "merge",
    "node_weights",
    "normalized_node_fishers",
    "regmean",
    "resolve_normalize",
    "scale_mix_warning",
    "simple",
    "task_arithmetic",
    "ties",
    "warn",
    "weighted_average",
]
