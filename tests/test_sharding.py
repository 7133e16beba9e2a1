"""Data parallelism: the same statistics on 1 and 4 (forced host) devices; batch padding helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fisher_jax.errors import FisherJaxError
from fisher_jax.parallel import data_mesh, pad_rows
from fisher_jax.stats.sharding import standardise_batch

FAST_COMPILE = "--xla_backend_optimization_level=0"  # as tests/conftest.py sets for the test process

# Runs in a subprocess with 1 CPU device and in one with 4 forced host devices. Batch size 6
# is not a multiple of 4: the 4-device run pads with weight-0 rows.
SCRIPT = textwrap.dedent("""
    import sys, tempfile, numpy as np, jax, transformers as tf
    from fisher_jax.models import from_config
    from fisher_jax.parallel import data_mesh
    from fisher_jax.stats import mask_fisher, full_fisher, gram_stats
    from fisher_jax.tree import flatten

    def compute():
        cfg = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=64)
        m = from_config(cfg, num_labels=3, seed=0)
        rs = np.random.RandomState(0)
        batches = []
        for _ in range(2):
            ids = rs.randint(1, 99, (6, 8)).astype(np.int32)
            am = np.ones_like(ids); am[1, 4:] = 0; ids[am == 0] = 0
            batches.append({"input_ids": ids, "attention_mask": am, "token_type_ids": np.zeros_like(ids),
                            "labels": rs.randint(0, 3, 6).astype(np.int32)})
        out = {"devices": np.array(len(jax.devices()))}
        for est in ("sampled", "batch"):  # per-example (seeded per global row) and batch-mean-then-square
            fm = mask_fisher(m, batches, estimator=est, seed=1, progress=False)
            out[f"{est}/head"], out[f"{est}/neuron"] = fm.head, fm.neuron
        ff = full_fisher(m, batches, estimator="expected", chunk_size=1, progress=False)
        out.update({f"full/{k}": v for k, v in flatten(ff["body"]).items()})
        gr = gram_stats(m, batches, progress=False)
        out.update({f"gram/{k}": v for k, v in gr.items()})
        # Checkpoints hold the devices' total: a run started on one device resumes on all of them.
        ck = tempfile.mkdtemp()
        try:
            full_fisher(m, stop_after(batches, 1), estimator="expected", chunk_size=1, progress=False,
                        mesh=data_mesh(jax.devices()[:1]), checkpoint_dir=ck, checkpoint_every=1)
        except Stop:
            pass
        ff = full_fisher(m, batches, estimator="expected", chunk_size=1, progress=False, checkpoint_dir=ck)
        assert ff.meta["num_batches"] == 2 and ff.num_examples == 12
        out.update({f"resumed/{k}": v for k, v in flatten(ff["body"]).items()})
        return out

    class Stop(Exception):
        pass

    def stop_after(batches, k):
        yield from batches[:k]
        raise Stop

    if __name__ == "__main__":
        np.savez(sys.argv[1], **compute())
""")


def test_one_device_equals_four(tmp_path):
    # Both runs on the CPU backend in their own processes, so the comparison isolates the device
    # count (on a GPU machine the default backend would also change the numerics).
    script = tmp_path / "stats_run.py"
    script.write_text(SCRIPT)
    procs = {}
    for n in (1, 4):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n} {FAST_COMPILE}",
                   JAX_PLATFORMS="cpu")
        procs[n] = subprocess.Popen([sys.executable, str(script), str(tmp_path / f"{n}.npz")], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for proc in procs.values():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    one, four = (dict(np.load(tmp_path / f"{n}.npz")) for n in (1, 4))
    assert int(one.pop("devices")) == 1 and int(four.pop("devices")) == 4
    assert set(one) == set(four)
    for k in [k for k in one if k.startswith("full/")]:  # resumed on 4 devices from a 1-device checkpoint
        np.testing.assert_allclose(four["resumed/" + k[5:]], one[k], rtol=1e-5, atol=1e-5 * np.abs(one[k]).max())
    for k in one:
        scale = np.abs(one[k]).max()
        np.testing.assert_allclose(four[k], one[k], rtol=1e-5, atol=1e-5 * scale, err_msg=k)


def test_pad_rows_and_defaults():
    b = standardise_batch({"input_ids": np.arange(15).reshape(3, 5), "labels": [0, 1, 1]}, regression=False)
    assert b["attention_mask"].sum() == 15 and not b["token_type_ids"].any()
    assert b["weights"].tolist() == [1, 1, 1] and b["labels"].dtype == np.int32
    p = pad_rows(b, 4)
    assert p["input_ids"].shape == (4, 5) and p["weights"].tolist() == [1, 1, 1, 0]
    np.testing.assert_array_equal(p["input_ids"][3], b["input_ids"][0])  # a real row, weight 0
    assert pad_rows(b, 3)["input_ids"].shape == (3, 5)
    r = standardise_batch({"input_ids": np.ones((2, 4)), "labels": [0.5, 1.5]}, regression=True)
    assert r["labels"].dtype == np.float32
    with pytest.raises(FisherJaxError, match="input_ids"):
        standardise_batch({"attention_mask": np.ones((2, 4))}, regression=False)
    with pytest.raises(FisherJaxError, match="attention_mask"):
        standardise_batch({"input_ids": np.ones((2, 4)), "attention_mask": np.ones((2, 3))}, regression=False)
    mesh = data_mesh()
    assert mesh.axis_names == ("data",)


def test_model_inputs_fill_the_defaults_once_for_numpy_and_jax():
    import jax.numpy as jnp

    from fisher_jax.parallel import batch_inputs, model_inputs

    ids, am, tt = model_inputs([[5, 6, 7]])
    assert ids.dtype == am.dtype == tt.dtype == np.int32
    assert am.tolist() == [[1, 1, 1]] and tt.tolist() == [[0, 0, 0]]
    ids, am, tt = model_inputs(np.ones((2, 3)), np.array([[1, 1, 0], [1, 0, 0]]), np.ones((2, 3)), xp=jnp)
    assert isinstance(am, jnp.ndarray) and am.dtype == jnp.int32 and int(am.sum()) == 3 and int(tt.sum()) == 6
    got = batch_inputs({"input_ids": np.ones((1, 2)), "labels": [0], "token_type_ids": None})
    assert list(got) == ["input_ids", "attention_mask", "token_type_ids"] and not got["token_type_ids"].any()


def test_batch_iterator_is_reiterable():
    from fisher_jax.data.batching import Encoded, batches

    lengths = np.array([3, 5, 2, 4, 6])
    offsets = np.r_[0, np.cumsum(lengths)]
    enc = Encoded(np.arange(offsets[-1], dtype=np.int32) + 1, np.zeros(offsets[-1], np.int8), offsets,
                  np.array([0, 1, 0, 1, 1]), max_length=8, pad_token_id=0)
    it = batches(enc, 2)
    first = [b["input_ids"] for b in it]
    second = [b["input_ids"] for b in it]  # a second pass: the same batches, not nothing
    assert len(first) == len(second) == len(it) == 3
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    started = iter(it)
    next(started)
    assert len(list(it)) == 2  # a pass under way continues; the next one starts over
    assert len(list(it)) == 3


# Fine-tuning (dropout on, batch 6: padded to 8 on 4 devices) and evaluation (batches of 7) in a
# fresh process with a given number of CPU devices, set through fisher_jax.use_cpu_cores.
TRAIN_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    import fisher_jax as fj
    fj.use_cpu_cores(int(sys.argv[2]))
    import jax, transformers as tf
    from fisher_jax.models.hub import from_config, load_tokenizer
    from fisher_jax.train.finetune import FinetuneConfig, finetune
    from fisher_jax.train.evaluate import predict
    from fisher_jax.tree import flatten

    cfg = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    ft = FinetuneConfig(task="sst2", glue_dir=sys.argv[3], batch_size=6, max_length=32, buckets=(32,),
                        learning_rate=1e-3, max_steps=6, max_train_examples=36, dropout=True, seed=1,
                        eval_batch_size=16, max_eval_examples=20, log_every=3)
    model, hist = finetune(ft, model=from_config(cfg, num_labels=2, seed=0), tokenizer=load_tokenizer(sys.argv[4]),
                           progress=False)
    rs = np.random.RandomState(0)
    ids = rs.randint(1000, 30000, (14, 12)).astype(np.int32)
    am = np.ones_like(ids); am[3, 5:] = 0
    logits, _, _ = predict(model, [{"input_ids": ids[:7], "attention_mask": am[:7]},
                                   {"input_ids": ids[7:], "attention_mask": am[7:]}])
    out = {"devices": np.array(len(jax.devices())), "logits": logits,
           "losses": np.array([r["loss"] for r in hist["train"]]), "score": np.array(hist["final_eval"]["score"])}
    out.update({f"params/{k}": v for k, v in flatten(model.params).items()})
    np.savez(sys.argv[1], **out)
""")


def test_training_and_evaluation_do_not_depend_on_device_count(tmp_path, glue_dir, minilm_path):
    script = tmp_path / "train_run.py"
    script.write_text(TRAIN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["JAX_PLATFORMS"], env["XLA_FLAGS"] = "cpu", FAST_COMPILE  # the device count comes from use_cpu_cores
    procs = {n: subprocess.Popen([sys.executable, str(script), str(tmp_path / f"{n}.npz"), str(n), str(glue_dir),
                                  minilm_path], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (1, 4)}
    for proc in procs.values():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    one, four = (dict(np.load(tmp_path / f"{n}.npz")) for n in (1, 4))
    assert int(one.pop("devices")) == 1 and int(four.pop("devices")) == 4
    assert len(one["losses"]) == 2 and not np.allclose(one["params/body/encoder/layer/0/output/dense/kernel"], 0)
    for k in one:  # atol floor: the key bias has zero gradient in exact arithmetic (softmax is shift
        # invariant), so its ~1e-8 entries are rounding noise that AdamW rescales
        np.testing.assert_allclose(four[k], one[k], rtol=1e-4, atol=max(1e-4 * np.abs(one[k]).max(), 1e-6), err_msg=k)


def test_use_cpu_cores_respects_the_user_and_fails_clearly_when_too_late(monkeypatch):
    import jax

    from fisher_jax import parallel

    jax.numpy.zeros(1).block_until_ready()  # JAX has started in this process
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with pytest.raises(FisherJaxError, match="before JAX computes anything"):
        parallel.use_cpu_cores(2)
    assert parallel.use_cpu_cores(2, strict=False) == len(jax.devices("cpu"))  # too late: unchanged
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    assert parallel.use_cpu_cores() == 3  # the user's choice wins, nothing is changed
    with pytest.raises(FisherJaxError, match=">= 1"):
        monkeypatch.delenv("XLA_FLAGS")
        parallel.use_cpu_cores(0)


def test_cli_asks_for_one_device_per_core_first(monkeypatch, capsys):
    from fisher_jax import cli, parallel

    calls = []
    monkeypatch.setattr(parallel, "use_cpu_cores", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(cli, "use_compilation_cache", lambda: None)
    assert cli.main([]) == 0
    assert calls == []  # help alone computes nothing
    ran = []
    monkeypatch.setattr(cli, "load_command", lambda command: (lambda p: p, lambda args: ran.append(list(calls)) or 0))
    assert cli.main(["evaluate"]) == 0
    assert ran == [[{"strict": False}]]  # one device per core was asked for before the command ran
