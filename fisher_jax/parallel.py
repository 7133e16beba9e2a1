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
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: every device, all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise FisherJaxError("no JAX devices to build a mesh from")
    return Mesh(np.asarray(devices), (AXIS,))


def local_mesh() -> Mesh:
    """A 1-D ``"data"`` mesh over this process's devices (training and evaluation are per process;
    its batch is split ``mesh.size`` ways)."""
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
    """Put a pytree (parameters, optimiser state, running sums) on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


__all__ = [
    "AXIS", "BATCH_KEYS", "MODEL_INPUTS", "batch_inputs", "batch_sharding", "data_mesh", "local_mesh", "model_inputs",
    "num_shards", "pad_rows",
    "physical_cores", "replicate", "replicated", "resolve_mesh", "shard_batch", "use_cpu_cores",
]
