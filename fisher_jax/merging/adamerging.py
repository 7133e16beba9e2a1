"""AdaMerging (Yang, Wang, Shen, Liu, Guo, Wang, Tao; ICLR 2024, "AdaMerging: Adaptive Model
Merging for Multi-Task Learning").

Task arithmetic whose coefficients are learnt without labels: with task vectors
``tau_j = theta_j - theta_0`` and coefficients ``lam_{j,g}`` per task ``j`` (task-wise) or per
task and layer group ``g`` (layer-wise: the embeddings, each encoder layer, the pooler),

    theta(lam) = theta_0 + sum_j lam_{j,g(p)} tau_j          (entry p of the body)
    min_lam  sum_j  mean_{x in D_j} H(softmax(f(x; theta(lam), head_j)))

where ``D_j`` are unlabelled inputs of task ``j`` and ``H`` the Shannon entropy of model j's
head on the merged body: a few Adam steps (optax) from ``lam = init``. Regression heads have
no predictive entropy and are left out of the objective.
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
    steps: int = 10,
    learning_rate: float = 1e-3,
    init: float = 0.3,
    diagnostics: Optional[dict] = None,
) -> dict[str, Any]:
    """AdaMerging: task arithmetic with ``lam`` learnt by entropy minimisation on unlabelled inputs.

    ``models``: the fine-tuned Models (their heads score the merged body); ``base``: the
    pre-trained body tree; ``batches[j]``: unlabelled inputs of task ``j`` (a list of batch dicts;
    labels unused, ``weights`` respected). ``granularity="task"`` learns one ``lam_j`` per model,
    ``"layer"`` one per model and layer group (:func:`layer_groups`); ``steps`` Adam steps of
    ``learning_rate`` from ``lam = init`` (the paper's 0.3), each over every task's batches.
    ``diagnostics["adamerging"]`` gets the learnt ``lam`` ([N, G]) and the objective per step.
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

    def objective(lam: jax.Array, inputs: list) -> jax.Array:
        body = unflatten(_merged(base32, tvs, lam, groups))
        total = 0.0
        for j, rows in zip(scored, inputs):
            module = module_for(models[j].arch)
            params = {"body": body, "head": models[j].params["head"]}
            for batch in rows:
                logits = module.apply(variables(params), batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                total = total + entropy(logits, batch["weights"]) / len(rows)
        return total

    lam = jnp.full((n, count if granularity == "layer" else 1), float(init), jnp.float32)
    opt = optax.adam(learning_rate)
    state = opt.init(lam)
    step = jax.jit(jax.value_and_grad(objective))
    history = []
    for _ in range(int(steps)):
        value, grad = step(lam, inputs)
        updates, state = opt.update(grad, state, lam)
        lam = optax.apply_updates(lam, updates)
        history.append(float(value))
    history.append(float(step(lam, inputs)[0]))  # the learnt lam's objective (the compiled step's value)
    if diagnostics is not None:
        diagnostics["adamerging"] = {"lam": np.asarray(lam).tolist(), "objective": history, "granularity": granularity}
    dtypes = {k: np.asarray(flats[0][k]).dtype for k in names}
    merged = _merged(base32, tvs, lam, groups)
    return unflatten({k: merged[k].astype(dtypes[k]) for k in names})


__all__ = ["adamerging", "entropy", "layer_groups"]
