"""Merging fine-tuned bodies: pure functions over body trees, and ``merge`` over Models (SPEC §3, §7).

The functions in :data:`METHODS` take a list of body trees (``params["body"]``) and return a
merged body tree; they never see task heads and never modify their inputs (RegMean++, which runs
the network, takes the Models). Each is registered in :mod:`.catalog` with the statistics it
needs and its validator (:class:`~fisher_jax.merging.registry.MergeMethod`). :func:`merge` is
the public entry point over :class:`fisher_jax.Model` objects: it validates the models and the
statistics, merges the bodies and gives every model the merged body with its own head.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional, Sequence

from ..errors import FisherJaxError
from ..tree import check_same_structure, flatten, unflatten
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
from .regmean_plusplus import regmean_plusplus
from .adamerging import adamerging
from .mergekit import breadcrumbs, breadcrumbs_mask, della, della_keep_mask, della_keep_probabilities, model_stock, slerp
from . import catalog as _catalog  # noqa: F401  (registers the built-in methods)
from .registry import REGISTRY, MergeMethod, Statistic, body_of, check_finite, lookup, prepare, register, spec_for, warn

# name -> pure function; the experiment config reads keywords from these signatures. Each
# method's statistics and validator are declared where it is registered (catalog.py).
METHODS: dict[str, Callable[..., dict[str, Any]]] = {name: spec.fn for name, spec in REGISTRY.items()}


def merge(method: str, models: Sequence[Any], *, report: Optional[dict] = None, **kw: Any) -> list[Any]:
    """Merge the bodies of ``models`` with ``method``; one model per input, each with its own head.

    ``method`` is one of :data:`METHODS`; ``kw`` are the method's keywords (SPEC §7): the
    statistics its registration declares (``REGISTRY[method].statistics``): ``base=`` (a Model or
    params dict) for task_arithmetic/ties/dare/model_stock/breadcrumbs/della, ``fishers=[...]``
    for fisher (full Fisher trees, ``{"body": tree}`` or the body tree) and fisher_nodes (mask
    Fishers), ``grams=[...]`` for regmean, ``batches=[...]`` (each model's data) for
    regmean_plusplus; plus ``lam``, ``t``, ``mapping``, ``alpha``, ``density``, ``drop_rate``,
    ``seed`` ... as each method's function documents (coefficients per model, per layer or per
    parameter name: :mod:`fisher_jax.merging.coefficients`). Every input problem raises a
    one-line :class:`~fisher_jax.errors.FisherJaxError`.
    """
    name, fn = lookup(method, METHODS)
    spec = spec_for(name, fn)
    models = list(models)
    if len(models) < 2:
        raise FisherJaxError(f"merging needs at least two models, got {len(models)}")
    if not spec.accepts(len(models)):
        raise FisherJaxError(f"method '{name}' merges at most {spec.max_models} models, got {len(models)}")
    bodies = [body_of(m, f"model {j}") for j, m in enumerate(models)]
    for j in range(1, len(bodies)):
        check_same_structure(bodies[0], bodies[j], what=f"model 0 and model {j} bodies")
    for j, body in enumerate(bodies):
        check_finite(body, f"model {j}")
    for j, m in enumerate(models):
        if not (hasattr(m, "replace") and isinstance(getattr(m, "params", None), Mapping) and "head" in m.params):
            raise FisherJaxError(
                f"model {j} is a {type(m).__name__}, not a Model with params {{'body', 'head'}}; "
                f"merge plain body trees with fisher_jax.merging.{name}()"
            )
    kwargs = prepare(spec, models, bodies, kw, report)
    if report is not None:
        report.setdefault("method", name)
        report.setdefault("warnings", [])
    if "diagnostics" in inspect.signature(fn).parameters:
        kwargs["diagnostics"] = report.setdefault("diagnostics", {}) if report is not None else None
    merged = fn(models if spec.inputs == "models" else bodies, **kwargs)
    if report is not None and kwargs.get("diagnostics") is not None:
        report["warnings"].extend(kwargs["diagnostics"].pop("warnings", []))  # already warned by the method
    out = []
    for m in models:
        # A fresh dict per model (arrays are shared and immutable), so editing one tree cannot leak.
        out.append(m.replace(params={"body": unflatten(flatten(merged)), "head": m.params["head"]}))
    return out


__all__ = [
    "MAPPINGS",
    "adamerging",
    "breadcrumbs",
    "breadcrumbs_mask",
    "della",
    "della_keep_mask",
    "della_keep_probabilities",
    "model_stock",
    "slerp",
    "METHODS",
    "REGISTRY",
    "MergeMethod",
    "Statistic",
    "NORMALIZATIONS",
    "MaskFisher",
    "dare",
    "dare_keep_mask",
    "fisher",
    "fisher_nodes",
    "merge",
    "node_weights",
    "normalized_node_fishers",
    "register",
    "regmean",
    "regmean_plusplus",
    "resolve_normalize",
    "scale_mix_warning",
    "simple",
    "task_arithmetic",
    "ties",
    "warn",
    "weighted_average",
]
