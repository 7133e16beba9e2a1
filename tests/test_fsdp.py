"""Sharded parameters: the parameter rule against a hand-written table, and every statistic,
fine-tuning and evaluation on a ("data", "model") = 2 x 2 mesh of 4 forced host devices against
the replicated 1-D mesh of the same 4 devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from fisher_jax import parallel as par
from fisher_jax.errors import FisherJaxError

FAST_COMPILE = "--xla_backend_optimization_level=0"  # as tests/conftest.py sets for the test process


def test_shard_axis_follows_the_rule_on_a_tiny_tree():
    # rows: shape -> the axis split for k = 1, 2, 3 (None: replicated), min_size 16 elements
    table = {
        "body/kernel": ((8, 6), (None, 0, 1)),  # largest divisible axis: 8 for k=2, 6 for k=3
        "body/square": ((4, 4), (None, 1, None)),  # a tie goes to the last axis (the outputs)
        "body/odd": ((3, 7), (None, None, 0)),  # nothing divides by 2
        "body/bias": ((64,), (None, None, None)),  # one axis: never split
        "body/small": ((2, 4), (None, None, None)),  # 8 < 16 elements
        "body/embedding": ((9, 4), (None, 1, 0)),
        "head/kernel": ((6, 3), (None, 0, 0)),  # k=3: 6 and 3 divide, 6 is longer
    }
    tree = {"body": {}, "head": {}}
    for name, (shape, _) in table.items():
        part, leaf = name.split("/")
        tree[part][leaf] = np.zeros(shape, np.float32)
    for i, k in enumerate((1, 2, 3)):
        specs = par.param_specs(tree, k, min_size=16)
        for name, (shape, axes) in table.items():
            part, leaf = name.split("/")
            want = axes[i]
            assert par.shard_axis(shape, k, min_size=16) == want, (name, k)
            spec = specs[part][leaf]
            assert spec == (P() if want is None else P(*([None] * want), "model")), (name, k, spec)
            if want is not None:  # each of the k devices holds 1/k of the leaf along that axis
                blocks = np.split(tree[part][leaf], k, axis=want)
                assert all(b.shape[want] * k == shape[want] for b in blocks)
    assert par.leaf_spec((4096, 2), 2) == P("model") and par.leaf_spec((2, 2), 2) == P()  # the default floor


def test_model_parallel_mesh_errors_and_default():
    import jax

    one = par.data_mesh(model_parallel=1)
    assert one.axis_names == ("data",) and not par.has_model_axis(one) and par.model_parallel(one) == 1
    assert par.row_axes(one) == "data" and par.num_row_shards(one) == par.num_shards(one)
    n = len(jax.devices())
    with pytest.raises(FisherJaxError, match="must divide"):
        par.data_mesh(model_parallel=n + 1)
    with pytest.raises(FisherJaxError, match=">= 1"):
        par.data_mesh(model_parallel=0)
    with pytest.raises(FisherJaxError, match=">= 1"):
        par.use_model_parallel(0)
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "models"))
    with pytest.raises(FisherJaxError, match="did you mean 'model'"):
        par.resolve_mesh(mesh)
    two = par.data_mesh(jax.devices()[:1], model_parallel=1)
    assert par.place_params({"w": np.ones((64, 64), np.float32)}, two)["w"].sharding.spec == P()
    previous = par.use_model_parallel(n + 1)  # every default mesh asks for it (the 4-device run: a 2-D mesh)
    try:
        with pytest.raises(FisherJaxError, match="must divide"):
            par.data_mesh()
        assert par.local_mesh().axis_names == ("data",)  # the per-process mesh stays 1-D
    finally:
        assert par.use_model_parallel(previous) == n + 1
    assert par.data_mesh().axis_names == ("data",)


# One process per mesh, both on 4 host devices: every computation on the replicated 1-D mesh
# ("rep") or on data=2 x model=2 ("fsdp"); the 2 x 2 run also records where its parameters,
# optimiser state and full-Fisher sums live.
SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax, transformers as tf
    from fisher_jax import parallel as par
    from fisher_jax.models.hub import from_config, load_tokenizer
    from fisher_jax.stats import ESTIMATORS, full_fisher, gram_stats, mask_fisher
    from fisher_jax.stats.fisher import _init_state
    from fisher_jax.train import finetune as ft_module
    from fisher_jax.train.finetune import FinetuneConfig, finetune
    from fisher_jax.train.evaluate import predict
    from fisher_jax.tree import flatten

    trained = {}  # the training loop's state after its last step, as the jitted step returned it
    real_functions = ft_module._training_functions

    def recording_functions(*args, **kwargs):
        tx, schedule, step = real_functions(*args, **kwargs)

        def recording_step(state, batch, key):
            trained["state"], metrics = step(state, batch, key)
            return trained["state"], metrics

        return tx, schedule, recording_step

    ft_module._training_functions = recording_functions

    out_path, glue_dir, tok_dir, name = sys.argv[1:5]
    assert len(jax.devices()) == 4
    cfg = tf.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    model = from_config(cfg, num_labels=2, seed=0)
    tok = load_tokenizer(tok_dir)
    rs = np.random.RandomState(0)
    batches = []
    for _ in range(2):  # 6 rows: padded to 8 on both meshes (4 row shards each)
        ids = rs.randint(1000, 30000, (6, 16)).astype(np.int32)
        am = np.ones_like(ids); am[1, 9:] = 0; ids[am == 0] = 0
        batches.append({"input_ids": ids, "attention_mask": am, "token_type_ids": np.zeros_like(ids),
                        "labels": rs.randint(0, 2, 6).astype(np.int32)})
    ft = FinetuneConfig(task="rte", glue_dir=glue_dir, batch_size=6, max_length=16, buckets=(16,),
                        learning_rate=1e-3, max_steps=3, max_train_examples=18, held_out_examples=0,
                        select_best=False, eval_every=0, eval_batch_size=7, max_eval_examples=7, dropout=True,
                        seed=1)
    res = {"init/output_kernel": np.asarray(flatten(model.params)["body/encoder/layer/0/output/dense/kernel"])}
    mesh = par.data_mesh() if name == "rep" else par.data_mesh(model_parallel=2)
    for est in ESTIMATORS:
        fm = mask_fisher(model, batches, estimator=est, seed=1, progress=False, mesh=mesh)
        res[f"{name}/mask/{est}/head"], res[f"{name}/mask/{est}/neuron"] = fm.head, fm.neuron
    for est in ("expected", "batch"):  # per-example squares and the batch gradient's square
        ff = full_fisher(model, batches, estimator=est, chunk_size=1, progress=False, mesh=mesh)
        res.update({f"{name}/full/{est}/{k}": v for k, v in flatten(ff["body"]).items()})
    res.update({f"{name}/gram/{k}": v for k, v in gram_stats(model, batches, progress=False, mesh=mesh).items()})
    tuned, hist = finetune(ft, model=model, tokenizer=tok, progress=False, mesh=mesh)
    res.update({f"{name}/params/{k}": v for k, v in flatten(tuned.params).items()})
    res[f"{name}/train/losses"] = np.array([r["loss"] for r in hist["train"]])
    rows = {k: np.concatenate([b[k] for b in batches])[:7] for k in ("input_ids", "attention_mask")}
    logits, _, weights = predict(tuned, [rows], mesh=mesh)  # 7 rows, as the dev evaluation's batch
    res[f"{name}/eval/logits"] = logits[weights > 0]

    if name == "fsdp":  # merges leaf by leaf on split leaves against the same merges of host arrays
        import fisher_jax as fj
        fms, ffs, grams = [fm, fm], [ff, ff], [gram_stats(model, batches, progress=False, mesh=mesh)] * 2
        for method, kw in (("simple", {}), ("task_arithmetic", {"base": model}), ("ties", {"base": model}),
                           ("fisher", {"fishers": ffs}), ("fisher_nodes", {"fishers": fms}), ("regmean", {"grams": grams})):
            host = fj.merge(method, [model, tuned], **kw)[0].params["body"]
            placed = [m.replace(params=par.place_params(m.params, mesh)) for m in (model, tuned)]
            if "base" in kw:
                kw = {"base": placed[0]}
            split = fj.merge(method, placed, **kw)[0].params["body"]
            for k, v in flatten(split).items():
                res[f"merge/{method}/split/{k}"] = np.asarray(v)
                res[f"merge/{method}/host/{k}"] = np.asarray(flatten(host)[k])
            ffn_out = flatten(split)["encoder/layer/0/intermediate/dense/kernel"]
            res[f"mergespec/{method}"] = np.array(str(getattr(getattr(ffn_out, "sharding", None), "spec", "host")))

    if name == "fsdp":  # where the 2 x 2 run keeps its leaves: parameters, optimiser state, full-Fisher sums
        par.use_model_parallel(2)  # the default mesh (what the command line's flag sets)
        assert par.data_mesh() == mesh and dict(mesh.shape) == {"data": 2, "model": 2}
        state = trained["state"]
        sums = _init_state(model.arch, "body", model.params, mesh)()["sums"]
        placed = {"params": flatten(state["params"]), "mu": flatten(state["opt_state"][1][0].mu),
                  "sums": flatten({"body": sums})}
        for kind, leaves in placed.items():
            for k, leaf in leaves.items():
                res[f"spec/{kind}/{k}"] = np.array(str(leaf.sharding.spec))
                res[f"local/{kind}/{k}"] = np.array(leaf.addressable_shards[0].data.shape)
                res[f"global/{kind}/{k}"] = np.array(leaf.shape)
    np.savez(out_path, **res)
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, glue_dir, minilm_path):
    tmp = tmp_path_factory.mktemp("fsdp")
    script = tmp / "fsdp_run.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES",) and not k.startswith("FISHER_JAX_")}
    env.update(JAX_PLATFORMS="cpu", FISHER_JAX_COMPILATION_CACHE="0",
               XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}")
    procs = {name: subprocess.Popen([sys.executable, str(script), str(tmp / f"{name}.npz"), str(glue_dir), minilm_path,
                                     name], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name in ("rep", "fsdp")}  # side by side: each compiles on its own core
    for proc in procs.values():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
    return {k: v for name in procs for k, v in np.load(tmp / f"{name}.npz").items()}


def _pairs(res: dict, kind: str) -> list[str]:
    keys = [k[len("rep/"):] for k in res if k.startswith(f"rep/{kind}/")]
    assert keys and all(f"fsdp/{k}" in res for k in keys)
    return keys


@pytest.mark.parametrize("kind", ["mask", "full", "gram"])
def test_statistics_on_sharded_parameters_equal_the_replicated_run(runs, kind):
    keys = _pairs(runs, kind)
    if kind == "mask":
        assert {k.split("/")[1] for k in keys} == {"empirical", "expected", "sampled", "batch"}
    for k in keys:
        one, two = runs[f"rep/{k}"], runs[f"fsdp/{k}"]
        assert np.abs(one).max() > 0, k
        np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5 * np.abs(one).max(), err_msg=k)


def test_training_and_evaluation_on_sharded_parameters_equal_the_replicated_run(runs):
    keys = _pairs(runs, "params") + _pairs(runs, "train") + _pairs(runs, "eval")
    trained = runs["rep/params/body/encoder/layer/0/output/dense/kernel"]
    assert np.abs(trained - runs["init/output_kernel"]).max() > 1e-4  # the 3 steps moved the parameters
    assert len(runs["rep/train/losses"]) == 1 and runs["rep/eval/logits"].shape == (7, 2)
    for k in keys:  # the floor as in test_sharding: the key bias's gradient is rounding noise AdamW rescales
        one, two = runs[f"rep/{k}"], runs[f"fsdp/{k}"]
        np.testing.assert_allclose(two, one, rtol=1e-4, atol=max(1e-4 * np.abs(one).max(), 1e-6), err_msg=k)


def test_merges_on_split_leaves_equal_the_host_merges(runs):
    methods = {k.split("/")[1] for k in runs if k.startswith("merge/")}
    assert methods == {"simple", "task_arithmetic", "ties", "fisher", "fisher_nodes", "regmean"}
    for k in (k for k in runs if k.startswith("merge/") and "/split/" in k):
        host = runs[k.replace("/split/", "/host/")]
        np.testing.assert_allclose(runs[k], host, rtol=1e-5, atol=1e-6 * max(np.abs(host).max(), 1.0), err_msg=k)
    # the data-free merges keep the split: an FFN kernel stays over "model" (no gather to one device)
    for method in ("simple", "task_arithmetic", "ties"):
        assert "model" in str(runs[f"mergespec/{method}"]), (method, runs[f"mergespec/{method}"])


def test_big_leaves_are_split_over_the_model_axis(runs):
    def leaf(kind, name):
        return (str(runs[f"spec/{kind}/{name}"]), tuple(runs[f"local/{kind}/{name}"]), tuple(runs[f"global/{kind}/{name}"]))

    query = "body/encoder/layer/0/attention/self/query/kernel"  # [64, 64]: split along its outputs
    ffn = "body/encoder/layer/0/intermediate/dense/kernel"  # [64, 128]: along the 128
    for kind in ("params", "mu"):  # after the sharded run's last training step
        spec, local, full = leaf(kind, query)
        assert "model" in spec and local == (64, 32) and full == (64, 64), (kind, spec, local)
        spec, local, full = leaf(kind, ffn)
        assert "model" in spec and local == (64, 64) and full == (64, 128), (kind, spec, local)
        spec, local, full = leaf(kind, "body/embeddings/word_embeddings/embedding")  # [30522, 64]: the vocabulary
        assert "model" in spec and local == (30522 // 2, 64) and full == (30522, 64), (kind, spec, local)
        spec, local, full = leaf(kind, "body/encoder/layer/0/output/LayerNorm/scale")  # replicated
        assert "model" not in spec and local == full == (64,), (kind, spec, local)
    # Full-Fisher sums: a leading axis over "data", the leaf split like its parameter; or, for a
    # replicated leaf, one sum per device (leading axis over both axes).
    assert leaf("sums", query) == ("P('data', None, 'model')", (1, 64, 32), (2, 64, 64))
    assert leaf("sums", "body/encoder/layer/0/output/LayerNorm/scale") == ("P(('data', 'model'),)", (1, 64), (4, 64))
