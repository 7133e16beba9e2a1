"""AdaMerging (Yang, Wang, Shen, Liu, Guo, Wang, Tao; ICLR 2024, "AdaMerging: Adaptive Model
Merging for Multi-Task Learning").

Task arithmetic whose coefficients are learnt without labels: with task vectors
``tau_j = theta_j - theta_0`` and coefficients ``lam_{j,g}`` per task ``j`` (task-wise) or per
task and layer group ``g`` (layer-wise: the embeddings, each encoder layer, the pooler),

    theta(lam) = theta_0 + sum_j lam_{j,g(p)} tau_j          (entry p of the body)
    min_lam  sum_j  mean_{x in D_j} H(softmax(f(x; theta(lam), head_j)))

where ``D_j`` are unlabelled inputs of task ``j`` and ``H`` the Shannon entropy of model j's
head on the merged body, minimised by Adam (optax) from ``lam = init`` with one batch of each
task per step, as the paper does with its test batches. The paper runs 500 steps of learning
rate 1e-3 on batches of 16; the default here is a tenth of the steps at ten times the rate (the
same distance Adam can move ``lam``), a budget a CPU can afford. Regression heads have no
predictive entropy: they are left out of the objective, and their models' coefficients stay at
``init`` (nothing in the objective speaks for their task, so letting the classification tasks'
entropy move them would trade the regression task away unseen).
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import FisherJaxError
from ..tree import check_same_structure, flatten, unflatten
from .coefficients import layer_of


def entropy(logits: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum_b w_b H(softmax(logits_b)) / sum_b w_b``, ``H(p) = -sum_c p_c log p_c`` (nats)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    h = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.sum(weights * h) / jnp.maximum(jnp.sum(weights), 1.0)


def layer_groups(names: Sequence[str]) -> tuple[dict[str, int], int]:
    """``({path: group}, #groups)``: group 0 the embeddings, ``1 + l`` encoder layer ``l``, the last one the rest (pooler)."""
    layers = {k: layer_of(k) for k in names}
    count = max((l for l in layers.values() if l is not None), default=-1) + 1
    out = {}
    for k, l in layers.items():
        stripped = k[5:] if k.startswith("body/") else k
        out[k] = 1 + l if l is not None else (0 if stripped.startswith("embeddings") else count + 1)
    return out, count + 2


def _merged(base: Mapping[str, jax.Array], tvs: Sequence[Mapping[str, jax.Array]], lam: jax.Array,
            groups: Mapping[str, int]) -> dict[str, jax.Array]:
    """``theta_0 + sum_j lam[j, g] tau_j`` leaf by leaf (``lam`` is ``[N, G]``; task-wise has ``G = 1``)."""
    out = {}
    for k, b in base.items():
        g = groups[k] if lam.shape[1] > 1 else 0
        out[k] = b + sum(lam[j, g] * tv[k] for j, tv in enumerate(tvs))
    return out


def adamerging(
    models: Sequence[Any],
    base: Any,
    batches: Sequence[Iterable[Mapping[str, Any]]],
    granularity: Literal["task", "layer"] = "layer",
    steps: int = 50,
    learning_rate: float = 1e-2,
    init: float = 0.3,
    batch_size: Optional[int] = 16,
    diagnostics: Optional[dict] = None,
) -> dict[str, Any]:
    """AdaMerging: task arithmetic with ``lam`` learnt by entropy minimisation on unlabelled inputs.

    ``models``: the fine-tuned Models (their heads score the merged body); ``base``: the
    pre-trained body tree; ``batches[j]``: unlabelled inputs of task ``j`` (a list of batch dicts;
    labels unused, ``weights`` respected). ``granularity="task"`` learns one ``lam_j`` per model,
    ``"layer"`` one per model and layer group (:func:`layer_groups`); ``steps`` Adam steps of
    ``learning_rate`` from ``lam = init`` (the paper's 0.3), step ``s`` on batch ``s mod len(batches[j])``
    of every task (one compiled step per distinct combination of batch shapes). ``batch_size``
    splits larger batches into pieces of that many rows (the paper's 16); None keeps them.
    ``diagnostics["adamerging"]`` gets the learnt ``lam`` ([N, G]), each step's objective on its
    batches, and ``objective_all``: the objective over every batch at ``init`` and at the learnt ``lam``.
    """
    import optax

    n = len(models)
    if n < 2:
        raise FisherJaxError(f"adamerging needs at least two models, got {n}")
    if granularity not in ("task", "layer"):
        raise FisherJaxError(f"granularity must be 'task' or 'layer', got {granularity!r}")
    if not (isinstance(steps, (int, np.integer)) and steps >= 0):
        raise FisherJaxError(f"steps must be an integer >= 0, got {steps!r}")
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise FisherJaxError(f"learning_rate must be > 0, got {learning_rate}")
    if not np.isfinite(init):
        raise FisherJaxError(f"init must be finite, got {init}")
    if batch_size is not None and not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise FisherJaxError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
    if len(batches) != n:
        raise FisherJaxError(f"got {len(batches)} batch lists for {n} models")
    data = []
    for j, b in enumerate(batches):
        rows = [] if isinstance(b, Mapping) else list(b)
        if not rows:
            raise FisherJaxError(f"batches[{j}] must be a non-empty list of batch dicts (task {j}'s unlabelled inputs)")
        data.append(rows)
    from ..models.model import module_for, variables

    flats = [flatten(m.params["body"]) for m in models]
    bflat = flatten(base)
    for j in range(n):
        check_same_structure(bflat, flats[j], what=f"base and model {j} bodies")
    names = list(bflat)
    groups, count = layer_groups(names)
    base32 = {k: jnp.asarray(v, jnp.float32) for k, v in bflat.items()}
    tvs = [{k: jnp.asarray(f[k], jnp.float32) - base32[k] for k in names} for f in flats]
    scored = [j for j, m in enumerate(models) if not m.arch.is_regression]
    if not scored:
        raise FisherJaxError("adamerging minimises the entropy of classification heads; every model here is a regression")

    # Inputs are arguments of the jitted objective (not constants folded into the program).
    inputs = [[{"input_ids": np.asarray(b["input_ids"], np.int32), "attention_mask": np.asarray(b["attention_mask"], np.int32),
                "token_type_ids": np.asarray(b.get("token_type_ids", np.zeros_like(b["input_ids"])), np.int32),
                "weights": np.asarray(b.get("weights", np.ones(len(b["input_ids"]))), np.float32)} for b in data[j]]
              for j in scored]
    if batch_size is not None:  # pieces of batch_size rows; a piece of padding rows only is dropped
        inputs = [[{k: v[i:i + batch_size] for k, v in b.items()}
                   for b in rows for i in range(0, len(b["weights"]), batch_size)
                   if i == 0 or b["weights"][i:i + batch_size].sum() > 0] for rows in inputs]

    # The weights are arguments of the compiled step, not constants folded into its program.
    frozen = (base32, tvs, [models[j].params["head"] for j in scored])

    def objective(lam: jax.Array, frozen: tuple, batch_per_task: list, scale: jax.Array) -> jax.Array:
        base_w, tvs_w, heads = frozen
        body = unflatten(_merged(base_w, tvs_w, lam, groups))
        total = 0.0
        for t, (j, batch) in enumerate(zip(scored, batch_per_task)):
            params = {"body": body, "head": heads[t]}
            logits = module_for(models[j].arch).apply(variables(params), batch["input_ids"], batch["attention_mask"],
                                                      batch["token_type_ids"])
            total = total + scale[t] * entropy(logits, batch["weights"])
        return total

    opt = optax.adam(learning_rate)
    learnt = jnp.asarray([0.0 if m.arch.is_regression else 1.0 for m in models], jnp.float32)

    @jax.jit
    def step(lam: jax.Array, state: Any, frozen: tuple, batch_per_task: list, scale: jax.Array):
        value, grad = jax.value_and_grad(objective)(lam, frozen, batch_per_task, scale)
        grad = grad * learnt[:, None]  # zero gradients: Adam leaves those rows at init exactly
        updates, state = opt.update(grad, state, lam)
        return value, optax.apply_updates(lam, updates), state

    value_only = jax.jit(objective)
    ones = np.ones(len(inputs), np.float32)
    sizes = np.array([len(rows) for rows in inputs])

    def at(s: int) -> list:
        return [rows[s % len(rows)] for rows in inputs]

    def full_objective(lam: jax.Array) -> float:
        """Each task's mean entropy over all its batches, summed over tasks (the steps' batch
        combinations, so one forward program per combination)."""
        return sum(float(value_only(lam, frozen, at(s), np.where(s < sizes, 1.0 / sizes, 0.0).astype(np.float32)))
                   for s in range(int(sizes.max())))

    lam = jnp.full((n, count if granularity == "layer" else 1), float(init), jnp.float32)
    state = opt.init(lam)
    start = full_objective(lam) if diagnostics is not None else None
    history = []
    for s in range(int(steps)):
        value, lam, state = step(lam, state, frozen, at(s), ones)
        history.append(value)  # kept on the device: no host round trip per step
    if diagnostics is not None:
        diagnostics["adamerging"] = {"lam": np.asarray(lam).tolist(), "objective": [float(v) for v in history],
                                     "objective_all": [start, full_objective(lam)], "granularity": granularity}
    dtypes = {k: np.asarray(flats[0][k]).dtype for k in names}
    merged = _merged(base32, tvs, lam, groups)
    return unflatten({k: merged[k].astype(dtypes[k]) for k in names})


__all__ = ["adamerging", "entropy", "layer_groups"]
