"""The built-in merge methods, each registered with the statistics it needs and its validator.

A validator receives ``merge``'s keywords after the generic conversions of
:func:`fisher_jax.merging.registry.prepare` (base as a body tree, statistics as per-model lists)
and returns the pure function's keywords; it raises a one-line ``FisherJaxError`` for bad input.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..errors import FisherJaxError
from ..tree import check_same_structure, flatten
from .adamerging import adamerging
from .fisher_nodes import fisher_nodes
from .mergekit import breadcrumbs, della, model_stock, slerp
from .methods import dare, fisher, resolve_normalize, scale_mix_warning, simple, task_arithmetic, ties
from .regmean import regmean
from .regmean_plusplus import regmean_plusplus
from ..stats.fits import check_mask_fisher_shape
from .registry import BASE, BATCHES, FULL_FISHER, GRAM, MASK_FISHER, Context, MergeMethod, Statistic, body_of, register, warn

_BASE = Statistic("base", BASE, "the pre-trained model (or its params) the models were fine-tuned from")


def _validate_full_fishers(kw: dict, ctx: Context) -> dict:
    """Full Fisher trees shaped like the body, finite and >= 0; warns on mixed losses without normalisation."""
    fishers = kw["fishers"]
    resolve_normalize(kw.get("normalize", False))  # a bad value fails before the Fishers are checked
    mixed = scale_mix_warning(fishers, kw.get("normalize", False))
    if mixed:
        warn(ctx.report, mixed)
    trees = []
    for j, f in enumerate(fishers):
        if hasattr(f, "head") and hasattr(f, "neuron"):
            raise FisherJaxError(f"fishers[{j}] is a mask Fisher; use method 'fisher_nodes' (method 'fisher' needs full Fisher trees)")
        tree = body_of(f, f"fishers[{j}]")
        check_same_structure(ctx.bodies[0], tree, what=f"model 0 body and fishers[{j}]")
        for leaf_name, leaf in flatten(tree).items():
            arr = jnp.asarray(leaf)
            if not bool(jnp.all(jnp.isfinite(arr))):
                raise FisherJaxError(f"fishers[{j}] has NaN/inf values at '{leaf_name}'")
            if bool(jnp.any(arr < 0)):
                raise FisherJaxError(f"fishers[{j}] has negative values at '{leaf_name}'; a diagonal Fisher is >= 0")
        trees.append(tree)
    kw["fishers"] = trees
    return kw


def _validate_mask_fishers(kw: dict, ctx: Context) -> dict:
    """Mask Fishers (``.head [L, H]``, ``.neuron [L, I]``) of the models' architecture; ``num_heads`` from it."""
    mfs = kw["fishers"]
    arch = ctx.arch
    for j, mf in enumerate(mfs):
        if not (hasattr(mf, "head") and hasattr(mf, "neuron")):
            raise FisherJaxError(
                f"fishers[{j}] is a {type(mf).__name__}, not a mask Fisher (.head [L, H], .neuron [L, I]); "
                f"full Fisher trees go to method 'fisher'"
            )
        if arch is not None:
            check_mask_fisher_shape(mf, arch.num_layers, arch.num_heads, arch.intermediate_size, what=f"fishers[{j}]")
    if arch is not None and kw.get("num_heads") is None:
        kw["num_heads"] = arch.num_heads
    resolve_normalize(kw.get("normalize", False))
    mixed = scale_mix_warning(mfs, kw.get("normalize", False))
    if mixed:
        warn(ctx.report, mixed)
    return kw


register(MergeMethod("simple", simple, summary="elementwise mean"))
register(MergeMethod("task_arithmetic", task_arithmetic, (_BASE,), summary="base + lam * sum of task vectors"))
register(MergeMethod("ties", ties, (_BASE,), summary="trim, elect sign, disjoint mean of task vectors"))
register(MergeMethod("dare", dare, (_BASE,), summary="drop and rescale task vectors, then sum or TIES"))
register(MergeMethod(
    "fisher", fisher, (Statistic("fishers", FULL_FISHER, "one full Fisher per model (fj.full_fisher)", noun="full Fishers"),),
    validate=_validate_full_fishers, summary="Fisher-weighted average (diagonal full Fisher)"))
register(MergeMethod(
    "fisher_nodes", fisher_nodes,
    (Statistic("fishers", MASK_FISHER, "one mask Fisher per model (fj.mask_fisher)", param="mask_fishers",
               aliases=("mask_fishers",), noun="mask Fishers"),),
    validate=_validate_mask_fishers, summary="Fisher-weighted average from head/neuron mask Fishers"))
register(MergeMethod(
    "regmean", regmean, (Statistic("grams", GRAM, "one Gram set per model (fj.gram_stats)", noun="Grams"),),
    summary="closed-form regression of every Dense layer's outputs"))
register(MergeMethod("slerp", slerp, summary="spherical interpolation of two models, tensor by tensor (t)",
                     shared=("t",), max_models=2))
register(MergeMethod("model_stock", model_stock, (_BASE,),
                     summary="per tensor, the point between base and average fixed by the task vectors' angle"))
register(MergeMethod("breadcrumbs", breadcrumbs, (_BASE,),
                     summary="task arithmetic on task vectors without their outliers and smallest entries"))
register(MergeMethod("della", della, (_BASE,),
                     summary="magnitude-ranked random drop and rescale, sign election, disjoint mean"))


def _validate_runnable(kw: dict, ctx: Context) -> dict:
    """Methods that run the network need fisher_jax Models (an architecture to build the module from)."""
    from ..models.config import ArchConfig

    for j, m in enumerate(ctx.models):
        if not isinstance(getattr(m, "arch", None), ArchConfig):
            raise FisherJaxError(f"model {j} has no architecture (.arch): method '{ctx.name}' runs the models, "
                                 f"so pass fisher_jax Models (fj.from_pretrained)")
    return kw


register(MergeMethod(
    "regmean_plusplus", regmean_plusplus,
    (Statistic("batches", BATCHES, "one list of batches per model: its task's data (fj.data.task_batches)",
               noun="batches"),),
    validate=_validate_runnable, inputs="models",
    summary="RegMean bottom-up: each layer's Grams through the already-merged layers below it"))
register(MergeMethod(
    "adamerging", adamerging,
    (_BASE, Statistic("batches", BATCHES, "one list of unlabelled batches per model: its task's inputs", noun="batches")),
    validate=_validate_runnable, inputs="models",
    summary="task arithmetic with task- or layer-wise coefficients learnt by entropy minimisation"))
