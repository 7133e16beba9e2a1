"""Task files (a user's own data set in YAML) and the checkpoint label-order mapping."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fisher_jax.data import batching, get_task, label_order, load_split, load_task_file, normalize_split, parse_task
from fisher_jax.data import glue as glue_mod
from fisher_jax.data.metrics import compute_metrics
from fisher_jax.errors import FisherJaxError


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """Each test registers its task files in a registry of its own."""
    monkeypatch.setattr(glue_mod, "_REGISTERED", {})


@pytest.fixture
def nli(tmp_path) -> Path:
    """A two-class pair task with CSV train, JSON Lines dev and a TSV test split."""
    _write(tmp_path / "data" / "train.csv",
           'question,sentence,label\n"what, now?",it is now,entailment\nwho?,nobody,not_entailment\nwhy?,because,0\n')
    _write(tmp_path / "data" / "dev.jsonl",
           "\n".join(json.dumps(r) for r in [{"question": "a", "sentence": "b", "label": "not_entailment"},
                                             {"question": "c", "sentence": "d", "label": 0}]) + "\n")
    _write(tmp_path / "data" / "test.tsv", "question\tsentence\tlabel\nx\ty\t1\n")
    return _write(tmp_path / "nli.yaml", """\
name: my_nli
train: data/train.csv
dev: data/dev.jsonl
test: data/test.tsv
text: [question, sentence]
label: label
labels: [entailment, not_entailment]
regression: false
metrics: [accuracy, f1]
max_length: 64
""")


def test_every_key_reaches_the_spec(nli, tmp_path):
    spec = load_task_file(nli)
    assert spec.name == "my_nli" and spec.task_file == str(nli.absolute())
    assert spec.text_columns == ("question", "sentence") and spec.is_pair
    assert spec.label_names == ("entailment", "not_entailment") and spec.num_labels == 2
    assert not spec.is_regression and spec.metrics == ("accuracy", "f1") and spec.max_length == 64
    assert spec.splits == ("train", "dev", "test")
    assert spec.local_file("dev") == str((tmp_path / "data" / "dev.jsonl").resolve())
    assert normalize_split(spec, "validation") == "dev"
    with pytest.raises(FisherJaxError, match="unknown split 'dev_mismatched' for task my_nli; known splits: train, dev, test"):
        normalize_split(spec, "dev_mismatched")


def test_defaults_name_label_metrics_and_named_splits(tmp_path):
    _write(tmp_path / "d" / "a.json", json.dumps([{"t": "x", "label": "b"}, {"t": "y", "label": "c"}]))
    path = _write(tmp_path / "three_way.yml",
                  "train: d/a.json\nsplits: {holdout: d/a.json}\ntext: t\nlabels: [a, b, c]\n")
    spec = load_task_file(path)
    assert spec.name == "three_way"  # the file name
    assert spec.text_columns == ("t",) and not spec.is_pair and spec.local_label_column == "label"
    assert spec.metrics == ("accuracy",) and spec.max_length == 128  # three classes: no F1
    assert spec.splits == ("train", "holdout")
    assert list(load_split(spec, "holdout").labels) == [1, 2]
    reg = parse_task({"train": "d/a.json", "text": "t", "regression": True}, tmp_path / "reg.yaml")
    assert reg.is_regression and reg.num_labels == 1 and reg.label_names is None
    assert reg.metrics == ("pearson", "spearman")
    assert parse_task({"train": "d/a.json", "text": "t", "labels": ["n", "p"]}, tmp_path / "b.yaml").metrics \
        == ("accuracy", "f1")


def test_splits_read_csv_tsv_jsonl_with_names_or_ids(nli):
    train = load_split(str(nli), "train")
    assert train.text_a == ["what, now?", "who?", "why?"] and train.text_b == ["it is now", "nobody", "because"]
    assert train.labels.dtype == np.int64 and list(train.labels) == [0, 1, 0]  # names and ids mixed
    assert train.task == "my_nli" and train.spec is get_task("my_nli")
    assert list(load_split("my_nli", "dev").labels) == [1, 0]
    assert load_split("my_nli", "test").text_b == ["y"]


def test_regression_values_are_floats(tmp_path):
    _write(tmp_path / "s.csv", "a,b,score\nx,y,0.25\nu,v,4\n")
    path = _write(tmp_path / "sts.yaml", "name: my_sts\ntrain: s.csv\ntext: [a, b]\nlabel: score\nregression: true\n")
    ex = load_split(str(path), "train")
    assert ex.labels.dtype == np.float32 and list(ex.labels) == [0.25, 4.0]
    bad = _write(tmp_path / "bad.csv", "a,b,score\nx,y,high\n")
    spec = parse_task({"train": str(bad), "text": ["a", "b"], "label": "score", "regression": True}, path)
    with pytest.raises(FisherJaxError, match=re.escape(f"{bad.resolve()}:2: label 'high' is not a number")):
        load_split(spec, "train")


def test_label_outside_labels_names_file_and_line(tmp_path):
    data = _write(tmp_path / "t.csv", "text,label\nok,pos\nbad,maybe\n")
    path = _write(tmp_path / "t.yaml", "train: t.csv\ntext: text\nlabels: [neg, pos]\n")
    with pytest.raises(FisherJaxError) as e:
        load_split(str(path), "train")
    msg = _one_line(e)
    assert f"{data.resolve()}:3: label 'maybe' is outside the label space of t (0=neg, 1=pos)" in msg
    _write(tmp_path / "t.csv", "text,label\nok,2\n")
    with pytest.raises(FisherJaxError, match=re.escape(f"{data.resolve()}:2: label '2' is outside")):
        load_split(load_task_file(path), "train")
    _write(tmp_path / "t.csv", "text,lab\nok,1\n")
    with pytest.raises(FisherJaxError, match=re.escape(f"{data.resolve()}:2: malformed row: no label column 'label'")):
        load_split(load_task_file(path), "train")


@pytest.mark.parametrize("text,message", [
    ("trian: d.csv\ntext: t\nlabels: [a, b]\n", "unknown key 'trian' (did you mean 'train'?)"),
    ("train: d.csv\nlables: [a, b]\ntext: t\n", "unknown key 'lables' (did you mean 'labels'?)"),
    ("train: d.csv\nlabels: [a, b]\n", "missing key 'text'"),
    ("train: d.csv\ntext: [a, b, c]\nlabels: [a, b]\n", "text: one or two text columns, got 3"),
    ("train: d.csv\ntext: []\nlabels: [a, b]\n", "text: expected a name or a non-empty list of names"),
    ("train: d.csv\ntext: t\n", "missing key 'labels'"),
    ("train: d.csv\ntext: t\nlabels: [a]\n", "labels: a classification task needs at least two classes"),
    ("train: d.csv\ntext: t\nlabels: [a, a]\n", "labels: a class name is listed twice"),
    ("train: d.csv\ntext: t\nlabels: [yes, no]\n", "labels: True is not a name (YAML reads yes/no"),
    ("train: d.csv\ntext: t\nlabels: [a, b]\nregression: true\n", "labels: a regression task has no class names"),
    ("train: d.csv\ntext: t\nlabels: [a, b]\nregression: maybe\n", "regression: expected true or false"),
    ("train: d.csv\ntext: t\nlabels: [a, b]\nmetrics: [acuracy]\n",
     "metrics: unknown metric 'acuracy' (did you mean 'accuracy'?)"),
    ("train: d.csv\ntext: t\nlabels: [a, b]\nmetrics: [pearson]\n",
     "metrics: 'pearson' does not apply to a classification task"),
    ("train: d.csv\ntext: t\nregression: true\nmetrics: [accuracy]\n",
     "metrics: 'accuracy' does not apply to a regression task"),
    ("train: d.csv\ntext: t\nlabels: [a, b, c]\nmetrics: [f1]\n", "metrics: 'f1' is the F1 of class 1 of a two-class"),
    ("train: d.csv\ntext: t\nlabels: [a, b]\nmax_length: 1\n", "max_length: expected an integer >= 2"),
    ("train: d.csv\ntext: t\nlabels: [a, b]\nmax_length: 12.5\n", "max_length: expected an integer >= 2"),
    ("name: RTE\ntrain: d.csv\ntext: t\nlabels: [a, b]\n", "name: 'RTE' is a GLUE task"),
    ("name: my task\ntrain: d.csv\ntext: t\nlabels: [a, b]\n", "name: 'my task' is not a name"),
    ("text: t\nlabels: [a, b]\n", "no data: give at least one split"),
    ("train: nope.csv\ntext: t\nlabels: [a, b]\n", "train: no such file nope.csv (relative to the task file"),
    ("train: d.parquet\ntext: t\nlabels: [a, b]\n", "train: unsupported file type '.parquet'"),
    ("train: d.csv\nsplits: {validation: d.csv}\ntext: t\nlabels: [a, b]\n",
     "splits: split name 'validation' is another name of dev"),
    ("train: d.csv\nsplits: [d.csv]\ntext: t\nlabels: [a, b]\n", "splits: expected a mapping"),
    ("train: 3\ntext: t\nlabels: [a, b]\n", "train: expected a non-empty string, got 3"),
    ("config: plain_text\ntrain: d.csv\ntext: t\nlabels: [a, b]\n", "config: only a Hub data set"),
    ("hub: 'not a/hub id'\ntext: t\nlabels: [a, b]\n", "hub: 'not a/hub id' is not a Hub data set id"),
    ("train: d.csv\ntext: t\nlabels: [a, b]\n  oops: [\n", "malformed YAML"),
    ("- train\n- text\n", "a task file is a mapping of keys"),
])
def test_every_key_is_validated_in_one_line(tmp_path, text, message):
    _write(tmp_path / "d.csv", "t,label\nx,a\n")
    _write(tmp_path / "d.parquet", "")
    path = _write(tmp_path / "task.yaml", text)
    with pytest.raises(FisherJaxError) as e:
        load_task_file(path)
    msg = _one_line(e)
    assert msg.startswith(str(path.absolute()) if "YAML" not in message else str(path)), msg
    assert message in msg, msg


def test_missing_task_file_and_unknown_name():
    with pytest.raises(FisherJaxError, match="no such task file: .*nowhere.yaml"):
        get_task("nowhere.yaml")
    with pytest.raises(FisherJaxError) as e:
        get_task("my_nli")  # never loaded
    msg = _one_line(e)
    assert "not a GLUE task nor a task file" in msg and "rte" in msg


def test_get_task_registers_by_name_and_refuses_a_second_definition(nli, tmp_path):
    spec = get_task(nli)  # a Path works too
    assert get_task("my_nli") is spec and get_task(str(nli)) == spec  # loading the same file again is fine
    other = _write(tmp_path / "other" / "nli.yaml", nli.read_text().replace("max_length: 64", "max_length: 32"))
    for split in ("train.csv", "dev.jsonl", "test.tsv"):
        _write(tmp_path / "other" / "data" / split, (tmp_path / "data" / split).read_text())
    with pytest.raises(FisherJaxError, match="task name 'my_nli' is already defined by .*nli.yaml"):
        get_task(other)


def test_glue_machinery_runs_unchanged_on_a_task_file(nli, tokenizer):
    """Bucketing, with-replacement sampling, held-out slices and metrics take a task file's spec."""
    spec = get_task(nli)
    assert batching.default_max_length(spec) == 64
    it = batching.task_batches(str(nli), "train", tokenizer, 2, shuffle=True, seed=1)
    rows = [b for b in it]
    assert len(rows) == 2 and sum(float(b["weights"].sum()) for b in rows) == 3
    assert rows[0]["input_ids"].shape[1] in batching.bucket_sizes(batching.DEFAULT_BUCKETS, 64)
    drawn = batching.sample_task_batches("my_nli", "train", tokenizer, num_examples=5, batch_size=2, seed=0)
    assert sum(float(b["weights"].sum()) for b in drawn) == 5
    train_rows, held = batching.held_out_split(3, 1)
    assert len(train_rows) == 2 and len(held) == 1
    # F1 of class 1 (not_entailment) and accuracy, by hand: predictions [1, 1], labels [1, 0]
    m = compute_metrics(spec, np.array([1, 1]), np.array([1, 0]))
    assert m["accuracy"] == 0.5 and m["f1"] == pytest.approx(2 / 3) and m["score"] == pytest.approx((0.5 + 2 / 3) / 2)


@pytest.fixture
def tokenizer(tmp_path):
    """A word-level BERT tokenizer over a tiny vocabulary (no downloads)."""
    from transformers import BertTokenizer

    words = "[PAD] [UNK] [CLS] [SEP] [MASK] what , now ? it is who nobody why because a b c d x y".split()
    vocab = _write(tmp_path / "vocab.txt", "\n".join(words) + "\n")
    return BertTokenizer(str(vocab))


# ------------------------------------------------------------------------------------------------ the Hub
class _Features(dict):
    pass


def _fake_datasets(monkeypatch, rows=None, error=None):
    """A stand-in for 🤗 datasets: ``load_dataset`` returns ``rows`` (with a ClassLabel-like
    ``label`` feature named b, a) or raises ``error``."""
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if error is not None:
            raise error

        class DS(dict):  # a Dataset's columns by name, its length in rows, select()
            features = _Features(label=types.SimpleNamespace(names=["b", "a"]))

            def __len__(self):
                return len(next(iter(self.values())))

            def select(self, indices):
                return DS({k: [v[i] for i in indices] for k, v in self.items()})

        return DS(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_task_reads_through_datasets_and_maps_classlabel_names(tmp_path, monkeypatch):
    path = _write(tmp_path / "h.yaml", "hub: org/data\nconfig: plain\ntext: s\nlabels: [a, b]\n")
    spec = load_task_file(path)
    assert spec.hub_dataset == "org/data" and spec.hub_config == "plain" and spec.splits == ("train", "dev")
    calls = _fake_datasets(monkeypatch, rows={"s": ["x", "y", "z"], "label": [0, 1, 0]})
    ex = load_split(spec, "dev")
    assert calls == [("org/data", "plain", "validation")]
    assert ex.text_a == ["x", "y", "z"] and list(ex.labels) == [1, 0, 1]  # Hub ids 0=b, 1=a -> ours a=0, b=1
    some = load_split(spec, "dev", keep=lambda i: i != 1)  # a process's rows: every label still checked
    assert some.text_a == ["x", "z"] and list(some.labels) == [1, 1] and some.num_rows == 3
    own = parse_task({"hub": "org/data", "train": "training", "text": "s", "labels": ["a", "b"]}, path)
    assert own.splits == ("train",) and own.hub_split("train") == "training"


def test_hub_task_offline_is_one_clear_line(tmp_path, monkeypatch):
    spec = load_task_file(_write(tmp_path / "h.yaml", "hub: org/data\ntext: s\nlabels: [a, b]\n"))
    _fake_datasets(monkeypatch, error=ConnectionError("Couldn't reach 'org/data' on the Hub (LocalEntryNotFoundError)"))
    with pytest.raises(FisherJaxError) as e:
        load_split(spec, "train")
    msg = _one_line(e)
    assert "cannot load task h split train from the Hub (org/data)" in msg and "ConnectionError" in msg
    assert "point the task file" in msg


# ------------------------------------------------------------------------------------------------ label order
def _task(tmp_path, labels):
    _write(tmp_path / "d.csv", "t,label\nx,0\n")
    return parse_task({"train": "d.csv", "text": "t", "labels": labels}, tmp_path / "lo.yaml")


def test_label_order_permutes_named_checkpoints(tmp_path):
    spec = _task(tmp_path, ["entailment", "neutral", "contradiction"])
    ckpt = {0: "CONTRADICTION", 1: "Entailment", 2: "neutral"}
    order = label_order(ckpt, spec)
    assert order == (1, 2, 0)
    logits = np.array([[10.0, 20.0, 30.0]])  # checkpoint columns: contradiction, entailment, neutral
    np.testing.assert_array_equal(logits[:, list(order)], [[20.0, 30.0, 10.0]])  # task order
    assert label_order({"0": "entailment", "1": "neutral", "2": "contradiction"}, spec) is None  # same order
    assert label_order({"0": "not_entailment", "1": "entailment"}, "rte") == (1, 0)
    assert label_order({0: "NOT ENTAILMENT", 1: "ENTAILMENT"}, "rte") == (1, 0)  # case and separators


@pytest.mark.parametrize("id2label", [None, {}, {0: "LABEL_0", 1: "LABEL_1"}, {0: "0", 1: "1"}])
def test_label_order_trusts_generic_ids(id2label):
    assert label_order(id2label, "sst2") is None


def test_label_order_regression_and_generic_tasks_need_nothing(tmp_path):
    assert label_order({0: "similarity"}, "stsb") is None
    assert label_order({0: "neg", 1: "pos"}, _task(tmp_path, ["0", "1"])) is None  # a task without names


@pytest.mark.parametrize("id2label,needle", [
    ({0: "neg", 1: "pos"}, "the checkpoint's labels (0=neg, 1=pos) do not match task sst2's (0=negative, 1=positive)"),
    ({0: "negative", 1: "negative"}, "do not match"),
    ({0: "negative", 1: "positive", 2: "neutral"}, "do not match"),
    ({0: "negative", 2: "positive"}, "ids are not 0..1"),
    ({"a": "negative", "b": "positive"}, "non-integer ids"),
])
def test_label_order_refuses_what_it_cannot_match(id2label, needle):
    with pytest.raises(FisherJaxError) as e:
        label_order(id2label, "sst2")
    assert needle in _one_line(e)
