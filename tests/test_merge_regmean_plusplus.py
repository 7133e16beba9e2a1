"""RegMean++: each layer's Grams through the already-merged layers below it, on a tiny BERT.

The reference walks the stages by hand (embeddings mean, then encoder layer 0, 1, then the
pooler), builds each model's partially merged body itself, takes the Grams of that stage's
Dense inputs and solves in float64 numpy.
"""

from __future__ import annotations

import numpy as np
import pytest

import fisher_jax as fj
from fisher_jax.errors import FisherJaxError
from fisher_jax.merging import merge, regmean, regmean_plusplus
from fisher_jax.tree import flatten, unflatten

ALPHA = 0.9


@pytest.fixture(scope="module")
def setup():
    from conftest import random_batch, tiny_hf_config

    base = fj.models.from_config(tiny_hf_config("bert", num_labels=2), seed=0)
    rng = np.random.default_rng(1)
    models = []
    for _ in range(2):
        body = unflatten({k: (v + 0.2 * rng.standard_normal(np.shape(v))).astype(np.float32)
                          for k, v in flatten(base.params["body"]).items()})
        models.append(base.replace(params={"body": body, "head": base.params["head"]}))
    batches = []
    for j in range(2):  # 48 examples: more rows than any layer is wide, so every Gram has full rank
        ids, am, tt = random_batch("bert", batch=48, length=10, seed=10 + j)
        batches.append([{"input_ids": ids, "attention_mask": am, "token_type_ids": tt,
                         "labels": np.zeros(48, np.int32), "weights": np.ones(48, np.float32)}])
    return models, batches


def ref_regmean_plusplus(models, batches, alpha):
    flats = [{k: np.asarray(v, np.float64) for k, v in flatten(m.params["body"]).items()} for m in models]
    names = list(flats[0])
    merged = {k: sum(f[k] for f in flats) / len(flats) for k in names if k.startswith("embeddings/")}
    for prefix in ("encoder/layer/0/", "encoder/layer/1/", "pooler/"):
        grams = []
        for m, f, data in zip(models, flats, batches):
            hybrid = unflatten({k: np.asarray(merged.get(k, f[k]), np.float32) for k in names})
            grams.append(fj.gram_stats(m.replace(params={"body": hybrid, "head": m.params["head"]}), data, progress=False))
        for k in names:
            if not k.startswith(prefix):
                continue
            mod = k.rsplit("/", 1)[0]
            if k.endswith("/kernel"):
                lhs = sum(alpha * np.asarray(g[mod], np.float64) + (1 - alpha) * np.diag(np.diag(g[mod])) for g in grams)
                rhs = sum((alpha * np.asarray(g[mod], np.float64) + (1 - alpha) * np.diag(np.diag(g[mod]))) @ f[k]
                          for g, f in zip(grams, flats))
                merged[k] = np.linalg.solve(lhs, rhs)
            else:
                merged[k] = sum(f[k] for f in flats) / len(flats)
    return merged


def test_regmean_plusplus_matches_the_stagewise_construction_and_differs_from_regmean(setup):
    models, batches = setup
    out = flatten(regmean_plusplus(models, batches, alpha=ALPHA))
    ref = ref_regmean_plusplus(models, batches, ALPHA)
    assert list(out) == list(ref)
    for k in out:
        np.testing.assert_allclose(np.asarray(out[k], np.float64), ref[k], rtol=2e-4, atol=2e-5, err_msg=k)
    # RegMean takes every Gram in the models' own networks: from layer 0 on (its inputs pass the
    # merged embeddings) the kernels differ; biases and LayerNorms are the same mean in both.
    plain = flatten(regmean([m.params["body"] for m in models],
                            [fj.gram_stats(m, b, progress=False) for m, b in zip(models, batches)], alpha=ALPHA))
    for k in ("encoder/layer/0/attention/self/query/kernel", "encoder/layer/1/output/dense/kernel", "pooler/dense/kernel"):
        assert np.max(np.abs(np.asarray(out[k]) - np.asarray(plain[k]))) > 1e-3, k
    np.testing.assert_allclose(out["encoder/layer/1/output/LayerNorm/scale"], plain["encoder/layer/1/output/LayerNorm/scale"],
                               rtol=1e-6)


def test_merge_runs_regmean_plusplus_and_reports_like_regmean(setup):
    models, batches = setup
    report: dict = {}
    out = merge("regmean-plusplus", models, batches=batches, alpha=ALPHA, report=report)
    assert report["method"] == "regmean_plusplus"
    assert set(report["diagnostics"]["regmean"]) >= {"encoder/layer/0/intermediate/dense", "pooler/dense"}
    assert all(d["fallback"] == 0 for d in report["diagnostics"]["regmean"].values())
    assert out[1].params["head"] is models[1].params["head"]
    with pytest.raises(FisherJaxError, match="'regmean_plusplus' needs batches="):
        merge("regmean_plusplus", models)
    with pytest.raises(FisherJaxError, match="batches= has 1 entries for 2 models"):
        merge("regmean_plusplus", models, batches=batches[:1])
    with pytest.raises(FisherJaxError, match=r"batches\[1\] is empty"):
        regmean_plusplus(models, [batches[0], []])
