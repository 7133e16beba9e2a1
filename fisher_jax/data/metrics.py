"""GLUE metrics (scikit-learn / scipy on the rows of positive weight), with optional example weights.

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

import warnings
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


def _unit(w: np.ndarray) -> bool:
    """Whether every kept row has the same weight (then the weighted metric is the plain one)."""
    return bool(np.all(w == w[0]))


def accuracy(predictions: Any, labels: Any, weights: Any = None) -> float:
    """Weighted fraction of exact matches: ``sum_i w_i [p_i == y_i] / sum_i w_i``
    (``sklearn.metrics.accuracy_score`` on the rows of positive weight)."""
    from sklearn.metrics import accuracy_score

    p, y, w = _prepare(predictions, labels, weights)
    return float(accuracy_score(y, p, sample_weight=w))


def f1(predictions: Any, labels: Any, weights: Any = None) -> float:
    """Binary F1 of the positive class 1: ``2 TP / (2 TP + FP + FN)`` with weighted counts
    (``sklearn.metrics.f1_score`` for label 1; any other value is a negative).

    Returns 0.0 when ``TP + FP + FN == 0`` (no positives predicted or present): ``zero_division=0``.
    """
    from sklearn.metrics import f1_score

    p, y, w = _prepare(predictions, labels, weights)
    return float(f1_score(y == 1, p == 1, sample_weight=w, zero_division=0))


def matthews_corrcoef(predictions: Any, labels: Any, weights: Any = None) -> float:
    """Matthews correlation (multi-class form, Gorodkin 2004) from the weighted confusion matrix.

    With ``C`` the confusion matrix, ``s = sum C``, ``c = trace C``, ``t_k`` the true and ``p_k``
    the predicted totals of class ``k``:
    ``MCC = (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t))``; for two classes this is
    ``(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))`` (``sklearn.metrics.matthews_corrcoef``).
    0.0 when the denominator is 0 (predictions or labels all one class).
    """
    from sklearn.metrics import matthews_corrcoef as mcc

    p, y, w = _prepare(predictions, labels, weights)
    p = _class_ids(p, "predictions")
    y = _class_ids(y, "labels")
    with warnings.catch_warnings():  # one class alone: sklearn warns about the confusion matrix, then gives 0.0
        warnings.simplefilter("ignore", UserWarning)
        return float(np.clip(mcc(y, p, sample_weight=w), -1.0, 1.0))


def _class_ids(values: np.ndarray, what: str) -> np.ndarray:
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise FisherJaxError(f"{what} must be integer class ids for this metric")
    ids = values.astype(np.int64)
    if ids.min() < 0:
        raise FisherJaxError(f"{what} must be class ids >= 0, found {int(ids.min())}")
    return ids


def _weighted_corr(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Weighted Pearson correlation; 0.0 if either side is constant over the weighted rows.

    Equal weights: ``scipy.stats.pearsonr``; otherwise the weighted covariance
    ``np.cov(..., aweights=w)`` (frequency weights: the correlation of the repeated rows).
    """
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    if _unit(w):
        from scipy.stats import pearsonr

        r = float(pearsonr(x, y)[0])
    else:
        cov = np.cov(np.stack([x, y]), aweights=w)
        if cov[0, 0] <= 0 or cov[1, 1] <= 0:
            return 0.0
        r = float(cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]))
    return float(np.clip(r, -1.0, 1.0)) if np.isfinite(r) else 0.0


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
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = _sorted_ranks(x, w[None, :], order)[0] if len(x) else np.zeros(0)
    return ranks


def spearman(predictions: Any, labels: Any, weights: Any = None) -> float:
    """Spearman correlation: the Pearson correlation of the average ranks (ties averaged;
    ``scipy.stats.spearmanr`` for equal weights, :func:`weighted_ranks` otherwise). 0.0 if either
    side is constant.
    """
    p, y, w = _prepare(predictions, labels, weights)
    if np.ptp(p) == 0 or np.ptp(y) == 0:
        return 0.0
    if _unit(w):
        from scipy.stats import spearmanr

        r = float(spearmanr(p, y)[0])
        return float(np.clip(r, -1.0, 1.0)) if np.isfinite(r) else 0.0
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


# --------------------------------------------------------------------------------------------
# The same metrics under many weightings at once (bootstrap resamples as frequency weights)


def _prepare_batched(predictions: Any, labels: Any, weights: Any
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D predictions and labels ``[n]`` and a weight matrix ``[B, n]`` (one weighting a row)."""
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.ndim != 1 or y.ndim != 1 or p.shape != y.shape:
        raise FisherJaxError(
            f"predictions and labels must be 1-D arrays of equal length, got shapes "
            f"{p.shape} and {y.shape}")
    w = np.asarray(weights, np.float64)
    if w.ndim != 2 or w.shape[1] != len(y):
        raise FisherJaxError(f"weights must have shape [B, {len(y)}], got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or np.any(w.sum(axis=1) <= 0):
        raise FisherJaxError("every row of weights must be finite, non-negative, with a positive sum")
    return p, y, w


def batched_accuracy(predictions: Any, labels: Any, weights: Any) -> np.ndarray:
    """``[accuracy(p, y, weights[b]) for b]`` as one matrix product: ``W [p == y] / W 1``."""
    p, y, w = _prepare_batched(predictions, labels, weights)
    return (w @ (p == y).astype(np.float64)) / w.sum(axis=1)


def batched_f1(predictions: Any, labels: Any, weights: Any) -> np.ndarray:
    """``[f1(p, y, weights[b]) for b]``: ``2 TP / (2 TP + FP + FN)`` per row (0 where undefined)."""
    p, y, w = _prepare_batched(predictions, labels, weights)
    pp, yp = p == 1, y == 1
    tp = w @ (pp & yp).astype(np.float64)
    fp = w @ (pp & ~yp).astype(np.float64)
    fn = w @ (~pp & yp).astype(np.float64)
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, 0.0)


def batched_matthews_corrcoef(predictions: Any, labels: Any, weights: Any) -> np.ndarray:
    """``[matthews_corrcoef(p, y, weights[b]) for b]``: Gorodkin's multi-class MCC per row.

    Row ``b``'s confusion matrix is ``weights[b] @ E`` with ``E [n, k*k]`` the one-hot of
    ``y_i k + p_i``; then ``(c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t))`` as in
    :func:`matthews_corrcoef` (0 where a side is one class).
    """
    p, y, w = _prepare_batched(predictions, labels, weights)
    p, y = _class_ids(p, "predictions"), _class_ids(y, "labels")
    k = int(max(p.max(), y.max())) + 1
    onehot = np.zeros((len(y), k * k))
    onehot[np.arange(len(y)), y * k + p] = 1.0
    conf = (w @ onehot).reshape(-1, k, k)
    t_sum, p_sum = conf.sum(axis=2), conf.sum(axis=1)
    s = conf.sum(axis=(1, 2))
    c = np.trace(conf, axis1=1, axis2=2)
    cov_tp = c * s - np.sum(t_sum * p_sum, axis=1)
    cov_pp = s * s - np.sum(p_sum * p_sum, axis=1)
    cov_tt = s * s - np.sum(t_sum * t_sum, axis=1)
    ok = (cov_pp > 0) & (cov_tt > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, np.clip(cov_tp / np.sqrt(np.where(ok, cov_pp * cov_tt, 1.0)), -1.0, 1.0), 0.0)


def _constant_rows(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``[B]`` bool: ``x`` takes one value on the rows that row ``b`` of ``w`` weights positively.

    Cheap in the usual case: a resample holding weight both above and at-or-below a middle value
    of ``x`` is not constant (two matrix products); only the other rows are checked in full.
    """
    values = np.unique(x)
    if len(values) < 2:
        return np.ones(len(w), dtype=bool)
    high = (x > values[len(values) // 2 - 1]).astype(np.float64)
    maybe = ((w @ high) == 0) | ((w @ (1.0 - high)) == 0)
    out = np.zeros(len(w), dtype=bool)
    if maybe.any():
        used = w[maybe] > 0
        out[maybe] = np.where(used, x, -np.inf).max(axis=1) == np.where(used, x, np.inf).min(axis=1)
    return out


def _batched_corr(x: np.ndarray, y: np.ndarray, w: np.ndarray, constant: np.ndarray) -> np.ndarray:
    """Row-wise weighted Pearson correlation of ``x, y`` (``[n]``, or ``[B, n]`` aligned with
    ``w [B, n]``) from weighted sums: ``cov = S_xy - S_x S_y / S``, ``var = S_xx - S_x^2 / S``.

    0.0 where ``constant`` (a side takes one value on the weighted rows) or a variance is not
    positive, as :func:`_weighted_corr`. 1-D inputs are centred first (the correlation does not
    change, and the subtraction above then loses no digits).
    """
    def sums(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return w @ (a * b) if a.ndim == 1 and b.ndim == 1 else np.einsum("ij,ij,ij->i", w, *np.broadcast_arrays(a, b))

    if x.ndim == 1:
        x = x - x.mean()
    if y.ndim == 1:
        y = y - y.mean()
    sw = w.sum(axis=1)
    sx = w @ x if x.ndim == 1 else np.einsum("ij,ij->i", w, x)
    sy = w @ y if y.ndim == 1 else np.einsum("ij,ij->i", w, y)
    vx = sums(x, x) - sx * sx / sw
    vy = sums(y, y) - sy * sy / sw
    cov = sums(x, y) - sx * sy / sw
    ok = ~constant & (vx > 0) & (vy > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.sqrt(np.where(ok, vx * vy, 1.0))
    return np.where(ok, np.clip(r, -1.0, 1.0), 0.0)


def _sorted_ranks(x: np.ndarray, w: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Weighted average ranks ``[B, n]`` of ``x`` under each row of ``w``, columns in ``order``
    (``x``'s stable sort): group ``g`` of weight ``W_bg`` after ``C_bg`` ranks ``C_bg + (W_bg + 1) / 2``."""
    xs = x[order]
    ws = w[:, order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    if len(starts) == len(xs):  # no ties: every group is one row
        return np.cumsum(ws, axis=1) - 0.5 * ws + 0.5
    group_w = np.add.reduceat(ws, starts, axis=1)
    group_rank = np.cumsum(group_w, axis=1) - 0.5 * group_w + 0.5
    return np.repeat(group_rank, np.diff(np.r_[starts, len(xs)]), axis=1)


def batched_weighted_ranks(x: Any, weights: Any) -> np.ndarray:
    """``[weighted_ranks(x, weights[b]) for b]`` ``[B, n]``: ties and the sort are found once.

    With the rows sorted by ``x`` once, tie group ``g`` of total weight ``W_bg`` preceded by weight
    ``C_bg`` ranks ``C_bg + (W_bg + 1) / 2`` in row ``b`` (per-group sums by ``np.add.reduceat``).
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty_like(w)
    ranks[:, order] = _sorted_ranks(x, w, order)
    return ranks


def batched_pearson(predictions: Any, labels: Any, weights: Any) -> np.ndarray:
    """``[pearson(p, y, weights[b]) for b]``: weighted Pearson correlation per row."""
    p, y, w = _prepare_batched(predictions, labels, weights)
    p, y = p.astype(np.float64), y.astype(np.float64)
    return _batched_corr(p, y, w, _constant_rows(p, w) | _constant_rows(y, w))


def batched_spearman(predictions: Any, labels: Any, weights: Any) -> np.ndarray:
    """``[spearman(p, y, weights[b]) for b]``: Pearson of the weighted ranks per row (each
    resample ranked on its own, ties averaged), computed with the columns in ``p``'s sort order."""
    p, y, w = _prepare_batched(predictions, labels, weights)
    p, y = p.astype(np.float64), y.astype(np.float64)
    order_p = np.argsort(p, kind="stable")
    order_y = np.argsort(y, kind="stable")
    ranks_p = _sorted_ranks(p, w, order_p)
    position_in_y = np.empty(len(y), dtype=np.int64)
    position_in_y[order_y] = np.arange(len(y))
    ranks_y = _sorted_ranks(y, w, order_y)[:, position_in_y[order_p]]  # y's ranks, columns in p's order
    constant = _constant_rows(p, w) | _constant_rows(y, w)
    return _batched_corr(ranks_p, ranks_y, w[:, order_p], constant)


BATCHED_METRICS: dict[str, Callable[..., np.ndarray]] = {
    "accuracy": batched_accuracy,
    "f1": batched_f1,
    "mcc": batched_matthews_corrcoef,
    "pearson": batched_pearson,
    "spearman": batched_spearman,
}


def batched_scores(task: str | TaskSpec, predictions_or_logits: Any, labels: Any,
                   weights: Any) -> np.ndarray:
    """``[compute_metrics(task, p, y, weights[b])["score"] for b]`` ``[B]``, without the loop:
    the mean of the task's GLUE metrics under each row of ``weights [B, n]``."""
    spec = get_task(task)
    preds = predictions_from_logits(spec, predictions_or_logits)
    return np.mean([BATCHED_METRICS[name](preds, labels, weights) for name in spec.metrics], axis=0)
