"""GLUE metrics against scikit-learn / scipy, with and without example weights."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fisher_jax.data import (
    TASKS,
    accuracy,
    compute_metrics,
    f1,
    matthews_corrcoef,
    pearson,
    spearman,
    weighted_ranks,
)
from fisher_jax.errors import FisherJaxError

skm = pytest.importorskip("sklearn.metrics")


def _classes(seed: int, n: int = 400, k: int = 2):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    p = np.where(rng.random(n) < 0.7, y, rng.integers(0, k, size=n))  # correlated with y
    return p, y, rng


def _scores(seed: int, n: int = 300, levels: int | None = None):
    rng = np.random.default_rng(seed)
    y = rng.uniform(0, 5, size=n)
    p = y + rng.normal(0, 1.5, size=n)
    if levels:  # many ties, as STS-B scores have
        y, p = np.round(y * levels / 5), np.round(p * levels / 5)
    return p, y, rng


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_sklearn(seed):
    p, y, rng = _classes(seed)
    assert accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p))
    assert f1(p, y) == pytest.approx(skm.f1_score(y, p))
    assert matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
    w = rng.uniform(0, 3, size=len(y))
    assert accuracy(p, y, w) == pytest.approx(skm.accuracy_score(y, p, sample_weight=w))
    assert f1(p, y, w) == pytest.approx(skm.f1_score(y, p, sample_weight=w))
    assert matthews_corrcoef(p, y, w) == pytest.approx(
        skm.matthews_corrcoef(y, p, sample_weight=w))


def test_multiclass_mcc_matches_sklearn():
    p, y, rng = _classes(7, k=3)
    assert matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
    w = rng.uniform(0, 2, size=len(y))
    assert matthews_corrcoef(p, y, w) == pytest.approx(
        skm.matthews_corrcoef(y, p, sample_weight=w))


@pytest.mark.parametrize("levels", [None, 5, 10])
def test_correlations_match_scipy(levels):
    p, y, _ = _scores(3, levels=levels)
    assert pearson(p, y) == pytest.approx(stats.pearsonr(p, y)[0])
    assert spearman(p, y) == pytest.approx(stats.spearmanr(p, y)[0])


def test_weighted_ranks_are_average_ranks():
    x = np.array([3.0, 1.0, 2.0, 3.0, 1.0, 5.0, 3.0])
    np.testing.assert_allclose(weighted_ranks(x), stats.rankdata(x, method="average"))
    w = np.array([2, 1, 1, 1, 3, 1, 1])
    expanded = stats.rankdata(np.repeat(x, w), method="average")
    first = np.r_[0, np.cumsum(w)[:-1]]  # each row's first copy in the expansion
    np.testing.assert_allclose(weighted_ranks(x, w), expanded[first])


def test_integer_weights_equal_repeated_rows():
    """Frequency weights: weight k means k copies (and 0 means the row is absent)."""
    p, y, rng = _scores(4, n=200, levels=8)
    w = rng.integers(0, 4, size=len(y))
    pr, yr = np.repeat(p, w), np.repeat(y, w)
    assert pearson(p, y, w) == pytest.approx(stats.pearsonr(pr, yr)[0])
    assert spearman(p, y, w) == pytest.approx(stats.spearmanr(pr, yr)[0])
    pc, yc, _ = _classes(5, n=200)
    assert accuracy(pc, yc, w) == pytest.approx(skm.accuracy_score(np.repeat(yc, w),
                                                                   np.repeat(pc, w)))
    assert f1(pc, yc, w) == pytest.approx(skm.f1_score(np.repeat(yc, w), np.repeat(pc, w)))
    assert matthews_corrcoef(pc, yc, w) == pytest.approx(
        skm.matthews_corrcoef(np.repeat(yc, w), np.repeat(pc, w)))


def test_float_weights_pearson_matches_weighted_covariance():
    p, y, rng = _scores(6)
    w = rng.uniform(0, 2, size=len(y))
    c = np.cov(np.stack([p, y]), aweights=w)
    assert pearson(p, y, w) == pytest.approx(c[0, 1] / np.sqrt(c[0, 0] * c[1, 1]))


def test_zero_weight_rows_are_ignored():
    p, y, rng = _scores(8, levels=6)
    keep = rng.random(len(y)) < 0.6
    w = keep.astype(np.float32)
    p_junk = np.where(keep, p, 99.0)  # padding rows may hold anything
    assert pearson(p_junk, y, w) == pytest.approx(stats.pearsonr(p[keep], y[keep])[0])
    assert spearman(p_junk, y, w) == pytest.approx(stats.spearmanr(p[keep], y[keep])[0])
    pc, yc, _ = _classes(9, n=len(y))
    pc_junk = np.where(keep, pc, 1)
    assert accuracy(pc_junk, yc, w) == pytest.approx(skm.accuracy_score(yc[keep], pc[keep]))
    assert matthews_corrcoef(pc_junk, yc, w) == pytest.approx(
        skm.matthews_corrcoef(yc[keep], pc[keep]))


def test_degenerate_inputs_give_zero_not_nan():
    y = np.array([0, 1, 1, 0, 1])
    const = np.ones(5, dtype=int)
    assert matthews_corrcoef(const, y) == 0.0 == skm.matthews_corrcoef(y, const)
    assert matthews_corrcoef(y, const) == 0.0  # labels all one class
    assert pearson(np.full(5, 2.5), y.astype(float)) == 0.0
    assert spearman(np.full(5, 2.5), y.astype(float)) == 0.0
    assert pearson(np.full(5, 0.1) * 3, y.astype(float)) == 0.0  # no round-off "variance"
    assert f1(np.zeros(5, int), np.zeros(5, int)) == 0.0
    assert accuracy(const, y) == pytest.approx(0.6)


def test_bad_inputs_raise():
    with pytest.raises(FisherJaxError, match="equal length"):
        accuracy([0, 1], [0, 1, 1])
    with pytest.raises(FisherJaxError, match="weights must have shape"):
        accuracy([0, 1], [0, 1], [1.0])
    with pytest.raises(FisherJaxError, match="non-negative"):
        accuracy([0, 1], [0, 1], [1.0, -1.0])
    with pytest.raises(FisherJaxError, match="positive weight"):
        pearson([0.0, 1.0], [0.0, 1.0], [0.0, 0.0])
    with pytest.raises(FisherJaxError, match="class ids"):
        matthews_corrcoef([0, 1], [-1, 1])


def test_compute_metrics_per_task():
    rng = np.random.default_rng(11)
    for name, spec in TASKS.items():
        n = 64
        if spec.is_regression:
            labels = rng.uniform(0, 5, n)
            out = labels[:, None] + rng.normal(0, 1, (n, 1))
            res = compute_metrics(name, out, labels)
            assert res["pearson"] == pytest.approx(stats.pearsonr(out[:, 0], labels)[0])
            assert res["spearman"] == pytest.approx(stats.spearmanr(out[:, 0], labels)[0])
        else:
            labels = rng.integers(0, spec.num_labels, n)
            logits = rng.normal(size=(n, spec.num_labels))
            res = compute_metrics(name, logits, labels)
            preds = logits.argmax(-1)
            assert res["accuracy" if "accuracy" in spec.metrics else "mcc"] == pytest.approx(
                skm.accuracy_score(labels, preds) if "accuracy" in spec.metrics
                else skm.matthews_corrcoef(labels, preds))
            assert compute_metrics(name, preds, labels) == res  # predictions work too
        assert set(res) == set(spec.metrics) | {"score"}
        assert res["score"] == pytest.approx(np.mean([res[m] for m in spec.metrics]))
        assert all(isinstance(v, float) for v in res.values())
    mrpc = compute_metrics("MRPC", np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
    assert mrpc == pytest.approx({"accuracy": 0.75, "f1": 2 / 3, "score": (0.75 + 2 / 3) / 2})


def test_compute_metrics_weights_and_shapes():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [5.0, 0.0], [0.0, 3.0]])
    labels = np.array([0, 1, 1, 1])
    assert compute_metrics("sst2", logits, labels)["accuracy"] == 0.75
    res = compute_metrics("sst2", logits, labels, weights=np.array([1, 1, 0, 1], np.float32))
    assert res == {"accuracy": 1.0, "score": 1.0}
    with pytest.raises(FisherJaxError, match="3 labels"):
        compute_metrics("mnli", logits, labels)
    with pytest.raises(FisherJaxError, match="regression"):
        compute_metrics("stsb", logits, labels.astype(float))
    with pytest.raises(FisherJaxError, match="unknown (GLUE )?task"):
        compute_metrics("glue", logits, labels)


# --------------------------------------------------------------------------- batched (many weightings)
@pytest.mark.parametrize("name", ["accuracy", "f1", "mcc", "pearson", "spearman"])
def test_batched_metrics_equal_the_scalar_metric_per_weighting(name):
    from fisher_jax.data.metrics import BATCHED_METRICS, METRICS

    rng = np.random.default_rng(4)
    n = 50
    if name in ("pearson", "spearman"):
        p, y, _ = _scores(4, n=n, levels=6)  # ties
    else:
        p, y, _ = _classes(4, n=n, k=3 if name in ("accuracy", "mcc") else 2)
    w = rng.uniform(0, 2, (12, n)) * (rng.random((12, n)) < 0.7)  # real weights, some rows 0
    w[0] = 0.0
    w[0, :3] = 1.0  # few rows: may be degenerate
    w[1] = np.bincount(rng.integers(0, n, n), minlength=n)  # a bootstrap resample's counts
    expected = [METRICS[name](p, y, row) for row in w]
    np.testing.assert_allclose(BATCHED_METRICS[name](p, y, w), expected, rtol=0, atol=1e-12)


def test_batched_ranks_and_scores():
    from fisher_jax.data.metrics import batched_scores, batched_weighted_ranks

    rng = np.random.default_rng(9)
    x = np.round(rng.normal(size=30), 1)
    w = rng.integers(0, 3, (5, 30)).astype(float)
    np.testing.assert_allclose(batched_weighted_ranks(x, w), [weighted_ranks(x, row) for row in w])
    np.testing.assert_allclose(weighted_ranks(x), stats.rankdata(x))
    y = rng.integers(0, 2, 30)
    p = np.where(rng.random(30) < 0.7, y, 1 - y)
    np.testing.assert_allclose(batched_scores("mrpc", p, y, w + 0.1),
                               [compute_metrics("mrpc", p, y, row + 0.1)["score"] for row in w])
    with pytest.raises(FisherJaxError, match="positive sum"):
        batched_scores("mrpc", p, y, np.zeros((1, 30)))
