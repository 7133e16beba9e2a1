"""Statistics files, fit checks, resumable runs and the mask-Fisher plot."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from fisher_jax.errors import FisherJaxError
from fisher_jax.models import from_config
from fisher_jax.stats import (FullFisher, Grams, MaskFisher, check_fits, fingerprint, gram_stats, load_stats,
                              mask_fisher, save_stats)
from fisher_jax.stats.io import base_meta
from fisher_jax.tree import flatten

B, T = 4, 8


@pytest.fixture(scope="module")
def model():
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    return from_config(cfg, num_labels=3, seed=0)


def make_batch(seed):
    rs = np.random.RandomState(seed)
    ids = rs.randint(1, 99, (B, T)).astype(np.int32)
    am = np.ones_like(ids)
    am[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": am, "token_type_ids": np.zeros_like(ids),
            "labels": rs.randint(0, 3, B).astype(np.int32)}


@pytest.fixture(scope="module")
def stats(model):
    """One of each kind, built cheaply (the estimators themselves are tested in test_fisher/test_gram)."""
    rs = np.random.RandomState(0)
    mf = MaskFisher(rs.rand(2, 4).astype(np.float32), rs.rand(2, 37).astype(np.float32), 12,
                    base_meta("mask_fisher", model, "empirical", num_examples=12))
    body = {k: rs.rand(*np.shape(v)).astype(np.float32) for k, v in flatten(model.params["body"]).items()}
    from fisher_jax.tree import unflatten

    ff = FullFisher(unflatten(body), 12, base_meta("full_fisher", model, "expected", num_examples=12))
    gr = gram_stats(model, [make_batch(0)], progress=False)
    return mf, ff, gr


def test_round_trips(tmp_path, model, stats):
    mf, ff, gr = stats
    p = save_stats(tmp_path / "a" / "mf.safetensors", mf, task="rte", split="train")
    back = load_stats(p)
    assert isinstance(back, MaskFisher) and back.num_examples == 12
    np.testing.assert_array_equal(back.head, mf.head)
    np.testing.assert_array_equal(back.neuron, mf.neuron)
    assert back.meta["task"] == "rte" and back.meta["split"] == "train" and back.meta["estimator"] == "empirical"
    assert back.meta["fingerprint"] == fingerprint(model) and back.meta["kind"] == "mask_fisher"
    import fisher_jax

    assert back.meta["library_version"] == fisher_jax.__version__ and "created" in back.meta

    back = load_stats(save_stats(tmp_path / "ff.safetensors", ff))
    assert isinstance(back, FullFisher) and set(back) == {"body"}
    for k, v in flatten(ff["body"]).items():
        np.testing.assert_array_equal(flatten(back["body"])[k], v)

    p = save_stats(tmp_path / "gr.safetensors", gr)
    back = load_stats(p)
    assert isinstance(back, Grams) and list(back) == list(gr)
    assert back.num_tokens == gr.num_tokens and back.num_examples == gr.num_examples
    for k in gr:
        np.testing.assert_array_equal(back[k], gr[k])
    q, k_, v = (back[f"encoder/layer/0/attention/self/{n}"] for n in ("query", "key", "value"))
    assert q is k_ is v  # aliases come back as one object (RegMean solves q/k/v together)
    from safetensors import safe_open

    with safe_open(str(p), framework="np") as f:  # stored once
        assert "encoder/layer/0/attention/self/key" not in f.keys()

    for s in stats:  # every record fits the model it came from, silently
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_fits(s, model)


def test_jsonable_and_the_split_modules():
    """One JSON conversion for every record; the old module still exports every name."""
    from fisher_jax import tree
    from fisher_jax.stats import files, fingerprints, fits, io, records

    x = {"a": (1, np.int64(2)), 3: np.float32(0.5), "b": np.array([[1, 2]]), "c": np.bool_(True), "d": None,
         "e": object}
    got = tree.jsonable(x)
    assert got == {"a": [1, 2], "3": 0.5, "b": [[1, 2]], "c": True, "d": None, "e": str(object)}
    assert json.loads(json.dumps(got)) == got
    assert type(got["a"][1]) is int and type(got["3"]) is float
    assert io.MaskFisher is records.MaskFisher and io.save_stats is files.save_stats
    assert io.fingerprint is fingerprints.fingerprint and io.check_fits is fits.check_fits
    mf = MaskFisher(np.ones((2, 4)), np.ones((2, 36)), 1)
    with pytest.raises(FisherJaxError, match=r"fishers\[1\] has head \(2, 4\) and neuron \(2, 36\).*\(2, 37\)"):
        fits.check_mask_fisher_shape(mf, 2, 4, 37, what="fishers[1]")
    fits.check_mask_fisher_shape(mf, 2, 4, 36)


def test_readable_without_jax(tmp_path, stats):
    mf, _, gr = stats
    save_stats(tmp_path / "mf.safetensors", mf, task="sst2")
    save_stats(tmp_path / "gr.safetensors", gr)
    code = textwrap.dedent(f"""
        import json, sys
        sys.modules["jax"] = None  # any import of JAX now fails
        from safetensors.numpy import load_file
        from safetensors import safe_open
        arrays = load_file({str(tmp_path / 'mf.safetensors')!r})
        with safe_open({str(tmp_path / 'mf.safetensors')!r}, framework="np") as f:
            meta = json.loads(f.metadata()["fisher_jax"])
        assert arrays["head"].shape == (2, 4) and meta["kind"] == "mask_fisher" and meta["task"] == "sst2"
        from fisher_jax.stats.io import load_stats  # the library's reader needs no JAX either
        g = load_stats({str(tmp_path / 'gr.safetensors')!r})
        assert "jax" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
        print("OK", meta["num_examples"], len(g))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["OK", "12", str(len(gr))]


def test_check_fits(model, stats):
    mf, ff, gr = stats
    other_arch = model.replace(arch=dataclasses.replace(model.arch, num_heads=8))
    for s in stats:
        with pytest.raises(FisherJaxError, match="computed for a bert with 2 layers x 4 heads"):
            check_fits(s, other_arch)
    # without metadata the shapes alone decide
    bare = MaskFisher(mf.head[:, :2], mf.neuron, 12)
    with pytest.raises(FisherJaxError, match=r"needs head \(2, 4\)"):
        check_fits(bare, model)
    bad_ff = FullFisher({"encoder": ff["body"]["encoder"]}, 12)
    with pytest.raises(FisherJaxError, match="missing"):
        check_fits(bad_ff, model)
    bad_gr = Grams({"encoder/layer/0/output/dense": np.zeros((32, 32), np.float32)}, 1, 1)
    with pytest.raises(FisherJaxError, match="37-dim"):
        check_fits(bad_gr, model)
    # same shapes, other weights (a fine-tune, a merge): a warning, not an error
    p = copy.deepcopy(model.params)
    p["body"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"] += 0.01
    with pytest.warns(UserWarning, match="different weights"):
        check_fits(mf, model.replace(params=p))


def test_unreadable_files(tmp_path):
    with pytest.raises(FisherJaxError, match="does not exist"):
        load_stats(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(FisherJaxError, match="corrupt or not safetensors"):
        load_stats(junk)
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FisherJaxError, match="not a fisher_jax statistics file"):
        load_stats(tmp_path / "plain.safetensors")
    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "bad.safetensors"), metadata={"fisher_jax": "{oops"})
    with pytest.raises(FisherJaxError, match="corrupt metadata"):
        load_stats(tmp_path / "bad.safetensors")


class Interrupted(Exception):
    pass


def interrupt_after(batches, k):
    """Yield k batches, then die as a killed job would."""
    for i, b in enumerate(batches):
        if i == k:
            raise Interrupted
        yield b


def test_resumed_run_equals_uninterrupted(tmp_path, model):
    batches = [make_batch(s) for s in range(5)]
    ref = mask_fisher(model, batches, estimator="sampled", seed=3, progress=False)
    ck = tmp_path / "ck"
    with pytest.raises(Interrupted):
        mask_fisher(model, interrupt_after(batches, 3), estimator="sampled", seed=3, progress=False,
                    checkpoint_dir=str(ck), checkpoint_every=2)
    resumed = mask_fisher(model, iter(batches), estimator="sampled", seed=3, progress=False,
                          checkpoint_dir=str(ck), checkpoint_every=2)
    # checkpoint after 2 batches, 3 more after the restart: the same sums, bit for bit
    np.testing.assert_array_equal(resumed.head, ref.head)
    np.testing.assert_array_equal(resumed.neuron, ref.neuron)
    assert resumed.num_examples == ref.num_examples == 5 * B and resumed.meta["num_batches"] == 5
    with pytest.raises(FisherJaxError, match="another run"):
        mask_fisher(model, batches, estimator="empirical", progress=False, checkpoint_dir=str(ck))
    with pytest.raises(FisherJaxError, match="ran out after 2"):
        mask_fisher(model, batches[:2], estimator="sampled", seed=3, progress=False, checkpoint_dir=str(ck))

    g_ref = gram_stats(model, batches, progress=False)
    with pytest.raises(Interrupted):
        gram_stats(model, interrupt_after(batches, 4), progress=False, checkpoint_dir=str(tmp_path / "g"),
                   checkpoint_every=3)
    g = gram_stats(model, batches, progress=False, checkpoint_dir=str(tmp_path / "g"), checkpoint_every=3)
    assert g.num_tokens == g_ref.num_tokens
    for k in g_ref:
        np.testing.assert_array_equal(g[k], g_ref[k])


def test_plot(tmp_path, stats):
    from fisher_jax.stats.plots import plot_mask_fisher

    mf = stats[0]
    mf = dataclasses.replace(mf, head=mf.head * np.logspace(-3, 0, 4, dtype=np.float32))
    mf.neuron[1, :5] = 0.0  # zeros on a log scale must not break the plot
    path = plot_mask_fisher(mf, tmp_path / "fig" / "mf.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    meta = json.dumps(mf.meta)
    assert "mask_fisher" in meta
