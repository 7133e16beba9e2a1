"""RegMean (Jin, Ren, Preotiuc-Pietro, Cheng; ICLR 2023, "Dataless Knowledge Fusion by Merging
Weights of Language Models").

For a Dense layer ``y = x W`` (Flax kernel ``W [in, out]``) and each model's Gram of that layer's
inputs ``G_j = X_j^T X_j / #tokens``, the merged kernel minimises ``sum_j ||X_j W - X_j W_j||^2``:

    W = (sum_j G~_j)^-1 sum_j G~_j W_j,    G~_j = alpha G_j + (1 - alpha) diag(G_j)

computed with a linear solve (never an explicit inverse). Biases, LayerNorms, embeddings and
Dense layers without Grams take the simple mean.

When ``sum_j G~_j`` is (numerically) singular the objective does not fix ``W`` along the
directions no model's inputs reach, and a plain solve fills them with rounding noise amplified
by up to 1/eps: a BERT pooler's Gram from 128 examples has rank <= 128 of 384, and merging
MiniLM models with such Grams wrecked STS-B (Pearson 0.86 -> 0.10). Those directions are a tie
in the objective; they keep the simple mean, the method's own fallback for unseen layers.

Which directions are unseen is decided by what a float32 Gram can resolve (:func:`unresolved`):
rounding perturbs entry ``(i, j)`` by about ``eps32 sqrt(G_ii G_jj)``, so along an eigenvector
``v`` of the summed Gram an eigenvalue below ``sqrt(d) eps32 v^T diag(S) v`` (the spread of such
noise over a null block, times its diagonal energy along ``v``) cannot be told from zero; and a
Gram from ``N`` rows has rank ``<= N``, so at least ``d - sum_j N_j`` directions are unseen
whatever the rounding. Scaling the cutoff by the largest eigenvalue instead (a fixed multiple of
eps32 relative to ``lambda_max``) discards FFN-output directions whose eigenvalues sit far
above their own rounding level (an FFN's inputs have a few dominant directions).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Literal, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import FisherJaxError
from ..models.layout import module_path
from ..tree import did_you_mean, unflatten
from .methods import Body, _flatten_bodies, _mean_leaf

log = logging.getLogger(__name__)

# A layer whose solve keeps the simple mean in more than this share of its input directions is
# warned about: RegMean then barely differs from averaging there (too few statistics rows).
FALLBACK_WARN_SHARE = 0.10
_EPS32 = float(np.finfo(np.float32).eps)
_EPS64 = float(np.finfo(np.float64).eps)
# dpocon's estimate can overstate the reciprocal condition number; the fast path needs a margin.
_FAST_MARGIN = 10.0

Grams = Mapping[str, Any]  # {"encoder/layer/0/attention/self/query": G [in, in], ...}


def _strip(key: str) -> str:
    return key[5:] if key.startswith("body/") else key


def _shrunk(g: jax.Array, alpha: jax.Array) -> jax.Array:
    # alpha * G + (1 - alpha) * diag(G): off-diagonal entries scaled by alpha, diagonal kept.
    eye = jnp.eye(g.shape[0], dtype=g.dtype)
    return g * (alpha + (1.0 - alpha) * eye)


@jax.jit
def _regmean_system(ws: tuple[jax.Array, ...], gs: tuple[jax.Array, ...], alpha: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum_j G~_j, sum_j G~_j W_j)`` in float32; ``ws`` are [in, out] (possibly concatenated)."""
    lhs = None
    rhs = None
    for w, g in zip(ws, gs):
        gt = _shrunk(g.astype(jnp.float32), alpha)
        term = jnp.matmul(gt, w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        lhs = gt if lhs is None else lhs + gt
        rhs = term if rhs is None else rhs + term
    return lhs, rhs


# Separate from _regmean_system so the LU solve compiles once per shape, not per model count.
_solve32 = jax.jit(jnp.linalg.solve)


def unresolved(lam: np.ndarray, vec: np.ndarray, diag: np.ndarray, rank_bound: Optional[int] = None,
               rtol: Optional[float] = None) -> np.ndarray:
    """Mask of the eigen-directions of a summed Gram ``S = V diag(lam) V^T`` that no input resolves.

    Direction ``k`` is unresolved when ``lam_k <= sqrt(d) eps32 (v_k^T diag(S) v_k) + d eps64 lam_max``
    (float32 rounding of the Gram entries, ``|dG_ij| ~ eps32 sqrt(G_ii G_jj)``, spread over a
    null block by ``sqrt(d)`` as for a random symmetric matrix; plus the float64 eigensolver's
    rounding), and the smallest ``d - rank_bound`` directions always are (a Gram from ``N`` rows
    has rank ``<= N``). An explicit ``rtol`` gives the relative rule ``lam_k <= rtol * lam_max``
    instead. ``lam`` ascending, as ``numpy.linalg.eigh`` returns it; ``diag`` is ``diag(S)``.
    """
    d = lam.shape[0]
    top = max(float(lam[-1]), 0.0) if d else 0.0
    if rtol is not None:
        cut = np.full(d, float(rtol) * top)
    else:
        cut = math.sqrt(d) * _EPS32 * ((vec * vec).T @ np.maximum(diag, 0.0)) + d * _EPS64 * top
    out = lam <= cut
    if rank_bound is not None and rank_bound < d:
        out[: d - max(int(rank_bound), 0)] = True
    return out


def cutoff(diag: np.ndarray, lam_max: float, rtol: Optional[float] = None) -> float:
    """The largest cutoff :func:`unresolved` can apply: ``sqrt(d) eps32 max_i S_ii + d eps64 lam_max``."""
    d = diag.shape[0]
    if rtol is not None:
        return float(rtol) * max(lam_max, 0.0)
    return math.sqrt(d) * _EPS32 * float(np.max(diag, initial=0.0)) + d * _EPS64 * max(lam_max, 0.0)


def _regmean_solve64(ws: Sequence[np.ndarray], gs: Sequence[np.ndarray], alpha: float,
                     rtol: Optional[float] = None, rank_bound: Optional[int] = None) -> tuple[np.ndarray, int, float]:
    """The solve in float64 on the host; returns ``(W, #directions keeping the mean, cutoff)``.

    Cholesky plus LAPACK's condition estimate (O(d^2) after the factorisation) decide: a sum whose
    smallest eigenvalue is provably above every cutoff of :func:`unresolved` is solved as is;
    otherwise ``S = V diag(lam) V^T`` and
    ``W = V [ (V^T R) / lam  where resolved ;  V^T mean_j W_j  elsewhere ]``.
    """
    from scipy.linalg import lapack

    lhs = None
    rhs = None
    for w, g in zip(ws, gs):
        g = np.asarray(g, np.float64)
        gt = g * (alpha + (1.0 - alpha) * np.eye(g.shape[0]))
        term = gt @ np.asarray(w, np.float64)
        lhs = gt if lhs is None else lhs + gt
        rhs = term if rhs is None else rhs + term
    d = lhs.shape[0]
    diag = np.diag(lhs).copy()
    if rank_bound is None or rank_bound >= d:
        chol, info = lapack.dpotrf(lhs, lower=True)
        if info == 0:
            anorm = np.abs(lhs).sum(axis=0).max()
            rcond, info = lapack.dpocon(chol, anorm, uplo="L")
            # lam_min >= rcond * ||S||_1 >= rcond * lam_max, and every cutoff is <= rel * lam_max.
            rel = float(rtol) if rtol is not None else math.sqrt(d) * _EPS32 + d * _EPS64
            if info == 0 and rcond > _FAST_MARGIN * rel:
                out, info = lapack.dpotrs(chol, rhs, lower=True)
                if info == 0:
                    return out, 0, cutoff(diag, float(anorm), rtol)
    lam, vec = np.linalg.eigh(lhs)
    unseen = unresolved(lam, vec, diag, rank_bound, rtol)
    seen = ~unseen
    coef = vec.T @ rhs
    mean = sum(np.asarray(w, np.float64) for w in ws) / len(ws)
    coef = np.where(seen[:, None], coef / np.where(seen, lam, 1.0)[:, None], vec.T @ mean)
    return vec @ coef, int(unseen.sum()), cutoff(diag, float(lam[-1]), rtol)


def _rows(g: Any, mod: str) -> Optional[int]:
    """Rows behind one model's Gram of ``mod`` (``meta["rows"]`` of a :class:`Grams`), or None."""
    meta = getattr(g, "meta", None)
    if not isinstance(meta, Mapping):
        return None
    rows = meta.get("rows") or {}
    owner = (meta.get("aliases") or {}).get(mod, mod)
    for key in (mod, owner, f"body/{mod}", f"body/{owner}"):
        if key in rows:
            return int(rows[key])
    # Files without per-layer rows: every layer saw at most num_tokens rows (the pooler fewer).
    tokens = getattr(g, "num_tokens", 0) or meta.get("num_tokens") or 0
    return int(tokens) if tokens else None


def _dense_layers(flat: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Module path -> kernel shape, for every Dense (2-D ``kernel``) leaf of the body."""
    return {module_path(k): tuple(np.shape(v)) for k, v in flat.items() if k.endswith("/kernel") and np.ndim(v) == 2}


def regmean(
    bodies: Sequence[Body],
    grams: Sequence[Grams],
    alpha: float = 1.0,
    dtype: Literal["float32", "float64"] = "float64",
    rtol: Optional[float] = None,
    diagnostics: Optional[dict] = None,
) -> dict[str, Any]:
    """RegMean merge (Jin et al., ICLR 2023).

    ``W = solve(sum_j G~_j, sum_j G~_j W_j)`` with ``G~_j = alpha G_j + (1 - alpha) diag(G_j)``
    for every Dense kernel that has a Gram in every model (``grams[j]`` is a flat dict keyed by the
    Dense module's body path, e.g. ``"encoder/layer/0/attention/self/query"``, value ``G [in, in]``;
    a leading ``body/`` is accepted). ``alpha = 1`` disables shrinkage (the authors' GLUE setting).
    Everything else (biases, LayerNorms, embeddings, Dense layers without Grams) is the simple mean.
    The default ``dtype="float64"`` solves on the host in float64 and keeps the simple mean along
    the eigen-directions of ``sum_j G~_j`` the Grams cannot resolve (:func:`unresolved`: eigenvalue
    ``<= sqrt(d) eps32 v^T diag(S) v``, the float32 Gram's rounding along ``v``, or beyond the rank
    ``sum_j rows_j`` that ``Grams.meta["rows"]`` allows); an explicit ``rtol`` uses
    ``lambda <= rtol * lambda_max`` instead. ``diagnostics`` (a dict, filled in place; ``merge``
    passes its report's) gets ``diagnostics["regmean"][layer] = {"fallback": k, "dims": d,
    "threshold": t, "rank_bound": N}`` per layer solved in float64 (``t``: the largest cutoff applied, in
    the Gram's units), and a layer falling back in more than :data:`FALLBACK_WARN_SHARE` of its
    directions is warned about (``warnings.warn``, and the message appended to
    ``diagnostics["warnings"]``). ``dtype="float32"`` is a plain LU solve on the device (fast
    on a GPU, for Grams from many more examples than the layers are wide). The result keeps the
    kernels' dtype.

    Raises ``FisherJaxError`` when a Gram names no Dense layer, has the wrong shape, exists for some
    models but not others, when no Gram matches any layer (the released driver's silent fallback to
    simple averaging), or when a float32 solve is not finite (use float64, or ``alpha < 1``).
    """
    names, flats = _flatten_bodies(bodies)
    n = len(bodies)
    if len(grams) != n:
        raise FisherJaxError(f"got {len(grams)} Gram sets for {n} models")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise FisherJaxError(f"alpha must be in [0, 1], got {alpha}")
    if dtype not in ("float32", "float64"):
        raise FisherJaxError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    dense = _dense_layers(flats[0])

    gs: list[dict[str, Any]] = []
    for j, g in enumerate(grams):
        if not isinstance(g, Mapping):
            raise FisherJaxError(f"grams[{j}] must be a dict of Dense-layer path -> Gram [in, in], got {type(g).__name__}")
        gj = {}
        for key, mat in g.items():
            mod = _strip(str(key))
            if mod not in dense:
                raise FisherJaxError(f"grams[{j}] has a Gram for '{key}', which is not a Dense layer of the body{did_you_mean(mod, dense)}")
            fan_in = dense[mod][0]
            if np.shape(mat) != (fan_in, fan_in):
                raise FisherJaxError(
                    f"grams[{j}]['{key}'] has shape {tuple(np.shape(mat))}, but that layer's kernel is {dense[mod]} "
                    f"(expected ({fan_in}, {fan_in}); statistics for another model?)"
                )
            gj[mod] = mat
        gs.append(gj)
    covered = [m for m in dense if all(m in g for g in gs)]
    for m in dense:
        have = [j for j, g in enumerate(gs) if m in g]
        if have and len(have) != n:
            lack = next(j for j in range(n) if j not in have)
            raise FisherJaxError(f"grams[{have[0]}] has a Gram for '{m}' but grams[{lack}] does not")
    if not covered:
        raise FisherJaxError("regmean: no Gram matches a Dense layer of the body (it would just be the simple mean)")

    out: dict[str, Any] = {}
    # Layers whose Grams are the same objects in every model (query/key/value share one input)
    # are solved together: one factorisation, their kernels concatenated along the output axis.
    groups: dict[tuple[int, ...], list[str]] = {}
    for m in covered:
        groups.setdefault(tuple(id(g[m]) for g in gs), []).append(m)
    alpha_ = jnp.float32(alpha)
    report: dict[str, dict[str, Any]] = {}
    warned: list[str] = []
    for mods in groups.values():
        kernels = [f"{m}/kernel" for m in mods]
        widths = [dense[m][1] for m in mods]
        ws = [
            flats[j][kernels[0]] if len(kernels) == 1 else jnp.concatenate([flats[j][k] for k in kernels], axis=1)
            for j in range(n)
        ]
        g_list = [gs[j][mods[0]] for j in range(n)]
        if dtype == "float64":
            d = int(np.shape(g_list[0])[0])
            rows = [_rows(grams[j], mods[0]) for j in range(n)]
            # Only alpha = 1 leaves the rank at the rows' count; shrinkage adds a full-rank diagonal.
            bound = sum(rows) if alpha == 1.0 and all(r is not None for r in rows) else None
            merged, unseen, cut = _regmean_solve64([np.asarray(w) for w in ws], [np.asarray(g) for g in g_list],
                                                   alpha, None if rtol is None else float(rtol), bound)
            for m in mods:
                report[m] = {"fallback": unseen, "dims": d, "threshold": cut, "rank_bound": bound}
            if unseen > FALLBACK_WARN_SHARE * d:
                names_ = mods[0] if len(mods) == 1 else f"{mods[0]} (and {len(mods) - 1} sharing its Gram)"
                why = f"rank <= {bound} rows" if bound is not None and bound < d else "inputs in a subspace"
                msg = (f"regmean: '{names_}' keeps the simple mean in {unseen} of its {d} input directions "
                       f"({unseen / d:.0%} > {FALLBACK_WARN_SHARE:.0%}; {why}): there it is simple averaging")
                warnings.warn(msg, stacklevel=2)
                warned.append(msg)
            elif unseen:
                log.info("regmean: %s: %d of %d input directions unseen by every model's Gram keep the simple mean",
                         mods[0], unseen, d)
        else:
            merged = _solve32(*_regmean_system(tuple(ws), tuple(jnp.asarray(g) for g in g_list), alpha_))
        if not bool(jnp.all(jnp.isfinite(merged))):
            raise FisherJaxError(
                f"regmean: the summed Gram of '{mods[0]}' is singular (non-finite solution); try alpha < 1"
            )
        start = 0
        for k, width in zip(kernels, widths):
            out[k] = jnp.asarray(merged[:, start:start + width], dtype=jnp.result_type(flats[0][k]))
            start += width
    for k in names:
        if k not in out:
            out[k] = _mean_leaf(tuple(f[k] for f in flats))
    if diagnostics is not None:
        diagnostics.setdefault("regmean", {}).update({m: report[m] for m in covered if m in report})
        if warned:
            diagnostics.setdefault("warnings", []).extend(warned)
    return unflatten({k: out[k] for k in names})


__all__ = ["FALLBACK_WARN_SHARE", "Grams", "cutoff", "regmean", "unresolved"]
