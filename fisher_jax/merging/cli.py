"""`fisher-jax merge`: merge model folders with one method and write one HF folder per input model
(merged body + that model's own head) plus ``merge_report.json``; or run a whole merge recipe
(``--config recipe.yaml``, :mod:`fisher_jax.merging.recipe`).

Several JAX processes (:mod:`fisher_jax.distributed`) compute a recipe's statistics together and
each merges (the same numbers); only process 0 writes the statistics files, the model folders and
the report."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ..distributed import barrier, is_main_process
from ..errors import FisherJaxError

# Options that take one value or one per model (and, in a recipe, layer gradients and filters).
_COEFFICIENTS = {
    "lam": "task_arithmetic/ties/dare/breadcrumbs/della: scale of each task vector; fisher/fisher_nodes: "
           "weight of each model (one value, or one per model)",
    "density": "ties/dare (combine=ties)/breadcrumbs/della: share of each task vector kept (one value, or one per model)",
    "drop_rate": "dare: probability of dropping a task-vector entry (one value, or one per model)",
    "epsilon": "della: keep probabilities range over density +/- epsilon by magnitude rank",
}
_NUMERIC = {
    "t": "slerp: interpolation point, 0 = the first model, 1 = the second (one value for all tensors)",
    "alpha": "regmean/regmean_plusplus: off-diagonal Gram shrinkage (1: none)",
    "floor": "fisher/fisher_nodes: added to every Fisher entry (relative to each model's scale when normalised)",
    "gamma": "fisher/fisher_nodes: weights F**gamma (default 1); breadcrumbs: share of largest entries dropped",
}


def add_merge_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ..cli import add_list, add_no_progress, add_out_dir
    from . import METHODS, NORMALIZATIONS
    from .recipe import DTYPES

    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a merge recipe (YAML: merge_method, base_model, models, parameters, statistics, dtype, "
                             "out_dir); replaces --method/--models/--stats/--base and the method options")
    parser.add_argument("--method", default=None, choices=sorted(METHODS), help="merge method (without --config)")
    add_list(parser, "--models", metavar="DIR", default=None, help="fine-tuned model folders (space- or comma-separated)")
    add_list(parser, "--stats", metavar="FILE", default=None,
             help="one statistics file per model (from `fisher-jax fisher` / `fisher-jax gram`)")
    parser.add_argument("--base", default=None, metavar="DIR",
                        help="pre-trained model folder (task_arithmetic, ties, dare, model_stock, breadcrumbs, della)")
    add_out_dir(parser, "output folder: one model folder per input model and merge_report.json "
                        "(with --config: overrides the recipe's out_dir)", old=("--out",))
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="dtype of the written models (default float32)")
    parser.add_argument("--mapping", choices=("reference", "node"), default=None, help="fisher_nodes mapping")
    parser.add_argument("--normalize", nargs="?", const="layer", default=None, choices=(*NORMALIZATIONS, "legacy_l2"),
                        help="fisher/fisher_nodes: put each model's Fisher on one scale first: unit mean per layer "
                             "('layer', the default of a bare --normalize), per model ('mean'), unit L2 per model "
                             "('l2'); 'legacy_l2' is the old global L2 with an absolute floor; default: none (released)")
    parser.add_argument("--combine", choices=("task_arithmetic", "ties"), default=None, help="dare: combine with")
    parser.add_argument("--scope", choices=("global", "tensor"), default=None,
                        help="ties/dare: rank task-vector entries over the whole body (global) or per tensor")
    parser.add_argument("--seed", type=int, default=None, help="dare/della: random seed of the drop masks")
    for name, help_text in _COEFFICIENTS.items():
        add_list(parser, f"--{name.replace('_', '-')}", item_type=float, default=None, metavar="X", help=help_text)
    for name, help_text in _NUMERIC.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=None, metavar="X", help=help_text)
    add_no_progress(parser)
    return parser


def _load_models(paths: Sequence[str]) -> list[Any]:
    from ..models.hub import from_pretrained

    return [from_pretrained(d) for d in paths]


def _load_base(path: str) -> Any:
    import warnings

    from ..models.hub import from_pretrained

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the base's head is never used
        return from_pretrained(path)


def _stats_keyword(method: str) -> Optional[tuple[str, str]]:
    """``(merge keyword, kind)`` of the per-model statistics ``method`` needs, from the registry."""
    from . import REGISTRY

    spec = REGISTRY.get(method)
    stat = next((s for s in spec.statistics if s.kind != "base"), None) if spec else None
    return None if stat is None else (stat.keyword, stat.kind)


def merge_folders(method: str, model_dirs: list[str], out: str, stats: list[str] | None = None,
                  base: str | None = None, *, dtype: str = "float32", recipe: Any = None,
                  computed: Optional[list[Any]] = None, **kw: Any) -> dict[str, Any]:
    """Load, merge, save; returns the report written to ``out/merge_report.json``.

    ``computed``: statistics (or batches) already in memory, one per model, instead of ``stats`` files.
    ``recipe``: the :class:`~fisher_jax.merging.recipe.Recipe` this merge runs, recorded in the report.
    """
    import jax

    from ..stats import check_fits, load_stats
    from . import merge

    if len(model_dirs) < 2:
        raise FisherJaxError(f"merging needs at least two models, got {len(model_dirs)}")
    t0 = time.perf_counter()
    models = _load_models(model_dirs)
    need = _stats_keyword(method)
    if need is not None and computed is not None:
        if need[1] != "batches":
            for s, m in zip(computed, models):
                check_fits(s, m)
        kw[need[0]] = computed
    elif need is not None:
        if need[1] == "batches":
            raise FisherJaxError(f"method '{method}' runs the models on data: use a recipe (--config) with a task per model")
        if not stats:
            raise FisherJaxError(f"method '{method}' needs --stats: one statistics file per model")
        if len(stats) != len(models):
            raise FisherJaxError(f"got {len(stats)} statistics file(s) for {len(models)} models")
        loaded = [load_stats(p) for p in stats]
        for s, m in zip(loaded, models):
            check_fits(s, m)
        kw[need[0]] = loaded
    if base is not None:
        kw["base"] = _load_base(base)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    merged = merge(method, models, report=info, **kw)
    jax.block_until_ready(merged[0].params["body"])
    merge_s = time.perf_counter() - t0
    out_dir = Path(out)
    outputs = []
    main = is_main_process()
    for i, (src, m) in enumerate(zip(model_dirs, merged)):
        dest = out_dir / f"{i}_{Path(src).name or 'model'}"
        if main:
            m.save_pretrained(dest, dtype=dtype)
        outputs.append(str(dest))
    from .coefficients import describe

    report = {
        "method": method,
        "hyperparameters": {k: describe(v) for k, v in kw.items()
                            if k != "base" and (need is None or k != need[0])},
        "inputs": list(model_dirs), "statistics": list(stats or []), "base": base, "outputs": outputs, "dtype": dtype,
        "timings_s": {"load": load_s, "merge": merge_s},
        "warnings": info.get("warnings", []), "diagnostics": info.get("diagnostics", {}),
    }
    if recipe is not None:
        report["recipe"] = recipe.resolved()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "merge_report.json").write_text(json.dumps(report, indent=1, default=str))
    barrier("fisher_jax.merge.outputs")  # the merged folders exist for every process once this returns
    return report


def _task_batches(model_dir: str, task: str, settings: dict, labels: bool) -> Any:
    """Batches of ``task`` for the model in ``model_dir`` (its tokenizer; its label order when ``labels``)."""
    import os

    import numpy as np

    from ..data import batching
    from ..data.glue import get_task, label_order
    from ..models.hub import from_pretrained, load_tokenizer

    model = from_pretrained(model_dir)
    spec = get_task(task)
    tokenizer = load_tokenizer(model)
    length = settings.get("max_length") or batching.default_max_length(task)
    batches = batching.task_batches(task, settings.get("split", "train"), tokenizer, settings.get("batch_size", 32),
                                    max_length=length, glue_dir=settings.get("glue_dir") or os.environ.get("GLUE_DIR"),
                                    shuffle=True, seed=settings.get("seed", 0),
                                    max_examples=settings.get("num_examples", 256))
    order = label_order(getattr(model.config, "id2label", None), spec) if labels else None
    if order is None:
        return model, spec, batches
    order = np.asarray(order, np.int64)
    return model, spec, [{**b, "labels": order[np.asarray(b["labels"], np.int64)]} for b in batches]


def compute_statistics(recipe: Any, progress: bool = True) -> tuple[list[Any], list[str]]:
    """Each model's statistics (or batches, for methods that run the models): its file, or computed on its task.

    Computed statistics are saved under ``statistics.save_dir`` (default ``<out_dir>/statistics``);
    returns ``(per-model statistics, the files used or written)``.
    """
    from ..stats import load_stats, save_stats

    kind = recipe.stats_kind()
    settings = dict(recipe.statistics)
    save_dir = Path(settings.pop("save_dir", None) or Path(recipe.out_dir) / "statistics")
    out, files = [], []
    for j, entry in enumerate(recipe.models):
        if entry.statistics is not None:  # checked against its model once the models are loaded
            s = load_stats(entry.statistics)
            out.append(s)
            files.append(entry.statistics)
            continue
        model, spec, batches = _task_batches(entry.path, entry.task, settings, labels=kind != "gram")
        if kind == "batches":
            out.append(list(batches))
            files.append(f"{entry.task} (batches)")
            continue
        from .. import stats as st

        common = dict(task=spec.name, split=settings.get("split", "train"), progress=progress)
        if kind == "gram":
            s = st.gram_stats(model, batches, mask_padding=settings.get("mask_padding", True), **common)
        elif kind == "mask_fisher":
            s = st.mask_fisher(model, batches, estimator=settings.get("estimator", "empirical"),
                               seed=settings.get("seed", 0), **common)
        else:
            s = st.full_fisher(model, batches, estimator=settings.get("estimator", "expected"),
                               seed=settings.get("seed", 0), **common)
        path = save_dir / f"{j}_{Path(entry.path).name}.{kind}.safetensors"
        if is_main_process():
            path = save_stats(path, s, task=spec.name, split=common["split"])
        out.append(s)
        files.append(str(path))
    return out, files


def run_recipe(path: str, out_dir: Optional[str] = None, progress: bool = True) -> dict[str, Any]:
    """Validate the recipe at ``path`` (completely, before any model loads), compute or load its statistics, merge."""
    from .recipe import load_recipe

    recipe = load_recipe(path, out_dir=out_dir)
    computed, files = (None, [])
    if recipe.stats_kind() is not None:
        computed, files = compute_statistics(recipe, progress=progress)
    return merge_folders(recipe.method, [m.path for m in recipe.models], recipe.out_dir, files or None, recipe.base,
                         dtype=recipe.dtype, recipe=recipe, computed=computed, **recipe.kwargs())


def _scalar_or_list(values: Optional[list[float]]) -> Any:
    if values is None:
        return None
    return values[0] if len(values) == 1 else list(values)


def run_merge(args: argparse.Namespace) -> int:
    progress = not getattr(args, "no_progress", False)
    if args.config is not None:
        flags = [f"--{k.replace('_', '-')}" for k in ("method", "models", "stats", "base", "dtype", "mapping", "normalize",
                                                      "combine", "scope", "seed", *_COEFFICIENTS, *_NUMERIC)
                 if getattr(args, k, None) is not None]
        if flags:
            raise FisherJaxError(f"--config takes the whole merge from the recipe; drop {', '.join(flags)}")
        report = run_recipe(args.config, args.out_dir, progress=progress)
    else:
        missing = [f for f, v in (("--method", args.method), ("--models", args.models), ("--out-dir", args.out_dir))
                   if v is None]
        if missing:
            raise FisherJaxError(f"merge needs {', '.join(missing)} (or a recipe: --config recipe.yaml)")
        kw: dict[str, Any] = {k: getattr(args, k) for k in (*_NUMERIC, "mapping", "combine", "seed", "scope")
                              if getattr(args, k) is not None}
        kw.update({k: _scalar_or_list(getattr(args, k)) for k in _COEFFICIENTS if getattr(args, k) is not None})
        if args.normalize is not None:
            kw["normalize"] = True if args.normalize == "legacy_l2" else args.normalize
        report = merge_folders(args.method, args.models, args.out_dir, args.stats, args.base,
                               dtype=args.dtype or "float32", **kw)
    print(f"merged {len(report['inputs'])} models with {report['method']} in {report['timings_s']['merge']:.2f} s:")
    for path in report["outputs"]:
        print(f"  {path}")
    return 0
