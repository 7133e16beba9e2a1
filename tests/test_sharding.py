"""Data parallelism: the same statistics on 1 and 4 (forced host) devices; batch padding helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fisher_jax.errors import FisherJaxError
from fisher_jax.stats.sharding import data_mesh, pad_rows, standardise_batch

# Runs in a subprocess with 1 CPU device and in one with 4 forced host devices. Batch size 6
# is not a multiple of 4: the 4-device run pads with weight-0 rows.
SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax, transformers as tf
    from fisher_jax.models import from_config
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
        return out

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
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
        procs[n] = subprocess.Popen([sys.executable, str(script), str(tmp_path / f"{n}.npz")], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for proc in procs.values():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    one, four = (dict(np.load(tmp_path / f"{n}.npz")) for n in (1, 4))
    assert int(one.pop("devices")) == 1 and int(four.pop("devices")) == 4
    assert set(one) == set(four)
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
