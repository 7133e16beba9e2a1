"""The command line end to end on a user's own data: task files over CSV files the test writes,
tiny random BERTs, then `fisher-jax finetune -> fisher -> gram -> merge -> evaluate` through
`fisher_jax.cli.main`, and a checkpoint whose labels come in another order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fisher_jax as fj
from fisher_jax import cli

WORDS = "good great fine bad awful poor movie film plot actor music long short red blue green".split()


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def user_tasks(tmp_path_factory):
    """Two task files of the user's own making: a two-class pair task (CSV, labels as names) and a
    three-class single-sentence task (JSON Lines train, TSV dev, labels as names and ids)."""
    root = tmp_path_factory.mktemp("user")
    rs = np.random.RandomState(0)
    rows = ["premise,hypothesis,label"]
    for i in range(24):
        a, b = rs.choice(WORDS, 3), rs.choice(WORDS, 2)
        rows.append(f"{' '.join(a)},{' '.join(b)},{'same' if i % 2 else 'different'}")
    _write(root / "pairs" / "train.csv", "\n".join(rows) + "\n")
    _write(root / "pairs" / "dev.csv", "\n".join(rows[:13]) + "\n")
    pairs = _write(root / "pairs.yaml", """\
name: my_pairs
train: pairs/train.csv
dev: pairs/dev.csv
text: [premise, hypothesis]
labels: [different, same]
max_length: 16
""")
    # labels as names and as ids, in a JSON Lines train file and a TSV dev file
    polar = ["negative", "positive"]
    lines = [json.dumps({"sentence": " ".join(rs.choice(WORDS, 4)), "polarity": polar[i % 2] if i % 3 else i % 2})
             for i in range(18)]
    _write(root / "polarity" / "train.jsonl", "\n".join(lines) + "\n")
    dev = ["sentence\tpolarity"] + [f"{' '.join(rs.choice(WORDS, 3))}\t{polar[i % 2]}" for i in range(9)]
    _write(root / "polarity" / "dev.tsv", "\n".join(dev) + "\n")
    single = _write(root / "polarity.yaml", """\
name: my_polarity
train: polarity/train.jsonl
dev: polarity/dev.tsv
text: sentence
label: polarity
labels: [negative, positive]
metrics: [accuracy, mcc]
max_length: 16
""")
    return root, pairs, single


@pytest.fixture(scope="module")
def checkpoints(user_tasks):
    """A tiny base and two "fine-tuned" models (the base plus a random perturbation, one
    architecture so every command compiles once), each saved with a word-level tokenizer.
    Built in PyTorch: a Flax init of the same model costs seconds of tracing."""
    import torch
    import transformers as tf

    root = user_tasks[0]
    vocab = _write(root / "vocab.txt", "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = tf.BertTokenizer(str(vocab))
    torch.manual_seed(0)
    out = {}
    for name, labels in (("base", None), ("pairs", ["different", "same"]), ("polarity", ["negative", "positive"])):
        cfg = tf.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=64, num_labels=2)
        if labels is not None:
            cfg.id2label = dict(enumerate(labels))
            cfg.label2id = {n: i for i, n in enumerate(labels)}
        model = tf.BertForSequenceClassification(cfg)
        if labels is None:
            base = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            model.load_state_dict({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                                   for k, v in base.items()})
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(str(root / name))
        out[name] = root / name
    return out


def _relabelled(model, names: list[str]):
    """``model`` with ``id2label`` = ``names`` (its config copied)."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}
    return model.replace(config=config)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _no_compilation_cache(monkeypatch):
    monkeypatch.setenv("FISHER_JAX_COMPILATION_CACHE", "0")


def test_task_files_through_every_subcommand(user_tasks, checkpoints, tmp_path, capsys):
    _, pairs, polarity = user_tasks
    stats = {}
    for name, task in (("pairs", pairs), ("polarity", polarity)):
        f = tmp_path / f"{name}.fisher.safetensors"
        code, out, err = _run(["fisher", "--model", checkpoints[name], "--task", task, "--out", f,
                               "--num-examples", 8, "--batch-size", 4, "--no-progress"], capsys)
        assert code == 0, err
        assert "examples of my_" in out and f.is_file()
        fisher = fj.load_stats(f)
        assert fisher.num_examples == 8 and np.all(np.asarray(fisher.head) >= 0)
        assert float(np.sum(fisher.head)) > 0
        g = tmp_path / f"{name}.gram.safetensors"
        code, _, err = _run(["gram", "--model", checkpoints[name], "--task", task, "--out", g,
                             "--num-examples", 8, "--batch-size", 4, "--no-progress"], capsys)
        assert code == 0, err
        stats[name] = (f, g)

    merge_parser = cli.build_parser("merge")._subparsers._group_actions[0].choices["merge"]
    out_flag = "--out-dir" if "--out-dir" in merge_parser._option_string_actions else "--out"
    merged = tmp_path / "merged"
    code, out, err = _run(["merge", "--method", "fisher_nodes", "--models", checkpoints["pairs"], checkpoints["polarity"],
                           "--stats", stats["pairs"][0], stats["polarity"][0], out_flag, merged], capsys)
    assert code == 0, err
    report = json.loads((merged / "merge_report.json").read_text())
    assert len(report["outputs"]) == 2
    code, _, err = _run(["merge", "--method", "regmean", "--models", checkpoints["pairs"], checkpoints["polarity"],
                         "--stats", stats["pairs"][1], stats["polarity"][1], out_flag, tmp_path / "regmean"], capsys)
    assert code == 0, err

    scores = {}
    for (name, task), folder in zip((("pairs", pairs), ("polarity", polarity)), report["outputs"]):
        out_json = tmp_path / f"{name}.eval.json"
        code, _, err = _run(["evaluate", "--model", folder, "--task", task, "--out", out_json], capsys)
        assert code == 0, err
        scores[name] = json.loads(out_json.read_text())
    assert scores["pairs"]["task"] == "my_pairs" and scores["pairs"]["num_examples"] == 12
    assert set(scores["pairs"]) >= {"accuracy", "f1", "score"}
    assert scores["polarity"]["task"] == "my_polarity" and scores["polarity"]["num_examples"] == 9
    assert set(scores["polarity"]) >= {"accuracy", "mcc", "score"} and "f1" not in scores["polarity"]
    # the merged model is the merge's output for its task, not an untouched input
    assert scores["pairs"]["model"] != str(checkpoints["pairs"])


def _permuted(model, order: list[int], names: list[str]):
    """``model`` with its output columns reordered (new column k = old column order[k]) and an
    ``id2label`` that says so: the same classifier, written in another label order."""
    head = {k: (v[..., order] if k in ("classifier/kernel", "classifier/bias") else v)
            for k, v in fj.tree.flatten(model.params["head"]).items()}
    return _relabelled(model.replace(params={"body": model.params["body"], "head": fj.tree.unflatten(head)}), names)


def test_evaluate_maps_a_checkpoints_own_label_order(user_tasks, checkpoints, tmp_path, capsys):
    polarity = user_tasks[2]
    model = fj.from_pretrained(checkpoints["polarity"])
    assert set(fj.tree.flatten(model.params["head"])) >= {"classifier/kernel", "classifier/bias"}
    shuffled = tmp_path / "shuffled"
    _permuted(model, [1, 0], ["POSITIVE", "NEGATIVE"]).save_pretrained(
        shuffled, tokenizer_from=str(checkpoints["polarity"]))
    results = {}
    for name, folder in (("own", checkpoints["polarity"]), ("shuffled", shuffled)):
        code, out, err = _run(["evaluate", "--model", folder, "--task", polarity], capsys)
        assert code == 0, err
        results[name] = json.loads(out)
    for metric in ("accuracy", "mcc", "score"):
        assert results["shuffled"][metric] == results["own"][metric]
    # the empirical mask Fisher reads each row's label: mapped to the checkpoint's id, it is the same
    fishers = {}
    for name, folder in (("own", checkpoints["polarity"]), ("shuffled", shuffled)):
        f = tmp_path / f"{name}.safetensors"
        code, _, err = _run(["fisher", "--model", folder, "--task", polarity, "--out", f, "--num-examples", 8,
                             "--batch-size", 4, "--no-progress"], capsys)
        assert code == 0, err
        fishers[name] = fj.load_stats(f)
    np.testing.assert_allclose(fishers["shuffled"].head, fishers["own"].head, rtol=1e-5)
    np.testing.assert_allclose(fishers["shuffled"].neuron, fishers["own"].neuron, rtol=1e-5)
    # without the mapping the shuffled checkpoint's predictions would be the other class on every row
    logits = np.asarray(model(np.array([[2, 5, 6, 3]])))
    assert np.argmax(logits) != np.argmax(logits[:, [1, 0]])

    unknown = tmp_path / "unknown"
    _relabelled(model, ["sad", "happy"]).save_pretrained(unknown, tokenizer_from=str(checkpoints["polarity"]))
    code, _, err = _run(["evaluate", "--model", unknown, "--task", polarity], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "do not match task my_polarity's (0=negative, 1=positive)" in err


def test_finetune_zoo_then_experiment_from_the_command_line(user_tasks, checkpoints, tmp_path, capsys):
    """`fisher-jax finetune` trains the tiny base for two steps on a task file; `fisher-jax zoo` fine-tunes the tiny base on both task files (one epoch of their few rows),
    then `fisher-jax experiment` merges the zoo from a YAML config; a rerun recomputes nothing."""
    import yaml

    root, pairs, polarity = user_tasks
    tuned = tmp_path / "tuned"
    code, out, err = _run(["finetune", "--model", checkpoints["base"], "--task", pairs, "--out-dir", tuned,
                           "--max-steps", 2, "--batch-size", 8, "--learning-rate", 1e-3, "--no-progress"], capsys)
    assert code == 0, err
    history = json.loads((tuned / "finetune_history.json").read_text())["history"]
    assert history["total_steps"] == 2 and (tuned / "model.safetensors").is_file()
    assert fj.from_pretrained(tuned).config.id2label == {0: "different", 1: "same"}
    zoo = tmp_path / "zoo"
    code, out, err = _run(["zoo", "--base", checkpoints["base"], "--tasks", pairs, polarity, "--out-dir", zoo,
                           "--seeds", 0, "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads((zoo / "zoos.json").read_text())
    records = summary["seeds"]["0"]["tasks"]
    assert set(records) == {"my_pairs", "my_polarity"}
    for name, record in records.items():
        assert (Path(record["folder"]) / "model.safetensors").is_file(), name
        assert 0.0 <= record["metrics"]["score"] <= 1.0 and record["total_steps"] >= 1
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny zoo", "base": str(checkpoints["base"]),
        "tasks": {"my_pairs": {"task": str(pairs), "checkpoint": records["my_pairs"]["folder"]},
                  "my_polarity": {"task": str(polarity), "checkpoint": records["my_polarity"]["folder"]}},
        "methods": ["simple", "task_arithmetic", "fisher_nodes"],
        "mask_fisher": {"num_examples": 8, "batch_size": 4},
        "pairs": True, "all_tasks": False, "max_eval_examples": 0}))
    results = tmp_path / "results"
    code, out, err = _run(["experiment", "--config", config, "--out-dir", results, "--no-progress"], capsys)
    assert code == 0, err
    saved = json.loads((results / "results.json").read_text())
    assert sorted(saved["cells"]) == sorted(f"{m}|my_pairs+my_polarity|r0"
                                            for m in ("simple", "task_arithmetic", "fisher_nodes"))
    for cell in saved["cells"].values():
        for task, score in cell["scores"].items():
            assert 0.0 <= score["score"] <= 1.0 and score["num_examples"] == {"my_pairs": 12, "my_polarity": 9}[task]
    assert (results / "results.md").is_file() and "fisher_nodes" in (results / "results.md").read_text()
    fingerprints = {k: v["fingerprint"] for k, v in saved["cells"].items()}
    code, out, err = _run(["experiment", "--config", config, "--out-dir", results, "--no-progress"], capsys)
    assert code == 0, err
    again = json.loads((results / "results.json").read_text())
    assert {k: v["fingerprint"] for k, v in again["cells"].items()} == fingerprints
    assert again["timings"]["merge"] == saved["timings"]["merge"]  # nothing was merged again


def test_demo_from_the_command_line(checkpoints, glue_dir, tmp_path, capsys, monkeypatch):
    """`fisher-jax demo` end to end with the tiny base and a few rows per task (the real budgets
    take minutes): it fine-tunes both tasks, computes every statistic, merges, and prints the table;
    a second run reuses everything."""
    from fisher_jax.experiment import demo

    tiny = dict(max_train_examples=16, max_steps=2, learning_rate=1e-3, batch_size=8, max_eval_examples=16,
                max_length=32, buckets=(32,))
    monkeypatch.setattr(demo, "find_base", lambda: str(checkpoints["base"]))
    monkeypatch.setattr(demo, "DEMO_TASKS", {"sst2": tiny, "stsb": tiny})
    # one method per statistic kind the demo computes (each kind is one more compilation)
    monkeypatch.setattr(demo, "DEMO_METHODS", ("simple", "fisher", "fisher_nodes_normalized", "regmean"))
    monkeypatch.setattr(demo, "DEMO_EVAL_EXAMPLES", 16)
    monkeypatch.setattr(demo, "DEMO_STATS_EXAMPLES", 8)
    out_dir = tmp_path / "demo"
    code, out, err = _run(["demo", "--glue-dir", glue_dir, "--out-dir", out_dir, "--no-progress"], capsys)
    assert code == 0, err
    assert "fine-tuning MiniLM on sst2" in out and "fine-tuning MiniLM on stsb" in out
    table = out[out.index("## Merged"):]
    for label in ("simple", "fisher", "fisher_nodes_normalized", "regmean"):
        assert f"| {label}" in table or f" {label} |" in table, label
    saved = json.loads((out_dir / "results" / "results.json").read_text())
    assert len(saved["cells"]) == 4 and set(saved["individual"]["0"]) == {"sst2", "stsb"}
    code, out, err = _run(["demo", "--glue-dir", glue_dir, "--out-dir", out_dir, "--no-progress"], capsys)
    assert code == 0, err
    assert "[demo] fine-tuning" not in out and "## Merged" in out
