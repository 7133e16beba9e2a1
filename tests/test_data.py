"""Data layer: GLUE registry and loading, custom files, tokenisation and batching."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fisher_jax.data import batching as batching_mod
from fisher_jax.data import (
    TASKS,
    Encoded,
    Examples,
    batch_indices,
    batches,
    bucket_sizes,
    encode,
    get_task,
    load_custom,
    load_split,
    num_batches,
    sample_batches_with_replacement,
    task_batches,
)
from fisher_jax.errors import FisherJaxError

from conftest import GLUE_DIR

# The local GLUE copy exists in CI too: a missing one fails these tests (conftest's glue_dir), never skips them.
needs_glue = pytest.mark.usefixtures("glue_dir")

# README.md of the local GLUE copy: data rows per split.
LOCAL_COUNTS = {
    "cola": (8551, 1043),
    "sst2": (67349, 872),
    "mrpc": (3668, 408),
    "stsb": (5749, 1500),
    "rte": (2490, 277),
}


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def rte_dev_encoded(tokenizer, glue_dir) -> Encoded:
    return encode(tokenizer, load_split("rte", "dev", glue_dir), max_length=128)


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_matches_hub_label_ids():
    expected = {
        "cola": ("unacceptable", "acceptable"),
        "sst2": ("negative", "positive"),
        "mrpc": ("not_equivalent", "equivalent"),
        "qqp": ("not_duplicate", "duplicate"),
        "stsb": None,
        "mnli": ("entailment", "neutral", "contradiction"),
        "qnli": ("entailment", "not_entailment"),
        "rte": ("entailment", "not_entailment"),
        "wnli": ("not_entailment", "entailment"),
    }
    assert set(TASKS) == set(expected)
    for name, names in expected.items():
        spec = TASKS[name]
        assert spec.label_names == names
        assert spec.is_regression == (names is None)
        assert spec.num_labels == (1 if names is None else len(names))
    assert TASKS["cola"].metrics == ("mcc",)
    assert TASKS["mrpc"].metrics == TASKS["qqp"].metrics == ("accuracy", "f1")
    assert TASKS["stsb"].metrics == ("pearson", "spearman")
    assert TASKS["sst2"].max_length == 64 and TASKS["rte"].max_length == 128
    assert TASKS["mnli"].splits == ("train", "dev", "dev_mismatched")
    assert not TASKS["sst2"].is_pair and TASKS["mnli"].is_pair
    with pytest.raises(dataclasses.FrozenInstanceError):
        TASKS["rte"].name = "x"  # type: ignore[misc]
    hash(TASKS["rte"])


@pytest.mark.parametrize("alias,name", [("SST-2", "sst2"), ("sst2", "sst2"), ("sst-2", "sst2"),
                                        ("STS-B", "stsb"), ("sts_b", "stsb"), ("MNLI", "mnli"),
                                        ("CoLA", "cola"), ("qnli", "qnli")])
def test_get_task_aliases(alias, name):
    assert get_task(alias).name == name
    assert get_task(get_task(alias)) is TASKS[name]


def test_unknown_task_lists_known_tasks():
    with pytest.raises(FisherJaxError) as e:
        get_task("sst3")
    msg = _one_line_error(e)
    assert "sst3" in msg
    for name in TASKS:
        assert name in msg


def test_unknown_split():
    with pytest.raises(FisherJaxError, match="dev_mismatched") as e:
        load_split("rte", "dev_mismatched", "/nonexistent")
    _one_line_error(e)
    with pytest.raises(FisherJaxError, match="unknown split 'test'"):
        load_split("mnli", "test", "/nonexistent")


# ---------------------------------------------------------------------------------------------
# the local GLUE copy


@needs_glue
@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(LOCAL_COUNTS))
def test_local_glue_counts_and_labels(task):
    spec = get_task(task)
    for split, count in zip(("train", "dev"), LOCAL_COUNTS[task]):
        ex = load_split(task, split, glue_dir=GLUE_DIR)
        assert len(ex) == len(ex.labels) == count
        assert ex.split == split and ex.task == spec.name and ex.spec is spec
        assert ex.source == str(GLUE_DIR / spec.local_dir / f"{split}.tsv")
        assert (ex.text_b is not None) == spec.is_pair
        assert all(isinstance(t, str) and t for t in ex.text_a[:100])
        if spec.is_regression:
            assert ex.labels.dtype == np.float32
            assert ex.labels.min() >= 0.0 and ex.labels.max() <= 5.0
            assert len(np.unique(ex.labels)) > 10
        else:
            assert ex.labels.dtype == np.int64
            assert set(np.unique(ex.labels)) == set(range(spec.num_labels))


@needs_glue
def test_local_glue_first_rows():
    cola = load_split("CoLA", "train", GLUE_DIR)
    assert cola.text_a[0].startswith("Our friends won't buy this analysis")
    assert cola.labels[0] == 1
    mrpc = load_split("MRPC", "dev", GLUE_DIR)  # header starts with a BOM
    assert mrpc.labels[0] == 1 and mrpc.text_a[0].startswith("He said the foodservice pie")
    assert mrpc.text_b[0].startswith('"The foodservice pie business')  # unbalanced quote kept
    rte = load_split("RTE", "validation", GLUE_DIR)  # alias of dev
    assert rte.split == "dev"
    assert list(rte.labels[:2]) == [1, 0]  # not_entailment, entailment
    stsb = load_split("sts-b", "dev", GLUE_DIR)
    assert stsb.labels[0] == pytest.approx(5.0) and stsb.labels[1] == pytest.approx(4.75)
    assert stsb.text_b[0] == "A man wearing a hard hat is dancing."


@needs_glue
def test_glue_dir_from_environment(monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(GLUE_DIR))
    assert len(load_split("rte", "dev")) == 277


def test_tasks_without_local_copy_use_glue_download_layout(tmp_path):
    """QQP, MNLI, QNLI, WNLI files in the GLUE-download layout (synthetic rows)."""
    _write(tmp_path / "QQP" / "dev.tsv", textwrap.dedent("""\
        id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate
        1\t11\t12\tHow do I cook rice?\tHow to cook rice?\t1
        2\t13\t14\tWhat is "love?\tWho are you?\t0
        3\t15\tonly three fields
        """))
    qqp = load_split("qqp", "validation", tmp_path)
    assert qqp.text_a == ["How do I cook rice?", 'What is "love?']  # truncated row skipped
    assert list(qqp.labels) == [1, 0]

    mnli_header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\t"
                   "sentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\t"
                   "sentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n")
    filler = "\t".join(["x"] * 4)
    for fname, gold in (("dev_matched.tsv", "neutral"), ("dev_mismatched.tsv", "contradiction")):
        _write(tmp_path / "MNLI" / fname, mnli_header
               + f"0\t1\t1n\tfiction\t{filler}\tA man sleeps.\tA person rests.\t"
                 f"{gold}\tx\tx\tx\tx\t{gold}\n")
    assert list(load_split("mnli", "dev", tmp_path).labels) == [1]
    assert list(load_split("mnli", "validation_matched", tmp_path).labels) == [1]
    mm = load_split("MNLI", "validation_mismatched", tmp_path)
    assert mm.split == "dev_mismatched" and list(mm.labels) == [2]
    assert mm.text_a == ["A man sleeps."] and mm.text_b == ["A person rests."]

    _write(tmp_path / "QNLI" / "train.tsv",
           "index\tquestion\tsentence\tlabel\n0\tWho?\tHim.\tentailment\n"
           "1\tWhy?\tNo.\tnot_entailment\n")
    assert list(load_split("qnli", "train", tmp_path).labels) == [0, 1]
    _write(tmp_path / "WNLI" / "train.tsv",
           "index\tsentence1\tsentence2\tlabel\n0\tA b.\tC d.\t1\n1\tE f.\tG h.\t0\n")
    assert list(load_split("wnli", "train", tmp_path).labels) == [1, 0]


def test_task_folder_spellings(tmp_path):
    _write(tmp_path / "sst2" / "dev.tsv", "sentence\tlabel\ngood film \t1\n")
    assert list(load_split("SST-2", "dev", tmp_path).labels) == [1]


# ---------------------------------------------------------------------------------------------
# loading errors


def test_missing_split_file_names_the_path(tmp_path):
    with pytest.raises(FisherJaxError) as e:
        load_split("rte", "train", glue_dir=tmp_path)
    msg = _one_line_error(e)
    assert str(tmp_path / "RTE" / "train.tsv") in msg
    with pytest.raises(FisherJaxError, match="dev_mismatched.tsv"):
        load_split("mnli", "dev_mismatched", glue_dir=tmp_path)


def test_malformed_row_reports_file_and_line(tmp_path):
    path = _write(tmp_path / "RTE" / "train.tsv",
                  "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n"
                  "1\tc\td\textra\tentailment\n")
    with pytest.raises(FisherJaxError) as e:
        load_split("rte", "train", tmp_path)
    msg = _one_line_error(e)
    assert f"{path}:3" in msg and "malformed" in msg
    _write(tmp_path / "CoLA" / "dev.tsv", "gj04\t1\t\tA fine sentence.\ngj04\t0\tno sentence\n")
    with pytest.raises(FisherJaxError, match=r"CoLA/dev\.tsv:2: malformed"):
        load_split("cola", "dev", tmp_path)


@pytest.mark.parametrize("task,folder,text", [
    ("rte", "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tmaybe\n"),
    ("cola", "CoLA", "gj04\t1\t\tFine.\ngj04\t2\t*\tBad label.\n"),
    ("stsb", "STS-B", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
                      "sentence2\tscore\n0\tg\tf\ty\t0\ts\ts\ta\tb\t1.5\n1\tg\tf\ty\t0\ts\ts\t"
                      "a\tb\t7.5\n"),
])
def test_label_outside_label_space(tmp_path, task, folder, text):
    path = _write(tmp_path / folder / "dev.tsv", text)
    with pytest.raises(FisherJaxError) as e:
        load_split(task, "dev", tmp_path)
    msg = _one_line_error(e)
    assert f"{path}:" in msg and "outside the label space" in msg


def test_empty_dataset(tmp_path):
    _write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\n")
    with pytest.raises(FisherJaxError, match="empty dataset") as e:
        load_split("sst2", "dev", tmp_path)
    _one_line_error(e)
    _write(tmp_path / "CoLA" / "dev.tsv", "")
    with pytest.raises(FisherJaxError, match="empty dataset"):
        load_split("cola", "dev", tmp_path)


def test_hub_failure_is_one_clear_line(tmp_path):
    """Without a local folder the Hub is tried; offline, that must fail fast with a hint.

    Run in a fresh interpreter so the offline switches (read when 🤗 datasets is imported) and an
    empty cache apply, whatever this process imported before.
    """
    env = {k: v for k, v in os.environ.items() if k != "GLUE_DIR"}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"))
    code = textwrap.dedent("""\
        from fisher_jax.data import load_split
        from fisher_jax.errors import FisherJaxError
        try:
            load_split("rte", "dev")
        except FisherJaxError as e:
            print("ERROR:" + str(e))
        """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ERROR:")]
    assert len(lines) == 1, out.stdout + out.stderr
    msg = lines[0]
    assert "nyu-mll/glue" in msg and "--glue-dir" in msg and "GLUE_DIR" in msg and "rte" in msg


# ---------------------------------------------------------------------------------------------
# custom files


def test_load_custom_formats(tmp_path):
    csv_path = _write(tmp_path / "reviews.csv",
                      'text,other,label\n"great, really",x,pos\nawful,y,neg\n')
    ex = load_custom(csv_path, "text", "label", label_names=["neg", "pos"])
    assert ex.text_a == ["great, really", "awful"] and ex.text_b is None
    assert list(ex.labels) == [1, 0] and ex.labels.dtype == np.int64
    assert ex.spec.metrics == ("accuracy", "f1") and ex.task == "reviews"

    tsv_path = _write(tmp_path / "pairs.tsv", 'a\tb\ty\nx "y\tz\t2\nu\tv\t0\n')
    ex = load_custom(tsv_path, ["a", "b"], "y")  # ids, classes 0..max
    assert ex.text_b == ["z", "v"] and list(ex.labels) == [2, 0]
    assert ex.spec.num_labels == 3 and ex.spec.metrics == ("accuracy",)

    jsonl = _write(tmp_path / "reg.jsonl",
                   "\n".join(json.dumps({"s": s, "t": t, "score": v})
                             for s, t, v in [("a", "b", 0.5), ("c", "d", 3)]) + "\n")
    ex = load_custom(jsonl, ("s", "t"), "score", is_regression=True)
    assert ex.labels.dtype == np.float32 and list(ex.labels) == [0.5, 3.0]
    assert ex.spec.is_regression and ex.spec.metrics == ("pearson", "spearman")

    js = _write(tmp_path / "arr.json", json.dumps([{"s": "a", "l": 1}, {"s": "b", "l": 0}]))
    assert list(load_custom(js, "s", "l").labels) == [1, 0]
    bad = _write(tmp_path / "bad.json", json.dumps([{"s": "a", "l": 1}, {"s": "b", "l": 5}]))
    with pytest.raises(FisherJaxError, match=re.escape(f"{bad}:record 2: label 5 is outside")):
        load_custom(bad, "s", "l", label_names=["x", "y"])


def test_load_custom_errors(tmp_path):
    with pytest.raises(FisherJaxError, match="missing data file"):
        load_custom(tmp_path / "nope.csv", "text", "label")
    bad_row = _write(tmp_path / "bad.csv", "text,label\nok,1\nmissing-field\n")
    with pytest.raises(FisherJaxError) as e:
        load_custom(bad_row, "text", "label")
    assert f"{bad_row}:3" in _one_line_error(e)
    no_col = _write(tmp_path / "nocol.jsonl",
                    '{"text": "a", "label": 1}\n{"txt": "b", "label": 0}\n')
    with pytest.raises(FisherJaxError, match=re.escape(f"{no_col}:2: malformed row: no column 'text'")):
        load_custom(no_col, "text", "label")
    bad_json = _write(tmp_path / "bad.jsonl", '{"text": "a", "label": 1}\n{"text": \n')
    with pytest.raises(FisherJaxError, match=re.escape(f"{bad_json}:2: malformed JSON")):
        load_custom(bad_json, "text", "label")
    bad_label = _write(tmp_path / "lab.csv", "text,label\na,neg\nb,meh\n")
    with pytest.raises(FisherJaxError, match=re.escape(f"{bad_label}:3: label 'meh' is outside")):
        load_custom(bad_label, "text", "label", label_names=["neg", "pos"])
    with pytest.raises(FisherJaxError, match="outside the label space"):
        load_custom(_write(tmp_path / "neg.csv", "text,label\na,-1\n"), "text", "label")
    with pytest.raises(FisherJaxError, match="is not a number"):
        load_custom(_write(tmp_path / "r.csv", "text,y\na,high\n"), "text", "y",
                    is_regression=True)
    with pytest.raises(FisherJaxError, match="empty dataset"):
        load_custom(_write(tmp_path / "empty.csv", "text,label\n"), "text", "label")
    with pytest.raises(FisherJaxError, match="unsupported file type"):
        load_custom(_write(tmp_path / "x.parquet", ""), "text", "label")


# ---------------------------------------------------------------------------------------------
# tokenisation and batching


def _toy_encoded(lengths, pad_token_id=0, regression=False, max_length=128) -> Encoded:
    """Rows whose token ids encode (example index, position) so rows are recognisable."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([1000 * (i + 1) + np.arange(n) for i, n in enumerate(lengths)])
    types = np.concatenate([(np.arange(n) >= n // 2) for n in lengths]).astype(np.int8)
    labels = (np.arange(len(lengths)) * 0.5).astype(np.float32) if regression \
        else (np.arange(len(lengths)) % 2).astype(np.int64)
    return Encoded(ids.astype(np.int32), types, offsets, labels, max_length, pad_token_id)


def _real_rows(batch) -> list[tuple[int, ...]]:
    out = []
    for ids, mask, w in zip(batch["input_ids"], batch["attention_mask"], batch["weights"]):
        if w == 1:
            out.append(tuple(ids[mask == 1].tolist()))
    return out


def test_bucket_sizes_clip_to_max_length():
    assert bucket_sizes((32, 64, 128), 128) == (32, 64, 128)
    assert bucket_sizes((32, 64, 128), 64) == (32, 64)
    assert bucket_sizes((32, 64, 128), 100) == (32, 64, 100)
    assert bucket_sizes((128, 32, 64), 256) == (32, 64, 128, 256)


@needs_glue
def test_encode_pairs_and_truncation(tokenizer, rte_dev_encoded):
    enc = rte_dev_encoded
    assert len(enc) == 277 and enc.labels.dtype == np.int64
    assert enc.lengths.max() <= 128
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids, types = enc.row(0)
    assert ids[0] == cls and ids[-1] == sep and (ids == sep).sum() == 2
    assert types[0] == 0 and types[-1] == 1  # second segment
    short = encode(tokenizer, load_split("rte", "dev", GLUE_DIR).subset(range(50)), max_length=24)
    assert short.lengths.max() == 24 and (short.lengths == 24).mean() > 0.9
    for i in range(len(short)):  # longest_first keeps both segments
        ids, types = short.row(i)
        assert (ids == sep).sum() == 2 and types.max() == 1


@needs_glue
def test_batches_in_order_cover_everything(rte_dev_encoded):
    enc = rte_dev_encoded
    sizes = bucket_sizes((32, 64, 128), 128)
    it = batches(enc, 32)
    assert len(it) == num_batches(enc, 32) == 9
    seen = []
    for k, b in enumerate(it):
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels", "weights"}
        B, T = b["input_ids"].shape
        assert B == 32 and T in sizes
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert b[key].dtype == np.int32 and b[key].shape == (B, T)
        assert b["labels"].dtype == np.int32 and b["weights"].dtype == np.float32
        lens = b["attention_mask"].sum(1)
        assert T == min(s for s in sizes if s >= lens.max())  # smallest bucket that fits
        idx = np.arange(32 * k, min(32 * k + 32, len(enc)))
        n = len(idx)
        assert list(b["weights"]) == [1.0] * n + [0.0] * (32 - n)
        np.testing.assert_array_equal(b["labels"][:n], enc.labels[idx])
        np.testing.assert_array_equal(lens[:n], enc.lengths[idx])
        assert (b["attention_mask"][n:] == 0).all() and (b["input_ids"][n:] == 0).all()
        assert (b["labels"][n:] == 0).all()
        for r, i in enumerate(idx):
            ids, types = enc.row(i)
            np.testing.assert_array_equal(b["input_ids"][r, :len(ids)], ids)
            np.testing.assert_array_equal(b["token_type_ids"][r, :len(ids)], types)
        seen.extend(_real_rows(b))
    assert len(seen) == 277 and seen == [tuple(enc.row(i)[0].tolist()) for i in range(277)]


@needs_glue
def test_shuffled_batches_each_example_once_and_less_padding(rte_dev_encoded):
    enc = rte_dev_encoded
    it = batches(enc, 16, shuffle=True, seed=3)
    plan = it.indices
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(len(enc)))  # every example exactly once
    assert all(len(p) == 16 for p in plan[:-1]) and len(plan[-1]) == len(enc) % 16
    rows, padding, real = [], [], 0
    for b, idx in zip(it, plan):
        assert b["input_ids"].shape[0] == 16
        real += int(b["weights"].sum())
        rows.extend(_real_rows(b))
        np.testing.assert_array_equal(b["labels"][:len(idx)], enc.labels[idx])
        padding.append(1 - b["attention_mask"].mean())
    assert real == len(enc)
    assert collections.Counter(rows) == collections.Counter(
        tuple(enc.row(i)[0].tolist()) for i in range(len(enc)))
    in_order = [1 - b["attention_mask"].mean() for b in batches(enc, 16)]
    assert np.mean(padding) < np.mean(in_order)  # length grouping pays off


def test_shuffle_is_deterministic_per_seed():
    enc = _toy_encoded(np.random.default_rng(0).integers(3, 120, size=500))

    def run(seed):
        return [b["input_ids"] for b in batches(enc, 8, shuffle=True, seed=seed)]

    a, b, c = run(0), run(0), run(1)
    assert len(a) == len(c) == 63
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, c))
    plan = batch_indices(enc, 8, shuffle=True, seed=0)
    assert sorted(np.concatenate(plan).tolist()) == list(range(500))
    # Length grouping inside the one 800-row chunk: batches hold similar lengths.
    spans = [np.ptp(enc.lengths[p]) for p in plan]
    assert np.median(spans) <= 5


def test_max_examples_and_num_batches():
    enc = _toy_encoded([5] * 100)
    assert num_batches(enc, 32) == 4 and num_batches(100, 32, max_examples=40) == 2
    it = batches(enc, 32, max_examples=40)
    assert len(it) == 2
    got = list(it)
    assert [b["weights"].sum() for b in got] == [32, 8]
    sub = np.concatenate(batches(enc, 32, shuffle=True, seed=5, max_examples=40).indices)
    assert len(sub) == 40 and len(set(sub.tolist())) == 40 and sub.max() >= 40  # random subset
    assert num_batches(enc, 32, max_examples=1000) == 4
    with pytest.raises(FisherJaxError, match="batch_size"):
        batches(enc, 0)
    with pytest.raises(FisherJaxError, match="max_examples"):
        batches(enc, 8, max_examples=0)


def test_batches_stream_lazily(monkeypatch):
    calls = []
    real = batching_mod.make_batch
    monkeypatch.setattr(batching_mod, "make_batch",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    it = batches(_toy_encoded([4] * 50), 8)
    assert calls == [] and iter(it) is it
    next(it)
    assert len(calls) == 1


def test_padding_uses_tokenizer_pad_id_and_float_labels():
    enc = _toy_encoded([3, 40, 7], pad_token_id=1, regression=True, max_length=64)
    (b,) = list(batches(enc, 4))
    assert b["input_ids"].shape == (4, 64)  # 40 tokens -> bucket 64
    assert b["labels"].dtype == np.float32 and list(b["labels"]) == [0.0, 0.5, 1.0, 0.0]
    assert b["input_ids"][0, 3:].tolist() == [1] * 61 and (b["input_ids"][3] == 1).all()
    assert b["attention_mask"].sum(1).tolist() == [3, 40, 7, 0]
    (b,) = list(batches(enc.subset([0, 2]), 4))
    assert b["input_ids"].shape == (4, 32) and b["input_ids"][1, :7].tolist() == \
        list(range(3000, 3007))


# The released calc_fisher.py's rows, written out from numpy's legacy global API
# (np.random.seed(0); np.random.choice(len(train), 128)), never from fisher_jax.
RELEASED_DRAW_SST2_SEED0 = [
    43567, 42613, 45891, 21243, 41993, 55026, 48600, 39512, 52620, 17089, 32230, 18983, 6921, 38804, 37619, 7877,
    1871, 2496, 47954, 24675, 31921, 797, 49811, 52489, 41504, 49866, 11723, 43890, 17591, 58146, 59300, 20006,
    3560, 61713, 45444, 46522, 20737, 28647, 61353, 12134, 60535, 47883, 63360, 51811, 9781, 19340, 27257, 16298,
    12372, 4420, 62079, 7012, 9396, 3918, 9359, 44259, 23482, 15127, 37237, 8752, 50624, 40133, 55153, 62756,
    48682, 66509, 24777, 13824, 2418, 12843, 36223, 61570, 6521, 56894, 14254, 51939, 37073, 23310, 31785, 64570,
    56356, 23306, 36950, 33920, 33538, 8286, 18728, 13640, 45663, 3912, 50586, 21752, 59715, 7997, 53006, 40800,
    15620, 54268, 42512, 19608, 17340, 1913, 52086, 13429, 13907, 35489, 10088, 15588, 38395, 60155, 38214, 469,
    43295, 34488, 38040, 16975, 15912, 28086, 15115, 52573, 64223, 11052, 15741, 57368, 43986, 5103, 35050, 1740,
]
RELEASED_DRAW_STSB_SEED0 = [
    2732, 2607, 1653, 3264, 4931, 4859, 1033, 4373, 3468, 705, 2599, 2135, 2222, 2897, 1701, 537,
    2893, 2163, 5072, 4851, 2046, 1871, 2496, 99, 2008, 755, 797, 659, 3219, 423, 3337, 2745,
    4735, 544, 714, 2292, 151, 2723, 3531, 2930, 1207, 802, 2176, 2176, 1956, 3622, 3560, 756,
    4369, 4484, 1641, 3114, 5562, 4984, 4353, 5441, 4071, 4009, 2105, 3942, 3191, 430,
    4187, 2446, 2659, 1589, 2956, 2681, 4180, 2251, 4420, 4870, 1071, 4735, 5251, 5068, 1204, 3918,
    1167, 1684, 3299, 2767, 2957, 4469, 560, 5425, 1605, 1472, 3678, 256, 3762, 5412, 1954, 816,
    2435, 1634, 973, 4464, 2023, 2965, 201, 2431, 5632, 2418, 4651, 5050, 3455, 4226, 931, 1987,
    2787, 4305, 2610, 5531, 4182, 4968, 2059, 307, 5200, 5302, 1152, 275, 5294, 5674, 5491, 1208, 2492, 2536,
]


@pytest.mark.parametrize("task, n_train, draw", [("sst2", 67349, RELEASED_DRAW_SST2_SEED0),
                                                 ("stsb", 5749, RELEASED_DRAW_STSB_SEED0)])
def test_sample_task_batches_is_the_released_draw(tokenizer, glue_dir, task, n_train, draw):
    from fisher_jax.data import sample_task_batches

    assert len(draw) == 128
    it = sample_task_batches(task, "train", tokenizer, 128, 32, glue_dir=glue_dir)
    assert len(it) == 4 and [len(i) for i in it.indices] == [32] * 4
    got = list(it)
    for b, ids in enumerate(it.indices):
        assert ids.tolist() == draw[32 * b:32 * b + 32]  # row ids of the split, in draw order
        assert got[b]["weights"].tolist() == [1.0] * 32
    # The batches hold those training rows' tokens, in the same order.
    examples = load_split(task, "train", glue_dir)
    assert len(examples) == n_train
    want = encode(tokenizer, examples.subset(draw[:32]), get_task(task).max_length)
    assert _real_rows(got[0]) == [tuple(want.row(i)[0].tolist()) for i in range(32)]


def test_released_draw_leaves_numpy_global_state_alone(tokenizer, glue_dir):
    from fisher_jax.data import sample_task_batches

    np.random.seed(123)
    before = np.random.get_state()
    ids = np.concatenate(sample_task_batches("stsb", "train", tokenizer, 128, 32, glue_dir=glue_dir).indices)
    sample_batches_with_replacement(_toy_encoded([5] * 50), num_examples=64, seed=7)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
    # ...nor depends on it: another global seed, the same released rows.
    np.random.seed(99)
    again = np.concatenate(sample_task_batches("stsb", "train", tokenizer, 128, 32, glue_dir=glue_dir).indices)
    assert ids.tolist() == again.tolist() == RELEASED_DRAW_STSB_SEED0


def _legacy_global_draw(n: int, k: int, seed: int) -> np.ndarray:
    """The released code's own calls, numpy's global state restored afterwards."""
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        return np.random.choice(n, k)
    finally:
        np.random.set_state(saved)


def test_sample_batches_with_replacement_matches_reference_draw():
    enc = _toy_encoded(np.random.default_rng(1).integers(3, 60, size=300))
    it = sample_batches_with_replacement(enc, num_examples=128, batch_size=32, seed=0)
    assert len(it) == 4
    expected = _legacy_global_draw(300, 128, 0)
    np.testing.assert_array_equal(np.concatenate(it.indices), expected)
    np.testing.assert_array_equal(np.concatenate(sample_batches_with_replacement(enc, seed=5).indices),
                                  _legacy_global_draw(300, 128, 5))
    with pytest.raises(FisherJaxError, match="seed"):
        sample_batches_with_replacement(enc, seed=-1)
    got = list(it)
    assert all(b["weights"].sum() == 32 for b in got)
    assert _real_rows(got[0])[0] == tuple(enc.row(int(expected[0]))[0].tolist())
    again = np.concatenate(sample_batches_with_replacement(enc, seed=0).indices)
    other = np.concatenate(sample_batches_with_replacement(enc, seed=1).indices)
    assert np.array_equal(again, expected) and not np.array_equal(other, expected)
    tail = list(sample_batches_with_replacement(enc, num_examples=40, batch_size=32))
    assert [b["weights"].sum() for b in tail] == [32, 8]


def test_sample_task_batches_tokenises_only_the_draws(tokenizer, glue_dir):
    from fisher_jax.data import sample_task_batches

    full = sample_batches_with_replacement(encode(tokenizer, load_split("sst2", "train", glue_dir), 64),
                                           num_examples=40, batch_size=16, seed=3)
    lazy = sample_task_batches("sst2", "train", tokenizer, num_examples=40, batch_size=16, glue_dir=glue_dir, seed=3)
    assert len(lazy.encoded) <= 40 < len(full.encoded)  # 40 draws from 67k rows
    for a, b, ia, ib in zip(full, lazy, full.indices, lazy.indices):
        np.testing.assert_array_equal(ia, ib)  # the same rows of the split, in draw order
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@needs_glue
@pytest.mark.slow
def test_task_batches_matches_manual_pipeline(tokenizer):
    it = task_batches("SST-2", "dev", tokenizer, 16, glue_dir=GLUE_DIR, shuffle=True, seed=2,
                      max_examples=100)
    assert len(it) == 7
    got = list(it)
    assert max(b["input_ids"].shape[1] for b in got) <= 64  # SST-2 default max length 64
    full = encode(tokenizer, load_split("sst2", "dev", GLUE_DIR), max_length=64)
    manual = batches(full, 16, shuffle=True, seed=2, max_examples=100)
    for (a, b) in zip(got, manual):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert [p.tolist() for p in it.indices] == [p.tolist() for p in manual.indices]
    stsb = next(task_batches("stsb", "dev", tokenizer, 8, glue_dir=GLUE_DIR, max_examples=8))
    assert stsb["labels"].dtype == np.float32 and stsb["labels"][0] == pytest.approx(5.0)


def test_examples_validate_lengths():
    with pytest.raises(FisherJaxError, match="labels"):
        Examples(["a", "b"], None, np.zeros(3, np.int64), "rte", "dev", "test")


# ---------------------------------------------------------------------------------------------
# reading a share of a split (several processes)


@pytest.mark.parametrize("task", ["cola", "stsb"])  # header-less TSV, float labels
def test_load_split_keeps_only_the_chosen_rows(glue_dir, task):
    whole = load_split(task, "dev", glue_dir)
    some = load_split(task, "dev", glue_dir, keep=lambda i: i % 3 == 1)
    want = whole.subset(np.arange(1, len(whole), 3))
    assert some.num_rows == whole.num_rows == len(whole) and len(some) == len(want) < len(whole)
    assert some.text_a == want.text_a and some.text_b == want.text_b
    np.testing.assert_array_equal(some.labels, want.labels)
    assert len(load_split(task, "dev", glue_dir, keep=lambda i: False)) == 0


@pytest.mark.parametrize("task,split", [("cola", "dev"), ("mrpc", "dev"), ("stsb", "dev"), ("sst2", "train")])
def test_byte_ranges_of_a_split_are_the_split(glue_dir, task, split):
    whole = load_split(task, split, glue_dir)
    for n in (1, 2, 3, 7):  # CoLA: no header; MRPC: a byte-order mark; SST-2: 67k rows
        parts = [load_split(task, split, glue_dir, part=(p, n)) for p in range(n)]
        assert sum(len(x) for x in parts) == len(whole) and (n == 1 or all(len(x) < len(whole) for x in parts))
        assert [t for x in parts for t in x.text_a] == whole.text_a
        assert [t for x in parts for t in (x.text_b or [])] == (whole.text_b or [])
        np.testing.assert_array_equal(np.concatenate([x.labels for x in parts]), whole.labels)


def test_byte_ranges_of_awkward_files(tmp_path):
    # QQP-style malformed rows skipped, CRLF and lone-CR line ends, a tiny file split in more parts
    # than it has lines, and a bad label's line number in the whole file from whichever part has it
    rows = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\r\n"
    rows += "".join(f"{i}\t1\t2\tq{i}\tr{i}\t{i % 2}\r\n" if i % 5 else f"{i}\ttruncated\r" for i in range(40))
    _write(tmp_path / "QQP" / "train.tsv", rows)
    whole = load_split("qqp", "train", tmp_path)
    assert len(whole) == 32 and whole.text_a[:2] == ["q1", "q2"]
    for n in (2, 5, 400):
        parts = [load_split("qqp", "train", tmp_path, part=(p, n)) for p in range(n)]
        assert [t for x in parts for t in x.text_a] == whole.text_a
    _write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n" +
           "".join(f"{i}\ta\tb\t{'maybe' if i == 17 else 'entailment'}\n" for i in range(30)))
    errors = []
    for p in range(3):  # line 19 (row 17 after the header) lies in one part, not the first
        try:
            assert len(load_split("rte", "dev", tmp_path, part=(p, 3))) > 0
        except FisherJaxError as e:
            errors.append((p, str(e)))
    assert len(errors) == 1 and errors[0][0] > 0 and "dev.tsv:19: label 'maybe'" in errors[0][1]


def test_task_files_by_byte_ranges(tmp_path):
    from fisher_jax.data.glue import split_reads_by_bytes
    from fisher_jax.data.taskfile import parse_task

    _write(tmp_path / "t.tsv", "text\tlabel\n" + "".join(f"s{i}\t{'ab'[i % 2]}\n" for i in range(25)))
    _write(tmp_path / "t.jsonl", "".join(json.dumps({"text": f"s{i}", "label": "ab"[i % 2]}) + "\n" for i in range(25)))
    _write(tmp_path / "t.csv", "text,label\n" + "".join(f'"s{i}, quoted",a\n' for i in range(5)))
    spec = parse_task({"name": "ranges", "train": "t.tsv", "dev": "t.jsonl", "test": "t.csv", "text": "text",
                       "labels": ["a", "b"]}, tmp_path / "ranges.yaml")
    for split in ("train", "dev"):
        whole = load_split(spec, split)
        assert split_reads_by_bytes(spec, split) and len(whole) == 25
        parts = [load_split(spec, split, part=(p, 4)) for p in range(4)]
        assert [t for x in parts for t in x.text_a] == whole.text_a and all(len(x) < 25 for x in parts)
        np.testing.assert_array_equal(np.concatenate([x.labels for x in parts]), whole.labels)
    assert not split_reads_by_bytes(spec, "test")  # quoted CSV: a line is not always a row
    with pytest.raises(FisherJaxError, match="keep= instead"):
        load_split(spec, "test", part=(0, 2))
    _write(tmp_path / "t.jsonl", "".join(json.dumps({"text": "s", "label": "c" if i == 20 else "a"}) + "\n"
                                         for i in range(25)))
    with pytest.raises(FisherJaxError, match=r"t.jsonl:21: label 'c'"):
        [load_split(spec, "dev", part=(p, 4)) for p in range(4)]


def test_a_bad_label_is_reported_by_every_reader_of_the_file(tmp_path):
    _write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tmaybe\n")
    for keep in (None, lambda i: i == 0, lambda i: False):  # the bad row is never kept by the last two
        with pytest.raises(FisherJaxError, match=r"dev.tsv:3: label 'maybe'"):
            load_split("rte", "dev", tmp_path, keep=keep)


def test_split_rows_take_rows_in_the_order_asked(glue_dir, monkeypatch):
    from fisher_jax.data import SplitRows

    reads = []
    real = batching_mod.load_split
    monkeypatch.setattr(batching_mod, "load_split", lambda *a, **k: reads.append(k) or real(*a, **k))
    source = SplitRows("RTE", "validation", glue_dir)
    assert len(source) == 277 and source.split == "dev"
    got = source.take([5, 2, 5, 276])
    whole = load_split("rte", "dev", glue_dir)
    assert got.text_a == [whole.text_a[i] for i in (5, 2, 5, 276)]
    assert source.take(np.arange(277)) is source.take(range(277)) and len(reads) == 1  # one process: read once
    with pytest.raises(FisherJaxError, match="row 277 is outside rte dev's 277 rows"):
        source.take([0, 277])


def test_a_share_knows_every_length_but_holds_only_its_rows():
    lengths = np.array([3, 5, 2, 4])
    held = np.array([True, False, True, False])
    offsets = np.r_[0, np.cumsum(np.where(held, lengths, 0))]
    enc = Encoded(np.arange(1, 6, dtype=np.int32), np.zeros(5, np.int8), offsets, np.array([0, 1, 0, 1]),
                  max_length=8, pad_token_id=0, row_lengths=lengths, held=held)
    assert len(enc) == 4 and enc.lengths.tolist() == [3, 5, 2, 4] and enc.row(2)[0].tolist() == [4, 5]
    with pytest.raises(FisherJaxError, match="another process"):
        enc.row(1)
    sub = enc.subset([2, 1, 0])
    assert sub.lengths.tolist() == [2, 5, 3] and sub.held.tolist() == [True, False, True]
    assert sub.row(0)[0].tolist() == [4, 5] and sub.row(2)[0].tolist() == [1, 2, 3]
    assert batching_mod.batch_length(enc, np.array([0, 1]), (4, 8)) == 8  # planned from a row it lacks
    batch = batching_mod.make_batch(enc, np.array([2, 0]), 3, (4, 8))
    assert batch["input_ids"].tolist() == [[4, 5, 0, 0], [1, 2, 3, 0], [0, 0, 0, 0]]
    with pytest.raises(FisherJaxError, match="make_local_batch"):
        batching_mod.make_batch(enc, np.array([0, 1]), 2, (4, 8))
