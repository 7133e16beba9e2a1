"""Hyperparameter search: it scores the training rows the checkpoint was fine-tuned without."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fisher_jax.data.batching import HELD_OUT_SEED, encode, held_out_split
from fisher_jax.data.glue import load_split
from fisher_jax.errors import FisherJaxError
from fisher_jax.experiment import search

RTE_TRAIN = 2490  # rows of the local RTE training split


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from fisher_jax.models.hub import load_tokenizer

    return load_tokenizer(minilm_path)


def _checkpoint(folder: Path, task: str = "rte", rows: int = 249, seed: int = HELD_OUT_SEED,
                num_train_rows: int = RTE_TRAIN) -> str:
    """A folder with the finetune_history.json fisher-jax finetune writes (only the fields read)."""
    folder.mkdir(parents=True, exist_ok=True)
    held = {"rows": rows, "seed": seed, "num_train_rows": num_train_rows}
    (folder / "finetune_history.json").write_text(json.dumps(
        {"config": {"task": task, "held_out_examples": rows}, "history": {"held_out": held, "best": None}}))
    return str(folder)


def _fake_exp(tokenizer, glue_dir, source: str | None, task: str = "rte", seed: int = 0):
    models = {task: SimpleNamespace(source=source)}
    config = SimpleNamespace(glue_dir=str(glue_dir), eval_batch_size=16, seed=seed, search={})
    return SimpleNamespace(config=config, tokenizer=tokenizer, held_out={}, results={},
                           load_models=lambda: models)


def _token_rows(batch_list) -> Counter:
    """Multiset of the real rows' token ids over all batches."""
    out: Counter = Counter()
    for b in batch_list:
        for ids, mask, w in zip(b["input_ids"], b["attention_mask"], b["weights"]):
            if w == 1:
                out[tuple(ids[mask == 1].tolist())] += 1
    return out


def test_held_out_rows_are_the_recorded_unseen_rows(tmp_path):
    folder = _checkpoint(tmp_path / "ckpt")
    rows, trained_on = search.held_out_rows(folder, "rte", RTE_TRAIN)
    train_rows, held = held_out_split(RTE_TRAIN, 249, HELD_OUT_SEED)
    assert trained_on is False and len(rows) == 249
    np.testing.assert_array_equal(rows, held)
    assert not set(rows.tolist()) & set(train_rows.tolist())
    # The recorded seed decides the rows, not the module's default; "RTE" names the same task.
    other, _ = search.held_out_rows(_checkpoint(tmp_path / "s5", task="RTE", seed=5), "rte", RTE_TRAIN)
    np.testing.assert_array_equal(other, held_out_split(RTE_TRAIN, 249, 5)[1])
    assert not np.array_equal(other, rows)


def test_held_out_rows_reject_another_task_or_split_size(tmp_path):
    with pytest.raises(FisherJaxError, match="fine-tuned on mrpc, not rte"):
        search.held_out_rows(_checkpoint(tmp_path / "a", task="mrpc"), "rte", RTE_TRAIN)
    with pytest.raises(FisherJaxError, match="2000-row"):
        search.held_out_rows(_checkpoint(tmp_path / "b", num_train_rows=2000), "rte", RTE_TRAIN)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "finetune_history.json").write_text("{not json")
    with pytest.raises(FisherJaxError, match="corrupt"):
        search.held_out_rows(str(tmp_path / "c"), "rte", RTE_TRAIN)


@pytest.mark.parametrize("case", ["no file", "no folder", "no held-out record", "zero rows"])
def test_missing_record_warns_and_falls_back_to_all_rows(tmp_path, caplog, case):
    folder = tmp_path / "hub"
    folder.mkdir()
    if case == "no held-out record":  # an older zoo checkpoint, trained on every row
        (folder / "finetune_history.json").write_text(json.dumps({"config": {"task": "rte"}, "history": {}}))
    if case == "zero rows":
        _checkpoint(folder, rows=0)
    with caplog.at_level(logging.WARNING, logger="fisher_jax.experiment.search"):
        rows, trained_on = search.held_out_rows(None if case == "no folder" else str(folder), "rte", 100)
    assert trained_on is True
    np.testing.assert_array_equal(rows, np.arange(100))
    assert [r for r in caplog.records if r.levelno == logging.WARNING and "not guaranteed unseen" in r.message]


def test_held_out_slice_scores_a_seeded_subset_of_the_unseen_rows(tmp_path, tokenizer, glue_dir):
    exp = _fake_exp(tokenizer, glue_dir, _checkpoint(tmp_path / "ckpt"))
    train_rows, held = held_out_split(RTE_TRAIN, 249, HELD_OUT_SEED)
    part = search.held_out_slice(exp, "rte", 64)
    assert len(part.rows) == 64 == len(set(part.rows.tolist())) and part.unseen
    assert set(part.rows.tolist()) <= set(held.tolist())
    assert not set(part.rows.tolist()) & set(train_rows.tolist())
    assert part.record() == {"rows": 64, "unseen": True}
    # The batches hold exactly those training rows, each once; none is a dev row.
    train = load_split("rte", "train", glue_dir)
    want = encode(tokenizer, train.subset(part.rows), 128)
    assert _token_rows(part.batches) == Counter(tuple(want.row(i)[0].tolist()) for i in range(64))
    dev = encode(tokenizer, load_split("rte", "dev", glue_dir), 128)
    assert not set(_token_rows(part.batches)) & {tuple(dev.row(i)[0].tolist()) for i in range(len(dev))}
    assert search.held_out_batches(exp, "rte", 64) is part.batches  # cached
    # Another seed, another subset of the same unseen rows; a cap above the slice keeps all of it.
    other = search.held_out_slice(_fake_exp(tokenizer, glue_dir, exp.load_models()["rte"].source, seed=1),
                                  "rte", 64)
    assert set(other.rows.tolist()) <= set(held.tolist()) and set(other.rows.tolist()) != set(part.rows.tolist())
    np.testing.assert_array_equal(search.held_out_slice(exp, "rte", 1000).rows, held)


def test_held_out_slice_without_record_is_flagged(tmp_path, tokenizer, glue_dir, caplog):
    (tmp_path / "hub").mkdir()
    exp = _fake_exp(tokenizer, glue_dir, str(tmp_path / "hub"))
    with caplog.at_level(logging.WARNING, logger="fisher_jax.experiment.search"):
        part = search.held_out_slice(exp, "rte", 32)
    np.testing.assert_array_equal(part.rows, np.arange(RTE_TRAIN - 32, RTE_TRAIN))  # the old last rows
    assert part.record() == {"rows": 32, "unseen": False, "note": "not guaranteed unseen"}
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    with pytest.raises(FisherJaxError, match="positive"):
        search.held_out_slice(exp, "rte", 0)


def test_search_records_the_rows_it_scored(tmp_path, tokenizer, glue_dir, monkeypatch):
    import fisher_jax.merging as merging
    import fisher_jax.train.evaluate as evaluate

    exp = _fake_exp(tokenizer, glue_dir, _checkpoint(tmp_path / "ckpt"))
    search_section = {"held_out": 40, "grid": {"ta": {"lam": [0.2, 0.7, 1.0]}}}
    exp.config.section = lambda name: search_section if name == "search" else {}
    exp.key = lambda label, subset: f"{label}|{'+'.join(subset)}|r0"
    exp.merge_kwargs = lambda spec, subset: {}
    scored = []
    # A stand-in merge whose held-out score peaks at lam = 0.7; it records the batches scored.
    monkeypatch.setattr(merging, "merge", lambda method, models, lam: [lam] * len(models))
    monkeypatch.setattr(evaluate, "evaluate_batches",
                        lambda m, t, b, warmup: scored.append(b) or {"score": -abs(m - 0.7)})
    chosen = search.search_hyperparameters(exp, SimpleNamespace(label="ta", method="task_arithmetic"), ("rte",))
    assert chosen == {"lam": 0.7}
    rec = exp.results["search"]["ta|rte|r0"]
    assert rec["chosen"] == {"lam": 0.7} and len(rec["tried"]) == 3
    assert rec["held_out"] == {"rte": {"rows": 40, "unseen": True}}
    assert all(b is exp.held_out[("rte", 40)].batches for b in scored)
