"""Diagonal Fisher information of the mask nodes (the seed paper) and of every body parameter.

Mask Fisher ("Fisher Mask Nodes for Language Model Merging", Thennal et al., LREC-COLING 2024,
SPEC §2): with all-ones head masks ``m_head [L, H]`` and neuron masks ``m_neuron [L, I]``,

    F[m] = (1/N) sum_n ( d/dm  loss(x_n, y_n; m) )^2

Full Fisher (Matena & Raffel, NeurIPS 2022): the same with ``m`` replaced by every body parameter
(embeddings, encoder, pooler; never the task head).

Estimators (``estimator=``):

* ``empirical`` — the true label's loss, squared per-example gradient, mean over examples.
* ``expected`` — classification: ``sum_c p(c|x) (d/dm log p(c|x))^2`` exactly, from ``C - 1``
  backward passes (the ``C`` gradients are linearly dependent; one pass for binary tasks);
  regression: ``(d pred / dm)^2 / sigma^2``, the Fisher of the Gaussian ``N(pred, sigma^2)``.
* ``sampled`` — one label per example from ``p(y|x)`` (regression: ``y ~ N(pred, sigma^2)``), drawn with
  ``jax.random`` from ``seed``, the batch number and the example's row: an unbiased, one-backward
  estimate of ``expected``.
* ``batch`` — the released code: the gradient of each batch's MEAN loss over its real examples,
  squared, SUMMED over batches (not divided by their number). Not a per-example Fisher; kept to
  reproduce the reference numbers (batch 32, 128 examples sampled with replacement).

Losses and constant factors. Classification: cross-entropy ``-log p(y|x)``. Regression
(``num_labels == 1``): ``empirical`` and ``batch`` use the training loss ``(pred - y)^2`` (mean
over the batch for ``batch``) exactly as the reference code did (Hugging Face's ``MSELoss``), so
their squared gradients carry a factor ``4 (pred - y)^2``; ``expected`` and ``sampled`` use the
Gaussian log-likelihood ``-(y - pred)^2 / (2 sigma^2)``, so ``sampled`` is an unbiased estimate
of ``expected = (d pred/dm)^2 / sigma^2``. The noise variance ``sigma^2`` is the maximum-likelihood
one, ``mean_n (pred_n - y_n)^2`` over the statistics' own examples, accumulated in the same pass;
the sums are divided by it at the end (it is one constant per model, so this is exact), and it is
recorded as ``meta["noise_variance"]`` (``noise_variance=`` fixes it instead; 1.0 gives the
unit-variance Fisher of earlier versions). Regression and classification Fishers are still on
different scales (SPEC §5); ``meta["loss"]`` says which, and merges that mix them should normalise.

How it is computed. A :class:`Target` names what is differentiated: the mask nodes
(:class:`MaskTarget`), the whole body (:class:`BodyTarget`, one gradient per batch) or the body with
its word-embedding table replaced by the rows it looked up (:class:`BodyRowsTarget`, per-example
gradients: the squares go to the table's rows by a scatter, :func:`first_occurrence_sum`, so no
dense ``[V, E]`` gradient exists per example). Each estimator family has one step function:
:func:`per_example_step` (``empirical``, ``expected``, ``sampled``: ``logits, pullback =
jax.vjp(f, v)`` with the estimator's cotangents, vmapped over a chunk of examples) and
:func:`batch_step` (the gradient of the batch's loss, added up a chunk of rows at a time).
Models run in eval mode (deterministic, no dropout); rows with ``weights == 0`` (padding)
contribute exactly nothing. Chunks bound the working set: for the full Fisher, memory; for the
mask Fisher on CPUs, speed (:mod:`fisher_jax.backend` holds the per-platform choices). One jitted
step per batch adds the batch's squared gradients to each device's running sums, which stay on
the devices and are added and read back once, at the end. Data parallelism and sharded
parameters: see :mod:`.sharding`.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from .. import tree
from ..backend import policy_for_mesh
from ..errors import FisherJaxError
from ..models.config import ArchConfig
from ..models.model import module_for, ones_masks, variables
from .. import parallel as par
from . import sharding as sh
from .checkpoint import Checkpointer
from .fingerprints import base_meta, fingerprint
from .records import ESTIMATORS, FullFisher, MaskFisher, check_estimator, loss_name

Batch = Mapping[str, Any]


# --------------------------------------------------------------------------- losses and cotangents
def example_loss(logits: jax.Array, label: jax.Array, regression: bool) -> jax.Array:
    """Training loss of one example: ``-log softmax(logits)[y]``, or ``(pred - y)^2`` for regression."""
    if regression:
        return jnp.square(logits[0] - label)
    return -jax.nn.log_softmax(logits)[label]


def _squared_pullback(pullback, logits: jax.Array) -> Callable[[jax.Array], Any]:
    """``ct -> (J^T ct)^2``: the squared gradient for one cotangent of the logits."""

    def sq(ct: jax.Array) -> Any:
        (g,) = pullback(ct.astype(logits.dtype))
        return jax.tree_util.tree_map(jnp.square, g)

    return sq


def _empirical_squares(pullback, logits, v, label, key, regression, class_loop) -> Any:
    """``(d/dv loss(x, y))^2`` for the true label ``y``."""
    return _squared_pullback(pullback, logits)(jax.grad(example_loss)(logits, label, regression))


def _sampled_squares(pullback, logits, v, label, key, regression, class_loop) -> Any:
    """``(d/dv loss(x, y~))^2`` for one label drawn from the model: ``y~ ~ p(y|x)``, or for
    regression ``y~ = pred + eps`` (``d/dpred`` of ``(y~ - pred)^2 / 2`` is ``-eps``)."""
    sq = _squared_pullback(pullback, logits)
    if regression:
        return sq(-jax.random.normal(key, logits.shape, logits.dtype))
    y = jax.random.categorical(key, logits)
    return sq(jax.grad(example_loss)(logits, y, regression))


def _expected_squares(pullback, logits, v, label, key, regression, class_loop) -> Any:
    """``E_{y ~ p(y|x)} (d/dv log p(y|x))^2``: exact; regression: ``(d pred/dv)^2`` (unit variance,
    since ``E[(y - pred)^2] = 1`` under ``N(pred, 1)``)."""
    if regression:
        return _squared_pullback(pullback, logits)(jnp.ones_like(logits))
    return _expected_classification(pullback, logits, v, class_loop)


_SQUARES: dict[str, Callable[..., Any]] = {
    "empirical": _empirical_squares,
    "sampled": _sampled_squares,
    "expected": _expected_squares,
}


def squared_grads(
    f: Callable[[Any], jax.Array],
    v: Any,
    label: jax.Array,
    key: jax.Array,
    estimator: str,
    regression: bool,
    class_loop: str = "vmap",
    linear: Optional[Callable[[Any], Any]] = None,
    with_logits: bool = False,
) -> Any:
    """One example's Fisher contribution ``(d/dv loss)^2`` (a tree like ``v``) for a per-example ``estimator``.

    ``f(v)`` is the example's logits ``[C]``. One forward pass; the pullback is applied to
    ``dloss/dlogits`` (``empirical``, ``sampled``) or, for ``expected``, to ``e_c - p``
    (``d log p_c / dlogits``) for ``C - 1`` classes (see :func:`_expected_classification`).
    ``class_loop="scan"`` runs those classes one after another so that only two gradient-sized
    accumulators are alive (full Fisher); ``"vmap"`` batches them (mask Fisher). ``linear``: a
    linear map applied to every gradient before it is squared, keeping its tree and shapes.
    Regression's ``expected``/``sampled`` are for unit noise variance (callers divide by sigma^2).
    ``with_logits``: return ``(squares, logits)`` (the regression residuals need the prediction).
    """
    logits, vjp = jax.vjp(f, v)
    pullback = vjp if linear is None else (lambda ct: (linear(vjp(ct)[0]),))
    logits = jax.lax.stop_gradient(logits)
    out = _SQUARES[estimator](pullback, logits, v, label, key, regression, class_loop)
    return (out, logits) if with_logits else out


def _expected_classification(pullback, logits: jax.Array, v: Any, class_loop: str) -> Any:
    """Exact ``sum_c p_c g_c^2`` with ``g_c = J^T (e_c - p)`` (``d log p_c / dv``) from ``C - 1`` backward passes.

    The cotangents ``e_c - p`` are linearly dependent: ``sum_c p_c (e_c - p) = 0``, so
    ``sum_c p_c g_c = 0``. With ``r`` the most likely class (``p_r >= 1/C``, so dividing by it is
    stable), ``S1 = sum_{c != r} p_c g_c`` and ``S2 = sum_{c != r} p_c g_c^2``, we have
    ``g_r = -S1 / p_r`` and hence ``F = S2 + S1^2 / p_r`` — one backward pass for binary tasks
    (as cheap as ``empirical``), two for three classes.
    """
    p = jax.nn.softmax(logits.astype(jnp.float32))
    C = p.shape[0]
    r = jnp.argmax(p)
    others = (r + 1 + jnp.arange(C - 1)) % C
    cts = jnp.eye(C, dtype=jnp.float32)[others] - p[None, :]  # row k: d log p_{others[k]} / d logits
    po = p[others]

    def grad(ct):
        return pullback(ct.astype(logits.dtype))[0]

    if class_loop == "vmap":
        gs = jax.vmap(grad)(cts)
        s1 = jax.tree_util.tree_map(lambda g: jnp.tensordot(po, g, axes=1, precision="highest"), gs)
        s2 = jax.tree_util.tree_map(lambda g: jnp.tensordot(po, g * g, axes=1, precision="highest"), gs)
    else:  # one class at a time: two gradient-sized accumulators instead of C - 1 gradients

        def body(acc, xs):
            (s1, s2), (ct, pc) = acc, xs
            g = grad(ct)
            s1 = jax.tree_util.tree_map(lambda a, x: a + pc * x, s1, g)
            s2 = jax.tree_util.tree_map(lambda b, x: b + pc * x * x, s2, g)
            return (s1, s2), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, v)
        (s1, s2), _ = jax.lax.scan(body, (zeros, zeros), (cts, po))
    return jax.tree_util.tree_map(lambda a, b: b + a * a / p[r], s1, s2)


def _weighted_row_sum(w: jax.Array, c: jax.Array, unrolled_rows: int = 64) -> jax.Array:
    """``sum_n w_n c_n`` over the leading axis, with padding rows (w == 0) zeroed, NaN or not.

    Up to ``unrolled_rows`` rows (:class:`fisher_jax.backend.BackendPolicy`) the sum is a chain
    of adds, which fuses into one elementwise loop where a reduce over the leading axis is slow.
    """
    wb = w.reshape(w.shape + (1,) * (c.ndim - 1))
    # where() and not just w * c: a padding row's 0 * inf would still be NaN.
    terms = jnp.where(wb > 0, wb * c, 0)
    if c.shape[0] > unrolled_rows:
        return jnp.sum(terms, axis=0)
    out = terms[0]
    for i in range(1, c.shape[0]):
        out = out + terms[i]
    return out


# --------------------------------------------------------------------------- what is differentiated
def first_occurrence_sum(d: jax.Array, ids: jax.Array) -> jax.Array:
    """``out[t] = sum_{s: ids[s] = ids[t]} d[s]`` at the first position ``t`` of each token, 0 elsewhere.

    One example's gradient of the word-embedding table is ``G[v] = sum_{t: ids[t] = v} d[t]``,
    with ``d [T, E]`` the gradient w.r.t. the looked-up rows; ``out`` holds every used row
    ``G[ids[t]]`` exactly once, so scattering ``out^2`` to ``ids`` adds ``G^2`` to a Fisher without
    the dense ``[V, E]`` per-example gradient (SPEC §2's full Fisher, same numbers).
    """
    first = jnp.argmax(ids[:, None] == ids[None, :], axis=1)  # index of each token's first occurrence
    return jax.ops.segment_sum(d, first, num_segments=ids.shape[0])


def _shapes(tree_: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), tree_)


def _inputs(rows: Batch) -> tuple:
    return rows["input_ids"], rows["attention_mask"], rows["token_type_ids"]


@dataclasses.dataclass(frozen=True)
class Target:
    """What a Fisher pass differentiates, and how one chunk's per-example squares join the sums.

    ``value(params, T)`` is the differentiated value ``v``; ``logits(params, v, rows)`` the model's
    output as a function of it; ``linear(g, ids)`` maps one example's gradient to what is squared;
    ``add(sums, squares [c, ...], weights [c], ids [c, T])`` adds a chunk's weighted squares.
    """

    arch: ArchConfig
    unrolled_rows: int = 64

    @property
    def module(self):
        return module_for(self.arch)

    def sum_shapes(self, params: Any) -> Any:
        """Shapes of the running sums."""
        return _shapes(params["body"])

    def value(self, params: Any, seq_len: int) -> Any:
        return params["body"]

    def logits(self, params: Any, v: Any, rows: Batch) -> jax.Array:
        return self.module.apply(variables({"body": v, "head": params["head"]}), *_inputs(rows))

    def linear(self, g: Any, ids: jax.Array) -> Any:
        return g

    def add(self, acc: Any, sq: Any, w: jax.Array, ids: jax.Array) -> Any:
        return jax.tree_util.tree_map(lambda a, t: a + _weighted_row_sum(w, t, self.unrolled_rows), acc, sq)


class BodyTarget(Target):
    """Every body parameter, the word-embedding table included (the ``batch`` estimator)."""


class MaskTarget(Target):
    """The head and neuron mask nodes, at ``m = 1``."""

    def sum_shapes(self, params: Any) -> Any:
        return _shapes(ones_masks(self.arch))

    def value(self, params: Any, seq_len: int) -> Any:
        return ones_masks(self.arch)

    def logits(self, params: Any, v: Any, rows: Batch) -> jax.Array:
        return self.module.apply(variables(params, v), *_inputs(rows))


class BodyRowsTarget(Target):
    """Every body parameter for per-example gradients: the word-embedding table is replaced by the
    ``T`` rows it looks up (Flax's ``perturb`` in ``Embeddings``), whose squares are scattered to
    the table's rows (:func:`first_occurrence_sum`). A dense ``[V, E]`` gradient per example would
    cost more than the rest of a small model's body."""

    def value(self, params: Any, seq_len: int) -> Any:
        emb = dict(params["body"]["embeddings"])
        table = emb.pop("word_embeddings")["embedding"]
        return {"rest": {**params["body"], "embeddings": emb},
                "word_rows": jnp.zeros((seq_len, table.shape[1]), jnp.float32)}

    def logits(self, params: Any, v: Any, rows: Batch) -> jax.Array:
        rest = v["rest"]
        body = {**rest, "embeddings": {**rest["embeddings"],
                                       "word_embeddings": params["body"]["embeddings"]["word_embeddings"]}}
        return self.module.apply({"params": {"body": body, "head": params["head"]},
                                  "perturbations": {"body": {"embeddings": {"word_rows": v["word_rows"]}}}},
                                 *_inputs(rows))

    def linear(self, g: Any, ids: jax.Array) -> Any:
        return {"rest": g["rest"], "word_rows": first_occurrence_sum(g["word_rows"], ids)}

    def add(self, acc: Any, sq: Any, w: jax.Array, ids: jax.Array) -> Any:
        emb = dict(acc["embeddings"])
        table = emb.pop("word_embeddings")["embedding"]
        out = super().add({**acc, "embeddings": emb}, sq["rest"], w, ids)
        rows = jnp.where(w[:, None, None] > 0, w[:, None, None] * sq["word_rows"], 0)  # [c, T, E]
        table = table.at[ids.reshape(-1)].add(rows.reshape(-1, rows.shape[-1]))
        return {**out, "embeddings": {**out["embeddings"], "word_embeddings": {"embedding": table}}}


def target_for(arch: ArchConfig, wrt: str, per_example: bool, unrolled_rows: int = 64) -> Target:
    """The mask nodes (``wrt="masks"``) or the body parameters (``"body"``; per-example or per-batch)."""
    if wrt == "masks":
        return MaskTarget(arch, unrolled_rows)
    return (BodyRowsTarget if per_example else BodyTarget)(arch, unrolled_rows)


# --------------------------------------------------------------------------- one step per estimator family
def default_mask_chunk(mesh: Mesh) -> Optional[int]:
    """Per-device chunk of the mask Fisher on ``mesh``'s platform (:mod:`fisher_jax.backend`)."""
    return policy_for_mesh(mesh).mask_chunk


_COUNTERS = {"weight": np.float32, "count": np.int32}
# Regression's expected/sampled also sum the squared residuals, for the noise variance.
_RESIDUAL_COUNTERS = {**_COUNTERS, "sse": np.float32}


def tracks_residuals(regression: bool, estimator: str) -> bool:
    """Whether a pass estimates the Gaussian noise variance (regression ``expected``/``sampled``)."""
    return bool(regression) and estimator in ("expected", "sampled")


def _counters(residuals: bool) -> dict[str, Any]:
    return _RESIDUAL_COUNTERS if residuals else _COUNTERS


def _over_chunks(fn: Callable[[Any, Any], Any], acc: Any, xs: Any, b: int, c: int) -> Any:
    """``acc = fn(acc, rows)`` for each chunk of ``c`` of the ``b`` rows of ``xs``, in order."""
    if c >= b:
        return fn(acc, xs)
    split = lambda a: a.reshape((b // c, c) + a.shape[1:])  # noqa: E731
    return jax.lax.scan(lambda a, x: (fn(a, x), None), acc, jax.tree_util.tree_map(split, xs))[0]


def _batch_counts(w: jax.Array, rows: Any = par.AXIS) -> tuple[jax.Array, jax.Array]:
    """The batch's total weight and number of real rows, over every device (``rows``: the mesh
    axes the rows are split over)."""
    real = w > 0
    weight = jax.lax.psum(jnp.sum(jnp.where(real, w, 0)), rows)
    count = jax.lax.psum(jnp.sum(real.astype(jnp.int32)), rows)
    return weight, count


@dataclasses.dataclass(frozen=True)
class ModelSplit:
    """How one step sees a mesh with a ``"model"`` axis (built at trace time from the global shapes):
    ``params`` / ``sums``, the ``PartitionSpec`` trees of the parameters
    (:func:`fisher_jax.parallel.param_specs`) and of the running sums (:func:`.sharding.sums_spec`)."""

    params: Any
    sums: Any

    @classmethod
    def of(cls, mesh: Mesh, params: Any, sums: Any, like_params: bool) -> "ModelSplit":
        return cls(par.param_specs(params, par.model_parallel(mesh)),
                   jax.tree_util.tree_map(lambda s: sh.sums_spec(mesh, s.shape[1:], like_params), sums))


def _local_sums(state: Any) -> Any:
    return jax.tree_util.tree_map(lambda s: s[0], state["sums"])  # this device's running sums


def _next_state(state: Any, acc: Any, weight: jax.Array, count: jax.Array, **extra: Any) -> dict[str, Any]:
    return {"sums": jax.tree_util.tree_map(lambda s: s[None], acc),
            "weight": state["weight"] + weight, "count": state["count"] + count, **extra}


def per_example_step(target: Target, estimator: str, regression: bool, chunk: Optional[int],
                     residuals: bool, rows: Any = par.AXIS, split: Optional[ModelSplit] = None) -> Callable:
    """``shard_fn(state, params, batch, key)`` of ``empirical``/``expected``/``sampled``:
    ``sums += sum_n w_n (d/dv loss_n)^2`` over this device's rows, ``chunk`` examples at a time.

    The key of row ``n`` is ``fold_in(key, global row n)``, the same on any mesh. ``residuals``:
    also ``sse += sum_n w_n (pred_n - y_n)^2`` from the pass's own forward. ``rows``: the mesh
    axes the batch rows are split over; ``split`` (a ``"model"`` axis): the parameters arrive
    split and are gathered, and each chunk's squares reach sums split over ``"model"`` by a
    reduce-scatter (:func:`.sharding.add_to_sums`).
    """
    class_loop = "vmap" if isinstance(target, MaskTarget) else "scan"

    def per_example(params, v, row, key):
        # The model gets the row itself, [T], not a batch of one: under vmap a size-1 batch axis
        # stays in the mask gradients' reductions ([c, 1, T, I] -> [c, 1, I]), which XLA:CPU runs slowly.
        f = lambda vv: target.logits(params, vv, row)  # noqa: E731
        return squared_grads(f, v, row["labels"], key, estimator, regression, class_loop,
                             linear=lambda g: target.linear(g, row["input_ids"]), with_logits=residuals)

    def shard_fn(state, params, batch, key):
        if split is not None:
            params = sh.gather_params(params, split.params)
        acc = _local_sums(state)
        weight, count = _batch_counts(batch["weights"], rows)
        b, seq_len = batch["input_ids"].shape
        v = target.value(params, seq_len)
        row_ids = jnp.arange(b) + jax.lax.axis_index(rows) * b  # global row: same keys on any mesh
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(row_ids)

        def add(carry, rows_keys):
            acc, sse = carry
            rb, kb = rows_keys
            out = jax.vmap(per_example, in_axes=(None, None, 0, 0))(params, v, rb, kb)
            if residuals:  # (pred - y)^2 of the real rows, from the pass's own forward
                out, logits = out
                r = logits[:, 0] - rb["labels"]
                sse = sse + jnp.sum(jnp.where(rb["weights"] > 0, rb["weights"] * r * r, 0))
            if split is None:
                return target.add(acc, out, rb["weights"], rb["input_ids"]), sse
            zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), target.sum_shapes(params))
            return sh.add_to_sums(acc, target.add(zeros, out, rb["weights"], rb["input_ids"]), split.sums), sse

        acc, sse = _over_chunks(add, (acc, jnp.zeros((), jnp.float32)), (batch, keys), b, b if chunk is None else chunk)
        extra = {"sse": state["sse"] + jax.lax.psum(sse, rows)} if residuals else {}
        return _next_state(state, acc, weight, count, **extra)

    return shard_fn


def batch_step(target: Target, regression: bool, chunk: Optional[int], rows: Any = par.AXIS,
               split: Optional[ModelSplit] = None) -> Callable:
    """``shard_fn(state, params, batch, key)`` of the ``batch`` estimator:
    ``sums += (d/dv mean_batch loss)^2``, the batch's gradient summed over devices and ``chunk``-row
    pieces before it is squared, added once (on device 0); an all-padding batch adds 0. ``rows``,
    ``split``: as in :func:`per_example_step` (a split leaf's total is reduce-scattered and added
    on ``"data"`` index 0, :func:`.sharding.total_over_rows`)."""

    def shard_fn(state, params, batch, key):
        if split is not None:
            params = sh.gather_params(params, split.params)
        acc = _local_sums(state)
        weight, count = _batch_counts(batch["weights"], rows)
        b, _ = batch["input_ids"].shape
        v = target.value(params, None)

        def total_loss(vv, rb):
            logits = target.logits(params, vv, rb)
            losses = jax.vmap(lambda lg, y: example_loss(lg, y, regression))(logits, rb["labels"])
            return jnp.sum(jnp.where(rb["weights"] > 0, rb["weights"] * losses, 0))

        g = _over_chunks(lambda a, rb: jax.tree_util.tree_map(jnp.add, a, jax.grad(total_loss)(v, rb)),
                         jax.tree_util.tree_map(jnp.zeros_like, v), batch, b, b if chunk is None else chunk)
        denom = jnp.where(weight > 0, weight, 1.0)
        if split is None:
            g = jax.lax.psum(g, rows)  # the whole batch's gradient
            keep = (weight > 0) & (jax.lax.axis_index(rows) == 0)
            acc = jax.tree_util.tree_map(lambda a, x: a + jnp.where(keep, jnp.square(x / denom), 0), acc, g)
        else:
            g, first = sh.total_over_rows(g, split.sums, rows)
            acc = jax.tree_util.tree_map(lambda a, x, f: a + jnp.where((weight > 0) & f, jnp.square(x / denom), 0),
                                         acc, g, first)
        return _next_state(state, acc, weight, count)

    return shard_fn


@functools.lru_cache(maxsize=64)
def fisher_step(arch: ArchConfig, estimator: str, wrt: str, mesh: Mesh, chunk: Optional[int], residuals: bool = False):
    """The jitted ``(state, params, batch, seed, index) -> (state, token)`` of one Fisher pass.

    ``state = {"sums": per-device sums (see sharding.py), "weight": sum of weights, "count": real
    examples}``; ``wrt`` is ``"masks"`` or ``"body"``. ``chunk``: per-device rows whose
    per-example gradients (``batch``: whose summed gradient) are computed together (``None``: the
    whole local batch at once). ``residuals`` (regression expected/sampled): the state also has
    ``"sse"``, the weighted sum of ``(pred - y)^2`` (:func:`tracks_residuals`). ``estimator`` is
    trusted here: the public functions check it (:func:`check_estimator`). A mesh with a
    ``"model"`` axis takes parameters split by :func:`fisher_jax.parallel.place_params`, gathers
    them inside the step and splits the rows over every device (:mod:`.sharding`).
    """
    policy = policy_for_mesh(mesh)
    regression = arch.is_regression
    target = target_for(arch, wrt, estimator != "batch", policy.unrolled_rows)
    rows = par.row_axes(mesh)

    def shard_fn_for(split: Optional[ModelSplit]) -> Callable:
        if estimator == "batch":
            return batch_step(target, regression, chunk, rows, split)
        return per_example_step(target, estimator, regression, chunk, residuals, rows, split)

    if not par.has_model_axis(mesh):  # parameters replicated (1-D "data" mesh)
        spec = sh.state_spec(_counters(residuals))
        replicated = sh.per_shard(shard_fn_for(None), mesh, in_specs=(spec, P(), P(par.AXIS), P()), out_specs=spec)

    def step(state, params, batch, seed, index):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
        if par.has_model_axis(mesh):  # the specs follow the global shapes, known here, at trace time
            split = ModelSplit.of(mesh, params, state["sums"], like_params=wrt == "body")
            spec = sh.state_spec(_counters(residuals), split.sums)
            sharded = sh.per_shard(shard_fn_for(split), mesh, in_specs=(spec, split.params, P(rows), P()),
                                   out_specs=spec)
        else:
            sharded = replicated
        new = sharded(state, params, batch, key)
        return new, new["count"] + 0  # a small separate output the host can wait on

    return jax.jit(step, donate_argnums=(0,))


def _init_state(arch: ArchConfig, wrt: str, params: Any, mesh: Mesh, residuals: bool = False) -> sh.StateInit:
    return sh.init_state(mesh, target_for(arch, wrt, True).sum_shapes(params), _counters(residuals),
                         like_params=wrt == "body")


# --------------------------------------------------------------------------- one pass
def _check_noise_variance(noise_variance: Optional[float]) -> Optional[float]:
    if noise_variance is None:
        return None
    nv = float(noise_variance)
    if not (np.isfinite(nv) and nv > 0):
        raise FisherJaxError(f"noise_variance must be finite and > 0, got {noise_variance}")
    return nv


def _check_chunk(chunk_size: Optional[int]) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise FisherJaxError(f"chunk_size must be >= 1, got {chunk_size}")


def _run(model, batches, estimator, seed, mesh, checkpoint_dir, checkpoint_every, progress, total,
         wrt: str, chunk: Optional[int], desc: str, noise_variance: Optional[float] = None):
    """``(sums, real examples, batches consumed, extra metadata)`` of one Fisher pass.

    ``estimator``, ``chunk`` and ``noise_variance`` are checked by the caller. Regression
    ``expected``/``sampled``: the sums are divided by the noise variance, estimated as
    ``sigma^2 = sum_n w_n (pred_n - y_n)^2 / sum_n w_n`` unless ``noise_variance`` is given.
    """
    gaussian = tracks_residuals(model.arch.is_regression, estimator)
    residuals = gaussian and noise_variance is None
    mesh = par.resolve_mesh(mesh)
    n_dev = par.num_row_shards(mesh)  # rows go to every device (with a "model" axis too)
    params = par.place_params(model.params, mesh)

    def step_for(rows: int):
        c = None
        multiple = n_dev
        if chunk is not None:
            c = max(1, min(int(chunk), -(-rows // n_dev)))  # no bigger than a device's share
            multiple = n_dev * c
        jitted = fisher_step(model.arch, estimator, wrt, mesh, c, residuals)
        return (lambda state, batch, s, i: jitted(state, params, batch, s, i)), multiple

    ckpt = None
    if checkpoint_dir is not None:
        run = {"kind": desc, "estimator": estimator, "seed": int(seed), "fingerprint": fingerprint(model)}
        ckpt = Checkpointer(checkpoint_dir, run, every=checkpoint_every)
    state, consumed = sh.accumulate(
        step_for, _init_state(model.arch, wrt, model.params, mesh, residuals), batches, mesh=mesh,
        regression=model.arch.is_regression, num_labels=model.arch.num_labels, seed=seed,
        needs_labels=estimator in ("empirical", "batch") or residuals, progress=progress, total=total, desc=desc,
        checkpointer=ckpt,
    )
    count = int(state["count"])
    if count == 0:
        raise FisherJaxError(f"{desc}: no examples (every batch was empty or had weight 0)")
    sums = state["sums"]
    if estimator != "batch":  # the mean over examples (weights are 0/1 in practice)
        sums = jax.tree_util.tree_map(lambda s: np.asarray(s / state["weight"], np.float32), sums)
    else:
        sums = jax.tree_util.tree_map(lambda s: np.asarray(s, np.float32), sums)
    extra: dict[str, Any] = {"loss": loss_name(model.arch.is_regression)}
    if gaussian:
        if residuals:
            noise_variance = float(state["sse"]) / float(state["weight"])
            if not (np.isfinite(noise_variance) and noise_variance > 0):
                raise FisherJaxError(
                    f"{desc}: the model's residual variance on these examples is {noise_variance}, so the Gaussian "
                    "noise variance cannot be estimated; pass noise_variance="
                )
        sums = jax.tree_util.tree_map(lambda s: np.asarray(s / noise_variance, np.float32), sums)
        extra.update(noise_variance=noise_variance, noise_variance_estimated=residuals)
    return sums, count, consumed, extra


# --------------------------------------------------------------------------- validation of the result
def _check_mask_fisher(head: np.ndarray, neuron: np.ndarray) -> None:
    for name, arr in (("head", head), ("neuron", neuron)):
        bad = ~np.isfinite(arr)
        if bad.any():
            layer = int(np.argwhere(bad)[0][0])
            raise FisherJaxError(
                f"mask Fisher is not finite (NaN/inf) in layer {layer} ({name} masks): check the model's "
                "parameters and inputs"
            )
    if not head.any() and not neuron.any():
        raise FisherJaxError(
            "mask Fisher is zero everywhere: the loss does not depend on the masks (zero classifier weights? "
            "constant inputs?)"
        )
    dead = [f"layer {l} ({name})" for l in range(head.shape[0])
            for name, arr in (("heads", head), ("neurons", neuron)) if not arr[l].any()]
    if dead:
        warnings.warn(f"mask Fisher is zero for every mask of {', '.join(dead)}", stacklevel=3)


def _check_full_fisher(flat: Mapping[str, np.ndarray]) -> None:
    for name, arr in flat.items():
        if not np.all(np.isfinite(arr)):
            raise FisherJaxError(f"full Fisher is not finite (NaN/inf) in '{name}': check the model's parameters")
    if not any(arr.any() for arr in flat.values()):
        raise FisherJaxError("full Fisher is zero everywhere: the loss does not depend on the body parameters")
    dead = [name for name, arr in flat.items() if not arr.any()]
    if dead:
        warnings.warn(f"full Fisher is zero for every entry of {', '.join(dead)}", stacklevel=3)


# --------------------------------------------------------------------------- public API
def mask_fisher(
    model: Any,
    batches: Iterable[Batch],
    *,
    estimator: str = "empirical",
    seed: int = 0,
    mesh: Optional[Mesh] = None,
    checkpoint_dir: Optional[str] = None,
    progress: bool = True,
    total: Optional[int] = None,
    checkpoint_every: int = 50,
    chunk_size: Optional[int] = None,
    task: Optional[str] = None,
    split: Optional[str] = None,
    noise_variance: Optional[float] = None,
) -> MaskFisher:
    """Diagonal Fisher of the head and neuron mask nodes (Thennal et al. 2024; SPEC §2).

    ``F[m] = (1/N) sum_n (d/dm loss_n)^2`` at ``m = 1`` for ``empirical``/``expected``/``sampled``
    (N = real examples), or ``sum_batches (d/dm mean_batch loss)^2`` for ``batch``; see the module
    docstring for the estimators and constant factors. Every argument after ``batches`` is a keyword.

    ``batches``: iterable of dicts of numpy arrays (``input_ids``, ``attention_mask``,
    ``token_type_ids`` ``[B, T]``, ``labels`` ``[B]``, optional ``weights`` ``[B]``: 0 = padding).
    ``mesh``: devices to split batches over (default: all, axis ``"data"``). ``checkpoint_dir``:
    save the running sums every ``checkpoint_every`` batches with orbax and, when it already holds a
    checkpoint of the same run, skip the batches it consumed and continue (batches must be
    deterministic). ``total``: number of batches, for the progress bar. ``chunk_size``: examples
    per device whose gradients are computed together (default: the platform's
    :attr:`fisher_jax.backend.BackendPolicy.mask_chunk` — a few on CPUs, the whole local batch on
    GPU/TPU); ``batch`` adds the chunks' gradients before squaring.
    ``noise_variance``: regression ``expected``/``sampled`` only, the Gaussian's sigma^2 (default:
    the residual variance on these examples, which then need labels); see the module docstring.

    Returns ``MaskFisher(head [L, H], neuron [L, I], num_examples, meta)`` (float32 numpy).
    Raises ``FisherJaxError`` for no examples, a non-finite Fisher (naming the layer) or a Fisher
    that is zero everywhere; warns about layers whose masks all have zero Fisher.
    """
    check_estimator(estimator)
    _check_chunk(chunk_size)
    noise_variance = _check_noise_variance(noise_variance)
    mesh = par.resolve_mesh(mesh)
    if chunk_size is None:
        chunk_size = default_mask_chunk(mesh)
    sums, count, consumed, extra = _run(model, batches, estimator, seed, mesh, checkpoint_dir, checkpoint_every,
                                        progress, total, wrt="masks", chunk=chunk_size, desc="mask_fisher",
                                        noise_variance=noise_variance)
    head, neuron = sums["head"], sums["neuron"]
    _check_mask_fisher(head, neuron)
    meta = base_meta("mask_fisher", model, estimator, num_examples=count, num_batches=consumed, seed=int(seed),
                     task=task, split=split, **extra)
    return MaskFisher(head=head, neuron=neuron, num_examples=count, meta=meta)


def full_fisher(
    model: Any,
    batches: Iterable[Batch],
    *,
    estimator: str = "expected",
    chunk_size: int = 8,
    seed: int = 0,
    mesh: Optional[Mesh] = None,
    checkpoint_dir: Optional[str] = None,
    progress: bool = True,
    total: Optional[int] = None,
    checkpoint_every: int = 50,
    task: Optional[str] = None,
    split: Optional[str] = None,
    noise_variance: Optional[float] = None,
) -> FullFisher:
    """Diagonal Fisher of every body parameter (Matena & Raffel 2022; SPEC §2), head excluded.

    Same estimators and normalisation as :func:`mask_fisher` (their default: ``expected``), but
    per-example gradients w.r.t. the whole body. They are computed ``chunk_size`` examples per
    device at a time (a ``lax.scan`` over chunks of a vmap), so memory is bounded by the chunk, not
    the batch: peak ~= ``chunk_size x P' x 4`` bytes of per-example gradients, with ``P'`` the body
    without its word-embedding table (whose per-example gradient is kept as the ``T`` looked-up rows;
    an upper bound: XLA fuses part of the square-and-sum) + ``2 x P x 4`` (sums, parameters) + one
    chunk's activations. For a bert-base-sized body (P ~= 110M, P' ~= 86M) at the default chunk 8
    that bound is ~2.8 GB + 0.9 GB. ``expected`` runs its ``C - 1`` backward passes one class at a
    time, with two gradient-sized accumulators per example; ``batch`` adds the gradients of
    ``chunk_size`` rows at a time into one gradient-sized accumulator and squares the batch's total.
    Every argument after ``batches`` is a keyword.

    ``noise_variance``: as for :func:`mask_fisher`.

    Returns ``FullFisher``: ``{"body": tree}`` shaped like ``model.params["body"]`` (float32 numpy),
    with ``.num_examples`` and ``.meta``.
    """
    check_estimator(estimator)
    if chunk_size is None:
        raise FisherJaxError("chunk_size must be >= 1, got None (the full Fisher always works in chunks)")
    _check_chunk(chunk_size)
    noise_variance = _check_noise_variance(noise_variance)
    sums, count, consumed, extra = _run(model, batches, estimator, seed, mesh, checkpoint_dir, checkpoint_every,
                                        progress, total, wrt="body", chunk=chunk_size, desc="full_fisher",
                                        noise_variance=noise_variance)
    _check_full_fisher(tree.flatten(sums))
    meta = base_meta("full_fisher", model, estimator, num_examples=count, num_batches=consumed, seed=int(seed),
                     task=task, split=split, chunk_size=int(chunk_size), **extra)
    return FullFisher(sums, num_examples=count, meta=meta)


__all__ = ["ESTIMATORS", "MaskFisher", "FullFisher", "BodyRowsTarget", "BodyTarget", "MaskTarget", "ModelSplit", "Target",
           "batch_step", "check_estimator", "example_loss", "fisher_step", "full_fisher", "mask_fisher",
           "per_example_step", "squared_grads", "target_for", "tracks_residuals"]
