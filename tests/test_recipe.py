"""Merge recipes (`fisher-jax merge --config`): every key and value validated before any model
loads, and a round trip on tiny saved models into the merge report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fisher_jax import cli
from fisher_jax.errors import FisherJaxError
from fisher_jax.merging.recipe import from_dict
from fisher_jax.tree import flatten, unflatten


def _folder(path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")  # validation only looks for the file
    return str(path)


@pytest.fixture
def folders(tmp_path):
    return {name: _folder(tmp_path / name) for name in ("a", "b", "base")}


def _good(folders, **changes):
    raw = {"merge_method": "ties", "base_model": folders["base"],
           "models": [{"model": folders["a"], "parameters": {"lam": 0.7}}, folders["b"]],
           "parameters": {"density": 0.3, "lam": 0.5, "scope": "tensor"}, "dtype": "float32", "out_dir": "merged"}
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


BAD = [
    ({"merge_methd": "ties"}, r"unknown key 'merge_methd'.*did you mean 'merge_method'"),
    ({"merge_method": "tie"}, r"merge_method: unknown merge method 'tie'.*did you mean 'ties'"),
    ({"parameters": {"lamb": 1.0}}, r"parameters: method 'ties' takes no keyword 'lamb'.*did you mean 'lam'"),
    ({"parameters": {"density": 1.5}}, r"parameters\.density must be in \(0, 1\], got 1\.5"),
    ({"parameters": {"density": [0.2, 0.0]}}, r"parameters\.density must be in \(0, 1\], got 0\.0"),
    ({"parameters": {"scope": "globl"}}, r"parameters\.scope: 'globl' is not one of 'global', 'tensor'.*did you mean 'global'"),
    ({"parameters": {"lam": [{"filter": "(", "value": 1}]}}, r"is not a regular expression"),
    ({"parameters": {"lam": [{"filtr": "a", "value": 1}]}}, r"unknown key 'filtr'.*did you mean 'filter'"),
    ({"parameters": {"lam": "big"}}, r"parameters\.lam: 'big' is not a number"),
    ({"models": "a"}, r"models: a list of at least two models"),
    ({"models": [{"model": "a", "paramters": {}}, "b"]}, r"models\[0\]: unknown key 'paramters'.*did you mean 'parameters'"),
    ({"models": [{"parameters": {}}, "b"]}, r"models\[0\]: missing 'model'"),
    ({"models": ["nowhere", "b"]}, r"models\[0\]\.model: 'nowhere' is not a model folder"),
    ({"base_model": None}, r"base_model: method 'ties' needs the pre-trained model"),
    ({"dtype": "fp16"}, r"dtype: 'fp16' is not one of float32, float16, bfloat16"),
    ({"out_dir": None}, r"out_dir: missing"),
    ({"statistics": {"num_exampels": 8}}, r"statistics: unknown key 'num_exampels'.*did you mean 'num_examples'"),
    ({"statistics": {"batch_size": 0}}, r"statistics\.batch_size: must be an integer >= 1"),
    ({"merge_method": "regmean", "base_model": None, "parameters": {"alpha": [0.5, 1.0]}, "models": None},
     r"method 'regmean' takes one value for 'alpha'"),
    ({"merge_method": "regmean", "base_model": None, "parameters": {}, "models": ["a", "b"]},
     r"models\[0\]: method 'regmean' needs a statistics file"),
    ({"merge_method": "simple"}, r"parameters: method 'simple' takes no keyword 'density'"),
    ({"merge_method": "simple", "parameters": {}}, r"models\[0\]\.parameters: method 'simple' takes no keyword 'lam'"),
    ({"merge_method": "slerp", "parameters": {}, "base_model": None,
      "models": [{"model": "a", "parameters": {"t": 0.2}}, "b"]}, r"method 'slerp' takes one 't' for all models"),
    ({"merge_method": "model_stock", "parameters": {}, "models": ["a", "b"], "base_model": "base",
      "statistics": {"estimator": "sampeld"}}, r"statistics\.estimator: 'sampeld' is not one of"),
]


@pytest.mark.parametrize("changes,message", BAD)
def test_recipe_validation_names_every_bad_key_and_value(folders, tmp_path, changes, message):
    raw = _good(folders, **{k: v for k, v in changes.items() if k != "models" or v is not None})
    if isinstance(raw.get("models"), list):
        raw["models"] = [folders.get(m, m) if isinstance(m, str) else {**m, **({"model": folders.get(m["model"], m["model"])}
                                                                                 if "model" in m else {})}
                         for m in raw["models"]]
    with pytest.raises(FisherJaxError, match=message) as err:
        from_dict(raw, base_dir=tmp_path)
    assert "\n" not in str(err.value)


def test_recipe_resolves_per_model_values_gradients_and_filters(folders, tmp_path):
    raw = _good(folders, parameters={"density": [0.2, 0.6], "lam": 0.5, "scope": "tensor"})
    raw["models"][1] = {"model": folders["b"], "parameters": {"density": [{"filter": "attention", "value": 0.4},
                                                                          {"value": [0.1, 0.9]}]}}
    recipe = from_dict(raw, base_dir=tmp_path)
    assert recipe.kwargs() == {
        "density": [{"layers": [0.2, 0.6]}, [{"filter": "attention", "value": 0.4}, {"value": {"layers": [0.1, 0.9]}}]],
        "lam": [0.7, 0.5], "scope": "tensor"}
    assert recipe.out_dir == str(tmp_path / "merged") and recipe.base == folders["base"]
    json.dumps(recipe.resolved())  # the report's form is JSON


# ---------------------------------------------------------------------------------- round trip
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base BERT and two perturbed copies, saved with save_pretrained."""
    import fisher_jax as fj
    from conftest import tiny_hf_config

    root = tmp_path_factory.mktemp("recipe")
    base = fj.models.from_config(tiny_hf_config("bert", num_labels=2), seed=0)
    base.save_pretrained(root / "base")
    rng = np.random.default_rng(0)
    from transformers import BertTokenizer

    vocab = root / "vocab.txt"  # a word-level tokenizer, so statistics can be computed on a task
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "is", "of", "and"]) + "\n")
    for name in ("a", "b"):
        body = unflatten({k: (v + 0.02 * rng.standard_normal(np.shape(v))).astype(np.float32)
                          for k, v in flatten(base.params["body"]).items()})
        base.replace(params={"body": body, "head": base.params["head"]}).save_pretrained(root / name)
        BertTokenizer(str(vocab)).save_pretrained(str(root / name))
    return root


def _bodies_equal(a, b, atol=0.0):
    fa, fb = flatten(a), flatten(b)
    assert list(fa) == list(fb)
    for k in fa:
        np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), rtol=0, atol=atol, err_msg=k)


def test_recipe_round_trip_into_the_merge_report(saved, tmp_path, capsys):
    import fisher_jax as fj
    from fisher_jax.merging import merge

    recipe = {"merge_method": "ties", "base_model": str(saved / "base"),
              "models": [{"model": str(saved / "a"), "parameters": {"lam": 0.8}}, str(saved / "b")],
              "parameters": {"density": [0.3, 0.7], "lam": [{"filter": "attention", "value": 0.4}, {"value": 0.6}],
                             "scope": "tensor"},
              "dtype": "float32", "out_dir": "out"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli.main(["merge", "--config", str(path), "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["method"] == "ties" and report["recipe"]["source"] == str(path)
    assert report["recipe"]["kwargs"] == {
        "density": {"layers": [0.3, 0.7]}, "scope": "tensor",
        "lam": [0.8, [{"filter": "attention", "value": 0.4}, {"value": 0.6}]]}
    models = [fj.from_pretrained(saved / n) for n in ("a", "b")]
    want = merge("ties", models, base=fj.from_pretrained(saved / "base"), density={"layers": [0.3, 0.7]},
                 lam=[0.8, [{"filter": "attention", "value": 0.4}, {"value": 0.6}]], scope="tensor")
    for folder, w in zip(report["outputs"], want):
        _bodies_equal(fj.from_pretrained(folder).params["body"], w.params["body"])


def test_recipe_reuses_statistics_files_and_the_cli_keeps_its_old_spelling(saved, tmp_path, capsys):
    import fisher_jax as fj
    from conftest import random_batch
    from fisher_jax.merging import merge

    files = []
    for j, name in enumerate(("a", "b")):
        ids, am, tt = random_batch("bert", batch=4, length=8, seed=j)
        batch = {"input_ids": ids, "attention_mask": am, "token_type_ids": tt, "labels": np.zeros(4, np.int32),
                 "weights": np.ones(4, np.float32)}
        grams = fj.gram_stats(fj.from_pretrained(saved / name), [batch], progress=False)
        files.append(fj.save_stats(tmp_path / f"{name}.gram.safetensors", grams))
    path = tmp_path / "regmean.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "regmean", "parameters": {"alpha": 0.9}, "dtype": "float16",
                                    "models": [{"model": str(saved / "a"), "statistics": "a.gram.safetensors"},
                                               {"model": str(saved / "b"), "statistics": "b.gram.safetensors"}]}))
    out = tmp_path / "cli_out"
    assert cli.main(["merge", "--config", str(path), "--out-dir", str(out), "--no-progress"]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["recipe"]["kwargs"] == {"alpha": 0.9} and report["dtype"] == "float16"
    assert report["statistics"] == [str(f) for f in files] and report["recipe"]["out_dir"] == str(out)
    models = [fj.from_pretrained(saved / n) for n in ("a", "b")]
    want = merge("regmean", models, grams=[fj.load_stats(f) for f in files], alpha=0.9)
    _bodies_equal(fj.from_pretrained(report["outputs"][0]).params["body"], want[0].params["body"], atol=2e-3)  # float16
    # the flag form, with --out (deprecated) for the folder
    assert cli.main(["merge", "--method", "simple", "--models", str(saved / "a"), str(saved / "b"),
                     "--out", str(tmp_path / "old")]) == 0
    assert "deprecated" in capsys.readouterr().err and (tmp_path / "old" / "merge_report.json").is_file()
    assert cli.main(["merge", "--config", str(path), "--method", "simple"]) != 0
    assert "drop --method" in capsys.readouterr().err


def test_recipe_computes_missing_statistics_on_each_models_task(saved, tmp_path, glue_dir):
    import fisher_jax as fj

    path = tmp_path / "compute.yaml"
    path.write_text(yaml.safe_dump({
        "merge_method": "regmean", "out_dir": "out", "parameters": {"alpha": 0.9},  # shrinkage: full rank from 8 rows
        "models": [{"model": str(saved / "a"), "task": "rte"}, {"model": str(saved / "b"), "task": "mrpc"}],
        "statistics": {"num_examples": 8, "batch_size": 4, "max_length": 16, "glue_dir": str(glue_dir)}}))
    assert cli.main(["merge", "--config", str(path), "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert [m["task"] for m in report["recipe"]["models"]] == ["rte", "mrpc"]
    for f, task in zip(report["statistics"], ("rte", "mrpc")):
        assert Path(f).parent == tmp_path / "out" / "statistics"
        grams = fj.load_stats(f)
        assert grams.num_examples == 8 and grams.meta["task"] == task
