"""Hyperparameters the papers tuned on validation data (``lam``, ``alpha``, Fisher normalisation)
chosen on a held-out slice of the *training* split — never on the dev split used for reporting.

The slice is the last ``held_out`` training rows of each task. It keeps the dev split clean, but
checkpoints fine-tuned on the whole training split have seen those rows, so the search measures
how well the merge preserves *training* behaviour; fine-tune with those rows left out (e.g.
``FinetuneConfig(max_train_examples=...)`` draws a subset) for a truly unseen slice.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def held_out_batches(exp, task: str, n: int) -> list[dict]:
    from ..data.batching import default_max_length, encode
    from ..data.glue import load_split
    from ..train.evaluate import sorted_batches

    key = (task, n)
    if key not in exp.held_out:
        examples = load_split(task, "train", exp.config.glue_dir)
        examples = examples.subset(np.arange(max(0, len(examples) - n), len(examples)))
        exp.held_out[key] = sorted_batches(encode(exp.tokenizer, examples, default_max_length(task)),
                                         exp.config.eval_batch_size)
    return exp.held_out[key]


def search_hyperparameters(exp, spec, subset: tuple[str, ...]) -> dict[str, Any] | None:
    """Best keyword overrides for ``spec`` on ``subset`` by mean held-out score, or None (no grid)."""
    from ..merging import merge
    from ..train.evaluate import evaluate_batches
    from .config import _thaw

    search = _thaw(exp.config.search)
    grid = (search.get("grid") or {}).get(spec.label)
    if not grid:
        return None
    n = int(search.get("held_out", 256))
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
    exp.results.setdefault("search", {})[f"{spec.label}|{'+'.join(subset)}"] = {"tried": tried, "chosen": best}
    log.info("search %s on %s: chose %s (held-out %.3f)", spec.label, "+".join(subset), best, best_score)
    return best
