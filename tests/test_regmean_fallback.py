"""RegMean's null-space fallback: which directions keep the simple mean, and how it is reported.

References are hand-written numpy: the span of the inputs (QR of the stacked rows) for singular
Grams, ``np.linalg.solve`` in float64 for full-rank ones.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace as dc_replace
from typing import Any

import numpy as np
import pytest

from fisher_jax.merging import merge, regmean
from fisher_jax.merging.regmean import FALLBACK_WARN_SHARE, unresolved
from fisher_jax.stats import Grams
from fisher_jax.tree import flatten

MOD = "pooler/dense"
EPS32 = float(np.finfo(np.float32).eps)


def bodies_for(d: int, out: int, n: int = 2, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((d, out))
    return [{"pooler": {"dense": {"kernel": (base + 0.3 * rng.standard_normal((d, out))).astype(np.float32),
                                  "bias": rng.standard_normal(out).astype(np.float32)}}} for _ in range(n)]


def kernels(bodies):
    return [flatten(b)[MOD + "/kernel"].astype(np.float64) for b in bodies]


def gram(x: np.ndarray) -> np.ndarray:
    return (x.T @ x / len(x)).astype(np.float32)  # stored in float32, as gram_stats does


def subspace_rows(rng, rows: int, rank: int, d: int) -> np.ndarray:
    # Inputs confined to a rank-dim subspace, with directions of very different scales.
    basis = rng.standard_normal((rank, d)) * np.logspace(0, -2, rank)[:, None]
    return rng.standard_normal((rows, rank)) @ basis


def reference_fallback(xs, ws):
    """Normal equations inside the inputs' span, the mean outside it (numpy, float64)."""
    s = sum(x.T @ x / len(x) for x in xs)
    r = sum((x.T @ x / len(x)) @ w for x, w in zip(xs, ws))
    stacked = np.concatenate(xs)
    span = np.linalg.svd(stacked.T, full_matrices=False)[0][:, : np.linalg.matrix_rank(stacked)]
    inside = span @ np.linalg.solve(span.T @ s @ span, span.T @ r)
    return inside + (np.eye(len(s)) - span @ span.T) @ (sum(ws) / len(ws))


@pytest.mark.parametrize("ranks", [(12, 12), (10, 14), (5, 0)])
def test_singular_gram_falls_back_in_exactly_d_minus_rank_directions(ranks):
    d, rng = 48, np.random.default_rng(sum(ranks))
    shared = ranks[0] == ranks[1]
    xs = [subspace_rows(rng, 200, r, d) if r else np.zeros((200, d)) for r in ranks]
    if shared:  # both models' inputs in the same subspace: mix the first model's rows
        xs[1] = rng.standard_normal((200, len(xs[0]))) @ xs[0] / np.sqrt(200)
    rank = np.linalg.matrix_rank(np.concatenate(xs))
    assert rank == (ranks[0] if shared else sum(ranks))
    bodies = bodies_for(d, 7)
    diag: dict[str, Any] = {}
    with pytest.warns(UserWarning, match="keeps the simple mean"):  # all three cases exceed the share
        out = regmean(bodies, [{MOD: gram(x)} for x in xs], diagnostics=diag)
    info = diag["regmean"][MOD]
    assert (info["fallback"], info["dims"]) == (d - rank, d)
    assert info["threshold"] > 0
    ws = kernels(bodies)
    np.testing.assert_allclose(flatten(out)[MOD + "/kernel"], reference_fallback(xs, ws), atol=2e-4)


def test_full_rank_ill_conditioned_gram_keeps_every_direction_and_matches_solve():
    # A few dominant directions (as activations' mean) over a tail six to seven decades lower, all
    # real signal: every direction is seen by hundreds of rows, far above its rounding level.
    d, rows, rng = 64, 512, np.random.default_rng(1)
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    scales = np.concatenate([np.ones(3), np.logspace(-2.5, -3.2, d - 3)])
    xs = [rng.standard_normal((rows, d)) * scales @ q.T for _ in range(2)]
    grams = [{MOD: gram(x)} for x in xs]
    s = sum(g[MOD].astype(np.float64) for g in grams)
    lam = np.linalg.eigvalsh(s)
    # the relative rule of a fixed float32-eps multiple would discard some of them
    assert (lam <= np.sqrt(d) * EPS32 * lam[-1]).sum() > 0
    bodies = bodies_for(d, 5, seed=1)
    ws = kernels(bodies)
    diag: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = regmean(bodies, grams, diagnostics=diag)
    assert diag["regmean"][MOD]["fallback"] == 0
    assert "warnings" not in diag
    expected = np.linalg.solve(s, sum(g[MOD].astype(np.float64) @ w for g, w in zip(grams, ws)))
    np.testing.assert_allclose(flatten(out)[MOD + "/kernel"], expected, rtol=1e-5, atol=1e-5)
    old = {}
    with pytest.warns(UserWarning):
        regmean(bodies, grams, rtol=np.sqrt(d) * EPS32, diagnostics=old)
    assert old["regmean"][MOD]["fallback"] == (lam <= np.sqrt(d) * EPS32 * lam[-1]).sum()


def test_unresolved_against_hand_cutoffs():
    # Eigenvectors = coordinate axes, so v_k^T diag(S) v_k = S_kk: cutoff_k = sqrt(4) eps32 S_kk + 4 eps64 lam_max.
    lam = np.array([-1e-9, 1e-10, 1e-9, 1.0])
    diag = np.array([1.0, 1e-3, 1e-3, 1.0])
    cut = 2 * EPS32 * diag + 4 * np.finfo(np.float64).eps * 1.0
    np.testing.assert_array_equal(unresolved(lam, np.eye(4), diag), lam <= cut)
    assert unresolved(lam, np.eye(4), diag).tolist() == [True, True, False, False]
    # a rank bound forces the smallest d - bound directions, whatever their eigenvalue
    assert unresolved(lam, np.eye(4), diag, rank_bound=1).tolist() == [True, True, True, False]
    assert unresolved(lam, np.eye(4), diag, rtol=1e-8).tolist() == [True, True, True, False]


def test_rank_bound_from_the_grams_rows():
    # Full-rank Grams whose metadata says 6 rows each: rank <= 12 of 20, so at least 8 fall back.
    d, rng = 20, np.random.default_rng(3)
    xs = [rng.standard_normal((100, d)) for _ in range(2)]
    grams = [Grams({MOD: gram(x)}, num_tokens=600, num_examples=6, meta={"rows": {MOD: 6}}) for x in xs]
    diag: dict[str, Any] = {}
    with pytest.warns(UserWarning):
        regmean(bodies_for(d, 3), grams, diagnostics=diag)
    assert diag["regmean"][MOD]["rank_bound"] == 12
    assert diag["regmean"][MOD]["fallback"] == d - 12
    # shrinkage (alpha < 1) adds a full-rank diagonal: no bound
    diag = {}
    regmean(bodies_for(d, 3), grams, alpha=0.5, diagnostics=diag)
    assert diag["regmean"][MOD]["rank_bound"] is None and diag["regmean"][MOD]["fallback"] == 0


def test_a_layer_falling_back_beyond_the_share_is_warned_about():
    d, rng = 40, np.random.default_rng(4)
    k = int(FALLBACK_WARN_SHARE * d) + 1  # just over the share
    xs = [subspace_rows(rng, 300, (d - k) // 2, d), subspace_rows(rng, 300, d - k - (d - k) // 2, d)]
    diag: dict[str, Any] = {}
    with pytest.warns(UserWarning, match=rf"'{MOD}' keeps the simple mean in {k} of its {d} input directions \({k / d:.0%}"):
        regmean(bodies_for(d, 3), [{MOD: gram(x)} for x in xs], diagnostics=diag)
    assert len(diag["warnings"]) == 1 and MOD in diag["warnings"][0]
    # at the share or below: no warning
    k = int(FALLBACK_WARN_SHARE * d)
    xs = [subspace_rows(rng, 300, (d - k) // 2, d), subspace_rows(rng, 300, d - k - (d - k) // 2, d)]
    diag = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regmean(bodies_for(d, 3), [{MOD: gram(x)} for x in xs], diagnostics=diag)
    assert diag["regmean"][MOD]["fallback"] == k and "warnings" not in diag


@dataclass(frozen=True)
class FakeModel:
    params: dict

    def replace(self, **kw):
        return dc_replace(self, **kw)


def test_merge_puts_the_fallback_in_its_report():
    d, rng = 24, np.random.default_rng(5)
    xs = [subspace_rows(rng, 50, 4, d) for _ in range(2)]
    models = [FakeModel({"body": b, "head": {"w": np.ones(2, np.float32)}}) for b in bodies_for(d, 3)]
    report: dict[str, Any] = {}
    with pytest.warns(UserWarning, match=MOD):
        merge("regmean", models, grams=[{MOD: gram(x)} for x in xs], report=report)
    assert report["diagnostics"]["regmean"][MOD]["fallback"] == d - 8
    # regmean's messages end up in the report's warnings, once
    messages = report["warnings"]
    assert "warnings" not in report["diagnostics"]
    assert len(messages) == 1 and MOD in messages[0] and f"{d - 8} of its {d}" in messages[0]
