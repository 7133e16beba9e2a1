"""Run the JAX pipeline and the PyTorch reference on the same checkpoints and batches, side by side.

For fine-tuned checkpoints (one per task) this computes, in both frameworks:

1. each model's mask Fisher on the same training batches (SPEC §2) -> their max relative difference;
2. the Fisher-node merge of the bodies (SPEC §3; ``reference`` mapping by default), each framework
   with its own Fishers -> the max difference of the merged weights;
3. the GLUE dev scores (SPEC §4) of each single model and of the merged body with each task's own
   head, evaluated by each framework on the same dev batches;

and the time each stage took. ``fisher-jax compare --models A B --tasks rte mrpc`` calls
:func:`add_arguments` / :func:`main`. Importing this module needs neither torch nor JAX; running
it without torch raises a one-line :class:`~fisher_jax.errors.FisherJaxError`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import FisherJaxError


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a - b| / max |b|``: the difference relative to the reference's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a - b).max())


def _fisher_batches(tokenizer: Any, task: str, num_examples: int, batch_size: int, estimator: str,
                    glue_dir: Optional[str], seed: int, max_length: Optional[int]) -> list[dict]:
    """Training batches as ``fisher-jax fisher`` builds them: drawn with replacement for ``batch``
    (the released code's recipe), a seeded shuffled subset otherwise. Materialised, so that both
    frameworks see exactly the same arrays."""
    from ..data import batching

    length = max_length or batching.default_max_length(task)
    if estimator == "batch":
        return list(batching.sample_task_batches(task, "train", tokenizer, num_examples, batch_size, max_length=length,
                                                 glue_dir=glue_dir, seed=seed))
    return list(batching.task_batches(task, "train", tokenizer, batch_size, max_length=length, glue_dir=glue_dir,
                                      shuffle=True, seed=seed, max_examples=num_examples))


def _eval_batches(tokenizer: Any, task: str, glue_dir: Optional[str], max_eval: Optional[int], batch_size: int,
                  max_length: Optional[int]) -> list[dict]:
    """The dev split (a seeded random ``max_eval`` rows), sorted by length, every row exactly once."""
    from ..data import batching
    from ..train.evaluate import sorted_batches

    dev = batching.SplitRows(task, "dev", glue_dir)
    rows = batching.eval_subset(len(dev), max_eval)  # a seeded sample, not the first rows
    length = max_length or batching.default_max_length(task)
    return sorted_batches(batching.encode_rows(tokenizer, dev, rows, length), batch_size)


def _torch_scores(rt: Any, model: Any, task: str, batches: list[dict]) -> tuple[dict, float]:
    from ..data.metrics import compute_metrics

    (logits, labels, weights), secs = _timed(lambda: rt.predict(model, batches))
    return compute_metrics(task, logits, labels, weights), secs


def _jax_scores(model: Any, task: str, batches: list[dict]) -> tuple[dict, float]:
    from ..train.evaluate import evaluate_batches

    out = evaluate_batches(model, task, batches)  # warms up every batch shape first
    return out, float(out["seconds"])  # steady state, compilation excluded


def compare(
    model_dirs: Sequence[str | os.PathLike],
    tasks: str | Sequence[str],
    glue_dir: Optional[str | os.PathLike] = None,
    num_examples: int = 128,
    batch_size: int = 32,
    estimator: str = "empirical",
    torch_method: str = "loop",
    mapping: str = "reference",
    max_eval: Optional[int] = None,
    eval_batch_size: int = 64,
    max_length: Optional[int] = None,
    seed: int = 0,
    evaluate_single: bool = True,
    verbose: bool = True,
    torch_device: Optional[str] = None,
    matmul_precision: str = "highest",
) -> dict[str, Any]:
    """JAX vs PyTorch reference on the same fine-tuned checkpoints (one per task) and batches.

    ``tasks``: one GLUE task per model (a single name applies to every model). The mask Fishers
    use ``num_examples`` training examples in batches of ``batch_size`` with ``estimator``
    (``empirical`` or ``batch``; PyTorch per ``torch_method``: ``loop`` or ``vmap``); the merge is
    ``fisher_nodes`` with ``mapping``; evaluation uses a seeded random ``max_eval`` dev rows (all when
    None). PyTorch runs on ``torch_device`` (default: CUDA when it sees a GPU, else the CPU); JAX
    runs under ``jax.default_matmul_precision(matmul_precision)``: ``"highest"`` (default) gives
    float32 matmuls like PyTorch's default, where a GPU's TF32 default would differ by ~1e-3.
    Returns ``{"fisher": [...], "merge": {...}, "scores": [...], "table": str}`` and prints the
    table when ``verbose``.
    """
    import jax

    from . import require_torch

    rt = require_torch()
    with jax.default_matmul_precision(matmul_precision):
        return _compare(rt, torch_device or rt.default_device(), model_dirs=model_dirs, tasks=tasks,
                        glue_dir=glue_dir, num_examples=num_examples, batch_size=batch_size, estimator=estimator,
                        torch_method=torch_method, mapping=mapping, max_eval=max_eval,
                        eval_batch_size=eval_batch_size, max_length=max_length, seed=seed,
                        evaluate_single=evaluate_single, verbose=verbose, matmul_precision=matmul_precision)


def _compare(rt: Any, device: str, *, model_dirs, tasks, glue_dir, num_examples, batch_size, estimator,
             torch_method, mapping, max_eval, eval_batch_size, max_length, seed, evaluate_single, verbose,
             matmul_precision) -> dict[str, Any]:
    """The body of :func:`compare`, run on ``device`` under the caller's matmul precision."""
    import jax

    import fisher_jax as fj
    from ..data.glue import get_task
    from ..models.hub import load_tokenizer

    dirs = [str(d) for d in model_dirs]
    if not dirs:
        raise FisherJaxError("compare needs at least one model folder")
    names = [tasks] * len(dirs) if isinstance(tasks, str) else list(tasks)
    if len(names) == 1 and len(dirs) > 1:
        names = names * len(dirs)
    if len(names) != len(dirs):
        raise FisherJaxError(f"got {len(names)} tasks for {len(dirs)} models: give one task per model")
    specs = [get_task(t) for t in names]
    if estimator not in ("empirical", "batch", "expected"):
        raise FisherJaxError(f"estimator must be empirical, expected or batch, got '{estimator}'")
    glue = None if glue_dir is None else str(glue_dir)

    jax_models, torch_models, fisher_rows, jax_f, torch_f = [], [], [], [], []
    fisher_batches: list[list[dict]] = []
    for d, spec in zip(dirs, specs):
        jm = fj.from_pretrained(d)
        if jm.num_labels != spec.num_labels:
            raise FisherJaxError(f"'{d}' has {jm.num_labels} output(s) but task {spec.name} needs {spec.num_labels}")
        pm = rt.load_model(d).to(device)
        batches = _fisher_batches(load_tokenizer(jm), spec.name, num_examples, batch_size, estimator, glue, seed,
                                  max_length)
        fj_, t_j = _timed(lambda: fj.mask_fisher(jm, batches, estimator=estimator, progress=False))
        ft_, t_t = _timed(lambda: rt.mask_fisher(pm, batches, estimator=estimator,
                                                 method="loop" if estimator == "batch" else torch_method))
        fisher_rows.append({"model": d, "task": spec.name, "num_examples": int(fj_.num_examples),
                            "head_max_rel_diff": _max_rel(fj_.head, ft_.head),
                            "neuron_max_rel_diff": _max_rel(fj_.neuron, ft_.neuron),
                            "jax_s": t_j, "torch_s": t_t})
        jax_models.append(jm)
        torch_models.append(pm)
        jax_f.append(fj_)
        torch_f.append(ft_)
        fisher_batches.append(batches)

    merge: dict[str, Any] = {}
    merged_jax, merged_torch = jax_models, torch_models
    if len(dirs) >= 2:
        mj, t_mj = _timed(lambda: fj.merge("fisher_nodes", jax_models, fishers=jax_f, mapping=mapping))
        sds = [rt.state_dict_numpy(m) for m in torch_models]
        mt, t_mt = _timed(lambda: rt.fisher_nodes_merge(sds, torch_f, mapping=mapping))
        ours = fj.models.state_dict(mj[0])
        ref = rt.state_dict_numpy(mt[0])
        prefix = torch_models[0].base_model_prefix + "."
        body = [k for k in ref if k.startswith(prefix)]
        merge = {"method": "fisher_nodes", "mapping": mapping, "jax_s": t_mj, "torch_s": t_mt,
                 "max_abs_diff": float(max(np.abs(ours[k] - ref[k]).max() for k in body)),
                 "max_rel_diff": float(max(_max_rel(ours[k], ref[k]) for k in body))}
        merged_jax = mj
        merged_torch = [rt.with_state_dict(pm, sd) for pm, sd in zip(torch_models, mt)]

    score_rows = []
    for j, spec in enumerate(specs):
        batches = _eval_batches(load_tokenizer(jax_models[j]), spec.name, glue, max_eval, eval_batch_size, max_length)
        row: dict[str, Any] = {"task": spec.name, "num_examples": int(sum(float(b["weights"].sum()) for b in batches))}
        if evaluate_single or len(dirs) < 2:
            s_j, row["single_jax_s"] = _jax_scores(jax_models[j], spec.name, batches)
            s_t, row["single_torch_s"] = _torch_scores(rt, torch_models[j], spec.name, batches)
            row["single_jax"], row["single_torch"] = s_j["score"], s_t["score"]
        if len(dirs) >= 2:
            m_j, row["merged_jax_s"] = _jax_scores(merged_jax[j], spec.name, batches)
            m_t, row["merged_torch_s"] = _torch_scores(rt, merged_torch[j], spec.name, batches)
            row["merged_jax"], row["merged_torch"] = m_j["score"], m_t["score"]
        score_rows.append(row)

    result = {"models": dirs, "tasks": [s.name for s in specs], "estimator": estimator, "torch_method": torch_method,
              "torch_device": str(device), "jax_backend": jax.default_backend(),
              "matmul_precision": matmul_precision, "fisher": fisher_rows, "merge": merge, "scores": score_rows}
    result["table"] = format_table(result)
    if verbose:
        print(result["table"])
    return result


def format_table(result: dict[str, Any]) -> str:
    """Markdown tables of a :func:`compare` result."""
    lines = [f"mask Fisher ({result['estimator']}; PyTorch: {result['torch_method']} on "
             f"{result.get('torch_device', 'cpu')}; JAX on {result.get('jax_backend', '?')}; "
             "times include JAX compilation)", "",
             "| model | task | examples | head max rel diff | neuron max rel diff | JAX s | PyTorch s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["fisher"]:
        lines.append(f"| {Path(r['model']).name} | {r['task']} | {r['num_examples']} | {r['head_max_rel_diff']:.1e} | "
                     f"{r['neuron_max_rel_diff']:.1e} | {r['jax_s']:.1f} | {r['torch_s']:.1f} |")
    m = result["merge"]
    if m:
        lines += ["", f"merged body ({m['method']}, mapping {m['mapping']}, each framework with its own Fishers): "
                      f"max abs diff {m['max_abs_diff']:.1e}, max rel diff {m['max_rel_diff']:.1e}; "
                      f"merge JAX {m['jax_s']:.1f} s, PyTorch {m['torch_s']:.1f} s"]
    cols = [("single_jax", "single JAX"), ("single_torch", "single PyTorch"), ("merged_jax", "merged JAX"),
            ("merged_torch", "merged PyTorch")]
    present = [(k, h) for k, h in cols if any(k in r for r in result["scores"])]
    lines += ["", "GLUE dev score (mean of the task's metrics)", "",
              "| task | examples | " + " | ".join(h for _, h in present)
              + " | eval s, JAX (compile excluded) / PyTorch |",
              "|---|---:|" + "---:|" * len(present) + "---|"]
    for r in result["scores"]:
        secs = [r.get(f"{k}_s") for k, _ in present]
        pairs = " ; ".join(f"{secs[i]:.2f}/{secs[i + 1]:.2f}" for i in range(0, len(secs) - 1, 2))
        vals = " | ".join(f"{100 * r[k]:.2f}" for k, _ in present)
        lines.append(f"| {r['task']} | {r['num_examples']} | {vals} | {pairs} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``fisher-jax compare``."""
    from ..cli import TASK_HELP, add_list, add_out_file

    add_list(parser, "--models", required=True, metavar="DIR",
             help="fine-tuned Hugging Face model folders (one per task), space- or comma-separated")
    add_list(parser, "--tasks", required=True, metavar="TASK",
             help=f"the task of each model (one: every model), each {TASK_HELP}")
    parser.add_argument("--glue-dir", default=None,
                        help="local GLUE folder (default: $GLUE_DIR, else the Hub; a task file names its own data)")
    parser.add_argument("--num-examples", type=int, default=128, help="training examples for each mask Fisher")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step (default: 32)")
    parser.add_argument("--estimator", choices=("empirical", "expected", "batch"), default="empirical",
                        help="mask-Fisher estimator of both frameworks (default: empirical)")
    parser.add_argument("--torch-method", choices=("loop", "vmap"), default="loop",
                        help="PyTorch per-example gradients: Python loop or torch.func vmap")
    parser.add_argument("--mapping", choices=("reference", "node"), default="reference",
                        help="fisher_nodes mask-node -> parameter mapping (default: reference)")
    parser.add_argument("--max-eval", type=int, default=None, metavar="N",
                        help="evaluate on a seeded random N dev rows (default: all)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the task's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example draws (default: 0)")
    parser.add_argument("--no-single", action="store_true", help="skip evaluating the unmerged models")
    parser.add_argument("--torch-device", default=None, help="PyTorch device (default: cuda when available, else cpu)")
    add_out_file(parser, "also write the result as JSON", metavar="FILE.json")
    return parser


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Run :func:`compare` from parsed arguments (or an argv list)."""
    if not isinstance(args, argparse.Namespace):
        args = add_arguments(argparse.ArgumentParser(prog="fisher-jax compare")).parse_args(args)
    from ..data.glue import resolve_glue_dir

    glue_dir = resolve_glue_dir(args.glue_dir)
    tasks = args.tasks[0] if len(args.tasks) == 1 else list(args.tasks)
    result = compare(list(args.models), tasks, glue_dir=glue_dir, num_examples=args.num_examples,
                     batch_size=args.batch_size, estimator=args.estimator, torch_method=args.torch_method,
                     mapping=args.mapping, max_eval=args.max_eval, max_length=args.max_length, seed=args.seed,
                     evaluate_single=not args.no_single, torch_device=args.torch_device)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


__all__ = ["add_arguments", "compare", "format_table", "main"]
