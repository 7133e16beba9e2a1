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
Checkpoints hold the devices' total, so a run may resume on a different number of devices or of
processes (orbax writes them from every process together: a file system they all see; tested
one process -> two and two -> one in ``tests/test_multiprocess.py``).

Sharded parameters (a mesh with a ``"model"`` axis, :func:`fisher_jax.parallel.data_mesh`):
parameters enter the ``shard_map`` split as :func:`fisher_jax.parallel.place_params` put them
and each step all-gathers them over ``"model"`` (:func:`gather_params`: one full body per device
during the step only); batch rows are split over both axes, so each device computes its own
rows. Sums that are not parameter-shaped (mask Fisher, Grams) keep one copy per device (leading
axis over ``("data", "model")``); the full Fisher's body-sized sums are split like the
parameters (:func:`sums_spec`: leading axis over ``"data"``, the leaf's split axis over
``"model"``), and every chunk's squares reach them through a reduce-scatter over ``"model"``
(:func:`add_to_sums`).

Several processes (a TPU pod slice, several GPU hosts, CPU processes; :mod:`fisher_jax.distributed`)::

    fisher_jax.distributed.initialize()           # before any other JAX call, in every process
    batches = task_batches("rte", "train", tok, 32)  # each process reads ITS share, yields ITS slices
    fm = fj.mask_fisher(model, batches)           # the same call in every process

(``fisher-jax --coordinator HOST:PORT --num-processes N --process-id I fisher ...`` does the
first line.) The batch iterators of :mod:`fisher_jax.data.batching` read and tokenise only this
process's share of the split and yield its contiguous slice of every global batch; a list of one's own batches goes through
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
import dataclasses
import functools
import itertools
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..errors import FisherJaxError
from .. import parallel as par
from ..parallel import AXIS, BATCH_KEYS, MODEL_AXIS, batch_inputs, pad_rows, replicate, replicated, shard_batch


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


def state_spec(counters: Iterable[str], sums: Any = P(AXIS)) -> dict[str, Any]:
    """The ``shard_map`` spec of a state: sums split over the devices (``sums``: one spec, or a
    tree of them, see :func:`sums_spec`), counters replicated."""
    return {SUMS: sums, **{k: P() for k in counters}}


def _axis_names(entry: Any) -> tuple:
    return () if entry is None else tuple(entry) if isinstance(entry, tuple) else (entry,)


def sums_spec(mesh: Mesh, shape: tuple, like_params: bool) -> P:
    """The spec of one running-sum leaf of ``shape``, with its leading device axis first.

    Without a ``"model"`` axis: ``P("data")``, one sum per device. With one: a leaf that
    :func:`fisher_jax.parallel.shard_axis` splits (``like_params``, the full Fisher) is split the
    same way, its leading axis over ``"data"`` only; any other keeps one sum per device, leading
    axis over ``("data", "model")``.
    """
    if not par.has_model_axis(mesh):
        return P(AXIS)
    if like_params:
        inner = par.leaf_spec(shape, par.model_parallel(mesh))
        if len(inner):
            return P(AXIS, *inner)
    return P(par.row_axes(mesh))


def lead_size(mesh: Mesh, spec: P) -> int:
    """The length of a sums leaf's leading device axis under ``spec``."""
    return int(np.prod([mesh.shape[a] for a in _axis_names(spec[0])]))


def model_dim(spec: P) -> Optional[int]:
    """The axis of a sums leaf (leading device axis excluded) split over ``"model"``, or None."""
    for i, entry in enumerate(tuple(spec)[1:]):
        if MODEL_AXIS in _axis_names(entry):
            return i
    return None


@dataclasses.dataclass(frozen=True)
class StateInit:
    """A zero-state maker (call it) and the spec of each sums leaf (a tree like the sums)."""

    fn: Callable[[], Any]
    specs: Any

    def __call__(self) -> Any:
        return self.fn()


@functools.lru_cache(maxsize=64)
def _init_fn(mesh: Mesh, shapes: tuple, counters: tuple, specs: Optional[tuple] = None):
    treedef, leaves = shapes
    if specs is None:  # one sum per device of the "data" axis (all processes)
        specs = (P(AXIS),) * len(leaves)

    def init():
        sums = jax.tree_util.tree_unflatten(
            treedef, [jnp.zeros((lead_size(mesh, sp),) + s, jnp.float32) for s, sp in zip(leaves, specs)])
        return {SUMS: sums, **{k: jnp.zeros((), jnp.dtype(d)) for k, d in counters}}

    if all(sp == P(AXIS) for sp in specs):
        sums_sharding: Any = NamedSharding(mesh, P(AXIS))
    else:
        sums_sharding = jax.tree_util.tree_unflatten(treedef, [NamedSharding(mesh, sp) for sp in specs])
    shardings = {SUMS: sums_sharding, **{k: replicated(mesh) for k, _ in counters}}
    return jax.jit(init, out_shardings=shardings)


def init_state(mesh: Mesh, sum_shapes: Any, counters: Mapping[str, Any], like_params: bool = False) -> StateInit:
    """A (cached, jitted) function making the zero state: per-device float32 sums shaped like
    ``sum_shapes`` (a tree of shapes or arrays) under ``"sums"``, and one scalar per counter
    (``{name: dtype}``). ``like_params``: on a mesh with a ``"model"`` axis, split the sums like
    the parameters of the same shapes (:func:`sums_spec`)."""
    leaves, treedef = jax.tree_util.tree_flatten(sum_shapes)
    dims = tuple(tuple(getattr(x, "shape", x)) for x in leaves)
    specs = tuple(sums_spec(mesh, d, like_params) for d in dims)
    fn = _init_fn(mesh, (treedef, dims), tuple((k, np.dtype(d).name) for k, d in counters.items()),
                  None if all(sp == P(AXIS) for sp in specs) else specs)
    return StateInit(fn, jax.tree_util.tree_unflatten(treedef, list(specs)))


def _is_split(specs: Any) -> bool:
    return specs is not None and any(model_dim(sp) is not None for sp in jax.tree_util.tree_leaves(
        specs, is_leaf=lambda x: isinstance(x, P)))


@functools.lru_cache(maxsize=64)
def _total_fn(mesh: Mesh, split: Optional[tuple] = None):
    def total(state):
        return {**state, SUMS: jax.tree_util.tree_map(lambda s: jnp.sum(s, axis=0), state[SUMS])}

    if split is None:
        return jax.jit(total, out_shardings=replicated(mesh))
    treedef, specs, counters = split
    sums = jax.tree_util.tree_unflatten(treedef, [NamedSharding(mesh, P(*tuple(sp)[1:])) for sp in specs])
    return jax.jit(total, out_shardings={SUMS: sums, **{k: replicated(mesh) for k in counters}})


def device_total(state: Any, mesh: Mesh, specs: Any = None) -> Any:
    """The devices' sums added (on the devices), as a state without the device axis: replicated,
    or, for sums split over ``"model"`` (``specs`` from :class:`StateInit`), split like the parameters."""
    if not _is_split(specs):
        return _total_fn(mesh)(state)
    leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=lambda x: isinstance(x, P))
    counters = tuple(sorted(k for k in state if k != SUMS))
    return _total_fn(mesh, (treedef, tuple(leaves), counters))(state)


def expand(host_state: Any, mesh: Mesh, specs: Any = None) -> Any:
    """The inverse of :func:`device_total` for a resumed run: device 0 holds the sums, the others zeros
    (``specs``: each sums leaf's spec, :class:`StateInit`; default ``P("data")``)."""
    leaves, treedef = jax.tree_util.tree_flatten(host_state[SUMS])
    spec_leaves = ([P(AXIS)] * len(leaves) if specs is None
                   else jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P)))

    def place(x, spec):
        x = np.asarray(x)
        n = lead_size(mesh, spec)

        def block(idx):  # only the blocks a process owns are built, so this works with several processes
            part = x[tuple(idx[1:])]
            return (part if idx[0].start in (0, None) else np.zeros_like(part))[None]

        return jax.make_array_from_callback((n,) + x.shape, NamedSharding(mesh, spec), block)

    out = replicate({k: np.asarray(v) for k, v in host_state.items() if k != SUMS}, mesh)
    out[SUMS] = jax.tree_util.tree_unflatten(treedef, [place(x, sp) for x, sp in zip(leaves, spec_leaves)])
    return out


# --------------------------------------------------------------------------- inside a step, with a "model" axis
def gather_params(params: Any, specs: Any) -> Any:
    """Inside ``shard_map``: every parameter leaf whole, all-gathered over ``"model"`` along the
    axis ``specs`` (:func:`fisher_jax.parallel.param_specs`) split it on; others as they are."""

    def one(x, spec):
        for axis, entry in enumerate(tuple(spec)):
            if MODEL_AXIS in _axis_names(entry):
                return jax.lax.all_gather(x, MODEL_AXIS, axis=axis, tiled=True)
        return x

    return jax.tree_util.tree_map(one, params, specs, is_leaf=lambda x: isinstance(x, P))


def add_to_sums(acc: Any, contribution: Any, specs: Any) -> Any:
    """Inside ``shard_map``: ``acc + contribution`` per sums leaf, where ``acc`` is this device's
    block (leading axis dropped) and ``contribution`` this device's whole-leaf term; a leaf split
    over ``"model"`` receives the sum of its ``"model"`` group's terms, reduce-scattered to its block."""

    def one(spec, a, c):
        d = model_dim(spec)
        if d is None:
            return a + c
        return a + jax.lax.psum_scatter(c, MODEL_AXIS, scatter_dimension=d, tiled=True)

    return jax.tree_util.tree_map(one, specs, acc, contribution, is_leaf=lambda x: isinstance(x, P))


def total_over_rows(g: Any, specs: Any, rows: Any) -> tuple[Any, Any]:
    """Inside ``shard_map``: ``(sum of g over every device, whether this device adds it)`` per sums
    leaf: a leaf split over ``"model"`` gets its block of the total (summed over ``"data"``,
    reduce-scattered over ``"model"``) and is added on ``"data"`` index 0; any other leaf gets
    the whole total, added on the first device of ``rows``."""

    def total(spec, x):
        d = model_dim(spec)
        if d is None:
            return jax.lax.psum(x, rows)
        return jax.lax.psum_scatter(jax.lax.psum(x, AXIS), MODEL_AXIS, scatter_dimension=d, tiled=True)

    def first(spec):
        return jax.lax.axis_index(rows if model_dim(spec) is None else AXIS) == 0

    is_p = lambda x: isinstance(x, P)  # noqa: E731
    return (jax.tree_util.tree_map(total, specs, g, is_leaf=is_p),
            jax.tree_util.tree_map(first, specs, is_leaf=is_p))


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
    specs = getattr(init_state, "specs", None)
    rows_spec = P(par.row_axes(mesh))
    if checkpointer is not None:
        shapes = jax.eval_shape(lambda: device_total(init_state(), mesh, specs))
        restored = checkpointer.restore(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes))
        if restored is not None:
            host_state, start = restored
            state = expand(host_state, mesh, specs)
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
            state, token = step(state, shard_batch({k: batch[k] for k in BATCH_KEYS}, mesh, rows_spec),
                                np.int32(seed), np.int32(index))
            index += 1
            examples += int(real.sum())
            in_flight.append(token)
            if len(in_flight) > 2:
                in_flight.popleft().block_until_ready()
            if progress:
                bar.update(1)
                bar.set_postfix_str(f"{examples / max(time.perf_counter() - t0, 1e-9):.1f} ex/s", refresh=False)
            if checkpointer is not None and (index - start) % checkpointer.every == 0:
                checkpointer.save(par.to_host(device_total(state, mesh, specs)), index)
                last_saved = index
    finally:
        bar.close()
    host = par.to_host(device_total(state, mesh, specs))
    if checkpointer is not None and index > last_saved:
        checkpointer.save(host, index)
    return host, index


__all__ = ["SUMS", "StateInit", "accumulate", "add_to_sums", "device_total", "expand", "gather_params", "init_state",
           "lead_size", "model_dim", "per_shard", "standardise_batch", "state_spec", "sums_spec", "total_over_rows"]
