"""Fisher mask nodes merging (Thennal D K, Nathan, M S; LREC-COLING 2024, arXiv 2403.09891).

Each model's Fisher is estimated only for its ``L*H`` head masks and ``L*I`` neuron masks; every
body parameter then takes the Fisher of the mask node that "owns" it, and the bodies are combined
with the same elementwise weighted average as Fisher-weighted averaging (Matena & Raffel 2022):

    theta = sum_j w_j(node(theta)) theta_j / sum_j w_j(node(theta))

Roles come from :func:`fisher_jax.models.layout.param_role`, never from family names, so every
registered family works (encoders, GPT-2, the Llama family with grouped-query attention and
gated FFNs, ModernBERT). Flax kernels are ``[in, out]`` (PyTorch's weight
transposed): PyTorch "weight rows of head h" are Flax kernel *columns* ``h*d:(h+1)*d``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional, Sequence

import numpy as np

from ..errors import FisherJaxError
from ..models import layout
# The record lives with the statistics (numpy-only module); re-exported here for convenience.
# Any object with .head [L, H] and .neuron [L, I] is accepted, not only this class.
from ..stats.io import MaskFisher
from ..tree import flatten, unflatten
from .methods import (
    LEGACY_L2,
    Body,
    _coefficients,
    _flatten_bodies,
    check_floor,
    check_gamma,
    resolve_normalize,
    unit_scale,
    weighted_average,
)

NodeMapping = Literal["reference", "node"]
MAPPINGS = ("reference", "node")


@dataclasses.dataclass(frozen=True)
class _Geometry:
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate: int
    kv_heads: int = 0  # grouped-query attention: key/value heads (0: num_heads)

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // (self.kv_heads or self.num_heads)


def _node_arrays(mask_fisher: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(head, neuron)`` as float64 *copies* (callers may patch them; inputs stay untouched)."""
    if not (hasattr(mask_fisher, "head") and hasattr(mask_fisher, "neuron")):
        raise FisherJaxError(
            f"{what} is a {type(mask_fisher).__name__}, not a mask Fisher (an object with .head [L, H] and "
            f".neuron [L, I]); full Fisher trees go to method 'fisher'"
        )
    head = np.array(mask_fisher.head, dtype=np.float64, copy=True)
    neuron = np.array(mask_fisher.neuron, dtype=np.float64, copy=True)
    if head.ndim != 2 or neuron.ndim != 2:
        raise FisherJaxError(f"{what}: head must be [L, H] and neuron [L, I]; got shapes {head.shape} and {neuron.shape}")
    for arr, part in ((head, "head"), (neuron, "neuron")):
        if not np.all(np.isfinite(arr)):
            raise FisherJaxError(f"{what}.{part} has non-finite entries (NaN/inf)")
        if np.any(arr < 0):
            raise FisherJaxError(f"{what}.{part} has negative entries; a diagonal Fisher is >= 0")
    return head, neuron


def _geometry(flat: dict[str, Any], head: np.ndarray, neuron: np.ndarray, num_heads: Optional[int], what: str) -> _Geometry:
    """Layers, heads, head size and FFN width of the body, checked against the mask Fisher's shapes."""
    layers: set[int] = set()
    q_out: dict[int, int] = {}
    k_out: dict[int, int] = {}
    ffn: dict[int, int] = {}
    for name, x in flat.items():
        r = layout.param_role(name)
        if r.layer is None:
            continue
        layers.add(r.layer)
        if r.leaf == "kernel" and r.role == layout.QUERY:
            q_out[r.layer] = int(np.shape(x)[-1])
        if r.leaf == "kernel" and r.role == layout.KEY:
            k_out[r.layer] = int(np.shape(x)[-1])
        if r.leaf == "kernel" and r.role == layout.FFN_IN:
            ffn[r.layer] = int(np.shape(x)[-1])
    L = len(layers)
    if L == 0 or layers != set(range(L)):
        raise FisherJaxError(f"the body has no contiguous encoder layers 0..L-1 (found {sorted(layers)})")
    H = int(head.shape[1]) if num_heads is None else int(num_heads)
    if head.shape != (L, H):
        raise FisherJaxError(
            f"{what}.head has shape {head.shape}, but the body has {L} layers x {H} heads (statistics for another model?)"
        )
    if set(q_out) != layers or set(ffn) != layers:
        raise FisherJaxError("the body lacks a query or FFN-intermediate kernel in some layer")
    widths = set(q_out.values())
    if len(widths) != 1 or next(iter(widths)) % H:
        raise FisherJaxError(f"query width {sorted(widths)} does not split into {H} heads")
    inter = set(ffn.values())
    if len(inter) != 1:
        raise FisherJaxError(f"FFN widths differ across layers: {sorted(inter)}")
    I = next(iter(inter))
    if neuron.shape != (L, I):
        raise FisherJaxError(
            f"{what}.neuron has shape {neuron.shape}, but the body has {L} layers x {I} FFN neurons "
            f"(statistics for another model?)"
        )
    d = next(iter(widths)) // H
    kv = set(k_out.values()) or {H * d}
    if len(kv) != 1 or next(iter(kv)) % d or H % (next(iter(kv)) // d):
        raise FisherJaxError(f"key width {sorted(kv)} is not a whole number of key/value heads of size {d} "
                             f"dividing {H} query heads")
    return _Geometry(L, H, d, I, next(iter(kv)) // d)


def _weight_tree(
    flat: dict[str, Any], head: np.ndarray, neuron: np.ndarray, geom: _Geometry, mapping: str, full: bool
) -> dict[str, Any]:
    """Per-leaf weights (broadcastable to the leaf) from one model's node Fishers; see node_weights."""
    head_mean = head.mean(axis=1)  # [L]
    neuron_mean = neuron.mean(axis=1)  # [L]
    # The reference code's "universal" weight for everything outside the encoder layers.
    universal = np.float32(np.mean(head_mean + neuron_mean))
    node = mapping == "node"
    out: dict[str, Any] = {}
    for name, x in flat.items():
        r = layout.param_role(name)
        if r.layer is None:  # embeddings (all of them), the pooler, decoders' final norm
            w: np.ndarray = np.asarray(universal)
        else:
            l, role, leaf = r.layer, r.role, r.leaf
            per_head = np.repeat(head[l], geom.head_dim)  # [H*d]: entry c belongs to head c // d
            # Grouped-query attention: key/value head g serves query heads g*G..(g+1)*G-1 (G =
            # geom.groups) and takes the mean of their Fishers; with G = 1 this is per_head.
            per_kv = np.repeat(head[l].reshape(-1, geom.groups).mean(axis=1), geom.head_dim)
            if role == layout.QUERY:
                w = per_head  # kernel columns / bias entries of head h (broadcasts over kernel rows)
            elif role == layout.KEY or (node and role == layout.VALUE):
                w = per_kv
            elif role == layout.ATTN_OUT and node and leaf == "kernel":
                w = per_head[:, None]  # input rows of head h
            elif role in (layout.VALUE, layout.ATTN_OUT, layout.ATTN_LN):
                w = np.asarray(head_mean[l])
            elif role in (layout.FFN_IN, layout.FFN_GATE):
                w = neuron[l]  # kernel column / bias entry of neuron i (gate and up of a gated unit alike)
            elif role == layout.FFN_OUT and node and leaf == "kernel":
                w = neuron[l][:, None]  # input row of neuron i
            elif role in (layout.FFN_OUT, layout.FFN_LN):
                w = np.asarray(neuron_mean[l])
            else:  # pragma: no cover - layout.param_role only returns the roles above
                raise FisherJaxError(f"no Fisher-node weight for '{name}' (role {role})")
        w = w.astype(np.float32)
        shape = tuple(np.shape(x))
        try:
            ok = np.broadcast_shapes(w.shape, shape) == shape
        except ValueError:
            ok = False
        if not ok:
            raise FisherJaxError(f"Fisher-node weight of shape {w.shape} does not fit '{name}' of shape {shape}")
        out[name] = np.broadcast_to(w, shape).copy() if full else w
    return out


def _check_mapping(mapping: str) -> None:
    if mapping not in MAPPINGS:
        raise FisherJaxError(f"mapping must be 'reference' or 'node', got {mapping!r}")


def node_weights(
    body: Body,
    mask_fisher: Any,
    mapping: NodeMapping = "reference",
    num_heads: Optional[int] = None,
    full: bool = False,
) -> dict[str, Any]:
    """One model's Fisher-node weight for every body parameter, as a tree named like the body.

    ``mapping="reference"`` (the released code; SPEC §3), per layer l, Flax ``[in, out]`` kernels:

    - query, key: kernel columns and bias entries of head h -> ``F_head[l, h]``; with grouped-query
      attention, key (and, for ``node``, value) head g -> the mean of ``F_head[l, h]`` over the
      query heads h that read it (``h // (H / KV) == g``);
    - FFN gate (gated units, ``act(gate) * up``): like the FFN intermediate, per neuron;
    - value, attention output dense, attention LayerNorm -> ``mean_h F_head[l]``;
    - FFN intermediate: kernel column and bias entry of neuron i -> ``F_neuron[l, i]``;
    - FFN output dense, FFN LayerNorm -> ``mean_i F_neuron[l]``;
    - embeddings (all) and pooler -> ``mean_l (mean_h F_head[l] + mean_i F_neuron[l])``.

    ``mapping="node"`` follows the mask semantics: value columns/bias of head h and the attention
    output kernel's *input rows* of head h -> ``F_head[l, h]``; the FFN output kernel's input row
    of neuron i -> ``F_neuron[l, i]``; attention-output/FFN-output biases and LayerNorms -> layer
    means; embeddings and pooler as in ``reference``.

    Leaves are float32 arrays broadcastable to the parameter (``()``, ``[out]`` or ``[in, 1]``);
    ``full=True`` returns them at the parameter's full shape (for plots). The all-zero patch of
    :func:`fisher_nodes` is a cross-model step and is not applied here. ``num_heads`` defaults to
    ``mask_fisher.head.shape[1]``.
    """
    _check_mapping(mapping)
    head, neuron = _node_arrays(mask_fisher, "mask_fisher")
    flat = flatten(body)
    geom = _geometry(flat, head, neuron, num_heads, "mask_fisher")
    return unflatten(_weight_tree(flat, head, neuron, geom, mapping, full))


def normalized_node_fishers(
    mask_fishers: Sequence[Any],
    normalize: Any = False,
    gamma: float = 1.0,
    floor: float = 0.0,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each model's ``(head [L, H], neuron [L, I])`` node weights before they are mapped to parameters.

    With ``G = F**gamma`` (``0**0 = 1``) per model j, and per ``normalize``:

    - ``False``/``"none"`` (the released code): ``G + floor``;
    - ``True`` (the released normalisation, unchanged): ``G / ||G||_2 + floor`` (L2 over the
      model's head and neuron entries together, absolute floor);
    - ``"l2"``: ``G / ||G||_2``; ``"mean"``: ``G / mean(G)`` over all head and neuron entries;
      ``"layer"``: each layer's heads and each layer's neurons separately to unit mean. The floor
      is then relative: ``+ floor * mean`` of the normalised unit (``floor`` for "mean"/"layer").

    Then the all-zero patch: where EVERY model's entry of a head (neuron) node is exactly 0, the
    released code sets all of them to 1 (kept for ``"none"`` and ``True``). For the other modes
    each model's entry becomes that model's mean over its head (neuron) nodes, so the patched node
    neither dominates nor vanishes against the model's other nodes (and the layer means it
    feeds), whatever the Fisher's scale. Inputs are never modified.
    """
    mode = resolve_normalize(normalize)
    gamma = check_gamma(gamma)
    floor = check_floor(floor)
    heads, neurons = [], []
    for j, mf in enumerate(mask_fishers):
        h, n = _node_arrays(mf, f"mask_fishers[{j}]")
        if gamma != 1.0:
            h, n = np.power(h, gamma), np.power(n, gamma)
        if mode == LEGACY_L2:
            norm = float(np.sqrt(np.sum(h * h) + np.sum(n * n)))
            if norm > 0:  # an all-zero Fisher stays zero; the patch below handles it
                h, n = h / norm, n / norm
            h, n = h + floor, n + floor
        elif mode == "layer":
            h, n = _unit_rows(h, floor), _unit_rows(n, floor)
        elif mode in ("l2", "mean"):
            both = np.concatenate([h.ravel(), n.ravel()])
            s, m = unit_scale(float(both.sum()), float(np.sum(both * both)), both.size, mode, f"mask_fishers[{j}]")
            h, n = h * s + floor * m, n * s + floor * m
        else:
            h, n = h + floor, n + floor
        if heads and (h.shape != heads[0].shape or n.shape != neurons[0].shape):
            raise FisherJaxError(
                f"mask_fishers[{j}] has head {h.shape} and neuron {n.shape}, but mask_fishers[0] has "
                f"{heads[0].shape} and {neurons[0].shape}"
            )
        heads.append(h)
        neurons.append(n)
    for arrs in (heads, neurons):
        all_zero = np.all(np.stack(arrs) == 0, axis=0)
        if all_zero.any():
            for a in arrs:
                a[all_zero] = 1.0 if mode in ("none", LEGACY_L2) else float(a.mean())
    return heads, neurons


def _unit_rows(x: np.ndarray, floor: float) -> np.ndarray:
    """Each row (one layer's heads or neurons) divided by its mean, plus ``floor``; an all-zero row stays 0."""
    mean = x.mean(axis=1, keepdims=True)
    return np.where(mean > 0, x / np.where(mean > 0, mean, 1.0), x) + floor * (mean > 0)


def fisher_nodes(
    bodies: Sequence[Body],
    mask_fishers: Sequence[Any],
    mapping: NodeMapping = "reference",
    lam: Optional[Sequence[float]] = None,
    normalize: Any = False,
    num_heads: Optional[int] = None,
    floor: float = 0.0,
    gamma: float = 1.0,
) -> dict[str, Any]:
    """Fisher mask nodes merge (Thennal D K, Nathan, M S; LREC-COLING 2024, arXiv 2403.09891).

    ``theta = sum_j lam_j w_j theta_j / sum_j lam_j w_j`` elementwise, with ``w_j`` the weight tree
    :func:`node_weights` builds from model j's node weights: its mask Fisher (``.head [L, H]``,
    ``.neuron [L, I]``) tempered by ``gamma``, normalised per ``normalize``, raised by ``floor``
    and patched where every model's node is 0 — see :func:`normalized_node_fishers`; copies, never
    the inputs. The reference defaults are: no normalisation, no floor, ``gamma = 1``, uniform
    ``lam``; the normalised variant (``fisher_nodes_normalized``) uses ``normalize="layer"``
    (:data:`~fisher_jax.merging.methods.DEFAULT_NORMALIZE`), which kept each task's share of its
    own score at least as well as simple averaging on the demo pair, where "mean", "l2" and
    ``True`` did not.
    """
    _check_mapping(mapping)
    names, flats = _flatten_bodies(bodies)
    if len(mask_fishers) != len(bodies):
        raise FisherJaxError(f"got {len(mask_fishers)} mask Fishers for {len(bodies)} models")
    lam_ = _coefficients(lam, len(bodies))
    geom = None
    for j, mf in enumerate(mask_fishers):  # shapes against the body first: one clear error per model
        geom = _geometry(flats[0], *_node_arrays(mf, f"mask_fishers[{j}]"), num_heads, f"mask_fishers[{j}]")
    assert geom is not None
    heads, neurons = normalized_node_fishers(mask_fishers, normalize, gamma, floor)
    weights = [
        {k: lam_[j] * w for k, w in _weight_tree(flats[0], heads[j], neurons[j], geom, mapping, False).items()}
        for j in range(len(bodies))
    ]
    return weighted_average(bodies, [unflatten(w) for w in weights])


__all__ = ["MAPPINGS", "MaskFisher", "fisher_nodes", "node_weights", "normalized_node_fishers"]
