"""Evaluation of a sequence classifier on a GLUE split: jitted, batched, padding rows weighted out.

``predict`` runs any iterable of batch dicts through the model and returns numpy logits, labels
and weights; ``evaluate`` loads a split, tokenises it, sorts it by length (metrics do not depend
on order, and sorted batches carry little padding), warms up one batch per bucket shape so the
reported examples/s excludes compilation, and returns the task's GLUE metrics.

Command line: ``fisher-jax evaluate --model DIR --task T [--split dev] [--max-examples N
--eval-seed S] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import sys
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import jax
import numpy as np

from .. import parallel as par
from ..errors import FisherJaxError

log = logging.getLogger(__name__)

# Finer than the data layer's default (32, 64, 128): GLUE sentences are short, and a forward
# pass costs roughly in proportion to the padded length.
EVAL_BUCKETS: tuple[int, ...] = (16, 32, 48, 64, 96, 128)


def _as_model(model: Any, num_labels: Optional[int] = None):
    from ..models.model import Model

    if isinstance(model, Model):
        return model
    if isinstance(model, (str, os.PathLike)):
        from ..models.hub import from_pretrained

        return from_pretrained(model, num_labels=num_labels)
    raise FisherJaxError(f"expected a fisher_jax Model or a model folder, got {type(model).__name__}")


def _forward(model, params, batch: dict, mesh=None) -> jax.Array:
    """Logits of one batch through the model's cached jitted forward pass (no host sync).

    With a mesh of several devices the batch (this process's rows) is split over them, padded
    with copies of row 0 to a multiple of this process's device count; the caller (``predict``)
    cuts the padding rows off again.
    """
    from ..models.model import _jitted_forward

    p = model.params if params is None else params
    inputs = par.batch_inputs(batch)
    if mesh is not None and mesh.size > 1:
        inputs = par.shard_batch(par.pad_rows(inputs, par.num_shards(mesh)), mesh)
    return _jitted_forward(model.arch, "logits")(p, None, *inputs.values())


def _placed(model, params, mesh):
    """Parameters on every device of ``mesh``, or split over its ``"model"`` axis
    (:func:`fisher_jax.parallel.place_params`; a no-op for parameters already placed so)."""
    return par.place_params(model.params if params is None else params, mesh)


def _mesh_for(params: Any, mesh: Any):
    """``mesh``; else the mesh split parameters already live on (so they are not gathered onto
    every device); else :func:`fisher_jax.parallel.data_mesh`."""
    if mesh is not None:
        return par.resolve_mesh(mesh)
    placed = par.mesh_of(params)
    return par.data_mesh() if placed is None else placed


def predict(model, batches: Iterable[dict], params: Any = None,
            mesh: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``batches`` through ``model`` (eval mode): ``(logits [N, C], labels [N], weights [N])``.

    Every batch is dispatched before any result is fetched, so the host never waits inside the
    loop; each is split over every process's devices (:mod:`fisher_jax.parallel`). With several
    processes each passes its slice of every batch and every process gets the whole batches'
    rows back, in the global batches' order. ``weights`` are
    the batches' ``weights`` (ones where a batch has none); rows of weight 0 are padding and are
    returned too, so callers pass the weights on to the metrics. ``params`` replaces
    ``model.params`` (e.g. the parameters inside a training loop). ``mesh``: the devices
    (default: those split ``params`` live on, else :func:`fisher_jax.parallel.data_mesh`); with a
    ``"model"`` axis the parameters are split over it and XLA inserts the collectives.
    """
    mesh = _mesh_for(params, mesh)
    params = _placed(model, params, mesh)
    outs, labels, weights = [], [], []
    for batch in batches:
        if "input_ids" not in batch:
            raise FisherJaxError(f"batch has no 'input_ids' (keys: {', '.join(batch)})")
        n = np.shape(batch["input_ids"])[0]
        outs.append((_forward(model, params, batch, mesh), n))
        labels.append(np.asarray(batch["labels"]) if "labels" in batch else np.zeros(n, np.float32))
        weights.append(np.asarray(batch["weights"], np.float32) if "weights" in batch else np.ones(n, np.float32))
    if not outs:
        raise FisherJaxError("no batches to predict on")
    fetched = par.fetch([o for o, _ in outs])
    procs = jax.process_count()  # each process's padded block of the global batch, in process order
    logits = np.concatenate([np.asarray(o, np.float32).reshape((procs, -1) + o.shape[1:])[:, :n].reshape(
        (procs * n,) + o.shape[1:]) for o, (_, n) in zip(fetched, outs)])
    return logits, par.gather_rows(labels), par.gather_rows(weights)


def sorted_batches(encoded, batch_size: int, buckets: Sequence[int] = EVAL_BUCKETS) -> list[dict]:
    """All batches of ``encoded`` with examples sorted by length (every row exactly once).

    Each batch also carries ``example_ids`` (int64 ``[B]``): the row of ``encoded`` each batch
    row holds, -1 for padding rows, so predictions can be put back in the rows' own order. With
    several processes the batches are this process's slices, ``example_ids`` too.
    """
    from ..data.batching import BatchIterator, bucket_sizes
    from ..distributed import local_slice, process_part

    order = np.argsort(encoded.lengths, kind="stable")
    plan = [order[s:s + int(batch_size)] for s in range(0, len(order), int(batch_size))]
    it = BatchIterator(encoded, plan, batch_size, bucket_sizes(buckets, encoded.max_length))
    part = process_part()
    sl, k = local_slice(batch_size, part)
    out = []
    for batch, idx in zip(it, it.indices):
        ids = np.full(k * part[1], -1, np.int64)
        ids[:len(idx)] = idx
        out.append({**batch, "example_ids": ids[sl]})
    return out


def _predictions_in_row_order(task: Any, logits: np.ndarray, weights: np.ndarray,
                              batch_list: list[dict]) -> list:
    """Class ids (argmax) or regression values of the real rows (weight > 0), ordered by the
    batches' ``example_ids`` (as the rows came, when the batches carry none)."""
    from ..data.metrics import predictions_from_logits

    preds = predictions_from_logits(task, logits)
    keep = weights > 0
    if all("example_ids" in b for b in batch_list):
        ids = par.gather_rows([b["example_ids"] for b in batch_list])[keep]
        preds = preds[keep][np.argsort(ids, kind="stable")]
    else:
        preds = preds[keep]
    return [float(v) for v in preds] if np.issubdtype(preds.dtype, np.floating) else [int(v) for v in preds]


def evaluate_batches(model, task: Any, batch_list: list[dict], params: Any = None,
                     warmup: bool = True, return_predictions: bool = False,
                     label_order: Optional[Sequence[int]] = None, mesh: Any = None) -> dict[str, Any]:
    """Metrics of ``model`` on prepared batches, plus ``num_examples``, ``examples_per_s``, ``seconds``.

    With ``warmup`` one batch of every distinct shape runs first, so the timing excludes
    compilation (``compile_s`` reports that warm-up). With ``return_predictions`` the result also
    has ``predictions``: one per real row (weight > 0), the argmax class id (classification) or
    the float output (regression), in the rows' original order (by the batches' ``example_ids``,
    as :func:`sorted_batches` writes them) rather than the length-sorted batch order.
    ``label_order`` (:func:`fisher_jax.data.label_order`) reorders the model's output columns into
    the task's label order first (a checkpoint whose ``id2label`` orders the classes differently).
    ``mesh``: as in :func:`predict`.
    """
    from ..data.metrics import compute_metrics

    mesh = _mesh_for(params, mesh)
    params = _placed(model, params, mesh)  # host (numpy) parameters go to the devices once, not per batch
    compile_s = 0.0
    if warmup:
        t0 = time.perf_counter()
        seen = {}
        for b in batch_list:
            seen.setdefault(np.shape(b["input_ids"]), b)
        jax.block_until_ready([_forward(model, params, b, mesh) for b in seen.values()])
        compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits, labels, weights = predict(model, batch_list, params, mesh)
    seconds = time.perf_counter() - t0
    if label_order is not None:
        logits = logits[:, list(label_order)]
    metrics = compute_metrics(task, logits, labels, weights)
    n = int(round(float(weights.sum())))
    metrics.update(num_examples=n, seconds=seconds, examples_per_s=n / max(seconds, 1e-9), compile_s=compile_s)
    if return_predictions:
        metrics["predictions"] = _predictions_in_row_order(task, logits, weights, batch_list)
    return metrics


def evaluate(model, task: Any, split: str = "dev", glue_dir: Optional[str] = None, batch_size: int = 64,
             max_length: Optional[int] = None, max_examples: Optional[int] = None, tokenizer: Any = None,
             buckets: Sequence[int] = EVAL_BUCKETS, seed: int = 0,
             return_predictions: bool = False) -> dict[str, Any]:
    """GLUE metrics of ``model`` (a ``Model`` or a model folder) on ``task``'s ``split``.

    Returns the task's metrics and ``score`` (from :func:`fisher_jax.data.metrics.compute_metrics`)
    plus ``num_examples`` (every row once; the last partial batch is weighted out),
    ``examples_per_s`` and ``seconds`` (compilation excluded), ``compile_s``, ``task``, ``split``.
    ``max_examples`` scores a seeded random subset of N rows
    (:func:`fisher_jax.data.batching.eval_subset` with ``seed``), not the split's first rows;
    ``rows`` records the scored row indices (sorted). ``return_predictions`` adds
    ``predictions`` in ``rows`` order (see :func:`evaluate_batches`). ``tokenizer`` defaults to
    the one saved beside the model.
    """
    from ..data.batching import SplitRows, default_max_length, encode_rows, eval_subset
    from ..data.glue import get_task, label_order, normalize_split

    spec = get_task(task)
    split = normalize_split(spec, split)
    model = _as_model(model)
    if model.num_labels != spec.num_labels:
        raise FisherJaxError(
            f"model has {model.num_labels} output(s) but task {spec.name} needs {spec.num_labels}: "
            "is this a checkpoint fine-tuned on another task?")
    order = label_order(getattr(model.config, "id2label", None), spec)  # None: the ids already agree
    if int(batch_size) < 1:
        raise FisherJaxError(f"batch_size must be positive, got {batch_size}")
    if tokenizer is None:
        from ..models.hub import load_tokenizer

        tokenizer = load_tokenizer(model)
    source = SplitRows(spec, split, glue_dir)
    if max_examples is not None and int(max_examples) < 1:
        raise FisherJaxError(f"max_examples must be positive, got {max_examples}")
    rows = eval_subset(len(source), max_examples, int(seed))
    length = default_max_length(spec) if max_length is None else int(max_length)
    encoded = encode_rows(tokenizer, source, rows, length)
    result = evaluate_batches(model, spec, sorted_batches(encoded, int(batch_size), buckets),
                              return_predictions=return_predictions, label_order=order)
    result.update(task=spec.name, split=split, max_length=length, rows=[int(r) for r in rows])
    return result


# --------------------------------------------------------------------------- command line
def add_evaluate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fisher-jax evaluate``."""
    from ..cli import TASK_HELP, add_out_file

    parser.add_argument("--model", required=True, help="fine-tuned model folder (config.json + model.safetensors)")
    parser.add_argument("--task", required=True, help=TASK_HELP)
    parser.add_argument("--split", default="dev", help="split to evaluate (default: dev)")
    parser.add_argument("--glue-dir", default=None,
                        help="local GLUE folder (default: $GLUE_DIR, else the Hub; a task file names its own data)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per forward pass (default: 64)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the task's)")
    parser.add_argument("--max-examples", type=int, default=None, metavar="N",
                        help="score a seeded random subset of N rows (see --eval-seed) instead of the whole split")
    parser.add_argument("--eval-seed", type=int, default=0,
                        help="seed of the --max-examples subset (default: 0)")
    add_out_file(parser, "also write the metrics as JSON", metavar="FILE.json")
    return parser


def run_evaluate(args: argparse.Namespace) -> int:
    """``fisher-jax evaluate``: print the metrics as JSON (and write them to ``--out``)."""
    result = evaluate(args.model, args.task, split=args.split, glue_dir=args.glue_dir, batch_size=args.batch_size,
                      max_length=args.max_length, max_examples=args.max_examples, seed=args.eval_seed)
    result["model"] = str(args.model)
    text = json.dumps(result, indent=2)
    # The terminal gets the metrics; the row indices and predictions go to --out only.
    from ..distributed import is_main_process

    if not is_main_process():  # every process computed the same metrics; one prints and writes
        return 0
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "predictions")}, indent=2))
    if args.out:
        out = Path(args.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:  # python -m fisher_jax.train.evaluate
    from ..cli import main as cli_main  # one place turns FisherJaxError into "error: ..." and exit 2

    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
