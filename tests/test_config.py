"""Experiment configs are validated completely when loaded, before any model or statistic exists."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
from pathlib import Path

import pytest
import yaml

import fisher_jax as fj
from fisher_jax.errors import FisherJaxError
from fisher_jax.experiment.config import MERGE_SUPPLIED, ExperimentConfig, from_dict, load_config

PACKAGED = Path(fj.__file__).parent / "configs"


def _raw(tmp_path: Path, **extra) -> dict:
    """A valid config whose checkpoints do not exist: loading must never need them."""
    return {"name": "t", "tasks": {"rte": str(tmp_path / "missing" / "rte"), "mrpc": str(tmp_path / "missing" / "mrpc")},
            "base": str(tmp_path / "missing" / "base"), "output_dir": str(tmp_path / "out"), **extra}


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def nothing_computed(monkeypatch):
    """Loading a model or computing a statistic fails the test (signatures kept: the config reads them)."""
    import fisher_jax.models.hub as hub
    import fisher_jax.stats as stats

    def forbidden(fn):
        @functools.wraps(fn)
        def call(*a, **k):
            raise AssertionError("a model was loaded or a statistic computed before the config was validated")
        return call

    monkeypatch.setattr(hub, "from_pretrained", forbidden(hub.from_pretrained))
    for name in ("mask_fisher", "full_fisher", "gram_stats"):
        monkeypatch.setattr(stats, name, forbidden(getattr(stats, name)))


TYPOS = [
    ({"mask_fisher": {"estimater": "batch"}}, r"mask_fisher: unknown key 'estimater' \(did you mean 'estimator'\?\)"),
    ({"full_fisher": {"num_exampels": 64}}, r"full_fisher: unknown key 'num_exampels' \(did you mean 'num_examples'\?\)"),
    ({"gram": {"mask_paddin": False}}, r"gram: unknown key 'mask_paddin' \(did you mean 'mask_padding'\?\)"),
    ({"mask_fisher": {"estimator": "bach"}}, r"mask_fisher.estimator: 'bach' is not one of .*\(did you mean 'batch'\?\)"),
    ({"pair": True}, r"unknown key 'pair' \(did you mean 'pairs'\?\)"),
    ({"search": {"held_ot": 64}}, r"search: unknown key 'held_ot' \(did you mean 'held_out'\?\)"),
    ({"search": {"grid": {"tis": {"lam": [0.5]}}}}, r"search.grid: 'tis' is not a label in methods \(did you mean 'ties'\?\)"),
    ({"methods": ["simple", "fishr"]}, r"methods: unknown method 'fishr' \(did you mean 'fisher'\?\)"),
    ({"methods": [{"method": "ties", "dnsity": 0.3}]},
     r"methods.ties: method 'ties' takes no keyword 'dnsity' \(did you mean 'density'\?\)"),
    ({"methods": ["ties"], "method_kwargs": {"ties": {"lamb": 0.5}}},
     r"method_kwargs.ties: method 'ties' takes no keyword 'lamb' \(did you mean 'lam'\?\)"),
    ({"methods": ["ties", "simple"], "method_kwargs": {"tie": {"lam": 0.5}}},
     r"method_kwargs: 'tie' is not a label in methods \(did you mean 'ties'\?\)"),
    ({"methods": [{"method": "ties", "scope": "globl"}]}, r"methods.ties.scope: 'globl' is not one of .*'global'\?"),
    ({"tasks": {"rtee": "a", "mrpc": "b"}}, r"tasks: unknown GLUE task 'rtee' \(did you mean 'rte'\?\)"),
]


@pytest.mark.parametrize("extra, message", TYPOS)
def test_a_typo_fails_at_load_with_did_you_mean_before_anything_is_computed(tmp_path, nothing_computed, extra, message):
    from fisher_jax.experiment.runner import run_experiment

    path = _write(tmp_path, _raw(tmp_path, **extra))
    with pytest.raises(FisherJaxError, match=message) as err:
        run_experiment(str(path), progress=False)  # the runner's own entry point: load, then compute
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_merge_supplied_arguments_are_not_user_keywords(tmp_path):
    for method, key in (("fisher_nodes", "fishers"), ("fisher_nodes", "mask_fishers"), ("regmean", "grams"),
                        ("ties", "base")):
        with pytest.raises(FisherJaxError, match=f"takes no keyword '{key}'"):
            from_dict(_raw(tmp_path, methods=[{"method": method, key: 1}]))
    with pytest.raises(FisherJaxError, match="mask_fisher: unknown key 'progress'"):
        from_dict(_raw(tmp_path, mask_fisher={"progress": False}))


BAD_VALUES = [
    ({"pairs": "yes"}, r"pairs: 'yes' is not bool"),
    ({"seed": 1.5}, r"seed: 1.5 is not int"),
    ({"eval_seed": -1}, r"eval_seed must be >= 0, got -1"),
    ({"eval_batch_size": 0}, r"eval_batch_size must be >= 1, got 0"),
    ({"max_eval_examples": -5}, r"max_eval_examples must be >= 1, got -5"),
    ({"mask_fisher": {"batch_size": 0}}, r"mask_fisher.batch_size must be >= 1, got 0"),
    ({"full_fisher": {"num_examples": 2.5}}, r"full_fisher.num_examples: 2.5 is not int"),
    ({"full_fisher": {"chunk_size": True}}, r"full_fisher.chunk_size: True is not int"),
    ({"gram": {"mask_padding": "no"}}, r"gram.mask_padding: 'no' is not bool"),
    ({"gram": {"seed": -2}}, r"gram.seed must be >= 0, got -2"),
    ({"gram": [1, 2]}, r"gram: must be a mapping"),
    ({"method_kwargs": {"ties": {"density": 1.5}}}, r"method_kwargs.ties.density must be in \(0, 1\], got 1.5"),
    ({"method_kwargs": {"dare": {"drop_rate": 1.0}}}, r"method_kwargs.dare.drop_rate must be in \[0, 1\), got 1.0"),
    ({"method_kwargs": {"regmean": {"alpha": "high"}}}, r"method_kwargs.regmean.alpha: 'high' is not float"),
    # PyYAML reads 1e-6 (no '.') as a string: say so rather than "not a float" alone.
    ({"method_kwargs": {"fisher": {"floor": "1e-6"}}}, r"fisher.floor: '1e-6' is not float \(YAML 1.1 .* 1.0e-6\)"),
    ({"methods": ["simple", "simple"]}, r"methods: label 'simple' appears twice"),
    ({"methods": []}, r"methods: must be a non-empty list"),
    ({"search": {"grid": {"ties": {"lam": 0.5}}}}, r"search.grid.ties.lam: must be a non-empty list"),
    ({"search": {"grid": {"ties": {"density": [0.2, 3.0]}}}}, r"search.grid.ties.density must be in \(0, 1\], got 3.0"),
]


@pytest.mark.parametrize("extra, message", BAD_VALUES)
def test_wrong_types_and_ranges_fail_at_load(tmp_path, nothing_computed, extra, message):
    with pytest.raises(FisherJaxError, match=message) as err:
        from_dict(_raw(tmp_path, **extra), "where.yaml")
    assert str(err.value).startswith("where.yaml: ") and "\n" not in str(err.value)


def test_accepted_keywords_follow_the_callees_signatures(tmp_path, monkeypatch):
    import fisher_jax.merging as merging
    import fisher_jax.stats as stats

    def simple(bodies, wobble: float = 0.25):  # a method that gained a keyword
        return bodies[0]

    def gram_stats(model, batches, mask_padding: bool = True, fresh: int = 3, progress: bool = True):
        return None

    monkeypatch.setitem(merging.METHODS, "simple", simple)
    monkeypatch.setattr(stats, "gram_stats", gram_stats)
    cfg = from_dict(_raw(tmp_path, methods=["simple"], method_kwargs={"simple": {"wobble": 0.5}}, gram={"fresh": 4}))
    assert cfg.resolved_method_kwargs("simple") == {"wobble": 0.5}
    assert cfg.section("gram") == {"num_examples": 256, "batch_size": 32, "seed": 0, "mask_padding": True, "fresh": 4}
    assert cfg.stats_kwargs("gram") == {"mask_padding": True, "fresh": 4}  # data keys are the runner's
    with pytest.raises(FisherJaxError, match="fresh: 'x' is not int"):
        from_dict(_raw(tmp_path, methods=["simple"], gram={"fresh": "x"}))


def test_estimator_names_come_from_stats(tmp_path, monkeypatch):
    import fisher_jax.stats.records as records

    monkeypatch.setattr(records, "ESTIMATORS", ("batch", "expected", "newone"))
    assert from_dict(_raw(tmp_path, mask_fisher={"estimator": "newone"})).section("mask_fisher")["estimator"] == "newone"
    with pytest.raises(FisherJaxError, match="full_fisher.estimator: 'sampled' is not one of 'batch', 'expected', 'newone'"):
        from_dict(_raw(tmp_path, full_fisher={"estimator": "sampled"}))
    monkeypatch.setattr(records, "ESTIMATORS", ("expected",))  # the config's own default, batch, is checked too
    with pytest.raises(FisherJaxError, match="mask_fisher.estimator: 'batch' is not one of 'expected'"):
        from_dict(_raw(tmp_path, mask_fisher={"num_examples": 8}))


def test_resolved_dict_has_method_defaults_section_seeds_and_round_trips(tmp_path):
    from fisher_jax.merging import METHODS

    cfg = from_dict(_raw(tmp_path, seed=7, mask_fisher={"seed": 3, "num_examples": 64},
                         method_kwargs={"ties": {"lam": 0.7}}))
    # ties(bodies, base, density=0.2, lam=1.0, scope="global"): the label's 0.2, the override's 0.7.
    assert cfg.resolved_method_kwargs("ties") == {"density": 0.2, "lam": 0.7, "scope": "global"}
    for spec in cfg.methods:  # every other keyword of every method: its function's default
        resolved = cfg.resolved_method_kwargs(spec.label)
        for name, p in inspect.signature(METHODS[spec.method]).parameters.items():
            if p.default is not inspect.Parameter.empty and name not in dict(spec.kwargs) and name not in MERGE_SUPPLIED:
                assert resolved[name] == p.default, (spec.label, name)
    d = cfg.to_dict()
    assert d["mask_fisher"]["seed"] == 3 and d["mask_fisher"]["num_examples"] == 64
    assert d["mask_fisher"]["estimator"] == "batch" and d["mask_fisher"]["batch_size"] == 32
    assert d["full_fisher"]["seed"] == 7 and d["gram"]["seed"] == 7 and d["gram"]["mask_padding"] is True
    assert cfg.section("full_fisher") == d["full_fisher"] and d["eval_seed"] == 0
    assert {m["label"]: m for m in d["methods"]}["ties"]["scope"] == "global"
    assert json.loads(json.dumps(d)) == d  # JSON types only: a cache key
    assert from_dict(d).to_dict() == d
    # The section seed follows the top-level seed unless the section sets its own.
    later = dataclasses.replace(cfg, seed=11)
    assert later.section("gram")["seed"] == 11 and later.section("mask_fisher")["seed"] == 3
    # The CLI's --max-eval-examples 0 means the whole dev split, the same as null.
    assert dataclasses.replace(cfg, max_eval_examples=0).max_eval_examples is None
    with pytest.raises(FisherJaxError, match="eval_seed must be >= 0"):
        dataclasses.replace(cfg, eval_seed=-1)


def test_several_checkpoints_per_task(tmp_path, caplog):
    raw = _raw(tmp_path, tasks={"sst2": ["a0", "a1", "a2"], "stsb": ["b0", "b1", "b2"], "rte": "c"})
    with caplog.at_level(logging.WARNING, logger="fisher_jax.experiment.config"):
        cfg = from_dict(raw)
    assert cfg.tasks == (("sst2", ("a0", "a1", "a2")), ("stsb", ("b0", "b1", "b2")), ("rte", ("c",)))
    assert cfg.replicates == 3 and cfg.task_names == ["sst2", "stsb", "rte"]
    assert cfg.checkpoints(1) == {"sst2": "a1", "stsb": "b1", "rte": "c"}
    assert "rte" in caplog.text and "3 replicates" in caplog.text
    with pytest.raises(FisherJaxError, match=r"replicate must be in 0..2, got 3"):
        cfg.checkpoints(3)
    single = from_dict(_raw(tmp_path))
    assert single.replicates == 1 and single.checkpoints(0) == dict(_raw(tmp_path)["tasks"])
    with pytest.raises(FisherJaxError, match="same number of checkpoints.*sst2: 3, stsb: 2"):
        from_dict(_raw(tmp_path, tasks={"sst2": ["a0", "a1", "a2"], "stsb": ["b0", "b1"]}))
    with pytest.raises(FisherJaxError, match="tasks.stsb: give a checkpoint"):
        from_dict(_raw(tmp_path, tasks={"sst2": "a", "stsb": []}))
    with pytest.raises(FisherJaxError, match="'SST-2' names sst2 a second time"):
        from_dict(_raw(tmp_path, tasks={"sst2": "a", "SST-2": "b"}))
    # Code may still pass (task, path) pairs, stored as one-checkpoint tuples.
    code = ExperimentConfig(name="c", tasks=(("rte", "x"), ("mrpc", Path("y"))))
    assert code.tasks == (("rte", ("x",)), ("mrpc", ("y",)))


@pytest.mark.parametrize("name", ["minilm_zoo", "paper_bert_base"])
def test_packaged_configs_load(name):
    by_path, by_name = load_config(PACKAGED / f"{name}.yaml"), load_config(name)
    assert by_path == by_name and len(by_path.tasks) >= 3
    assert all(len(paths) in (1, by_path.replicates) for _, paths in by_path.tasks)
    assert from_dict(by_path.to_dict()).to_dict() == by_path.to_dict()


def test_plan_skips_subsets_a_method_cannot_take(tmp_path, nothing_computed):
    from fisher_jax.experiment.runner import Experiment

    raw = _raw(tmp_path, tasks={"sst2": "a", "mrpc": "b", "stsb": "c"}, methods=["simple", "slerp"],
               pairs=True, all_tasks=True)
    plan = [(spec.label, "+".join(s)) for spec, s, _ in Experiment(from_dict(raw), progress=False).plan()]
    assert ("slerp", "sst2+mrpc") in plan and ("simple", "sst2+mrpc+stsb") in plan
    assert ("slerp", "sst2+mrpc+stsb") not in plan and len(plan) == 3 * 2 + 1
    with pytest.raises(FisherJaxError, match="'slerp' merges at most 2 models, got 3"):
        fj.merge("slerp", [object()] * 3)
