"""Every registered family against transformers (issue #22), parameterised over the registry.

Tiny random transformers models (2 layers, hidden 32, FFN 37) saved with ``save_pretrained``:
logits within 1e-5 on padded batches (left and right padding for decoders), export back and
reload in PyTorch; mask nodes equal forward pre-hooks on the PyTorch model; mask Fisher, full
Fisher and Grams equal the PyTorch reference (``fisher_jax.reference.torch``) on a few families
chosen to cover every code path (fused c_attn, q/k/v biases, grouped-query attention with a
sliding window); every merge method runs; checkpoint kinds of issue #21 item 3.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import fisher_jax as fj
from fisher_jax import tree
from fisher_jax.errors import FisherJaxError
from fisher_jax.models import convert
from fisher_jax.models.families import REGISTRY

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")
rt = pytest.importorskip("fisher_jax.reference.torch")

pytestmark = pytest.mark.torch

ALL = list(REGISTRY)
DECODERS = [mt for mt in ALL if REGISTRY[mt].torch.causal]
# The statistics' and merges' heavy checks: GPT-2 (fused c_attn, Conv1D, learned positions) and
# Mistral (rotary, one kv head for four query heads, a sliding window shorter than the batch).
HEAVY = ["gpt2", "mistral", "deberta", "deberta-v2"]
EVERY_METHOD = "mistral"  # every merge method on its gated, grouped-query body (the CPU budget allows one)
VOCAB, T = 99, 10


def tiny_config(model_type: str, num_labels: int = 3):
    """2 layers, 4 (query) heads, hidden 32, FFN 37 (odd on purpose) of every family."""
    common = dict(vocab_size=VOCAB, max_position_embeddings=64, num_labels=num_labels)
    enc = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, **common)
    roberta = dict(type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    dec = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, pad_token_id=0,
               bos_token_id=1, eos_token_id=2, **common)
    make = {
        "bert": lambda: tf.BertConfig(type_vocab_size=2, **enc),
        "roberta": lambda: tf.RobertaConfig(**roberta, **enc),
        "xlm-roberta": lambda: tf.XLMRobertaConfig(**roberta, **enc),
        "electra": lambda: tf.ElectraConfig(embedding_size=16, **enc),
        "distilbert": lambda: tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, **common),
        # Relative attention with both terms; spans shorter than T = 10 so the index clipping matters.
        # v1: raw distances, absolute positions too, token types; v2 as v3: log buckets, shared
        # key projections, LayerNormed relative table, no absolute positions.
        "deberta": lambda: tf.DebertaConfig(type_vocab_size=2, relative_attention=True, max_relative_positions=6,
                                            pos_att_type=["c2p", "p2c"], **enc),
        "deberta-v2": lambda: tf.DebertaV2Config(
            relative_attention=True, position_buckets=4, max_relative_positions=8, pos_att_type=["p2c", "c2p"],
            share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, **enc),
        # Layer 0 global, layer 1 local (|i - j| <= 2 at T = 10).
        "modernbert": lambda: tf.ModernBertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, local_attention=4,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, **common),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=37,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=num_labels),
        "llama": lambda: tf.LlamaConfig(num_key_value_heads=2, **dec),
        "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2, **dec),
        "mistral": lambda: tf.MistralConfig(num_key_value_heads=1, head_dim=8, sliding_window=4, **dec),
    }
    return make[model_type]()


def torch_model(model_type: str, num_labels: int = 3, seed: int = 0, perturb: int = 0):
    """A random transformers classifier, weights scaled up so that a mismatch cannot hide in ~0 logits;
    ``perturb`` adds a seed-dependent shift (two "fine-tunes" of one base)."""
    torch.manual_seed(seed)
    model = tf.AutoModelForSequenceClassification.from_config(tiny_config(model_type, num_labels)).eval()
    gen = torch.Generator().manual_seed(1000 + perturb)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0 if p.dim() > 1 else 1.0).add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def batch(model_type: str, side: str = "right", size: int = 4, seed: int = 0, pad_id: int = 0):
    """Ragged padding on ``side``; two segments for the families with token types."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, VOCAB, (size, T)).astype(np.int32)
    lengths = np.linspace(T, 3, size).astype(int)
    pos = np.arange(T)[None, :]
    am = ((pos < lengths[:, None]) if side == "right" else (pos >= T - lengths[:, None])).astype(np.int32)
    ids[am == 0] = pad_id
    tt = np.zeros_like(ids)
    if REGISTRY[model_type].torch.token_types and model_type not in ("roberta", "xlm-roberta"):
        tt = ((pos >= lengths[:, None] // 2) * am).astype(np.int32)
    return ids, am, tt


def torch_logits(pt, model_type, ids, am, tt):
    kw = {"attention_mask": torch.tensor(am, dtype=torch.long)}
    if REGISTRY[model_type].torch.token_types:
        kw["token_type_ids"] = torch.tensor(tt, dtype=torch.long)
    with torch.no_grad():
        return pt(torch.tensor(ids, dtype=torch.long), **kw).logits.numpy()


_PAIRS: dict = {}


def pair(model_type, tmp_path_factory, num_labels: int = 3, perturb: int = 0):
    """(torch model, the same weights loaded with fj.from_pretrained), cached for the session."""
    key = (model_type, num_labels, perturb)
    if key not in _PAIRS:
        pt = torch_model(model_type, num_labels, perturb=perturb)
        folder = tmp_path_factory.mktemp(f"{model_type}{num_labels}p{perturb}")
        pt.save_pretrained(folder)
        _PAIRS[key] = (pt, fj.from_pretrained(folder), folder)
    return _PAIRS[key]


def _sides(model_type):
    return ["right", "left"] if model_type in DECODERS else ["right"]


# ----------------------------------------------------------------------------- registry
def test_registry_lists_every_supported_type_once():
    assert tuple(REGISTRY) == fj.models.SUPPORTED_MODEL_TYPES
    for mt, fam in REGISTRY.items():
        assert fam.model_type == mt and fam.hf_class.endswith("ForSequenceClassification")
        assert hasattr(tf, fam.hf_class), fam.hf_class


@pytest.mark.parametrize("model_type", ALL)
def test_every_body_parameter_has_a_role_and_a_unique_hf_tensor(model_type):
    from fisher_jax.models.layout import param_role

    from fisher_jax.models.model import param_shapes

    body = tree.flatten(param_shapes(fj.models.ArchConfig.from_hf(tiny_config(model_type)))["body"])
    roles = {param_role(p).role for p in body}
    assert {"query", "key", "value", "attn_out", "attn_ln", "ffn_in", "ffn_out", "ffn_ln", "embeddings"} <= roles
    refs = [REGISTRY[model_type].hf_ref("body/" + p) for p in body]
    assert len({(r.key, r.part) for r in refs}) == len(refs)  # no two leaves write one slice


# ------------------------------------------------------------------------ logits both ways
@pytest.mark.parametrize("model_type", ALL)
def test_logits_match_transformers_and_export_reloads(model_type, tmp_path_factory):
    pt, model, _ = pair(model_type, tmp_path_factory)
    out_dir = tmp_path_factory.mktemp(f"{model_type}-export")
    model.save_pretrained(out_dir)
    assert json.loads((out_dir / "config.json").read_text())["architectures"] == [REGISTRY[model_type].hf_class]
    back = tf.AutoModelForSequenceClassification.from_pretrained(out_dir).eval()
    for side in _sides(model_type):
        ids, am, tt = batch(model_type, side, pad_id=pt.config.pad_token_id or 0)
        ref = torch_logits(pt, model_type, ids, am, tt)
        assert np.abs(ref).max() > 0.1  # not two near-zero arrays
        np.testing.assert_allclose(np.asarray(model(ids, am, tt)), ref, atol=1e-5, rtol=1e-5, err_msg=side)
        np.testing.assert_allclose(torch_logits(back, model_type, ids, am, tt), ref, atol=1e-5, rtol=1e-5)


def _scaled_round_trip(pt, folder):
    """Scale ``pt``'s matrices up (so a mismatch cannot hide under init noise), save it, load it in JAX."""
    with torch.no_grad():
        for p in pt.parameters():
            p.mul_(6.0 if p.dim() > 1 else 1.0).add_(0.05 * torch.randn_like(p))
    pt.save_pretrained(folder)
    return fj.from_pretrained(folder)


def test_modernbert_mean_pooling_with_biases_matches_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config("modernbert")
    cfg.classifier_pooling, cfg.norm_bias, cfg.attention_bias, cfg.mlp_bias = "mean", True, True, True
    pt = tf.AutoModelForSequenceClassification.from_config(cfg).eval()
    model = _scaled_round_trip(pt, tmp_path)
    assert model.arch.pooling == "mean" and model.arch.layer_windows == (0, 2)
    ids, am, tt = batch("modernbert")
    ref = torch_logits(pt, "modernbert", ids, am, tt)
    np.testing.assert_allclose(np.asarray(model(ids, am)), ref, atol=1e-5, rtol=1e-5)


def test_deberta_v2_own_position_projections_and_embedding_projection_match_transformers(tmp_path):
    """The v2 paths the tiny v3-style config does not take: pos_key_proj / pos_query_proj (no
    share_att_key), raw distances (no buckets), absolute positions, token types, embed_proj."""
    torch.manual_seed(0)
    cfg = tf.DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                             vocab_size=VOCAB, max_position_embeddings=64, num_labels=3, embedding_size=16,
                             type_vocab_size=2, relative_attention=True, max_relative_positions=6,
                             pos_att_type=["c2p", "p2c"])
    pt = tf.AutoModelForSequenceClassification.from_config(cfg).eval()
    model = _scaled_round_trip(pt, tmp_path)
    assert "pos_key_proj" in model.params["body"]["encoder"]["layer"]["0"]["attention"]["self"]
    ids, am, tt = batch("deberta-v2")
    tt = ((np.arange(T)[None, :] >= 3) * am).astype(np.int32)
    ref = torch_logits(pt, "deberta-v2", ids, am, tt)
    np.testing.assert_allclose(np.asarray(model(ids, am, tt)), ref, atol=1e-5, rtol=1e-5)


def test_deberta_relative_indices_and_log_buckets_match_hand_values():
    from fisher_jax.models.deberta import log_bucket_position, relative_indices
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    r = np.arange(-9, 10)
    # mid 2, max 8: |r| <= 2 kept, else ceil(log(|r| / 2) / log(3.5)) + 2, with the sign of r.
    want = np.sign(r) * np.array([0, 1, 2, 3, 3, 3, 3, 3, 4, 4])[abs(r)]
    np.testing.assert_array_equal(log_bucket_position(r, 4, 8), want)
    wide = np.arange(-600, 601)  # DeBERTa-v3's buckets 256, max 512
    np.testing.assert_array_equal(log_bucket_position(wide, 256, 512),
                                  make_log_bucket_position(torch.tensor(wide), 256, 512).numpy())
    v1 = fj.models.ArchConfig.from_hf(tiny_config("deberta"))  # span min(T, 6) = 6, raw distances
    c2p, p2c = relative_indices(v1, np.arange(T), T)
    np.testing.assert_array_equal(c2p[0], [6, 5, 4, 3, 2, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(c2p[9], [11, 11, 11, 11, 11, 10, 9, 8, 7, 6])
    np.testing.assert_array_equal(p2c, c2p)  # odd delta: -delta(j - i) = delta(i - j)
    v2 = fj.models.ArchConfig.from_hf(tiny_config("deberta-v2"))  # span 4 (buckets), 8 rows
    c2p0, _ = relative_indices(v2, np.arange(1), T)  # the last layer's token-0 row alone
    np.testing.assert_array_equal(c2p0[0], [4, 3, 2, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(relative_indices(v2, np.arange(T), T)[0][:1], c2p0)


def test_deberta_v1_in_proj_splits_per_head_and_round_trips(tmp_path_factory):
    """in_proj rows are [q_h | k_h | v_h] for each head h; q_bias / v_bias are the q / v biases."""
    pt, model, _ = pair("deberta", tmp_path_factory)
    sd = rt.state_dict_numpy(pt)
    key = "deberta.encoder.layer.1.attention.self."
    w = sd[key + "in_proj.weight"].reshape(4, 3, 8, 32)  # [H, q|k|v, d, hidden]
    att = model.params["body"]["encoder"]["layer"]["1"]["attention"]["self"]
    for j, name in enumerate(("query_proj", "key_proj", "value_proj")):
        np.testing.assert_array_equal(np.asarray(att[name]["kernel"]), w[:, j].reshape(32, 32).T, err_msg=name)
    assert "bias" not in att["key_proj"]
    np.testing.assert_array_equal(np.asarray(att["query_proj"]["bias"]), sd[key + "q_bias"])
    np.testing.assert_array_equal(np.asarray(att["value_proj"]["bias"]), sd[key + "v_bias"])
    back = fj.models.state_dict(model)
    assert set(back) == set(sd)
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_read_index_is_the_last_real_token_on_either_side():
    """transformers' rule: the rightmost id != pad (left and right padding alike)."""
    import dataclasses

    from fisher_jax.models.decoder import read_index

    arch = fj.models.ArchConfig.from_hf(tiny_config("llama"))
    ids = np.array([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(read_index(arch, ids)), [2, 4, 4, 0])
    np.testing.assert_array_equal(np.asarray(read_index(arch, ids[0])), 2)  # one unbatched row
    no_pad = dataclasses.replace(arch, read_pad_id=-1)  # then the attention mask says which tokens are real
    np.testing.assert_array_equal(np.asarray(read_index(no_pad, ids)), [4] * 4)
    np.testing.assert_array_equal(np.asarray(read_index(no_pad, ids, (ids != 0).astype(np.int32))), [2, 4, 4, 0])


# ----------------------------------------------------------------------------- mask nodes
@pytest.mark.parametrize("model_type", ALL)
def test_zero_head_and_neuron_masks_equal_torch_hooks(model_type, tmp_path_factory):
    pt, model, _ = pair(model_type, tmp_path_factory)
    L_, H, I = rt.geometry(pt)
    assert (L_, H, I) == (2, 4, 37)
    ids, am, tt = batch(model_type, _sides(model_type)[-1], pad_id=pt.config.pad_token_id or 0)
    plain = np.asarray(model(ids, am, tt))
    for kind, where in (("head", (1, 2)), ("neuron", (0, 5))):
        head, neuron = np.ones((L_, H), np.float32), np.ones((L_, I), np.float32)
        (head if kind == "head" else neuron)[where] = 0.0
        ours = np.asarray(model(ids, am, tt, masks={"head": head, "neuron": neuron}))
        with rt.MaskHooks(pt, torch.tensor(head), torch.tensor(neuron)):
            ref = torch_logits(pt, model_type, ids, am, tt)
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5, err_msg=kind)
        assert np.abs(ours - plain).max() > 1e-4, kind  # the zeroed node mattered


# ------------------------------------------------------------------------------ statistics
def _batches(model_type, num_labels=3, pad_id=0):
    out = []
    for s, side in enumerate(_sides(model_type) * (2 // len(_sides(model_type)))):
        ids, am, tt = batch(model_type, side, size=6, seed=s, pad_id=pad_id)
        labels = np.random.RandomState(100 + s).randint(0, num_labels, 6).astype(np.int32)
        w = np.ones(6, np.float32)
        w[-1] = 0.0 if s == 1 else 1.0
        out.append({"input_ids": ids, "attention_mask": am, "token_type_ids": tt, "labels": labels, "weights": w})
    return out


def _rel(ours, ref, rtol, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, what
    scale = np.abs(ref).max()
    assert scale > 0, what
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * 1e-2 * scale, err_msg=what)


_STATS: dict = {}


def _three(batches):
    return [{k: v[:3] for k, v in batches[0].items()}]


def stats(model_type, tmp_path_factory, perturb=0):
    """Our mask Fisher, full Fisher (3 examples) and Grams of one tiny model, cached for the session."""
    key = (model_type, perturb)
    if key not in _STATS:
        pt, model, _ = pair(model_type, tmp_path_factory, perturb=perturb)
        batches = _batches(model_type, pad_id=pt.config.pad_token_id or 0)
        _STATS[key] = {
            "batches": batches,
            "mask_fisher": fj.mask_fisher(model, batches, estimator="empirical", progress=False),
            "full_fisher": fj.full_fisher(model, _three(batches), estimator="empirical", progress=False),
            "gram": fj.gram_stats(model, batches, progress=False),
        }
    return _STATS[key]


@pytest.mark.parametrize("model_type", HEAVY)
def test_statistics_equal_the_torch_reference(model_type, tmp_path_factory):
    pt, model, _ = pair(model_type, tmp_path_factory)
    ours = stats(model_type, tmp_path_factory)
    batches = ours["batches"]
    ref = rt.mask_fisher(pt, batches, estimator="empirical", method="vmap")
    assert ours["mask_fisher"].num_examples == ref.num_examples == 11
    _rel(ours["mask_fisher"].head, ref.head, 1e-4, "mask Fisher head")
    _rel(ours["mask_fisher"].neuron, ref.neuron, 1e-4, "mask Fisher neuron")

    ff_ref = rt.full_fisher(pt, _three(batches), estimator="empirical")
    ours_hf = convert.to_hf_state(model.arch, {"body": ours["full_fisher"]["body"]})
    assert set(ours_hf) == set(ff_ref)  # fused c_attn: our q/k/v Fishers side by side
    for k in ff_ref:
        _rel(ours_hf[k], ff_ref[k], 1e-4, k)

    g, g_ref = ours["gram"], rt.gram_stats(pt, batches)
    assert set(g) == set(g_ref) and (g.num_tokens, g.num_examples) == (g_ref.num_tokens, g_ref.num_examples)
    for k in g_ref:
        _rel(g[k], g_ref[k], 1e-4, k)  # layer 2's inputs differ by float32 rounding


# --------------------------------------------------------------------------------- merges
@pytest.mark.parametrize("model_type", HEAVY)
def test_every_merge_method_runs_and_node_merges_equal_the_reference(model_type, tmp_path_factory):
    """Every method of fisher_jax.merging.METHODS on two tiny models; Fisher-node merges (both
    mappings) and RegMean equal the PyTorch reference's on HF state dicts (GPT-2: fused c_attn)."""
    from fisher_jax.merging import METHODS
    from fisher_jax.merging.registry import REGISTRY as MERGES

    (pa, a, _), (pb, b, _) = (pair(model_type, tmp_path_factory, perturb=p) for p in (0, 1))
    sa, sb = (stats(model_type, tmp_path_factory, p) for p in (0, 1))
    flat_b = tree.flatten(b.params["body"])
    base = a.replace(params={**a.params, "body": tree.unflatten(
        {k: 0.5 * (v + flat_b[k]) for k, v in tree.flatten(a.params["body"]).items()})})
    probe = batch(model_type)[:2]
    for name in METHODS if model_type == EVERY_METHOD else ("simple",):
        kw = {}
        for st in MERGES[name].statistics:
            if st.kind == "base":
                kw[st.keyword] = base
            elif st.kind == "batches":  # one batch per task: these methods only need to run here
                kw[st.keyword] = [sa["batches"][:1], sb["batches"][:1]]
            elif st.kind in ("mask_fisher", "full_fisher", "gram"):
                kw[st.keyword] = [sa[st.kind], sb[st.kind]]
        if name == "adamerging":
            kw["steps"] = 2  # the optimiser loop runs the same in two Adam steps as in the default ten
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = fj.merge(name, [a, b], **kw)
        body = tree.flatten(merged[0].params["body"])
        assert set(body) == set(tree.flatten(a.params["body"])), name
        assert all(np.all(np.isfinite(np.asarray(v))) for v in body.values()), name
        assert np.all(np.isfinite(np.asarray(merged[1](*probe)))), name

    sds = [rt.state_dict_numpy(pa), rt.state_dict_numpy(pb)]
    fishers = [sa["mask_fisher"], sb["mask_fisher"]]
    for mapping in ("reference", "node"):
        ours = fj.models.state_dict(fj.merge("fisher_nodes", [a, b], fishers=fishers, mapping=mapping)[0])
        ref = rt.state_dict_numpy(rt.fisher_nodes_merge(sds, fishers, mapping=mapping)[0])
        for k in ref:
            np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=f"{mapping} {k}")
    grams = [sa["gram"], sb["gram"]]
    ours = fj.models.state_dict(fj.merge("regmean", [a, b], grams=grams, alpha=0.9)[0])
    ref = rt.state_dict_numpy(rt.regmean_merge(sds, grams, alpha=0.9)[0])
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-4, atol=1e-4 * max(np.abs(ref[k]).max(), 1e-12), err_msg=k)


def test_gqa_key_value_node_weights_are_the_mean_of_their_query_heads(tmp_path_factory):
    """Mistral tiny: 4 query heads share one kv head of size 8; Llama tiny: 2 groups of 2."""
    from fisher_jax.merging.fisher_nodes import node_weights

    from fisher_jax.models.model import param_shapes

    for model_type, groups in (("mistral", 4), ("llama", 2)):
        arch = fj.models.ArchConfig.from_hf(tiny_config(model_type))
        body = jax_tree_zeros(param_shapes(arch)["body"])
        head = np.arange(1, 9, dtype=np.float32).reshape(2, 4)
        neuron = np.random.RandomState(0).uniform(0.1, 1, (2, 37)).astype(np.float32)
        w = tree.flatten(node_weights(body, fj.MaskFisher(head, neuron, 1), mapping="node"))
        d = arch.head_dim
        kv = np.repeat(head[1].reshape(-1, groups).mean(axis=1), d)  # numpy: mean over each group
        for leaf in ("k_proj", "v_proj"):
            np.testing.assert_allclose(w[f"layers/1/self_attn/{leaf}/kernel"], kv)
        np.testing.assert_allclose(w["layers/1/self_attn/q_proj/kernel"], np.repeat(head[1], d))
        np.testing.assert_allclose(w["layers/1/self_attn/o_proj/kernel"], np.repeat(head[1], d)[:, None])
        for leaf in ("gate_proj", "up_proj"):
            np.testing.assert_allclose(w[f"layers/0/mlp/{leaf}/kernel"], neuron[0])
        np.testing.assert_allclose(w["layers/0/mlp/down_proj/kernel"], neuron[0][:, None])
        universal = np.mean(head.mean(1) + neuron.mean(1))
        np.testing.assert_allclose(w["norm/scale"], universal, rtol=1e-6)


def jax_tree_zeros(shapes):
    return tree.unflatten({k: np.zeros(v.shape, np.float32) for k, v in tree.flatten(shapes).items()})


# --------------------------------------------------------------------- checkpoint kinds (#21)
@pytest.mark.parametrize("dtype,tol", [("float16", 2e-2), ("bfloat16", 1.5e-1)])
def test_half_precision_safetensors_load_in_float32_and_export_in_their_dtype(dtype, tol, tmp_path_factory):
    pt, model, _ = pair("llama", tmp_path_factory)
    import copy

    half = tmp_path_factory.mktemp(dtype)
    copy.deepcopy(pt).to(getattr(torch, dtype)).save_pretrained(half)
    loaded = fj.from_pretrained(half)
    assert loaded.source_dtype == dtype
    assert all(np.asarray(v).dtype == np.float32 for v in tree.flatten(loaded.params).values())
    # Weights are exactly the rounded ones, widened.
    key = "model.layers.0.mlp.up_proj.weight"
    want = pt.state_dict()[key].to(getattr(torch, dtype)).float().numpy()
    np.testing.assert_array_equal(convert.to_hf_state(loaded.arch, loaded.params)[key], want)
    ids, am, tt = batch("llama")
    assert np.abs(np.asarray(loaded(ids, am)) - np.asarray(model(ids, am))).max() < tol
    out = tmp_path_factory.mktemp(dtype + "-out")
    loaded.save_pretrained(out, dtype="source")
    assert convert.read_safetensors(out / "model.safetensors")[1] == {dtype}
    back = tf.AutoModelForSequenceClassification.from_pretrained(out).float().eval()
    np.testing.assert_allclose(torch_logits(back, "llama", ids, am, tt), np.asarray(loaded(ids, am)), atol=1e-4)
    np.testing.assert_array_equal(fj.models.state_dict(fj.from_pretrained(out))[key], want)
    loaded.save_pretrained(out, dtype="float32")
    assert fj.from_pretrained(out).source_dtype == "float32"
    with pytest.raises(FisherJaxError, match="unknown export dtype 'float8'"):
        loaded.save_pretrained(out, dtype="float8")


def test_pytorch_model_bin_loads_and_says_so_without_torch(tmp_path, monkeypatch, tmp_path_factory):
    pt, model, folder = pair("gpt2", tmp_path_factory)
    pt.config.save_pretrained(tmp_path)
    torch.save(pt.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = fj.from_pretrained(tmp_path)
    ids, am, tt = batch("gpt2", "left")
    np.testing.assert_allclose(np.asarray(loaded(ids, am)), np.asarray(model(ids, am)), atol=1e-6)
    import sys

    from fisher_jax.models import hub

    config = hub._read_config(tmp_path, None)  # transformers' config itself imports torch when present
    monkeypatch.setattr(hub, "_read_config", lambda folder, num_labels: config)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(FisherJaxError, match="only pytorch_model.bin: install torch"):
        fj.from_pretrained(tmp_path)


def test_missing_relative_folder_says_no_such_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path in ("runs/sst2", "./sst2", "runs/a/b"):
        with pytest.raises(FisherJaxError, match=f"no such folder '{path}'") as err:
            fj.from_pretrained(path)
        assert "Hub" not in str(err.value)


@pytest.mark.parametrize("model_type,option,value", [
    ("bert", "position_embedding_type", "relative_key"),
    ("roberta", "problem_type", "multi_label_classification"),
    ("gpt2", "scale_attn_by_inverse_layer_idx", True),
    ("llama", "rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    ("deberta-v2", "conv_kernel_size", 3),
    ("deberta", "talking_head", True),
])
def test_unimplemented_config_options_are_one_line_errors(model_type, option, value, tmp_path, tmp_path_factory):
    import shutil

    folder = pair(model_type, tmp_path_factory)[2]
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, tmp_path / name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[option] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FisherJaxError, match=f"config option {option.split('_')[0]}") as err:
        fj.from_pretrained(tmp_path)
    assert "\n" not in str(err.value)


def test_gpt2_hub_layout_without_prefix_and_with_mask_buffers_loads_its_body(tmp_path, tmp_path_factory):
    """The Hub's ``gpt2`` (FusionBench's base) stores ``h.0...``/``wte`` without ``transformer.``,
    no score head, and old ``attn.bias`` causal-mask buffers."""
    pt, model, folder = pair("gpt2", tmp_path_factory)
    state = {k.removeprefix("transformer."): v.numpy() for k, v in pt.state_dict().items() if k != "score.weight"}
    state["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    convert.write_safetensors(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.warns(UserWarning, match="fresh head"):
        loaded = fj.from_pretrained(tmp_path)
    for k, v in tree.flatten(model.params["body"]).items():
        np.testing.assert_array_equal(tree.flatten(loaded.params["body"])[k], v, err_msg=k)
