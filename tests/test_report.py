"""Experiment report on a synthetic results dict: 2 replicates (seeds), 3 tasks, point estimates
by hand, significance, missing labels, the markdown and the plots."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fisher_jax.data.metrics import compute_metrics
from fisher_jax.experiment import report
from fisher_jax.experiment.config import ExperimentConfig, MethodSpec

TASKS = {"sst2": (200, 872), "rte": (277, 277), "stsb": (150, 1500)}  # scored rows, dev total
R = 2
# how good each model is: probability of a right class / regression noise
QUALITY = {"individual": (0.85, 0.6), "simple": (0.70, 1.2), "fisher": (0.72, 1.1),
           "fisher_nodes": (0.75, 1.0), "regmean": (0.97, 0.2), "stray": (0.5, 2.0)}


def _predict(task, y, quality, rng):
    acc, noise = quality
    if task == "stsb":
        return np.clip(y + rng.normal(0, noise, len(y)), 0, 5)
    return np.where(rng.random(len(y)) < acc, y, 1 - y)


def _entry(task, p, y):
    return {**compute_metrics(task, p, y), "predictions": p.tolist()}


def _results():
    rng = np.random.default_rng(0)
    labels = {t: (rng.uniform(0, 5, n) if t == "stsb" else rng.integers(0, 2, n)) for t, (n, _) in TASKS.items()}
    individual = {str(r): {t: _entry(t, _predict(t, y, QUALITY["individual"], rng), y) for t, y in labels.items()}
                  for r in range(R)}
    subsets = list(itertools.combinations(TASKS, 2)) + [tuple(TASKS)]
    cells = {}
    for label in ("simple", "fisher", "fisher_nodes", "regmean", "stray"):
        for s, r in itertools.product(subsets, range(R)):
            cells[f"opaque-{len(cells)}"] = {
                "label": label, "method": label, "subset": list(s), "replicate": r, "kwargs": {},
                "scores": {t: _entry(t, _predict(t, labels[t], QUALITY[label], rng), labels[t]) for t in s},
                "report": {"warnings": [], "diagnostics": {}}, "merge_s": 0.1}
    # an identical copy of fisher_nodes under its "_normalized" twin's label
    for key, cell in list(cells.items()):
        if cell["label"] == "fisher_nodes":
            cells[key + "-copy"] = {**cell, "label": "fisher_nodes_normalized"}
    eval_rows = {t: {"split": "dev", "rows": sorted(rng.choice(total, n, replace=False).tolist()), "total": total,
                     "seed": 0} for t, (n, total) in TASKS.items()}
    return {"config": {}, "replicates": R, "eval_rows": eval_rows, "labels": {t: y.tolist() for t, y in labels.items()},
            "individual": individual, "cells": cells, "timings": {"evaluate": 3.0, "merge": 1.5}}


def _config():
    labels = ["simple", "ties", "fisher", "fisher_nodes", "fisher_nodes_normalized", "regmean"]  # ties: no cells
    return ExperimentConfig(name="synthetic", tasks=tuple((t, t) for t in TASKS),
                            methods=tuple(MethodSpec(m, m.replace("_normalized", "")) for m in labels))


@pytest.fixture(scope="module")
def results():
    return _results()


@pytest.fixture(scope="module")
def summ(results):
    return report.summary(results, _config(), n_resamples=400)


def _by_hand(results, label):
    """Mean over seeds of: mean over pairs of mean_t merged / individual; and the all-task merge's."""
    pairs, alls, pair_scores = [], [], []
    for r in range(R):
        norm, raw = [], []
        for cell in results["cells"].values():
            if cell["label"] != label or cell["replicate"] != r:
                continue
            s = cell["subset"]
            ratio = np.mean([cell["scores"][t]["score"] / results["individual"][str(r)][t]["score"] for t in s])
            if len(s) == 2:
                norm.append(ratio)
                raw.append(np.mean([cell["scores"][t]["score"] for t in s]))
            else:
                alls.append(ratio)
        pairs.append(np.mean(norm))
        pair_scores.append(np.mean(raw))
    return np.mean(pairs), np.mean(alls), np.mean(pair_scores), pairs


def test_point_estimates_equal_a_hand_computation(results, summ):
    for label in ("simple", "fisher", "fisher_nodes", "regmean"):
        pairs, alls, pair_scores, per_seed = _by_hand(results, label)
        m = summ["methods"][label]
        assert m["pairs_normalised"]["point"] == pytest.approx(pairs, abs=1e-12)
        assert m["pairs_normalised"]["per_seed"] == pytest.approx(per_seed, abs=1e-12)
        assert m["pairs_normalised"]["seed_std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
        assert m["all_normalised"]["point"] == pytest.approx(alls, abs=1e-12)
        assert m["pairs_score"]["point"] == pytest.approx(pair_scores, abs=1e-12)
        assert m["num_pairs"] == 3
        assert m["pairs_normalised"]["low"] < m["pairs_normalised"]["point"] < m["pairs_normalised"]["high"]
    ind = summ["individual"]["rte"]
    assert ind["point"] == pytest.approx(np.mean([results["individual"][str(r)]["rte"]["score"] for r in range(R)]))


def test_differences_significance_identity_and_missing_labels(summ):
    assert list(summ["methods"]) == ["simple", "fisher", "fisher_nodes", "fisher_nodes_normalized", "regmean"]
    diffs = {(d["a"], d["b"]): d for d in summ["differences"]}
    # vs simple, vs fisher, fisher_nodes* vs regmean*, the _normalized twin; no reversed duplicates
    assert ("fisher", "simple") in diffs and ("simple", "fisher") not in diffs
    assert {("regmean", "fisher"), ("fisher_nodes", "regmean"), ("fisher_nodes_normalized", "regmean"),
            ("fisher_nodes_normalized", "fisher_nodes")} <= set(diffs)
    assert not any("ties" in k or "stray" in k for k in diffs)  # no cells / not in the config
    better = diffs[("regmean", "simple")]
    assert better["significant"] and better["pairs_normalised"]["low"] > 0 and better["all_normalised"]["significant"]
    assert better["wins"] == better["comparisons"] == 3 * R
    twin = diffs[("fisher_nodes_normalized", "fisher_nodes")]
    assert twin["pairs_normalised"]["point"] == 0.0 and twin["pairs_normalised"]["low"] == 0.0
    assert twin["pairs_normalised"]["high"] == 0.0 and not twin["significant"] and twin["wins"] == 0


def test_markdown_has_scored_rows_every_method_and_intervals(results, summ):
    text = report.markdown_table(results, _config(), summ)
    assert "sst2: seeded random 200 of 872 dev rows (seed 0)" in text
    assert "rte: all 277 dev rows" in text
    for label in summ["methods"]:
        assert f"| {label} |" in text
    assert "ties" not in text
    assert "| regmean − simple |" in text and "| yes |" in text
    assert "| evaluate | 3.0 |" in text
    p = summ["methods"]["regmean"]["pairs_normalised"]
    assert f"[{100 * p['low']:.1f}, {100 * p['high']:.1f}]" in text


def test_plots_write_png_files(results, summ, tmp_path):
    config = _config()
    report.plot_heatmap(results, config, tmp_path / "heatmap.png")
    report.plot_bars(results, config, tmp_path / "bars.png", summ)
    report.plot_differences(results, config, tmp_path / "differences.png", summ)
    for name in ("heatmap", "bars", "differences"):
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_results_without_predictions_give_points_without_intervals(results):
    old = {"individual": {t: {k: v for k, v in m.items() if k != "predictions"}
                          for t, m in results["individual"]["0"].items()},
           "cells": {f"{c['label']}|{'+'.join(c['subset'])}": {"scores": {t: {"score": e["score"]}
                                                                      for t, e in c["scores"].items()}}
                     for c in results["cells"].values() if c["replicate"] == 0},
           "timings": {}}
    s = report.summary(old, _config())
    m = s["methods"]["simple"]["pairs_normalised"]
    assert np.isnan(m["low"]) and m["per_seed"] == pytest.approx([_by_hand(results, "simple")[3][0]])
    assert "Scored rows: not recorded." in report.markdown_table(old, _config(), s)


def test_merge_notes_count_warnings_and_regmean_fallback():
    from fisher_jax.experiment.report import merge_notes

    cells = {
        "a": {"label": "regmean", "report": {"warnings": ["w1"], "diagnostics": {"regmean": {
            "pooler/dense": {"fallback": 128, "dims": 384}, "encoder/layer/0/output/dense": {"fallback": 0, "dims": 1536}}}}},
        "b": {"label": "regmean", "report": {"warnings": ["w1"], "diagnostics": {"regmean": {
            "pooler/dense": {"fallback": 2, "dims": 384}, "encoder/layer/0/output/dense": {"fallback": 0, "dims": 1536}}}}},
        "c": {"label": "fisher", "report": {"warnings": ["mixed losses"]}},
    }
    text = "\n".join(merge_notes({"cells": cells}))
    assert "| regmean | 2 | 65 / 1920 | 0.5 |" in text  # (128 + 2) / 2 kept, one of two cells over 10 %
    assert "| 2 | regmean: w1 |" in text and "| 1 | fisher: mixed losses |" in text
    assert merge_notes({"cells": {}}) == []
