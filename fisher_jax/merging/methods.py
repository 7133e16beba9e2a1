"""Baseline merges over *body* trees: simple, task arithmetic, TIES, DARE, Fisher-weighted averaging.

Every function here is pure: it takes a list of body trees (``params["body"]`` of each model, a
nested dict of arrays) and returns a new body tree; no input is modified. Work is done one leaf at
a time by small jitted kernels, so peak memory stays at the inputs plus one output tree (eight
bert-base bodies are 3.5 GB already) and jit compiles once per distinct leaf shape, not per leaf.
All arithmetic is float32 (or wider), and each leaf keeps its input dtype.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import FisherJaxError
from ..tree import Tree, check_same_structure, did_you_mean, flatten, unflatten
from .coefficients import Coefficient, resolve, uniform

Body = Tree  # nested dict of arrays: params["body"]
Flat = dict[str, Any]


# --------------------------------------------------------------------------------------- helpers


def _flatten_bodies(bodies: Sequence[Body], what: str = "bodies") -> tuple[list[str], list[Flat]]:
    """Flatten every body and check they share one structure (names and shapes)."""
    if len(bodies) == 0:
        raise FisherJaxError(f"nothing to merge: no {what} given")
    flats = [flatten(b) for b in bodies]
    for j, f in enumerate(flats[1:], 1):
        check_same_structure(flats[0], f, what=f"{what} 0 and {j}")
    return list(flats[0]), flats


def _flatten_like(trees: Sequence[Tree], ref: Flat, what: str, count: int) -> list[Flat]:
    """Flatten statistics trees that must be shaped exactly like the body ``ref``."""
    if len(trees) != count:
        raise FisherJaxError(f"got {len(trees)} {what} for {count} models")
    flats = []
    for j, t in enumerate(trees):
        f = flatten(t)
        check_same_structure(ref, f, what=f"{what} and the body" if count == 1 else f"{what}[{j}] and the body")
        flats.append(f)
    return flats


def _flatten_with_base(bodies: Sequence[Body], base: Body) -> tuple[list[str], list[Flat], Flat]:
    """:func:`_flatten_bodies` plus the pre-trained body ``theta_0`` of the task vectors, checked against them."""
    names, flats = _flatten_bodies(bodies)
    (bflat,) = _flatten_like([base], flats[0], "base", 1)
    return names, flats, bflat


def _acc(dtype: Any) -> Any:
    """Accumulation dtype: at least float32, so bfloat16 bodies are summed without drift."""
    return jnp.promote_types(dtype, jnp.float32)


def _coefficients(lam: Optional[Sequence[float]], n: int, what: str = "lam") -> np.ndarray:
    """Per-model coefficients, uniform by default; validated (length, finite, >= 0, not all 0)."""
    if lam is None:
        return np.full(n, 1.0 / n)
    try:
        arr = np.asarray(lam, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise FisherJaxError(f"{what} must be a number or one number per model here, got {lam!r}") from None
    if arr.size == 1 and n > 1:  # one value for every model (what a CLI `--lam 0.5` gives)
        arr = np.full(n, arr[0])
    if arr.size != n:
        raise FisherJaxError(f"{what} has {arr.size} entries for {n} models")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or not np.any(arr > 0):
        raise FisherJaxError(f"{what} must be finite, non-negative and not all zero; got {arr.tolist()}")
    return arr


# ------------------------------------------------------------------------------- leaf kernels
# Each kernel takes the per-model leaves as a tuple; jit retraces only for a new (shape, count).


@jax.jit
def _mean_leaf(xs: tuple[jax.Array, ...]) -> jax.Array:
    dt = xs[0].dtype
    total = functools.reduce(jnp.add, [x.astype(_acc(dt)) for x in xs])
    return (total / len(xs)).astype(dt)


@jax.jit
def _task_arithmetic_leaf(base: jax.Array, xs: tuple[jax.Array, ...], lam: jax.Array) -> jax.Array:
    b = base.astype(_acc(base.dtype))
    tv = functools.reduce(jnp.add, [x.astype(b.dtype) - b for x in xs])
    return (b + lam * tv).astype(base.dtype)


@jax.jit
def _task_arithmetic_pm_leaf(base: jax.Array, xs: tuple[jax.Array, ...], lams: jax.Array) -> jax.Array:
    # One lam per model: theta_0 + sum_j lam_j tau_j (the scalar kernel above when they are equal).
    b = base.astype(_acc(base.dtype))
    tv = functools.reduce(jnp.add, [lams[j] * (x.astype(b.dtype) - b) for j, x in enumerate(xs)])
    return (b + tv).astype(base.dtype)


def _finite(x: float) -> bool:
    return math.isfinite(x)


def _model_weights(lam: Optional[Coefficient], names: Sequence[str], n: int) -> dict[str, jax.Array]:
    """Per-leaf float32 model weights of a weighted average: :func:`_coefficients` for ``None``, a
    number or a list of numbers (one array for every leaf), else resolved per leaf and checked per leaf."""
    plain = lam is None or isinstance(lam, (int, float, np.number)) or (
        isinstance(lam, (list, tuple, np.ndarray)) and all(isinstance(v, (int, float, np.number)) for v in lam))
    if plain:
        shared = jnp.asarray(_coefficients(lam, n), jnp.float32)
        return {k: shared for k in names}
    out = {}
    for k, row in resolve(lam, names, n, "lam", lambda x: x >= 0, "finite and >= 0").items():
        if not np.any(row > 0):
            raise FisherJaxError(f"lam is 0 for every model at '{k}'")
        out[k] = jnp.asarray(row, jnp.float32)
    return out


def _lams(lam: Coefficient, names: Sequence[str], n: int) -> dict[str, np.ndarray]:
    """``lam`` per leaf and model (:func:`fisher_jax.merging.coefficients.resolve`), finite."""
    return resolve(lam, names, n, "lam", _finite, "finite")


def _weighted_mean(xs: Sequence[jax.Array], ws: Sequence[jax.Array]) -> jax.Array:
    """``sum_j w_j x_j / sum_j w_j``; where every weight is 0 the plain mean (equal weights)."""
    dt = _acc(xs[0].dtype)
    num = functools.reduce(jnp.add, [w * x.astype(dt) for w, x in zip(ws, xs)])
    den = functools.reduce(jnp.add, list(ws))
    ok = den != 0
    mean = functools.reduce(jnp.add, [x.astype(dt) for x in xs]) / len(xs)
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), mean).astype(xs[0].dtype)


@jax.jit
def _weighted_leaf(xs: tuple[jax.Array, ...], ws: tuple[jax.Array, ...]) -> jax.Array:
    return _weighted_mean(xs, [w.astype(_acc(xs[0].dtype)) for w in ws])


@functools.partial(jax.jit, static_argnames=("gamma",))
def _fisher_leaf(
    xs: tuple[jax.Array, ...],
    fs: tuple[jax.Array, ...],
    lam: jax.Array,
    scale: jax.Array,
    floor: jax.Array,
    gamma: float = 1.0,
) -> jax.Array:
    # w_j = lam_j * (F_j**gamma * scale_j + floor_j); scale_j, floor_j per model (see fisher()).
    # gamma == 1 skips the power so the un-normalised merge is bit-for-bit the released one.
    dt = _acc(xs[0].dtype)
    ws = [lam[j] * (_temper(f.astype(dt), gamma) * scale[j] + floor[j]) for j, f in enumerate(fs)]
    return _weighted_mean(xs, ws)


def _temper(f: jax.Array, gamma: float) -> jax.Array:
    """``F**gamma`` (``0**0 = 1``); the identity for ``gamma == 1``."""
    return f if gamma == 1.0 else jnp.power(f, gamma)


@jax.jit
def _sum_squares(x: jax.Array) -> jax.Array:
    x = x.astype(_acc(x.dtype))
    return jnp.sum(x * x)


@functools.partial(jax.jit, static_argnames=("gamma",))
def _tempered_sums(x: jax.Array, gamma: float) -> tuple[jax.Array, jax.Array]:
    """``(sum G, sum G^2)`` of ``G = x**gamma``, in float32 or wider."""
    g = _temper(x.astype(_acc(x.dtype)), gamma)
    return jnp.sum(g), jnp.sum(g * g)


# ------------------------------------------------------------------------------ normalisation
# Public names of fisher()/fisher_nodes()'s `normalize=`; True/False are the released spellings.
NORMALIZATIONS = ("none", "l2", "mean", "layer")
LEGACY_L2 = "legacy_l2"  # normalize=True: global L2 with an absolute floor (the released behaviour)
# The normalised method columns' choice (fisher_normalized, fisher_nodes_normalized): the one that
# kept both tasks' share of their own score on the demo's classification + regression pair.
DEFAULT_NORMALIZE = "layer"


def resolve_normalize(normalize: Any) -> str:
    """``normalize=`` as one of :data:`NORMALIZATIONS` or ``"legacy_l2"`` (for ``True``).

    ``False``/``None`` -> ``"none"``; ``True`` -> ``"legacy_l2"``: the released global-L2
    normalisation with an absolute floor, kept unchanged for backward compatibility.
    """
    if normalize is None or normalize is False:
        return "none"
    if normalize is True:
        return LEGACY_L2
    if isinstance(normalize, str):
        key = normalize.strip().lower()
        if key in NORMALIZATIONS:
            return key
        raise FisherJaxError(
            f"unknown normalize={normalize!r}{did_you_mean(key, NORMALIZATIONS)}; choose from "
            f"{', '.join(NORMALIZATIONS)} (or True/False)"
        )
    raise FisherJaxError(f"normalize must be a bool or one of {', '.join(NORMALIZATIONS)}, got {type(normalize).__name__}")


def is_normalized(normalize: Any) -> bool:
    """Whether ``normalize=`` puts every model's Fisher on a common scale (anything but "none")."""
    return resolve_normalize(normalize) != "none"


def check_gamma(gamma: float) -> float:
    """The tempering exponent of ``F**gamma``: finite and >= 0 (0 gives equal weights)."""
    gamma = float(gamma)
    if not (math.isfinite(gamma) and gamma >= 0):
        raise FisherJaxError(f"gamma must be finite and >= 0, got {gamma}")
    return gamma


def check_floor(floor: float) -> float:
    floor = float(floor)
    if not (math.isfinite(floor) and floor >= 0):
        raise FisherJaxError(f"floor must be finite and >= 0, got {floor}")
    return floor


def unit_scale(total: float, total_sq: float, count: int, mode: str, what: str) -> tuple[float, float]:
    """``(scale, mean)`` of one normalisation unit with ``sum G = total``, ``sum G^2 = total_sq``.

    ``scale`` makes the unit's L2 norm (``"l2"``, ``"legacy_l2"``) or mean (``"mean"``,
    ``"layer"``) equal to 1; ``mean`` is the unit's mean AFTER scaling, the reference a relative
    floor multiplies. ``"none"`` gives ``(1, mean G)``. A unit that is zero everywhere keeps scale 1.
    """
    mean = total / max(count, 1)
    if mode == "none":
        return 1.0, mean
    if mode in ("l2", LEGACY_L2):
        norm = math.sqrt(total_sq)
        if mode == LEGACY_L2 and not (norm > 0 and math.isfinite(norm)):
            raise FisherJaxError(f"cannot normalise {what}: its global L2 norm is {norm}")
        scale = 1.0 / norm if norm > 0 else 1.0
    else:
        scale = 1.0 / mean if mean > 0 else 1.0
    if not math.isfinite(scale):
        raise FisherJaxError(f"cannot normalise {what}: its scale is {scale}")
    return scale, mean * scale


# ---------------------------------------------------------------------- provenance of statistics
def fisher_provenance(stats: Any) -> tuple[Optional[str], Optional[str]]:
    """``(loss, estimator)`` a Fisher record's metadata declares (``None`` where unknown)."""
    from ..stats.io import loss_of

    meta = getattr(stats, "meta", None)
    if not isinstance(meta, Mapping):
        return None, None
    return loss_of(meta), meta.get("estimator")


def scale_mix_warning(stats: Sequence[Any], normalize: Any) -> Optional[str]:
    """The one-sentence warning for un-normalised Fishers of different losses or estimators, else None.

    Cross-entropy and squared-error Fishers (or a per-example and a batch-sum estimator) differ in
    scale by orders of magnitude, so an un-normalised weighted average lets one model decide.
    """
    if is_normalized(normalize):
        return None
    prov = [fisher_provenance(s) for s in stats]
    for pos, what in ((0, "losses"), (1, "estimators")):
        kinds = list(dict.fromkeys(p[pos] for p in prov if p[pos] is not None))
        if len(kinds) > 1:
            where = "; ".join(
                f"{k} for model{'s' if n > 1 else ''} {', '.join(str(j) for j, p in enumerate(prov) if p[pos] == k)}"
                for k in kinds
                for n in [sum(p[pos] == k for p in prov)]
            )
            return (
                f"merging Fishers of different {what} ({where}) without normalisation: their scales differ, "
                f"so one model's Fisher decides most weights; pass normalize='{DEFAULT_NORMALIZE}' (the '_normalized' method columns)"
            )
    return None


@jax.jit
def _abs_task_vector(x: jax.Array, base: jax.Array) -> jax.Array:
    dt = _acc(base.dtype)
    return jnp.abs(x.astype(dt) - base.astype(dt))


def _ties_combine(base: jax.Array, tvs: Sequence[jax.Array], thresholds: jax.Array, lam: jax.Array,
                  weights: Optional[jax.Array] = None) -> jax.Array:
    """Trim each task vector at its threshold, elect signs, disjoint mean, ``base + lam * merged``.

    ``weights`` (one per model) scale the trimmed task vectors before the election (per-model ``lam``).
    """
    dt = _acc(base.dtype)
    trimmed = [jnp.where(jnp.abs(tv) >= thresholds[j], tv, 0.0) for j, tv in enumerate(tvs)]
    if weights is not None:
        trimmed = [weights[j] * t for j, t in enumerate(trimmed)]
    elected = jnp.sign(functools.reduce(jnp.add, trimmed))
    # An entry agrees when it is non-zero and has the elected sign; where the trimmed values sum
    # to exactly 0 the elected sign is 0 and nothing agrees, so the merged entry is 0.
    agree = [(jnp.sign(t) == elected) & (t != 0) for t in trimmed]
    num = functools.reduce(jnp.add, [jnp.where(a, t, 0.0) for a, t in zip(agree, trimmed)])
    cnt = functools.reduce(jnp.add, [a.astype(dt) for a in agree])
    merged = num / jnp.maximum(cnt, 1.0)
    return (base.astype(dt) + lam * merged).astype(base.dtype)


@jax.jit
def _ties_leaf(base: jax.Array, xs: tuple[jax.Array, ...], thresholds: jax.Array, lam: jax.Array) -> jax.Array:
    dt = _acc(base.dtype)
    tvs = [x.astype(dt) - base.astype(dt) for x in xs]
    return _ties_combine(base, tvs, thresholds, lam)


@jax.jit
def _ties_pm_leaf(base: jax.Array, xs: tuple[jax.Array, ...], thresholds: jax.Array, lams: jax.Array) -> jax.Array:
    dt = _acc(base.dtype)
    tvs = [x.astype(dt) - base.astype(dt) for x in xs]
    return _ties_combine(base, tvs, thresholds, jnp.float32(1.0), lams)


# ---------------------------------------------------------------------------------- public API


def simple(bodies: Sequence[Body]) -> dict[str, Any]:
    """Elementwise mean: ``theta = (1/N) sum_j theta_j``.

    The baseline of every merging paper (e.g. Wortsman et al. 2022, "Model soups"; Matena &
    Raffel 2022 use it as "isotropic merging").
    """
    names, flats = _flatten_bodies(bodies)
    return unflatten({k: _mean_leaf(tuple(f[k] for f in flats)) for k in names})


def task_arithmetic(bodies: Sequence[Body], base: Body, lam: Coefficient = 1.0) -> dict[str, Any]:
    """Task arithmetic: ``theta = theta_0 + sum_j lam_j (theta_j - theta_0)``.

    Ilharco et al. 2023, "Editing Models with Task Arithmetic" (ICLR). ``base`` is the pre-trained
    body ``theta_0`` every model was fine-tuned from. With ``lam = 1/N`` this is the simple mean.
    ``lam`` is a number, a list per model, a layer schedule or name filters
    (:mod:`fisher_jax.merging.coefficients`), so ``lam_j`` may differ per model and per parameter.
    """
    names, flats, bflat = _flatten_with_base(bodies, base)
    lams = _lams(lam, names, len(flats))
    out = {}
    for k in names:
        xs = tuple(f[k] for f in flats)
        if uniform(lams[k]):
            out[k] = _task_arithmetic_leaf(bflat[k], xs, jnp.float32(lams[k][0]))
        else:
            out[k] = _task_arithmetic_pm_leaf(bflat[k], xs, jnp.asarray(lams[k], jnp.float32))
    return unflatten(out)


def weighted_average(bodies: Sequence[Body], weights: Sequence[Tree]) -> dict[str, Any]:
    """Elementwise weighted mean: ``theta = sum_j w_j theta_j / sum_j w_j``.

    ``weights[j]`` is a tree with the body's names whose leaves broadcast against the body's leaves
    (a scalar, a ``[out]`` vector for a kernel's columns, an ``[in, 1]`` column for its rows, or the
    full shape). Weights should be non-negative; where every model's weight is exactly 0 the entry
    falls back to the plain mean (equal weights). This is the core of Fisher-weighted averaging
    (Matena & Raffel 2022) and of Fisher mask nodes (Thennal et al. 2024).
    """
    names, flats = _flatten_bodies(bodies)
    if len(weights) != len(bodies):
        raise FisherJaxError(f"got {len(weights)} weight trees for {len(bodies)} models")
    wflats = []
    for j, w in enumerate(weights):
        wf = flatten(w)
        missing = [k for k in names if k not in wf]
        extra = [k for k in wf if k not in flats[0]]
        if missing or extra:
            key = (missing or extra)[0]
            side = "is missing from" if missing else "is not in the body but is in"
            raise FisherJaxError(f"weights[{j}]: '{key}' {side} the weight tree")
        wf = {k: jnp.asarray(wf[k], jnp.float32) for k in names}
        for k in names:
            try:
                fits = np.broadcast_shapes(wf[k].shape, np.shape(flats[0][k])) == np.shape(flats[0][k])
            except ValueError:
                fits = False
            if not fits:
                raise FisherJaxError(
                    f"weights[{j}] at '{k}' has shape {tuple(wf[k].shape)}, which does not broadcast to the "
                    f"parameter's shape {tuple(np.shape(flats[0][k]))}"
                )
        wflats.append(wf)
    return unflatten({k: _weighted_leaf(tuple(f[k] for f in flats), tuple(w[k] for w in wflats)) for k in names})


def fisher(
    bodies: Sequence[Body],
    fishers: Sequence[Tree],
    lam: Optional[Coefficient] = None,
    floor: float = 1e-6,
    normalize: Any = False,
    gamma: float = 1.0,
) -> dict[str, Any]:
    """Fisher-weighted averaging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging").

    ``theta = sum_j w_j theta_j / sum_j w_j`` elementwise with ``w_j = lam_j (s_j G_j + f_j)``,
    ``G_j = F_j**gamma`` (``F_j`` model j's diagonal Fisher, a tree shaped like the body; ``gamma``
    tempers it, 0 gives equal weights), and per ``normalize``:

    - ``False``/``"none"`` (default, the released code): ``s_j = 1``, ``f_j = floor`` (absolute);
    - ``True`` (the released normalisation, unchanged): ``s_j = 1 / ||G_j||_2`` over all body
      leaves, ``f_j = floor`` (absolute);
    - ``"l2"``: ``s_j = 1 / ||G_j||_2``; ``"mean"``: ``s_j = 1 / mean(G_j)`` over all entries;
      ``"layer"``: per leaf, ``s_jk = 1 / mean(G_jk)``. For these the floor is relative:
      ``f_j = floor * mean(s_j G_j)`` over the same unit, so it is the same share of every model's
      Fisher whatever its loss (a unit that is zero everywhere keeps ``s = 1``).

    Normalising puts cross-entropy and squared-error Fishers on one scale (SPEC §5); the
    normalised column ``fisher_normalized`` uses :data:`DEFAULT_NORMALIZE` (``"layer"``).
    ``lam`` is uniform by default; a list gives one weight per model, and a layer schedule or
    name filters (:mod:`fisher_jax.merging.coefficients`) weights per parameter too.
    """
    names, flats = _flatten_bodies(bodies)
    fflats = _flatten_like(fishers, flats[0], "fishers", len(bodies))
    lam_by_leaf = _model_weights(lam, names, len(bodies))
    floor = check_floor(floor)
    mode = resolve_normalize(normalize)
    gamma = check_gamma(gamma)
    n = len(bodies)
    # scale[j][k] / floor_[j][k]: per model and leaf (constant over leaves except for "layer").
    scale = [{k: 1.0 for k in names} for _ in range(n)]
    floor_ = [{k: floor for k in names} for _ in range(n)]
    if mode != "none" or gamma != 1.0:
        for j, f in enumerate(fflats):
            sums = {k: tuple(float(v) for v in _tempered_sums(f[k], gamma)) for k in names}
            sizes = {k: int(np.size(f[k])) for k in names}
            if mode == "layer":
                for k in names:
                    s_k, m_k = unit_scale(sums[k][0], sums[k][1], sizes[k], mode, f"fishers[{j}] at '{k}'")
                    scale[j][k], floor_[j][k] = s_k, floor * m_k
            else:
                tot, tot_sq = sum(v[0] for v in sums.values()), sum(v[1] for v in sums.values())
                s_j, m_j = unit_scale(tot, tot_sq, sum(sizes.values()), mode, f"fishers[{j}]")
                rel = floor if mode in ("none", LEGACY_L2) else floor * m_j
                scale[j] = {k: s_j for k in names}
                floor_[j] = {k: rel for k in names}
    out = {}
    for k in names:
        s_k = jnp.asarray([scale[j][k] for j in range(n)], jnp.float32)
        f_k = jnp.asarray([floor_[j][k] for j in range(n)], jnp.float32)
        out[k] = _fisher_leaf(tuple(f[k] for f in flats), tuple(g[k] for g in fflats), lam_by_leaf[k], s_k, f_k,
                              gamma=gamma)
    return unflatten(out)


# ------------------------------------------------------------------------------------ TIES/DARE


def _densities(density: Coefficient, names: Sequence[str], n: int, scope: str, what: str = "density") -> dict[str, np.ndarray]:
    """``density`` per leaf and model, in (0, 1]; with ``scope="global"`` one value per model."""
    dens = resolve(density, names, n, what, lambda d: 0.0 < d <= 1.0, "in (0, 1]")
    if scope == "global" and names:
        first = dens[names[0]]
        for k in names:
            if not np.array_equal(dens[k], first):
                raise FisherJaxError(
                    f"{what} varies across parameters ('{names[0]}' vs '{k}'), but scope='global' ranks each task "
                    f"vector as a whole; use scope='tensor' for per-layer densities"
                )
    return dens


def _kth_largest(values: np.ndarray, k: int) -> float:
    """k-th largest entry (1-based) by introselect: O(n), unlike a full sort of 10^8 entries."""
    n = values.size
    return float(np.partition(values, n - k)[n - k])


def _ties_thresholds(
    names: Sequence[str],
    n_models: int,
    abs_tv: Callable[[int, str], jax.Array],
    density: Mapping[str, np.ndarray],
    scope: str,
) -> list[dict[str, float]]:
    """Per model (and per leaf) magnitude threshold that keeps the top ``ceil(density * n)`` entries.

    ``density[k][j]``: model j's density at leaf k (one value per model when ``scope="global"``).
    """
    out: list[dict[str, float]] = []
    for j in range(n_models):
        if all(density[k][j] >= 1.0 for k in names):  # keep everything: |tv| >= 0 always holds
            out.append({k: 0.0 for k in names})
        elif scope == "global":
            # TIES' released code: top-k over the task's whole flattened vector.
            d = float(density[names[0]][j])
            mags = np.concatenate([np.asarray(abs_tv(j, k)).ravel() for k in names])
            t = _kth_largest(mags, max(1, math.ceil(d * mags.size)))
            del mags
            out.append({k: t for k in names})
        else:
            th = {}
            for k in names:
                d = float(density[k][j])
                if d >= 1.0:
                    th[k] = 0.0
                    continue
                mags = np.asarray(abs_tv(j, k)).ravel()
                th[k] = _kth_largest(mags, max(1, math.ceil(d * mags.size)))
            out.append(th)
    return out


def ties(
    bodies: Sequence[Body],
    base: Body,
    density: Coefficient = 0.2,
    lam: Coefficient = 1.0,
    scope: Literal["global", "tensor"] = "global",
) -> dict[str, Any]:
    """TIES-merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models").

    With task vectors ``tau_j = theta_j - theta_0``:

    1. trim: keep each task's ``ceil(density * n)`` largest-magnitude entries (entries tied with
       the k-th magnitude are kept too), zero the rest. ``scope="global"`` (default, as TIES'
       released code) ranks over the task's whole flattened body; ``"tensor"`` ranks per leaf;
    2. elect: ``gamma = sign(sum_j trimmed tau_j)`` per entry;
    3. disjoint mean: ``tau = sum_{j: sign(tau_j) = gamma, tau_j != 0} tau_j / #{such j}``
       (0 where no entry agrees, including where the trimmed values sum to exactly 0);
    4. ``theta = theta_0 + lam * tau``.

    ``density`` and ``lam`` may be lists per model, layer schedules or name filters
    (:mod:`fisher_jax.merging.coefficients`); a density that varies across layers needs
    ``scope="tensor"``. Per-model ``lam_j`` scale the trimmed task vectors before the election
    (``tau = disjoint mean of lam_j trimmed tau_j``, ``theta = theta_0 + tau``), which for equal
    ``lam_j = lam`` is step 4 exactly.
    """
    names, flats, bflat = _flatten_with_base(bodies, base)
    if scope not in ("global", "tensor"):
        raise FisherJaxError(f"scope must be 'global' or 'tensor', got {scope!r}")
    dens = _densities(density, names, len(flats), scope)
    lams = _lams(lam, names, len(flats))
    thr = _ties_thresholds(names, len(flats), lambda j, k: _abs_task_vector(flats[j][k], bflat[k]), dens, scope)
    out = {}
    for k in names:
        xs, th = tuple(f[k] for f in flats), jnp.asarray([t[k] for t in thr], jnp.float32)
        if uniform(lams[k]):
            out[k] = _ties_leaf(bflat[k], xs, th, jnp.float32(lams[k][0]))
        else:
            out[k] = _ties_pm_leaf(bflat[k], xs, th, jnp.asarray(lams[k], jnp.float32))
    return unflatten(out)


@functools.partial(jax.jit, static_argnums=(4,))
def _keep_mask(seed: jax.Array, model_index: jax.Array, name_hash: jax.Array, drop_rate: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    # A different stream per model and per tensor; the tensor's stream comes from its *name*, so
    # the mask does not depend on leaf order or on which other leaves the tree holds. Kept apart
    # from the merge kernels so the (costly to compile) threefry draw compiles once per shape.
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), model_index), name_hash)
    return jax.random.bernoulli(key, 1.0 - drop_rate, shape)


def _name_hash(name: str) -> np.uint32:
    return np.uint32(zlib.crc32(name.encode()))


def _dare_tv(x: jax.Array, base: jax.Array, keep: jax.Array, drop_rate: jax.Array) -> jax.Array:
    dt = _acc(base.dtype)
    return jnp.where(keep, (x.astype(dt) - base.astype(dt)) / (1.0 - drop_rate), 0.0)


_abs_dare_tv = jax.jit(lambda x, base, keep, p: jnp.abs(_dare_tv(x, base, keep, p)))


@jax.jit
def _dare_ta_leaf(
    base: jax.Array, xs: tuple[jax.Array, ...], keeps: tuple[jax.Array, ...], p: jax.Array, lam: jax.Array
) -> jax.Array:
    dt = _acc(base.dtype)
    tv = functools.reduce(jnp.add, [_dare_tv(x, base, k, p) for x, k in zip(xs, keeps)])
    return (base.astype(dt) + lam * tv).astype(base.dtype)


@jax.jit
def _dare_ties_leaf(
    base: jax.Array,
    xs: tuple[jax.Array, ...],
    keeps: tuple[jax.Array, ...],
    p: jax.Array,
    thresholds: jax.Array,
    lam: jax.Array,
) -> jax.Array:
    tvs = [_dare_tv(x, base, k, p) for x, k in zip(xs, keeps)]
    return _ties_combine(base, tvs, thresholds, lam)


# Per-model drop rates and lams: the kernels above when every model has the same values.
@jax.jit
def _dare_ta_pm_leaf(base: jax.Array, xs: tuple[jax.Array, ...], keeps: tuple[jax.Array, ...], ps: jax.Array,
                     lams: jax.Array) -> jax.Array:
    dt = _acc(base.dtype)
    tv = functools.reduce(jnp.add, [lams[j] * _dare_tv(x, base, k, ps[j]) for j, (x, k) in enumerate(zip(xs, keeps))])
    return (base.astype(dt) + tv).astype(base.dtype)


@jax.jit
def _dare_ties_pm_leaf(base: jax.Array, xs: tuple[jax.Array, ...], keeps: tuple[jax.Array, ...], ps: jax.Array,
                       thresholds: jax.Array, lams: jax.Array) -> jax.Array:
    tvs = [_dare_tv(x, base, k, ps[j]) for j, (x, k) in enumerate(zip(xs, keeps))]
    return _ties_combine(base, tvs, thresholds, jnp.float32(1.0), lams)


def dare_keep_mask(seed: int, model_index: int, name: str, shape: Sequence[int], drop_rate: float) -> np.ndarray:
    """The boolean keep-mask :func:`dare` draws for model ``model_index``'s leaf ``name``.

    Public so tests and plots can reproduce DARE's random draw exactly.
    """
    return np.asarray(
        _keep_mask(np.uint32(int(seed) % 2**32), np.uint32(model_index), _name_hash(name), jnp.float32(drop_rate), tuple(shape))
    )


def dare(
    bodies: Sequence[Body],
    base: Body,
    drop_rate: Coefficient = 0.9,
    seed: int = 0,
    combine: Literal["task_arithmetic", "ties"] = "task_arithmetic",
    lam: Coefficient = 1.0,
    density: Optional[Coefficient] = None,
    scope: Literal["global", "tensor"] = "global",
) -> dict[str, Any]:
    """DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models").

    Drop And REscale each task vector: ``tau_j' = m_j * (theta_j - theta_0) / (1 - p)`` with
    ``m_j ~ Bernoulli(1 - p)`` elementwise, drawn from ``jax.random`` with a key folded from
    ``seed``, the model's position j and the leaf's name (so the result depends on model order).
    Then ``combine="task_arithmetic"``: ``theta_0 + lam * sum_j tau_j'``, or ``combine="ties"``:
    TIES on the rescaled task vectors (sign election + disjoint mean) with trimming ``density``
    (default 1.0, i.e. no extra trimming: DARE already sparsified them).

    ``drop_rate``, ``lam`` and ``density`` may be lists per model, layer schedules or name
    filters (:mod:`fisher_jax.merging.coefficients`): ``p_jk`` and ``lam_jk`` per model j and
    leaf k, then ``theta_0 + sum_j lam_j tau_j'`` (task arithmetic) or ``lam_j`` scaling the
    trimmed vectors before the election (TIES, as in :func:`ties`).
    """
    names, flats, bflat = _flatten_with_base(bodies, base)
    n = len(flats)
    ps = resolve(drop_rate, names, n, "drop_rate", lambda x: 0.0 <= x < 1.0, "in [0, 1)")
    if combine not in ("task_arithmetic", "ties"):
        raise FisherJaxError(f"combine must be 'task_arithmetic' or 'ties', got {combine!r}")
    if combine == "task_arithmetic" and density is not None:
        raise FisherJaxError("density only applies to dare with combine='ties'")
    if scope not in ("global", "tensor"):
        raise FisherJaxError(f"scope must be 'global' or 'tensor', got {scope!r}")
    lams = _lams(lam, names, n)
    seed_ = np.uint32(int(seed) % 2**32)

    def keep(j: int, k: str) -> jax.Array:
        return _keep_mask(seed_, np.uint32(j), _name_hash(k), jnp.float32(ps[k][j]), tuple(np.shape(bflat[k])))

    def keeps(k: str) -> tuple[jax.Array, ...]:
        # Drawn on demand, leaf by leaf: only N masks of one leaf are alive at a time.
        return tuple(keep(j, k) for j in range(n))

    def scalar(k: str) -> bool:
        return uniform(ps[k]) and uniform(lams[k])

    if combine == "task_arithmetic":
        out = {}
        for k in names:
            xs = tuple(f[k] for f in flats)
            if scalar(k):
                out[k] = _dare_ta_leaf(bflat[k], xs, keeps(k), jnp.float32(ps[k][0]), jnp.float32(lams[k][0]))
            else:
                out[k] = _dare_ta_pm_leaf(bflat[k], xs, keeps(k), jnp.asarray(ps[k], jnp.float32),
                                          jnp.asarray(lams[k], jnp.float32))
        return unflatten(out)
    dens = _densities(1.0 if density is None else density, names, n, scope)

    def abs_tv(j: int, k: str) -> jax.Array:
        return _abs_dare_tv(flats[j][k], bflat[k], keep(j, k), jnp.float32(ps[k][j]))

    thr = _ties_thresholds(names, n, abs_tv, dens, scope)
    out = {}
    for k in names:
        xs, th = tuple(f[k] for f in flats), jnp.asarray([t[k] for t in thr], jnp.float32)
        if scalar(k):
            out[k] = _dare_ties_leaf(bflat[k], xs, keeps(k), jnp.float32(ps[k][0]), th, jnp.float32(lams[k][0]))
        else:
            out[k] = _dare_ties_pm_leaf(bflat[k], xs, keeps(k), jnp.asarray(ps[k], jnp.float32), th,
                                        jnp.asarray(lams[k], jnp.float32))
    return unflatten(out)


__all__ = [
    "DEFAULT_NORMALIZE",
    "NORMALIZATIONS",
    "Body",
    "dare",
    "dare_keep_mask",
    "fisher",
    "resolve_normalize",
    "scale_mix_warning",
    "simple",
    "task_arithmetic",
    "ties",
    "weighted_average",
]
