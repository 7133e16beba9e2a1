"""The statistics passes' loop over batches, data-parallel over the ``"data"`` mesh axis
(:mod:`fisher_jax.parallel`).

Every statistic in :mod:`fisher_jax.stats` is a sum over examples, so data parallelism is exact:
each device adds its slice of every batch to ITS OWN running sums, and the devices' sums are
added once, at the end (or when a checkpoint is written). The state is
``{"sums": tree with a leading device axis, split over "data"; counters: replicated scalars}``
(:func:`init_state`); only the scalar counters are ``psum``-ed per batch, because summing the
sums per batch would put a body-sized all-reduce into every full-Fisher step. Parameters are
replicated; batches are split along their first axis. A batch whose size is not a multiple of
the device count (or of ``devices x chunk`` for the full Fisher) is padded with weight-0 copies of its first row, which contribute exactly nothing.
Checkpoints hold the devices' total, so a run may resume on a different number of devices.

Several processes (a TPU pod slice, several GPU hosts, CPU processes; :mod:`fisher_jax.distributed`)::

    fisher_jax.distributed.initialize()           # before any other JAX call, in every process
    batches = task_batches("rte", "train", tok, 32)  # each process builds only ITS slice of every batch
    fm = fj.mask_fisher(model, batches)           # the same call in every process

(``fisher-jax --coordinator HOST:PORT --num-processes N --process-id I fisher ...`` does the
first line.) The batch iterators of :mod:`fisher_jax.data.batching` yield this process's
contiguous slice of every global batch; a list of one's own batches goes through
:func:`fisher_jax.parallel.process_rows` in each process. ``shard_batch`` assembles the global
batch with ``jax.make_array_from_process_local_data``: every process must yield the same number
of batches, each of the same (process-local) shape, and the global batch is their
concatenation, in process order. The results (replicated) are the same on every process; only
the main process draws the progress bar, and files are written from
:func:`fisher_jax.distributed.is_main_process` only. The ``sampled`` estimator's keys follow
each row's global position, so it matches one process when no process pads its slice (its rows
a multiple of its devices x chunk).
"""

from __future__ import annotations

import collections
import functools
import itertools
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..errors import FisherJaxError
from ..parallel import AXIS, BATCH_KEYS, batch_inputs, pad_rows, replicate, replicated, shard_batch


def standardise_batch(batch: Mapping[str, Any], regression: bool) -> dict[str, np.ndarray]:
    """Numpy arrays of fixed dtypes; ``attention_mask``/``token_type_ids``/``weights`` defaulted."""
    if "input_ids" not in batch:
        raise FisherJaxError(f"a batch needs 'input_ids' (got keys {sorted(batch)})")
    if np.ndim(batch["input_ids"]) != 2:
        raise FisherJaxError(f"input_ids must be [batch, length], got shape {np.shape(batch['input_ids'])}")
    out = batch_inputs(batch)
    ids = out["input_ids"]
    b = ids.shape[0]
    if batch.get("labels") is None:
        out["labels"] = np.zeros(b, np.float32 if regression else np.int32)  # callers that need labels check
    else:
        out["labels"] = np.asarray(batch["labels"], np.float32 if regression else np.int32).reshape(b)
    out["weights"] = (np.ones(b, np.float32) if batch.get("weights") is None
                      else np.asarray(batch["weights"], np.float32).reshape(b))
    for k in ("attention_mask", "token_type_ids"):
        if out[k].shape != ids.shape:
            raise FisherJaxError(f"'{k}' has shape {out[k].shape} but input_ids has {ids.shape}")
    return out


def per_shard(fn, mesh: Mesh, in_specs: tuple, out_specs: Any):
    """``shard_map`` of ``fn`` over the ``"data"`` axis.

    ``check_vma=False`` on purpose: with the varying-axes check on, JAX would turn the gradient
    w.r.t. a replicated input into a ``psum`` *inside* ``fn`` — summing different examples'
    gradients across devices before they are squared. Inside ``fn`` every gradient is local; ``fn``
    itself ``psum``s what must be global.
    """
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


# --------------------------------------------------------------------------- the state
SUMS = "sums"


def state_spec(counters: Iterable[str]) -> dict[str, P]:
    """The ``shard_map`` spec of a state: sums split over the devices, counters replicated."""
    return {SUMS: P(AXIS), **{k: P() for k in counters}}


@functools.lru_cache(maxsize=64)
def _init_fn(mesh: Mesh, shapes: tuple, counters: tuple):
    treedef, leaves = shapes
    n = int(mesh.shape[AXIS])  # every device of the axis, all processes

    def init():
        sums = jax.tree_util.tree_unflatten(treedef, [jnp.zeros((n,) + s, jnp.float32) for s in leaves])
        return {SUMS: sums, **{k: jnp.zeros((), jnp.dtype(d)) for k, d in counters}}

    shardings = {SUMS: NamedSharding(mesh, P(AXIS)), **{k: replicated(mesh) for k, _ in counters}}
    return jax.jit(init, out_shardings=shardings)


def init_state(mesh: Mesh, sum_shapes: Any, counters: Mapping[str, Any]) -> Callable[[], Any]:
    """A (cached, jitted) function making the zero state: per-device float32 sums shaped like
    ``sum_shapes`` (a tree of shapes or arrays) under ``"sums"``, and one scalar per counter
    (``{name: dtype}``)."""
    leaves, treedef = jax.tree_util.tree_flatten(sum_shapes)
    shapes = (treedef, tuple(tuple(getattr(x, "shape", x)) for x in leaves))
    return _init_fn(mesh, shapes, tuple((k, np.dtype(d).name) for k, d in counters.items()))


@functools.lru_cache(maxsize=64)
def _total_fn(mesh: Mesh):
    def total(state):
        return {**state, SUMS: jax.tree_util.tree_map(lambda s: jnp.sum(s, axis=0), state[SUMS])}

    return jax.jit(total, out_shardings=replicated(mesh))


def device_total(state: Any, mesh: Mesh) -> Any:
    """The devices' sums added (on the devices), as a replicated state without the device axis."""
    return _total_fn(mesh)(state)


def expand(host_state: Any, mesh: Mesh) -> Any:
    """The inverse of :func:`device_total` for a resumed run: device 0 holds the sums, the others zeros."""
    n = int(mesh.shape[AXIS])  # every device of the axis, all processes
    split = NamedSharding(mesh, P(AXIS))

    def place(x):
        x = np.asarray(x)
        # Only the slices a process owns are built, so this also works with several processes.
        return jax.make_array_from_callback(
            (n,) + x.shape, split, lambda idx: (x if idx[0].start in (0, None) else np.zeros_like(x))[None])

    out = replicate({k: np.asarray(v) for k, v in host_state.items() if k != SUMS}, mesh)
    out[SUMS] = jax.tree_util.tree_map(place, host_state[SUMS])
    return out


# --------------------------------------------------------------------------- the accumulation loop
StepFor = Callable[[int], tuple[Callable, int]]


def accumulate(
    step_for: StepFor,
    init_state: Callable[[], Any],
    batches: Iterable[Mapping[str, Any]],
    *,
    mesh: Mesh,
    regression: bool,
    num_labels: int,
    seed: int = 0,
    needs_labels: bool = True,
    progress: bool = True,
    total: Optional[int] = None,
    desc: str = "statistics",
    checkpointer: Any = None,
) -> tuple[Any, int]:
    """Run ``state = step(state, batch, seed, index)`` over ``batches``; return (host state, #batches).

    ``step_for(batch_rows)`` gives the jitted step for a batch of that many rows and the row
    multiple it needs (batches are padded with weight-0 rows up to it). The state lives on the
    devices for the whole pass — the only transfers are the batches going in, the final state
    coming out, and checkpoints. At most two steps are in flight: the host prepares batch
    ``i + 1`` while the devices run step ``i``, and memory held by queued batches stays bounded.
    ``index`` is the global batch number (it seeds the sampled estimator), so a resumed run sees
    the same randomness as an uninterrupted one.
    """
    start = 0
    state = None
    if checkpointer is not None:
        shapes = jax.eval_shape(lambda: device_total(init_state(), mesh))
        restored = checkpointer.restore(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes))
        if restored is not None:
            host_state, start = restored
            state = expand(host_state, mesh)
    if state is None:
        state = init_state()
    if total is None and hasattr(batches, "__len__"):
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:
            total = None
    it = iter(batches)
    if start:
        skipped = sum(1 for _ in itertools.islice(it, start))
        if skipped < start:
            raise FisherJaxError(
                f"checkpoint says {start} batches were consumed, but the batches ran out after {skipped}: "
                "resume with the same (deterministic) batches"
            )
    from tqdm.auto import tqdm

    from ..distributed import is_main_process

    progress = progress and is_main_process()  # one bar for the run, not one per process
    bar = tqdm(total=total, initial=start, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True)
    in_flight: collections.deque = collections.deque()
    index, examples, t0 = start, 0, time.perf_counter()
    last_saved = start
    try:
        for raw in it:
            if needs_labels and raw.get("labels") is None:
                raise FisherJaxError(f"{desc}: this estimator needs 'labels' in every batch")
            batch = standardise_batch(raw, regression)
            real = batch["weights"] > 0
            if not regression and real.any():
                lab = batch["labels"][real]
                if needs_labels and (lab.min() < 0 or lab.max() >= num_labels):
                    raise FisherJaxError(
                        f"{desc}: batch {index} has label {int(lab.min() if lab.min() < 0 else lab.max())} "
                        f"outside 0..{num_labels - 1}"
                    )
            step, multiple = step_for(int(batch["input_ids"].shape[0]))
            batch = pad_rows(batch, multiple)
            state, token = step(state, shard_batch({k: batch[k] for k in BATCH_KEYS}, mesh), np.int32(seed),
                                np.int32(index))
            index += 1
            examples += int(real.sum())
            in_flight.append(token)
            if len(in_flight) > 2:
                in_flight.popleft().block_until_ready()
            if progress:
                bar.update(1)
                bar.set_postfix_str(f"{examples / max(time.perf_counter() - t0, 1e-9):.1f} ex/s", refresh=False)
            if checkpointer is not None and (index - start) % checkpointer.every == 0:
                checkpointer.save(jax.device_get(device_total(state, mesh)), index)
                last_saved = index
    finally:
        bar.close()
    host = jax.device_get(device_total(state, mesh))
    if checkpointer is not None and index > last_saved:
        checkpointer.save(host, index)
    return host, index


__all__ = ["SUMS", "accumulate", "expand", "init_state", "per_shard", "standardise_batch", "state_spec", "device_total"]
