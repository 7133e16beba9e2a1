"""Per-platform tuning, in one place: what differs between CPU, GPU and TPU runs of the same maths.

The statistics and training code never test the platform themselves; they ask for the policy
(``policy = backend_policy()``, or :func:`policy_for_mesh` for the devices a step runs on) and
use its fields. Every field changes speed or memory only; the numbers a policy gives are the
same up to float summation order (and, for the dropout generator, the same distribution).
Measured figures behind these choices: ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from .errors import FisherJaxError
from .tree import did_you_mean


@dataclasses.dataclass(frozen=True)
class BackendPolicy:
    """How the maths is laid out on one platform.

    * ``mask_chunk``: examples per device whose mask-Fisher gradients are computed together
      (``None``: the whole local batch in one vmap). XLA:CPU runs a small working set faster
      than one wide vmap; accelerators want the wide vmap.
    * ``unrolled_rows``: up to this many rows, a weighted sum over the leading axis is written as
      a chain of adds (which XLA:CPU fuses into one elementwise loop) instead of a reduce, which
      XLA:CPU runs far below memory speed over a leading axis.
    * ``rng_impl``: the PRNG implementation of dropout keys. XLA:CPU expands RngBitGenerator
      (``"rbg"``) into a slow loop, so CPUs use threefry; JAX documents ``"rbg"`` as the faster
      generator on GPU/TPU.
    """

    platform: str
    mask_chunk: Optional[int]
    unrolled_rows: int
    rng_impl: str


# The unrolled sum is kept on every platform for now so that accelerator runs keep their exact
# numbers across this refactor; an accelerator policy may set it to 0 (a plain reduce).
POLICIES: dict[str, BackendPolicy] = {
    "cpu": BackendPolicy("cpu", mask_chunk=4, unrolled_rows=64, rng_impl="threefry2x32"),
    "gpu": BackendPolicy("gpu", mask_chunk=None, unrolled_rows=64, rng_impl="rbg"),
    "tpu": BackendPolicy("tpu", mask_chunk=None, unrolled_rows=64, rng_impl="rbg"),
}
# JAX names some GPU backends by their runtime.
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def backend_policy(platform: Optional[str] = None) -> BackendPolicy:
    """The policy of ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"``; default: JAX's default backend)."""
    if platform is None:
        import jax

        platform = jax.default_backend()
    name = _ALIASES.get(str(platform).lower(), str(platform).lower())
    if name not in POLICIES:
        raise FisherJaxError(f"no backend policy for platform '{platform}'{did_you_mean(name, POLICIES)}; "
                             f"known: {', '.join(POLICIES)}")
    return POLICIES[name]


def policy_for_mesh(mesh) -> BackendPolicy:
    """The policy of the devices a ``jax.sharding.Mesh`` runs on (its first device's platform)."""
    return backend_policy(mesh.devices.flat[0].platform)


__all__ = ["BackendPolicy", "POLICIES", "backend_policy", "policy_for_mesh"]
