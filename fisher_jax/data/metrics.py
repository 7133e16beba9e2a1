"""GLUE metrics in plain numpy, with optional example weights.

Weights are frequency weights: a row with weight ``w`` counts as ``w`` copies of itself, so an
integer-weighted metric equals the unweighted metric on the repeated rows, and rows with weight 0
(the padding rows of :mod:`fisher_jax.data.batching`) are ignored. Weights must be non-negative
with a positive sum.

Degenerate inputs return 0.0 instead of NaN, so a collapsed merged model (one predicted class,
constant regression output) scores 0 rather than poisoning averages: Matthews correlation when
either the predictions or the labels take a single class, Pearson/Spearman when either side is
constant, F1 when there are no positive predictions and no positive labels.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from fisher_jax.data.glue import TaskSpec, get_task
from fisher_jax.errors import FisherJaxError


def _prepare(predictions: Any, labels: Any, weights: Any = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D float64/int arrays restricted to rows with positive weight, plus those weights."""
    p = np.asarray(predictions)
    y = np.asarray(labels)
    if p.ndim != 1 or y.ndim != 1 or p.shape != y.shape:
        raise FisherJaxError(
            f"predictions and labels must be 1-D arrays of equal length, got shapes "
            f"{p.shape} and {y.shape}")
    w = np.ones(len(y), dtype=np.float64) if weights is None else np.asarray(weights, np.float64)
    if w.shape != y.shape:
        raise FisherJaxError(f"weights must have shape {y.shape}, got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise FisherJaxError("weights must be finite and non-negative")
    keep = w > 0
    if not keep.any():
        raise FisherJaxError("no examples with positive weight to compute a metric on")
    return p[keep], y[keep], w[keep]


def accuracy(predictions: Any, labels: Any, weights: Any = None) -> float:
    """Weighted fraction of exact matches: ``sum_i w_i [p_i == y_i] / sum_i w_i``."""
    p, y, w = _prepare(predictions, labels, weights)
    return float(np.sum(w * (p == y)) / np.sum(w))


def f1(predictions: Any, labels: Any, weights: Any = None) -> float:
    """Binary F1 of the positive class 1: ``2 TP / (2 TP + FP + FN)`` with weighted counts.

    Returns 0.0 when ``TP + FP + FN == 0`` (no positives predicted or present), as scikit-learn
    does with ``zero_division=0``.
    """
    p, y, w = _prepare(predictions, labels, weights)
    pp, yp = p == 1, y == 1
    tp = np.sum(w * (pp & yp))
    fp = np.sum(w * (pp & ~yp))
    fn = np.sum(w * (~pp & yp))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom > 0 else 0.0


def matthews_corrcoef(predictions: Any, labels: Any, weights: Any = None) -> float:
    """Matthews correlation (multi-class form, Gorodkin 2004) from the weighted confusion matrix.

    With ``C`` the confusion matrix, ``s = sum C``, ``c = trace C``, ``t_k`` the true and ``p_k``
    the predicted totals of class ``k``:
    ``MCC = (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t))``; for two classes this is
    ``(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``. 0.0 when the denominator is 0
    (predictions or labels all one class).
    """
    p, y, w = _prepare(predictions, labels, weights)
    p = _class_ids(p, "predictions")
    y = _class_ids(y, "labels")
    k = int(max(p.max(), y.max())) + 1
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (y, p), w)
    t_sum = conf.sum(axis=1)
    p_sum = conf.sum(axis=0)
    s = conf.sum()
    c = np.trace(conf)
    cov_tp = c * s - t_sum @ p_sum
    cov_pp = s * s - p_sum @ p_sum
    cov_tt = s * s - t_sum @ t_sum
    if cov_pp <= 0 or cov_tt <= 0:
        return 0.0
    return float(np.clip(cov_tp / np.sqrt(cov_pp * cov_tt), -1.0, 1.0))


def _class_ids(values: np.ndarray, what: str) -> np.ndarray:
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise FisherJaxError(f"{what} must be integer class ids for this metric")
    ids = values.astype(np.int64)
    if ids.min() < 0:
        raise FisherJaxError(f"{what} must be class ids >= 0, found {int(ids.min())}")
    return ids


def _weighted_corr(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Weighted Pearson correlation; 0.0 if either side is constant over the weighted rows."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    sw = np.sum(w)
    xc = x - np.sum(w * x) / sw
    yc = y - np.sum(w * y) / sw
    vx = np.sum(w * xc * xc)
    vy = np.sum(w * yc * yc)
    if vx <= 0 or vy <= 0:
        return 0.0
    return float(np.clip(np.sum(w * xc * yc) / np.sqrt(vx * vy), -1.0, 1.0))


def pearson(predictions: Any, labels: Any, weights: Any = None) -> float:
    """Pearson correlation ``cov_w(p, y) / sqrt(var_w(p) var_w(y))`` with weighted means.

    ``cov_w(a, b) = sum_i w_i (a_i - mean_w a)(b_i - mean_w b)``. 0.0 if either side is constant.
    """
    p, y, w = _prepare(predictions, labels, weights)
    return _weighted_corr(p.astype(np.float64), y.astype(np.float64), w)


def weighted_ranks(x: Any, weights: Any = None) -> np.ndarray:
    """1-based average ranks, where a row of weight ``w`` occupies ``w`` rank positions.

    For a group of tied values with total weight ``W`` preceded by total weight ``C``, every
    member gets rank ``C + (W + 1) / 2``: with unit weights these are the usual average ranks
    (``scipy.stats.rankdata(method='average')``), and with integer weights they are the ranks the
    repeated rows would get.
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    xs, ws = x[order], w[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    group_w = np.add.reduceat(ws, starts) if len(xs) else np.zeros(0)
    before = np.r_[0.0, np.cumsum(group_w)[:-1]]
    group_rank = before + (group_w + 1.0) / 2.0
    sizes = np.diff(np.r_[starts, len(xs)])
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(group_rank, sizes)
    return ranks


def spearman(predictions: Any, labels: Any, weights: Any = None) -> float:
    """Spearman correlation: weighted Pearson correlation of :func:`weighted_ranks` (ties get
    average ranks). 0.0 if either side is constant.
    """
    p, y, w = _prepare(predictions, labels, weights)
    return _weighted_corr(weighted_ranks(p, w), weighted_ranks(y, w), w)


METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "mcc": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def predictions_from_logits(task: str | TaskSpec, predictions_or_logits: Any) -> np.ndarray:
    """Class ids (argmax over the last axis) or regression values (a ``[N, 1]`` output squeezed).

    A 1-D input is taken to be predictions already.
    """
    spec = get_task(task)
    out = np.asarray(predictions_or_logits)
    if out.ndim == 1:
        return out
    if out.ndim != 2:
        raise FisherJaxError(f"expected predictions [N] or logits [N, C], got shape {out.shape}")
    if spec.is_regression:
        if out.shape[1] != 1:
            raise FisherJaxError(
                f"{spec.name} is a regression task: expected outputs [N, 1], got {out.shape}")
        return out[:, 0]
    if out.shape[1] != spec.num_labels:
        raise FisherJaxError(
            f"{spec.name} has {spec.num_labels} labels but logits have shape {out.shape}")
    return np.argmax(out, axis=-1)


def compute_metrics(task: str | TaskSpec, predictions_or_logits: Any, labels: Any,
                    weights: Any = None) -> dict[str, float]:
    """The task's GLUE metrics plus ``score``, their mean (the GLUE leaderboard number).

    Accuracy for SST-2/RTE/QNLI/MNLI/WNLI, accuracy and F1 for MRPC/QQP, ``mcc`` for CoLA,
    ``pearson`` and ``spearman`` for STS-B. Values are fractions in [-1, 1] (not percentages).
    """
    spec = get_task(task)
    preds = predictions_from_logits(spec, predictions_or_logits)
    result = {name: METRICS[name](preds, labels, weights) for name in spec.metrics}
    result["score"] = float(np.mean([result[name] for name in spec.metrics]))
    return result
