"""SLERP, Model Stock, Model Breadcrumbs, DELLA and per-model / per-layer coefficients.

Each method against a hand-written float64 numpy reference (explicit loops, no code shared with
the implementation), the property tests the other methods have, and every input error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fisher_jax.errors import FisherJaxError
from fisher_jax.merging import (
    METHODS,
    REGISTRY,
    breadcrumbs,
    dare,
    dare_keep_mask,
    della,
    fisher,
    della_keep_mask,
    merge,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
)
from fisher_jax.merging.coefficients import layer_positions, resolve
from fisher_jax.tree import flatten, unflatten
from test_merging import FakeModel, assert_trees_close, ref_ties_from_tvs, task_vectors

SEEDS = [0, 1]
# Few distinct leaf shapes keep jit compilation (most of these tests' time) short.
SHAPES = {
    "embeddings/LayerNorm/scale": (4,),
    "encoder/layer/0/attention/self/query/kernel": (4, 4),
    "encoder/layer/0/intermediate/dense/bias": (6,),
    "encoder/layer/1/intermediate/dense/kernel": (4, 6),
    "encoder/layer/1/output/dense/kernel": (6, 4),
    "pooler/dense/bias": (4,),
}


def make_bodies(seed: int, n: int) -> tuple[list[dict], dict]:
    """n fine-tuned bodies (base + small task vectors) and the base, BERT-named, float32."""
    rng = np.random.default_rng(seed)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    bodies = [unflatten({k: (v + 0.3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()})
              for _ in range(n)]
    return bodies, unflatten(base)


def make_models(seed: int, n: int) -> tuple[list[FakeModel], FakeModel]:
    bodies, base = make_bodies(seed, n)
    return [FakeModel({"body": b, "head": {}}) for b in bodies], FakeModel({"body": base, "head": {}})


# ------------------------------------------------------------------------------ numpy references
def ref_slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    v0, v1 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    u0 = v0 / np.linalg.norm(v0) if np.linalg.norm(v0) > 1e-8 else v0
    u1 = v1 / np.linalg.norm(v1) if np.linalg.norm(v1) > 1e-8 else v1
    dot = float(u0 @ u1)
    if abs(dot) > 0.9995:
        out = (1 - t) * v0 + t * v1
    else:
        th = math.acos(dot)
        out = math.sin((1 - t) * th) / math.sin(th) * v0 + math.sin(t * th) / math.sin(th) * v1
    return out.reshape(a.shape)


def ref_model_stock(bodies, base):
    flats, b = [flatten(x) for x in bodies], flatten(base)
    out, ts = {}, {}
    n = len(flats)
    for k in b:
        tvs = [f[k].astype(np.float64).ravel() - b[k].astype(np.float64).ravel() for f in flats]
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                c = tvs[i] @ tvs[j] / max(np.linalg.norm(tvs[i]) * np.linalg.norm(tvs[j]), 1e-6)
                cos.append(min(max(c, -1.0), 1.0))
        c = max(sum(cos) / len(cos), 0.0)
        t = n * c / (1 + (n - 1) * c)
        ts[k] = t
        out[k] = t * sum(f[k].astype(np.float64) for f in flats) / n + (1 - t) * b[k].astype(np.float64)
    return unflatten(out), ts


def ref_breadcrumbs_mask(tv: np.ndarray, density: float, gamma: float) -> np.ndarray:
    flat = np.abs(tv.astype(np.float64)).ravel().tolist()
    n = len(flat)
    if density >= 1:
        return np.ones(tv.shape, bool)
    order = sorted(range(n), key=lambda i: (flat[i], i))  # ascending magnitude, ties by position
    keep, top = int(density * n), int(gamma * n)
    top = min(top, n - keep)
    mask = np.zeros(n, bool)
    for r, i in enumerate(order):
        mask[i] = n - top - keep <= r < n - top
    return mask.reshape(tv.shape)


def ref_breadcrumbs(bodies, base, density, gamma, lam):
    b = flatten(base)
    tvs = task_vectors(bodies, base)
    return unflatten({k: b[k].astype(np.float64) + sum(lam * np.where(ref_breadcrumbs_mask(tv[k], density, gamma), tv[k], 0.0)
                                                       for tv in tvs) for k in b})


def ref_della_probs(tv: np.ndarray, name: str, density: float, eps: float) -> np.ndarray:
    a = np.abs(tv.astype(np.float64))
    if a.ndim == 1:
        a2, back = a[None, :], lambda x: x[0]
    elif name.endswith("/kernel"):
        a2, back = a.T, lambda x: x.T  # a PyTorch row = one output unit = a kernel column
    else:
        a2, back = a, lambda x: x
    p = np.zeros(a2.shape)
    for r in range(a2.shape[0]):
        row = a2[r].tolist()
        order = sorted(range(len(row)), key=lambda i: (row[i], i))
        for rank, i in enumerate(order):
            p[r, i] = density - eps + 2 * eps * (rank / (len(row) - 1) if len(row) > 1 else 0.5)
    return back(p)


def ref_disjoint(base, tvs):
    """TIES' elect + disjoint mean (no trimming: density 1, lam 1) of explicit per-model task vectors."""
    return ref_ties_from_tvs(tvs, base, 1.0, 1.0, "tensor")


# ---------------------------------------------------------------------------------------- SLERP
@pytest.mark.parametrize("seed", SEEDS)
def test_slerp_matches_numpy_and_its_endpoints(seed):
    bodies, _ = make_bodies(seed, 2)
    fa, fb = flatten(bodies[0]), flatten(bodies[1])
    for t in (0.0, 0.3, 1.0):
        out = flatten(slerp(bodies, t=t))
        for k in fa:
            np.testing.assert_allclose(out[k], ref_slerp(fa[k], fb[k], t), rtol=1e-4, atol=1e-5, err_msg=k)
    assert_trees_close(slerp(bodies, t=0.0), bodies[0], atol=1e-5)
    assert_trees_close(slerp(bodies, t=1.0), bodies[1], atol=1e-5)
    # swapping the models is t -> 1 - t
    assert_trees_close(slerp(bodies, t=0.3), slerp(bodies[::-1], t=0.7), rtol=1e-5, atol=1e-5)


def test_slerp_identical_and_parallel_tensors_interpolate_linearly():
    bodies, _ = make_bodies(3, 1)
    assert_trees_close(slerp([bodies[0], bodies[0]], t=0.4), bodies[0], rtol=1e-5, atol=1e-6)
    doubled = unflatten({k: 2 * v for k, v in flatten(bodies[0]).items()})  # cos = 1: the lerp branch
    assert_trees_close(slerp([bodies[0], doubled], t=0.25), unflatten({k: 1.25 * v for k, v in flatten(bodies[0]).items()}),
                       rtol=1e-6, atol=1e-6)


def test_slerp_layer_schedule_and_filters():
    bodies, _ = make_bodies(4, 2)
    fa, fb = flatten(bodies[0]), flatten(bodies[1])
    # L = 2 layers: layer 0 at position 0, layer 1 at 1; embeddings take the first anchor, the pooler the last.
    out = flatten(slerp(bodies, t={"layers": [0.0, 1.0]}))
    for k in fa:
        want = 0.0 if k.startswith(("embeddings", "encoder/layer/0/")) else 1.0  # L = 2 layers
        np.testing.assert_allclose(out[k], ref_slerp(fa[k], fb[k], want), rtol=1e-4, atol=1e-5, err_msg=k)
    out = flatten(slerp(bodies, t=[{"filter": "attention", "value": 0.2}, {"value": 0.9}]))
    for k in fa:
        np.testing.assert_allclose(out[k], ref_slerp(fa[k], fb[k], 0.2 if "attention" in k else 0.9), rtol=1e-4, atol=1e-5)


def test_slerp_errors():
    bodies, _ = make_bodies(5, 3)
    with pytest.raises(FisherJaxError, match="exactly two models, got 3"):
        slerp(bodies)
    with pytest.raises(FisherJaxError, match=r"t must be in \[0, 1\], got 1.5"):
        slerp(bodies[:2], t=1.5)
    with pytest.raises(FisherJaxError, match="not a list per model"):
        slerp(bodies[:2], t=[0.2, 0.8])
    with pytest.raises(FisherJaxError, match="no filter matches"):
        slerp(bodies[:2], t=[{"filter": "attention", "value": 0.2}])


# ---------------------------------------------------------------------------------- Model Stock
@pytest.mark.parametrize("seed,n", [(0, 2), (1, 3)])
def test_model_stock_matches_numpy(seed, n):
    bodies, base = make_bodies(seed, n)
    diag: dict = {}
    out = model_stock(bodies, base, diagnostics=diag)
    expected, ts = ref_model_stock(bodies, base)
    assert_trees_close(out, expected, rtol=1e-4, atol=1e-5)
    for k, t in ts.items():
        assert diag["model_stock"][k] == pytest.approx(t, rel=1e-4, abs=1e-6)
    assert any(0.0 < t < 1.0 for t in ts.values())  # a real interpolation, not one of the ends


def test_model_stock_properties():
    bodies, base = make_bodies(2, 3)
    assert_trees_close(model_stock([bodies[0]] * 3, base), bodies[0], rtol=1e-5, atol=1e-5)  # cos = 1: t = 1
    assert_trees_close(model_stock([base, base], base), base, atol=0)  # no task vectors: the base
    assert_trees_close(model_stock(bodies, base), model_stock([bodies[2], bodies[0], bodies[1]], base), rtol=1e-5, atol=1e-6)
    # opposite task vectors: cos = -1 is clipped to 0, so the merge is the base
    b = flatten(base)
    plus = unflatten({k: v + 0.1 for k, v in b.items()})
    minus = unflatten({k: v - 0.1 for k, v in b.items()})
    assert_trees_close(model_stock([plus, minus], base), base, atol=1e-6)
    with pytest.raises(FisherJaxError, match="at least two fine-tuned models"):
        model_stock(bodies[:1], base)


# ---------------------------------------------------------------------------- Model Breadcrumbs
@pytest.mark.parametrize("seed,density,gamma", [(0, 0.5, 0.1), (1, 0.8, 0.3), (2, 0.9, 0.0)])
def test_breadcrumbs_matches_numpy(seed, density, gamma):
    bodies, base = make_bodies(seed, 2)
    out = breadcrumbs(bodies, base, density=density, gamma=gamma, lam=0.6)
    assert_trees_close(out, ref_breadcrumbs(bodies, base, density, gamma, 0.6), rtol=1e-5, atol=1e-5)


def test_breadcrumbs_properties():
    bodies, base = make_bodies(3, 3)
    # nothing masked and lam = 1/N: copies of one model give it back
    assert_trees_close(breadcrumbs([bodies[0]] * 3, base, density=1.0, gamma=0.0, lam=1 / 3), bodies[0], atol=1e-5)
    assert_trees_close(breadcrumbs(bodies, base, density=0.5), breadcrumbs(bodies[::-1], base, density=0.5), atol=1e-6)
    # the largest-magnitude entry of a task vector is dropped when gamma > 0
    key = "encoder/layer/1/output/dense/kernel"
    tv = task_vectors(bodies[:1], base)[0][key]
    out = flatten(breadcrumbs([bodies[0], base], base, density=0.5, gamma=0.1))[key]
    i = np.unravel_index(np.argmax(np.abs(tv)), tv.shape)
    assert out[i] == pytest.approx(flatten(base)[key][i])
    with pytest.raises(FisherJaxError, match=r"density must be in \(0, 1\], got 0.0"):
        breadcrumbs(bodies, base, density=0.0)
    with pytest.raises(FisherJaxError, match=r"gamma must be in \[0, 1\), got 1.0"):
        breadcrumbs(bodies, base, gamma=1.0)


# ------------------------------------------------------------------------------------- DELLA
@pytest.mark.parametrize("seed", SEEDS)
def test_della_matches_numpy_given_its_masks(seed):
    bodies, base = make_bodies(seed, 2)
    density, eps, lam = 0.6, 0.2, [1.0, 0.5]
    out = della(bodies, base, density=density, epsilon=eps, lam=lam, seed=seed + 7)
    tvs = task_vectors(bodies, base)
    dropped = []
    for j, tv in enumerate(tvs):
        d = {}
        for k, v in tv.items():
            p = ref_della_probs(v, k, density, eps)
            keep = della_keep_mask(seed + 7, j, k, p)
            d[k] = lam[j] * np.where(keep, v / p, 0.0)
        dropped.append(d)
    assert_trees_close(out, ref_disjoint(base, dropped), rtol=1e-4, atol=1e-5)


def test_della_properties():
    bodies, base = make_bodies(4, 2)
    # keep probability 1 everywhere: TIES without trimming, so copies give the model back
    assert_trees_close(della([bodies[0]] * 2, base, density=1.0, epsilon=0.0), bodies[0], atol=1e-5)
    # the draw keeps about `density` of the entries, more of the large ones
    rng = np.random.default_rng(0)
    tv = rng.standard_normal((400, 50)).astype(np.float32)
    p = ref_della_probs(tv, "x/kernel", 0.5, 0.3)
    keep = della_keep_mask(0, 0, "x/kernel", p)
    assert abs(keep.mean() - 0.5) < 0.02
    big = np.abs(tv) > np.median(np.abs(tv), axis=0)
    assert keep[big].mean() > keep[~big].mean() + 0.1
    with pytest.raises(FisherJaxError, match=r"density \+/- epsilon must lie in \(0, 1\]"):
        della(bodies, base, density=0.9, epsilon=0.2)


# ------------------------------------------------------------------------- coefficients
def test_resolver_forms_and_positions():
    names = ["embeddings/LayerNorm/scale", "encoder/layer/0/output/dense/kernel", "encoder/layer/1/output/dense/kernel",
             "encoder/layer/2/attention/self/query/kernel", "pooler/dense/kernel"]
    assert layer_positions(names) == {names[0]: 0.0, names[1]: 0.0, names[2]: 0.5, names[3]: 1.0, names[4]: 1.0}
    got = resolve({"layers": [0.0, 1.0, 0.0]}, names, 2, "lam")  # anchors at 0, 0.5, 1
    assert [got[k][0] for k in names] == [0.0, 0.0, 1.0, 0.0, 0.0]
    got = resolve({"layers": [0.0, 1.0]}, names, 1, "lam")
    assert got[names[2]][0] == 0.5
    got = resolve([0.3, [{"filter": r"query", "value": 2.0}, {"value": {"layers": [1.0, 3.0]}}]], names, 2, "lam")
    assert [got[k].tolist() for k in names] == [[0.3, 1.0], [0.3, 1.0], [0.3, 2.0], [0.3, 2.0], [0.3, 3.0]]
    with pytest.raises(FisherJaxError, match="lam has 3 entries for 2 models"):
        resolve([1, 2, 3], names, 2, "lam")
    with pytest.raises(FisherJaxError, match="unknown key 'layer'.*did you mean 'layers'"):
        resolve({"layer": [1]}, names, 2, "lam")
    with pytest.raises(FisherJaxError, match=r"lam\[1\]: 'x' is not a number"):
        resolve([1, "x"], names, 2, "lam")
    with pytest.raises(FisherJaxError, match=r"filter: '\(' is not a regular expression"):
        resolve([{"filter": "(", "value": 1}], names, 2, "lam")


def ref_weighted_ta(bodies, base, lam_of):
    b = flatten(base)
    tvs = task_vectors(bodies, base)
    return unflatten({k: b[k].astype(np.float64) + sum(lam_of(j, k) * tv[k] for j, tv in enumerate(tvs)) for k in b})


def test_task_arithmetic_per_model_and_per_layer_lam():
    bodies, base = make_bodies(6, 2)
    out = task_arithmetic(bodies, base, lam=[0.7, 0.2])  # used to raise a raw TypeError
    assert_trees_close(out, ref_weighted_ta(bodies, base, lambda j, k: [0.7, 0.2][j]), atol=1e-5)
    out = task_arithmetic(bodies, base, lam={"layers": [0.2, 1.0]})

    def sched(j, k):
        return 1.0 if k.startswith(("encoder/layer/1/", "pooler")) else 0.2

    assert_trees_close(out, ref_weighted_ta(bodies, base, sched), atol=1e-5)
    # equal per-model values are the scalar merge, bit for bit
    assert_trees_close(task_arithmetic(bodies, base, lam=[0.5, 0.5]), task_arithmetic(bodies, base, lam=0.5), rtol=0, atol=0)


def test_ties_and_dare_per_model_coefficients():
    bodies, base = make_bodies(7, 2)
    assert_trees_close(ties(bodies, base, density=[0.3, 0.3], lam=[0.8, 0.8]), ties(bodies, base, density=0.3, lam=0.8),
                       rtol=0, atol=0)
    # per-model lam scales the trimmed task vectors before the election
    from test_merging import ref_ties_from_tvs

    tvs = task_vectors(bodies, base)
    out = ties(bodies, base, density=1.0, lam=[1.0, 0.25])
    scaled = [{k: w * v for k, v in tv.items()} for w, tv in zip([1.0, 0.25], tvs)]
    assert_trees_close(out, ref_ties_from_tvs(scaled, base, 1.0, 1.0, "tensor"), rtol=1e-5, atol=1e-5)
    # per-layer density needs tensor scope
    ties(bodies, base, density={"layers": [0.2, 0.6]}, scope="tensor")
    with pytest.raises(FisherJaxError, match="scope='tensor'"):
        ties(bodies, base, density={"layers": [0.2, 0.6]})
    # DARE with a drop rate per model, checked against its own masks
    out = dare(bodies, base, drop_rate=[0.0, 0.5], lam=[1.0, 0.5], seed=3)
    b = flatten(base)
    want = {k: b[k] + sum(lam * np.where(dare_keep_mask(3, j, k, tv[k].shape, p), tv[k] / (1 - p), 0.0)
                          for j, (tv, p, lam) in enumerate(zip(tvs, [0.0, 0.5], [1.0, 0.5]))) for k in b}
    assert_trees_close(out, unflatten(want), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- through merge()
def test_merge_runs_the_new_methods_and_checks_their_statistics():
    models, base = make_models(8, 2)
    bodies = [m.params["body"] for m in models]
    for name, kw, direct in [("slerp", {"t": 0.3}, {"t": 0.3}),
                             ("model_stock", {"base": base}, {"base": base.params["body"]}),
                             ("breadcrumbs", {"base": base, "density": 0.5, "lam": [0.5, 0.4]},
                              {"base": base.params["body"], "density": 0.5, "lam": [0.5, 0.4]}),
                             ("della", {"base": base, "seed": 2}, {"base": base.params["body"], "seed": 2})]:
        report: dict = {}
        out = merge(name, models, report=report, **kw)[0].params["body"]
        assert_trees_close(out, METHODS[name](bodies, **direct), rtol=0, atol=0)
        assert report["method"] == name
        assert REGISTRY[name].summary
    for name in ("model_stock", "breadcrumbs", "della"):
        with pytest.raises(FisherJaxError, match=f"'{name}' needs base="):
            merge(name, models)
    with pytest.raises(FisherJaxError, match="takes no keyword 'tt'.*did you mean 't'"):
        merge("slerp", models, tt=0.5)
    with pytest.raises(FisherJaxError, match="did you mean 'della'"):
        merge("dela", models)
    assert REGISTRY["model_stock"].needs == ("base",) and REGISTRY["slerp"].needs == ()


def test_fisher_weights_per_model_and_per_layer():
    bodies, _ = make_bodies(9, 2)
    rng = np.random.default_rng(9)
    fishers = [unflatten({k: np.abs(rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}) for _ in range(2)]
    lam = [{"layers": [1.0, 0.0]}, 0.5]  # model 0 counts in the embeddings and layer 0 only
    out = flatten(fisher(bodies, fishers, lam=lam, floor=1e-6))
    fb, ff = [flatten(b) for b in bodies], [flatten(f) for f in fishers]
    for k in out:
        w0 = (1.0 if k.startswith(("embeddings", "encoder/layer/0/")) else 0.0) * (ff[0][k].astype(np.float64) + 1e-6)
        w1 = 0.5 * (ff[1][k].astype(np.float64) + 1e-6)
        np.testing.assert_allclose(out[k], (w0 * fb[0][k] + w1 * fb[1][k]) / (w0 + w1), rtol=1e-5, atol=1e-6, err_msg=k)
    with pytest.raises(FisherJaxError, match="lam is 0 for every model at 'encoder/layer/1/"):
        fisher(bodies, fishers, lam=[{"layers": [1.0, 0.0]}, {"layers": [1.0, 0.0]}])
