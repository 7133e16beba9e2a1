"""Data parallelism over one 1-D mesh axis ``"data"``: every jitted step of fisher_jax splits its
batch over the devices and keeps parameters replicated.

Training, evaluation and the statistics passes all use it: parameters (and optimiser state,
running sums) are put on every device with :func:`replicate`, a batch is split along its first
axis with :func:`shard_batch` after :func:`pad_rows` has padded it with weight-0 rows to a
multiple of the device count. Padding rows carry weight 0 in every loss and statistic, so the
result does not depend on the number of devices (up to float summation order).

On a CPU, :func:`use_cpu_cores` exposes each core as its own XLA device. XLA's CPU runtime runs
each batched matrix product (the attention's ``Q Kᵀ`` and ``P V``) on a single core, so with one
device half of a 2-core machine idles through attention; with one device per core the same step
runs half a batch on each core (benchmarks/RESULTS.md: CPU profile). The command line does this by default.

Several processes (:mod:`fisher_jax.distributed`): the mesh spans every process's devices, in
process order, so a global batch is the concatenation of the processes' slices
(:func:`process_rows` cuts a process's slice of a batch every process holds; the batch
iterators build only their own slice); :func:`gather_rows` and :func:`fetch` bring per-row
results back to every process in the global batch's row order.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .errors import FisherJaxError

AXIS = "data"
BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "weights")


def physical_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def use_cpu_cores(num_devices: Optional[int] = None, *, strict: bool = True) -> int:
    """Give JAX's CPU backend ``num_devices`` devices (default: one per core); returns the count set.

    Must run before JAX computes anything in this process (JAX fixes its devices then). A count
    the user already chose wins: ``JAX_NUM_CPU_DEVICES=N`` in the environment, or
    ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` (``JAX_NUM_CPU_DEVICES=1`` turns
    this off). On a GPU/TPU machine it only affects the unused CPU backend. Too late, with
    ``strict=False`` (the command line, or a caller that does not mind): nothing changes and the
    current CPU device count is returned.
    """
    if os.environ.get("JAX_NUM_CPU_DEVICES"):
        return int(jax.config.jax_num_cpu_devices)
    flag = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if flag:
        return int(flag.group(1))
    n = physical_cores() if num_devices is None else int(num_devices)
    if n < 1:
        raise FisherJaxError(f"num_devices must be >= 1, got {n}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already initialised
        if strict:
            raise FisherJaxError(
                "use_cpu_cores() must run before JAX computes anything in this process "
                "(restart the kernel and call it right after the imports)") from None
        return len(jax.devices("cpu"))
    return n


def data_mesh(devices: Optional[list] = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: every device, all processes).

    Devices are ordered by process, so each process's devices hold one contiguous block of the
    batch axis: the global batch is the processes' slices one after the other.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise FisherJaxError("no JAX devices to build a mesh from")
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (AXIS,))


def local_mesh() -> Mesh:
    """A 1-D ``"data"`` mesh over this process's devices only (a computation that stays in one
    process; training, evaluation and statistics use :func:`data_mesh`)."""
    return data_mesh(jax.local_devices())


def resolve_mesh(mesh: Optional[Mesh]) -> Mesh:
    """``None`` -> :func:`data_mesh`; a given mesh must have a ``"data"`` axis."""
    if mesh is None:
        return data_mesh()
    if AXIS not in mesh.axis_names:
        raise FisherJaxError(f"the mesh needs an axis named '{AXIS}' (got axes {mesh.axis_names})")
    return mesh


def num_shards(mesh: Mesh) -> int:
    """How many ways the batch axis is split (per process when multi-host)."""
    return int(mesh.shape[AXIS]) // max(jax.process_count(), 1)


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None, xp: Any = np) -> tuple:
    """``(input_ids, attention_mask, token_type_ids)`` as int32 ``xp`` arrays (``xp``: numpy or
    ``jax.numpy``): no attention mask means every token is real, no token types mean segment 0."""
    ids = xp.asarray(input_ids, xp.int32)
    mask = xp.ones_like(ids) if attention_mask is None else xp.asarray(attention_mask, xp.int32)
    types = xp.zeros_like(ids) if token_type_ids is None else xp.asarray(token_type_ids, xp.int32)
    return ids, mask, types


def batch_inputs(batch: Mapping[str, Any], xp: Any = np) -> dict[str, Any]:
    """:func:`model_inputs` of a batch dict, as a dict keyed by :data:`MODEL_INPUTS`."""
    return dict(zip(MODEL_INPUTS, model_inputs(batch["input_ids"], batch.get("attention_mask"),
                                               batch.get("token_type_ids"), xp=xp)))


def pad_rows(batch: Mapping[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Pad every array's first axis to a multiple of ``multiple`` with copies of row 0 (``weights``: 0).

    Copies of a real row (rather than zeros) keep every intermediate finite, so a ``0 * x`` can
    never turn into ``0 * inf``.
    """
    b = int(next(iter(batch.values())).shape[0])
    extra = (-b) % multiple
    if extra == 0:
        return dict(batch)
    out = {}
    for k, a in batch.items():
        a = np.asarray(a)
        fill = np.zeros_like(a[:1]) if k == "weights" else a[:1]
        out[k] = np.concatenate([a, np.repeat(fill, extra, axis=0)], axis=0)
    return out


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Put a (process-local) batch on the mesh, split along its first axis.

    With several processes the global batch is the concatenation of the processes' batches.
    """
    sharding = batch_sharding(mesh)
    if mesh.is_multi_process:
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put a pytree (parameters, optimiser state, running sums) on every device of the mesh.

    With several processes every process must pass the same values (the same parameters)."""
    sharding = replicated(mesh)
    if not mesh.is_multi_process:
        return jax.device_put(tree, sharding)
    return jax.tree_util.tree_map(lambda x: _to_global(x, sharding), tree)


def _to_global(x: Any, sharding: NamedSharding) -> Any:
    """One leaf on a sharding that spans several processes: JAX puts only host values (the same in
    every process) there, so a leaf on this process's devices goes through the host first."""
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if not x.is_fully_addressable:  # already global, laid out otherwise
            return jax.jit(lambda a: a, out_shardings=sharding)(x)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        x = np.asarray(x)
    return jax.device_put(x, sharding)


def process_rows(batch: Mapping[str, Any], part: Optional[tuple[int, int]] = None) -> dict[str, np.ndarray]:
    """This process's rows of a global batch every process holds (a batch list of one's own).

    Process ``p`` of ``n`` gets rows ``p*k .. p*k+k-1``, ``k = ceil(B / n)``; the batch is first
    padded to ``n*k`` rows with weight-0 copies of row 0 (:func:`pad_rows`), so the processes'
    slices, one after the other, are the batch. One process: the batch itself.
    """
    from .distributed import local_slice, process_part

    part = process_part() if part is None else part
    batch = {k: np.asarray(v) for k, v in batch.items() if v is not None}
    if part[1] == 1:
        return batch
    rows = int(next(iter(batch.values())).shape[0])
    if "weights" not in batch:
        batch["weights"] = np.ones(rows, np.float32)
    sl, _ = local_slice(rows, part)
    return {k: v[sl] for k, v in pad_rows(batch, part[1]).items()}


def _is_multi_process() -> bool:
    from .distributed import process_part

    return process_part()[1] > 1


def gather_rows(arrays: list) -> np.ndarray:
    """The global rows of per-batch, process-local numpy arrays, concatenated in batch order.

    ``arrays[i]`` is this process's slice of batch ``i`` (the same number of rows in every
    process); the result has, for each batch, process 0's rows, then process 1's, ... — the
    global batch's order. One all-gather for the whole list. One process: ``concatenate(arrays)``.
    """
    arrays = [np.asarray(a) for a in arrays]
    if not arrays:
        raise FisherJaxError("nothing to gather")
    local = np.concatenate(arrays)
    if not _is_multi_process():
        return local
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(local, tiled=False))  # [processes, rows, ...]
    bounds = np.cumsum([0] + [len(a) for a in arrays])
    return np.concatenate([every[:, a:b].reshape((-1,) + every.shape[2:]) for a, b in zip(bounds[:-1], bounds[1:])])


def fetch(tree: Any) -> Any:
    """Device arrays to numpy on this process; global arrays spanning other processes' devices are
    all-gathered first, so every process gets every row (in the global batch's order)."""
    if not _is_multi_process():
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


__all__ = [
    "AXIS", "BATCH_KEYS", "MODEL_INPUTS", "batch_inputs", "batch_sharding", "data_mesh", "fetch", "gather_rows",
    "local_mesh", "model_inputs", "num_shards", "pad_rows", "process_rows",
    "physical_cores", "replicate", "replicated", "resolve_mesh", "shard_batch", "use_cpu_cores",
]
