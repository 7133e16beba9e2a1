"""Several JAX processes, one run: starting them, and which process does what.

Every ``fisher-jax`` command calls :func:`initialize` before JAX computes anything. Where the
processes come from, first match wins:

1. explicit settings: the global flags ``fisher-jax --coordinator HOST:PORT --num-processes N
   --process-id I <command> ...`` or the environment variables ``FISHER_JAX_COORDINATOR``,
   ``FISHER_JAX_NUM_PROCESSES``, ``FISHER_JAX_PROCESS_ID`` (a flag beats its variable);
2. a detected cluster (:func:`detected_cluster`: a SLURM step or an Open MPI job of more than one
   task, a multi-host Cloud TPU slice), or ``FISHER_JAX_DISTRIBUTED=on``: JAX's own
   ``jax.distributed.initialize()`` with no arguments, which reads the cluster's variables;
3. otherwise nothing: one process (``FISHER_JAX_DISTRIBUTED=off`` also skips step 2).

On CPUs the processes talk through gloo collectives (``jax_cpu_collectives_implementation``).

A run of N processes is one data-parallel run over every process's devices
(:mod:`fisher_jax.parallel`): each process builds only its contiguous slice of every global
batch (:func:`process_part`, read by the batch iterators), the global batch is assembled with
``jax.make_array_from_process_local_data``, and only the main process (index 0) writes files
and prints (:func:`is_main_process`). A decision that reads the disk and changes which
collectives run (is this statistic cached?) is taken by process 0 and broadcast
(:func:`main_decides`, :func:`broadcast_from_main`); :func:`barrier` waits for the files process 0
wrote before the others read them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from typing import Any, Callable, Mapping, Optional, TypeVar

from .errors import FisherJaxError

ENV_COORDINATOR = "FISHER_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "FISHER_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "FISHER_JAX_PROCESS_ID"
ENV_MODE = "FISHER_JAX_DISTRIBUTED"  # auto (default) | on | off

T = TypeVar("T")

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins a run: ``mode`` is ``"explicit"`` (the three settings below),
    ``"auto"`` (``jax.distributed.initialize()`` detects the cluster) or ``"none"``."""

    mode: str
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


def _int(name: str, value: object) -> Optional[int]:
    if value is None or value == "":
        return None
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise FisherJaxError(f"{name} must be an integer, got {value!r}") from None


def detected_cluster(env: Mapping[str, str]) -> Optional[str]:
    """The multi-process cluster ``env`` describes, for ``jax.distributed.initialize()`` to join:
    ``"slurm"`` (a step of more than one task), ``"mpi"`` (Open MPI, more than one rank),
    ``"tpu"`` (more than one TPU worker host), or ``None`` (one process)."""
    if env.get("SLURM_STEP_ID") is not None and (_int("SLURM_NTASKS", env.get("SLURM_NTASKS")) or 1) > 1:
        return "slurm"
    if (_int("OMPI_COMM_WORLD_SIZE", env.get("OMPI_COMM_WORLD_SIZE")) or 1) > 1:
        return "mpi"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return "tpu"
    return None


def resolve(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None, env: Optional[Mapping[str, str]] = None) -> Launch:
    """The :class:`Launch` of the given flags over ``env`` (default ``os.environ``); checks them.

    Explicit settings need all three (one process, ``--num-processes 1``, needs none), a
    ``HOST:PORT`` coordinator and ``0 <= process_id < num_processes``.
    """
    env = os.environ if env is None else env
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    num = _int("--num-processes", num_processes) if num_processes is not None else _int(
        ENV_NUM_PROCESSES, env.get(ENV_NUM_PROCESSES))
    pid = _int("--process-id", process_id) if process_id is not None else _int(ENV_PROCESS_ID, env.get(ENV_PROCESS_ID))
    mode = env.get(ENV_MODE, "auto").strip().lower()
    if mode not in ("auto", "on", "off", "1", "0", "true", "false"):
        raise FisherJaxError(f"{ENV_MODE} must be auto, on or off, got {env.get(ENV_MODE)!r}")
    if coordinator is None and num is None and pid is None:
        if mode in ("off", "0", "false"):
            return Launch("none")
        if mode in ("on", "1", "true") or detected_cluster(env):
            return Launch("auto")
        return Launch("none")
    if num is not None and num < 1:
        raise FisherJaxError(f"--num-processes must be >= 1, got {num}")
    if num == 1 and coordinator is None and pid in (None, 0):
        return Launch("none")
    missing = [name for name, v in (("--coordinator HOST:PORT", coordinator), ("--num-processes N", num),
                                    ("--process-id I", pid)) if v is None]
    if missing:
        raise FisherJaxError(f"a multi-process run needs --coordinator, --num-processes and --process-id "
                             f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing {', '.join(missing)}")
    if not _ADDRESS.match(coordinator):
        raise FisherJaxError(f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:1234), got {coordinator!r}")
    if not 0 <= pid < num:
        raise FisherJaxError(f"--process-id must be in 0..{num - 1} for {num} processes, got {pid}")
    return Launch("explicit", coordinator, num, pid)


def _already_initialized() -> bool:
    if "jax" not in sys.modules:
        return False
    import jax

    return bool(jax.distributed.is_initialized())


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, env: Optional[Mapping[str, str]] = None) -> Launch:
    """Join the run :func:`resolve` describes (before JAX computes anything); returns it.

    Nothing happens for one process, or when ``jax.distributed`` is already initialised (a script
    that called it itself). On CPUs the processes' collectives go through gloo.
    """
    launch = resolve(coordinator, num_processes, process_id, env)
    if launch.mode == "none" or _already_initialized():
        return launch
    import jax

    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if launch.mode == "explicit":
            jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id)
        else:
            jax.distributed.initialize()
    except RuntimeError as exc:
        raise FisherJaxError(f"could not start the multi-process run ({launch.mode}): "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return launch


def process_part() -> tuple[int, int]:
    """``(this process's index, number of processes)``; ``(0, 1)`` unless ``jax.distributed`` runs.

    Never starts a JAX backend by itself (the data layer asks before anything computes).
    """
    if not _already_initialized():
        return 0, 1
    import jax

    return int(jax.process_index()), int(jax.process_count())


def is_main_process() -> bool:
    """True in the process that writes files and prints (index 0, or the only process)."""
    return process_part()[0] == 0


def local_slice(rows: int, part: Optional[tuple[int, int]] = None) -> tuple[slice, int]:
    """``(slice, k)``: process ``p`` of ``n`` holds rows ``p*k .. p*k+k-1`` of a global batch of
    ``rows`` rows, ``k = ceil(rows / n)`` (the global batch is padded to ``n*k`` rows at its end)."""
    p, n = process_part() if part is None else part
    k = -(-int(rows) // int(n))
    return slice(p * k, (p + 1) * k), k


def padded_size(n: int) -> int:
    """The padded length of a message of ``n`` elements: a power of two >= 64, so a run compiles
    few collectives (broadcasts here, the batches' token rows in the data layer)."""
    return max(64, 1 << (max(int(n), 1) - 1).bit_length())


def broadcast_from_main(value: Any) -> Any:
    """Process 0's ``value`` (JSON-able: ``None``, bools, numbers, strings, lists, dicts), in every process.

    For a decision that reads the disk ("is this file cached?") and changes which collectives run:
    every process must take process 0's branch, or they wait on each other forever. The value
    travels as JSON bytes (its length first, then the bytes padded to a power of two) through
    ``multihost_utils.broadcast_one_to_all``, so it comes back as ``json.loads`` gives it (tuples
    as lists). One process: ``value`` itself, untouched, and JAX is not started.
    """
    if process_part()[1] == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    main = is_main_process()
    data = json.dumps(value).encode() if main else b""
    size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int64)))
    buf = np.zeros(padded_size(size), np.uint8)
    if main:
        buf[:size] = np.frombuffer(data, np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
    return json.loads(got[:size].tobytes().decode())


def allgather(value: Any) -> Any:
    """Every process's ``value`` (a numpy array of the same shape and dtype in every process),
    stacked along a new first axis in process order: ``[processes, *value.shape]``. One process:
    ``value[None]``, and JAX is not started. ``multihost_utils.process_allgather``."""
    import numpy as np

    value = np.asarray(value)
    if process_part()[1] == 1:
        return value[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=False))


def all_succeed(work: Callable[[], T]) -> T:
    """``work()`` in every process; when it raises in any of them, it raises in all of them.

    For local work before a collective (each process reading its own part of a file): a process
    that failed alone would leave the others waiting in the collective. The failing process
    raises its own exception; the others a :class:`FisherJaxError` naming it and its message (the
    first 1000 bytes). One process: ``work()``.
    """
    if process_part()[1] == 1:
        return work()
    import numpy as np

    error: Optional[BaseException] = None
    value: Any = None
    try:
        value = work()
    except Exception as exc:  # noqa: BLE001 - every process must hear about it
        error = exc
    text = b"" if error is None else (str(error) or type(error).__name__).encode()[:1000]
    status = np.zeros(1024, np.uint8)
    status[0], status[1:3] = int(error is not None), divmod(len(text), 256)
    status[3:3 + len(text)] = np.frombuffer(text, np.uint8)
    every = allgather(status)
    if error is not None:
        raise error
    for q, row in enumerate(every):
        if row[0]:
            size = int(row[1]) * 256 + int(row[2])
            raise FisherJaxError(f"process {q}: {bytes(row[3:3 + size]).decode(errors='replace')}")
    return value


def main_decides(decide: Callable[[], T]) -> T:
    """``decide()`` run on process 0 only, its result broadcast (:func:`broadcast_from_main`).

    An exception in ``decide`` reaches every process (a :class:`FisherJaxError` with its message
    in the followers, the original in process 0) instead of leaving the followers waiting.
    """
    if process_part()[1] == 1:
        return decide()
    error: Optional[BaseException] = None
    answer: Any = None
    if is_main_process():
        try:
            answer = ["ok", decide()]
        except Exception as exc:  # noqa: BLE001 - every process must hear about it
            error, answer = exc, ["error", str(exc) or type(exc).__name__]
    answer = broadcast_from_main(answer)
    if error is not None:
        raise error
    if answer[0] == "error":
        raise FisherJaxError(f"process 0: {answer[1]}")
    return answer[1]


def barrier(name: str) -> None:
    """Every process waits here until all reach the same ``name`` (after process 0 writes files
    the others read next); one process: nothing. ``multihost_utils.sync_global_devices``."""
    if process_part()[1] == 1:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


__all__ = ["ENV_COORDINATOR", "ENV_MODE", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "Launch", "all_succeed", "allgather", "barrier",
           "broadcast_from_main", "detected_cluster", "initialize", "is_main_process", "local_slice", "main_decides",
           "process_part", "resolve"]
