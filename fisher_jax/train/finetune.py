"""Fine-tune a BERT-family model on a GLUE task: optax AdamW, one jitted train step, orbax resume.

Everything a run does is fixed by one frozen :class:`FinetuneConfig`:

* data: the task's train split minus a held-out slice (``held_out_examples`` rows,
  :func:`fisher_jax.data.batching.held_out_split`: the same rows for every seed), optionally a
  fixed random subset of ``max_train_examples`` of the rest (drawn with ``seed``), tokenised
  once; every epoch is a fresh seeded shuffle of length-grouped,
  fixed-shape batches (``fisher_jax.data.batching``), so step ``s`` always sees the same batch;
* optimiser: AdamW with linear warm-up then linear decay to 0, weight decay off biases and
  LayerNorm scales, global-norm clipping;
* step: one ``jax.jit``-ed function (forward with dropout, loss weighted by the batch's
  ``weights`` so padding rows count zero, gradient, update); the dropout key of step ``s`` is
  ``fold_in(dropout_key(seed), s)``; data-parallel over every process's devices (state
  replicated, each batch split and padded with weight-0 rows; :mod:`fisher_jax.parallel`), and
  with JAX's partitionable threefry the dropout masks, hence the run, do not depend on the device
  count; on a mesh with a ``"model"`` axis (``finetune(..., mesh=data_mesh(model_parallel=K))``)
  the parameters and optimiser state are split over it instead of replicated (bodies larger than
  one device); with several processes (:mod:`fisher_jax.distributed`) each builds only its slice of
  every batch, all of them write the orbax checkpoints together, and only the main process
  writes the model folder and draws the progress bar;
* evaluation on the held-out slice every ``eval_every`` steps (default once per epoch) and at the
  end; the final model is the best there by the task's combined ``score`` (``select_best``) or the
  last. The dev split is never used to choose: it is scored once, for the returned model only
  (``history["final_eval"]``), on all rows or a seeded random ``max_eval_examples`` of them;
* orbax checkpoints (params, optimiser state, step, best params so far, history, data position)
  every ``checkpoint_every`` steps and at the end. A killed run started again with the same
  config and ``checkpoint_dir`` resumes from its last checkpoint and ends with exactly the
  parameters of an uninterrupted run.

Command line: ``fisher-jax finetune --task rte --model BASE_DIR --output-dir OUT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import tree
from .. import parallel as par
from ..backend import backend_policy
from ..errors import FisherJaxError
from .evaluate import evaluate_batches, sorted_batches

log = logging.getLogger(__name__)

TRAIN_BUCKETS: tuple[int, ...] = (16, 32, 48, 64, 96, 128)

# Fields that change the trajectory of a run: a checkpoint written under other values of these
# cannot be resumed (paths, logging and checkpoint cadence may change between attempts).
_TRAJECTORY_FIELDS = (
    "task", "model", "learning_rate", "batch_size", "num_epochs", "max_steps", "warmup_ratio", "weight_decay",
    "max_grad_norm", "max_length", "max_train_examples", "held_out_examples", "eval_every", "select_best",
    "dropout", "seed", "buckets",
)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. ``model`` is the base model folder (or Hub id)."""

    task: str
    model: Optional[str] = None
    output_dir: Optional[str] = None  # final model (save_pretrained) + finetune_history.json
    checkpoint_dir: Optional[str] = None  # default: {output_dir}/checkpoints; None and no output_dir: none
    glue_dir: Optional[str] = None  # default: $GLUE_DIR, else the Hub
    learning_rate: float = 5e-5
    batch_size: int = 32
    num_epochs: float = 3.0  # fractional epochs allowed
    max_steps: Optional[int] = None  # overrides num_epochs
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_length: Optional[int] = None  # default: the task's (128; 64 for SST-2)
    max_train_examples: Optional[int] = None  # a fixed random subset (drawn with seed)
    held_out_examples: Optional[int] = None  # training rows never trained on, for selection (None: 10%, <= 1000)
    max_eval_examples: Optional[int] = None  # a seeded random N dev rows for the final report
    eval_every: Optional[int] = None  # steps; None: once per epoch; 0: only at the end
    eval_batch_size: int = 64
    select_best: bool = True  # final model = best dev score (else the last step)
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    resume: bool = True
    dropout: bool = True
    seed: int = 0
    log_every: int = 10
    buckets: tuple[int, ...] = TRAIN_BUCKETS

    def __post_init__(self) -> None:
        object.__setattr__(self, "buckets", tuple(int(b) for b in self.buckets))
        checks = [
            (self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}"),
            (self.batch_size >= 1, f"batch_size must be positive, got {self.batch_size}"),
            (self.num_epochs > 0, f"num_epochs must be positive, got {self.num_epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be positive, got {self.max_steps}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.max_grad_norm > 0, f"max_grad_norm must be positive, got {self.max_grad_norm}"),
            (self.max_train_examples is None or self.max_train_examples >= 1,
             f"max_train_examples must be positive, got {self.max_train_examples}"),
            (self.held_out_examples is None or self.held_out_examples >= 0,
             f"held_out_examples must be >= 0, got {self.held_out_examples}"),
            (not (self.select_best and self.held_out_examples == 0),
             "select_best needs a held-out slice of the training split: set held_out_examples > 0 or keep "
             "the last step (--last)"),
            (self.eval_every is None or self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be positive, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be positive, got {self.keep_checkpoints}"),
            (self.log_every >= 1, f"log_every must be positive, got {self.log_every}"),
            (len(self.buckets) > 0 and min(self.buckets) >= 1, f"buckets must be positive, got {self.buckets}"),
        ]
        for ok, message in checks:
            if not ok:
                raise FisherJaxError(message)

    @property
    def checkpoint_path(self) -> Optional[Path]:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir).expanduser().absolute()
        if self.output_dir:
            return Path(self.output_dir).expanduser().absolute() / "checkpoints"
        return None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["buckets"] = list(self.buckets)
        return d


# --------------------------------------------------------------------------- optimiser and step
def decay_mask(params: Any) -> Any:
    """True where weight decay applies: every leaf except biases and LayerNorm scales."""
    return tree.tree_map_with_names(lambda name, _: not name.endswith(("/bias", "/scale")), params)


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """0 -> ``peak`` linearly over ``warmup_steps``, then linearly down to 0 at ``total_steps``."""
    warmup_steps = int(min(max(warmup_steps, 0), total_steps))
    decay = optax.linear_schedule(peak, 0.0, max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), decay], [warmup_steps])


def make_optimizer(config: FinetuneConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clip by global norm, then AdamW (HF defaults: b1 0.9, b2 0.999, eps 1e-8) on the schedule;
    weight decay follows :func:`decay_mask`."""
    schedule = learning_rate_schedule(config.learning_rate, total_steps, round(config.warmup_ratio * total_steps))
    tx = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def weighted_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array, regression: bool) -> jax.Array:
    """Mean cross-entropy (classification) or squared error (regression) over rows, weighted."""
    if regression:
        per_example = jnp.square(logits[:, 0].astype(jnp.float32) - labels.astype(jnp.float32))
    else:
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels.astype(jnp.int32))
    weights = weights.astype(jnp.float32)
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_train_step(module, tx: optax.GradientTransformation, schedule: optax.Schedule, regression: bool,
                    dropout: bool, mesh: Any = None):
    """The jitted step ``(state, batch, key) -> (state, metrics)``; ``state = {step, params, opt_state}``.

    ``module`` is the linen module (``model.module``). The dropout key of a step is
    ``fold_in(key, state["step"])``, so a resumed run draws the same masks as an uninterrupted one.
    ``mesh`` with a ``"model"`` axis: the new state is pinned to
    :func:`fisher_jax.parallel.param_shardings` (parameters and optimiser moments split over
    ``"model"``), so it stays split step after step; XLA (GSPMD) inserts the collectives.
    """
    pinned = mesh is not None and par.has_model_axis(mesh)

    def train_step(state, batch, key):
        step = state["step"]
        rngs = {"dropout": jax.random.fold_in(key, step)} if dropout else None
        weights = batch.get("weights", jnp.ones(batch["labels"].shape, jnp.float32))

        def loss_fn(params):
            logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                  batch["token_type_ids"], deterministic=not dropout, rngs=rngs)
            return weighted_loss(logits, batch["labels"], weights, regression)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(step)}
        new = {"step": step + 1, "params": params, "opt_state": opt_state}
        if pinned:
            new = jax.lax.with_sharding_constraint(new, par.param_shardings(new, mesh))
        return new, metrics

    return jax.jit(train_step)


@functools.lru_cache(maxsize=8)
def _training_functions(arch, config: FinetuneConfig, total_steps: int, regression: bool, mesh: Any = None):
    """Optimiser, schedule and jitted step, cached so that a resumed run in the same process
    (and the tests) reuse the compiled step. Only the hyper-parameters (and a mesh with a
    ``"model"`` axis, which the step pins its state to) enter the key."""
    from ..models.model import module_for

    tx, schedule = make_optimizer(config, total_steps)
    return tx, schedule, make_train_step(module_for(arch), tx, schedule, regression, config.dropout, mesh)


def init_train_state(params: Any, tx: optax.GradientTransformation, mesh: Any) -> dict[str, Any]:
    """``{step: 0, params, opt_state: tx.init(params)}`` on ``mesh``: replicated, or with a
    ``"model"`` axis split by :func:`fisher_jax.parallel.place_params` (the optimiser state is
    made in place, each device building only its blocks, never a whole copy)."""
    if not par.has_model_axis(mesh):
        params = par.replicate(params, mesh)
        return par.replicate({"step": jnp.asarray(0, jnp.int32), "params": params, "opt_state": tx.init(params)}, mesh)
    params = par.place_params(params, mesh)
    opt_state = jax.jit(tx.init, out_shardings=par.param_shardings(jax.eval_shape(tx.init, params), mesh))(params)
    return {"step": par.replicate(jnp.asarray(0, jnp.int32), mesh), "params": params, "opt_state": opt_state}


def _optimizer_key(config: FinetuneConfig) -> FinetuneConfig:
    """The config with every field that does not shape the optimiser or step reset (cache key)."""
    keep = ("learning_rate", "warmup_ratio", "weight_decay", "max_grad_norm", "dropout")
    return FinetuneConfig(task="-", **{k: getattr(config, k) for k in keep})


def dropout_key(seed: int) -> jax.Array:
    """The base dropout key, with the default backend's PRNG implementation
    (:attr:`fisher_jax.backend.BackendPolicy.rng_impl`: threefry on CPUs, "rbg" on GPU/TPU).

    Either is deterministic for a given key and backend.
    """
    return jax.random.key(int(seed), impl=backend_policy().rng_impl)


# --------------------------------------------------------------------------- data
def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of one epoch (independent streams per (seed, epoch))."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def _train_batch(encoded, plan: list, position: int, batch_size: int, sizes: Sequence[int]) -> dict:
    """This process's slice of batch ``position`` of an epoch's plan (a separate function: tests
    interrupt runs here)."""
    from ..data.batching import plan_batch

    return plan_batch(encoded, plan, position, batch_size, sizes)


def _load_model(config: FinetuneConfig, spec, model):
    from ..models.hub import from_pretrained

    if model is None:
        if not config.model:
            raise FisherJaxError("no model: set FinetuneConfig.model (a base model folder) or pass model=")
        with warnings.catch_warnings():  # a fresh head is the point of fine-tuning a base model
            warnings.filterwarnings("ignore", message=".*initialised a fresh head.*")
            model = from_pretrained(config.model, num_labels=spec.num_labels, seed=config.seed)
    if model.num_labels != spec.num_labels:
        raise FisherJaxError(f"model has {model.num_labels} output(s) but task {spec.name} needs {spec.num_labels}")
    return model


# --------------------------------------------------------------------------- checkpoints
class _Checkpoints:
    """orbax CheckpointManager around ``{state, best_params, meta}``."""

    def __init__(self, path: Optional[Path], keep: int):
        self.manager = None
        if path is None:
            return
        import orbax.checkpoint as ocp

        self._ocp = ocp
        path.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(path, options=options)

    def latest_step(self) -> Optional[int]:
        return None if self.manager is None else self.manager.latest_step()

    def save(self, step: int, state, best_params, meta: dict) -> None:
        if self.manager is None:
            return
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), best_params=ocp.args.StandardSave(best_params),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, state, best_params):
        ocp = self._ocp
        abstract = lambda t: jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, t)  # noqa: E731
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract(state)), best_params=ocp.args.StandardRestore(abstract(best_params)),
            meta=ocp.args.JsonRestore()))
        return out["state"], out["best_params"], out["meta"]

    def close(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()


def _check_resumable(config: FinetuneConfig, saved: dict, path: Path) -> None:
    mine = config.to_dict()
    diff = [k for k in _TRAJECTORY_FIELDS if saved.get(k) != mine.get(k)]
    if diff:
        shown = ", ".join(f"{k}={saved.get(k)!r} (now {mine.get(k)!r})" for k in diff)
        raise FisherJaxError(
            f"checkpoints in '{path}' belong to a run with other settings: {shown}; "
            "use another checkpoint_dir or resume=False (--no-resume) to start over")


# --------------------------------------------------------------------------- the loop
def _write_label_names(folder: Path, spec) -> None:
    """Record the task's class names in the saved config.json: the trained outputs follow the
    task's label ids, whatever names (in whatever order) the base checkpoint carried, and
    evaluation maps outputs by these names (``data.glue.label_order``)."""
    if spec.is_regression or not spec.label_names:
        return
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["id2label"] = {str(i): str(n) for i, n in enumerate(spec.label_names)}
    cfg["label2id"] = {str(n): i for i, n in enumerate(spec.label_names)}
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def finetune(config: FinetuneConfig, model=None, tokenizer=None, progress: bool = True, mesh: Any = None):
    """Fine-tune on ``config.task``; returns ``(model, history)``.

    ``model`` (a ``Model`` with the task's label count) and ``tokenizer`` override loading them
    from ``config.model``. ``mesh``: the devices (default :func:`fisher_jax.parallel.data_mesh`);
    one with a ``"model"`` axis (``data_mesh(model_parallel=K)``) splits the parameters and the
    optimiser state over it, for bodies larger than one device. ``history`` is a dict: ``train``
    (logged ``step, epoch, loss, lr, grad_norm, examples_per_s``), ``eval`` (``step`` + held-out metrics), ``best`` (the chosen step
    and its held-out metrics), ``final_eval`` (the returned model's dev metrics), ``held_out``
    (``rows``, ``seed``, ``num_train_rows``: which training rows were never trained on), ``total_steps``,
    ``steps_per_epoch``, ``train_examples`` (rows in the training set), ``trained_examples`` and
    ``train_examples_per_s`` (this call's training steps only; evaluation and checkpoint time
    excluded), ``wall_time_s`` (this call), ``resumed_from`` (the checkpoint step, or None).
    """
    from tqdm.auto import tqdm

    from ..data.batching import (HELD_OUT_SEED, SplitRows, batch_indices, bucket_sizes, default_held_out, encode_rows,
                                 eval_subset, held_out_split, num_batches, select_examples)
    from ..data.glue import get_task
    from ..models.hub import load_tokenizer

    t_start = time.perf_counter()
    spec = get_task(config.task)
    model = _load_model(config, spec, model)
    if tokenizer is None:
        if not (model.source or config.model):
            raise FisherJaxError("no tokenizer: the model has no source folder; pass tokenizer=")
        tokenizer = load_tokenizer(model if model.source else config.model)
    max_length = config.max_length or spec.max_length
    sizes = bucket_sizes(config.buckets, max_length)

    # data: the held-out slice set aside, a fixed subset of the rest, tokenised once; evaluation
    # batches sorted by length for cheap evaluation
    full_train = SplitRows(spec, "train", config.glue_dir)  # several processes: each reads its share
    n_held = default_held_out(len(full_train)) if config.held_out_examples is None else config.held_out_examples
    train_rows, held_rows = held_out_split(len(full_train), n_held)
    if config.max_train_examples is not None and config.max_train_examples < len(train_rows):
        train_rows = train_rows[select_examples(len(train_rows), True, config.seed, config.max_train_examples)]
    train_enc = encode_rows(tokenizer, full_train, train_rows, max_length)
    held_batches = (sorted_batches(encode_rows(tokenizer, full_train, held_rows, max_length),
                                   config.eval_batch_size, sizes) if n_held else None)
    dev = SplitRows(spec, "dev", config.glue_dir)
    dev_batches = sorted_batches(encode_rows(tokenizer, dev, eval_subset(len(dev), config.max_eval_examples),
                                             max_length), config.eval_batch_size, sizes)
    held_record = {"rows": int(n_held), "seed": HELD_OUT_SEED, "num_train_rows": len(full_train)}

    bs = config.batch_size
    steps_per_epoch = num_batches(len(train_enc), bs)
    total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * steps_per_epoch))
    eval_every = steps_per_epoch if config.eval_every is None else config.eval_every
    # One candidate (evaluation only at the end) or nothing to score on: the last step, unscored.
    select_on = held_batches if (eval_every and held_batches) else None

    # data-parallel over every process's devices: state replicated (or split over a "model" axis),
    # each batch split over "data" (fisher_jax.parallel)
    from ..distributed import is_main_process

    main_process = is_main_process()
    mesh = par.resolve_mesh(mesh)
    tx, schedule, step_fn = _training_functions(model.arch, _optimizer_key(config), total_steps, spec.is_regression,
                                                mesh if par.has_model_axis(mesh) else None)
    state = init_train_state(model.params, tx, mesh)
    params = state["params"]
    best_params = params
    history: dict[str, Any] = {"train": [], "eval": [], "best": None}
    best_score = -math.inf

    ckpt_path = config.checkpoint_path
    ckpts = _Checkpoints(ckpt_path, config.keep_checkpoints)
    resumed_from = None
    try:
        latest = ckpts.latest_step() if config.resume else None
        if latest is not None:
            state, best_params, meta = ckpts.restore(latest, state, best_params)
            _check_resumable(config, meta["config"], ckpt_path)
            history = meta["history"]
            best_score = history["best"]["score"] if history.get("best") else -math.inf
            resumed_from = int(latest)
            log.info("resuming %s from step %d (%s)", spec.name, latest, ckpt_path)
        elif ckpt_path is not None and not config.resume and ckpts.latest_step() is not None:
            raise FisherJaxError(f"'{ckpt_path}' already holds checkpoints and resume is off: remove it or pick another")

        key = par.replicate(dropout_key(config.seed), mesh)
        start = int(state["step"])
        bar = tqdm(total=total_steps, initial=start, disable=not (progress and main_process), desc=f"finetune {spec.name}",
                   mininterval=5.0, dynamic_ncols=True, file=sys.stderr)
        say = (bar.write if progress else log.info) if main_process else (lambda _: None)

        def meta_at(step: int) -> dict:
            epoch, position = divmod(step, steps_per_epoch)
            return tree.jsonable({"step": step, "epoch": epoch, "position": position, "history": history,
                              "config": config.to_dict(), "total_steps": total_steps})

        plans: dict[int, list] = {}
        pending: list = []  # device scalars since the last log: fetched once per log_every steps
        clock = {"t": time.perf_counter(), "window": 0.0, "examples": 0.0, "train_time": 0.0, "train_examples": 0.0}

        def flush(block_on=None) -> None:
            """Close the current timing window (after the device has finished its steps)."""
            if block_on is not None:
                jax.block_until_ready(block_on)
            now = time.perf_counter()
            clock["train_time"] += now - clock["t"]
            clock["train_examples"] += clock["examples"]
            clock["window"] += now - clock["t"]
            clock["t"], clock["examples"] = now, 0.0

        for step in range(start, total_steps):
            epoch, position = divmod(step, steps_per_epoch)
            if epoch not in plans:
                plans = {epoch: batch_indices(train_enc, bs, shuffle=True, seed=epoch_seed(config.seed, epoch))}
            batch = _train_batch(train_enc, plans[epoch], position, bs, sizes)
            state, metrics = step_fn(state, par.shard_batch(par.pad_rows(batch, par.num_shards(mesh)), mesh), key)
            pending.append((metrics, float(batch["weights"].sum())))
            clock["examples"] += pending[-1][1]
            done = step + 1
            if done % config.log_every == 0 or done == total_steps:
                fetched = jax.device_get([m for m, _ in pending])  # the only host sync of the loop
                flush()
                rate = sum(n for _, n in pending) / max(clock["window"], 1e-9)
                rec = {"step": done, "epoch": done / steps_per_epoch,
                       "loss": float(np.mean([m["loss"] for m in fetched])), "lr": float(fetched[-1]["lr"]),
                       "grad_norm": float(fetched[-1]["grad_norm"]), "examples_per_s": rate}
                history["train"].append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", ex_s=f"{rate:.1f}", refresh=False)
                bar.update(done - bar.n)
                pending, clock["window"] = [], 0.0
            if select_on is not None and (done % eval_every == 0 or done == total_steps):
                flush(state["params"])
                result = evaluate_batches(model, spec, select_on, params=state["params"], warmup=False, mesh=mesh)
                result = {k: v for k, v in result.items() if k not in ("seconds", "compile_s", "examples_per_s")}
                entry = {"step": done, "epoch": done / steps_per_epoch, **result}
                history["eval"].append(entry)
                improved = result["score"] > best_score
                if improved:
                    best_score = result["score"]
                    best_params = state["params"]
                    history["best"] = entry
                say(f"[{spec.name}] step {done}/{total_steps} held-out " +
                    " ".join(f"{k}={result[k]:.4f}" for k in (*spec.metrics, "score")) +
                    (" (best)" if improved else f" (best {best_score:.4f} at step {history['best']['step']})"))
                clock["t"] = time.perf_counter()
            if done % config.checkpoint_every == 0 or done == total_steps:
                flush(state["params"])
                ckpts.save(done, state, best_params, meta_at(done))
                clock["t"] = time.perf_counter()
        bar.update(total_steps - bar.n)
        bar.close()
    finally:
        ckpts.close()

    final_params = best_params if (config.select_best and history.get("best")) else state["params"]
    final_params = par.to_host(final_params)  # split leaves are gathered from every process
    model = model.replace(params=final_params)
    chosen = history["best"] if (config.select_best and history.get("best")) else None
    final_eval = evaluate_batches(model, spec, dev_batches, warmup=False, mesh=mesh)
    final_eval = {"step": chosen["step"] if chosen else total_steps, "split": "dev", "rows": len(dev),
                  **{k: v for k, v in final_eval.items() if k not in ("seconds", "compile_s", "examples_per_s")}}
    history.update(
        final_eval=final_eval, held_out=held_record, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        train_examples=len(train_enc), trained_examples=clock["train_examples"],
        train_examples_per_s=(clock["train_examples"] / clock["train_time"]) if clock["train_time"] > 0 else None,
        wall_time_s=time.perf_counter() - t_start, resumed_from=resumed_from,
    )
    history = tree.jsonable(history)
    if config.output_dir and main_process:
        out = Path(config.output_dir).expanduser()
        src = model.source or config.model
        model.save_pretrained(out, tokenizer_from=src)
        _write_label_names(out, spec)
        if src is None:
            tokenizer.save_pretrained(str(out))
        (out / "finetune_history.json").write_text(json.dumps({"config": config.to_dict(), "history": history}, indent=2) + "\n")
    return model, history


# --------------------------------------------------------------------------- command line
def add_finetune_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fisher-jax finetune`` (defaults are FinetuneConfig's)."""
    from ..cli import TASK_HELP, add_list, add_no_progress, add_out_dir

    d = FinetuneConfig(task="rte")
    a = parser.add_argument
    a("--task", required=True, help=TASK_HELP)
    a("--model", required=True, help="base model folder (or Hub id), e.g. the MiniLM folder")
    add_out_dir(parser, "where the fine-tuned model (save_pretrained) is written", required=True,
                old=("--output-dir",), dest="output_dir")
    a("--checkpoint-dir", default=None, metavar="DIR", help="orbax checkpoints (default: OUT_DIR/checkpoints)")
    a("--glue-dir", default=None,
      help="local GLUE folder (default: $GLUE_DIR, else the Hub; a task file names its own data)")
    a("--learning-rate", "--lr", type=float, default=d.learning_rate, help="peak AdamW learning rate (default: %(default)s)")
    a("--batch-size", type=int, default=d.batch_size, help="examples per step (default: %(default)s)")
    a("--epochs", type=float, default=d.num_epochs, dest="num_epochs",
      help="passes over the training rows, fractions allowed (default: %(default)s)")
    a("--max-steps", type=int, default=None, help="train this many steps (overrides --epochs)")
    a("--warmup-ratio", type=float, default=d.warmup_ratio,
      help="share of the steps spent warming the learning rate up from 0 (default: %(default)s)")
    a("--weight-decay", type=float, default=d.weight_decay,
      help="AdamW weight decay, not on biases and LayerNorm scales (default: %(default)s)")
    a("--max-grad-norm", type=float, default=d.max_grad_norm, help="global-norm gradient clipping (default: %(default)s)")
    a("--max-length", type=int, default=None, help="tokens per example (default: the task's)")
    a("--max-train-examples", type=int, default=None, help="train on a seeded random subset of N rows")
    a("--held-out-examples", type=int, default=None,
      help="training rows set aside (never trained on) to pick the best step (default: 10%%, at most 1000)")
    a("--max-eval-examples", type=int, default=None,
      help="score the returned model on a seeded random N dev rows (default: all)")
    a("--eval-every", type=int, default=None,
      help="steps between held-out evaluations (default: each epoch; 0: none, keep the last step)")
    a("--eval-batch-size", type=int, default=d.eval_batch_size, help="examples per evaluation pass (default: %(default)s)")
    a("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between orbax checkpoints (default: %(default)s)")
    a("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept on disk (default: %(default)s)")
    a("--last", dest="select_best", action="store_false", help="keep the last step, not the best held-out score")
    a("--no-resume", dest="resume", action="store_false", help="refuse to continue from existing checkpoints")
    a("--no-dropout", dest="dropout", action="store_false", help="train without dropout")
    a("--seed", type=int, default=d.seed, help="seed of the data order, subsets and dropout (default: %(default)s)")
    a("--log-every", type=int, default=d.log_every, help="steps between log lines (default: %(default)s)")
    add_list(parser, "--buckets", item_type=int, default=list(d.buckets), metavar="LEN",
             help="padded lengths, space- or comma-separated (default: %s)" % " ".join(map(str, d.buckets)))
    add_no_progress(parser)
    return parser


def _quiet_logging() -> None:
    """Our INFO lines on stderr; orbax's (absl) per-file chatter only from WARNING up."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in vars(args).items() if k in fields})


def run_finetune(args: argparse.Namespace) -> int:
    """``fisher-jax finetune``: train, save to ``--output-dir``, print the chosen dev metrics as JSON."""
    _quiet_logging()
    config = config_from_args(args)
    _, history = finetune(config, progress=not args.no_progress)
    from ..distributed import is_main_process

    if not is_main_process():
        return 0
    print(json.dumps({"output_dir": config.output_dir, "dev": history["final_eval"],
                      "train_examples_per_s": history["train_examples_per_s"],
                      "wall_time_s": history["wall_time_s"]}, indent=2))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:  # python -m fisher_jax.train.finetune
    from ..cli import main as cli_main  # one place turns FisherJaxError into "error: ..." and exit 2

    return cli_main(["finetune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
