"""RegMean Gram matrices of every Dense layer's input (Jin et al., ICLR 2023; SPEC §3).

For a Dense layer ``y = x W`` of the body that sees input rows ``x_t`` (tokens; for BERT's
pooler, one CLS vector per example):

    G = X^T X / #rows = (1/T) sum_t x_t x_t^T          [in, in], accumulated in float32

over the real tokens: rows with ``weights == 0`` never count, and with ``mask_padding=True``
(the default, and the correct choice) neither do padding tokens (``attention_mask == 0``).
``mask_padding=False`` counts padding tokens as the released code did. Query, key and value see
the same input, so they share one Gram: one array, under all three paths.

The inputs are captured with ``flax.linen.intercept_methods`` around the body's ``nn.Dense``
calls, inside one jitted step per batch; the running ``X^T X`` sums stay on the devices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from ..errors import FisherJaxError
from ..models.config import ArchConfig
from ..models.model import module_for, variables
from .. import parallel as par
from . import sharding as sh
from .checkpoint import Checkpointer
from .fingerprints import base_meta, fingerprint
from .records import Grams


def body_arch(arch: ArchConfig) -> ArchConfig:
    """``arch`` with the task head's fields fixed: Grams run the body only, so models of one body
    and different heads (a classification and a regression task) share one compiled step."""
    return dataclasses.replace(arch, num_labels=2, classifier_dropout=0.0, classifier_bias=True,
                               classifier_act="gelu", pooler_dropout=0.0, pooling="cls")


def capture_dense_inputs(fn):
    """Run ``fn()`` and return ``(output, [(body path, input), ...])`` for every body ``nn.Dense`` call.

    Paths drop the leading ``body/`` (``encoder/layer/0/attention/self/query``). The inputs are
    whatever the layer received (traced arrays inside jit), in call order.
    """
    captured: list[tuple[str, Any]] = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            path = context.module.path
            if path and path[0] == "body":
                captured.append(("/".join(path[1:]), args[0]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        out = fn()
    return out, captured


def _hidden(module, params, rows):
    # output="hidden" stops before the task head; the pooler still runs inside the body.
    return module.apply(variables(params), rows["input_ids"], rows["attention_mask"], rows["token_type_ids"],
                        output="hidden")


@functools.lru_cache(maxsize=None)
def dense_layout(arch: ArchConfig) -> tuple[tuple[tuple[str, int, bool], ...], dict[str, str], tuple[str, ...]]:
    """``((path, in_dim, per_token), ...)`` for the distinct inputs, ``{alias: owner}``, and every path in call order.

    Found by tracing the body once (abstractly): Dense layers called on the *same* array object
    (query/key/value) share a Gram; ``per_token`` is False for the pooler (``[B, in]`` input).
    """
    module = module_for(arch)
    rows = {k: jax.ShapeDtypeStruct((2, 4), jnp.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    layout: dict[str, Any] = {}

    def trace(p, r):
        _, caps = capture_dense_inputs(lambda: _hidden(module, p, r))
        owners: list[tuple[Any, str]] = []
        aliases: dict[str, str] = {}
        unique = []
        for path, x in caps:
            owner = next((name for obj, name in owners if obj is x), None)
            if owner is not None:
                aliases[path] = owner
                continue
            owners.append((x, path))
            unique.append((path, int(x.shape[-1]), x.ndim == 3))
        layout["unique"], layout["aliases"] = tuple(unique), aliases
        layout["order"] = tuple(path for path, _ in caps)
        return 0

    jax.eval_shape(trace, params, rows)
    return layout["unique"], layout["aliases"], layout["order"]


def _owners(arch: ArchConfig, modules: Optional[Iterable[str]]) -> Optional[tuple[str, ...]]:
    """The distinct-input paths behind ``modules`` (query/key/value -> query's), sorted; None: all.
    An unknown name fails with a did-you-mean."""
    if modules is None:
        return None
    from ..tree import did_you_mean

    unique, aliases, order = dense_layout(arch)
    known = set(order)
    owners = set()
    for name in modules:
        name = name[5:] if name.startswith("body/") else name
        if name not in known:
            raise FisherJaxError(f"gram: no body Dense layer '{name}'{did_you_mean(name, sorted(known))}")
        owners.add(aliases.get(name, name))
    if not owners:
        raise FisherJaxError("gram: modules is empty; pass None for every Dense layer")
    return tuple(sorted(owners))


@functools.lru_cache(maxsize=64)
def gram_step(arch: ArchConfig, mesh: Mesh, mask_padding: bool, modules: Optional[tuple[str, ...]] = None):
    """The jitted ``(state, params, batch, seed, index) -> (state, token)`` adding one batch's ``X^T X``
    (of the distinct inputs ``modules`` only, when given: XLA then drops the layers above them)."""
    module = module_for(arch)
    unique, _, _ = dense_layout(arch)
    wanted = {path for path, _, _ in unique if modules is None or path in modules}

    rows = par.row_axes(mesh)
    counters = ("tokens", "examples")
    split = par.has_model_axis(mesh)

    def shard_fn(state, params, batch, param_specs=None):
        if param_specs is not None:  # split over "model": every leaf whole for this step only
            params = sh.gather_params(params, param_specs)
        _, caps = capture_dense_inputs(lambda: _hidden(module, params, batch))
        real = (batch["weights"] > 0).astype(jnp.float32)  # [B]
        am = batch["attention_mask"].astype(jnp.float32)
        tok = real[:, None] * (am if mask_padding else jnp.ones_like(am))  # [B, T]
        sums = dict(state["sums"])
        done = set()
        for path, x in caps:
            if path not in wanted or path in done:
                continue
            done.add(path)
            x = x.astype(jnp.float32)
            m = tok if x.ndim == 3 else real
            # HIGHEST: no TF32/bf16 passes for the Gram itself on GPU/TPU.
            g = jnp.einsum("...i,...j->ij", x * m[..., None], x, precision=jax.lax.Precision.HIGHEST)
            sums[path] = sums[path] + g[None]  # this device's running sum (sharding.py)
        return {"sums": sums,
                "tokens": state["tokens"] + jax.lax.psum(jnp.sum(tok).astype(jnp.int32), rows),
                "examples": state["examples"] + jax.lax.psum(jnp.sum(real).astype(jnp.int32), rows)}

    # One Gram per device (leading axis over every row axis), never split like the parameters.
    spec = sh.state_spec(counters, P(rows))
    if not split:
        replicated = sh.per_shard(shard_fn, mesh, in_specs=(spec, P(), P(par.AXIS)), out_specs=spec)

    def step(state, params, batch, seed, index):
        del seed, index  # deterministic
        if split:  # the parameters' specs follow their global shapes, known here, at trace time
            specs = par.param_specs(params, par.model_parallel(mesh))
            new = sh.per_shard(lambda st, p, b: shard_fn(st, p, b, specs), mesh, in_specs=(spec, specs, P(rows)),
                               out_specs=spec)(state, params, batch)
        else:
            new = replicated(state, params, batch)
        return new, new["examples"] + 0

    return jax.jit(step, donate_argnums=(0,))


def gram_stats(
    model: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    mask_padding: bool = True,
    mesh: Optional[Mesh] = None,
    checkpoint_dir: Optional[str] = None,
    progress: bool = True,
    total: Optional[int] = None,
    checkpoint_every: int = 50,
    task: Optional[str] = None,
    split: Optional[str] = None,
    modules: Optional[Iterable[str]] = None,
) -> Grams:
    """RegMean Grams ``G = X^T X / #rows`` of every body Dense layer's input (SPEC §3).

    Layers: query/key/value (one shared Gram), attention output, FFN in and out, BERT's pooler
    (rows = examples, the CLS vectors) and ELECTRA's ``embeddings_project``; never the task head.
    Labels are not needed. ``mesh``, ``checkpoint_dir``, ``progress``, ``total`` as in
    :func:`fisher_jax.stats.fisher.mask_fisher`; every argument after ``batches`` is a keyword.
    ``modules``: body Dense paths to collect (default: all); the network is run only as far as
    the highest of them (RegMean++ collects one stage at a time).

    Returns ``Grams``: a flat dict ``{body Dense path: G [in, in]}`` (float32 numpy; q/k/v the same
    object) with ``num_tokens``, ``num_examples`` and ``meta``.
    """
    arch = model.arch
    mesh = par.resolve_mesh(mesh)
    n_dev = par.num_row_shards(mesh)  # rows go to every device (with a "model" axis too)
    unique, aliases, order = dense_layout(arch)
    owners = _owners(arch, modules)
    if owners is not None:
        unique = tuple(u for u in unique if u[0] in owners)
        aliases = {a: o for a, o in aliases.items() if o in owners}
        order = tuple(p for p in order if aliases.get(p, p) in owners)
    params = par.place_params({"body": model.params["body"]}, mesh)  # the head is never run
    jitted = gram_step(arch, mesh, bool(mask_padding), owners)

    def step_for(rows: int):
        # labels never reach the step: a regression task's float labels would be one more compilation
        return (lambda state, batch, s, i: jitted(state, params, {k: v for k, v in batch.items() if k != "labels"},
                                                  s, i)), n_dev

    ckpt = None
    if checkpoint_dir is not None:
        run = {"kind": "gram", "mask_padding": bool(mask_padding), "fingerprint": fingerprint(model),
               **({"modules": list(owners)} if owners is not None else {})}
        ckpt = Checkpointer(checkpoint_dir, run, every=checkpoint_every)
    init = sh.init_state(mesh, {p: jax.ShapeDtypeStruct((d, d), jnp.float32) for p, d, _ in unique},
                         {"tokens": np.int32, "examples": np.int32})
    state, consumed = sh.accumulate(
        step_for, init, batches, mesh=mesh,
        regression=model.arch.is_regression, num_labels=model.arch.num_labels, needs_labels=False, progress=progress,
        total=total, desc="gram", checkpointer=ckpt,
    )
    tokens, examples = int(state["tokens"]), int(state["examples"])
    if examples == 0 or tokens == 0:
        raise FisherJaxError("gram: no examples (every batch was empty or had weight 0)")
    grams: dict[str, np.ndarray] = {}
    rows_seen: dict[str, int] = {}
    for path, _, per_token in unique:
        n = tokens if per_token else examples
        g = np.asarray(state["sums"][path], np.float32) / np.float32(n)
        if not np.all(np.isfinite(g)):
            raise FisherJaxError(f"Gram of '{path}' is not finite (NaN/inf): check the model's parameters")
        grams[path] = g
        rows_seen[path] = n
    for alias, owner in aliases.items():
        grams[alias] = grams[owner]  # one array under query, key and value
    meta = base_meta("gram", model, None, num_examples=examples, num_tokens=tokens, num_batches=consumed,
                     mask_padding=bool(mask_padding), rows=rows_seen, aliases=aliases, task=task, split=split)
    return Grams({k: grams[k] for k in order}, tokens, examples, meta)


__all__ = ["Grams", "capture_dense_inputs", "dense_layout", "gram_stats", "gram_step"]
