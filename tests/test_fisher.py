"""Mask Fisher and full Fisher: every estimator against an independent hand computation."""

from __future__ import annotations

import copy
import dataclasses
import functools

import jax
import numpy as np
import pytest

from fisher_jax.errors import FisherJaxError
from fisher_jax.models import from_config, ones_masks
from fisher_jax.stats import MaskFisher, full_fisher, mask_fisher
from fisher_jax.tree import flatten

B, T = 4, 8
RTOL = 2e-5


def tiny(num_labels=3, seed=0):
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    return from_config(cfg, num_labels=num_labels, seed=seed)


def make_batch(seed, b=B, t=T, regression=False, num_labels=3):
    rs = np.random.RandomState(seed)
    ids = rs.randint(1, 99, (b, t)).astype(np.int32)
    lengths = rs.randint(3, t + 1, b)
    am = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids[am == 0] = 0
    tt = ((np.arange(t)[None] >= lengths[:, None] // 2) * am).astype(np.int32)
    labels = rs.randn(b).astype(np.float32) if regression else rs.randint(0, num_labels, b).astype(np.int32)
    return {"input_ids": ids, "attention_mask": am, "token_type_ids": tt, "labels": labels}


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def reg_model(model):
    """The same body with a 1-output regression head (no second initialisation)."""
    return with_head(model, 1, scale=10.0)


@pytest.fixture(scope="module")
def batches():
    return [make_batch(s) for s in range(3)]


# ----------------------------------------------------------------------- independent references
def rows(batches):
    """Every real example as a batch of one."""
    for b in batches:
        w = b.get("weights", np.ones(len(b["input_ids"]), np.float32))
        for n in range(len(b["input_ids"])):
            if w[n] > 0:
                yield {k: v[n:n + 1] for k, v in b.items() if k != "weights"}


@functools.lru_cache(maxsize=None)
def ref_grad(model, wrt="masks"):
    """Jitted ``(grad of out[c], logits)`` for ONE example (batch of 1), compiled once per model.

    ``out`` = log-softmax (classification) or the prediction (regression); ``wrt`` = "masks" or
    "body". Every reference below is built from it with plain numpy: no vmap, no fisher_jax.stats.
    """

    def out(v, ex, c):
        if wrt == "masks":
            logits = model.apply(model.params, ex, masks=v)[0]
        else:
            logits = model.apply({"body": v, "head": model.params["head"]}, ex)[0]
        o = logits if model.arch.is_regression else jax.nn.log_softmax(logits)
        return o[c], logits

    return jax.jit(jax.grad(out, has_aux=True))


def example_terms(model, ex, kind, wrt="masks"):
    """``[(weight, grad tree)]`` whose weighted squares sum to one example's Fisher."""
    v = ones_masks(model.arch) if wrt == "masks" else model.params["body"]
    g0, logits = ref_grad(model, wrt)(v, ex, 0)
    logits = np.asarray(logits, np.float64)
    if model.arch.is_regression:  # g0 = d pred
        if kind == "empirical":  # d (pred - y)^2 = 2 (pred - y) d pred
            return [(1.0, jax.tree_util.tree_map(lambda g: 2 * (logits[0] - ex["labels"][0]) * g, g0))]
        return [(1.0, g0)]  # expected (Gaussian): (d pred)^2
    if kind == "empirical":  # d(-log p_y) = -d log p_y
        return [(1.0, ref_grad(model, wrt)(v, ex, int(ex["labels"][0]))[0])]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return [(p[c], ref_grad(model, wrt)(v, ex, c)[0]) for c in range(len(p))]  # explicit sum over classes


def loop_fisher(model, batches, kind, wrt="masks"):
    """Python loop over single examples (batch size 1): mean over examples of sum_terms w * g^2."""
    acc, n = None, 0
    for ex in rows(batches):
        for w, g in example_terms(model, ex, kind, wrt):
            sq = {k: w * np.asarray(x, np.float64) ** 2 for k, x in flatten(g).items()}
            acc = sq if acc is None else {k: acc[k] + sq[k] for k in acc}
        n += 1
    return {k: x / n for k, x in acc.items()}, n


def batch_mode_fisher(model, batches, wrt="masks"):
    """The released code's estimator by hand: (mean over a batch's real rows of d(-log p_y))^2,
    summed over batches (not averaged)."""
    acc = None
    for bt in batches:
        grads = [flatten(example_terms(model, ex, "empirical", wrt)[0][1]) for ex in rows([bt])]
        sq = {k: np.mean([np.asarray(g[k], np.float64) for g in grads], axis=0) ** 2 for k in grads[0]}
        acc = sq if acc is None else {k: acc[k] + sq[k] for k in acc}
    return acc


def assert_close(fm, ref, rtol=RTOL):
    for k in ("head", "neuron"):
        got = getattr(fm, k) if isinstance(fm, MaskFisher) else fm[k]
        scale = np.abs(ref[k]).max()
        np.testing.assert_allclose(got, ref[k], rtol=rtol, atol=rtol * scale, err_msg=k)


# ----------------------------------------------------------------------- estimators
@pytest.mark.parametrize("chunk_size", [None, 1, 3])  # CPU default (4), one at a time, 3 (pads 4 -> 6 rows)
def test_empirical_equals_loop_over_single_examples(model, batches, chunk_size):
    fm = mask_fisher(model, batches, estimator="empirical", progress=False, chunk_size=chunk_size)
    ref, n = loop_fisher(model, batches, "empirical")
    assert fm.num_examples == n == 3 * B
    assert fm.head.shape == (2, 4) and fm.neuron.shape == (2, 37) and fm.head.dtype == np.float32
    assert fm.meta["estimator"] == "empirical" and fm.meta["kind"] == "mask_fisher"
    assert_close(fm, ref)


def with_head(model, num_labels, scale=1.0):
    """The same body with the first ``num_labels`` outputs of the head (no second initialisation)."""
    params = copy.deepcopy(model.params)
    head = params["head"]["classifier"]
    head["kernel"], head["bias"] = head["kernel"][:, :num_labels] * scale, head["bias"][:num_labels]
    return model.replace(arch=dataclasses.replace(model.arch, num_labels=num_labels), params=params)


def test_expected_equals_explicit_sum_over_classes(model, batches):
    fm = mask_fisher(model, batches, estimator="expected", progress=False)
    ref, _ = loop_fisher(model, batches, "expected")
    assert_close(fm, ref)
    # binary: one backward pass instead of two, same value
    binary = with_head(model, 2, scale=30.0)  # confident predictions: the reference class matters
    bs = [dict(b, labels=b["labels"] % 2) for b in batches[:2]]
    assert_close(mask_fisher(binary, bs, estimator="expected", progress=False), loop_fisher(binary, bs, "expected")[0])
    # expected does not need labels
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    assert_close(mask_fisher(model, unlabeled, estimator="expected", progress=False), ref)


def test_sampled_uses_seeded_labels(model, batches):
    a = mask_fisher(model, batches, estimator="sampled", seed=0, progress=False)
    b = mask_fisher(model, batches, estimator="sampled", seed=0, progress=False)
    c = mask_fisher(model, batches, estimator="sampled", seed=1, progress=False)
    np.testing.assert_array_equal(a.head, b.head)
    assert not np.allclose(a.neuron, c.neuron, rtol=1e-3, atol=0)
    # by hand: label of row n in batch i drawn with fold_in(fold_in(PRNGKey(seed), i), n)
    relabelled = []
    for i, bt in enumerate(batches):
        key = jax.random.fold_in(jax.random.PRNGKey(0), i)
        ys = []
        for n, ex in enumerate(rows([bt])):
            logits = ref_grad(model)(ones_masks(model.arch), ex, 0)[1]
            ys.append(int(jax.random.categorical(jax.random.fold_in(key, n), logits)))
        relabelled.append(dict(bt, labels=np.asarray(ys, np.int32)))
    ref, _ = loop_fisher(model, relabelled, "empirical")
    assert_close(a, ref, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])  # the batch's gradient whole, or added up chunk by chunk
def test_batch_estimator_is_released_code_semantics(model, batches, chunk_size):
    padded = [dict(b) for b in batches]
    junk = np.random.RandomState(5).randint(1, 99, T).astype(np.int32)
    padded[1] = dict(padded[1], weights=np.array([1, 1, 0, 1], np.float32))
    padded[1]["input_ids"] = padded[1]["input_ids"].copy()
    padded[1]["input_ids"][2] = junk  # a weight-0 row: anything goes
    fm = mask_fisher(model, padded, estimator="batch", progress=False, chunk_size=chunk_size)
    assert fm.num_examples == 3 * B - 1
    assert_close(fm, batch_mode_fisher(model, padded))


def test_regression_empirical_and_expected(reg_model):
    bs = [make_batch(s, regression=True) for s in range(2)]
    fm = mask_fisher(reg_model, bs, estimator="empirical", progress=False)
    ref, _ = loop_fisher(reg_model, bs, "empirical")
    assert_close(fm, ref)
    # Gaussian expected Fisher (d pred)^2 == MSE empirical 4 (pred - y)^2 (d pred)^2 when |pred - y| = 1/2
    half = []
    for b in bs:
        pred = np.asarray(reg_model(b["input_ids"], b["attention_mask"], b["token_type_ids"]))[:, 0]
        half.append(dict(b, labels=(pred + np.where(np.arange(B) % 2, 0.5, -0.5)).astype(np.float32)))
    fe = mask_fisher(reg_model, half, estimator="expected", noise_variance=1.0, progress=False)
    assert_close(fe, loop_fisher(reg_model, half, "empirical")[0], rtol=1e-4)
    fm_half = mask_fisher(reg_model, half, estimator="empirical", progress=False)
    assert_close(fe, {"head": fm_half.head, "neuron": fm_half.neuron}, rtol=1e-4)


def test_padding_rows_weigh_nothing(model, batches):
    """Rows 2 and 3 replaced by random garbage with weight 0: the Fisher of rows 0 and 1 alone."""
    rs = np.random.RandomState(7)
    dirty = []
    for b in batches:
        g = make_batch(int(rs.randint(100, 10_000)))
        d = {k: np.concatenate([b[k][:2], g[k][:2]]) for k in b}  # same shape: no new compile
        d["weights"] = np.array([1, 1, 0, 0], np.float32)
        dirty.append(d)
    fm = mask_fisher(model, dirty, estimator="empirical", progress=True)  # the progress-bar path too
    ref, n = loop_fisher(model, [{k: v[:2] for k, v in b.items()} for b in batches], "empirical")
    assert fm.num_examples == n == 6
    assert_close(fm, ref)


# ----------------------------------------------------------------------- validation
def test_errors_and_warnings(model, batches):
    with pytest.raises(FisherJaxError, match="no examples"):
        mask_fisher(model, [], progress=False)
    with pytest.raises(FisherJaxError, match="no examples"):
        mask_fisher(model, [dict(batches[0], weights=np.zeros(B, np.float32))], progress=False)
    with pytest.raises(FisherJaxError, match="unknown estimator"):
        mask_fisher(model, batches, estimator="fancy", progress=False)
    with pytest.raises(FisherJaxError, match="needs 'labels'"):
        mask_fisher(model, [{k: v for k, v in batches[0].items() if k != "labels"}], progress=False)
    with pytest.raises(FisherJaxError, match="outside 0..2"):
        mask_fisher(model, [dict(batches[0], labels=np.array([0, 1, 5, 2]))], progress=False)

    p = copy.deepcopy(model.params)
    p["body"]["encoder"]["layer"]["1"]["intermediate"]["dense"]["kernel"][0, 0] = np.nan
    with pytest.raises(FisherJaxError, match=r"not finite.*layer \d"):
        mask_fisher(model.replace(params=p), batches, progress=False)

    p = copy.deepcopy(model.params)
    p["head"]["classifier"]["kernel"][:] = 0.0  # logits = bias: no gradient reaches any mask
    with pytest.raises(FisherJaxError, match="zero everywhere"):
        mask_fisher(model.replace(params=p), batches, progress=False)

    p = copy.deepcopy(model.params)
    layer1 = p["body"]["encoder"]["layer"]["1"]
    layer1["attention"]["output"]["dense"]["kernel"][:] = 0.0  # heads of layer 1 feed nothing
    layer1["output"]["dense"]["kernel"][:] = 0.0  # neurons of layer 1 feed nothing
    with pytest.warns(UserWarning, match=r"layer 1 \(heads\), layer 1 \(neurons\)"):
        fm = mask_fisher(model.replace(params=p), batches, progress=False)
    assert not fm.head[1].any() and fm.head[0].any()


# ----------------------------------------------------------------------- full Fisher
@pytest.mark.parametrize("estimator", ["empirical", "expected"])
def test_full_fisher_equals_loop(model, batches, estimator):
    bs = copy.deepcopy(batches[:2])
    # Repeated tokens in one example (the word-embedding rows add up before squaring), and a token
    # shared by two examples (their squares add up).
    bs[0]["input_ids"][0, 1:5] = 7
    bs[0]["input_ids"][1, 2] = 7
    ids, am = bs[0]["input_ids"], bs[0]["attention_mask"]
    assert any(len(set(r[m > 0])) < int(m.sum()) for r, m in zip(ids, am))
    ff = full_fisher(model, bs, estimator=estimator, chunk_size=3, progress=False)  # 4 rows -> 2 chunks of 3
    assert set(ff) == {"body"} and ff.num_examples == 2 * B
    got = flatten(ff["body"])
    ref, _ = loop_fisher(model, bs, estimator, wrt="body")
    assert set(got) == set(ref)
    # atol from the global scale: some entries are 0 up to rounding (e.g. key biases: softmax is
    # shift-invariant), so a per-leaf relative test would compare float32 noise.
    top = max(np.abs(r).max() for r in ref.values())
    for k, r in ref.items():
        np.testing.assert_allclose(got[k], r, rtol=1e-4, atol=1e-6 * top, err_msg=k)
    assert "head" not in ff


@pytest.mark.parametrize("chunk_size", [4, 3])  # the whole batch at once; chunks of 3 (4 rows padded to 6)
def test_full_fisher_batch_mode_squares_the_batch_mean_gradient(model, batches, chunk_size):
    bs = [dict(b) for b in batches[:2]]
    bs[1] = dict(bs[1], weights=np.array([1, 0, 1, 1], np.float32))
    ff = full_fisher(model, bs, estimator="batch", chunk_size=chunk_size, progress=False)
    ref = batch_mode_fisher(model, bs, wrt="body")
    got = flatten(ff["body"])
    assert set(got) == set(ref) and ff.num_examples == 2 * B - 1
    top = max(np.abs(r).max() for r in ref.values())
    for k, r in ref.items():
        np.testing.assert_allclose(got[k], r, rtol=1e-4, atol=1e-6 * top, err_msg=k)


# ----------------------------------------------------------------------- PyTorch parity
@pytest.mark.torch
def test_empirical_matches_pytorch_hooks(tmp_path, batches):
    """Issue 4 "must show": per-example mask Fisher in PyTorch (pre-hooks on the output projections)."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    import fisher_jax as fj

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, num_labels=3)
    tm = tf.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # larger weights than the N(0, 0.02) init so the Fisher is not ~1e-10
        for p in tm.parameters():
            p.mul_(5.0)
    tm.save_pretrained(tmp_path)
    jm = fj.from_pretrained(str(tmp_path))

    L, H, I, d = 2, 4, 37, 8
    head_m = torch.ones(L, H, requires_grad=True)
    neuron_m = torch.ones(L, I, requires_grad=True)
    for l, layer in enumerate(tm.bert.encoder.layer):
        def head_hook(mod, args, l=l):  # input of attention.output.dense: concatenated head contexts
            x = args[0]
            return (x * head_m[l].repeat_interleave(d)[None, None, :],)

        def neuron_hook(mod, args, l=l):  # input of output.dense: FFN activations after GELU
            return (args[0] * neuron_m[l][None, None, :],)

        layer.attention.output.dense.register_forward_pre_hook(head_hook)
        layer.output.dense.register_forward_pre_hook(neuron_hook)

    acc_h, acc_n, n = np.zeros((L, H)), np.zeros((L, I)), 0
    for ex in rows(batches):
        out = tm(input_ids=torch.tensor(ex["input_ids"], dtype=torch.long),
                 attention_mask=torch.tensor(ex["attention_mask"], dtype=torch.long),
                 token_type_ids=torch.tensor(ex["token_type_ids"], dtype=torch.long))
        loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor(ex["labels"], dtype=torch.long))
        gh, gn = torch.autograd.grad(loss, [head_m, neuron_m])
        acc_h += gh.double().numpy() ** 2
        acc_n += gn.double().numpy() ** 2
        n += 1
    fm = mask_fisher(jm, batches, estimator="empirical", progress=False)
    np.testing.assert_allclose(fm.head, acc_h / n, rtol=1e-4, atol=1e-4 * (acc_h / n).max())
    np.testing.assert_allclose(fm.neuron, acc_n / n, rtol=1e-4, atol=1e-4 * (acc_n / n).max())


@pytest.mark.parametrize("rows", [3, 70])  # below and above the CPU policy's unrolled-sum limit (64)
def test_weighted_row_sum_matches_numpy_and_ignores_bad_padding(rows):
    from fisher_jax.backend import backend_policy
    from fisher_jax.stats.fisher import _weighted_row_sum

    limit = backend_policy("cpu").unrolled_rows
    assert (rows <= limit) == (rows == 3)
    rs = np.random.RandomState(rows)
    c = rs.rand(rows, 5, 7).astype(np.float32)
    w = (rs.rand(rows) > 0.3).astype(np.float32) * rs.rand(rows).astype(np.float32)
    w[0] = 0.0
    c[0] = np.nan  # a padding row's NaN or inf must not leak into the sum
    c[0, 0, 0] = np.inf
    want = np.einsum("n,n...->...", np.where(w > 0, w, 0), np.where(w[:, None, None] > 0, c, 0))
    got = np.asarray(jax.jit(_weighted_row_sum, static_argnums=2)(w, c, limit))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    reduced = np.asarray(jax.jit(_weighted_row_sum, static_argnums=2)(w, c, 0))  # a policy without unrolling
    np.testing.assert_allclose(reduced, want, rtol=1e-5, atol=1e-6)


def test_backend_policies_and_keyword_only_entry_points(model, batches):
    """One frozen policy per platform; every argument after ``batches`` is a keyword."""
    import dataclasses as dc

    from fisher_jax.backend import POLICIES, backend_policy, policy_for_mesh
    from fisher_jax.parallel import data_mesh
    from fisher_jax.stats import gram_stats
    from fisher_jax.stats.fisher import default_mask_chunk

    assert backend_policy("cpu").mask_chunk == 4 and backend_policy("cpu").rng_impl == "threefry2x32"
    assert backend_policy("cuda") is POLICIES["gpu"] and POLICIES["gpu"].mask_chunk is None
    assert POLICIES["tpu"].rng_impl == "rbg"
    assert policy_for_mesh(data_mesh()) is backend_policy() is POLICIES["cpu"]  # the tests run on CPU
    assert default_mask_chunk(data_mesh()) == 4
    with pytest.raises(dc.FrozenInstanceError):
        POLICIES["cpu"].mask_chunk = 8  # type: ignore[misc]
    with pytest.raises(FisherJaxError, match="did you mean 'gpu'"):
        backend_policy("gpux")
    for fn, positional in ((mask_fisher, "empirical"), (full_fisher, "expected"), (gram_stats, True)):
        with pytest.raises(TypeError, match="positional"):
            fn(model, batches, positional)
    with pytest.raises(FisherJaxError, match="did you mean 'sampled'"):
        mask_fisher(model, batches, estimator="sampeld", progress=False)


def test_first_occurrence_sum_matches_dense_table_gradient():
    """Scattering the squares of ``first_occurrence_sum`` to ``ids`` gives the dense per-example table gradient's squares."""
    from fisher_jax.stats.fisher import first_occurrence_sum

    rs = np.random.RandomState(0)
    ids = np.array([5, 2, 5, 0, 0, 0, 2, 5, 9], np.int32)
    d = rs.randn(len(ids), 3).astype(np.float32)
    out = np.asarray(jax.jit(first_occurrence_sum)(d, ids))
    dense = np.zeros((12, 3), np.float64)
    np.add.at(dense, ids, d.astype(np.float64))  # G[v] = sum_{t: ids[t] = v} d[t]
    np.testing.assert_allclose(out[[0, 1, 3, 8]], dense[[5, 2, 0, 9]], rtol=1e-6, atol=1e-6)
    assert not out[[2, 4, 5, 6, 7]].any()  # later occurrences hold nothing
    sq = np.zeros((12, 3))
    np.add.at(sq, ids, out.astype(np.float64) ** 2)
    np.testing.assert_allclose(sq, dense ** 2, rtol=1e-5, atol=1e-6)
