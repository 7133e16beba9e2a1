"""benchmarks/budget_sweep.py: its pure helpers against hand computations, and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import fisher_jax as fj

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "budget_sweep.py"


@pytest.fixture(scope="module")
def bs():
    spec = importlib.util.spec_from_file_location("budget_sweep", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["budget_sweep"] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def test_pareto_front_keeps_exactly_the_non_dominated_points(bs):
    pts = [(0.0, 0.80), (1.0, 0.79), (2.0, 0.85), (3.0, 0.85), (4.0, 0.90), (0.5, 0.80)]
    # (1.0, .79) is dominated by (0, .80); (3, .85) by (2, .85); (0.5, .80) by (0, .80)
    assert bs.pareto_front(pts) == [0, 2, 4]
    assert bs.pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0]  # of duplicates, one


def test_budgets_respect_each_kinds_cap(bs):
    full = next(m for m in bs.METHODS if m.kind == "full_fisher")
    mask = next(m for m in bs.METHODS if m.kind == "mask_fisher")
    caps = {"full_fisher": 128, "mask_fisher": None}
    assert bs.budgets_for(full, [512, 32, 128], caps) == [32, 128]
    assert bs.budgets_for(mask, [512, 32, 128], caps) == [32, 128, 512]
    batch = next(m for m in bs.METHODS if m.estimator == "batch")
    assert bs.budgets_for(batch, [512, 32, 128], {**caps, batch.label: 32, "mask_fisher": 128}) == [32]
    assert bs.budgets_for(batch, [512, 32, 128], {**caps, batch.label: None, "mask_fisher": 128}) == [32, 128]


def test_normalised_is_the_mean_ratio(bs):
    assert bs.normalised({"a": 0.4, "b": 0.9}, {"a": 0.8, "b": 0.9}) == pytest.approx((0.5 + 1.0) / 2)


def test_warmup_batch_keeps_shapes_types_and_labels(bs):
    b = {"input_ids": np.arange(12, dtype=np.int32).reshape(3, 4), "attention_mask": np.zeros((3, 4), np.int32),
         "token_type_ids": np.zeros((3, 4), np.int32), "labels": np.array([0, 1, 1], np.int32),
         "weights": np.array([1, 1, 0], np.float32)}
    w = bs.warmup_batch(b, vocab_size=2000, seed=0)
    for k in b:
        assert w[k].shape == b[k].shape and w[k].dtype == b[k].dtype
    assert sorted(w["labels"]) == sorted(b["labels"])
    assert w["input_ids"].min() >= 1000 and w["input_ids"].max() < 2000
    assert w["weights"].all() and b["weights"][2] == 0  # the input is not modified
    assert len(bs.distinct_shapes([b, b, {**b, "input_ids": np.zeros((3, 8), np.int32)}])) == 2


def test_normalised_interval_matches_a_hand_bootstrap(bs):
    from fisher_jax.experiment.uncertainty import resample_indices

    rs = np.random.RandomState(0)
    n, B = 40, 300
    y = rs.randint(0, 2, n)
    ind = np.where(rs.rand(n) < 0.85, y, 1 - y)
    mer = np.where(rs.rand(n) < 0.7, y, 1 - y)
    ivs = bs.normalised_intervals({"sst2": y}, {"sst2": ind}, {("sst2", "x"): {"sst2": mer}}, n_resamples=B, seed=3)
    # by hand: the same rows for merged and individual in every draw, accuracy ratio, percentiles
    idx = resample_indices("sst2", n, B, seed=3)
    ratios = [(mer[i] == y[i]).mean() / (ind[i] == y[i]).mean() for i in idx]
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    iv = ivs["mean"]
    assert iv.point == pytest.approx((mer == y).mean() / (ind == y).mean())
    assert (iv.low, iv.high) == pytest.approx((lo, hi))
    assert (ivs["sst2+x"].low, ivs["sst2+x"].high) == pytest.approx((lo, hi))


def test_stats_batches_follow_each_estimators_data(bs, minilm_path, glue_dir):
    tok = fj.load_tokenizer(minilm_path)
    by = {m.label: m for m in bs.METHODS}
    released = bs.stats_batches(by["fisher_nodes[batch]"], "rte", 40, tok, str(glue_dir))
    # the released draw: 40 rows with replacement from RTE's 2490, batches of 32 in draw order
    draws = np.random.RandomState(0).choice(2490, 40)
    assert [len(b["weights"]) for b in released] == [32, 32]
    assert [int(b["weights"].sum()) for b in released] == [32, 8]
    full = bs.stats_batches(by["fisher[expected]"], "rte", 20, tok, str(glue_dir))
    assert [int(b["weights"].sum()) for b in full] == [8, 8, 4] and len(full[0]["weights"]) == 8
    labels = np.asarray(fj.data.load_split("rte", "train", str(glue_dir)).labels)
    np.testing.assert_array_equal(np.concatenate([b["labels"][:int(b["weights"].sum())] for b in released]),
                                  labels[draws])


def _tiny(num_labels: int, seed: int):
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=130, num_labels=num_labels)
    return fj.models.from_config(cfg, seed=seed)


def test_quick_sweep_end_to_end_writes_json_and_plot(bs, tmp_path, minilm_path, glue_dir):
    for task, labels, seed in (("rte", 2, 1), ("stsb", 1, 2)):
        _tiny(labels, seed).save_pretrained(tmp_path / "zoo" / task, tokenizer_from=minilm_path)
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    bs.main(["--quick", "--models-root", str(tmp_path / "zoo"), "--tasks", "rte", "stsb", "--glue-dir",
             str(glue_dir), "--methods", "regmean", "--budgets", "8",
             "--out", str(out), "--plot", str(png)])
    res = json.loads(out.read_text())
    assert png.stat().st_size > 1000 and res["machine"]["cpu_count"] and res["date"]
    assert [(r["method"], r["N"]) for r in res["summary"]] == [("regmean", 8)]
    assert {(s["task"], s["num_examples"]) for s in res["statistics"]} == {("rte", 8), ("stsb", 8)}
    assert all(s["seconds"] > 0 for s in res["statistics"])
    for r in res["summary"] + [res["simple"]["summary"]]:  # random models: ratios near 0/0, so no more
        assert np.isfinite(r["normalised"]) and r["ci"][0] <= r["ci"][1]
    cell = next(c for c in res["cells"] if c["method"] == "regmean")
    assert cell["normalised"] == pytest.approx(np.mean([cell["scores"][t] / res["individual"][t] for t in cell["pair"]]))
    assert cell["stats_seconds"] == pytest.approx(sum(s["seconds"] for s in res["statistics"] if s["method"] == "regmean"))
    assert len(res["eval_rows"]["rte"]) == 32
    assert res["pareto_front"] and {"method", "N"} <= set(res["pareto_front"][0])
