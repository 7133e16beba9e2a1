"""`fisher-jax merge`: merge model folders with one method and write one HF folder per input model
(merged body + that model's own head) plus ``merge_report.json``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..errors import FisherJaxError

_STATS_KEYWORD = {"fisher": "fishers", "fisher_nodes": "fishers", "regmean": "grams"}
_NUMERIC = {
    "lam": "task_arithmetic/ties/dare: scale of the summed task vectors",
    "density": "ties (and dare with ties): share of each task vector's largest entries kept",
    "drop_rate": "dare: probability of dropping a task-vector entry",
    "alpha": "regmean: off-diagonal Gram shrinkage (1: none)",
    "floor": "fisher/fisher_nodes: added to every Fisher entry (relative to each model's scale when normalised)",
}


def add_merge_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from . import METHODS, NORMALIZATIONS

    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--models", nargs="+", required=True, metavar="DIR", help="fine-tuned model folders")
    parser.add_argument("--stats", nargs="+", default=None, metavar="FILE",
                        help="one statistics file per model (from `fisher-jax fisher` / `fisher-jax gram`)")
    parser.add_argument("--base", default=None, help="pre-trained model folder (task_arithmetic, ties, dare)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--mapping", choices=("reference", "node"), default=None, help="fisher_nodes mapping")
    parser.add_argument("--normalize", nargs="?", const="layer", default=None, choices=(*NORMALIZATIONS, "legacy_l2"),
                        help="fisher/fisher_nodes: put each model's Fisher on one scale first: unit mean per layer "
                             "('layer', the default of a bare --normalize), per model ('mean'), unit L2 per model "
                             "('l2'); 'legacy_l2' is the old global L2 with an absolute floor; default: none (released)")
    parser.add_argument("--gamma", type=float, default=None, help="fisher/fisher_nodes: weights F**gamma (default 1)")
    parser.add_argument("--combine", choices=("task_arithmetic", "ties"), default=None, help="dare: combine with")
    parser.add_argument("--seed", type=int, default=None, help="dare: random seed")
    for name, help_text in _NUMERIC.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=None, help=help_text)
    return parser


def merge_folders(method: str, model_dirs: list[str], out: str, stats: list[str] | None = None,
                  base: str | None = None, **kw: Any) -> dict[str, Any]:
    """Load, merge, save; returns the report written to ``out/merge_report.json``."""
    import jax

    from ..models.hub import from_pretrained
    from ..stats.io import check_fits, load_stats
    from . import merge

    if len(model_dirs) < 2:
        raise FisherJaxError(f"merging needs at least two models, got {len(model_dirs)}")
    t0 = time.perf_counter()
    models = [from_pretrained(d) for d in model_dirs]
    if method in _STATS_KEYWORD:
        if not stats:
            raise FisherJaxError(f"method '{method}' needs --stats: one statistics file per model")
        if len(stats) != len(models):
            raise FisherJaxError(f"got {len(stats)} statistics file(s) for {len(models)} models")
        loaded = [load_stats(p) for p in stats]
        for p, s, m in zip(stats, loaded, models):
            check_fits(s, m)
        kw[_STATS_KEYWORD[method]] = loaded
    if base is not None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the base's head is never used
            kw["base"] = from_pretrained(base)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    merged = merge(method, models, report=info, **kw)
    jax.block_until_ready(merged[0].params["body"])
    merge_s = time.perf_counter() - t0
    out_dir = Path(out)
    outputs = []
    for i, (src, m) in enumerate(zip(model_dirs, merged)):
        dest = out_dir / f"{i}_{Path(src).name or 'model'}"
        m.save_pretrained(dest)
        outputs.append(str(dest))
    report = {
        "method": method,
        "hyperparameters": {k: v for k, v in kw.items() if isinstance(v, (int, float, str, bool))},
        "inputs": list(model_dirs), "statistics": list(stats or []), "base": base, "outputs": outputs,
        "timings_s": {"load": load_s, "merge": merge_s},
        "warnings": info.get("warnings", []), "diagnostics": info.get("diagnostics", {}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "merge_report.json").write_text(json.dumps(report, indent=1))
    return report


def run_merge(args: argparse.Namespace) -> int:
    kw = {k: getattr(args, k) for k in (*_NUMERIC, "mapping", "combine", "seed", "gamma") if getattr(args, k) is not None}
    if args.normalize is not None:
        kw["normalize"] = True if args.normalize == "legacy_l2" else args.normalize
    report = merge_folders(args.method, args.models, args.out, args.stats, args.base, **kw)
    print(f"merged {len(args.models)} models with {args.method} in {report['timings_s']['merge']:.2f} s:")
    for path in report["outputs"]:
        print(f"  {path}")
    return 0
