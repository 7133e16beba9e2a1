"""Merging: properties of every method, hand-written numpy references, the Fisher-node mapping and
every user-facing error of ``merge``.

Bodies are tiny random trees with BERT names (L=2 layers, H=2 heads of size 2, FFN 6). The
numpy references below use explicit loops and BERT name matching on purpose: they must not share
code (or the role table in ``models/layout.py``) with the implementation they check.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fisher_jax.errors import FisherJaxError
from fisher_jax.merging import (
    METHODS,
    MaskFisher,
    dare,
    dare_keep_mask,
    fisher,
    fisher_nodes,
    merge,
    node_weights,
    regmean,
    simple,
    task_arithmetic,
    ties,
    weighted_average,
)
from fisher_jax.tree import flatten, unflatten

L, H, DH, I, V, P = 2, 2, 2, 6, 7, 5
D = H * DH
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)
seeds = st.integers(0, 2**31 - 1)
counts = st.sampled_from([2, 3])


# ------------------------------------------------------------------------------------- helpers


def make_body(rng: np.random.Generator, scale: float = 1.0) -> dict[str, Any]:
    """A random BERT-named body tree (numpy float32)."""
    def r(*shape):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    flat = {
        "embeddings/word_embeddings/embedding": r(V, D),
        "embeddings/position_embeddings/embedding": r(P, D),
        "embeddings/token_type_embeddings/embedding": r(2, D),
        "embeddings/LayerNorm/scale": r(D),
        "embeddings/LayerNorm/bias": r(D),
    }
    for l in range(L):
        p = f"encoder/layer/{l}"
        for m in ("attention/self/query", "attention/self/key", "attention/self/value", "attention/output/dense"):
            flat[f"{p}/{m}/kernel"], flat[f"{p}/{m}/bias"] = r(D, D), r(D)
        flat[f"{p}/attention/output/LayerNorm/scale"], flat[f"{p}/attention/output/LayerNorm/bias"] = r(D), r(D)
        flat[f"{p}/intermediate/dense/kernel"], flat[f"{p}/intermediate/dense/bias"] = r(D, I), r(I)
        flat[f"{p}/output/dense/kernel"], flat[f"{p}/output/dense/bias"] = r(I, D), r(D)
        flat[f"{p}/output/LayerNorm/scale"], flat[f"{p}/output/LayerNorm/bias"] = r(D), r(D)
    flat["pooler/dense/kernel"], flat["pooler/dense/bias"] = r(D, D), r(D)
    return unflatten(flat)


def make_bodies(seed: int, n: int) -> tuple[list[dict], dict]:
    """n fine-tuned bodies and their common base (fine-tunes = base + small task vectors)."""
    rng = np.random.default_rng(seed)
    base = make_body(rng)
    bodies = []
    for _ in range(n):
        delta = make_body_flat(rng, 0.3)
        bodies.append(unflatten({k: (v + delta[k]).astype(np.float32) for k, v in flatten(base).items()}))
    return bodies, base


def make_body_flat(rng: np.random.Generator, scale: float) -> dict[str, Any]:
    return flatten(make_body(rng, scale))


def make_fishers(seed: int, n: int, zeros: bool = True) -> list[dict]:
    """Full (body-shaped) Fishers, some entries exactly 0."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for _ in range(n):
        f = {k: np.abs(v) for k, v in make_body_flat(rng, 1.0).items()}
        if zeros:
            f = {k: np.where(rng.random(v.shape) < 0.2, 0.0, v).astype(np.float32) for k, v in f.items()}
        out.append(unflatten(f))
    return out


def mask_fisher(head, neuron) -> MaskFisher:
    return MaskFisher(head=np.asarray(head), neuron=np.asarray(neuron), num_examples=1, meta={})


def make_mask_fishers(seed: int, n: int, zeros: bool = True) -> list[MaskFisher]:
    rng = np.random.default_rng(seed + 2)
    out = []
    for _ in range(n):
        head, neuron = rng.random((L, H)), rng.random((L, I))
        if zeros:
            head[rng.random((L, H)) < 0.3] = 0.0
            neuron[rng.random((L, I)) < 0.3] = 0.0
        out.append(mask_fisher(head, neuron))
    return out


def dense_modules() -> list[tuple[str, int]]:
    """(module path, fan-in) of every Dense layer in make_body's trees."""
    mods = []
    for l in range(L):
        p = f"encoder/layer/{l}"
        mods += [(f"{p}/attention/self/{m}", D) for m in ("query", "key", "value")]
        mods += [(f"{p}/attention/output/dense", D), (f"{p}/intermediate/dense", D), (f"{p}/output/dense", I)]
    return mods + [("pooler/dense", D)]


def make_grams(seed: int, n: int) -> list[dict]:
    """Well-conditioned random Grams; query/key/value of a layer share one array (as gram_stats does)."""
    rng = np.random.default_rng(seed + 3)
    out = []
    for _ in range(n):
        grams: dict[str, np.ndarray] = {}
        for mod, fan_in in dense_modules():
            key = mod.rsplit("/", 1)[0] + "/query" if mod.endswith(("/key", "/value")) else mod
            if key in grams:
                grams[mod] = grams[key]
                continue
            x = rng.standard_normal((3 * fan_in, fan_in)) * rng.uniform(0.5, 2.0, fan_in)
            grams[mod] = (x.T @ x / x.shape[0] + 0.05 * np.eye(fan_in)).astype(np.float32)
        out.append(grams)
    return out


def assert_trees_close(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    fa, fb = flatten(a), flatten(b)
    assert list(fa) == list(fb)
    for k in fa:
        np.testing.assert_allclose(np.asarray(fa[k], np.float64), np.asarray(fb[k], np.float64), rtol=rtol, atol=atol, err_msg=k)


def copy_tree(t: dict) -> dict:
    return unflatten({k: np.array(v, copy=True) for k, v in flatten(t).items()})


# ------------------------------------------------------------------------------ numpy references


def ref_simple(bodies):
    flats = [flatten(b) for b in bodies]
    out = {}
    for k in flats[0]:
        acc = np.zeros(flats[0][k].shape)
        for f in flats:
            acc = acc + f[k].astype(np.float64)
        out[k] = acc / len(flats)
    return unflatten(out)


def ref_task_arithmetic(bodies, base, lam):
    flats, b = [flatten(x) for x in bodies], flatten(base)
    out = {}
    for k in b:
        tv = np.zeros(b[k].shape)
        for f in flats:
            tv += f[k].astype(np.float64) - b[k].astype(np.float64)
        out[k] = b[k] + lam * tv
    return unflatten(out)


def ref_ties_from_tvs(tvs, base, density, lam, scope):
    """TIES on explicit task vectors (list of flat dicts), entry by entry."""
    b = flatten(base)
    names = list(b)
    trimmed = []
    for tv in tvs:
        if scope == "global":
            mags = sorted(itertools.chain.from_iterable(np.abs(tv[k]).ravel().tolist() for k in names), reverse=True)
            thr = {k: mags[max(1, math.ceil(density * len(mags))) - 1] for k in names}
        else:
            thr = {}
            for k in names:
                mags = sorted(np.abs(tv[k]).ravel().tolist(), reverse=True)
                thr[k] = mags[max(1, math.ceil(density * len(mags))) - 1]
        trimmed.append({k: np.where(np.abs(tv[k]) >= thr[k], tv[k], 0.0) for k in names})
    out = {}
    for k in names:
        merged = np.zeros(b[k].shape)
        for idx in np.ndindex(b[k].shape):
            vals = [float(t[k][idx]) for t in trimmed]
            elected = np.sign(sum(vals))
            agree = [v for v in vals if v != 0 and np.sign(v) == elected]
            merged[idx] = sum(agree) / len(agree) if agree else 0.0
        out[k] = b[k].astype(np.float64) + lam * merged
    return unflatten(out)


def task_vectors(bodies, base):
    b = flatten(base)
    return [{k: (f[k].astype(np.float32) - b[k]).astype(np.float32) for k in b} for f in map(flatten, bodies)]


def ref_weighted(bodies, weights):
    """sum_j w_j x_j / sum_j w_j with full-shape weights."""
    flats = [flatten(b) for b in bodies]
    out = {}
    for k in flats[0]:
        num = sum(w[k] * f[k].astype(np.float64) for w, f in zip(weights, flats))
        den = sum(w[k] for w in weights)
        out[k] = num / den
    return unflatten(out)


def ref_fisher(bodies, fishers, lam=None, floor=1e-6, normalize=False):
    n = len(bodies)
    lam = [1.0 / n] * n if lam is None else lam
    weights = []
    for j, f in enumerate(fishers):
        ff = {k: v.astype(np.float64) for k, v in flatten(f).items()}
        norm = math.sqrt(sum(float(np.sum(v * v)) for v in ff.values())) if normalize else 1.0
        weights.append({k: lam[j] * (v / norm + floor) for k, v in ff.items()})
    return ref_weighted(bodies, weights)


def ref_node_weight(name: str, shape: tuple, head: np.ndarray, neuron: np.ndarray, mapping: str) -> np.ndarray:
    """Fisher-node weight of every entry of one BERT-named parameter, entry by entry (SPEC §3)."""
    universal = np.mean([head[l].mean() + neuron[l].mean() for l in range(head.shape[0])])
    w = np.zeros(shape)
    if not name.startswith("encoder/"):
        w[...] = universal
        return w
    l = int(name.split("/")[2])
    is_kernel = name.endswith("/kernel")
    for idx in np.ndindex(shape):
        col = idx[-1]  # output index (kernel column or bias entry)
        row = idx[0] if is_kernel else None  # input index of a kernel
        if "/attention/self/query/" in name or "/attention/self/key/" in name:
            w[idx] = head[l, col // DH]
        elif "/attention/self/value/" in name:
            w[idx] = head[l, col // DH] if mapping == "node" else head[l].mean()
        elif "/attention/output/dense/kernel" in name and mapping == "node":
            w[idx] = head[l, row // DH]
        elif "/attention/output/" in name:  # dense (reference) / dense bias / LayerNorm
            w[idx] = head[l].mean()
        elif "/intermediate/dense/" in name:
            w[idx] = neuron[l, col]
        elif "/output/dense/kernel" in name and mapping == "node":
            w[idx] = neuron[l, row]
        elif "/output/" in name:  # FFN output dense (reference) / its bias / LayerNorm
            w[idx] = neuron[l].mean()
        else:
            raise AssertionError(name)
    return w


def ref_fisher_nodes(bodies, mask_fishers, mapping):
    heads = [np.array(m.head, np.float64) for m in mask_fishers]
    neurons = [np.array(m.neuron, np.float64) for m in mask_fishers]
    for arrs in (heads, neurons):
        for idx in np.ndindex(arrs[0].shape):
            if all(a[idx] == 0 for a in arrs):
                for a in arrs:
                    a[idx] = 1.0
    flat0 = flatten(bodies[0])
    weights = [{k: ref_node_weight(k, v.shape, h, n, mapping) for k, v in flat0.items()} for h, n in zip(heads, neurons)]
    return ref_weighted(bodies, weights)


def ref_regmean(bodies, grams, alpha):
    flats = [flatten(b) for b in bodies]
    out = {}
    for k in flats[0]:
        mod = k.rsplit("/", 1)[0]
        if k.endswith("/kernel") and all(mod in g for g in grams):
            lhs = np.zeros((flats[0][k].shape[0],) * 2)
            rhs = np.zeros(flats[0][k].shape)
            for f, g in zip(flats, grams):
                gm = np.array(g[mod], np.float64)
                shrunk = alpha * gm + (1 - alpha) * np.diag(np.diag(gm))
                lhs += shrunk
                rhs += shrunk @ f[k].astype(np.float64)
            out[k] = np.linalg.solve(lhs, rhs)
        else:
            out[k] = sum(f[k].astype(np.float64) for f in flats) / len(flats)
    return unflatten(out)


# --------------------------------------------------------------------------- method registry

# Each entry: method -> callable(bodies, base, stats_seed) with the settings used by the
# generic property tests. Statistics are indexed per model so they can be permuted with it.


def run_method(name: str, bodies, base, fishers=None, mfs=None, grams=None, **kw):
    if name == "simple":
        return simple(bodies)
    if name == "task_arithmetic":
        return task_arithmetic(bodies, base, **kw)
    if name == "ties":
        return ties(bodies, base, **kw)
    if name == "dare":
        return dare(bodies, base, **kw)
    if name == "fisher":
        return fisher(bodies, fishers, **kw)
    if name.startswith("fisher_nodes"):
        return fisher_nodes(bodies, mfs, mapping=name.split(":")[1], **kw)
    if name == "regmean":
        return regmean(bodies, grams, **kw)
    raise AssertionError(name)


ALL = ["simple", "task_arithmetic", "ties", "dare", "fisher", "fisher_nodes:reference", "fisher_nodes:node", "regmean"]


def test_registry_lists_every_method():
    assert set(METHODS) >= {"simple", "task_arithmetic", "ties", "dare", "fisher", "fisher_nodes", "regmean", "slerp",
                            "model_stock", "breadcrumbs", "della"}
    from fisher_jax.merging import REGISTRY

    assert all(REGISTRY[name].fn is fn for name, fn in METHODS.items())


# ----------------------------------------------------------------------------- property tests


@pytest.mark.parametrize("name", ALL)
@SETTINGS
@given(seed=seeds, n=counts)
def test_copies_of_one_model_merge_to_it(name, seed, n):
    bodies, base = make_bodies(seed, 1)
    copies = [bodies[0]] * n
    # The additive methods sum task vectors: with lam = 1/N (or TIES' disjoint *mean* at full
    # density, or DARE with nothing dropped) N copies give the model back.
    kw = {
        "task_arithmetic": {"lam": 1.0 / n},
        "ties": {"density": 1.0, "lam": 1.0},
        "dare": {"drop_rate": 0.0, "lam": 1.0 / n},
    }.get(name, {})
    out = run_method(
        name, copies, base, fishers=make_fishers(seed, 1) * n, mfs=make_mask_fishers(seed, 1) * n,
        grams=make_grams(seed, 1) * n, **kw,
    )
    assert_trees_close(out, bodies[0], rtol=1e-5, atol=1e-5)


@SETTINGS
@given(seed=seeds, n=counts)
def test_ties_copies_keep_the_trimmed_task_vector(seed, n):
    bodies, base = make_bodies(seed, 1)
    out = ties([bodies[0]] * n, base, density=0.3)
    expected = ref_ties_from_tvs(task_vectors(bodies, base), base, 0.3, 1.0, "global")
    assert_trees_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [m for m in ALL if m != "dare"])
@SETTINGS
@given(seed=seeds, n=counts, data=st.data())
def test_model_order_does_not_matter(name, seed, n, data):
    # DARE is left out on purpose: its drop mask is drawn from a key folded with the model's
    # *position*, so permuting the models changes which mask each task vector gets.
    bodies, base = make_bodies(seed, n)
    fishers, mfs, grams = make_fishers(seed, n), make_mask_fishers(seed, n), make_grams(seed, n)
    perm = data.draw(st.permutations(range(n)))
    kw = {"ties": {"density": 0.4}}.get(name, {})
    a = run_method(name, bodies, base, fishers=fishers, mfs=mfs, grams=grams, **kw)
    b = run_method(
        name, [bodies[i] for i in perm], base, fishers=[fishers[i] for i in perm], mfs=[mfs[i] for i in perm],
        grams=[grams[i] for i in perm], **kw,
    )
    assert_trees_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["simple", "fisher", "fisher_nodes:reference", "fisher_nodes:node"])
@SETTINGS
@given(seed=seeds, n=counts)
def test_weighted_averages_lie_between_the_models(name, seed, n):
    bodies, base = make_bodies(seed, n)
    out = flatten(run_method(name, bodies, base, fishers=make_fishers(seed, n), mfs=make_mask_fishers(seed, n)))
    flats = [flatten(b) for b in bodies]
    for k, v in out.items():
        stack = np.stack([f[k] for f in flats])
        v = np.asarray(v)
        assert np.all(v >= stack.min(0) - 1e-5) and np.all(v <= stack.max(0) + 1e-5), k


@SETTINGS
@given(seed=seeds, n=counts)
def test_fisher_with_equal_fishers_is_simple(seed, n):
    bodies, _ = make_bodies(seed, n)
    f = make_fishers(seed, 1)[0]
    assert_trees_close(fisher(bodies, [f] * n), simple(bodies), rtol=1e-5, atol=1e-6)
    assert_trees_close(fisher(bodies, [f] * n, normalize=True), simple(bodies), rtol=1e-5, atol=1e-6)


@SETTINGS
@given(seed=seeds, n=counts)
def test_regmean_with_identical_grams_is_simple(seed, n):
    bodies, _ = make_bodies(seed, n)
    g = make_grams(seed, 1)[0]
    assert_trees_close(regmean(bodies, [g] * n), simple(bodies), rtol=1e-4, atol=1e-5)


@SETTINGS
@given(seed=seeds, n=counts)
def test_regmean_differs_from_simple_when_grams_differ(seed, n):
    # The released RegMean driver silently fell back to simple averaging; this is the guard.
    bodies, _ = make_bodies(seed, n)
    out, avg = flatten(regmean(bodies, make_grams(seed, n))), flatten(simple(bodies))
    for mod, _ in dense_modules():
        assert np.max(np.abs(np.asarray(out[f"{mod}/kernel"]) - np.asarray(avg[f"{mod}/kernel"]))) > 1e-3, mod
        np.testing.assert_allclose(out[f"{mod}/bias"], avg[f"{mod}/bias"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["embeddings/LayerNorm/scale"], avg["embeddings/LayerNorm/scale"], rtol=1e-6)


# ------------------------------------------------------------------------ numpy references


@SETTINGS
@given(seed=seeds, n=counts, lam=st.floats(0.1, 1.5))
def test_simple_and_task_arithmetic_match_numpy(seed, n, lam):
    bodies, base = make_bodies(seed, n)
    assert_trees_close(simple(bodies), ref_simple(bodies))
    assert_trees_close(task_arithmetic(bodies, base, lam=lam), ref_task_arithmetic(bodies, base, lam), atol=1e-5)


@pytest.mark.parametrize("scope", ["global", "tensor"])
@SETTINGS
@given(seed=seeds, n=counts, density=st.sampled_from([0.1, 0.2, 0.5, 1.0]), lam=st.floats(0.2, 1.5))
def test_ties_matches_numpy(scope, seed, n, density, lam):
    bodies, base = make_bodies(seed, n)
    out = ties(bodies, base, density=density, lam=lam, scope=scope)
    assert_trees_close(out, ref_ties_from_tvs(task_vectors(bodies, base), base, density, lam, scope), atol=1e-5)


@pytest.mark.parametrize("combine", ["task_arithmetic", "ties"])
@SETTINGS
@given(seed=seeds, n=counts, p=st.sampled_from([0.0, 0.3, 0.9]))
def test_dare_matches_numpy_given_its_masks(combine, seed, n, p):
    bodies, base = make_bodies(seed, n)
    out = dare(bodies, base, drop_rate=p, seed=seed % 1000, combine=combine, lam=0.7)
    tvs = task_vectors(bodies, base)
    dared = [
        {k: np.where(dare_keep_mask(seed % 1000, j, k, v.shape, p), v / (1 - p), 0.0) for k, v in tv.items()}
        for j, tv in enumerate(tvs)
    ]
    if combine == "task_arithmetic":
        b = flatten(base)
        expected = unflatten({k: b[k] + 0.7 * sum(d[k] for d in dared) for k in b})
    else:
        expected = ref_ties_from_tvs(dared, base, 1.0, 0.7, "global")
    assert_trees_close(out, expected, rtol=1e-5, atol=1e-5)


def test_dare_drops_at_the_requested_rate_per_model_and_tensor():
    shape = (200, 100)
    m00 = dare_keep_mask(0, 0, "encoder/layer/0/attention/self/query/kernel", shape, 0.9)
    m10 = dare_keep_mask(0, 1, "encoder/layer/0/attention/self/query/kernel", shape, 0.9)
    m01 = dare_keep_mask(0, 0, "encoder/layer/0/attention/self/key/kernel", shape, 0.9)
    assert abs(m00.mean() - 0.1) < 0.01
    assert (m00 != m10).any() and (m00 != m01).any()  # a different draw per model and per tensor
    assert (m00 == dare_keep_mask(0, 0, "encoder/layer/0/attention/self/query/kernel", shape, 0.9)).all()
    # survivors are rescaled by 1/(1-p): with the second model equal to the base, entry = base or base + tv/(1-p)
    bodies, base = make_bodies(3, 1)
    out = flatten(dare([bodies[0], base], base, drop_rate=0.5, seed=1))
    for k, b in flatten(base).items():
        tv = flatten(bodies[0])[k] - b
        v = np.asarray(out[k])
        ok = np.isclose(v, b, atol=1e-6) | np.isclose(v, b + 2 * tv, atol=1e-5)
        assert ok.all(), k


@SETTINGS
@given(seed=seeds, n=counts, floor=st.sampled_from([0.0, 1e-6, 0.1]), normalize=st.booleans(), data=st.data())
def test_fisher_matches_numpy(seed, n, floor, normalize, data):
    bodies, _ = make_bodies(seed, n)
    fishers = make_fishers(seed, n, zeros=floor > 0)
    lam = data.draw(st.none() | st.lists(st.floats(0.1, 2.0), min_size=n, max_size=n))
    out = fisher(bodies, fishers, lam=lam, floor=floor, normalize=normalize)
    assert_trees_close(out, ref_fisher(bodies, fishers, lam, floor, normalize), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mapping", ["reference", "node"])
@SETTINGS
@given(seed=seeds, n=counts)
def test_fisher_nodes_matches_numpy(mapping, seed, n):
    bodies, _ = make_bodies(seed, n)
    mfs = make_mask_fishers(seed, n)
    assert_trees_close(fisher_nodes(bodies, mfs, mapping=mapping), ref_fisher_nodes(bodies, mfs, mapping), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mapping", ["reference", "node"])
def test_node_weights_match_the_entrywise_reference(mapping):
    bodies, _ = make_bodies(0, 1)
    mf = make_mask_fishers(0, 1, zeros=False)[0]
    full = flatten(node_weights(bodies[0], mf, mapping=mapping, full=True))
    small = flatten(node_weights(bodies[0], mf, mapping=mapping))
    for k, v in flatten(bodies[0]).items():
        np.testing.assert_allclose(full[k], ref_node_weight(k, v.shape, mf.head, mf.neuron, mapping), rtol=1e-6, err_msg=k)
        assert full[k].shape == v.shape
        np.testing.assert_array_equal(np.broadcast_to(small[k], v.shape), full[k])


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
@SETTINGS
@given(seed=seeds, n=counts)
def test_regmean_matches_numpy(alpha, seed, n):
    bodies, _ = make_bodies(seed, n)
    grams = make_grams(seed, n)
    expected = ref_regmean(bodies, grams, alpha)
    assert_trees_close(regmean(bodies, grams, alpha=alpha), expected, rtol=1e-4, atol=1e-4)
    assert_trees_close(regmean(bodies, grams, alpha=alpha, dtype="float64"), expected, rtol=1e-5, atol=1e-6)


def test_regmean_shared_and_separate_gram_arrays_agree():
    bodies, _ = make_bodies(5, 2)
    grams = make_grams(5, 2)
    separate = [{k: np.array(v, copy=True) for k, v in g.items()} for g in grams]
    assert_trees_close(regmean(bodies, grams), regmean(bodies, separate), rtol=1e-5, atol=1e-6)
    with_prefix = [{f"body/{k}": v for k, v in g.items()} for g in grams]
    assert_trees_close(regmean(bodies, grams), regmean(bodies, with_prefix), rtol=0, atol=0)


def test_regmean_rank_deficient_grams_keep_the_mean_where_no_input_reaches():
    # Each model's Gram comes from fewer rows than the layer is wide (a pooler fed 128 examples of
    # a 384-wide CLS vector): the summed Gram is singular, so the objective leaves the directions
    # outside the inputs' span free. Those keep the simple mean; inside the span the normal
    # equations S W = R hold exactly as in the full-rank case.
    rng = np.random.default_rng(0)
    bodies, _ = make_bodies(5, 2)
    mod, fan_in = "pooler/dense", D
    xs = [rng.standard_normal((D // 4, fan_in)) for _ in bodies]  # rank D/4 each, D/2 together
    grams = [{mod: (x.T @ x / len(x)).astype(np.float32)} for x in xs]
    out = np.asarray(flatten(regmean(bodies, grams))[mod + "/kernel"], np.float64)
    ws = [flatten(b)[mod + "/kernel"].astype(np.float64) for b in bodies]
    s = sum(g[mod].astype(np.float64) for g in grams)
    r = sum(g[mod].astype(np.float64) @ w for g, w in zip(grams, ws))
    np.testing.assert_allclose(s @ out, r, rtol=0, atol=1e-4 * np.abs(r).max())
    span = np.linalg.qr(np.concatenate(xs).T)[0]  # [in, D/2]: where some model's inputs lie
    null = np.eye(fan_in) - span @ span.T
    np.testing.assert_allclose(null @ out, null @ (ws[0] + ws[1]) / 2, atol=1e-4)
    # all-zero Grams see nothing at all: the layer is the simple mean
    zero = [{mod: np.zeros((fan_in, fan_in), np.float32)} for _ in bodies]
    np.testing.assert_allclose(flatten(regmean(bodies, zero))[mod + "/kernel"], (ws[0] + ws[1]) / 2, atol=1e-6)


def test_regmean_without_grams_for_a_layer_takes_the_mean_there():
    bodies, _ = make_bodies(6, 2)
    grams = [{k: v for k, v in g.items() if k != "pooler/dense"} for g in make_grams(6, 2)]
    out, avg = flatten(regmean(bodies, grams)), flatten(simple(bodies))
    np.testing.assert_allclose(out["pooler/dense/kernel"], avg["pooler/dense/kernel"], rtol=1e-6)
    assert np.abs(np.asarray(out["encoder/layer/0/output/dense/kernel"]) - avg["encoder/layer/0/output/dense/kernel"]).max() > 1e-3


# ------------------------------------------------------------------ Fisher mask nodes mapping


def test_fisher_nodes_reference_weights_by_hand():
    body = make_bodies(0, 1)[0][0]
    head = np.array([[1.0, 3.0], [5.0, 7.0]])
    neuron = np.arange(1.0, 13.0).reshape(L, I)
    w = flatten(node_weights(body, mask_fisher(head, neuron), mapping="reference", full=True))
    q = w["encoder/layer/0/attention/self/query/kernel"]  # [in, out]: columns 2:4 belong to head 1
    assert (q[:, 2:4] == 3.0).all() and (q[:, 0:2] == 1.0).all()
    assert (w["encoder/layer/1/attention/self/key/bias"] == [5, 5, 7, 7]).all()
    assert (w["encoder/layer/0/attention/self/value/kernel"] == 2.0).all()  # mean over heads
    assert (w["encoder/layer/1/attention/output/dense/kernel"] == 6.0).all()
    assert (w["encoder/layer/1/attention/output/LayerNorm/scale"] == 6.0).all()
    ffn_in = w["encoder/layer/1/intermediate/dense/kernel"]  # column i = neuron i
    assert (ffn_in == neuron[1][None, :]).all() and (w["encoder/layer/1/intermediate/dense/bias"] == neuron[1]).all()
    assert (w["encoder/layer/0/output/dense/kernel"] == neuron[0].mean()).all()
    assert (w["encoder/layer/0/output/LayerNorm/bias"] == neuron[0].mean()).all()
    universal = np.mean([head[l].mean() + neuron[l].mean() for l in range(L)])  # (2+3.5 + 6+9.5)/2
    assert universal == 10.5
    assert (w["embeddings/word_embeddings/embedding"] == universal).all()
    assert (w["embeddings/LayerNorm/scale"] == universal).all()
    assert (w["pooler/dense/kernel"] == universal).all()


def test_fisher_nodes_node_mapping_by_hand():
    body = make_bodies(0, 1)[0][0]
    head = np.array([[1.0, 3.0], [5.0, 7.0]])
    neuron = np.arange(1.0, 13.0).reshape(L, I)
    w = flatten(node_weights(body, mask_fisher(head, neuron), mapping="node", full=True))
    v = w["encoder/layer/0/attention/self/value/kernel"]
    assert (v[:, 0:2] == 1.0).all() and (v[:, 2:4] == 3.0).all()
    ao = w["encoder/layer/1/attention/output/dense/kernel"]  # input rows 2:4 belong to head 1
    assert (ao[2:4, :] == 7.0).all() and (ao[0:2, :] == 5.0).all()
    assert (w["encoder/layer/1/attention/output/dense/bias"] == 6.0).all()
    fo = w["encoder/layer/1/output/dense/kernel"]  # input row i = neuron i
    assert (fo == neuron[1][:, None]).all()
    assert (w["encoder/layer/1/output/dense/bias"] == neuron[1].mean()).all()
    assert (w["encoder/layer/1/output/LayerNorm/scale"] == neuron[1].mean()).all()


def test_fisher_nodes_zero_patch_gives_equal_weights_without_mutating_inputs():
    bodies, _ = make_bodies(1, 2)
    head0 = np.array([[0.0, 2.0], [1.0, 1.0]])
    head1 = np.array([[0.0, 1.0], [3.0, 0.0]])  # head (0, 0) is zero in both -> 50/50
    neuron0 = np.ones((L, I))
    neuron1 = np.ones((L, I))
    neuron0[1, 4] = neuron1[1, 4] = 0.0  # neuron (1, 4) zero in both -> 50/50
    mfs = [mask_fisher(head0, neuron0), mask_fisher(head1, neuron1)]
    saved = [(m.head.copy(), m.neuron.copy()) for m in mfs]
    out = flatten(fisher_nodes(bodies, mfs))
    for m, (h, n) in zip(mfs, saved):
        np.testing.assert_array_equal(m.head, h)
        np.testing.assert_array_equal(m.neuron, n)
    f0, f1 = flatten(bodies[0]), flatten(bodies[1])
    q = "encoder/layer/0/attention/self/query/kernel"
    np.testing.assert_allclose(out[q][:, 0:2], (f0[q][:, 0:2] + f1[q][:, 0:2]) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[q][:, 2:4], (2 * f0[q][:, 2:4] + f1[q][:, 2:4]) / 3, rtol=1e-6)
    k = "encoder/layer/1/attention/self/key/kernel"  # head 1 of layer 1: only model 0 counts
    np.testing.assert_allclose(out[k][:, 2:4], f0[k][:, 2:4], rtol=1e-6)
    fi = "encoder/layer/1/intermediate/dense/bias"
    np.testing.assert_allclose(out[fi][4], (f0[fi][4] + f1[fi][4]) / 2, rtol=1e-6)
    # inputs (the bodies) are untouched too
    assert_trees_close(bodies[0], make_bodies(1, 2)[0][0], rtol=0, atol=0)


def test_fisher_nodes_options_lam_normalize_floor():
    bodies, _ = make_bodies(2, 2)
    mfs = make_mask_fishers(2, 2, zeros=False)
    scaled = [mask_fisher(mfs[0].head * 100, mfs[0].neuron * 100), mfs[1]]
    # normalisation removes the 100x scale difference
    assert_trees_close(fisher_nodes(bodies, scaled, normalize=True), fisher_nodes(bodies, mfs, normalize=True), rtol=1e-5)
    # lam multiplies each model's weights
    lam_out = fisher_nodes(bodies, mfs, lam=[2.0, 1.0])
    doubled = fisher_nodes(bodies, [mask_fisher(mfs[0].head * 2, mfs[0].neuron * 2), mfs[1]])
    assert_trees_close(lam_out, doubled, rtol=1e-5)
    # a huge floor makes every weight equal: the simple mean
    assert_trees_close(fisher_nodes(bodies, mfs, floor=1e9), simple(bodies), rtol=1e-4, atol=1e-5)


def test_fisher_nodes_understands_distilbert_names():
    rng = np.random.default_rng(0)
    flat = {"embeddings/word_embeddings/embedding": rng.standard_normal((V, D)).astype(np.float32)}
    for l in range(L):
        p = f"transformer/layer/{l}"
        for m in ("q_lin", "k_lin", "v_lin", "out_lin"):
            flat[f"{p}/attention/{m}/kernel"], flat[f"{p}/attention/{m}/bias"] = np.ones((D, D)), np.ones(D)
        flat[f"{p}/ffn/lin1/kernel"], flat[f"{p}/ffn/lin1/bias"] = np.ones((D, I)), np.ones(I)
        flat[f"{p}/ffn/lin2/kernel"], flat[f"{p}/ffn/lin2/bias"] = np.ones((I, D)), np.ones(D)
        for ln in ("sa_layer_norm", "output_layer_norm"):
            flat[f"{p}/{ln}/scale"], flat[f"{p}/{ln}/bias"] = np.ones(D), np.ones(D)
    head = np.array([[1.0, 3.0], [5.0, 7.0]])
    neuron = np.arange(1.0, 13.0).reshape(L, I)
    w = flatten(node_weights(unflatten(flat), mask_fisher(head, neuron), mapping="reference", full=True))
    assert (w["transformer/layer/0/attention/q_lin/kernel"][:, 2:] == 3.0).all()
    assert (w["transformer/layer/1/attention/out_lin/kernel"] == 6.0).all()
    assert (w["transformer/layer/1/sa_layer_norm/scale"] == 6.0).all()
    assert (w["transformer/layer/1/ffn/lin1/bias"] == neuron[1]).all()
    assert (w["transformer/layer/0/output_layer_norm/scale"] == neuron[0].mean()).all()


def test_weighted_average_broadcasts_and_falls_back_to_mean_on_zero_weights():
    bodies, _ = make_bodies(4, 2)
    zeros = unflatten({k: np.zeros(()) for k in flatten(bodies[0])})
    assert_trees_close(weighted_average(bodies, [zeros, zeros]), simple(bodies))
    ones = unflatten({k: np.ones(()) for k in flatten(bodies[0])})
    assert_trees_close(weighted_average(bodies, [ones, zeros]), bodies[0])


def test_pure_functions_do_not_mutate_inputs():
    bodies, base = make_bodies(8, 2)
    saved_b, saved_base = [copy_tree(b) for b in bodies], copy_tree(base)
    fishers, grams = make_fishers(8, 2), make_grams(8, 2)
    saved_f = [copy_tree(f) for f in fishers]
    for name in ALL:
        run_method(name, bodies, base, fishers=fishers, mfs=make_mask_fishers(8, 2), grams=grams)
    for a, b in zip(bodies + [base] + fishers, saved_b + [saved_base] + saved_f):
        assert_trees_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------- merge()


@dataclasses.dataclass(frozen=True)
class Arch:
    num_layers: int = L
    num_heads: int = H
    hidden_size: int = D
    intermediate_size: int = I


@dataclasses.dataclass(frozen=True, eq=False)
class FakeModel:
    """Stand-in for fisher_jax.Model: .params {"body", "head"}, .config, .arch, .replace()."""

    params: dict
    arch: Arch = Arch()
    config: Any = None

    def replace(self, **changes: Any) -> "FakeModel":
        return dataclasses.replace(self, **changes)


def make_models(seed: int, n: int) -> tuple[list[FakeModel], FakeModel]:
    bodies, base = make_bodies(seed, n)
    rng = np.random.default_rng(seed)
    models = [FakeModel({"body": b, "head": {"classifier": {"kernel": rng.standard_normal((D, 2))}}}) for b in bodies]
    return models, FakeModel({"body": base, "head": {}})


def test_merge_gives_each_model_the_merged_body_and_its_own_head():
    models, base = make_models(0, 3)
    out = merge("simple", models)
    assert len(out) == 3
    for m, o in zip(models, out):
        assert o.params["head"] is m.params["head"]
        assert_trees_close(o.params["body"], simple([x.params["body"] for x in models]))
    assert out[0].params["body"] is not out[1].params["body"]


@pytest.mark.parametrize("base_as", ["model", "params", "body"])
def test_merge_accepts_base_as_model_params_or_body(base_as):
    models, base = make_models(1, 2)
    b = {"model": base, "params": base.params, "body": base.params["body"]}[base_as]
    out = merge("task_arithmetic", models, base=b, lam=0.5)
    assert_trees_close(out[0].params["body"], task_arithmetic([m.params["body"] for m in models], base.params["body"], 0.5))


def test_merge_runs_every_method():
    models, base = make_models(2, 2)
    bodies = [m.params["body"] for m in models]
    stats = {
        "simple": {},
        "task_arithmetic": {"base": base},
        "ties": {"base": base, "density": 0.5},
        "dare": {"base": base, "drop_rate": 0.5, "seed": 3, "combine": "ties"},
        "fisher": {"fishers": [{"body": f} for f in make_fishers(2, 2)]},
        "fisher_nodes": {"fishers": make_mask_fishers(2, 2), "mapping": "node"},
        "regmean": {"grams": make_grams(2, 2), "alpha": 0.9},
    }
    for name, kw in stats.items():
        out = merge(name, models, **kw)[1].params["body"]
        direct_kw = dict(kw)
        if "base" in direct_kw:
            direct_kw["base"] = base.params["body"]
        if name == "fisher":
            direct_kw["fishers"] = [f["body"] for f in kw["fishers"]]
        if name == "fisher_nodes":
            direct_kw["mask_fishers"] = direct_kw.pop("fishers")
        assert_trees_close(out, METHODS[name](bodies, **direct_kw), rtol=1e-6, atol=1e-7)
    # fisher_nodes also takes mask_fishers= and method names with dashes
    merge("fisher-nodes", models, mask_fishers=make_mask_fishers(2, 2))


def _raises(match: str, *args, **kw):
    with pytest.raises(FisherJaxError, match=match) as info:
        merge(*args, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_merge_errors_models_and_method():
    models, base = make_models(3, 2)
    _raises("at least two models, got 1", "simple", models[:1])
    msg = _raises("unknown merge method 'fishr'", "fishr", models)
    assert "did you mean 'fisher'" in msg and "regmean" in msg
    _raises("takes no keyword 'lamb'.*did you mean 'lam'", "task_arithmetic", models, base=base, lamb=1.0)
    # a body with a different shape: the path is named
    bad = copy_tree(models[1].params["body"])
    bad["encoder"]["layer"]["1"]["intermediate"]["dense"]["kernel"] = np.zeros((D, I + 1), np.float32)
    _raises("encoder/layer/1/intermediate/dense/kernel.*shape", "simple", [models[0], FakeModel({"body": bad, "head": {}})])
    # a body with a missing leaf
    bad = copy_tree(models[1].params["body"])
    del bad["pooler"]
    _raises("pooler/dense/kernel", "simple", [models[0], FakeModel({"body": bad, "head": {}})])
    # NaN / inf: model index and path
    bad = copy_tree(models[1].params["body"])
    bad["encoder"]["layer"]["0"]["attention"]["self"]["key"]["bias"][1] = np.nan
    _raises(r"model 1 has NaN/inf values at 'encoder/layer/0/attention/self/key/bias'", "simple", [models[0], FakeModel({"body": bad, "head": {}})])
    badbase = copy_tree(base.params["body"])
    badbase["pooler"]["dense"]["bias"][0] = np.inf
    _raises("base has NaN/inf values at 'pooler/dense/bias'", "ties", models, base=badbase)
    _raises("not a Model", "simple", [m.params["body"] for m in models])


@pytest.mark.parametrize(
    "method,keyword", [("task_arithmetic", "base"), ("ties", "base"), ("dare", "base"), ("fisher", "fishers"),
                       ("fisher_nodes", "fishers"), ("regmean", "grams")]
)
def test_merge_errors_missing_statistics(method, keyword):
    models, _ = make_models(4, 2)
    _raises(f"'{method}' needs {keyword}=", method, models)


def test_merge_errors_statistics_for_another_model():
    models, base = make_models(5, 2)
    mfs = make_mask_fishers(5, 2)
    # mask Fisher with the wrong number of layers / heads / neurons
    for head, neuron in [(np.ones((L + 1, H)), np.ones((L + 1, I))), (np.ones((L, H + 1)), np.ones((L, I))),
                         (np.ones((L, H)), np.ones((L, I - 1)))]:
        _raises("fishers\\[1\\].*statistics for another model", "fisher_nodes", models, fishers=[mfs[0], mask_fisher(head, neuron)])
    # same through the pure function (no arch to compare with: checked against the body)
    with pytest.raises(FisherJaxError, match="mask_fishers\\[1\\].neuron has shape"):
        fisher_nodes([m.params["body"] for m in models], [mfs[0], mask_fisher(np.ones((L, H)), np.ones((L, I + 2)))])
    with pytest.raises(FisherJaxError, match="mask_fishers\\[0\\].head has shape"):
        fisher_nodes([m.params["body"] for m in models], [mask_fisher(np.ones((L + 1, H)), np.ones((L + 1, I)))] * 2)
    _raises("negative", "fisher_nodes", models, fishers=[mfs[0], mask_fisher(-np.ones((L, H)), np.ones((L, I)))])
    _raises("has 1 entries for 2 models", "fisher_nodes", models, fishers=mfs[:1])
    # the wrong kind of Fisher for the method
    fulls = make_fishers(5, 2)
    _raises("use method 'fisher_nodes'", "fisher", models, fishers=mfs)
    _raises("full Fisher trees go to method 'fisher'", "fisher_nodes", models, fishers=fulls)
    # full Fisher shaped for another model
    bad = copy_tree(fulls[1])
    bad["encoder"]["layer"]["0"]["output"]["dense"]["kernel"] = np.ones((I, D + 1), np.float32)
    _raises("fishers\\[1\\].*encoder/layer/0/output/dense/kernel", "fisher", models, fishers=[fulls[0], bad])
    bad = copy_tree(fulls[1])
    bad["pooler"]["dense"]["bias"][0] = np.nan
    _raises("fishers\\[1\\] has NaN/inf values at 'pooler/dense/bias'", "fisher", models, fishers=[fulls[0], bad])
    # Grams: wrong dims, unknown layer, present for one model only, none matching
    grams = make_grams(5, 2)
    wrong = dict(grams[1], **{"encoder/layer/0/output/dense": np.eye(D, dtype=np.float32)})
    _raises(r"grams\[1\]\['encoder/layer/0/output/dense'\] has shape \(4, 4\).*expected \(6, 6\)", "regmean", models, grams=[grams[0], wrong])
    unknown = dict(grams[1], **{"encoder/layer/0/output/dens": np.eye(I)})
    _raises("not a Dense layer.*did you mean 'encoder/layer/0/output/dense'", "regmean", models, grams=[grams[0], unknown])
    partial = {k: v for k, v in grams[1].items() if k != "pooler/dense"}
    _raises("grams\\[0\\] has a Gram for 'pooler/dense' but grams\\[1\\] does not", "regmean", models, grams=[grams[0], partial])
    _raises("no Gram matches", "regmean", models, grams=[{}, {}])
    _raises("grams= has 3 entries for 2 models", "regmean", models, grams=grams + grams[:1])


def test_merge_errors_bad_options():
    models, base = make_models(6, 2)
    _raises("density must be in", "ties", models, base=base, density=0.0)
    _raises("drop_rate must be in", "dare", models, base=base, drop_rate=1.0)
    _raises("combine must be", "dare", models, base=base, combine="mean")
    _raises("mapping must be", "fisher_nodes", models, fishers=make_mask_fishers(6, 2), mapping="nodes")
    _raises("alpha must be in", "regmean", models, grams=make_grams(6, 2), alpha=1.5)
    _raises("lam has 3 entries for 2 models", "fisher", models, fishers=make_fishers(6, 2), lam=[1, 1, 1])
    # one lam for every model (the CLI's scalar --lam) is the uniform weighting, not an error
    fs = make_fishers(6, 2)
    assert_trees_close(merge("fisher", models, fishers=fs, lam=0.7)[0].params["body"],
                       merge("fisher", models, fishers=fs)[0].params["body"], rtol=1e-6, atol=1e-7)
    badbase = copy_tree(base.params["body"])
    badbase["encoder"]["layer"]["0"]["attention"]["self"]["value"]["kernel"] = np.zeros((D, D + 2), np.float32)
    _raises("base bodies differ at 'encoder/layer/0/attention/self/value/kernel'", "ties", models, base=badbase)
    with pytest.raises(FisherJaxError, match="does not broadcast"):
        bodies = [m.params["body"] for m in models]
        w = unflatten({k: np.ones((3,)) for k in flatten(bodies[0])})
        weighted_average(bodies, [w, w])
    singular = [{k: np.zeros_like(v) for k, v in g.items()} for g in make_grams(6, 2)]
    _raises("singular", "regmean", models, grams=singular, dtype="float32")


def test_merge_with_real_tiny_models():
    transformers = pytest.importorskip("transformers")
    from fisher_jax.models import from_config

    # The same sizes as make_body, so the merge kernels compiled by the tests above are reused.
    cfg = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=I,
               max_position_embeddings=P, type_vocab_size=2, num_labels=2)
    first = from_config(transformers.BertConfig(**cfg), seed=0)
    rng = np.random.default_rng(0)

    def perturbed(scale):
        body = {k: (v + scale * rng.standard_normal(np.shape(v))).astype(np.float32) for k, v in flatten(first.params["body"]).items()}
        return unflatten(body)

    models = [first.replace(params={"body": perturbed(0.01), "head": first.params["head"]}) for _ in range(2)]
    base = first.params
    for method, kw in [("simple", {}), ("ties", {"base": base}), ("fisher_nodes", {"fishers": make_mask_fishers(0, 2)})]:
        out = merge(method, models, **kw)
        for m, o in zip(models, out):
            assert type(o) is type(m) and o.params["head"] is m.params["head"] and o.arch == m.arch
        assert_trees_close(flatten(out[1].params["body"]), flatten(METHODS[method](
            [m.params["body"] for m in models], **({"base": base["body"]} if method == "ties" else
                                                    {"mask_fishers": kw["fishers"]} if kw else {}))), rtol=0, atol=0)
    logits = out[1](np.ones((1, 4), np.int32))
    assert logits.shape == (1, 2) and bool(jnp.all(jnp.isfinite(logits)))
    with pytest.raises(FisherJaxError, match="statistics for another model"):
        merge("fisher_nodes", models, fishers=[mask_fisher(np.ones((L, H + 1)), np.ones((L, I)))] * 2)
