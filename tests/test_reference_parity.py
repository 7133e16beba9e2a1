"""JAX pipeline vs the PyTorch reference (fisher_jax.reference.torch) on tiny random models.

Two independent implementations of SPEC §1–§3 must agree: mask Fishers (empirical and batch,
classification and regression) to 1e-4 relative, Fisher-node merged state dicts to 1e-5, Grams to
1e-5, RegMean merged weights to 1e-4. The models are transformers PyTorch models saved to disk and
loaded with ``fj.from_pretrained``, so both sides hold the very same weights.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest

import fisher_jax as fj
from fisher_jax.errors import FisherJaxError

from conftest import random_batch, tiny_hf_config

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")
rt = pytest.importorskip("fisher_jax.reference.torch")

pytestmark = pytest.mark.torch


# ------------------------------------------------------------------------------------ fixtures
def _torch_model(model_type: str, num_labels: int, seed: int, base_seed: int = 0):
    """A base model (``base_seed``) plus a seed-dependent perturbation: like fine-tunes of one base."""
    torch.manual_seed(base_seed)
    model = tf.AutoModelForSequenceClassification.from_config(tiny_hf_config(model_type, num_labels)).eval()
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            # Default init (std 0.02) gives near-uniform predictions; scale up so gradients are not tiny.
            p.mul_(4.0 if p.dim() > 1 else 1.0).add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _batches(model_type: str, num_labels: int, pad_id: int, n: int = 2, size: int = 12, length: int = 10):
    # 23 real examples: BERT's pooler Gram has one row per example, and RegMean's summed Gram of two
    # models must be full rank (hidden 32) for the unshrunk solve to be well posed.
    out = []
    for s in range(n):
        ids, am, tt = random_batch(model_type, batch=size, length=length, seed=s, pad_id=pad_id)
        rs = np.random.RandomState(100 + s)
        if num_labels == 1:
            labels = rs.randn(size).astype(np.float32)
        else:
            labels = rs.randint(0, num_labels, size).astype(np.int32)
        weights = np.ones(size, np.float32)
        if s == n - 1:
            weights[-1] = 0.0  # a padding row, as our batcher makes for the last batch
        out.append({"input_ids": ids, "attention_mask": am, "token_type_ids": tt, "labels": labels, "weights": weights})
    return out


_CACHE: dict = {}


def _pair(model_type: str, num_labels: int, seed: int, tmp_path_factory):
    """(torch model, JAX model with the same weights, batches), cached per key for the session."""
    key = (model_type, num_labels, seed)
    if key not in _CACHE:
        pt = _torch_model(model_type, num_labels, seed)
        folder = tmp_path_factory.mktemp(f"{model_type}{num_labels}s{seed}")
        pt.save_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            jm = fj.from_pretrained(folder)
        _CACHE[key] = (pt, jm, _batches(model_type, num_labels, pt.config.pad_token_id or 0))
    return _CACHE[key]


def _assert_rel(ours: np.ndarray, ref: np.ndarray, rtol: float, what: str) -> None:
    """Entrywise ``|a - b| <= rtol * |b| + rtol * 1e-2 * max|b|`` (the floor keeps ~0 entries from
    failing on float32 rounding alone)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, what
    scale = np.abs(ref).max()
    assert scale > 0, f"{what}: the reference is all zeros, nothing is compared"
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * 1e-2 * scale, err_msg=what)


# ------------------------------------------------------------------------------ mask placement
@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_mask_hooks_match_jax_masks(model_type, tmp_path_factory):
    pt, jm, batches = _pair(model_type, 3, 0, tmp_path_factory)
    b = batches[0]
    rs = np.random.RandomState(3)
    L, H, I = rt.geometry(pt)
    head, neuron = rs.uniform(0, 2, (L, H)).astype(np.float32), rs.uniform(0, 2, (L, I)).astype(np.float32)
    ours = np.asarray(jm(b["input_ids"], b["attention_mask"], b["token_type_ids"],
                         masks={"head": head, "neuron": neuron}))
    tb = rt.to_torch_batch(b, regression=False)
    kw = rt._model_inputs(pt, tb)
    with torch.no_grad():
        plain = pt(**kw).logits.numpy()
        with rt.MaskHooks(pt, torch.ones(L, H), torch.ones(L, I)):
            ones = pt(**kw).logits.numpy()
        with rt.MaskHooks(pt, torch.tensor(head), torch.tensor(neuron)):
            ref = pt(**kw).logits.numpy()
    np.testing.assert_array_equal(ones, plain)  # all-ones masks change nothing
    assert np.abs(ref - plain).max() > 1e-3  # the masks do something
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- mask Fisher
@pytest.mark.parametrize(
    "model_type,num_labels,estimator",
    [("bert", 3, "empirical"), ("bert", 3, "batch"), ("bert", 1, "empirical"), ("bert", 1, "batch"),
     ("distilbert", 2, "empirical")],
)
def test_mask_fisher_matches_torch(model_type, num_labels, estimator, tmp_path_factory):
    pt, jm, batches = _pair(model_type, num_labels, 0, tmp_path_factory)
    ours = fj.mask_fisher(jm, batches, estimator=estimator, progress=False)
    methods = ["loop", "vmap"] if estimator != "batch" else ["loop"]
    for method in methods:
        ref = rt.mask_fisher(pt, batches, estimator=estimator, method=method)
        assert ours.num_examples == ref.num_examples == 23
        _assert_rel(ours.head, ref.head, 1e-4, f"{estimator}/{method} head")
        _assert_rel(ours.neuron, ref.neuron, 1e-4, f"{estimator}/{method} neuron")


def test_reference_estimators_differ_as_documented(tmp_path_factory):
    """``batch`` is not a per-example Fisher: with several examples per batch it differs from it."""
    pt, _, batches = _pair("bert", 3, 0, tmp_path_factory)
    emp = rt.mask_fisher(pt, batches, estimator="empirical")
    bat = rt.mask_fisher(pt, batches, estimator="batch")
    assert np.abs(emp.head - bat.head).max() > 1e-3 * np.abs(emp.head).max()


# --------------------------------------------------------------------------------- fisher_nodes
@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
@pytest.mark.parametrize("mapping", ["reference", "node"])
def test_fisher_nodes_merge_matches_torch(model_type, mapping, tmp_path_factory):
    num_labels = 3 if model_type == "bert" else 2
    (pa, ja, ba), (pb, jb, bb) = (_pair(model_type, num_labels, s, tmp_path_factory) for s in (0, 1))
    fa, fb = (fj.mask_fisher(m, b, progress=False) for m, b in ((ja, ba), (jb, bb)))
    fa, fb = (dataclasses.replace(f, head=np.array(f.head), neuron=np.array(f.neuron)) for f in (fa, fb))
    # Exercise the zero patch: a head and a neuron no model cares about, and one only model b does.
    for f in (fa, fb):
        f.head[0, 1] = 0.0
        f.neuron[1, 4] = 0.0
    fa.head[1, 0] = 0.0
    fa_before, fb_before = copy.deepcopy(fa), copy.deepcopy(fb)
    sds = [rt.state_dict_numpy(pa), rt.state_dict_numpy(pb)]
    sds_before = copy.deepcopy(sds)

    merged_jax = fj.merge("fisher_nodes", [ja, jb], fishers=[fa, fb], mapping=mapping)
    merged_ref = rt.fisher_nodes_merge(sds, [fa, fb], mapping=mapping)

    for f, g in ((fa, fa_before), (fb, fb_before)):  # inputs untouched (SPEC §5)
        np.testing.assert_array_equal(f.head, g.head)
        np.testing.assert_array_equal(f.neuron, g.neuron)
    for sd, before in zip(sds, sds_before):
        for k in sd:
            np.testing.assert_array_equal(sd[k], before[k])
    prefix = pa.base_model_prefix + "."
    for j, (mj, mr) in enumerate(zip(merged_jax, merged_ref)):
        ours = fj.models.state_dict(mj)
        ref = rt.state_dict_numpy(mr)
        assert set(ours) == set(ref)
        for k in ref:
            np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
            if not k.startswith(prefix):  # heads are not merged
                np.testing.assert_array_equal(ref[k], sds[j][k])
    # The merge did something: it is neither model.
    query = "encoder.layer.0.attention.self.query" if model_type == "bert" else "transformer.layer.0.attention.q_lin"
    q = f"{prefix}{query}.weight"
    r0 = rt.state_dict_numpy(merged_ref[0])[q]
    assert np.abs(r0 - sds[0][q]).max() > 1e-4 and np.abs(r0 - sds[1][q]).max() > 1e-4


def test_reference_merges_keep_heads_of_different_shapes():
    """A classification and a regression model share a body but not a head shape."""
    a, b = _torch_model("bert", 3, 0), _torch_model("bert", 1, 1)
    sda, sdb = rt.state_dict_numpy(a), rt.state_dict_numpy(b)
    L, H, I = rt.geometry(a)
    ones = fj.MaskFisher(np.ones((L, H), np.float32), np.ones((L, I), np.float32), 1)
    for merged in (rt.fisher_nodes_merge([sda, sdb], [ones, ones]), rt.simple_merge([sda, sdb])):
        assert merged[0]["classifier.weight"].shape == (3, 32) and merged[1]["classifier.weight"].shape == (1, 32)
        np.testing.assert_array_equal(merged[1]["classifier.weight"].numpy(), sdb["classifier.weight"])
        w = "bert.encoder.layer.0.intermediate.dense.weight"  # equal Fishers: the simple mean
        np.testing.assert_allclose(merged[0][w].numpy(), (sda[w] + sdb[w]) / 2, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(merged[0][w].numpy(), merged[1][w].numpy())


# ----------------------------------------------------------------------------------- RegMean
@pytest.mark.parametrize("model_type,mask_padding", [("bert", True), ("bert", False), ("electra", True)])
def test_grams_match_torch(model_type, mask_padding, tmp_path_factory):
    pt, jm, batches = _pair(model_type, 3, 0, tmp_path_factory)
    ours = fj.gram_stats(jm, batches, mask_padding=mask_padding, progress=False)
    ref = rt.gram_stats(pt, batches, mask_padding=mask_padding)
    assert set(ours) == set(ref)
    assert (ours.num_tokens, ours.num_examples) == (ref.num_tokens, ref.num_examples)
    if model_type == "bert":
        assert "pooler/dense" in ref
    else:
        assert "embeddings_project" in ref
    q, k = "encoder/layer/0/attention/self/query", "encoder/layer/0/attention/self/key"
    assert ref[q] is ref[k]  # one Gram for the shared q/k/v input
    for key in ref:
        _assert_rel(ours[key], ref[key], 1e-5, key)


def test_grams_padding_option_changes_the_result(tmp_path_factory):
    pt, _, batches = _pair("bert", 3, 0, tmp_path_factory)
    masked = rt.gram_stats(pt, batches, mask_padding=True)
    counted = rt.gram_stats(pt, batches, mask_padding=False)
    key = "encoder/layer/1/intermediate/dense"
    assert counted.num_tokens > masked.num_tokens
    assert np.abs(masked[key] - counted[key]).max() > 1e-4


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_regmean_merge_matches_torch(alpha, tmp_path_factory):
    (pa, ja, ba), (pb, jb, bb) = (_pair("bert", 3, s, tmp_path_factory) for s in (0, 1))
    ga = fj.gram_stats(ja, ba, progress=False)
    gb = fj.gram_stats(jb, bb, progress=False)
    sds = [rt.state_dict_numpy(pa), rt.state_dict_numpy(pb)]
    merged_jax = fj.merge("regmean", [ja, jb], grams=[ga, gb], alpha=alpha)
    merged_ref = rt.regmean_merge(sds, [ga, gb], alpha=alpha)
    simple = rt.state_dict_numpy(rt.simple_merge(sds)[0])
    ours, ref = fj.models.state_dict(merged_jax[0]), rt.state_dict_numpy(merged_ref[0])
    for k in ref:
        scale = max(np.abs(ref[k]).max(), 1e-12)
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-4, atol=1e-4 * scale, err_msg=k)
    # RegMean is not the simple mean where Grams exist (the released driver's silent fallback).
    w = "bert.encoder.layer.1.output.dense.weight"
    assert np.abs(ref[w] - simple[w]).max() > 1e-3
    b = "bert.encoder.layer.1.output.dense.bias"
    np.testing.assert_allclose(ref[b], simple[b], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------- import guard
def test_reference_package_imports_without_torch_and_fails_clearly(monkeypatch):
    import fisher_jax.reference as ref_pkg

    monkeypatch.setattr(ref_pkg, "torch_available", lambda: False)
    with pytest.raises(FisherJaxError, match=r"pip install 'fisher-jax\[torch\]'"):
        ref_pkg.require_torch()
    with pytest.raises(FisherJaxError, match="fisher-jax"):
        ref_pkg.mask_fisher  # noqa: B018 - the lazy attribute goes through require_torch


# ------------------------------------------------------------------------------- compare (CLI)
@pytest.mark.slow
def test_compare_runs_both_pipelines_on_glue(minilm_path, glue_dir, tmp_path, capsys):
    """Two tiny checkpoints (RTE, MRPC: one architecture, so JAX compiles once) with MiniLM's tokenizer."""
    import json
    import shutil

    from fisher_jax import cli

    dirs = []
    for task, labels, seed in (("rte", 2, 0), ("mrpc", 2, 1)):
        cfg = tiny_hf_config("bert", labels)
        cfg.vocab_size, cfg.max_position_embeddings = 30522, 128  # MiniLM's tokenizer, GLUE lengths
        torch.manual_seed(seed)
        model = tf.AutoModelForSequenceClassification.from_config(cfg).eval()
        folder = tmp_path / task
        model.save_pretrained(folder)
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(minilm_path) / name).is_file():
                shutil.copy(Path(minilm_path) / name, folder / name)
        dirs.append(str(folder))
    out = tmp_path / "compare.json"
    assert cli.main(["compare", "--models", *dirs, "--tasks", "rte", "mrpc", "--glue-dir", str(glue_dir),
                         "--num-examples", "6", "--batch-size", "4", "--max-eval", "10", "--max-length", "32",
                         "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["num_examples"] for r in result["fisher"]] == [6, 6]
    for r in result["fisher"]:
        assert r["head_max_rel_diff"] < 1e-4 and r["neuron_max_rel_diff"] < 1e-4
    assert result["merge"]["max_rel_diff"] < 1e-4
    for r in result["scores"]:
        assert r["num_examples"] == 10
        # Same predictions up to float32 rounding (an argmax tie could flip one of 10 rows at most).
        assert abs(r["merged_jax"] - r["merged_torch"]) <= 0.1
        assert abs(r["single_jax"] - r["single_torch"]) <= 0.1
    assert "merged PyTorch" in capsys.readouterr().out
