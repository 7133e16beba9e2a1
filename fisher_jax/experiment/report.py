"""Tables and plots of an experiment's ``results.json``, every score with a 95 % bootstrap interval.

Scores are each task's GLUE score (the mean of its metrics). "Normalised" = a merged model's task
score / the same replicate's individual model's score on that task, averaged over the subset's
tasks (and then over pairs). Intervals come from one joint percentile bootstrap
(:func:`fisher_jax.experiment.uncertainty.joint_bootstrap`): per draw, the fine-tuning seeds
(replicates) are resampled and every task's scored dev rows are resampled once, shared by every
model scored on that task, so all differences are paired.

``results`` layout (written by :mod:`fisher_jax.experiment.runner`): ``replicates`` R,
``eval_rows[task] = {split, rows, total, seed}``, ``labels[task]`` (per scored row),
``individual[str(r)][task] = {metrics, score, predictions}``, ``cells[key] = {label, method,
subset, replicate, scores[task] = {metrics, score, predictions}, ...}``, ``timings``. Cell keys
are opaque here. Method order is the config's; subsets are pairs (in order of appearance), then
larger subsets.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Hashable, Mapping, Optional

import numpy as np

from .config import CLASSIC_METHODS, ExperimentConfig
from .uncertainty import Interval, joint_bootstrap

METRIC_NAMES = ("accuracy", "f1", "mcc", "pearson", "spearman")
MEASURES = ("pairs_score", "pairs_normalised", "all_score", "all_normalised")
NORMALIZED_SUFFIX = "_normalized"


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What the results hold, in table order."""

    replicates: int
    tasks: tuple[str, ...]
    labels: tuple[str, ...]  # config method labels that have at least one cell
    subsets: tuple[tuple[str, ...], ...]
    all_subset: Optional[tuple[str, ...]]
    cells: Mapping[tuple[str, tuple[str, ...], int], Mapping[str, Any]]  # (label, subset, replicate) -> cell
    individual: Mapping[tuple[int, str], Mapping[str, Any]]  # (replicate, task) -> metrics

    @property
    def pairs(self) -> list[tuple[str, ...]]:
        return [s for s in self.subsets if len(s) == 2]


def _modern(results: Mapping[str, Any]) -> dict[str, Any]:
    """Results in the current layout; a file of the single-seed layout (individual[task], cells
    keyed ``label|a+b`` without label/subset/replicate) is read as replicate 0."""
    out = dict(results)
    ind = results.get("individual") or {}
    if ind and all(isinstance(v, Mapping) and "score" in v for v in ind.values()):
        out["individual"] = {"0": dict(ind)}
    cells = {}
    for key, cell in (results.get("cells") or {}).items():
        if "label" not in cell:
            label, _, subset = str(key).partition("|")
            cell = {**cell, "label": label, "subset": subset.split("+"), "replicate": 0}
        cells[key] = cell
    out["cells"] = cells
    out.setdefault("replicates", len(out["individual"]) or 1)
    return out


def _layout(results: Mapping[str, Any], config: ExperimentConfig) -> _Layout:
    cells: dict[tuple[str, tuple[str, ...], int], Mapping[str, Any]] = {}
    order: list[tuple[str, ...]] = []
    for cell in results["cells"].values():
        subset = tuple(cell["subset"])
        cells[(str(cell["label"]), subset, int(cell.get("replicate", 0)))] = cell
        if subset not in order:
            order.append(subset)
    subsets = tuple(sorted(order, key=lambda s: (len(s) > 2, order.index(s))))
    present = {label for label, _, _ in cells}
    labels = tuple(dict.fromkeys(m.label for m in config.methods if m.label in present))
    individual = {(int(r), t): m for r, per_task in results["individual"].items() for t, m in per_task.items()}
    tasks = tuple(t for t in config.task_names if any(t == u for _, u in individual)
                  or any(t in s for s in subsets))
    everything = set(config.task_names)
    all_subset = next((s for s in subsets if len(s) > 2 and set(s) == everything), None)
    return _Layout(int(results.get("replicates") or 1), tasks, labels, subsets, all_subset, cells, individual)


def _comparisons(labels: tuple[str, ...]) -> list[tuple[str, str]]:
    """(A, B) differences the report shows: every method vs simple, fisher and regmean, every
    fisher_nodes* vs every regmean* and every newer method (not in the seed papers' columns), and
    every ``X_normalized`` vs ``X``; no pair twice."""
    out: list[tuple[str, str]] = []

    def add(a: str, b: str) -> None:
        if a != b and (a, b) not in out and (b, a) not in out:
            out.append((a, b))

    for base in ("simple", "fisher", "regmean"):
        if base in labels:
            for a in labels:
                add(a, base)
    for a in (x for x in labels if x.startswith("fisher_nodes")):
        for b in (x for x in labels if x.startswith("regmean")):
            add(a, b)
    for a in (x for x in labels if x not in CLASSIC_METHODS):
        for b in (x for x in labels if x.startswith("fisher_nodes")):
            add(a, b)
    for a in labels:
        if a.endswith(NORMALIZED_SUFFIX) and a[:-len(NORMALIZED_SUFFIX)] in labels:
            add(a, a[:-len(NORMALIZED_SUFFIX)])
    return out


# --------------------------------------------------------------------------- the statistics
def _ind_key(r: int, task: str) -> tuple:
    return ("ind", r, task)


def _cell_key(label: str, subset: tuple[str, ...], r: int, task: str) -> tuple:
    return ("cell", label, subset, r, task)


def _cell_arrays(lay: _Layout, scores: Mapping[Hashable, np.ndarray], d: int
                 ) -> tuple[dict, dict]:
    """Per (label, subset): ``[d, R]`` subset-mean score and normalised score (NaN where missing)."""
    raw, norm = {}, {}
    for label in lay.labels:
        for s in lay.subsets:
            r_raw = np.full((d, lay.replicates), np.nan)
            r_norm = np.full((d, lay.replicates), np.nan)
            for r in range(lay.replicates):
                if (label, s, r) not in lay.cells:
                    continue
                merged = np.stack([scores[_cell_key(label, s, r, t)] for t in s])  # [|s|, d]
                ind = np.stack([scores.get(_ind_key(r, t), np.full(d, np.nan)) for t in s])
                r_raw[:, r] = merged.mean(axis=0)
                with np.errstate(invalid="ignore", divide="ignore"):
                    ratio = np.where(ind != 0, merged / np.where(ind != 0, ind, 1.0), np.nan)
                r_norm[:, r] = ratio.mean(axis=0)
            raw[(label, s)], norm[(label, s)] = r_raw, r_norm
    return raw, norm


def _nanmean0(arrays: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Elementwise mean over ``arrays`` ignoring NaN (NaN where all are NaN)."""
    if not arrays:
        return np.full(shape, np.nan)
    stack = np.stack(arrays)
    ok = ~np.isnan(stack)
    n = ok.sum(axis=0)
    return np.where(n > 0, np.where(ok, stack, 0.0).sum(axis=0) / np.maximum(n, 1), np.nan)


def _statistic(lay: _Layout, comparisons: list[tuple[str, str]]):
    """The report's statistics as one function of the cell scores (see :func:`summary`)."""

    def stat(scores: Mapping[Hashable, np.ndarray]) -> dict[Hashable, np.ndarray]:
        d = len(next(iter(scores.values())))
        shape = (d, lay.replicates)
        raw, norm = _cell_arrays(lay, scores, d)
        out: dict[Hashable, np.ndarray] = {}
        for label in lay.labels:
            out[(label, "pairs_score")] = _nanmean0([raw[(label, s)] for s in lay.pairs], shape)
            out[(label, "pairs_normalised")] = _nanmean0([norm[(label, s)] for s in lay.pairs], shape)
            full = lay.all_subset
            out[(label, "all_score")] = raw[(label, full)] if full else np.full(shape, np.nan)
            out[(label, "all_normalised")] = norm[(label, full)] if full else np.full(shape, np.nan)
            for s in lay.subsets:
                out[("cell", label, s)] = raw[(label, s)]
        for a, b in comparisons:
            for m in ("pairs_normalised", "all_normalised"):
                out[("diff", a, b, m)] = out[(a, m)] - out[(b, m)]
        for t in lay.tasks:
            out[("ind", t)] = np.stack([scores.get(_ind_key(r, t), np.full(d, np.nan))
                                        for r in range(lay.replicates)], axis=1)
        return out

    return stat


def _stored_scores(lay: _Layout) -> dict[Hashable, float]:
    out: dict[Hashable, float] = {_ind_key(r, t): float(m["score"]) for (r, t), m in lay.individual.items()}
    for (label, s, r), cell in lay.cells.items():
        for t in s:
            out[_cell_key(label, s, r, t)] = float(cell["scores"][t]["score"])
    return out


def _predictions(results: Mapping[str, Any], lay: _Layout) -> Optional[dict[Hashable, tuple[str, Any]]]:
    """Every cell's dev predictions for the bootstrap, or None if any (or the labels) are missing."""
    labels = results.get("labels") or {}
    out: dict[Hashable, tuple[str, Any]] = {}
    for (r, t), m in lay.individual.items():
        if "predictions" not in m or t not in labels:
            return None
        out[_ind_key(r, t)] = (t, m["predictions"])
    for (label, s, r), cell in lay.cells.items():
        if label not in lay.labels:
            continue
        for t in s:
            sc = cell["scores"][t]
            if "predictions" not in sc or t not in labels:
                return None
            out[_cell_key(label, s, r, t)] = (t, sc["predictions"])
    return out


def _wins(lay: _Layout, point: Mapping[Hashable, float], a: str, b: str) -> tuple[int, int]:
    """(pairs x seeds where A's normalised score beats B's, pairs x seeds where both exist)."""
    arrays = {k: np.array([v]) for k, v in point.items()}
    _, norm = _cell_arrays(lay, arrays, 1)
    va = np.stack([norm[(a, s)][0] for s in lay.pairs]) if lay.pairs else np.zeros((0, lay.replicates))
    vb = np.stack([norm[(b, s)][0] for s in lay.pairs]) if lay.pairs else np.zeros((0, lay.replicates))
    both = np.isfinite(va) & np.isfinite(vb)
    return int(np.sum((va > vb) & both)), int(np.sum(both))


def _intervals(results: Mapping[str, Any], lay: _Layout, comparisons: list[tuple[str, str]],
               confidence: float, n_resamples: int, seed: int, resample_seeds: bool
               ) -> tuple[dict[Hashable, Interval], bool]:
    stat = _statistic(lay, comparisons)
    preds = _predictions(results, lay)
    if preds:
        return joint_bootstrap(results["labels"], preds, stat, lay.replicates, confidence, n_resamples, seed,
                               resample_seeds), True
    # No predictions stored (an older results file): the point estimates, without intervals.
    values = stat({k: np.array([v]) for k, v in _stored_scores(lay).items()})
    nan = float("nan")
    return {name: Interval(float(np.nanmean(v[0])) if np.isfinite(v[0]).any() else nan, nan, nan,
                           tuple(float(x) for x in v[0]), float(confidence))
            for name, v in values.items()}, False


def summary(results: Mapping[str, Any], config: ExperimentConfig, confidence: float = 0.95,
            n_resamples: int = 2000, seed: int = 0, resample_seeds: bool = True) -> dict[str, Any]:
    """Per-method averages and method-vs-method differences, each with a bootstrap interval.

    ``methods[label]``: ``pairs_score`` (mean over pairs of the pair's mean task score),
    ``pairs_normalised`` (mean over pairs of mean_t merged_t / individual_t, the same replicate's
    individual model), ``all_score`` / ``all_normalised`` (the merge of every task), each
    ``{point, low, high, seed_mean, seed_std, per_seed, confidence}`` (point = mean over seeds on
    all scored rows; interval: joint percentile bootstrap over seeds and dev rows,
    :func:`fisher_jax.experiment.uncertainty.joint_bootstrap`), and ``num_pairs``.
    ``differences``: A - B of ``pairs_normalised`` and ``all_normalised`` (same draws for both,
    so paired), each with ``significant`` (the interval excludes 0); ``significant`` at the top
    is the pairs' one; ``wins``/``comparisons``: pairs x seeds where A's normalised score > B's.
    ``individual[task]``, ``cells[label][a+b]``: mean score over seeds with intervals.
    ``bootstrap`` records the method. Config labels without results are left out.
    """
    results = _modern(results)
    lay = _layout(results, config)
    comparisons = _comparisons(lay.labels)
    iv, bootstrapped = _intervals(results, lay, comparisons, confidence, n_resamples, seed, resample_seeds)
    point = _stored_scores(lay)
    methods = {label: {**{m: iv[(label, m)].to_dict() for m in MEASURES},
                       "num_pairs": sum(any((label, s, r) in lay.cells for r in range(lay.replicates))
                                        for s in lay.pairs)}
               for label in lay.labels}
    differences = []
    for a, b in comparisons:
        entry: dict[str, Any] = {"a": a, "b": b}
        for m in ("pairs_normalised", "all_normalised"):
            x = iv[("diff", a, b, m)]
            entry[m] = {**x.to_dict(), "significant": x.excludes_zero}
        entry["significant"] = entry["pairs_normalised"]["significant"]
        entry["wins"], entry["comparisons"] = _wins(lay, point, a, b)
        differences.append(entry)
    individual = {}
    for t in lay.tasks:
        rows = [lay.individual[(r, t)] for r in range(lay.replicates) if (r, t) in lay.individual]
        metrics = {k: float(np.mean([m[k] for m in rows])) for k in METRIC_NAMES if rows and all(k in m for m in rows)}
        individual[t] = {**iv[("ind", t)].to_dict(), "metrics": metrics}
    cells = {label: {"+".join(s): iv[("cell", label, s)].to_dict() for s in lay.subsets
                     if any((label, s, r) in lay.cells for r in range(lay.replicates))} for label in lay.labels}
    return {"methods": methods, "differences": differences, "individual": individual, "cells": cells,
            "bootstrap": {"method": "percentile" if bootstrapped else "none (no predictions stored)",
                          "confidence": confidence, "n_resamples": n_resamples, "seed": seed,
                          "resample_seeds": resample_seeds, "replicates": lay.replicates}}


# --------------------------------------------------------------------------- markdown
def _fmt(x: Optional[float], pct: bool = True) -> str:
    return "—" if x is None or not np.isfinite(x) else (f"{100 * x:.1f}" if pct else f"{x:.3f}")


def _ci(e: Mapping[str, Any]) -> str:
    return "—" if not np.isfinite(e["low"]) else f"[{_fmt(e['low'])}, {_fmt(e['high'])}]"


def _est(e: Mapping[str, Any]) -> str:
    """``point [low, high] ±seed-std`` (×100)."""
    spread = f" ±{_fmt(e['seed_std'])}" if np.isfinite(e["seed_std"]) else ""
    return f"{_fmt(e['point'])} {_ci(e)}{spread}".replace(" —", "") if np.isfinite(e["point"]) else "—"


def _subset_name(s: tuple[str, ...], lay: _Layout) -> str:
    if s == lay.all_subset and len(s) > 3:
        return f"all {len(s)}"
    return "+".join(s)


def scored_rows_line(results: Mapping[str, Any]) -> str:
    """Which dev rows were scored, per task: "seeded random 500 of 1500 dev rows (seed 0)" or
    "all 277 dev rows"."""
    parts = []
    for task, e in (results.get("eval_rows") or {}).items():
        n, total, split = len(e.get("rows", [])), int(e.get("total", len(e.get("rows", [])))), e.get("split", "dev")
        parts.append(f"{task}: all {total} {split} rows" if n == total
                     else f"{task}: seeded random {n} of {total} {split} rows (seed {e.get('seed', 0)})")
    return ("Scored rows — " + "; ".join(parts) + ".") if parts else "Scored rows: not recorded."


def markdown_table(results: Mapping[str, Any], config: ExperimentConfig,
                   summ: Optional[Mapping[str, Any]] = None) -> str:
    """The report: individual models, merged cells, averages and differences (95 % intervals),
    time per stage. ``summ``: a :func:`summary` of these results (computed when not given)."""
    results = _modern(results)
    lay = _layout(results, config)
    summ = summary(results, config) if summ is None else summ
    boot = summ["bootstrap"]
    lines = [f"# {config.name}", "",
             "Scores are ×100: each task's GLUE score (mean of its dev metrics); normalised = merged / "
             "the same seed's individual model. Each entry: mean over fine-tuning seeds "
             f"[{100 * boot['confidence']:.0f} % interval] ±std over seeds. Intervals: {boot['method']} "
             f"bootstrap, {boot['n_resamples']} draws, resampling {lay.replicates} seed(s)"
             f"{' with replacement' if boot['resample_seeds'] else ' (fixed)'} and each task's dev rows "
             "(the same rows for every model in a draw, so differences are paired).", "",
             scored_rows_line(results), "", "## Individual models", "",
             "| task | score | metrics (mean over seeds) | per seed |", "|---|---|---|---|"]
    for t, e in summ["individual"].items():
        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in e["metrics"].items())
        lines.append(f"| {t} | {_est(e)} | {metrics} | {' / '.join(_fmt(v) for v in e['per_seed'])} |")
    lines += ["", "## Merged: mean score of the subset's tasks (per-task means in brackets)", "",
              "| tasks | " + " | ".join(lay.labels) + " |", "|---|" + "---|" * len(lay.labels)]
    for s in lay.subsets:
        row = []
        for label in lay.labels:
            e = summ["cells"].get(label, {}).get("+".join(s))
            if e is None:
                row.append("—")
                continue
            per_task = [np.mean([lay.cells[(label, s, r)]["scores"][t]["score"] for r in range(lay.replicates)
                                 if (label, s, r) in lay.cells]) for t in s]
            row.append(f"{_est(e)} ({'/'.join(_fmt(v) for v in per_task)})")
        lines.append(f"| {_subset_name(s, lay)} | " + " | ".join(row) + " |")
    lines += ["", "## Averages", "",
              "| method | pairs: score | pairs: normalised | all-task: score | all-task: normalised |",
              "|---|---|---|---|---|"]
    for label, r in summ["methods"].items():
        lines.append(f"| {label} | " + " | ".join(_est(r[m]) for m in MEASURES) + " |")
    lines += ["", "## Differences (normalised score, A − B; significant: the interval excludes 0)", "",
              "| A − B | pairs: Δ | 95 % interval | significant | all-task: Δ | 95 % interval | significant "
              "| wins (pairs × seeds) |", "|---|---|---|---|---|---|---|---|"]
    for d in summ["differences"]:
        p, a = d["pairs_normalised"], d["all_normalised"]
        lines.append(f"| {d['a']} − {d['b']} | {_signed(p['point'])} | {_ci(p)} | {_yes(p)} | "
                     f"{_signed(a['point'])} | {_ci(a)} | {_yes(a)} | {d['wins']} of {d['comparisons']} |")
    lines += merge_notes(results)
    lines += ["", "## Time per stage (seconds, this machine)", "", "| stage | seconds |", "|---|---|"]
    for stage, sec in (results.get("timings") or {}).items():
        lines.append(f"| {stage} | {sec:.1f} |")
    return "\n".join(lines) + "\n"


def _signed(x: float) -> str:
    return "—" if not np.isfinite(x) else f"{100 * x:+.1f}"


def _yes(e: Mapping[str, Any]) -> str:
    return "—" if not np.isfinite(e["low"]) else ("yes" if e["significant"] else "no")


# --------------------------------------------------------------------------- plots
def merge_notes(results: dict[str, Any]) -> list[str]:
    """Markdown lines on what the merges reported: each distinct warning with how many cells gave
    it, and RegMean's fallback (directions that kept the simple mean) summed over layers."""
    warnings_seen: dict[str, int] = {}
    fallback: dict[str, list[tuple[int, int, int]]] = {}
    for cell in results.get("cells", {}).values():
        report = cell.get("report") or {}
        for w in report.get("warnings", []):
            label = str(cell.get("label"))
            key = w if w.startswith(f"{label}:") else f"{label}: {w}"
            warnings_seen[key] = warnings_seen.get(key, 0) + 1
        layers = (report.get("diagnostics") or {}).get("regmean") or {}
        if layers:
            kept = sum(int(v.get("fallback", 0)) for v in layers.values())
            dims = sum(int(v.get("dims", 0)) for v in layers.values())
            over = sum(1 for v in layers.values() if v.get("dims") and v.get("fallback", 0) > 0.1 * v["dims"])
            fallback.setdefault(cell.get("label", "regmean"), []).append((kept, dims, over))
    lines: list[str] = []
    if fallback:
        lines += ["", "## RegMean: directions that kept the simple mean", "",
                  "| method | cells | directions kept at the mean / all (mean per cell) | layers above 10 % (mean per cell) |",
                  "|---|---|---|---|"]
        for label, rows in fallback.items():
            kept, dims, over = (float(np.mean([r[i] for r in rows])) for i in range(3))
            lines.append(f"| {label} | {len(rows)} | {kept:.0f} / {dims:.0f} | {over:.1f} |")
    if warnings_seen:
        lines += ["", "## Merge warnings", "", "| cells | warning |", "|---|---|"]
        lines += [f"| {n} | {w} |" for w, n in sorted(warnings_seen.items(), key=lambda kv: -kv[1])]
    return lines


def plot_heatmap(results: Mapping[str, Any], config: ExperimentConfig, path: Path) -> None:
    """Task subset × method heatmap of normalised scores (mean over seeds)."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's inline backend is left alone

    results = _modern(results)
    lay = _layout(results, config)
    point = {k: np.array([v]) for k, v in _stored_scores(lay).items()}
    _, norm = _cell_arrays(lay, point, 1)
    grid = np.array([[np.nanmean(norm[(label, s)][0]) * 100 if np.isfinite(norm[(label, s)][0]).any() else np.nan
                      for label in lay.labels] for s in lay.subsets]).reshape(len(lay.subsets), len(lay.labels))
    fig = Figure(figsize=(1.1 * len(lay.labels) + 2.5, 0.45 * len(lay.subsets) + 1.8))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="RdYlGn", vmin=np.nanmin(grid) if np.isfinite(grid).any() else 0, vmax=100,
                   aspect="auto")
    ax.set_xticks(range(len(lay.labels)), lay.labels, rotation=35, ha="right")
    ax.set_yticks(range(len(lay.subsets)), [_subset_name(s, lay) for s in lay.subsets])
    for i in range(len(lay.subsets)):
        for j in range(len(lay.labels)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
    seeds = f", mean of {lay.replicates} seeds" if lay.replicates > 1 else ""
    fig.colorbar(im, ax=ax, label="normalised score (% of individual)")
    ax.set_title(f"{config.name}: merged / individual score{seeds}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_bars(results: Mapping[str, Any], config: ExperimentConfig, path: Path,
              summ: Optional[Mapping[str, Any]] = None) -> None:
    """Average normalised score per method over pairs and of the all-task merge, with 95 % error bars."""
    from matplotlib.figure import Figure

    summ = summary(results, config) if summ is None else summ
    labels = list(summ["methods"])
    x = np.arange(len(labels))
    fig = Figure(figsize=(1.0 * len(labels) + 2.5, 4))
    ax = fig.subplots()
    values = []
    for offset, m, name in ((-0.2, "pairs_normalised", "mean over pairs"), (0.2, "all_normalised", "all-task merge")):
        est = [summ["methods"][label][m] for label in labels]
        y = np.array([100 * e["point"] for e in est])
        err = np.array([[100 * (e["point"] - e["low"]) for e in est], [100 * (e["high"] - e["point"]) for e in est]])
        ax.bar(x + offset, y, 0.4, label=name, yerr=np.where(np.isfinite(err), err, 0), capsize=3)
        values += [v for v in np.r_[y, y - err[0], y + err[1]] if np.isfinite(v)]
    ax.axhline(100, color="k", lw=0.8, ls="--")
    if values:
        ax.set_ylim(max(0, min(values) - 5), max(101, max(values) + 3))
    ax.set_xticks(x, labels, rotation=35, ha="right")
    ax.set_ylabel("normalised score (% of individual)")
    ax.set_title(f"{config.name} (95 % intervals)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_differences(results: Mapping[str, Any], config: ExperimentConfig, path: Path,
                     summ: Optional[Mapping[str, Any]] = None) -> None:
    """Forest plot: each method-vs-method difference of normalised score with its 95 % interval."""
    from matplotlib.figure import Figure

    summ = summary(results, config) if summ is None else summ
    diffs = summ["differences"]
    fig = Figure(figsize=(7, 0.4 * max(len(diffs), 1) + 1.5))
    ax = fig.subplots()
    y = np.arange(len(diffs))[::-1]
    for offset, m, name, color in ((0.15, "pairs_normalised", "mean over pairs", "C0"),
                                   (-0.15, "all_normalised", "all-task merge", "C1")):
        pt = np.array([100 * d[m]["point"] for d in diffs])
        lo = np.array([100 * d[m]["low"] for d in diffs])
        hi = np.array([100 * d[m]["high"] for d in diffs])
        ok = np.isfinite(lo) & np.isfinite(hi)
        ax.hlines(y[ok] + offset, lo[ok], hi[ok], color=color, lw=2)
        ax.plot(pt, y + offset, "o", color=color, label=name, ms=5)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, [f"{d['a']} − {d['b']}" for d in diffs])
    ax.set_xlabel("difference of normalised score (points of % individual)")
    ax.set_title(f"{config.name}: differences with 95 % intervals")
    if diffs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
