"""Hyperparameters the papers tuned on validation data (``lam``, ``alpha``, Fisher normalisation)
chosen on a held-out slice of the *training* split — never on the dev split used for reporting.

The slice is the one the task's checkpoint was fine-tuned without: ``fisher-jax finetune`` records
it in the checkpoint folder's ``finetune_history.json`` (``history["held_out"]``: rows, seed and
the split's size; the rows are :func:`fisher_jax.data.batching.held_out_split`'s second part),
and the search scores up to ``held_out`` of those rows (a seeded subset when there are more).
A checkpoint without that record (a Hub model, an older zoo) falls back to the split's last
``held_out`` training rows, which it may well have trained on: a WARNING is logged and the search
record says ``"unseen": false, "note": "not guaranteed unseen"``. Either way the rows never meet
the dev split. ``results["search"][cell]["held_out"][task]`` records how many rows were scored.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import FisherJaxError

log = logging.getLogger(__name__)

HISTORY_FILE = "finetune_history.json"
NOT_UNSEEN = "not guaranteed unseen"


@dataclass(frozen=True)
class HeldOutSlice:
    """The training rows a search scores for one task, their batches and whether they are unseen."""

    batches: list
    rows: np.ndarray  # row ids of the task's training split
    unseen: bool  # True: the checkpoint's recorded held-out rows, never trained on

    def record(self) -> dict[str, Any]:
        """What the search record stores: the row count and whether the checkpoint never saw them."""
        out: dict[str, Any] = {"rows": int(len(self.rows)), "unseen": self.unseen}
        return out if self.unseen else {**out, "note": NOT_UNSEEN}


def _held_out_record(checkpoint_folder: Optional[str]) -> tuple[Optional[dict], Optional[dict]]:
    """``(history["held_out"], config)`` of a checkpoint's ``finetune_history.json``, or Nones."""
    if not checkpoint_folder:
        return None, None
    path = Path(checkpoint_folder) / HISTORY_FILE
    if not path.is_file():
        return None, None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise FisherJaxError(f"{path} is corrupt: re-run fine-tuning or delete it") from None
    return (saved.get("history") or {}).get("held_out"), saved.get("config")


def held_out_rows(checkpoint_folder: Optional[str], task: str, n_train: int) -> tuple[np.ndarray, bool]:
    """``(rows, trained_on)``: the training rows of ``task`` the checkpoint was fine-tuned without.

    With a record ``{"rows": K, "seed": s, "num_train_rows": n}`` in the folder's
    ``finetune_history.json`` the rows are ``held_out_split(n, K, s)[1]`` and ``trained_on`` is
    False. Without one (or with ``K == 0``) every row of the split may have been trained on:
    ``(arange(n_train), True)`` and a logged WARNING. A record for another task or another size
    of split raises :class:`FisherJaxError` (its row ids would name other rows).
    """
    from ..data.batching import HELD_OUT_SEED, held_out_split
    from ..data.glue import get_task

    record, config = _held_out_record(checkpoint_folder)
    trained_task = (config or {}).get("task")
    if trained_task and trained_task != "-" and get_task(trained_task).name != get_task(task).name:
        raise FisherJaxError(f"{checkpoint_folder} was fine-tuned on {trained_task}, not {task}")
    if not record or int(record.get("rows", 0)) == 0:
        log.warning("%s: no held-out record in %s; the hyperparameter search scores %s training rows "
                    "the checkpoint may have trained on (%s)", task, checkpoint_folder or "the checkpoint",
                    task, NOT_UNSEEN)
        return np.arange(int(n_train)), True
    if int(record.get("num_train_rows", -1)) != int(n_train):
        raise FisherJaxError(f"{checkpoint_folder} held out rows of a {record.get('num_train_rows')}-row "
                             f"{task} training split, but this one has {n_train} rows")
    return held_out_split(int(n_train), int(record["rows"]), int(record.get("seed", HELD_OUT_SEED)))[1], False


def held_out_slice(exp, task: str, n: int) -> HeldOutSlice:
    """Up to ``n`` held-out training rows of ``task`` for the checkpoint ``exp`` uses, batched.

    Unseen rows (:func:`held_out_rows`) are subsampled with
    ``eval_subset(len(rows), n, exp.config.seed)``; the fallback keeps the split's last ``n``
    rows. Cached in ``exp.held_out``.
    """
    from ..data.batching import SplitRows, default_max_length, encode_rows, eval_subset
    from ..train.evaluate import sorted_batches

    if int(n) < 1:
        raise FisherJaxError(f"search held_out must be a positive number of rows, got {n}")
    key = (task, int(n))
    if key not in exp.held_out:
        examples = SplitRows(task, "train", exp.config.glue_dir)
        rows, trained_on = held_out_rows(exp.load_models()[task].source, task, len(examples))
        chosen = rows[-int(n):] if trained_on else rows[eval_subset(len(rows), int(n), exp.config.seed)]
        encoded = encode_rows(exp.tokenizer, examples, chosen, default_max_length(task))
        exp.held_out[key] = HeldOutSlice(sorted_batches(encoded, exp.config.eval_batch_size), chosen,
                                         unseen=not trained_on)
    return exp.held_out[key]


def held_out_batches(exp, task: str, n: int) -> list[dict]:
    """The batches of :func:`held_out_slice` (every chosen row exactly once, sorted by length)."""
    return held_out_slice(exp, task, n).batches


def search_hyperparameters(exp, spec, subset: tuple[str, ...]) -> dict[str, Any] | None:
    """Best keyword overrides for ``spec`` on ``subset`` by mean held-out score, or None (no grid)."""
    from ..merging import merge
    from ..train.evaluate import evaluate_batches
    search = exp.config.section("search")
    grid = (search.get("grid") or {}).get(spec.label)
    if not grid:
        return None
    n = int(search["held_out"])
    names = list(grid)
    models = [exp.load_models()[t] for t in subset]
    base_kw = exp.merge_kwargs(spec, subset)
    best, best_score, tried = None, -np.inf, []
    for values in itertools.product(*(grid[k] for k in names)):
        kw = dict(zip(names, values))
        merged = merge(spec.method, models, **{**base_kw, **kw})
        score = float(np.mean([evaluate_batches(m, t, held_out_batches(exp, t, n), warmup=False)["score"]
                               for t, m in zip(subset, merged)]))
        tried.append({**kw, "held_out_score": score})
        if score > best_score:
            best, best_score = kw, score
    exp.results.setdefault("search", {})[exp.key(spec.label, subset)] = {
        "tried": tried, "chosen": best, "held_out": {t: held_out_slice(exp, t, n).record() for t in subset}}
    log.info("search %s on %s: chose %s (held-out %.3f)", spec.label, "+".join(subset), best, best_score)
    return best
