"""RegMean++ (Nguyen, Huu-Tien, Suzuki, Nguyen; TMLR 2025, arXiv 2508.03121).

RegMean (:mod:`fisher_jax.merging.regmean`) solves every Dense layer on Grams of the inputs each
fine-tuned model sees in *its own* network. RegMean++ merges bottom-up instead: the Grams of
layer ``l`` are those of the inputs task ``j``'s data produces in the model whose layers below
``l`` are already merged (embeddings first, then encoder layer 0, 1, ...; the pooler last),
while layer ``l`` itself and everything above are still model ``j``'s own:

    G_j^(l) = X_j^(l)^T X_j^(l) / #rows,   X_j^(l) = inputs of layer l in [merged < l ; model j >= l](data_j)
    W^(l) = (sum_j G~_j^(l))^-1 sum_j G~_j^(l) W_j^(l)        (the RegMean solve, shrinkage alpha)

so each layer's merge accounts for how the merged layers below change its inputs. The solve,
the shrinkage ``alpha``, the float64 null-space fallback and its reporting are RegMean's
(:func:`fisher_jax.merging.regmean.regmean`); non-Dense parameters take the simple mean.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Mapping, Optional, Sequence

from ..errors import FisherJaxError
from ..tree import check_same_structure, flatten, unflatten
from .coefficients import layer_of
from .methods import _mean_leaf
from .regmean import regmean


def stage_of(name: str, num_layers: int) -> int:
    """Merge order of a body leaf: -2 embeddings (plain mean), -1 a Dense inside the embeddings
    (ELECTRA's ``embeddings_project``), ``l`` encoder layer ``l``, ``num_layers`` the pooler and anything after."""
    layer = layer_of(name)
    if layer is not None:
        return layer
    stripped = name[5:] if name.startswith("body/") else name
    if stripped.startswith("embeddings"):
        return -1 if "embeddings_project" in stripped else -2
    return num_layers


def _grams_subset(grams: Any, modules: Iterable[str]) -> Any:
    """The Grams of ``modules`` only, keeping the record's metadata (rows behind each Gram) and shared arrays."""
    from ..stats.io import Grams

    mods = set(modules)
    return Grams({k: v for k, v in grams.items() if k in mods}, getattr(grams, "num_tokens", 0),
                 getattr(grams, "num_examples", 0), getattr(grams, "meta", None))


def regmean_plusplus(
    models: Sequence[Any],
    batches: Sequence[Iterable[Mapping[str, Any]]],
    alpha: float = 1.0,
    dtype: Literal["float32", "float64"] = "float64",
    rtol: Optional[float] = None,
    mask_padding: bool = True,
    diagnostics: Optional[dict] = None,
) -> dict[str, Any]:
    """RegMean++ merge of ``models`` (Models: the network is run), returning the merged body tree.

    ``batches[j]``: model ``j``'s data (a list of batch dicts, e.g. ``fj.data.task_batches``;
    labels are not used), run through the partially merged network once per stage (the
    embeddings' Dense if any, each encoder layer, the pooler) with
    :func:`fisher_jax.stats.gram_stats` (``mask_padding`` as there), collecting only that
    stage's Grams. ``alpha``, ``dtype``,
    ``rtol`` and ``diagnostics`` (per-layer fallback counts in ``diagnostics["regmean"]``,
    warnings in ``diagnostics["warnings"]``) are :func:`~fisher_jax.merging.regmean.regmean`'s.
    """
    from ..stats.gram import gram_stats

    n = len(models)
    if n < 2:
        raise FisherJaxError(f"regmean_plusplus needs at least two models, got {n}")
    if len(batches) != n:
        raise FisherJaxError(f"got {len(batches)} batch lists for {n} models")
    data = []
    for j, b in enumerate(batches):
        if isinstance(b, Mapping):
            raise FisherJaxError(f"batches[{j}] must be a list of batch dicts (model {j}'s data), got one dict")
        rows = list(b)
        if not rows:
            raise FisherJaxError(f"batches[{j}] is empty: RegMean++ runs every model on its own data")
        data.append(rows)
    flats = [flatten(m.params["body"]) for m in models]
    for j in range(1, n):
        check_same_structure(flats[0], flats[j], what=f"model 0 and model {j} bodies")
    names = list(flats[0])
    num_layers = max((layer_of(k) for k in names if layer_of(k) is not None), default=-1) + 1
    stages: dict[int, list[str]] = {}
    for k in names:
        stages.setdefault(stage_of(k, num_layers), []).append(k)
    merged: dict[str, Any] = {}
    report: dict = {}
    for stage in sorted(stages):
        leaves = stages[stage]
        dense = {k.rsplit("/", 1)[0] for k in leaves if k.endswith("/kernel") and len(flats[0][k].shape) == 2}
        if stage == -2 or not dense:
            for k in leaves:
                merged[k] = _mean_leaf(tuple(f[k] for f in flats))
            continue
        grams = []
        for j, m in enumerate(models):
            # Model j with every stage below this one merged: its data reaches this stage as it will in the merge.
            hybrid = {k: merged.get(k, flats[j][k]) for k in names}
            model = m.replace(params={"body": unflatten(hybrid), "head": m.params["head"]})
            g = gram_stats(model, data[j], mask_padding=mask_padding, progress=False, modules=sorted(dense))
            grams.append(_grams_subset(g, dense))
        if not all(grams):
            raise FisherJaxError(f"regmean_plusplus: no Gram captured for the Dense layers of stage {stage} "
                                 f"({sorted(dense)[0]} ...)")
        part = [unflatten({k: f[k] for k in leaves}) for f in flats]
        solved = flatten(regmean(part, grams, alpha=alpha, dtype=dtype, rtol=rtol, diagnostics=report))
        merged.update({k: solved[k] for k in leaves})
    if diagnostics is not None:
        diagnostics.setdefault("regmean", {}).update(report.get("regmean", {}))
        if report.get("warnings"):
            diagnostics.setdefault("warnings", []).extend(report["warnings"])
    return unflatten({k: merged[k] for k in names})


__all__ = ["regmean_plusplus", "stage_of"]
