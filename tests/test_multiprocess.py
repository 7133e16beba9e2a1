"""Two JAX processes (CPU, gloo, loopback) give what one process gives: every statistic, fine-tuning,
evaluation, and a `fisher-jax fisher` run started with the global multi-process flags; the
experiment driver writes its folders once and reuses its cache; a statistics checkpoint resumes
on another process count; each process reads only its part of every split and tokenises only the
pass's rows in it."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fisher_jax.errors import FisherJaxError

# The experiment driver (cached statistics and results) and a checkpointed statistics pass, in one
# process or two: the experiment runs, then runs again in a fresh Experiment (from the files); two
# processes also resume the mask Fisher one process stopped after 1 of 2 batches, then stop one
# after a batch themselves (for one process to resume). A follower records every write it makes
# under the experiment's folder (an audit hook): there must be none.
WRITERS = textwrap.dedent("""
    import hashlib, json, os, sys
    import numpy as np

    def checkpoint_batches():
        rs = np.random.RandomState(0)
        out = []
        for _ in range(2):  # global batches, the same in every process
            ids = rs.randint(1000, 30000, (6, 16)).astype(np.int32)
            am = np.ones_like(ids); am[2, 11:] = 0; ids[am == 0] = 0
            out.append({"input_ids": ids, "attention_mask": am, "token_type_ids": np.zeros_like(ids),
                        "labels": rs.randint(0, 2, 6).astype(np.int32)})
        return out

    CHECKPOINT_KW = dict(estimator="sampled", seed=4, progress=False, checkpoint_every=1)
    # 3 steps with dropout, batch 6 (3 rows per process), held-out selection and dev evaluation,
    # a checkpoint after every step (the resume test restarts from step 2)
    FINETUNE_KW = dict(task="rte", batch_size=6, max_length=16, buckets=(16,), learning_rate=1e-3, max_steps=3,
                       max_train_examples=18, held_out_examples=9, eval_batch_size=7, max_eval_examples=10,
                       dropout=True, seed=1, checkpoint_every=1, keep_checkpoints=3)

    def snapshot(folder):
        return {os.path.relpath(os.path.join(d, f), folder): [os.stat(os.path.join(d, f)).st_mtime_ns,
                hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()]
                for d, _, files in sorted(os.walk(folder)) for f in sorted(files)}

    def writers(root, glue_dir, n, pid):
        name = "one" if n == 1 else "two"
        watched = os.path.join(root, f"exp_{name}")
        writes = []

        def path_of(x):
            return os.path.abspath(os.fsdecode(x)) if isinstance(x, (str, bytes, os.PathLike)) else ""

        def audit(event, args):
            if event == "open" and path_of(args[0]).startswith(watched) and (
                    any(c in str(args[1]) for c in "wax+") or int(args[2] or 0) & (os.O_WRONLY | os.O_RDWR)):
                writes.append(["open", path_of(args[0])])
            elif event in ("os.rename", "os.mkdir", "os.remove", "shutil.rmtree") and path_of(args[0]).startswith(watched):
                writes.append([event, path_of(args[0])])

        if pid > 0:
            sys.addaudithook(audit)
        from fisher_jax.experiment.config import DEFAULT_METHODS, ExperimentConfig
        from fisher_jax.experiment.runner import Experiment

        cfg = ExperimentConfig(
            name="mp", tasks=(("rte", os.path.join(root, "rte")), ("mrpc", os.path.join(root, "mrpc"))),
            methods=(DEFAULT_METHODS["simple"], DEFAULT_METHODS["fisher_nodes"]), glue_dir=glue_dir,
            output_dir=os.path.join(watched, "out"), cache_dir=os.path.join(watched, "stats"), max_eval_examples=12,
            eval_batch_size=6, mask_fisher=(("estimator", "empirical"), ("num_examples", 12), ("batch_size", 6)))
        record = {"runs": []}
        for _ in range(2):  # the second run: everything from the first run's files
            results = Experiment(cfg, progress=False).run()  # returns once process 0 has written the reports
            record["runs"].append({"timings": results["timings"], "cells": sorted(results["cells"]),
                                   "files": snapshot(watched)})
        record["writes"] = writes
        if n > 1:
            from fisher_jax.distributed import main_decides

            record["decided"] = main_decides(lambda: {"pid": pid, "mixed": [1, 2.5, None, True, "x" * 1000]})
            try:
                main_decides(lambda: {}[f"missing in process {pid}"])
            except Exception as exc:  # process 0: the KeyError itself; the others: a FisherJaxError naming it
                record["error"] = [type(exc).__name__, str(exc)]
            from fisher_jax.models.hub import from_pretrained
            from fisher_jax.parallel import process_rows
            from fisher_jax.stats import mask_fisher

            model = from_pretrained(os.path.join(root, "rte"))
            local = [process_rows(b) for b in checkpoint_batches()]
            fm = mask_fisher(model, local, checkpoint_dir=os.path.join(root, "ckpt_one"), **CHECKPOINT_KW)
            np.savez(os.path.join(root, f"resumed.{pid}.npz"), head=fm.head, neuron=fm.neuron,
                     num_examples=np.array(fm.num_examples))
            mask_fisher(model, local[:1], checkpoint_dir=os.path.join(root, "ckpt_two"), **CHECKPOINT_KW)
        with open(os.path.join(root, f"writers.{name}.{pid}.json"), "w") as f:
            json.dump(record, f)
""")

# One script per process does all the work, so each process starts JAX and compiles once.
# argv: out prefix, model folder, GLUE folder, number of processes, process id, coordinator.
SCRIPT = WRITERS + textwrap.dedent("""
    import sys, time, numpy as np
    t0 = time.perf_counter()
    out, model_dir, glue_dir, n, pid, address = sys.argv[1:7]
    n, pid = int(n), int(pid)
    from fisher_jax import cli
    from fisher_jax.data import batching

    # Every split this process reads (rows kept, rows in the split) and tokenises (rows), in order.
    READ, TOKENISED = [], []
    _load, _encode = batching.load_split, batching.encode

    def load_split(task, split, glue_dir=None, keep=None, part=None):
        got = _load(task, split, glue_dir, keep, part)
        READ.append([got.task, got.split, len(got), int(got.num_rows or len(got))])
        return got

    def encode(tokenizer, examples, max_length=128):
        TOKENISED.append([examples.task, examples.split, len(examples)])
        return _encode(tokenizer, examples, max_length)

    batching.load_split, batching.encode = load_split, encode
    batching.EXCHANGE_WINDOW = 2  # passes of several windows: each window's rows in one all-gather

    # The command line first: its global flags start the multi-process run for this whole script.
    argv = ["fisher", "--model", model_dir, "--task", "rte", "--glue-dir", glue_dir, "--out", out + ".safetensors",
            "--estimator", "sampled", "--num-examples", "12", "--batch-size", "6", "--max-length", "16",
            "--seed", "3", "--no-progress"]
    if n > 1:
        argv = ["--coordinator", address, "--num-processes", str(n), "--process-id", str(pid)] + argv
    assert cli.main(argv) == 0

    import jax
    from fisher_jax.distributed import is_main_process, process_part
    from fisher_jax.models.hub import from_pretrained, load_tokenizer
    from fisher_jax.parallel import process_rows
    from fisher_jax.stats import full_fisher, gram_stats, mask_fisher
    from fisher_jax.train.evaluate import evaluate, evaluate_batches, predict, sorted_batches
    from fisher_jax.train.finetune import FinetuneConfig, finetune
    from fisher_jax.data.batching import SplitRows, encode_rows
    from fisher_jax.data.glue import get_task
    from fisher_jax.tree import flatten

    assert process_part() == (pid, n) and jax.device_count() == n and is_main_process() == (pid == 0)
    model = from_pretrained(model_dir)
    rs = np.random.RandomState(0)
    batches = []
    for _ in range(2):  # global batches, the same in every process; each passes its own rows
        ids = rs.randint(1000, 30000, (6, 16)).astype(np.int32)
        am = np.ones_like(ids); am[1, 9:] = 0; ids[am == 0] = 0
        batches.append({"input_ids": ids, "attention_mask": am, "token_type_ids": np.zeros_like(ids),
                        "labels": rs.randint(0, 2, 6).astype(np.int32)})
    local = [process_rows(b) for b in batches]
    assert local[0]["input_ids"].shape == (6 // n, 16)
    res = {}
    for est in ("empirical", "expected", "sampled", "batch"):
        fm = mask_fisher(model, local, estimator=est, seed=1, progress=False)
        res[f"mask/{est}/head"], res[f"mask/{est}/neuron"] = fm.head, fm.neuron
    ff = full_fisher(model, local, estimator="expected", chunk_size=1, progress=False)
    res.update({f"full/{k}": v for k, v in flatten(ff["body"]).items()})
    res.update({f"gram/{k}": v for k, v in gram_stats(model, local, progress=False).items()})

    tok = load_tokenizer(model_dir)
    ft = FinetuneConfig(glue_dir=glue_dir, checkpoint_dir=out + "_ft_ckpt", **FINETUNE_KW)
    tuned, hist = finetune(ft, model=from_pretrained(model_dir), tokenizer=tok, progress=False)
    res.update({f"params/{k}": v for k, v in flatten(tuned.params).items()})
    res["train/losses"] = np.array([r["loss"] for r in hist["train"]])
    res["train/held_out_score"] = np.array(hist["eval"][-1]["score"])
    res["eval/final_score"] = np.array(hist["final_eval"]["score"])
    spec = get_task("rte")
    dev = SplitRows(spec, "dev", glue_dir)
    dev_batches = sorted_batches(encode_rows(tok, dev, np.arange(11), 16), 7, (16,))  # 11 rows: 2 batches
    ev = evaluate_batches(tuned, spec, dev_batches, return_predictions=True)
    res["eval/accuracy"], res["eval/predictions"] = np.array(ev["accuracy"]), np.array(ev["predictions"])
    res["eval/num_examples"] = np.array(ev["num_examples"])
    logits, _, weights = predict(tuned, dev_batches)
    res["eval/logits"] = logits[weights > 0]  # the real rows (each process pads its slice of a batch)
    ev = evaluate(tuned, "rte", glue_dir=glue_dir, batch_size=5, max_length=16, max_examples=13, return_predictions=True)
    res["evaluate/score"], res["evaluate/predictions"] = np.array(ev["score"]), np.array(ev["predictions"])
    print(f"{n} process(es), process {pid}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    np.savez(f"{out}.{pid}.npz", **res)
    writers(os.path.dirname(out), glue_dir, n, pid)
    with open(f"{out}.{pid}.data.json", "w") as f:
        json.dump({"read": READ, "tokenised": TOKENISED}, f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, glue_dir, minilm_path):
    """One run in one process and the same run in two processes; their outputs, by process. Before
    they start, this process computes a mask Fisher whole and stops the same one after one batch."""
    import transformers as tf

    from fisher_jax.models.hub import from_config, from_pretrained
    from fisher_jax.stats import mask_fisher

    tmp = tmp_path_factory.mktemp("multiprocess")
    cfg = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    from_config(cfg, num_labels=2, seed=0).save_pretrained(tmp / "model", tokenizer_from=minilm_path)
    cfg.max_position_embeddings = 130  # the experiment's tasks: GLUE rows up to 128 tokens
    for seed, task in enumerate(("rte", "mrpc"), start=1):
        from_config(cfg, num_labels=2, seed=seed).save_pretrained(tmp / task, tokenizer_from=minilm_path)
    ns: dict = {}
    exec(WRITERS, ns)  # the scripts' batches and settings
    model, batches, kw = from_pretrained(tmp / "rte"), ns["checkpoint_batches"](), ns["CHECKPOINT_KW"]
    whole = mask_fisher(model, batches, **{k: v for k, v in kw.items() if k != "checkpoint_every"})
    np.savez(tmp / "whole.npz", head=whole.head, neuron=whole.neuron, num_examples=np.array(whole.num_examples))
    mask_fisher(model, batches[:1], checkpoint_dir=str(tmp / "ckpt_one"), **kw)
    (tmp / "run.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",) and not k.startswith("FISHER_JAX_")}
    # XLA's backend optimisations off: compiling, not running, is most of these tiny runs' time,
    # and both sides of every comparison compile the same way.
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", FISHER_JAX_COMPILATION_CACHE="0",
               FISHER_JAX_CACHE=str(tmp / "cache"), XLA_FLAGS="--xla_backend_optimization_level=0")
    address = f"127.0.0.1:{_free_port()}"
    launches = [("one", 1, 0)] + [("two", 2, i) for i in range(2)]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs = []
    for name, n, i in launches:  # output to files: a full pipe would stall a process mid-collective
        with open(tmp / f"{name}.{i}.out", "w") as out, open(tmp / f"{name}.{i}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, str(tmp / "run.py"), str(tmp / name), str(tmp / "model"),
                                           str(glue_dir), str(n), str(i), address], env=env, stdout=out, stderr=err))
    try:
        for proc in procs:
            proc.wait(timeout=300)  # a hang (processes waiting on different collectives) fails here
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    logs = []
    for (name, _, i), proc in zip(launches, procs):
        err = (tmp / f"{name}.{i}.err").read_text()
        assert proc.returncode == 0, err[-4000:]
        print(err.strip().splitlines()[-1])
        logs.append((tmp / f"{name}.{i}.out").read_text())
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"CPU time of the three processes: {cpu.ru_utime + cpu.ru_stime - cpu0.ru_utime - cpu0.ru_stime:.0f} s")
    return tmp, logs


def _record(tmp, name, pid):
    return json.loads((tmp / f"writers.{name}.{pid}.json").read_text())


def test_experiment_in_two_processes_writes_once_what_one_process_writes(runs):
    from safetensors.numpy import load_file

    tmp, _ = runs
    one, two = _record(tmp, "one", 0)["runs"][0], _record(tmp, "two", 0)["runs"][0]
    assert set(one["files"]) == set(two["files"])
    assert {"out/results.json", "out/results.md", "out/heatmap.png"} <= set(one["files"])
    assert sum(k.startswith("stats/") for k in one["files"]) == 2  # a mask Fisher per task
    assert _record(tmp, "two", 1)["runs"][0]["files"] == two["files"]  # what the follower saw
    assert _record(tmp, "two", 1)["writes"] == []  # and it wrote nothing, in either run
    assert one["cells"] == two["cells"] == _record(tmp, "two", 1)["runs"][0]["cells"] and len(one["cells"]) == 2
    r1, r2 = (json.loads((tmp / f"exp_{k}" / "out" / "results.json").read_text()) for k in ("one", "two"))
    assert r1["cells"].keys() == r2["cells"].keys() and r1["individual"].keys() == r2["individual"].keys()
    for key in r1["cells"]:
        assert r2["cells"][key]["fingerprint"] == r1["cells"][key]["fingerprint"]
        for task, sc in r1["cells"][key]["scores"].items():
            got = r2["cells"][key]["scores"][task]
            assert got["predictions"] == sc["predictions"] and got["num_examples"] == sc["num_examples"] == 12
            np.testing.assert_allclose(got["score"], sc["score"], rtol=1e-5, atol=1e-6, err_msg=f"{key} {task}")
    for name in (k for k in one["files"] if k.startswith("stats/")):
        a, b = load_file(str(tmp / "exp_one" / name)), load_file(str(tmp / "exp_two" / name))
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5 * float(np.abs(a[k]).max()), err_msg=f"{name} {k}")


def test_experiment_rerun_in_two_processes_reuses_every_result_and_statistic(runs):
    tmp, _ = runs
    first, again = _record(tmp, "two", 0)["runs"]
    stats = [k for k in first["files"] if k.startswith("stats/")]
    assert stats and all(again["files"][k] == first["files"][k] for k in stats)  # the same files, not rewritten
    assert again["files"]["out/results.json"][1] == first["files"]["out/results.json"][1]  # the same contents
    for pid in (0, 1):
        rerun = _record(tmp, "two", pid)["runs"][1]
        assert rerun["timings"]["mask_fisher"] == first["timings"]["mask_fisher"] > 0  # no statistics pass ran
        assert rerun["cells"] == first["cells"]


def test_decisions_of_process_zero_reach_every_process(runs):
    tmp, _ = runs
    for pid in (0, 1):
        got = _record(tmp, "two", pid)
        assert got["decided"] == {"pid": 0, "mixed": [1, 2.5, None, True, "x" * 1000]}
    assert _record(tmp, "two", 0)["error"] == ["KeyError", "'missing in process 0'"]
    assert _record(tmp, "two", 1)["error"] == ["FisherJaxError", "process 0: 'missing in process 0'"]


def test_process_helpers_in_one_process_leave_values_alone():
    from fisher_jax.distributed import barrier, broadcast_from_main, main_decides, padded_size

    value = {"a": (1, 2)}  # one process: no JSON round trip (the tuple stays a tuple)
    assert broadcast_from_main(value) is value and main_decides(lambda: value) is value
    with pytest.raises(ZeroDivisionError):
        main_decides(lambda: 1 / 0)
    barrier("nothing to wait for")
    assert [padded_size(n) for n in (0, 1, 64, 65, 1000, 1024, 1025)] == [64, 64, 64, 128, 1024, 1024, 2048]


def test_statistics_checkpoint_resumes_on_another_process_count(runs):
    from fisher_jax.models.hub import from_pretrained
    from fisher_jax.stats import mask_fisher

    tmp, _ = runs
    ns: dict = {}
    exec(WRITERS, ns)
    # two processes stopped after one batch; this (one) process resumes
    fm = mask_fisher(from_pretrained(tmp / "rte"), ns["checkpoint_batches"](), checkpoint_dir=str(tmp / "ckpt_two"),
                     **ns["CHECKPOINT_KW"])
    resumed = {"one process": {"head": fm.head, "neuron": fm.neuron, "num_examples": np.array(fm.num_examples)}}
    resumed.update({f"two processes, process {i}": dict(np.load(tmp / f"resumed.{i}.npz")) for i in range(2)})
    whole = dict(np.load(tmp / "whole.npz"))
    for where, got in resumed.items():  # two -> one, and one -> two (every process holds the result)
        assert int(got["num_examples"]) == int(whole["num_examples"]) == 12
        for k in ("head", "neuron"):
            np.testing.assert_allclose(got[k], whole[k], rtol=1e-5, atol=1e-5 * float(np.abs(whole[k]).max()),
                                       err_msg=f"{k}: {where}")
    assert np.abs(whole["head"]).max() > 0


def test_fine_tuning_checkpoint_resumes_on_another_process_count(runs, glue_dir):
    # The two-process run's checkpoints with its last step removed (a run killed after step 2),
    # resumed in this one process: the parameters of the uninterrupted two-process run.
    import shutil

    from fisher_jax.models.hub import from_pretrained, load_tokenizer
    from fisher_jax.train.finetune import FinetuneConfig, finetune
    from fisher_jax.tree import flatten

    tmp, _ = runs
    ckpt = tmp / "resume_ft_ckpt"
    shutil.copytree(tmp / "two_ft_ckpt", ckpt)
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert steps == [1, 2, 3], steps
    shutil.rmtree(ckpt / "3")
    ns: dict = {}
    exec(WRITERS, ns)  # the script's fine-tuning settings
    ft = FinetuneConfig(glue_dir=str(glue_dir), checkpoint_dir=str(ckpt), **ns["FINETUNE_KW"])
    tuned, hist = finetune(ft, model=from_pretrained(tmp / "model"), tokenizer=load_tokenizer(tmp / "model"),
                           progress=False)
    assert hist["resumed_from"] == 2
    two = dict(np.load(tmp / "two.0.npz"))
    for k, v in flatten(tuned.params).items():
        want = two[f"params/{k}"]
        np.testing.assert_allclose(v, want, rtol=1e-4, atol=max(1e-4 * float(np.abs(want).max()), 1e-6), err_msg=k)


def test_two_processes_equal_one(runs):
    tmp, _ = runs
    one = dict(np.load(tmp / "one.0.npz"))
    for pid in (0, 1):  # every process holds the whole (replicated / gathered) result
        two = dict(np.load(tmp / f"two.{pid}.npz"))
        assert set(two) == set(one)
        for k in one:
            scale = float(np.abs(one[k]).max()) if one[k].size else 0.0
            np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-5 * scale + 1e-7, err_msg=f"{k} (process {pid})")
    assert int(one["eval/num_examples"]) == 11 and one["eval/predictions"].shape == (11,)
    assert one["train/losses"].size == 1 and np.abs(one["mask/sampled/head"]).max() > 0


def test_each_process_reads_and_tokenises_only_its_part_of_every_split(runs):
    tmp, _ = runs
    one, *two = [json.loads((tmp / f"{name}.{pid}.data.json").read_text())
                 for name, pid in (("one", 0), ("two", 0), ("two", 1))]
    # one process reads every split whole; two read it in two byte ranges that partition it
    rows = {(task, split): n for task, split, _, n in one["read"]}
    assert one["read"] and all(kept == n for _, _, kept, n in one["read"])
    assert len(two[0]["read"]) == len(two[1]["read"]) > 0
    for a, b in zip(*(r["read"] for r in two)):
        total = rows[tuple(a[:2])]
        assert a[:2] == b[:2] and a[2] + b[2] == total and max(a[2], b[2]) < total, (a, b, total)
    # the same passes (the CLI's Fisher, fine-tuning's train/held-out/dev, evaluation, the experiment's
    # statistics and dev rows), each row tokenised by exactly one of the two processes
    passes = {(task, split) for task, split, _ in one["tokenised"]}
    assert {("rte", "train"), ("rte", "dev"), ("mrpc", "train"), ("mrpc", "dev")} <= passes
    assert len(two[0]["tokenised"]) == len(two[1]["tokenised"]) == len(one["tokenised"])
    for whole, a, b in zip(one["tokenised"], two[0]["tokenised"], two[1]["tokenised"]):
        assert whole[:2] == a[:2] == b[:2] and a[2] + b[2] == whole[2], (whole, a, b)
    assert sum(a[2] for a in two[0]["tokenised"]) < sum(w[2] for w in one["tokenised"])
    assert sum(b[2] for b in two[1]["tokenised"]) < sum(w[2] for w in one["tokenised"])


def test_command_line_run_writes_one_file_equal_to_one_process(runs):
    from safetensors.numpy import load_file

    tmp, logs = runs
    one, two = load_file(str(tmp / "one.safetensors")), load_file(str(tmp / "two.safetensors"))
    assert set(one) == set(two) and one
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-5 * float(np.abs(one[k]).max()), err_msg=k)
    assert not list(tmp.glob("*.tmp"))
    assert "->" in logs[1] and "->" not in logs[2]  # process 0 printed the summary, process 1 nothing


def test_launch_settings_from_flags_and_environment():
    from fisher_jax.distributed import Launch, detected_cluster, local_slice, resolve

    assert resolve(env={}) == Launch("none")
    assert resolve("h:1", 2, 1, env={}) == Launch("explicit", "h:1", 2, 1)
    env = {"FISHER_JAX_COORDINATOR": "10.0.0.1:99", "FISHER_JAX_NUM_PROCESSES": "4", "FISHER_JAX_PROCESS_ID": "3"}
    assert resolve(env=env) == Launch("explicit", "10.0.0.1:99", 4, 3)
    assert resolve(process_id=0, env=env).process_id == 0  # a flag beats its variable
    assert resolve(num_processes=1, env={}) == Launch("none")
    assert resolve(env={"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}).mode == "auto"
    assert resolve(env={"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "FISHER_JAX_DISTRIBUTED": "off"}).mode == "none"
    assert detected_cluster({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "1"}) is None
    assert detected_cluster({"OMPI_COMM_WORLD_SIZE": "3"}) == "mpi"
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    for args, match in [(("h:1", 2, None), "missing --process-id"), ((None, 2, 0), "missing --coordinator"),
                        (("h:1", 2, 2), "0..1"), (("nohost", 2, 0), "HOST:PORT"), (("h:1", 0, 0), ">= 1")]:
        with pytest.raises(FisherJaxError, match=match):
            resolve(*args, env={})
    with pytest.raises(FisherJaxError, match="integer"):
        resolve(env={"FISHER_JAX_NUM_PROCESSES": "two", "FISHER_JAX_COORDINATOR": "h:1"})
    assert local_slice(6, (1, 2)) == (slice(3, 6), 3) and local_slice(7, (1, 2)) == (slice(4, 8), 4)


def test_process_slices_concatenate_to_the_one_process_batch():
    from fisher_jax.data.batching import Encoded, make_batch, make_local_batch
    from fisher_jax.parallel import gather_rows, process_rows

    lengths = np.array([3, 5, 2, 4, 6, 1, 2])
    offsets = np.r_[0, np.cumsum(lengths)]
    enc = Encoded(np.arange(offsets[-1], dtype=np.int32) + 1, np.zeros(offsets[-1], np.int8), offsets,
                  np.arange(7) % 2, max_length=8, pad_token_id=0)
    idx = np.array([6, 0, 4, 2, 1])  # the longest row (6 tokens) is in process 0's slice only
    whole = make_batch(enc, idx, 5, (4, 8))
    parts = [make_local_batch(enc, idx, 5, (4, 8), part=(p, 2)) for p in range(2)]
    assert [p["input_ids"].shape for p in parts] == [(3, 8), (3, 8)]  # one length for the global batch
    for k in whole:
        glued = np.concatenate([p[k] for p in parts])
        np.testing.assert_array_equal(glued[:5], whole[k], err_msg=k)
    assert np.concatenate([p["weights"] for p in parts]).tolist() == [1, 1, 1, 1, 1, 0]
    assert make_local_batch(enc, idx, 5, (4, 8), part=(0, 1))["input_ids"].shape == (5, 8)
    b = {"input_ids": np.arange(10).reshape(5, 2), "labels": np.arange(5)}
    p1 = process_rows(b, part=(1, 2))
    assert p1["input_ids"][:, 0].tolist() == [6, 8, 0] and p1["weights"].tolist() == [1, 1, 0]
    assert process_rows(b, part=(0, 1))["input_ids"].shape == (5, 2)
    assert gather_rows([np.arange(3), np.arange(2)]).tolist() == [0, 1, 2, 0, 1]  # one process: concatenation


def test_cli_refuses_inconsistent_flags_in_one_line(capsys):
    from fisher_jax import cli

    assert cli.main(["--num-processes", "2", "evaluate", "--model", "m", "--task", "rte"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--coordinator" in err and "--process-id" in err
