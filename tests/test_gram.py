"""RegMean Grams against numpy Grams of Dense inputs captured by a second route."""

from __future__ import annotations

import numpy as np
import pytest

from fisher_jax.errors import FisherJaxError
from fisher_jax.models import from_config
from fisher_jax.stats import Grams, gram_stats
from fisher_jax.stats.gram import dense_layout
from fisher_jax.tree import flatten

B, T = 4, 8


def tiny():
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    return from_config(cfg, num_labels=3, seed=0)


def make_batch(seed, b=B, t=T):
    rs = np.random.RandomState(seed)
    ids = rs.randint(1, 99, (b, t)).astype(np.int32)
    lengths = rs.randint(2, t + 1, b)
    lengths[0] = 3  # some padding for sure
    am = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids[am == 0] = 0
    return {"input_ids": ids, "attention_mask": am, "token_type_ids": np.zeros_like(ids),
            "labels": rs.randint(0, 3, b).astype(np.int32)}


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def batches():
    return [make_batch(s) for s in range(2)]


def dense_inputs(model, batch):
    """Second route: every module's OUTPUT via capture_intermediates, mapped to the next Dense's input."""
    # output="hidden": the logits path runs the last layer for token 0 only (encoder.LayerStack).
    _, state = model.module.apply({"params": model.params}, batch["input_ids"], batch["attention_mask"],
                                  batch["token_type_ids"], output="hidden", capture_intermediates=True,
                                  mutable=["intermediates"])
    out = {k[: -len("/__call__")]: v[0] for k, v in flatten(state["intermediates"]).items()}
    xs = {}
    for l in range(model.arch.num_layers):
        p = f"encoder/layer/{l}"
        prev = "body/embeddings" if l == 0 else f"body/encoder/layer/{l - 1}"
        for name in ("query", "key", "value"):
            xs[f"{p}/attention/self/{name}"] = np.asarray(out[prev])
        xs[f"{p}/attention/output/dense"] = np.asarray(out[f"body/{p}/attention/self"])
        xs[f"{p}/intermediate/dense"] = np.asarray(out[f"body/{p}/attention"])
        xs[f"{p}/output/dense"] = np.asarray(out[f"body/{p}/intermediate"])
    xs["pooler/dense"] = np.asarray(out["body/encoder"])[:, 0]
    return xs


def numpy_grams(model, batches, mask_padding):
    acc, rows = {}, {}
    for b in batches:
        w = (b.get("weights", np.ones(len(b["input_ids"]))) > 0).astype(np.float64)
        tok = w[:, None] * (b["attention_mask"] if mask_padding else np.ones_like(b["attention_mask"]))
        for k, x in dense_inputs(model, b).items():
            m = tok if x.ndim == 3 else w
            x = x.astype(np.float64)[m > 0]  # the rows that count
            acc[k] = acc.get(k, 0.0) + x.T @ x
            rows[k] = rows.get(k, 0) + len(x)
    return {k: acc[k] / rows[k] for k in acc}


def assert_grams_close(got, ref):
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=2e-6 * np.abs(ref[k]).max(), err_msg=k)


def test_gram_equals_numpy_from_captured_inputs(model, batches):
    g = gram_stats(model, batches, progress=False)
    assert isinstance(g, Grams) and isinstance(g, dict)
    ref = numpy_grams(model, batches, mask_padding=True)
    assert_grams_close(g, ref)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert g.num_tokens == tokens and g.num_examples == 2 * B
    assert g.meta["kind"] == "gram" and g.meta["mask_padding"] is True
    # every body Dense layer, no head layer; q/k/v one object; shapes [in, in]
    body_dense = {k[: -len("/kernel")] for k in flatten(model.params["body"]) if k.endswith("/kernel")}
    assert set(g) == body_dense
    for l in range(2):
        q, k, v = (g[f"encoder/layer/{l}/attention/self/{n}"] for n in ("query", "key", "value"))
        assert q is k is v
    assert g["encoder/layer/0/output/dense"].shape == (37, 37)
    assert g["pooler/dense"].shape == (32, 32)
    assert g.grams.keys() == g.keys()


def test_modules_collects_only_those_grams_with_the_same_values(model, batches):
    full = gram_stats(model, batches, progress=False)
    part = gram_stats(model, batches, progress=False, modules=["encoder/layer/0/attention/self/key", "pooler/dense"])
    # key names the shared q/k/v input: all three come back, one object
    assert set(part) == {f"encoder/layer/0/attention/self/{n}" for n in ("query", "key", "value")} | {"pooler/dense"}
    assert part["encoder/layer/0/attention/self/query"] is part["encoder/layer/0/attention/self/value"]
    for k in part:
        np.testing.assert_allclose(part[k], full[k], rtol=1e-6, atol=1e-7 * np.abs(full[k]).max(), err_msg=k)
    assert part.num_tokens == full.num_tokens and part.num_examples == full.num_examples
    with pytest.raises(FisherJaxError, match=r"no body Dense layer 'encoder/layer/0/output/dens' \(did you mean"):
        gram_stats(model, batches, progress=False, modules=["encoder/layer/0/output/dens"])


def test_mask_padding_false_counts_padding_but_never_weight0_rows(model, batches):
    on = gram_stats(model, batches, mask_padding=True, progress=False)
    off = gram_stats(model, batches, mask_padding=False, progress=False)
    assert off.num_tokens == 2 * B * T > on.num_tokens
    assert_grams_close(off, numpy_grams(model, batches, mask_padding=False))
    key = "encoder/layer/1/intermediate/dense"
    assert not np.allclose(on[key], off[key], rtol=1e-3)
    # the pooler sees one CLS vector per example either way
    np.testing.assert_allclose(on["pooler/dense"], off["pooler/dense"], rtol=1e-6)

    # weight-0 garbage rows change nothing, with or without padding masking
    rs = np.random.RandomState(3)
    dirty = []
    for b in batches:
        junk = {"input_ids": rs.randint(1, 99, (2, T)).astype(np.int32), "attention_mask": np.ones((2, T), np.int32),
                "token_type_ids": np.zeros((2, T), np.int32), "labels": np.zeros(2, np.int32)}
        d = {k: np.concatenate([b[k], junk[k]]) for k in b}
        d["weights"] = np.array([1] * B + [0, 0], np.float32)
        dirty.append(d)
    for flag, ref in ((True, on), (False, off)):
        g = gram_stats(model, dirty, mask_padding=flag, progress=False)
        assert g.num_tokens == ref.num_tokens
        assert_grams_close(g, ref)


def test_layouts_of_other_families():
    """ELECTRA's embeddings_project and DistilBERT's q_lin/k_lin/v_lin (abstract trace, no compile)."""
    import transformers as tf

    from fisher_jax.models import ArchConfig

    electra = ArchConfig.from_hf(tf.ElectraConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=37,
                                                  max_position_embeddings=64, num_labels=2))
    unique, aliases, order = dense_layout(electra)
    dims = {p: d for p, d, _ in unique}
    assert dims["embeddings_project"] == 16 and dims["encoder/layer/1/output/dense"] == 37
    assert "pooler/dense" not in order and not any(p.startswith("classifier") for p in order)
    assert aliases["encoder/layer/0/attention/self/value"] == "encoder/layer/0/attention/self/query"

    distil = ArchConfig.from_hf(tf.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                                    max_position_embeddings=64, num_labels=2))
    unique, aliases, order = dense_layout(distil)
    assert aliases == {f"transformer/layer/{l}/attention/{n}": f"transformer/layer/{l}/attention/q_lin"
                       for l in range(2) for n in ("k_lin", "v_lin")}
    assert {p for p, _, _ in unique} == {f"transformer/layer/{l}/{n}" for l in range(2)
                                         for n in ("attention/q_lin", "attention/out_lin", "ffn/lin1", "ffn/lin2")}


def test_no_examples_is_an_error(model, batches):
    from fisher_jax.errors import FisherJaxError

    with pytest.raises(FisherJaxError, match="no examples"):
        gram_stats(model, [dict(batches[0], weights=np.zeros(B, np.float32))], progress=False)


def test_regmean_fallback_count_on_gram_stats_equals_the_inputs_rank_deficit(model, batches):
    """End to end: RegMean keeps the mean in exactly d - rank(all models' inputs) directions per layer.

    The pooler sees one row per example (16 rows, 32 wide: singular); LayerNorm outputs of a
    freshly initialised model sum to zero (one null direction); ``meta["rows"]`` gives the rank
    bound the solve uses.
    """
    from fisher_jax.merging import regmean

    other = [make_batch(s) for s in (2, 3)]
    sets = [gram_stats(model, bs, progress=False) for bs in (batches, other)]
    for g, bs in zip(sets, (batches, other)):
        assert g.meta["rows"]["pooler/dense"] == sum(len(b["input_ids"]) for b in bs)
        assert g.meta["rows"]["encoder/layer/0/output/dense"] == sum(int(b["attention_mask"].sum()) for b in bs)
    diag: dict = {}
    with pytest.warns(UserWarning, match="pooler/dense"):
        regmean([model.params["body"]] * 2, sets, diagnostics=diag)
    rows: dict = {}
    for b in batches + other:
        tok = b["attention_mask"] > 0
        for k, x in dense_inputs(model, b).items():
            rows.setdefault(k, []).append(np.asarray(x[tok] if x.ndim == 3 else x, np.float64))
    for k, xs in rows.items():
        x = np.concatenate(xs)
        s = np.linalg.svd(x, compute_uv=False)
        rank = int((s > 1e-4 * s[0]).sum())  # float32 inputs: below that is rounding
        assert diag["regmean"][k]["fallback"] == x.shape[1] - rank, k
    assert diag["regmean"]["pooler/dense"]["rank_bound"] == 16
    assert diag["regmean"]["pooler/dense"]["fallback"] >= 32 - 16
