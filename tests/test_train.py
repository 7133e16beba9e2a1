"""fisher_jax.train: fine-tuning (loss goes down, resume after a kill is exact), evaluation, errors.

Tiny random BERTs (hidden 32, 2 layers, 4 heads, FFN 37) with the real MiniLM vocabulary and
tokenizer, trained on small slices of the local GLUE copy; one padded length per run keeps
compilation to a couple of shapes.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from fisher_jax import tree
from fisher_jax.errors import FisherJaxError

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=128)


def tiny_model(num_labels: int, seed: int = 0):
    from transformers import BertConfig

    from fisher_jax.models.hub import from_config

    return from_config(BertConfig(**TINY), num_labels=num_labels, seed=seed)


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from fisher_jax.models.hub import load_tokenizer

    return load_tokenizer(minilm_path)


def _config(glue_dir, **kw):
    from fisher_jax.train.finetune import FinetuneConfig

    base = dict(glue_dir=str(glue_dir), batch_size=16, max_length=32, buckets=(32,), log_every=2,
                eval_batch_size=64, max_eval_examples=64)
    base.update(kw)
    return FinetuneConfig(**base)


def test_finetune_lowers_loss_saves_and_resumes_exactly(tmp_path, glue_dir, tokenizer, monkeypatch):
    from fisher_jax.models.hub import from_pretrained
    from fisher_jax.train import finetune as ft

    kw = dict(task="sst2", learning_rate=5e-3, num_epochs=4, max_train_examples=256, dropout=True,
              checkpoint_every=10, seed=3, held_out_examples=40)
    cfg_a = _config(glue_dir, output_dir=str(tmp_path / "a"), **kw)
    model_a, hist_a = ft.finetune(cfg_a, model=tiny_model(2), tokenizer=tokenizer, progress=False)

    # training works: the loss goes down; one held-out evaluation per epoch; the best one is kept
    # and only that model is scored on dev
    losses = [r["loss"] for r in hist_a["train"]]
    assert hist_a["total_steps"] == 4 * 16 and hist_a["steps_per_epoch"] == 16 and hist_a["resumed_from"] is None
    assert np.mean(losses[-4:]) < losses[0] - 0.15, losses
    assert [e["step"] for e in hist_a["eval"]] == [16, 32, 48, 64]
    assert hist_a["best"] == max(hist_a["eval"], key=lambda e: e["score"])
    assert hist_a["final_eval"]["step"] == hist_a["best"]["step"] and hist_a["final_eval"]["split"] == "dev"
    assert hist_a["final_eval"]["num_examples"] == 64
    assert hist_a["held_out"] == {"rows": 40, "seed": 0, "num_train_rows": 67349}
    assert hist_a["train_examples_per_s"] > 0 and hist_a["trained_examples"] == 4 * 256

    # the output folder is a Hugging Face model folder holding exactly the returned parameters
    out = tmp_path / "a"
    for name in ("config.json", "model.safetensors", "finetune_history.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    reloaded = tree.flatten(from_pretrained(out).params)
    for name, value in tree.flatten(model_a.params).items():
        np.testing.assert_array_equal(reloaded[name], value, err_msg=name)
    # its outputs follow the task's label ids, and config.json names them so (label_order reads it)
    from fisher_jax.data.glue import get_task

    names = get_task("sst2").label_names
    assert json.loads((out / "config.json").read_text())["id2label"] == {str(i): n for i, n in enumerate(names)}
    saved = json.loads((out / "finetune_history.json").read_text())
    assert saved["config"]["task"] == "sst2" and saved["history"]["total_steps"] == 64

    # the same run "killed" while fetching the batch of step 26 (last checkpoint: step 20), then
    # started again: it resumes at step 20 and ends with the uninterrupted run's parameters
    real = ft._train_batch
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 25:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    cfg_b = _config(glue_dir, output_dir=str(tmp_path / "b"), **kw)
    monkeypatch.setattr(ft, "_train_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(cfg_b, model=tiny_model(2), tokenizer=tokenizer, progress=False)
    assert not (tmp_path / "b" / "model.safetensors").exists()
    monkeypatch.setattr(ft, "_train_batch", real)
    model_b, hist_b = ft.finetune(cfg_b, model=tiny_model(2), tokenizer=tokenizer, progress=False)
    assert hist_b["resumed_from"] == 20 and hist_b["trained_examples"] == 44 * 16
    assert hist_b["eval"] == hist_a["eval"] and hist_b["best"] == hist_a["best"]
    steps = lambda h: [r["step"] for r in h["train"]]  # noqa: E731
    assert steps(hist_b) == steps(hist_a)
    assert [r["loss"] for r in hist_b["train"]] == pytest.approx(losses, abs=1e-6)
    for name, value in tree.flatten(model_a.params).items():
        np.testing.assert_allclose(tree.flatten(model_b.params)[name], value, rtol=0, atol=1e-6, err_msg=name)

    # a finished run started again restores its last checkpoint and trains no further
    model_c, hist_c = ft.finetune(cfg_a, model=tiny_model(2), tokenizer=tokenizer, progress=False)
    assert hist_c["resumed_from"] == 64 and hist_c["trained_examples"] == 0
    for name, value in tree.flatten(model_a.params).items():
        np.testing.assert_array_equal(tree.flatten(model_c.params)[name], value, err_msg=name)

    # a checkpoint of another configuration is refused, not silently continued
    with pytest.raises(FisherJaxError, match="learning_rate"):
        ft.finetune(_config(glue_dir, output_dir=str(tmp_path / "b"), **{**kw, "learning_rate": 2e-3}),
                    model=tiny_model(2), tokenizer=tokenizer, progress=False)


def test_evaluate_counts_every_dev_row_once(tmp_path, glue_dir, minilm_path):
    from fisher_jax.data.batching import batches, encode
    from fisher_jax.data.glue import load_split
    from fisher_jax.data.metrics import compute_metrics
    from fisher_jax.models.hub import load_tokenizer
    from fisher_jax.train.evaluate import evaluate, predict

    folder = tmp_path / "rte_model"
    tiny_model(2, seed=1).save_pretrained(folder, tokenizer_from=minilm_path)
    result = evaluate(str(folder), "RTE", glue_dir=str(glue_dir), batch_size=64, max_length=32)
    assert {"accuracy", "score", "num_examples", "examples_per_s", "seconds"} <= set(result)
    assert result["num_examples"] == 277 and result["split"] == "dev"  # 277 = 4 * 64 + 21 padded rows

    # the same numbers from unsorted batches through predict(): order and padding do not matter
    from fisher_jax.models.hub import from_pretrained

    model = from_pretrained(folder)
    enc = encode(load_tokenizer(folder), load_split("rte", "dev", glue_dir), 32)
    logits, labels, weights = predict(model, batches(enc, 64, buckets=(32,)))
    assert logits.shape == (320, 2) and weights.sum() == 277 and weights[-43:].sum() == 0
    assert compute_metrics("rte", logits, labels, weights)["accuracy"] == pytest.approx(result["accuracy"], abs=1e-9)

    # a batch without weights counts every row
    _, _, w = predict(model, [{k: v for k, v in next(iter(batches(enc, 8, buckets=(32,)))).items() if k != "weights"}])
    assert w.tolist() == [1.0] * 8

    stsb = tmp_path / "stsb_model"
    tiny_model(1).save_pretrained(stsb, tokenizer_from=minilm_path)
    res = evaluate(str(stsb), "stsb", glue_dir=str(glue_dir), batch_size=32, max_examples=100)
    assert {"pearson", "spearman", "score"} <= set(res) and res["num_examples"] == 100


def test_cli_functions(tmp_path, glue_dir, minilm_path, capsys):
    from fisher_jax.train.evaluate import add_evaluate_args, run_evaluate
    from fisher_jax.train.finetune import FinetuneConfig, add_finetune_args, config_from_args

    args = add_finetune_args(argparse.ArgumentParser()).parse_args(
        ["--task", "mrpc", "--model", "m", "--output-dir", "o", "--lr", "1e-4", "--epochs", "2.5",
         "--buckets", "32,64", "--no-dropout", "--last"])
    cfg = config_from_args(args)
    assert cfg == FinetuneConfig(task="mrpc", model="m", output_dir="o", learning_rate=1e-4, num_epochs=2.5,
                                 buckets=(32, 64), dropout=False, select_best=False)

    folder = tmp_path / "m"
    tiny_model(2).save_pretrained(folder, tokenizer_from=minilm_path)
    out = tmp_path / "res" / "rte.json"
    args = add_evaluate_args(argparse.ArgumentParser()).parse_args(
        ["--model", str(folder), "--task", "rte", "--glue-dir", str(glue_dir), "--max-examples", "50",
         "--max-length", "32", "--out", str(out)])
    assert run_evaluate(args) == 0
    written = json.loads(out.read_text())
    assert written["num_examples"] == 50 and json.loads(capsys.readouterr().out)["accuracy"] == written["accuracy"]


def test_held_out_slice_not_dev_picks_the_checkpoint(glue_dir, tokenizer, monkeypatch):
    from fisher_jax.data.batching import encode, held_out_split
    from fisher_jax.data.glue import load_split
    from fisher_jax.train import finetune as ft
    from fisher_jax.train.evaluate import sorted_batches

    # the slice: disjoint from the training rows, together all rows, the same for every seed
    train_rows, held = held_out_split(1000, 100)
    assert len(held) == 100 and not set(train_rows) & set(held) and len(train_rows) + len(held) == 1000
    np.testing.assert_array_equal(held_out_split(1000, 100)[1], held)

    # every evaluation during training scores the held-out rows; dev is scored once, at the end
    scored = []
    real = ft.evaluate_batches

    def rows(batches):  # the scored examples as token sequences, order-free
        return sorted(tuple(ids[m > 0]) for b in batches for ids, m, w in
                      zip(b["input_ids"], b["attention_mask"], b["weights"]) if w > 0)

    def spy(model, task, batches, **kw):
        scored.append(rows(batches))
        return real(model, task, batches, **kw)

    monkeypatch.setattr(ft, "evaluate_batches", spy)
    cfg = _config(glue_dir, task="rte", max_steps=4, eval_every=2, max_train_examples=32, held_out_examples=30,
                  max_eval_examples=20, dropout=False)
    _, hist = ft.finetune(cfg, model=tiny_model(2), tokenizer=tokenizer, progress=False)
    train = load_split("rte", "train", str(glue_dir))
    held_rows = rows(sorted_batches(encode(tokenizer, train.subset(held_out_split(len(train), 30)[1]), 32), 64))
    assert len(scored) == 3 and [e["step"] for e in hist["eval"]] == [2, 4]
    assert scored[0] == scored[1] == held_rows
    dev = load_split("rte", "dev", str(glue_dir))
    assert len(scored[2]) == 20 and hist["final_eval"]["num_examples"] == 20
    assert set(scored[2]) <= set(rows(sorted_batches(encode(tokenizer, dev, 32), 64)))
    with pytest.raises(FisherJaxError, match="held-out"):
        ft.FinetuneConfig(task="rte", held_out_examples=0)


def test_optimizer_pieces():
    import jax.numpy as jnp

    from fisher_jax.train.finetune import decay_mask, learning_rate_schedule, weighted_loss

    mask = tree.flatten(decay_mask(tiny_model(2).params))
    assert mask["body/encoder/layer/0/attention/self/query/kernel"] is True
    assert mask["body/embeddings/word_embeddings/embedding"] is True
    assert mask["body/encoder/layer/0/attention/self/query/bias"] is False
    assert mask["body/encoder/layer/1/output/LayerNorm/scale"] is False
    assert mask["head/classifier/bias"] is False

    sched = learning_rate_schedule(1e-3, total_steps=100, warmup_steps=10)
    assert [float(sched(s)) for s in (0, 5, 10, 55, 100)] == pytest.approx([0, 5e-4, 1e-3, 5e-4, 0], abs=1e-9)

    logits = jnp.array([[2.0, -1.0], [0.5, 0.5], [9.0, -9.0]])
    full = weighted_loss(logits, jnp.array([0, 1, 1]), jnp.array([1.0, 1.0, 0.0]), regression=False)
    part = weighted_loss(logits[:2], jnp.array([0, 1]), jnp.ones(2), regression=False)
    assert float(full) == pytest.approx(float(part), rel=1e-6)  # the padding row counts zero
    mse = weighted_loss(jnp.array([[1.0], [3.0]]), jnp.array([2.0, 100.0]), jnp.array([1.0, 0.0]), regression=True)
    assert float(mse) == pytest.approx(1.0)


def test_dropout_key_follows_the_backend_policy(monkeypatch):
    import jax

    from fisher_jax import backend
    from fisher_jax.train import finetune as ft

    assert str(jax.random.key_impl(ft.dropout_key(3))) == "threefry2x32"  # the tests run on CPU
    monkeypatch.setattr(ft, "backend_policy", lambda: backend.POLICIES["gpu"])  # what a GPU run would use
    key = ft.dropout_key(3)
    assert str(jax.random.key_impl(key)) == "rbg"
    assert jax.random.key_data(key).shape == (4,)


def test_clear_errors(tmp_path, glue_dir, tokenizer):
    from fisher_jax.train.evaluate import evaluate
    from fisher_jax.train.finetune import FinetuneConfig, finetune

    with pytest.raises(FisherJaxError, match="does not exist"):
        evaluate(str(tmp_path / "missing"), "rte", glue_dir=str(glue_dir))
    with pytest.raises(FisherJaxError, match="does not exist"):
        finetune(FinetuneConfig(task="rte", model=str(tmp_path / "missing"), glue_dir=str(glue_dir)))
    with pytest.raises(FisherJaxError, match="needs 1"):
        finetune(_config(glue_dir, task="stsb", max_steps=1), model=tiny_model(2), tokenizer=tokenizer)
    with pytest.raises(FisherJaxError, match="unknown (GLUE )?task"):
        finetune(_config(glue_dir, task="nope", max_steps=1), model=tiny_model(2), tokenizer=tokenizer)
    with pytest.raises(FisherJaxError, match="learning_rate"):
        FinetuneConfig(task="rte", learning_rate=0.0)
    with pytest.raises(FisherJaxError, match="needs 2"):
        evaluate(tiny_model(1), "rte", glue_dir=str(glue_dir), tokenizer=tokenizer)


def test_zoo_builds_once_then_reuses(tmp_path, glue_dir, minilm_path):
    from fisher_jax.train.zoo import build_zoo, load_zoo, zoo_config

    base = tmp_path / "base"
    tiny_model(2).save_pretrained(base, tokenizer_from=minilm_path)
    small = dict(max_steps=2, max_train_examples=64, max_eval_examples=32, max_length=32, buckets=(32,),
                 batch_size=16, eval_batch_size=64)
    cfg = zoo_config("RTE", str(base), tmp_path / "zoo", str(glue_dir), **small)
    assert cfg.task == "rte" and cfg.output_dir == str(tmp_path / "zoo" / "rte") and cfg.learning_rate == 1e-4

    first = build_zoo(str(base), ("rte",), tmp_path / "zoo", str(glue_dir), results_path=tmp_path / "zoo.json",
                      progress=False, **small)
    rec = first["tasks"]["rte"]
    # the final evaluation honours the budget's dev cap like the evaluations during training
    assert rec["cached"] is False and rec["metrics"]["num_examples"] == 32 and rec["total_steps"] == 2
    assert {"accuracy", "score"} <= set(rec["metrics"]) and rec["budget"]["max_steps"] == 2
    folder = tmp_path / "zoo" / "rte"
    assert (folder / "zoo_done.json").is_file() and not (folder / "checkpoints").exists()
    assert json.loads((tmp_path / "zoo.json").read_text())["summary"]["rte"]["accuracy"] == rec["metrics"]["accuracy"]

    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    second = build_zoo(str(base), ("rte",), tmp_path / "zoo", str(glue_dir), progress=False, **small)
    assert second["tasks"]["rte"]["cached"] is True and (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert set(load_zoo(tmp_path / "zoo", ("rte",))) == {"rte"}
    with pytest.raises(FisherJaxError, match="not built"):
        load_zoo(tmp_path / "zoo", ("rte", "mrpc"))

    # a budget that changed since the model was built makes the cache stale: rebuilt, not reused
    third = build_zoo(str(base), ("rte",), tmp_path / "zoo", str(glue_dir), progress=False, **{**small, "max_steps": 3})
    assert third["tasks"]["rte"]["cached"] is False and third["tasks"]["rte"]["total_steps"] == 3
