"""Fisher scales that mix (issue 19, item 4): normalisations, the relative floor, the scale-aware
zero patch, the mixed-loss warning and regression's Gaussian noise variance."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import tiny_hf_config
from fisher_jax.errors import FisherJaxError
from fisher_jax.merging import fisher, fisher_nodes, merge, normalized_node_fishers
from fisher_jax.models import from_config, ones_masks
from fisher_jax.stats import FullFisher, MaskFisher, full_fisher, mask_fisher
from fisher_jax.stats.io import loss_of
from fisher_jax.tree import flatten, unflatten

MODES = ("l2", "mean", "layer")


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pair():
    """Two tiny BERT classifiers with different random bodies (2 layers, 4 heads, FFN 37)."""
    return [from_config(tiny_hf_config("bert", 2), seed=s) for s in (0, 1)]


def rand_mask_fishers(arch, seed, scales=(1.0, 1.0), zero=True):
    rng = np.random.default_rng(seed)
    out = []
    for s in scales:
        h = rng.random((arch.num_layers, arch.num_heads)) * s
        n = rng.random((arch.num_layers, arch.intermediate_size)) * s
        if zero:
            h[0, 1] = 0.0  # zero in every model: the patch applies
            n[1, 3] = 0.0
        out.append(MaskFisher(h.astype(np.float32), n.astype(np.float32), 8, {}))
    return out


def rand_full_fishers(body, seed, scales=(1.0, 1.0)):
    rng = np.random.default_rng(seed)
    flat = flatten(body)
    out = []
    for s in scales:
        f = {k: (rng.random(np.shape(v)) * s).astype(np.float32) for k, v in flat.items()}
        f["pooler/dense/kernel"][0, :3] = 0.0  # zero in every model: only the floor weighs
        out.append(unflatten(f))
    return out


def flat64(tree):
    return {k: np.asarray(v, np.float64) for k, v in flatten(tree).items()}


def assert_trees_close(a, b, rtol=2e-5, atol=1e-6):
    fa, fb = flat64(a), flat64(b)
    assert set(fa) == set(fb)
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], rtol=rtol, atol=atol, err_msg=k)


def max_diff(a, b):
    fa, fb = flat64(a), flat64(b)
    return max(float(np.abs(fa[k] - fb[k]).max()) for k in fa)


# ---------------------------------------------------------------------------- numpy references
def ref_full_weights(fishers, mode, gamma, floor, lam):
    """w_j = lam_j (s_j F_j**gamma + f_j), entry by entry in float64 (fisher()'s docstring)."""
    out = []
    for j, f in enumerate(fishers):
        g = {k: np.power(v, gamma) for k, v in flat64(f).items()}
        allv = np.concatenate([v.ravel() for v in g.values()])
        w = {}
        for k, v in g.items():
            if mode == "none":
                s, fl = 1.0, floor
            elif mode == "legacy":
                s, fl = 1.0 / np.sqrt(np.sum(allv ** 2)), floor
            elif mode == "l2":
                s = 1.0 / np.sqrt(np.sum(allv ** 2))
                fl = floor * np.mean(allv) * s
            elif mode == "mean":
                s, fl = 1.0 / np.mean(allv), floor
            else:  # layer: per leaf
                s, fl = 1.0 / np.mean(v), floor
            w[k] = lam[j] * (s * v + fl)
        out.append(w)
    return out


def ref_average(bodies, weights):
    flats = [flat64(b) for b in bodies]
    return unflatten({k: sum(w[k] * f[k] for w, f in zip(weights, flats)) / sum(w[k] for w in weights)
                      for k in flats[0]})


def ref_nodes(mfs, mode, gamma, floor):
    """normalized_node_fishers() by hand: loops over models, layers and nodes."""
    heads, neurons = [], []
    for mf in mfs:
        h = np.asarray(mf.head, np.float64) ** gamma
        n = np.asarray(mf.neuron, np.float64) ** gamma
        if mode == "layer":
            for a in (h, n):
                for l in range(a.shape[0]):
                    m = a[l].mean()
                    if m > 0:
                        a[l] = a[l] / m + floor
        else:
            both = np.concatenate([h.ravel(), n.ravel()])
            s = {"none": 1.0, "legacy": 1 / np.linalg.norm(both), "l2": 1 / np.linalg.norm(both),
                 "mean": 1 / both.mean()}[mode]
            fl = floor * both.mean() * s if mode == "l2" else floor
            h, n = h * s + fl, n * s + fl
        heads.append(h)
        neurons.append(n)
    for arrs in (heads, neurons):
        zero = np.logical_and.reduce([a == 0 for a in arrs])
        for a in arrs:
            a[zero] = 1.0 if mode in ("none", "legacy") else a.mean()
    return heads, neurons


def api_mode(mode):
    return {"legacy": True, "none": False}.get(mode, mode)


# ------------------------------------------------------------------------- normalisations: fisher
@pytest.mark.parametrize("mode", ["none", "legacy", *MODES])
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_fisher_normalisations_match_numpy(pair, mode, gamma):
    bodies = [m.params["body"] for m in pair]
    fishers = rand_full_fishers(bodies[0], 3, scales=(1.0, 150.0))
    lam, floor = [0.3, 0.7], 1e-2
    got = fisher(bodies, fishers, lam=lam, floor=floor, normalize=api_mode(mode), gamma=gamma)
    want = ref_average(bodies, ref_full_weights(fishers, mode, gamma, floor, lam))
    assert_trees_close(got, want, rtol=1e-4, atol=1e-5)


def test_relative_floor_is_a_share_of_each_models_mean(pair):
    """Where both Fishers are 0 only the floor weighs: absolute, it is the same number for both
    models; relative ("l2"), each model's floor is its share of that model's normalised mean."""
    bodies = [m.params["body"] for m in pair]
    fishers = rand_full_fishers(bodies[0], 4, scales=(1.0, 1000.0))
    rng = np.random.default_rng(0)
    fl = flat64(fishers[1])
    fishers[1] = unflatten({k: v * rng.random(v.shape) ** 4 for k, v in fl.items()})  # another profile
    fishers[1]["pooler"]["dense"]["kernel"][0, :3] = 0.0
    x = [flat64(b)["pooler/dense/kernel"][0, :3] for b in bodies]
    means = []
    for f in fishers:
        allv = np.concatenate([v.ravel() for v in flat64(f).values()])
        means.append(allv.mean() / np.linalg.norm(allv))  # mean of F / ||F||
    want = (means[0] * x[0] + means[1] * x[1]) / (means[0] + means[1])
    got = flat64(fisher(bodies, fishers, floor=1e-3, normalize="l2"))["pooler/dense/kernel"][0, :3]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert not np.allclose(want, (x[0] + x[1]) / 2, rtol=1e-3)  # the two shares do differ
    absolute = flat64(fisher(bodies, fishers, floor=1e-3, normalize=True))["pooler/dense/kernel"][0, :3]
    np.testing.assert_allclose(absolute, (x[0] + x[1]) / 2, rtol=1e-5)


# --------------------------------------------------------------------- normalisations: mask nodes
@pytest.mark.parametrize("mode", ["none", "legacy", *MODES])
@pytest.mark.parametrize("gamma,floor", [(1.0, 0.0), (0.5, 1e-2)])
def test_node_normalisations_match_numpy(pair, mode, gamma, floor):
    mfs = rand_mask_fishers(pair[0].arch, 5, scales=(1.0, 40.0))
    heads, neurons = normalized_node_fishers(mfs, api_mode(mode), gamma, floor)
    rh, rn = ref_nodes(mfs, mode, gamma, floor)
    for a, b in zip(heads + neurons, rh + rn):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # the merge maps exactly those node weights to the parameters (mapping tested in test_merging)
    bodies = [m.params["body"] for m in pair]
    got = fisher_nodes(bodies, mfs, normalize=api_mode(mode), gamma=gamma, floor=floor, num_heads=4)
    plain = fisher_nodes(bodies, [MaskFisher(h, n, 1) for h, n in zip(rh, rn)], num_heads=4)
    assert_trees_close(got, plain, rtol=1e-5, atol=1e-6)


def test_zero_patch_is_scale_aware(pair):
    """A node that every model ignores gets each model's mean node weight (normalised modes) —
    the released 1.0 would dwarf a Fisher of scale 1e-4 and decide its layer's mean."""
    mfs = rand_mask_fishers(pair[0].arch, 6, scales=(1e-4, 1e-4))
    heads, _ = normalized_node_fishers(mfs, "mean")
    for mf, h in zip(mfs, heads):
        hh = np.asarray(mf.head, np.float64)
        both = np.concatenate([hh.ravel(), np.asarray(mf.neuron, np.float64).ravel()])
        scaled = hh / both.mean()
        np.testing.assert_allclose(h[0, 1], scaled.mean(), rtol=1e-6)  # the patch: mean of the head nodes
        assert h[0, 1] < 10 * np.delete(scaled.ravel(), 1).max()
    released, _ = normalized_node_fishers(mfs, False)
    assert all(h[0, 1] == 1.0 for h in released)  # unchanged without normalisation
    assert all(h[0, 1] > 1000 * np.delete(h.ravel(), 1).max() for h in released)


# ------------------------------------------------------------------------------ scale invariance
def test_normalised_merges_ignore_a_models_scale(pair):
    bodies = [m.params["body"] for m in pair]
    mfs = rand_mask_fishers(pair[0].arch, 7)
    big = [mfs[0], MaskFisher(mfs[1].head * 1000, mfs[1].neuron * 1000, 8, {})]
    for mode in MODES:
        a = fisher_nodes(bodies, mfs, normalize=mode, floor=1e-3, num_heads=4)
        b = fisher_nodes(bodies, big, normalize=mode, floor=1e-3, num_heads=4)
        assert_trees_close(a, b, rtol=1e-5, atol=1e-6)
    a, b = (fisher_nodes(bodies, f, num_heads=4) for f in (mfs, big))
    assert max_diff(a, b) > 1e-2  # the released merge follows the bigger Fisher
    fulls = rand_full_fishers(bodies[0], 8)
    scaled = [fulls[0], unflatten({k: v * 1000 for k, v in flatten(fulls[1]).items()})]
    for mode in MODES:
        assert_trees_close(fisher(bodies, fulls, normalize=mode), fisher(bodies, scaled, normalize=mode),
                           rtol=1e-5, atol=1e-6)
    assert max_diff(fisher(bodies, fulls), fisher(bodies, scaled)) > 1e-2


def test_bad_normalize_and_gamma():
    with pytest.raises(FisherJaxError, match="did you mean 'layer'"):
        normalized_node_fishers([MaskFisher(np.ones((1, 2)), np.ones((1, 3)), 1)] * 2, "layr")
    with pytest.raises(FisherJaxError, match="gamma must be finite"):
        normalized_node_fishers([MaskFisher(np.ones((1, 2)), np.ones((1, 3)), 1)] * 2, "mean", gamma=-1)


# ------------------------------------------------------------------------------ mixed-loss warning
def meta(loss=None, estimator="batch", **kw):
    m = {"kind": "mask_fisher", "estimator": estimator, **kw}
    if loss is not None:
        m["loss"] = loss
    return m


def test_loss_of_old_files_is_inferred():
    assert loss_of({"loss": "mse"}) == "mse"
    assert loss_of({"arch": {"num_labels": 1}}) == "mse"
    assert loss_of({"arch": {"num_labels": 2}}) == "cross_entropy"
    assert loss_of({"task": "stsb"}) == "mse"
    assert loss_of({"task": "SST-2"}) == "cross_entropy"
    assert loss_of({"task": "my_own_task"}) is None and loss_of({}) is None


def test_mixed_losses_warn_in_the_report(pair):
    a, b = rand_mask_fishers(pair[0].arch, 9, zero=False)
    ce = MaskFisher(a.head, a.neuron, 8, meta("cross_entropy"))
    old_mse = MaskFisher(b.head, b.neuron, 8, meta(task="stsb"))  # a file from before `loss` was recorded
    report: dict = {}
    with pytest.warns(UserWarning, match="different losses"):
        merge("fisher_nodes", pair, fishers=[ce, old_mse], report=report)
    (msg,) = report["warnings"]
    assert "cross_entropy for model 0" in msg and "mse for model 1" in msg and "normalize=" in msg
    for kw, fishers in (({"normalize": "mean"}, [ce, old_mse]), ({"normalize": True}, [ce, old_mse]),
                        ({}, [ce, MaskFisher(b.head, b.neuron, 8, meta("cross_entropy"))])):
        quiet: dict = {}
        merge("fisher_nodes", pair, fishers=fishers, report=quiet, **kw)
        assert quiet["warnings"] == []
    report = {}
    emp = MaskFisher(b.head, b.neuron, 8, meta("cross_entropy", estimator="empirical"))
    with pytest.warns(UserWarning, match="different estimators"):
        merge("fisher_nodes", pair, fishers=[ce, emp], report=report)
    assert "batch for model 0" in report["warnings"][0] and "empirical for model 1" in report["warnings"][0]


def test_mixed_losses_warn_for_full_fishers(pair):
    body = pair[0].params["body"]
    f0, f1 = rand_full_fishers(body, 10)
    fishers = [FullFisher(f0, 8, meta("cross_entropy", "expected")), FullFisher(f1, 8, meta("mse", "expected"))]
    report: dict = {}
    with pytest.warns(UserWarning, match="different losses"):
        merge("fisher", pair, fishers=fishers, report=report)
    assert len(report["warnings"]) == 1
    quiet: dict = {}
    merge("fisher", pair, fishers=fishers, normalize="layer", report=quiet)
    assert quiet["warnings"] == []


# ---------------------------------------------------------------------- regression noise variance
@pytest.fixture(scope="module")
def reg():
    model = from_config(tiny_hf_config("bert", 1), seed=2)
    rs = np.random.RandomState(0)
    batches = []
    for _ in range(2):
        ids = rs.randint(3, 99, (4, 8)).astype(np.int32)
        batches.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
                        "labels": rs.randn(4).astype(np.float32)})
    return model, batches


def hand_terms(model, batches):
    """Per example: (pred, label, d pred / d masks) with a batch of one, by jax.grad (no fisher_jax.stats)."""
    grad = jax.jit(jax.grad(lambda m, ex: model.apply(model.params, ex, masks=m)[0, 0]))
    fwd = jax.jit(lambda ex: model.apply(model.params, ex)[0, 0])
    out = []
    for b in batches:
        for n in range(len(b["labels"])):
            ex = {k: v[n:n + 1] for k, v in b.items() if k != "labels"}
            g = grad(ones_masks(model.arch), ex)
            out.append((float(fwd(ex)), float(b["labels"][n]), {k: np.asarray(g[k], np.float64) for k in ("head", "neuron")}))
    return out


def test_regression_expected_fisher_divides_by_the_residual_variance(reg):
    model, batches = reg
    terms = hand_terms(model, batches)
    sigma2 = float(np.mean([(p - y) ** 2 for p, y, _ in terms]))
    fm = mask_fisher(model, batches, estimator="expected", progress=False)
    assert fm.meta["loss"] == "mse"
    assert fm.meta["noise_variance"] == pytest.approx(sigma2, rel=1e-5) and fm.meta["noise_variance_estimated"]
    for k in ("head", "neuron"):  # the Gaussian's expected Fisher: mean_n (d pred_n / dm)^2 / sigma^2
        ref = np.mean([g[k] ** 2 for _, _, g in terms], axis=0) / sigma2
        np.testing.assert_allclose(getattr(fm, k), ref, rtol=2e-4, atol=1e-6 * np.abs(ref).max(), err_msg=k)

    unit = mask_fisher(model, batches, estimator="expected", progress=False, noise_variance=1.0)
    assert unit.meta["noise_variance"] == 1.0 and not unit.meta["noise_variance_estimated"]
    np.testing.assert_allclose(fm.head, unit.head / sigma2, rtol=1e-5)
    s_hat = mask_fisher(model, batches, estimator="sampled", seed=1, progress=False)
    s_one = mask_fisher(model, batches, estimator="sampled", seed=1, progress=False, noise_variance=1.0)
    assert s_hat.meta["noise_variance"] == pytest.approx(sigma2, rel=1e-5)
    np.testing.assert_allclose(s_hat.neuron, s_one.neuron / sigma2, rtol=1e-5)
    ff = full_fisher(model, batches, estimator="expected", chunk_size=4, progress=False)
    assert ff.meta["noise_variance"] == pytest.approx(sigma2, rel=1e-5) and ff.meta["loss"] == "mse"
    with pytest.raises(FisherJaxError, match="needs 'labels'"):
        mask_fisher(model, [{k: v for k, v in b.items() if k != "labels"} for b in batches], estimator="expected",
                    progress=False)


def test_empirical_regression_and_classification_are_unchanged(reg, pair):
    model, batches = reg
    emp = mask_fisher(model, batches, estimator="empirical", progress=False)
    assert emp.meta["loss"] == "mse" and "noise_variance" not in emp.meta
    terms = hand_terms(model, batches)
    for k in ("head", "neuron"):  # the MSE training loss: mean_n (2 (pred - y) d pred)^2, no noise variance
        ref = np.mean([(2 * (p - y)) ** 2 * g[k] ** 2 for p, y, g in terms], axis=0)
        np.testing.assert_allclose(getattr(emp, k), ref, rtol=2e-4, atol=1e-6 * np.abs(ref).max(), err_msg=k)
    cls = mask_fisher(pair[0], [dict(b, labels=np.array([0, 1, 1, 0])) for b in batches], estimator="expected",
                      progress=False)
    assert cls.meta["loss"] == "cross_entropy" and "noise_variance" not in cls.meta
