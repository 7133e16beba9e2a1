"""Print the zoo's RESULTS table (markdown) from ``zoos.json`` (written by ``fisher-jax zoo --seeds``).

    python benchmarks/zoo_table.py [~/.cache/fisher_jax/zoo/minilm/zoos.json] [--copy benchmarks/results/zoo.json]

One row per task and seed: budget, dev metrics of the saved model (all dev rows), the chosen step and
its held-out score, throughput and wall time; then the mean and spread over seeds per task.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

NAMES = {"sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "rte": "RTE", "cola": "CoLA"}
METRIC_NAMES = {"accuracy": "accuracy", "f1": "F1", "pearson": "Pearson", "spearmanr": "Spearman",
                "spearman": "Spearman", "mcc": "MCC", "matthews_corrcoef": "MCC"}


def _metrics(m: dict) -> str:
    parts = [f"{METRIC_NAMES[k]} {100 * v:.1f}" for k, v in m.items() if k in METRIC_NAMES]
    if len(parts) > 1:
        return ", ".join(parts) + f" (score {100 * m['score']:.1f})"
    return parts[0]


def _budget(b: dict, rows: int) -> str:
    return f"{rows:,} rows × {b['num_epochs']:g} epoch, length {b['max_length']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("zoos", nargs="?", default="~/.cache/fisher_jax/zoo/minilm/zoos.json", help="zoos.json")
    p.add_argument("--copy", default=None, help="also copy zoos.json here (e.g. benchmarks/results/zoo.json)")
    args = p.parse_args()
    path = Path(args.zoos).expanduser()
    data = json.loads(path.read_text())
    rows, per_task = [], {}
    for seed, zoo in sorted(data["seeds"].items(), key=lambda kv: int(kv[0])):
        for task, t in zoo["tasks"].items():
            best = t.get("best_step")
            held = next((h.get("score") for h in t.get("held_out_curve", []) if h.get("step") == best), None)
            held_txt = f" ({100 * held:.1f})" if isinstance(held, (int, float)) else ""
            rows.append(f"| {NAMES.get(task, task)} | {_budget(t['budget'], t['train_examples'])} | {seed} | "
                        f"{_metrics(t['metrics'])} | {best} / {t['total_steps']}{held_txt} | "
                        f"{t['train_examples_per_s']:.1f} | {t['wall_time_s'] / 60:.1f} min |")
            per_task.setdefault(task, []).append(100 * t["metrics"]["score"])
    print("| task | budget | seed | dev metrics | best step / steps (held-out score) | train ex/s | wall |")
    print("|---|---|---|---|---|---:|---:|")
    print("\n".join(rows))
    print()
    print("| task | seeds | dev score, mean ± s.d. over seeds | range |")
    print("|---|---:|---|---|")
    for task, s in per_task.items():
        a = np.asarray(s)
        sd = a.std(ddof=1) if len(a) > 1 else float("nan")
        print(f"| {NAMES.get(task, task)} | {len(a)} | {a.mean():.1f} ± {sd:.1f} | {a.min():.1f}–{a.max():.1f} |")
    if args.copy:
        shutil.copyfile(path, args.copy)


if __name__ == "__main__":
    main()
