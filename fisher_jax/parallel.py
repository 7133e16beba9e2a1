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

Sharded parameters (bodies larger than one device): ``data_mesh(model_parallel=K)`` is a 2-D
mesh ``("data", "model")`` of ``devices / K`` rows of ``K`` devices. :func:`place_params` splits
every parameter leaf (and optimiser-state or running-sum leaf of the same shape) along its largest
axis divisible by ``K`` over ``"model"`` (:func:`shard_axis`; small leaves, biases and LayerNorms
stay replicated), so each device holds ``1/K`` of the body. Training and evaluation hand such
leaves to ``jit`` and let XLA (GSPMD) insert the collectives, batches split over ``"data"``;
the statistics passes gather the parameters per step inside their ``shard_map`` and split the
batch rows over both axes (:func:`row_axes`). ``model_parallel=1`` (the default) is the 1-D mesh.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .errors import FisherJaxError

AXIS = "data"
MODEL_AXIS = "model"
# Leaves with fewer elements stay replicated under model parallelism: gathering them would cost
# more in collectives than the memory they free.
MIN_SHARDED_SIZE = 2 ** 12
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


_DEFAULT_MODEL_PARALLEL = [1]


def use_model_parallel(k: int) -> int:
    """Make ``k`` the model-parallel width of every default mesh (``data_mesh()`` without
    ``model_parallel=``, hence every training, evaluation and statistics call without ``mesh=``);
    returns the previous width. ``k = 1``: parameters replicated (the default)."""
    k = int(k)
    if k < 1:
        raise FisherJaxError(f"model_parallel must be >= 1, got {k}")
    previous, _DEFAULT_MODEL_PARALLEL[0] = _DEFAULT_MODEL_PARALLEL[0], k
    return previous


def data_mesh(devices: Optional[list] = None, model_parallel: Optional[int] = None) -> Mesh:
    """A mesh over ``devices`` (default: every device, all processes): 1-D ``("data",)``, or with
    ``model_parallel=K > 1`` (default: :func:`use_model_parallel`'s width) 2-D ``("data", "model")``
    of shape ``(devices / K, K)``.

    Devices are ordered by process, so each process's devices hold one contiguous block of the
    batch axis: the global batch is the processes' slices one after the other. A ``"model"`` group
    is ``K`` consecutive devices of one process (``K`` must divide every process's device count).
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise FisherJaxError("no JAX devices to build a mesh from")
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    k = _DEFAULT_MODEL_PARALLEL[0] if model_parallel is None else int(model_parallel)
    if k < 1:
        raise FisherJaxError(f"model_parallel must be >= 1, got {k}")
    if k == 1:
        return Mesh(np.asarray(devices), (AXIS,))
    per_process = collections.Counter(d.process_index for d in devices)
    if any(n % k for n in per_process.values()):
        raise FisherJaxError(
            f"model_parallel={k} must divide the device count of every process "
            f"({', '.join(str(n) for n in sorted(set(per_process.values())))} devices per process)")
    return Mesh(np.asarray(devices).reshape(len(devices) // k, k), (AXIS, MODEL_AXIS))


def local_mesh() -> Mesh:
    """A 1-D ``"data"`` mesh over this process's devices only (a computation that stays in one
    process; training, evaluation and statistics use :func:`data_mesh`)."""
    return data_mesh(jax.local_devices(), model_parallel=1)


def resolve_mesh(mesh: Optional[Mesh]) -> Mesh:
    """``None`` -> :func:`data_mesh`; a given mesh must have a ``"data"`` axis and may have a
    ``"model"`` axis, nothing else."""
    if mesh is None:
        return data_mesh()
    if AXIS not in mesh.axis_names:
        raise FisherJaxError(f"the mesh needs an axis named '{AXIS}' (got axes {mesh.axis_names})")
    from .tree import did_you_mean

    for name in mesh.axis_names:
        if name not in (AXIS, MODEL_AXIS):
            raise FisherJaxError(f"unknown mesh axis '{name}'{did_you_mean(str(name), [AXIS, MODEL_AXIS])}; "
                                 f"a mesh has '{AXIS}' and optionally '{MODEL_AXIS}'")
    return mesh


def has_model_axis(mesh: Mesh) -> bool:
    """Whether ``mesh`` shards parameters over a ``"model"`` axis."""
    return MODEL_AXIS in mesh.axis_names


def model_parallel(mesh: Mesh) -> int:
    """The ``"model"`` axis size of ``mesh`` (1 without one)."""
    return int(mesh.shape[MODEL_AXIS]) if has_model_axis(mesh) else 1


def num_shards(mesh: Mesh) -> int:
    """How many ways the batch axis is split (per process when multi-host)."""
    return int(mesh.shape[AXIS]) // max(jax.process_count(), 1)


def row_axes(mesh: Mesh) -> Any:
    """The mesh axes a statistics pass splits batch rows over: ``"data"``, or with a ``"model"``
    axis both (``("data", "model")``: every device computes its own rows with gathered parameters,
    so no two devices repeat each other's work)."""
    return (AXIS, MODEL_AXIS) if has_model_axis(mesh) else AXIS


def num_row_shards(mesh: Mesh) -> int:
    """How many ways a statistics pass splits a process's batch rows (:func:`row_axes`)."""
    return num_shards(mesh) * model_parallel(mesh)


# --------------------------------------------------------------------------- the parameter rule
def shard_axis(shape: tuple, k: int, min_size: int = MIN_SHARDED_SIZE) -> Optional[int]:
    """The axis a leaf of ``shape`` is split along over ``k`` devices, or None (replicated).

    Rule: leaves with at least two axes and ``prod(shape) >= min_size`` elements are split along
    their largest axis whose length ``k`` divides (the last of equally long ones: an ``[in, out]``
    kernel with ``in == out`` splits its outputs); biases, LayerNorm scales, small and indivisible
    leaves are replicated. ``k = 1``: always None.
    """
    shape = tuple(int(n) for n in shape)
    if k <= 1 or len(shape) < 2 or int(np.prod(shape)) < min_size:
        return None
    best = None
    for axis, n in enumerate(shape):
        if n % k == 0 and (best is None or n >= shape[best]):
            best = axis
    return best


def leaf_spec(shape: tuple, k: int, min_size: int = MIN_SHARDED_SIZE) -> P:
    """The ``PartitionSpec`` of one leaf under :func:`shard_axis`: ``P()`` or ``"model"`` at its axis."""
    axis = shard_axis(shape, k, min_size)
    return P() if axis is None else P(*([None] * axis), MODEL_AXIS)


def param_specs(tree: Any, k: int, min_size: int = MIN_SHARDED_SIZE) -> Any:
    """:func:`leaf_spec` of every leaf of ``tree`` (arrays, ``ShapeDtypeStruct`` s or tracers)."""
    return jax.tree_util.tree_map(lambda x: leaf_spec(np.shape(x), k, min_size), tree)


def param_shardings(tree: Any, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE) -> Any:
    """:func:`param_specs` on ``mesh`` as ``NamedSharding`` s (all replicated without a model axis)."""
    k = model_parallel(mesh)
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, leaf_spec(np.shape(x), k, min_size)), tree)


def place_params(tree: Any, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE) -> Any:
    """Parameters (optimiser state, any tree of parameter-shaped leaves) onto ``mesh``: split over
    ``"model"`` by :func:`shard_axis`, or replicated (:func:`replicate`) on a mesh without one.
    A leaf already placed so stays as it is."""
    if not has_model_axis(mesh):
        return replicate(tree, mesh)
    shardings = param_shardings(tree, mesh, min_size)
    if not mesh.is_multi_process:
        return jax.device_put(tree, shardings)
    return jax.tree_util.tree_map(_to_global_split, tree, shardings)


def _to_global_split(x: Any, sharding: NamedSharding) -> Any:
    """One leaf onto a sharding that spans several processes and may split it: each process
    builds only its own blocks, from the host value every process holds."""
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if not x.is_fully_addressable:  # already global, laid out otherwise
            return jax.jit(lambda a: a, out_shardings=sharding)(x)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def mesh_of(tree: Any) -> Optional[Mesh]:
    """The mesh of the first leaf placed on a mesh with a ``"model"`` axis (sharded parameters), else None."""
    for x in jax.tree_util.tree_leaves(tree):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and has_model_axis(sharding.mesh):
            return sharding.mesh
    return None


def to_host(tree: Any) -> Any:
    """Numpy copies of a tree of device arrays, in every process: a leaf split over other
    processes' devices (sharded parameters or sums) is all-gathered first."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not any(isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated
               for x in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)


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


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, spec: Optional[P] = None) -> dict[str, jax.Array]:
    """Put a (process-local) batch on the mesh, split along its first axis (over ``spec``,
    default ``P("data")``; the statistics passes use ``P(row_axes(mesh))``).

    With several processes the global batch is the concatenation of the processes' batches.
    """
    sharding = batch_sharding(mesh) if spec is None else NamedSharding(mesh, spec)
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
    from .distributed import allgather

    every = allgather(local)  # [processes, rows, ...]
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
    "AXIS", "BATCH_KEYS", "MIN_SHARDED_SIZE", "MODEL_AXIS", "MODEL_INPUTS", "batch_inputs", "batch_sharding",
    "data_mesh", "fetch", "gather_rows", "has_model_axis", "leaf_spec", "local_mesh", "mesh_of", "model_inputs",
    "model_parallel", "num_row_shards", "num_shards", "pad_rows", "param_shardings", "param_specs", "place_params",
    "process_rows", "physical_cores", "replicate", "replicated", "resolve_mesh", "row_axes", "shard_axis",
    "shard_batch", "to_host", "use_cpu_cores", "use_model_parallel",
]
