"""Experiment driver end to end on tiny models with the real tokenizer and real GLUE rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fisher_jax as fj
from fisher_jax.errors import FisherJaxError
from fisher_jax.experiment.config import ExperimentConfig, DEFAULT_METHODS, from_dict, load_config
from fisher_jax.experiment.runner import Experiment, cell_key, subsets


def _tiny(num_labels: int, seed: int):
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=130, num_labels=num_labels)
    return fj.models.from_config(cfg, seed=seed)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("ckpt")
    base = _tiny(2, 0)
    base.save_pretrained(root / "base", tokenizer_from=minilm_path)
    paths = {}
    for i, (task, labels) in enumerate([("rte", 2), ("mrpc", 2), ("stsb", 1)]):
        m = _tiny(labels, 10 + i)
        # A "fine-tuned" body: the base plus a task-specific perturbation.
        body = fj.tree.tree_map_with_names(
            lambda n, x, y: x + 0.5 * (y - x), base.params["body"], m.params["body"])
        m = m.replace(params={"body": body, "head": m.params["head"]})
        m.save_pretrained(root / task, tokenizer_from=minilm_path)
        paths[task] = str(root / task)
    return root, paths


def _config(root, paths, glue_dir, **kw):
    base = dict(
        name="tiny", tasks=tuple(paths.items()), base=str(root / "base"), glue_dir=str(glue_dir),
        output_dir=str(root / "out"), cache_dir=str(root / "stats"), max_eval_examples=48, eval_batch_size=16,
        mask_fisher=(("estimator", "batch"), ("num_examples", 32), ("batch_size", 16)),
        full_fisher=(("estimator", "expected"), ("num_examples", 16), ("batch_size", 8)),
        gram=(("num_examples", 32), ("batch_size", 16)),
    )
    base.update(kw)
    return ExperimentConfig(**base)


def test_experiment_runs_every_cell_writes_reports_and_reruns_from_cache(tiny_checkpoints, glue_dir):
    root, paths = tiny_checkpoints
    config = _config(root, {k: paths[k] for k in ("rte", "stsb")}, glue_dir)
    assert len(subsets(_config(root, paths, glue_dir))) == 4  # three pairs + the all-task merge
    exp = Experiment(config, progress=False)
    results = exp.run()
    subs = subsets(config)
    assert subs == [("rte", "stsb")]
    for s in subs:
        for spec in config.methods:
            cell = results["cells"][cell_key(spec.label, s)]
            assert set(cell["scores"]) == set(s)
            for task in s:
                assert cell["scores"][task]["num_examples"] == 48
    md = (root / "out" / "results.md").read_text()
    for spec in config.methods:
        assert spec.label in md
    assert (root / "out" / "heatmap.png").stat().st_size > 1000
    assert (root / "out" / "averages.png").stat().st_size > 1000
    assert results["timings"]["mask_fisher"] > 0 and results["timings"]["gram"] > 0
    # RegMean must not silently fall back to simple averaging (the released driver's bug).
    rm = results["cells"][cell_key("regmean", ("rte", "stsb"))]["scores"]["stsb"]["pearson"]
    sm = results["cells"][cell_key("simple", ("rte", "stsb"))]["scores"]["stsb"]["pearson"]
    assert abs(rm - sm) > 1e-6

    # Rerun: every cell cached, statistics from files, nothing recomputed.
    saved = json.loads((root / "out" / "results.json").read_text())
    again = Experiment(config, progress=False)
    again.run()
    assert again.results["timings"] == saved["timings"]
    assert again.results["cells"] == saved["cells"]

    # Every input of a result invalidates exactly the results it determines (checked on load,
    # before anything is computed): the rest is reused, and results.json never mixes settings.
    import dataclasses

    def kept(cfg):
        loaded = Experiment(cfg, progress=False).results
        return {c["label"] for c in loaded["cells"].values()}, set(loaded["individual"].get("0", {}))

    labels = {spec.label for spec in config.methods}
    stats_users = {"mask_fisher": {"fisher_nodes", "fisher_nodes_node", "fisher_nodes_normalized"},
                   "full_fisher": {"fisher", "fisher_normalized"}, "gram": {"regmean"}}
    assert kept(config) == (labels, {"rte", "stsb"})
    for section, users in stats_users.items():
        for change in ({"seed": 7}, {"num_examples": 24}):
            changed = dataclasses.replace(config, **{section: tuple({**config.section(section), **change}.items())})
            assert kept(changed) == (labels - users, {"rte", "stsb"}), (section, change)
            assert exp.statistics_path("rte", section) != Experiment(changed, progress=False).statistics_path("rte", section)
    ties = next(s for s in config.methods if s.label == "ties")
    other = tuple(dataclasses.replace(s, kwargs=(("density", 0.5),)) if s is ties else s for s in config.methods)
    assert kept(dataclasses.replace(config, methods=other)) == (labels - {"ties"}, {"rte", "stsb"})
    assert kept(dataclasses.replace(config, max_eval_examples=40)) == (set(), set())
    assert kept(dataclasses.replace(config, eval_seed=3)) == (set(), set())
    fewer = tuple(s for s in config.methods if s.label != "dare")
    assert kept(dataclasses.replace(config, methods=fewer)) == (labels - {"dare"}, {"rte", "stsb"})
    import fisher_jax

    version, gram_file = fisher_jax.__version__, exp.statistics_path("rte", "gram")
    try:
        fisher_jax.__version__ = version + ".dev"
        assert kept(config) == (set(), set())
        assert Experiment(config, progress=False).statistics_path("rte", "gram") != gram_file
    finally:
        fisher_jax.__version__ = version

    # A checkpoint rewritten in place (a zoo model retrained at the same path) invalidates every
    # cell and score measured on it, though its path is unchanged.
    fj.from_pretrained(paths["stsb"]).save_pretrained(paths["stsb"])
    retrained = Experiment(config, progress=False)
    assert retrained.results["cells"] == {} and set(retrained.results["individual"]["0"]) == {"rte"}


def test_hyperparameter_search_uses_training_rows_not_dev(tiny_checkpoints, glue_dir, tmp_path):
    root, paths = tiny_checkpoints
    config = _config(root, {k: paths[k] for k in ("rte", "mrpc")}, glue_dir, output_dir=str(tmp_path),
                     methods=(DEFAULT_METHODS["task_arithmetic"],),
                     search=(("held_out", 32), ("grid", (("task_arithmetic", (("lam", (0.2, 1.0)),)),))))
    results = Experiment(config, progress=False).run()
    chosen = results["search"][cell_key("task_arithmetic", ("rte", "mrpc"))]
    assert [t["lam"] for t in chosen["tried"]] == [0.2, 1.0]
    best = max(chosen["tried"], key=lambda t: t["held_out_score"])
    assert chosen["chosen"] == {"lam": best["lam"]}  # the held-out winner, not the first or last tried
    assert results["cells"][cell_key("task_arithmetic", ("rte", "mrpc"))]["kwargs"]["lam"] == chosen["chosen"]["lam"]


def test_config_errors(tmp_path):
    with pytest.raises(FisherJaxError, match="unknown task 'glue9'|unknown GLUE task|Unknown task|unknown task"):
        from_dict({"tasks": {"glue9": "a", "rte": "b"}})
    with pytest.raises(FisherJaxError, match="at least two"):
        from_dict({"tasks": {"rte": "a"}})
    with pytest.raises(FisherJaxError, match="unknown method 'fishr'.*did you mean 'fisher'"):
        from_dict({"tasks": {"rte": "a", "mrpc": "b"}, "methods": ["fishr"]})
    with pytest.raises(FisherJaxError, match="unknown key 'method'.*did you mean 'methods'"):
        from_dict({"tasks": {"rte": "a", "mrpc": "b"}, "method": ["simple"]})
    with pytest.raises(FisherJaxError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


def test_packaged_configs_parse():
    from pathlib import Path

    folder = Path(fj.__file__).parent / "configs"
    zoo, paper = load_config(folder / "minilm_zoo.yaml"), load_config(folder / "paper_bert_base.yaml")
    assert zoo.replicates == 3 and len(zoo.tasks) == 3 and len(zoo.methods) == 15
    assert {"regmean_plusplus", "slerp", "model_stock", "breadcrumbs", "della", "adamerging"} <= {m.label for m in zoo.methods}
    assert paper.replicates == 1 and len(paper.tasks) == 7 and len(paper.methods) == 8
    assert len(subsets(zoo)) == 3 + 1  # every pair and the all-task merge
    fb = load_config(folder / "fusionbench_gpt2_glue.yaml")
    assert [p for _, (p,) in fb.tasks] == [f"tanganke/gpt2_{t}" for t in ("cola", "mnli", "mrpc", "qnli", "qqp", "rte",
                                                                        "sst2")]
    assert subsets(fb) == [tuple(fb.task_names)] and fb.max_eval_examples is None
    assert {"regmean", "regmean_plusplus", "fisher_nodes"} <= {m.label for m in fb.methods}
    for cfg in (zoo, paper, fb):  # results go to the cache, never into a checkout
        assert cfg.output_dir.startswith("~/.cache/fisher_jax/")


def _write_task_file(folder, glue_dir, n_train=64, n_dev=40):
    """A user's own pair-classification task: RTE rows re-saved as CSV files plus a task file."""
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        with open(glue_dir / "RTE" / f"{split}.tsv", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
        with open(folder / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["premise", "hypothesis", "label"])
            w.writerows([(r["sentence1"], r["sentence2"], r["label"]) for r in rows])
    (folder / "entail.yaml").write_text(
        "name: my_entail\ntrain: train.csv\ndev: dev.csv\ntext: [premise, hypothesis]\nlabel: label\n"
        "labels: [entailment, not_entailment]\nmetrics: [accuracy]\nmax_length: 128\n")
    return folder / "entail.yaml"


def test_experiment_on_a_task_file_maps_the_checkpoints_label_order(tiny_checkpoints, glue_dir, tmp_path):
    """A task file in an experiment config (relative to the config's folder); a checkpoint whose
    id2label lists the classes in the other order, with its head's columns swapped to match, gets
    exactly the scores and statistics of the original checkpoint."""
    import yaml

    from fisher_jax.models.hub import from_pretrained

    root, paths = tiny_checkpoints
    task_file = _write_task_file(tmp_path / "data", glue_dir)
    swapped = tmp_path / "swapped"
    m = from_pretrained(paths["rte"])
    head = fj.tree.unflatten({n: (np.asarray(x)[..., ::-1] if n.startswith("classifier/") else x)
                              for n, x in fj.tree.flatten(m.params["head"]).items()})
    m.replace(params={"body": m.params["body"], "head": head}).save_pretrained(swapped, tokenizer_from=paths["rte"])
    cfg = json.loads((swapped / "config.json").read_text())
    cfg["id2label"] = {"0": "not_entailment", "1": "entailment"}
    cfg["label2id"] = {"not_entailment": 0, "entailment": 1}
    (swapped / "config.json").write_text(json.dumps(cfg))

    scores = {}
    for name, ckpt in (("plain", paths["rte"]), ("swapped", str(swapped))):
        out = tmp_path / name
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
            "tasks": {"mine": {"task": "data/entail.yaml", "checkpoint": ckpt}, "stsb": paths["stsb"]},
            "methods": ["fisher_nodes"], "glue_dir": str(glue_dir), "output_dir": str(out),
            "cache_dir": str(tmp_path / f"stats_{name}"), "max_eval_examples": 32, "eval_batch_size": 16,
            "mask_fisher": {"estimator": "empirical", "num_examples": 16, "batch_size": 8}}))
        config = load_config(tmp_path / f"{name}.yaml")
        assert config.task_names[0] == "my_entail"
        exp = Experiment(config, progress=False)
        results = exp.run()
        mask = exp.statistics("my_entail", "mask_fisher")
        scores[name] = (results["individual"]["0"]["my_entail"]["predictions"],
                        results["cells"][cell_key("fisher_nodes", ("my_entail", "stsb"))]["scores"]["my_entail"]["score"],
                        np.asarray(mask.head))
        assert load_config(tmp_path / f"{name}.yaml").to_dict()["tasks"]["my_entail"]["task"] == str(task_file)
    assert scores["plain"][0] == scores["swapped"][0]
    assert scores["plain"][1] == pytest.approx(scores["swapped"][1], abs=1e-6)
    np.testing.assert_allclose(scores["plain"][2], scores["swapped"][2], rtol=1e-5, atol=1e-9)


def test_checkpoints_with_different_tokenizers_fail_before_anything_is_computed(tiny_checkpoints, glue_dir, tmp_path):
    import shutil

    root, paths = tiny_checkpoints
    other = tmp_path / "other_tok"
    shutil.copytree(paths["stsb"], other)
    vocab = (other / "vocab.txt").read_text().splitlines()
    vocab[1000], vocab[1001] = vocab[1001], vocab[1000]  # same size, other ids: a different tokenizer
    (other / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (other / "tokenizer.json").unlink()
    config = _config(root, {"rte": paths["rte"], "stsb": str(other)}, glue_dir, output_dir=str(tmp_path / "out"),
                     cache_dir=str(tmp_path / "stats"), methods=(DEFAULT_METHODS["simple"],))
    with pytest.raises(FisherJaxError, match="different tokenizers.*other_tok"):
        Experiment(config, progress=False).run()
    assert not (tmp_path / "stats").exists() and not json.loads((tmp_path / "out" / "results.json").read_text()
                                                                 if (tmp_path / "out" / "results.json").exists()
                                                                 else "{}").get("individual")
