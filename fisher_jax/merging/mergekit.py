"""The data-free merges mergekit users know: SLERP, Model Stock, Model Breadcrumbs, DELLA.

Pure functions over body trees like :mod:`fisher_jax.merging.methods`: one leaf at a time, jitted
kernels in float32 (or wider), each leaf keeping its input dtype, inputs never modified.
Coefficients (``t``, ``lam``, ``density``, ``gamma``, ``epsilon``) accept everything
:mod:`fisher_jax.merging.coefficients` resolves: numbers, lists per model, layer schedules,
name filters.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import FisherJaxError
from ..tree import unflatten
from .coefficients import Coefficient, resolve
from .methods import Body, _acc, _densities, _flatten_bodies, _flatten_with_base, _lams, _name_hash, _ties_combine

# |cos| above which two tensors count as parallel and SLERP falls back to linear interpolation
# (mergekit's DOT_THRESHOLD): sin(theta) is too small to divide by there.
DOT_THRESHOLD = 0.9995
# A vector with a norm at or below this is not normalised (mergekit's eps).
NORM_EPS = 1e-8
# Model Stock: the floor on |tau_i| |tau_j| in the pairwise cosines (mergekit's clamp).
STOCK_EPS = 1e-6


# --------------------------------------------------------------------------------------- SLERP
@jax.jit
def _slerp_leaf(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
    dt = _acc(a.dtype)
    v0, v1 = a.astype(dt), b.astype(dt)
    n0, n1 = jnp.sqrt(jnp.sum(v0 * v0)), jnp.sqrt(jnp.sum(v1 * v1))
    u0 = jnp.where(n0 > NORM_EPS, v0 / jnp.where(n0 > NORM_EPS, n0, 1.0), v0)
    u1 = jnp.where(n1 > NORM_EPS, v1 / jnp.where(n1 > NORM_EPS, n1, 1.0), v1)
    dot = jnp.sum(u0 * u1)
    parallel = jnp.abs(dot) > DOT_THRESHOLD
    theta = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
    sin_theta = jnp.where(parallel, 1.0, jnp.sin(theta))  # never divides by ~0 on the lerp branch
    s0 = jnp.sin((1.0 - t) * theta) / sin_theta
    s1 = jnp.sin(t * theta) / sin_theta
    out = jnp.where(parallel, (1.0 - t) * v0 + t * v1, s0 * v0 + s1 * v1)
    return out.astype(a.dtype)


def slerp(bodies: Sequence[Body], t: Coefficient = 0.5) -> dict[str, Any]:
    """Spherical linear interpolation of two bodies, tensor by tensor (Shoemake 1985; as mergekit merges).

    For each leaf, with ``v0, v1`` the two models' tensors flattened, ``u_i = v_i / ||v_i||``
    (left as is when ``||v_i|| <= 1e-8``) and ``cos theta = u_0 . u_1``:

        theta_t = slerp(v0, v1; t) = sin((1 - t) theta) / sin(theta) v0 + sin(t theta) / sin(theta) v1

    applied to the un-normalised tensors; where ``|cos theta| > 0.9995`` (near-parallel tensors,
    :data:`DOT_THRESHOLD`) it is the linear ``(1 - t) v0 + t v1``. ``t = 0`` gives the first
    model, ``t = 1`` the second. ``t`` in ``[0, 1]`` is one value per tensor: a number, a layer
    schedule or name filters (mergekit's per-layer ``t`` gradients), not a list per model.
    """
    names, flats = _flatten_bodies(bodies)
    if len(flats) != 2:
        raise FisherJaxError(f"slerp merges exactly two models, got {len(flats)}")
    ts = resolve(t, names, 1, "t", lambda x: 0.0 <= x <= 1.0, "in [0, 1]", models=False)
    return unflatten({k: _slerp_leaf(flats[0][k], flats[1][k], jnp.float32(ts[k][0])) for k in names})


# --------------------------------------------------------------------------------- Model Stock
@jax.jit
def _stock_ratio(base: jax.Array, xs: tuple[jax.Array, ...]) -> jax.Array:
    """Model Stock's ``t = N cos / (1 + (N - 1) cos)``, cos the mean pairwise cosine of the task vectors."""
    dt = _acc(base.dtype)
    tvs = [(x.astype(dt) - base.astype(dt)).ravel() for x in xs]
    norms = [jnp.sqrt(jnp.sum(v * v)) for v in tvs]
    cos = []
    for i in range(len(tvs)):
        for j in range(i + 1, len(tvs)):
            c = jnp.sum(tvs[i] * tvs[j]) / jnp.maximum(norms[i] * norms[j], STOCK_EPS)
            cos.append(jnp.clip(c, -1.0, 1.0))
    c = jnp.maximum(sum(cos) / len(cos), 0.0)
    n = len(tvs)
    return n * c / (1.0 + (n - 1) * c)


@jax.jit
def _stock_leaf(base: jax.Array, xs: tuple[jax.Array, ...], ratio: jax.Array) -> jax.Array:
    dt = _acc(base.dtype)
    mean = sum(x.astype(dt) for x in xs) / len(xs)
    return (ratio * mean + (1.0 - ratio) * base.astype(dt)).astype(base.dtype)


def model_stock(bodies: Sequence[Body], base: Body, diagnostics: Optional[dict] = None) -> dict[str, Any]:
    """Model Stock (Jang, Yun, Han; ECCV 2024, "Model Stock: All we need is just a few fine-tuned models").

    Per tensor, with task vectors ``tau_j = theta_j - theta_0`` of the ``N >= 2`` models and
    ``cos theta`` the mean over pairs ``i < j`` of ``tau_i . tau_j / max(|tau_i| |tau_j|, 1e-6)``:

        t = N cos theta / (1 + (N - 1) cos theta),    theta = t mean_j theta_j + (1 - t) theta_0

    the point of the segment from the base to the models' average that the paper's geometry
    picks. ``cos theta`` is taken as ``max(cos theta, 0)`` so ``t`` stays in ``[0, 1]``: for
    task vectors that point apart the merge is the base (the paper's fine-tunes always agree
    in direction; mergekit leaves the negative case undefined). ``diagnostics["model_stock"]``
    gets ``t`` per tensor when a dict is passed.
    """
    names, flats, bflat = _flatten_with_base(bodies, base)
    if len(flats) < 2:
        raise FisherJaxError(f"model_stock needs at least two fine-tuned models besides the base, got {len(flats)}")
    out, ratios = {}, {}
    for k in names:
        xs = tuple(f[k] for f in flats)
        r = _stock_ratio(bflat[k], xs)
        ratios[k] = float(r)
        out[k] = _stock_leaf(bflat[k], xs, r)
    if diagnostics is not None:
        diagnostics.setdefault("model_stock", {}).update(ratios)
    return unflatten(out)


# ---------------------------------------------------------------------------- Model Breadcrumbs
def breadcrumbs_mask(tv: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Keep-mask of one task-vector tensor: drop its ``gamma`` share of largest magnitudes and the smallest.

    With ``n`` entries ranked by ``|tau|`` (ascending, ties by position), ``k = floor(density n)``
    kept and ``top = floor(gamma n)`` removed from the top (fewer when ``k + top > n``), the kept
    entries are ranks ``[n - top - k, n - top)``. ``density >= 1`` keeps everything.
    """
    flat = np.abs(np.asarray(tv, np.float64)).ravel()
    n = flat.size
    if density >= 1.0:
        return np.ones(np.shape(tv), bool)
    keep_n = int(density * n)
    top = min(int(gamma * n), n - keep_n)
    order = np.argsort(flat, kind="stable")
    mask = np.zeros(n, bool)
    mask[order[n - top - keep_n:n - top]] = True
    return mask.reshape(np.shape(tv))


@jax.jit
def _task_vectors(base: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    dt = _acc(base.dtype)
    return tuple(x.astype(dt) - base.astype(dt) for x in xs)


@jax.jit
def _masked_sum_leaf(base: jax.Array, tvs: tuple[jax.Array, ...], masks: tuple[jax.Array, ...], lams: jax.Array) -> jax.Array:
    dt = _acc(base.dtype)
    total = sum(lams[j] * jnp.where(m, tv, 0.0) for j, (tv, m) in enumerate(zip(tvs, masks)))
    return (base.astype(dt) + total).astype(base.dtype)


def breadcrumbs(
    bodies: Sequence[Body],
    base: Body,
    density: Coefficient = 0.9,
    gamma: Coefficient = 0.01,
    lam: Coefficient = 1.0,
) -> dict[str, Any]:
    """Model Breadcrumbs (Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks").

    Each task vector ``tau_j = theta_j - theta_0`` is masked per tensor: its ``gamma`` share of
    largest-magnitude entries (outliers) and its smallest entries are dropped so that a
    ``density`` share is kept (:func:`breadcrumbs_mask`, mergekit's ``density``/``gamma``); then

        theta = theta_0 + sum_j lam_j m_j * tau_j

    (``lam = 1/N`` gives mergekit's normalised sum). ``density``, ``gamma`` and ``lam`` may differ
    per model and per tensor.
    """
    names, flats, bflat = _flatten_with_base(bodies, base)
    n = len(flats)
    dens = _densities(density, names, n, "tensor")
    gams = resolve(gamma, names, n, "gamma", lambda x: 0.0 <= x < 1.0, "in [0, 1)")
    lams = _lams(lam, names, n)
    out = {}
    for k in names:
        tvs = _task_vectors(bflat[k], tuple(f[k] for f in flats))
        masks = tuple(jnp.asarray(breadcrumbs_mask(np.asarray(tv), dens[k][j], gams[k][j])) for j, tv in enumerate(tvs))
        out[k] = _masked_sum_leaf(bflat[k], tvs, masks, jnp.asarray(lams[k], jnp.float32))
    return unflatten(out)


# ------------------------------------------------------------------------------------- DELLA
def _row_axis(name: str, ndim: int) -> int:
    """Axis of a PyTorch weight's row: a Flax kernel ``[in, out]`` is the transposed weight (axis 0)."""
    return 0 if (name.endswith("/kernel") and ndim == 2) else ndim - 1


def della_keep_probabilities(tv: np.ndarray, name: str, density: float, epsilon: float) -> np.ndarray:
    """DELLA's MagPrune keep probabilities: ``density - epsilon`` to ``density + epsilon`` by magnitude rank.

    Within each row (a PyTorch weight row: one output unit of a Dense kernel, one token of an
    embedding; the whole vector for 1-D tensors) entries are ranked by ``|tau|`` (ascending, ties
    by position); rank ``r`` of ``n`` gets ``p = density - epsilon + 2 epsilon r / (n - 1)``
    (``density`` for a row of one entry).
    """
    arr = np.abs(np.asarray(tv, np.float64))
    if arr.ndim == 0:
        return np.full(arr.shape, density)
    axis = _row_axis(name, arr.ndim)
    moved = np.moveaxis(arr, axis, -1)
    ranks = np.argsort(np.argsort(moved, axis=-1, kind="stable"), axis=-1, kind="stable").astype(np.float64)
    width = moved.shape[-1]
    norm = ranks / (width - 1) if width > 1 else np.full(moved.shape, 0.5)
    return np.moveaxis(density - epsilon + 2.0 * epsilon * norm, -1, axis)


@jax.jit
def _della_uniform(seed: jax.Array, model_index: jax.Array, name_hash: jax.Array, probs: jax.Array) -> jax.Array:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), model_index), name_hash)
    return jax.random.uniform(key, probs.shape) < probs


def della_keep_mask(seed: int, model_index: int, name: str, probs: np.ndarray) -> np.ndarray:
    """The keep-mask :func:`della` draws for model ``model_index``'s leaf ``name``: ``U < p`` entrywise.

    The stream is folded from ``seed``, the model's position and the leaf's name (as DARE's).
    """
    return np.asarray(_della_uniform(np.uint32(int(seed) % 2**32), np.uint32(model_index), _name_hash(name),
                                     jnp.asarray(probs, jnp.float32)))


@jax.jit
def _della_leaf(base: jax.Array, tvs: tuple[jax.Array, ...], keeps: tuple[jax.Array, ...], probs: tuple[jax.Array, ...],
                lams: jax.Array) -> jax.Array:
    rescaled = [jnp.where(k, tv / p, 0.0) for tv, k, p in zip(tvs, keeps, probs)]
    zero = jnp.zeros((len(tvs),), jnp.float32)  # keep every entry that survived the draw
    return _ties_combine(base, rescaled, zero, jnp.float32(1.0), lams)


def della(
    bodies: Sequence[Body],
    base: Body,
    density: Coefficient = 0.7,
    epsilon: Coefficient = 0.1,
    lam: Coefficient = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """DELLA (Deep, Bhardwaj, Jain, Sinha, Poria 2024, "DELLA-Merging: Reducing Interference in Model
    Merging through Magnitude-Based Sampling").

    1. Drop (MagPrune): entry ``i`` of ``tau_j = theta_j - theta_0`` is kept with probability
       ``p_i`` from ``density - epsilon`` (smallest magnitude in its row) to ``density + epsilon``
       (largest) (:func:`della_keep_probabilities`), drawn from ``jax.random`` per model and tensor
       (:func:`della_keep_mask`), and rescaled by ``1 / p_i`` so its expectation is unchanged;
    2. Elect: ``gamma = sign(sum_j lam_j tau_j')`` per entry;
    3. Fuse: the disjoint mean of the ``lam_j tau_j'`` that agree with ``gamma``;
       ``theta = theta_0 + tau``.

    ``density - epsilon`` must be > 0 and ``density + epsilon`` <= 1; ``density = 1`` with
    ``epsilon = 0`` keeps everything (TIES without trimming). Like DARE, the result depends on
    the models' order through the draw.
    """
    names, flats, bflat = _flatten_with_base(bodies, base)
    n = len(flats)
    dens = _densities(density, names, n, "tensor")
    eps = resolve(epsilon, names, n, "epsilon", lambda x: 0.0 <= x < 1.0, "in [0, 1)")
    lams = _lams(lam, names, n)
    for k in names:
        for j in range(n):
            lo, hi = dens[k][j] - eps[k][j], dens[k][j] + eps[k][j]
            if not (lo > 0.0 and hi <= 1.0 + 1e-12):
                raise FisherJaxError(
                    f"della: density +/- epsilon must lie in (0, 1], got {dens[k][j]} +/- {eps[k][j]}"
                    + (f" for model {j} at '{k}'" if n > 1 else "")
                )
    seed_ = np.uint32(int(seed) % 2**32)
    out = {}
    for k in names:
        tvs = _task_vectors(bflat[k], tuple(f[k] for f in flats))
        probs, keeps = [], []
        for j, tv in enumerate(tvs):
            p = np.minimum(della_keep_probabilities(np.asarray(tv), k, dens[k][j], eps[k][j]), 1.0)
            probs.append(jnp.asarray(p, jnp.float32))
            keeps.append(_della_uniform(seed_, np.uint32(j), _name_hash(k), probs[-1]))
        out[k] = _della_leaf(bflat[k], tvs, tuple(keeps), tuple(probs), jnp.asarray(lams[k], jnp.float32))
    return unflatten(out)


__all__ = [
    "DOT_THRESHOLD", "breadcrumbs", "breadcrumbs_mask", "della", "della_keep_mask", "della_keep_probabilities",
    "model_stock", "slerp",
]
