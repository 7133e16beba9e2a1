"""AdaMerging: the entropy against numpy, zero steps as task arithmetic, learning lowers the
objective, layer-wise coefficients have one column per layer group, and the errors."""

from __future__ import annotations

import numpy as np
import pytest

import fisher_jax as fj
from fisher_jax.errors import FisherJaxError
from fisher_jax.merging import adamerging, merge
from fisher_jax.merging.adamerging import entropy, layer_groups
from fisher_jax.tree import flatten, unflatten


# One layer, hidden 8: compiling the objective's gradient dominates these tests' time.
TINY = dict(vocab_size=99, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
            max_position_embeddings=16, type_vocab_size=2)


@pytest.fixture(scope="module")
def setup():
    import transformers as tf
    from conftest import random_batch

    cfg = tf.BertConfig(**TINY, num_labels=2)
    base = fj.models.from_config(cfg, seed=0)
    rng = np.random.default_rng(2)
    models = []
    for j in range(2):
        body = unflatten({k: (v + 0.1 * rng.standard_normal(np.shape(v))).astype(np.float32)
                          for k, v in flatten(base.params["body"]).items()})
        head = unflatten({k: (3.0 * rng.standard_normal(np.shape(v))).astype(np.float32)
                          for k, v in flatten(base.params["head"]).items()})
        models.append(base.replace(params={"body": body, "head": head}))
    batches = []
    for j in range(2):
        ids, am, tt = random_batch("bert", batch=4, length=6, seed=20 + j)
        batches.append([{"input_ids": ids, "attention_mask": am, "token_type_ids": tt, "weights": np.ones(4, np.float32)}])
    return base, models, batches


def test_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits, w = rng.standard_normal((5, 3)), np.array([1, 1, 0, 1, 1], np.float32)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = sum(-w[b] * np.sum(p[b] * np.log(p[b])) for b in range(5)) / w.sum()
    assert float(entropy(logits, w)) == pytest.approx(want, rel=1e-5)


def test_layer_groups():
    names = ["embeddings/LayerNorm/scale", "encoder/layer/0/output/dense/kernel", "encoder/layer/1/output/dense/bias",
             "pooler/dense/kernel"]
    assert layer_groups(names) == ({names[0]: 0, names[1]: 1, names[2]: 2, names[3]: 3}, 4)


def test_adamerging_starts_at_task_arithmetic_and_lowers_the_entropy(setup):
    from fisher_jax.merging.adamerging import _merged

    base, models, batches = setup
    b = flatten(base.params["body"])
    tvs = [{k: flatten(m.params["body"])[k] - b[k] for k in b} for m in models]
    groups, count = layer_groups(list(b))
    lam = np.arange(2 * count, dtype=np.float32).reshape(2, count) / 10
    for k, v in _merged(b, tvs, lam, groups).items():  # theta_0 + sum_j lam[j, g(k)] tau_j
        np.testing.assert_allclose(v, b[k] + sum(lam[j, groups[k]] * tvs[j][k] for j in range(2)), rtol=1e-6, err_msg=k)
    report: dict = {}
    out = merge("adamerging", models, base=base, batches=batches, granularity="layer", steps=2, learning_rate=0.05,
                report=report)
    info = report["diagnostics"]["adamerging"]
    assert np.shape(info["lam"]) == (2, 3)  # embeddings, one layer, pooler
    assert info["objective"][-1] < info["objective"][0]
    assert not np.allclose(info["lam"], 0.3)
    assert out[0].params["head"] is models[0].params["head"]
    with pytest.raises(FisherJaxError, match="granularity must be 'task' or 'layer'"):
        adamerging(models, base.params["body"], batches, granularity="tensor")
    with pytest.raises(FisherJaxError, match="'adamerging' needs batches="):
        merge("adamerging", models, base=base)


def test_adamerging_steps_cycle_through_each_tasks_batches(setup):
    # Step s takes batch s mod len(batches[j]); a batch whose rows all weigh 0 has no entropy.
    base, models, batches = setup
    silent = [{**b[0], "weights": np.zeros(4, np.float32)} for b in batches]
    two = [[b[0], z] for b, z in zip(batches, silent)]
    report: dict = {}
    merge("adamerging", models, base=base, batches=two, granularity="layer", steps=3, learning_rate=0.05, report=report)
    info = report["diagnostics"]["adamerging"]
    assert info["objective"][0] > 0 and info["objective"][1] == 0.0 and info["objective"][2] > 0
    # The whole-data objective at init: each task's mean over its two batches, summed over tasks.
    assert info["objective_all"][0] == pytest.approx(info["objective"][0] / 2, rel=1e-6)


def test_adamerging_batch_size_splits_batches(setup):
    # Four rows in pieces of two: each task has two batches, so step 1 sees the second half.
    base, models, batches = setup
    report: dict = {}
    merge("adamerging", models, base=base, batches=batches, granularity="task", steps=2, learning_rate=0.05,
          batch_size=2, report=report)
    halves = [[{k: v[:2] for k, v in b[0].items()}, {k: v[2:] for k, v in b[0].items()}] for b in batches]
    again: dict = {}
    merge("adamerging", models, base=base, batches=halves, granularity="task", steps=2, learning_rate=0.05,
          batch_size=None, report=again)
    np.testing.assert_allclose(report["diagnostics"]["adamerging"]["objective"],
                               again["diagnostics"]["adamerging"]["objective"], rtol=1e-6)
    with pytest.raises(FisherJaxError, match="batch_size must be an integer >= 1 or None"):
        adamerging(models, base.params["body"], batches, batch_size=0)


def test_adamerging_leaves_a_regression_models_coefficients_at_init(setup):
    # A regression head has no entropy: nothing in the objective speaks for its task.
    import transformers as tf

    base, models, batches = setup
    reg = fj.models.from_config(tf.BertConfig(**TINY, num_labels=1), seed=3)
    reg = reg.replace(params={"body": models[1].params["body"], "head": reg.params["head"]})
    assert reg.arch.is_regression
    report: dict = {}
    merge("adamerging", [models[0], reg], base=base, batches=batches, granularity="layer", steps=3, learning_rate=0.05,
          report=report)
    lam = np.asarray(report["diagnostics"]["adamerging"]["lam"])
    np.testing.assert_array_equal(lam[1], np.full(lam.shape[1], 0.3, np.float32))
    assert not np.allclose(lam[0], 0.3)
