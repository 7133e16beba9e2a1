"""Bootstrap intervals: hand computations, scipy.stats.bootstrap, paired differences, and the
per-example predictions that evaluation returns for them."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fisher_jax.data.metrics import compute_metrics
from fisher_jax.errors import FisherJaxError
from fisher_jax.experiment import uncertainty as unc

# sst2-style rows: labels and which rows a model gets right -> its predictions.
Y4 = np.array([1, 0, 1, 1])


def _preds(correct, y=Y4):
    correct = np.asarray(correct, bool)
    return np.where(correct, y, 1 - y)


def test_scores_of_resamples_by_hand():
    p = _preds([1, 0, 1, 0])
    idx = np.array([[0, 0, 0, 0], [1, 1, 3, 3], [0, 1, 2, 3], [0, 2, 1, 2], [3, 2, 2, 2]])
    # correct rows 0 and 2: the fraction of draws landing on them
    np.testing.assert_allclose(unc.scores_of_resamples("sst2", p, Y4, idx), [1.0, 0.0, 0.5, 0.75, 0.75])
    # F1 of MRPC's positive class on draw [0, 1, 2, 3]: TP 2 (rows 0, 2), FP 1 (row 1), FN 1 (row 3)
    # -> 4 / 6; accuracy 2 / 4; score = their mean.
    assert unc.scores_of_resamples("mrpc", p, Y4, idx[2:3])[0] == pytest.approx((0.5 + 4 / 6) / 2)
    # the percentile interval at 50 %: the 25th and 75th percentiles of [0, .5, .75, .75, 1]
    assert unc.percentile_interval([1.0, 0.0, 0.5, 0.75, 0.75], 0.5) == (0.5, 0.75)


def test_joint_bootstrap_by_hand_with_written_draws():
    # two replicates; A and B per replicate, as correctness vectors on the four rows
    correct = {("A", 0): [1, 0, 1, 0], ("B", 0): [0, 0, 1, 0], ("A", 1): [1, 1, 1, 0], ("B", 1): [1, 1, 1, 1]}
    cells = {k: ("sst2", _preds(c)) for k, c in correct.items()}
    rows = np.array([[0, 0, 0, 0], [0, 1, 2, 3], [3, 3, 1, 2]])
    seeds = np.array([[0, 0], [1, 0], [1, 1]])

    def stat(s):
        return {"diff": np.stack([s[("A", r)] - s[("B", r)] for r in (0, 1)], axis=1)}

    iv = unc.joint_bootstrap({"sst2": Y4}, cells, stat, replicates=2, confidence=0.5,
                             row_indices={"sst2": rows}, seed_indices=seeds)["diff"]
    # per draw and seed (A - B): d0: (1 - 0, 1 - 1); d1: (.5 - .25, .75 - 1); d2: (.25 - .25, .5 - 1)
    # draws with the resampled seeds: d0 seeds (0, 0) -> 1; d1 (1, 0) -> 0; d2 (1, 1) -> -.5
    # percentiles 25 / 75 of [-.5, 0, 1] (linear): -.25 and .5
    assert iv.per_seed == (0.25, -0.25)
    assert iv.point == 0.0
    assert (iv.low, iv.high) == (-0.25, 0.5)
    assert iv.seed_std == pytest.approx(np.std([0.25, -0.25], ddof=1))
    # seeds not resampled: every draw averages both seeds: d0 .5, d1 0, d2 -.25
    fixed = unc.joint_bootstrap({"sst2": Y4}, cells, stat, 2, 0.5, row_indices={"sst2": rows},
                                resample_seeds=False)["diff"]
    assert (fixed.low, fixed.high) == pytest.approx((-0.125, 0.25))


def test_one_replicate_is_the_row_bootstrap():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    p = np.where(rng.random(120) < 0.8, y, 1 - y)
    idx = unc.resample_indices("sst2", 120, 500, seed=7)
    expected = np.percentile(unc.scores_of_resamples("sst2", p, y, idx), [2.5, 97.5])
    point, low, high = unc.score_interval("sst2", p, y, n_resamples=500, seed=7)
    assert point == pytest.approx(np.mean(p == y))
    np.testing.assert_allclose([low, high], expected)
    # draws do not depend on how many are generated at once
    np.testing.assert_array_equal(unc.resample_indices("sst2", 120, 70, seed=7, start=100), idx[100:170])


def test_accuracy_interval_agrees_with_scipy_bootstrap():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    p = np.where(rng.random(n) < 0.75, y, 1 - y)
    point, low, high = unc.score_interval("sst2", p, y, confidence=0.9, n_resamples=4000, seed=1)
    ref = stats.bootstrap(((p == y).astype(float),), np.mean, method="percentile", confidence_level=0.9,
                          n_resamples=4000, random_state=np.random.default_rng(2)).confidence_interval
    se = np.sqrt(point * (1 - point) / n)  # ~0.022: endpoints agree to a small multiple of MC error
    assert point == pytest.approx(np.mean(p == y))
    assert abs(low - ref.low) < 0.25 * se and abs(high - ref.high) < 0.25 * se


@pytest.mark.parametrize("task", ["sst2", "cola", "mrpc", "stsb", "mnli"])
def test_vectorised_scores_equal_compute_metrics_on_each_resample(task):
    rng = np.random.default_rng(11)
    n = 60
    if task == "stsb":
        y = np.round(rng.uniform(0, 5, n) * 2) / 2  # ties, as STS-B has
        p = np.round(y + rng.normal(0, 1, n), 1)
    else:
        k = 3 if task == "mnli" else 2
        y = rng.integers(0, k, n)
        p = np.where(rng.random(n) < 0.7, y, rng.integers(0, k, n))
    idx = rng.integers(0, n, (40, n))
    idx[0] = 5  # one degenerate resample: a single row (MCC, correlations -> 0)
    expected = [compute_metrics(task, p[i], y[i])["score"] for i in idx]
    np.testing.assert_allclose(unc.scores_of_resamples(task, p, y, idx), expected, rtol=0, atol=1e-12)
    assert unc.score_from_predictions(task, p, y) == pytest.approx(compute_metrics(task, p, y)["score"], abs=1e-15)


def test_identical_predictions_differ_by_exactly_zero():
    rng = np.random.default_rng(5)
    y = rng.uniform(0, 5, 200)
    p = y + rng.normal(0, 1, 200)
    assert unc.paired_difference("stsb", p, p.copy(), y, n_resamples=300) == (0.0, 0.0, 0.0)


def test_clearly_better_model_has_an_interval_excluding_zero():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 300)
    good = np.where(rng.random(300) < 0.9, y, 1 - y)
    bad = np.where(rng.random(300) < 0.6, y, 1 - y)
    delta, low, high = unc.paired_difference("rte", good, bad, y, n_resamples=1000)
    assert delta == pytest.approx(np.mean(good == y) - np.mean(bad == y))
    assert 0 < low < delta < high
    # a small difference on few rows is not significant
    close = good.copy()
    close[np.flatnonzero(close == y)[:2]] ^= 1
    _, low, high = unc.paired_difference("rte", good, close, y, n_resamples=1000)
    assert low <= 0 <= high


def test_bad_arguments_raise():
    with pytest.raises(FisherJaxError, match="confidence"):
        unc.score_interval("sst2", Y4, Y4, confidence=95)
    with pytest.raises(FisherJaxError, match="equal length"):
        unc.score_interval("sst2", Y4[:3], Y4)
    with pytest.raises(FisherJaxError, match="no labels"):
        unc.joint_bootstrap({"rte": Y4}, {"a": ("sst2", Y4)}, lambda s: {"x": s["a"][:, None]})
    with pytest.raises(FisherJaxError, match=r"lie in \[0, 4\)"):
        unc.scores_of_resamples("sst2", Y4, Y4, np.array([[0, 1, 2, 4]]))


# --------------------------------------------------------------------------- per-example predictions
def _tiny_model(num_labels: int):
    """A 1-layer BERT with the real vocabulary; random N(0, 0.02) weights drawn in numpy (shapes
    from ``jax.eval_shape``: an eager Flax init is slow on a busy CPU)."""
    import jax
    import transformers as tf

    from fisher_jax.models.config import ArchConfig
    from fisher_jax.models.model import Model, module_for

    cfg = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=130, num_labels=num_labels)
    arch = ArchConfig.from_hf(cfg)
    shapes = jax.eval_shape(lambda: module_for(arch).init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32)))
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.02, s.shape).astype(s.dtype), shapes["params"])
    return Model(arch=arch, params=params, config=cfg)


def test_evaluate_returns_predictions_in_row_order_of_a_seeded_subset(minilm_path, glue_dir):
    from transformers import AutoTokenizer

    from fisher_jax.data.batching import batches, encode, eval_subset
    from fisher_jax.data.glue import load_split
    from fisher_jax.data.metrics import predictions_from_logits
    from fisher_jax.train.evaluate import evaluate, predict

    model = _tiny_model(2)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    # one bucket: a single compiled shape, shared with the reference pass below
    out = evaluate(model, "rte", glue_dir=str(glue_dir), batch_size=8, max_examples=21, seed=3, tokenizer=tok,
                   buckets=(128,), return_predictions=True)
    dev = load_split("rte", "dev", str(glue_dir))
    assert out["rows"] == eval_subset(len(dev), 21, 3).tolist() and out["rows"] != list(range(21))
    assert out["num_examples"] == 21 and len(out["predictions"]) == 21
    # reference: the same rows in their own order, unsorted batches
    encoded = encode(tok, dev.subset(out["rows"]), 128)
    logits, _, weights = predict(model, batches(encoded, 8, buckets=(128,)))
    assert out["predictions"] == predictions_from_logits("rte", logits)[weights > 0].tolist()
    assert out["score"] == pytest.approx(compute_metrics("rte", np.asarray(out["predictions"]),
                                                         encoded.labels)["score"], abs=1e-12)


def test_sorted_batches_record_rows_and_regression_predictions_come_back_in_order():
    from fisher_jax.data.batching import Encoded
    from fisher_jax.train.evaluate import _predictions_in_row_order, sorted_batches

    lengths = np.array([5, 2, 7, 3, 2])
    offsets = np.r_[0, np.cumsum(lengths)]
    enc = Encoded(np.arange(offsets[-1], dtype=np.int32) % 50 + 3, np.zeros(offsets[-1], np.int8), offsets,
                  np.arange(5, dtype=np.float32), 8, 0)
    bl = sorted_batches(enc, 2, buckets=(8,))
    ids = np.concatenate([b["example_ids"] for b in bl])
    assert ids.tolist() == [1, 4, 3, 0, 2, -1]  # by length, stable; one padding row
    assert np.concatenate([b["labels"] for b in bl])[:5].tolist() == [1, 4, 3, 0, 2]
    # outputs in batch order = the row's label: back in row order they read 0..4
    logits = np.concatenate([b["labels"] for b in bl])[:, None] + 0.5
    weights = np.concatenate([b["weights"] for b in bl])
    assert _predictions_in_row_order("stsb", logits, weights, bl) == [0.5, 1.5, 2.5, 3.5, 4.5]
