"""The cost claim on equal axes: merged score against statistics seconds, per method and budget N.

    python benchmarks/budget_sweep.py --glue-dir ../shared/glue                  # zoo seed 0, sst2 mrpc stsb
    python benchmarks/budget_sweep.py --budgets 32 128 512 --full-max 128        # cap the expensive full Fisher
    python benchmarks/budget_sweep.py --quick --models-root ~/.cache/fisher_jax/demo_calib/models --tasks sst2 stsb

For every statistics method and budget N (training examples per model) and every pair of tasks:

* ``fisher_nodes[batch]`` — ``fj.mask_fisher(estimator="batch")`` on the released code's data
  (``sample_task_batches``: N draws with replacement, batches of 32 in draw order);
* ``fisher_nodes[empirical]`` — ``fj.mask_fisher(estimator="empirical")``;
* ``fisher[expected]`` — ``fj.full_fisher(estimator="expected")``, batches of 8 (as the zoo);
* ``regmean`` — ``fj.gram_stats``, batches of 32;

the non-``batch`` methods on ``task_batches(task, "train", shuffle=True, seed=0, max_examples=N)``.
The statistics seconds of a pair are the wall clock of both models' statistics calls, with the
batches already built (their tokenisation is reported as ``data_s``) and compilation excluded: one
call on random-token batches of every shape the timed call will see runs first (``warmup_s``,
which holds the compilation the first time a shape is met). Each pair is merged with ``fj.merge``
and each merged model scored with its own head on a seeded random subset of dev rows
(``eval_subset(n_dev, M, seed)``); its normalised score is ``mean_t merged_t / individual_t`` over
the pair's tasks, with a 95 % percentile-bootstrap interval over dev rows from
``fisher_jax.experiment.uncertainty.joint_bootstrap`` (the same row resamples for merged and
individual, and for every method). Simple averaging is the zero-cost reference.

Writes ``benchmarks/results/budget_sweep.json`` (every number, the machine and the date) and a
plot (x: statistics seconds, log scale; y: mean normalised score over the pairs; the Pareto front
of (seconds, score), simple averaging's zero seconds included, marked). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ZOO = "~/.cache/fisher_jax/zoo/minilm/seed0"


@dataclass(frozen=True)
class StatsMethod:
    """One statistics method of the sweep: the merge method and how its statistics are computed."""

    label: str
    merge: str  # fj.merge method name
    kind: str  # "mask_fisher" | "full_fisher" | "gram"
    estimator: Optional[str]
    batch_size: int
    keyword: str  # fj.merge keyword that takes the statistics


METHODS: tuple[StatsMethod, ...] = (
    StatsMethod("fisher_nodes[batch]", "fisher_nodes", "mask_fisher", "batch", 32, "fishers"),
    StatsMethod("fisher_nodes[empirical]", "fisher_nodes", "mask_fisher", "empirical", 32, "fishers"),
    StatsMethod("fisher[expected]", "fisher", "full_fisher", "expected", 8, "fishers"),
    StatsMethod("regmean", "regmean", "gram", None, 32, "grams"),
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- pure helpers
def pairs_of(tasks: Sequence[str]) -> list[tuple[str, str]]:
    """Every unordered pair of ``tasks``, in the order given (``itertools.combinations``)."""
    return list(itertools.combinations(tasks, 2))


def budgets_for(method: StatsMethod, budgets: Sequence[int], caps: Mapping[str, Optional[int]]) -> list[int]:
    """The budgets N of ``method``: ``budgets`` up to its cap: ``caps[label]`` when given (not None),
    else ``caps[kind]`` (None = no cap)."""
    cap = caps.get(method.label)
    cap = caps.get(method.kind) if cap is None else cap
    return sorted({int(n) for n in budgets if cap is None or int(n) <= int(cap)})


def normalised(merged: Mapping[str, float], individual: Mapping[str, float]) -> float:
    """``mean_t merged[t] / individual[t]`` over the tasks of ``merged`` (Matena & Raffel's
    "normalised score": a merged model's share of the fine-tuned model's own score)."""
    return float(np.mean([merged[t] / individual[t] for t in merged]))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(cost, score)`` that no other point dominates, by ascending cost.

    ``q`` dominates ``p`` when ``q.cost <= p.cost`` and ``q.score >= p.score`` with one strict;
    of exact duplicates the first is kept.
    """
    front = []
    for i, (c, s) in enumerate(points):
        dominated = any((c2 <= c and s2 >= s and (c2 < c or s2 > s)) or (j < i and c2 == c and s2 == s)
                        for j, (c2, s2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def normalised_intervals(labels: Mapping[str, Any], individual: Mapping[str, Any],
                         merged: Mapping[tuple[str, ...], Mapping[str, Any]], n_resamples: int = 1000,
                         seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Bootstrap intervals of each pair's normalised score and of their mean over the pairs.

    ``labels[t]``, ``individual[t]``: task t's scored dev labels and the fine-tuned model's
    predictions on them; ``merged[pair][t]``: the merged model's predictions on t's rows. Per draw
    every task's rows are resampled once, shared by the individual and every merged model
    (:func:`fisher_jax.experiment.uncertainty.joint_bootstrap`, a paired percentile bootstrap),
    and the statistic is ``mean_t s(merged_t) / s(individual_t)``.
    Returns ``{"+".join(pair): Interval, ..., "mean": Interval}``.
    """
    from fisher_jax.experiment.uncertainty import joint_bootstrap

    preds: dict[Any, tuple[str, Any]] = {("individual", t): (t, p) for t, p in individual.items()}
    for pair, by_task in merged.items():
        for t, p in by_task.items():
            preds[(pair, t)] = (t, p)

    def statistic(s):
        per_pair = {"+".join(pair): np.mean([s[(pair, t)] / s[("individual", t)] for t in by_task], axis=0)
                    for pair, by_task in merged.items()}
        out = {k: v[:, None] for k, v in per_pair.items()}
        out["mean"] = np.mean(list(per_pair.values()), axis=0)[:, None]
        return out

    return joint_bootstrap(labels, preds, statistic, replicates=1, confidence=confidence,
                           n_resamples=n_resamples, seed=seed)


def warmup_batch(batch: Mapping[str, np.ndarray], vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """A batch shaped and typed like ``batch`` with random tokens and permuted labels: running it
    compiles what ``batch`` needs without touching the timed examples."""
    rs = np.random.RandomState(seed)
    out = {k: np.array(v) for k, v in batch.items()}
    out["input_ids"] = rs.randint(min(1000, vocab_size - 1), vocab_size, out["input_ids"].shape).astype(np.int32)
    out["attention_mask"] = np.ones_like(out["attention_mask"])
    out["labels"] = rs.permutation(out["labels"])
    out["weights"] = np.ones_like(out["weights"])
    return out


def distinct_shapes(batches: Sequence[Mapping[str, np.ndarray]]) -> list[Mapping[str, np.ndarray]]:
    """The first batch of every distinct ``input_ids`` shape (what a jitted step compiles per)."""
    seen: dict[tuple, Mapping[str, np.ndarray]] = {}
    for b in batches:
        seen.setdefault(np.shape(b["input_ids"]), b)
    return list(seen.values())


# --------------------------------------------------------------------------- statistics
def stats_batches(method: StatsMethod, task: str, n: int, tokenizer: Any, glue_dir: Optional[str],
                  seed: int = 0) -> list[dict]:
    """The training batches of one statistics call, materialised (built before the clock starts)."""
    from fisher_jax.data import sample_task_batches, task_batches

    if method.estimator == "batch":  # the released calc_fisher.py: N draws with replacement
        it = sample_task_batches(task, "train", tokenizer, num_examples=n, batch_size=method.batch_size,
                                 glue_dir=glue_dir, seed=seed)
    else:
        it = task_batches(task, "train", tokenizer, method.batch_size, glue_dir=glue_dir, shuffle=True, seed=seed,
                          max_examples=n)
    return list(it)


def stats_fn(method: StatsMethod) -> Callable[..., Any]:
    """``batches -> statistics`` of ``method`` (fj.mask_fisher / fj.full_fisher / fj.gram_stats)."""
    import fisher_jax as fj

    if method.kind == "mask_fisher":
        return lambda model, b, **kw: fj.mask_fisher(model, b, estimator=method.estimator, progress=False, **kw)
    if method.kind == "full_fisher":
        return lambda model, b, **kw: fj.full_fisher(model, b, estimator=method.estimator, progress=False, **kw)
    return lambda model, b, **kw: fj.gram_stats(model, b, progress=False, **kw)


def timed_stats(method: StatsMethod, model: Any, batches: list[dict], task: str,
                warmed: Optional[set] = None) -> tuple[Any, float, float]:
    """``(statistics, seconds, warm-up seconds)`` of one call; compilation excluded from ``seconds``.

    A call on random-token copies of every batch shape not yet in ``warmed`` (keys: method, the
    model's architecture, the shape) runs first and is timed as the warm-up.
    """
    fn = stats_fn(method)
    warmed = set() if warmed is None else warmed
    new = [b for b in distinct_shapes(batches)
           if (method.label, model.arch, np.shape(b["input_ids"])) not in warmed]
    warm_s = 0.0
    if new:
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # random tokens may leave a layer's Fisher at 0
            warnings.simplefilter("ignore")
            fn(model, [warmup_batch(b, model.arch.vocab_size, i) for i, b in enumerate(new)])
        warm_s = time.perf_counter() - t0
        warmed.update((method.label, model.arch, np.shape(b["input_ids"])) for b in new)
    t0 = time.perf_counter()
    stats = fn(model, batches, task=task, split="train")  # returns host numpy: already synchronised
    return stats, time.perf_counter() - t0, warm_s


# --------------------------------------------------------------------------- evaluation
def dev_rows(task: str, tokenizer: Any, n_examples: Optional[int], glue_dir: Optional[str],
             seed: int = 0, batch_size: int = 64) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """``(length-sorted batches, row ids, labels)`` of a seeded random ``n_examples`` dev rows
    (:func:`fisher_jax.data.batching.eval_subset`)."""
    from fisher_jax.data.batching import default_max_length, encode, eval_subset
    from fisher_jax.data.glue import load_split
    from fisher_jax.train.evaluate import sorted_batches

    split = load_split(task, "dev", glue_dir)
    rows = eval_subset(len(split), n_examples, seed)
    examples = split.subset(rows)
    encoded = encode(tokenizer, examples, default_max_length(task))
    return sorted_batches(encoded, batch_size), rows, np.asarray(examples.labels)


def predict_scores(model: Any, task: str, batches: list[dict]) -> tuple[float, np.ndarray]:
    """``(GLUE score, predictions in row order)`` of ``model`` on ``batches``."""
    from fisher_jax.train.evaluate import evaluate_batches

    r = evaluate_batches(model, task, batches, warmup=False, return_predictions=True)
    return float(r["score"]), np.asarray(r["predictions"])


def merge_pair(method: str, models: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[list[Any], list[str], float]:
    """``(merged models, merge warnings, merge seconds)`` of ``fj.merge(method, models, **kwargs)``."""
    import jax

    import fisher_jax as fj

    report: dict[str, Any] = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # recorded in the report (and the JSON) instead
        warnings.simplefilter("ignore")
        merged = fj.merge(method, models, report=report, **kwargs)
    jax.block_until_ready(merged[0].params["body"])
    return merged, list(report.get("warnings", [])), time.perf_counter() - t0


# --------------------------------------------------------------------------- the sweep
def machine_info() -> dict[str, Any]:
    import jax

    dev = jax.devices()
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in dev], "num_devices": len(dev),
            "device_kind": dev[0].device_kind,
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def run_sweep(models: Mapping[str, Any], tokenizer: Any, methods: Sequence[StatsMethod], budgets: Sequence[int],
              caps: Mapping[str, Optional[int]], eval_examples: Optional[int], glue_dir: Optional[str],
              n_resamples: int = 1000, seed: int = 0, eval_seed: int = 0,
              merge_kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None) -> dict[str, Any]:
    """Every (method, N, pair) cell of the sweep, the per-(method, N) summary, simple averaging and
    the Pareto front, as one JSON-ready dict (see the module docstring)."""
    tasks = list(models)
    pairs = pairs_of(tasks)
    merge_kwargs = merge_kwargs or {}
    dev = {t: dev_rows(t, tokenizer, eval_examples, glue_dir, eval_seed) for t in tasks}
    labels = {t: d[2] for t, d in dev.items()}
    individual, ind_preds = {}, {}
    for t, m in models.items():
        individual[t], ind_preds[t] = predict_scores(m, t, dev[t][0])
        log(f"[sweep] individual {t}: {individual[t]:.4f} on {len(labels[t])} dev rows")

    def score_pairs(merged_of: Callable[[tuple[str, str]], tuple[list[Any], list[str], float]]):
        cells, preds = {}, {}
        for pair in pairs:
            merged, warns, merge_s = merged_of(pair)
            scores, preds[pair] = {}, {}
            for t, m in zip(pair, merged):
                scores[t], preds[pair][t] = predict_scores(m, t, dev[t][0])
            cells[pair] = {"scores": scores, "normalised": normalised(scores, individual), "merge_s": merge_s,
                           "warnings": warns}
        ivs = normalised_intervals(labels, ind_preds, preds, n_resamples, seed)
        for pair, cell in cells.items():
            cell["normalised_ci"] = [ivs["+".join(pair)].low, ivs["+".join(pair)].high]
        return cells, ivs["mean"]

    simple_cells, simple_iv = score_pairs(lambda pair: merge_pair("simple", [models[t] for t in pair], {}))
    log(f"[sweep] simple: normalised {simple_iv.point:.4f} [{simple_iv.low:.4f}, {simple_iv.high:.4f}]")
    cells, summary, stats_rows = [], [], []
    warmed: set = set()
    for method in methods:
        for n in budgets_for(method, budgets, caps):
            stats, per_task = {}, {}
            for t in tasks:
                t0 = time.perf_counter()
                batches = stats_batches(method, t, n, tokenizer, glue_dir, seed)
                data_s = time.perf_counter() - t0
                stats[t], sec, warm_s = timed_stats(method, models[t], batches, t, warmed)
                per_task[t] = {"seconds": sec, "warmup_s": warm_s, "data_s": data_s, "num_batches": len(batches),
                               "num_examples": int(getattr(stats[t], "num_examples", n))}
                stats_rows.append({"method": method.label, "N": n, "task": t, **per_task[t]})
                log(f"[sweep] {method.label} N={n} {t}: {sec:.2f} s (warm-up {warm_s:.1f} s, data {data_s:.1f} s)")
            kw = dict(merge_kwargs.get(method.merge, {}))
            pair_cells, iv = score_pairs(lambda pair: merge_pair(
                method.merge, [models[t] for t in pair], {**kw, method.keyword: [stats[t] for t in pair]}))
            secs = []
            for pair, cell in pair_cells.items():
                sec = sum(per_task[t]["seconds"] for t in pair)
                secs.append(sec)
                cells.append({"method": method.label, "N": n, "pair": list(pair), "stats_seconds": sec,
                              "warmup_s": sum(per_task[t]["warmup_s"] for t in pair), **cell})
            summary.append({"method": method.label, "N": n, "stats_seconds": float(np.mean(secs)),
                            "normalised": iv.point, "ci": [iv.low, iv.high]})
            log(f"[sweep] {method.label} N={n}: {np.mean(secs):.2f} s/pair, normalised {iv.point:.4f} "
                f"[{iv.low:.4f}, {iv.high:.4f}]")
            del stats
    simple_row = {"method": "simple", "N": 0, "stats_seconds": 0.0, "normalised": simple_iv.point,
                  "ci": [simple_iv.low, simple_iv.high]}
    points = [(simple_row["stats_seconds"], simple_row["normalised"])] + \
        [(r["stats_seconds"], r["normalised"]) for r in summary]
    rows = [simple_row] + summary
    front = [{"method": rows[i]["method"], "N": rows[i]["N"]} for i in pareto_front(points)]
    return {"tasks": tasks, "pairs": [list(p) for p in pairs], "eval_rows": {t: d[1].tolist() for t, d in dev.items()},
            "individual": individual, "simple": {"summary": simple_row, "cells": [
                {"pair": list(p), **c} for p, c in simple_cells.items()]},
            "statistics": stats_rows, "cells": cells, "summary": summary, "pareto_front": front}


# --------------------------------------------------------------------------- output
def table(result: Mapping[str, Any]) -> str:
    """Markdown table of the summary: method x N, seconds per pair, normalised score with CI."""
    front = {(f["method"], f["N"]) for f in result["pareto_front"]}
    lines = ["| method | N | statistics s / pair | normalised score (%) | 95 % CI | Pareto |",
             "|---|---:|---:|---:|---|:-:|"]
    for r in [result["simple"]["summary"]] + list(result["summary"]):
        mark = "*" if (r["method"], r["N"]) in front else ""
        lines.append(f"| {r['method']} | {r['N']} | {r['stats_seconds']:.2f} | {100 * r['normalised']:.2f} | "
                     f"[{100 * r['ci'][0]:.2f}, {100 * r['ci'][1]:.2f}] | {mark} |")
    return "\n".join(lines)


def plot(result: Mapping[str, Any], path: Path) -> None:
    """Normalised score (%) against statistics seconds per pair (log x), one line per method."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's inline backend is left alone
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(9.5, 4.8))
    ax = fig.add_subplot()
    simple = result["simple"]["summary"]
    ax.axhline(100 * simple["normalised"], color="grey", lw=1, label="simple averaging (0 s)")
    ax.axhspan(100 * simple["ci"][0], 100 * simple["ci"][1], color="grey", alpha=0.15, lw=0)
    front = {(f["method"], f["N"]) for f in result["pareto_front"]}
    for label in dict.fromkeys(r["method"] for r in result["summary"]):
        rows = sorted((r for r in result["summary"] if r["method"] == label), key=lambda r: r["N"])
        x = np.array([r["stats_seconds"] for r in rows])
        y = np.array([100 * r["normalised"] for r in rows])
        err = np.array([[y[i] - 100 * r["ci"][0], 100 * r["ci"][1] - y[i]] for i, r in enumerate(rows)]).T
        line = ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, lw=1.2, label=label)
        for xi, yi, r in zip(x, y, rows):
            ax.annotate(f"{r['N']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=line.lines[0].get_color())
    on_front = sorted(((r["stats_seconds"], 100 * r["normalised"]) for r in result["summary"]
                       if (r["method"], r["N"]) in front))
    if on_front:
        ax.scatter(*zip(*on_front), s=110, facecolors="none", edgecolors="black", lw=1.2, zorder=5,
                   label="Pareto front")
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 20, not 2x10^1
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("statistics seconds per pair (both models; compilation excluded)")
    ax.set_ylabel("mean normalised score over pairs (%)")
    ax.set_title(f"Cost of the statistics stage ({', '.join(result['tasks'])}; labels: N)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a point
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-root", default=ZOO, help="folder with one fine-tuned model sub-folder per task")
    ap.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "stsb"])
    ap.add_argument("--budgets", nargs="+", type=int, default=None,
                    help="statistics examples N per model (default: 32 128 512 1024; --quick: 8 16)")
    ap.add_argument("--mask-max", type=int, default=None, help="largest N for the mask Fisher")
    ap.add_argument("--batch-max", type=int, default=None,
                    help="largest N for the released batch estimator (default: --mask-max)")
    ap.add_argument("--full-max", type=int, default=512, help="largest N for the full Fisher")
    ap.add_argument("--gram-max", type=int, default=None, help="largest N for RegMean's Grams")
    ap.add_argument("--methods", nargs="+", default=[m.label for m in METHODS],
                    help=f"any of: {', '.join(m.label for m in METHODS)}")
    ap.add_argument("--normalize", default="none",
                    help="normalize= for fisher and fisher_nodes (none: the released, unnormalised merge)")
    ap.add_argument("--eval-examples", type=int, default=250, help="seeded random dev rows per task")
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the statistics rows and the bootstrap")
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--glue-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS / "budget_sweep.json"))
    ap.add_argument("--plot", default=str(RESULTS / "budget_sweep.png"))
    ap.add_argument("--quick", action="store_true", help="smoke run: N 8 and 16 (unless --budgets), 32 dev rows, 200 resamples")
    ap.add_argument("--compile-cache", default=None, metavar="DIR",
                    help="JAX's persistent compilation cache (reruns skip compiling; timings exclude it anyway)")
    ap.add_argument("--cpu-devices", type=int, default=None, help="JAX CPU devices (default: one per core)")
    args = ap.parse_args(argv)
    if args.quick:
        args.eval_examples, args.resamples = 32, 200
    if args.budgets is None:
        args.budgets = [8, 16] if args.quick else [32, 128, 512, 1024]
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    from fisher_jax.parallel import use_cpu_cores

    use_cpu_cores(args.cpu_devices, strict=False)  # before JAX computes anything
    if args.compile_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(Path(args.compile_cache).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    import fisher_jax as fj
    from fisher_jax.errors import FisherJaxError
    from fisher_jax.tree import did_you_mean

    by_label = {m.label: m for m in METHODS}
    for label in args.methods:
        if label not in by_label:
            raise FisherJaxError(f"unknown method '{label}'{did_you_mean(label, by_label)}; "
                                 f"choose from {', '.join(by_label)}")
    methods = [by_label[label] for label in args.methods]
    root = Path(args.models_root).expanduser()
    missing = [t for t in args.tasks if not (root / t / "config.json").is_file()]
    if missing:
        raise FisherJaxError(f"no fine-tuned model for {', '.join(missing)} under {root}")
    machine = machine_info()
    log(f"[sweep] {machine['device_kind']} x{machine['num_devices']} ({machine['cpu_count']} CPUs), "
        f"tasks {args.tasks}, budgets {args.budgets}")
    t0 = time.perf_counter()
    models = {t: fj.from_pretrained(str(root / t)) for t in args.tasks}
    tokenizer = fj.load_tokenizer(models[args.tasks[0]])
    caps = {"fisher_nodes[batch]": args.batch_max, "mask_fisher": args.mask_max, "full_fisher": args.full_max, "gram": args.gram_max}
    norm = {} if args.normalize == "none" else {"normalize": args.normalize}
    result = run_sweep(models, tokenizer, methods, args.budgets, caps, args.eval_examples, args.glue_dir,
                       args.resamples, args.seed, args.eval_seed,
                       merge_kwargs={"fisher": norm, "fisher_nodes": norm})
    machine["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine, "settings": {**vars(args), "models_root": str(root)},
           "models": {t: str(root / t) for t in args.tasks}, "wall_s": time.perf_counter() - t0,
           **result, "table": table(result)}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    if args.plot:
        plot(result, Path(args.plot))
    print(table(result))
    log(f"[sweep] wrote {path}" + (f" and {args.plot}" if args.plot else "") + f" in {out['wall_s']:.0f} s")
    return out


if __name__ == "__main__":
    main()
