"""Tables and plots of an experiment's ``results.json`` (scores are each task's GLUE score:
the mean of its metrics; "normalised" = merged score / the individual model's score)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .config import ExperimentConfig


def _subsets_and_labels(results: dict[str, Any], config: ExperimentConfig):
    from .runner import subsets

    labels = [m.label for m in config.methods]
    return subsets(config), labels


def cell_scores(results: dict[str, Any], label: str, subset: tuple[str, ...]) -> dict[str, float] | None:
    cell = results["cells"].get(f"{label}|{'+'.join(subset)}")
    return None if cell is None else {t: cell["scores"][t]["score"] for t in subset}


def normalised(results: dict[str, Any], scores: dict[str, float]) -> float:
    ind = results["individual"]
    return float(np.mean([scores[t] / ind[t]["score"] if ind[t]["score"] else np.nan for t in scores]))


def summary(results: dict[str, Any], config: ExperimentConfig) -> dict[str, dict[str, float]]:
    """Per method: mean raw and normalised score over pairs, and the all-task merge's."""
    subs, labels = _subsets_and_labels(results, config)
    out = {}
    for label in labels:
        pair_raw, pair_norm, all_raw, all_norm = [], [], np.nan, np.nan
        for s in subs:
            sc = cell_scores(results, label, s)
            if sc is None:
                continue
            if len(s) == 2:
                pair_raw.append(np.mean(list(sc.values())))
                pair_norm.append(normalised(results, sc))
            else:
                all_raw, all_norm = float(np.mean(list(sc.values()))), normalised(results, sc)
        out[label] = {"pairs_score": float(np.mean(pair_raw)) if pair_raw else np.nan,
                      "pairs_normalised": float(np.mean(pair_norm)) if pair_norm else np.nan,
                      "all_score": all_raw, "all_normalised": all_norm, "num_pairs": len(pair_raw)}
    return out


def _fmt(x: float, pct: bool = True) -> str:
    return "—" if x is None or not np.isfinite(x) else (f"{100 * x:.1f}" if pct else f"{x:.3f}")


def markdown_table(results: dict[str, Any], config: ExperimentConfig) -> str:
    subs, labels = _subsets_and_labels(results, config)
    lines = [f"# {config.name}", "", "Scores are ×100: each task's GLUE score (mean of its dev metrics); "
             "normalised = merged / individual.", "", "## Individual models", "",
             "| task | metrics | score |", "|---|---|---|"]
    for task, m in results["individual"].items():
        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in m.items()
                            if k in ("accuracy", "f1", "mcc", "pearson", "spearman"))
        lines.append(f"| {task} | {metrics} | {_fmt(m['score'])} |")
    lines += ["", "## Merged: mean score of the subset's tasks (per-task scores in brackets)", "",
              "| tasks | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for s in subs:
        row = []
        for label in labels:
            sc = cell_scores(results, label, s)
            row.append("—" if sc is None else f"{_fmt(np.mean(list(sc.values())))} "
                       f"({'/'.join(_fmt(sc[t]) for t in s)})")
        name = "+".join(s) if len(s) <= 3 else f"all {len(s)}"
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    summ = summary(results, config)
    lines += ["", "## Averages", "", "| method | pairs: score | pairs: normalised | all-task: score | all-task: normalised |",
              "|---|---|---|---|---|"]
    for label in labels:
        r = summ[label]
        lines.append(f"| {label} | {_fmt(r['pairs_score'])} | {_fmt(r['pairs_normalised'])} | "
                     f"{_fmt(r['all_score'])} | {_fmt(r['all_normalised'])} |")
    lines += ["", "## Time per stage (seconds, this machine)", "", "| stage | seconds |", "|---|---|"]
    for stage, sec in results["timings"].items():
        lines.append(f"| {stage} | {sec:.1f} |")
    return "\n".join(lines) + "\n"


def plot_heatmap(results: dict[str, Any], config: ExperimentConfig, path: Path) -> None:
    """Task subset × method heatmap of normalised scores."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's inline backend is left alone

    subs, labels = _subsets_and_labels(results, config)
    grid = np.full((len(subs), len(labels)), np.nan)
    for i, s in enumerate(subs):
        for j, label in enumerate(labels):
            sc = cell_scores(results, label, s)
            if sc is not None:
                grid[i, j] = 100 * normalised(results, sc)
    fig = Figure(figsize=(1.1 * len(labels) + 2.5, 0.45 * len(subs) + 1.8))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="RdYlGn", vmin=np.nanmin(grid) if np.isfinite(grid).any() else 0, vmax=100,
                   aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    ax.set_yticks(range(len(subs)), ["+".join(s) if len(s) <= 3 else f"all {len(s)}" for s in subs])
    for i in range(len(subs)):
        for j in range(len(labels)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="normalised score (% of individual)")
    ax.set_title(f"{config.name}: merged / individual score")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_bars(results: dict[str, Any], config: ExperimentConfig, path: Path) -> None:
    """Average normalised score per method over pairs (and the all-task merge)."""
    from matplotlib.figure import Figure

    summ = summary(results, config)
    labels = list(summ)
    x = np.arange(len(labels))
    fig = Figure(figsize=(1.0 * len(labels) + 2.5, 4))
    ax = fig.subplots()
    pairs = [100 * summ[m]["pairs_normalised"] for m in labels]
    alls = [100 * summ[m]["all_normalised"] for m in labels]
    ax.bar(x - 0.2, pairs, 0.4, label="mean over pairs")
    ax.bar(x + 0.2, alls, 0.4, label="all-task merge")
    ax.axhline(100, color="k", lw=0.8, ls="--")
    finite = [v for v in pairs + alls if np.isfinite(v)]
    if finite:
        ax.set_ylim(max(0, min(finite) - 10), max(101, max(finite) + 3))
    ax.set_xticks(x, labels, rotation=35, ha="right")
    ax.set_ylabel("normalised score (% of individual)")
    ax.set_title(config.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
