"""Bootstrap confidence intervals for GLUE scores, their differences and experiment summaries.

Every interval here is a **percentile bootstrap** (Efron & Tibshirani 1993, ch. 13): the
statistic is recomputed on ``B`` resamples and the interval is the ``(1 - c) / 2`` and
``(1 + c) / 2`` quantiles of those values (linear interpolation, as ``np.percentile`` and
``scipy.stats.bootstrap(method="percentile")``). A resample of ``n`` dev rows is ``n`` row
indices drawn uniformly with replacement; it enters the metrics as frequency weights (how often
each row was drawn), so every resample of a task is scored by a few matrix products
(:func:`fisher_jax.data.metrics.batched_scores`), never by a Python loop over resamples.

:func:`joint_bootstrap` is the general tool behind experiment reports. One bootstrap draw
resamples (1) the fine-tuning seeds (replicates) with replacement, when ``resample_seeds``, and
(2) each task's dev rows once, with the same row indices for every model scored on that task in
that draw (all seeds share the dev rows, so one row draw per task serves all of them). Tasks are
resampled independently (a stratified bootstrap). Any statistic that combines cells (a mean over
pairs of merged / individual scores, a difference of two methods) is computed per draw from
those shared resamples, so differences are paired. This two-stage scheme is the hierarchical
bootstrap (Davison & Hinkley 1997, §3.8; Saravanan et al. 2020); with one replicate it is the
plain row bootstrap. With few seeds (e.g. 3) the seed component of the spread is underestimated
(resampling ``R`` values shrinks their variance by ``(R - 1) / R``), and intervals of a
statistic that varies between seeds are only as wide as ``R`` seeds can show.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

import numpy as np

from ..data.glue import TaskSpec, get_task
from ..data.metrics import batched_scores, compute_metrics, predictions_from_logits
from ..errors import FisherJaxError

# Row draws come in fixed blocks of this many resamples, each from its own generator, so a draw
# does not depend on how many resamples are processed at once (memory) or on the other tasks.
DRAW_BLOCK = 64
# Resamples scored at once are capped at about this many (resample x row) weights (memory).
_MAX_WEIGHTS = 1 << 21


@dataclasses.dataclass(frozen=True)
class Interval:
    """A statistic with its percentile-bootstrap interval and its value for each seed.

    ``point`` is the statistic on the original rows: the mean over replicates of ``per_seed``
    (NaN entries, replicates without data, left out). ``low``/``high``: the interval at
    ``confidence``. ``seed_std``: the sample standard deviation of ``per_seed`` (NaN for one seed).
    """

    point: float
    low: float
    high: float
    per_seed: tuple[float, ...]
    confidence: float

    @property
    def seed_mean(self) -> float:
        return self.point

    @property
    def seed_std(self) -> float:
        v = np.asarray(self.per_seed, np.float64)
        v = v[np.isfinite(v)]
        return float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (a significant difference)."""
        return bool((self.low > 0 and self.high > 0) or (self.low < 0 and self.high < 0))

    def to_dict(self) -> dict[str, Any]:
        return {"point": self.point, "low": self.low, "high": self.high, "seed_mean": self.seed_mean,
                "seed_std": self.seed_std, "per_seed": list(self.per_seed), "confidence": self.confidence}


def _check(confidence: float, n_resamples: int) -> None:
    if not 0 < float(confidence) < 1:
        raise FisherJaxError(f"confidence must be in (0, 1), got {confidence}")
    if int(n_resamples) < 1:
        raise FisherJaxError(f"n_resamples must be positive, got {n_resamples}")


def _as_predictions(task: str | TaskSpec, predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = predictions_from_logits(task, np.asarray(predictions))
    y = np.asarray(labels)
    if p.ndim != 1 or y.shape != p.shape or len(y) == 0:
        raise FisherJaxError(f"predictions and labels must be non-empty 1-D arrays of equal length, "
                             f"got shapes {p.shape} and {y.shape}")
    return p, y


def percentile_interval(values: Any, confidence: float = 0.95) -> tuple[float, float]:
    """``(q_{(1-c)/2}, q_{(1+c)/2})`` of ``values`` (linear interpolation; NaN values left out)."""
    v = np.asarray(values, np.float64).ravel()
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - float(confidence)) / 2.0
    low, high = np.percentile(v, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def resample_counts(idx: Any, n: int) -> np.ndarray:
    """``[B, n]`` float64: how often each of ``n`` rows occurs in each row of ``idx [B, m]``."""
    idx = np.asarray(idx)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise FisherJaxError(f"resample indices must be an integer array [B, n], got {idx.dtype} {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise FisherJaxError(f"resample indices must lie in [0, {n}), found {idx.min()}..{idx.max()}")
    flat = (idx.astype(np.int64) + n * np.arange(len(idx))[:, None]).ravel()
    return np.bincount(flat, minlength=len(idx) * n).reshape(len(idx), n).astype(np.float64)


def resample_indices(key: str, n: int, n_resamples: int, seed: int = 0, start: int = 0) -> np.ndarray:
    """Row draws ``start .. start + n_resamples - 1`` of a task, ``[B, n]`` ints in ``[0, n)``.

    Draw ``d`` is row ``d % 64`` of ``default_rng([seed, crc32(key), d // 64]).integers(0, n,
    (64, n))``: fixed per (seed, task key, draw), whatever else is resampled alongside.
    """
    stop = start + int(n_resamples)
    blocks = [np.random.default_rng([int(seed), zlib.crc32(str(key).encode()), b]).integers(0, n, (DRAW_BLOCK, n))
              for b in range(start // DRAW_BLOCK, (stop - 1) // DRAW_BLOCK + 1)] if stop > start else []
    if not blocks:
        return np.zeros((0, n), np.int64)
    first = (start // DRAW_BLOCK) * DRAW_BLOCK
    return np.concatenate(blocks)[start - first:stop - first]


def score_from_predictions(task: str | TaskSpec, predictions: Any, labels: Any) -> float:
    """The task's GLUE score (mean of its metrics, :func:`~fisher_jax.data.metrics.compute_metrics`)
    of ``predictions`` (class ids, regression values, or logits) against ``labels``."""
    p, y = _as_predictions(task, predictions, labels)
    return float(compute_metrics(task, p, y)["score"])


def scores_of_resamples(task: str | TaskSpec, predictions: Any, labels: Any, idx: Any) -> np.ndarray:
    """``[score_from_predictions(task, p[idx[b]], y[idx[b]]) for b]`` ``[B]``, vectorised.

    ``idx [B, n]`` are resampled row indices; each resample becomes frequency weights
    (:func:`resample_counts`) and all are scored by
    :func:`fisher_jax.data.metrics.batched_scores` (accuracy, F1, MCC, Pearson and Spearman,
    the last ranking every resample on its own), in blocks of bounded memory.
    """
    p, y = _as_predictions(task, predictions, labels)
    idx = np.asarray(idx)
    step = max(1, _MAX_WEIGHTS // len(y))
    parts = [batched_scores(task, p, y, resample_counts(idx[s:s + step], len(y))) for s in range(0, len(idx), step)]
    return np.concatenate(parts) if parts else np.zeros(0)


# --------------------------------------------------------------------------- the joint bootstrap
Statistic = Callable[[Mapping[Hashable, np.ndarray]], Mapping[str, np.ndarray]]


def joint_bootstrap(
    labels: Mapping[str, Any],
    predictions: Mapping[Hashable, tuple[str, Any]],
    statistic: Statistic,
    replicates: int = 1,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    resample_seeds: bool = True,
    row_indices: Optional[Mapping[str, Any]] = None,
    seed_indices: Any = None,
) -> dict[str, Interval]:
    """Percentile-bootstrap intervals of statistics that combine many scored cells.

    ``labels[task]``: the scored dev rows' labels. ``predictions[key] = (task, predictions)``:
    one model's predictions on those rows (any hashable key, e.g. (label, subset, replicate, task)).
    ``statistic(scores)`` gets ``scores[key]``, an array ``[D]`` of that cell's GLUE score under D
    row resamplings, and returns ``{name: values [D, replicates]}``: each statistic's value per
    replicate (NaN where a replicate has no data).

    Per bootstrap draw ``b``: every task's rows are resampled once (``row_indices[task][b]``, by
    default :func:`resample_indices` with ``seed``), shared by every cell of that task; the
    replicates are resampled with replacement (``seed_indices[b]``, by default
    ``default_rng([seed, 1]).integers(0, R, (B, R))``) when ``resample_seeds``, else all kept;
    the draw's value is the mean over those replicates of the per-replicate values.
    Returns ``{name: Interval}``: ``point`` = mean over replicates on the original rows, the
    percentile interval at ``confidence``, ``per_seed`` on the original rows. With one replicate
    this is the row bootstrap of the statistic.
    """
    _check(confidence, n_resamples)
    R = int(replicates)
    if R < 1:
        raise FisherJaxError(f"replicates must be at least 1, got {replicates}")
    ys: dict[str, np.ndarray] = {}
    cells: dict[Hashable, tuple[str, np.ndarray]] = {}
    for key, (task, preds) in predictions.items():
        if task not in labels:
            raise FisherJaxError(f"cell {key!r} is scored on task '{task}', which has no labels")
        p, y = _as_predictions(task, preds, labels[task])
        ys[task] = y
        cells[key] = (task, p)
    if row_indices is not None:
        B = len(np.asarray(next(iter(row_indices.values())))) if row_indices else int(n_resamples)
        missing = sorted(set(ys) - set(row_indices))
        if missing:
            raise FisherJaxError(f"row_indices has no draws for task '{missing[0]}'")
    else:
        B = int(n_resamples)
    if seed_indices is not None:
        seeds = np.asarray(seed_indices, np.int64)
        if seeds.shape != (B, R) or seeds.min() < 0 or seeds.max() >= R:
            raise FisherJaxError(f"seed_indices must be ints in [0, {R}) of shape ({B}, {R}), got {seeds.shape}")
    elif resample_seeds:
        seeds = np.random.default_rng([int(seed), 1]).integers(0, R, (B, R))
    else:
        seeds = np.tile(np.arange(R), (B, 1))

    def values_of(scores: Mapping[Hashable, np.ndarray], d: int) -> dict[str, np.ndarray]:
        out = {}
        for name, v in statistic(scores).items():
            v = np.asarray(v, np.float64)
            if v.shape != (d, R):
                raise FisherJaxError(f"statistic '{name}' must have shape ({d}, {R}), got {v.shape}")
            out[name] = v
        return out

    point_scores = {k: batched_scores(t, p, ys[t], np.ones((1, len(p)))) for k, (t, p) in cells.items()}
    point_values = values_of(point_scores, 1)
    step = max(1, _MAX_WEIGHTS // max([len(y) for y in ys.values()] or [1]))
    draws: dict[str, list[np.ndarray]] = {name: [] for name in point_values}
    for s in range(0, B, step):
        e = min(B, s + step)
        counts = {t: resample_counts(np.asarray(row_indices[t])[s:e] if row_indices is not None
                                     else resample_indices(t, len(y), e - s, seed, start=s), len(y))
                  for t, y in ys.items()}
        scores = {k: batched_scores(t, p, ys[t], counts[t]) for k, (t, p) in cells.items()}
        for name, v in values_of(scores, e - s).items():
            picked = np.take_along_axis(v, seeds[s:e], axis=1)
            draws[name].append(_nanmean(picked, axis=1))
    out = {}
    for name, v in point_values.items():
        low, high = percentile_interval(np.concatenate(draws[name]) if draws[name] else [], confidence)
        out[name] = Interval(float(_nanmean(v[0], axis=0)), low, high, tuple(float(x) for x in v[0]),
                             float(confidence))
    return out


def _nanmean(v: np.ndarray, axis: int) -> np.ndarray:
    """Mean of the non-NaN entries along ``axis`` (NaN where there are none), without warnings."""
    ok = ~np.isnan(v)
    n = ok.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, v, 0.0).sum(axis=axis) / np.maximum(n, 1), np.nan)


def score_interval(task: str | TaskSpec, predictions: Any, labels: Any, confidence: float = 0.95,
                   n_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``(score, low, high)``: the GLUE score on all rows and its percentile-bootstrap interval
    over dev rows (``n_resamples`` resamples of the rows with replacement, :func:`resample_indices`)."""
    name = get_task(task).name
    iv = joint_bootstrap({name: labels}, {"a": (name, predictions)}, lambda s: {"score": s["a"][:, None]},
                         1, confidence, n_resamples, seed)["score"]
    return iv.point, iv.low, iv.high


def paired_difference(task: str | TaskSpec, predictions_a: Any, predictions_b: Any, labels: Any,
                      confidence: float = 0.95, n_resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """``(score_a - score_b, low, high)`` on the same rows: both scored on the same resample in
    every draw (a paired percentile bootstrap), so identical predictions give exactly 0."""
    name = get_task(task).name
    iv = joint_bootstrap({name: labels}, {"a": (name, predictions_a), "b": (name, predictions_b)},
                         lambda s: {"diff": (s["a"] - s["b"])[:, None]}, 1, confidence, n_resamples,
                         seed)["diff"]
    return iv.point, iv.low, iv.high


__all__: Sequence[str] = (
    "DRAW_BLOCK", "Interval", "joint_bootstrap", "paired_difference", "percentile_interval",
    "resample_counts", "resample_indices", "score_from_predictions", "score_interval",
    "scores_of_resamples",
)
