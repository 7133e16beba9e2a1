"""PyTorch reference of the seed paper's pipeline on transformers ``*ForSequenceClassification`` models.

Written from SPEC §1–§3 (not from any released code) so that the JAX implementation has an
independent implementation to agree with, and so the JAX-vs-PyTorch speed claims are measured
against what a PyTorch user would actually write:

- mask nodes (SPEC §1) as *forward pre-hooks*: transformers 5 has no ``head_mask`` argument. The
  head mask scales head ``h``'s slice of the attention context right before the attention output
  projection (``attention.output.dense``; DistilBERT ``attention.out_lin``), which is exactly
  "after softmax and dropout, before the heads are concatenated and projected". The neuron mask
  scales the input of the FFN output projection (``output.dense``; DistilBERT ``ffn.lin2``), i.e.
  the activation after GELU;
- mask Fisher estimators (SPEC §2): ``empirical`` and ``expected`` per example, either a Python
  loop over examples or ``torch.func`` (``functional_call`` + ``vmap(grad)``), and ``batch``
  (squared gradient of each batch's mean loss, summed over batches: the released code);
- full (parameter) diagonal Fisher of the body, per-example loop (Matena & Raffel's baseline);
- Fisher-node merge on Hugging Face state dicts (SPEC §3 ``reference`` and ``node`` mappings);
- RegMean Grams through forward hooks on every ``nn.Linear`` of the body, and the RegMean merge.

Conventions shared with :mod:`fisher_jax.stats` (so that the two can be compared number for
number): batches are dicts of numpy arrays (``input_ids``, ``attention_mask``, ``token_type_ids``,
``labels``, optional ``weights``: 0 for padding rows); every per-example statistic is
``sum_n w_n s_n / sum_n w_n``; the loss is cross-entropy ``-log p(y|x)`` for classification and
squared error ``(f(x) - y)^2`` for regression (``num_labels == 1``); Grams are keyed by the Dense
layer's body path (``encoder/layer/0/attention/self/query``).

Import this module only where torch is installed; without it the import raises a
:class:`~fisher_jax.errors.FisherJaxError` that says how to install it.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Sequence

import numpy as np

from ..errors import FisherJaxError

try:
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - depends on the environment
    raise FisherJaxError(
        "the PyTorch reference needs torch, which is not installed: pip install 'fisher-jax[torch]'"
    ) from None

from ..stats.io import Grams, MaskFisher  # numpy-only records, shared with the JAX statistics

Estimator = Literal["empirical", "expected", "batch"]
Method = Literal["loop", "vmap"]
StateDict = Mapping[str, Any]  # name -> torch.Tensor or numpy array (Hugging Face layout)

from ..models.config import SUPPORTED_MODEL_TYPES as SUPPORTED
_BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids")


# ----------------------------------------------------------------------------- model anatomy
def _family(model: nn.Module):
    """The registry entry (names and hook targets only: no JAX numerics) of a transformers model."""
    from ..models.families import REGISTRY

    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in REGISTRY:
        raise FisherJaxError(f"unsupported model_type '{mt}': the reference supports {', '.join(SUPPORTED)}")
    return REGISTRY[mt]


def model_type(model: nn.Module) -> str:
    """The family (``bert``, ``gpt2``, ``llama``, ...) of a transformers model."""
    return _family(model).model_type


def _attr(module: nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def base_model(model: nn.Module) -> nn.Module:
    """The shared body (``model.bert``, ``model.transformer``, ``model.model``, ...): what merges average."""
    return getattr(model, model.base_model_prefix)


def encoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    return _attr(base_model(model), _family(model).torch.layers)


def geometry(model: nn.Module) -> tuple[int, int, int]:
    """``(L, H, I)``: layers, (query) attention heads, FFN neurons per layer."""
    c = model.config
    arch = _family(model).arch(c, int(c.num_labels), "float32")
    return arch.num_layers, arch.num_heads, arch.intermediate_size


def is_regression(model: nn.Module) -> bool:
    return int(model.config.num_labels) == 1


def _mask_targets(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """Per layer: (attention output projection, FFN output projection) — the modules whose
    *inputs* are the masked quantities (the per-head context, the FFN activation; for gated FFNs
    ``act(gate) * up``)."""
    hooks = _family(model).torch
    return [(_attr(blk, hooks.attn_out), _attr(blk, hooks.ffn_out)) for blk in encoder_layers(model)]


class MaskHooks:
    """Forward pre-hooks applying the SPEC §1 mask nodes to a transformers model.

    ``hooks.head`` (``[L, H]``) and ``hooks.neuron`` (``[L, I]``) are read at call time, so they can
    be leaf tensors requiring grad (autograd) or ``torch.func``-transformed tensors (vmap/grad);
    ``None`` leaves the forward pass untouched. Use as a context manager: hooks are removed on exit.

    head:   ctx[..., h*d:(h+1)*d] *= head[l, h]   before ``attention.output.dense`` (``out_lin``,
            GPT-2 ``attn.c_proj``, Llama ``self_attn.o_proj``)
    neuron: act[..., i]           *= neuron[l, i] before ``output.dense`` (``ffn.lin2``, ``mlp.c_proj``,
            ``mlp.down_proj``)
    """

    def __init__(self, model: nn.Module, head: Optional[torch.Tensor] = None, neuron: Optional[torch.Tensor] = None):
        self.model = model
        self.head = head
        self.neuron = neuron
        self.num_heads = geometry(model)[1]
        self._handles: list[Any] = []

    def _head_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> Optional[tuple]:
            if self.head is None:
                return None
            x = args[0]  # [B, T, H*d], heads concatenated in order (HF reshapes [B, T, H, d])
            scale = self.head[layer].to(x.dtype)[:, None]  # [H, 1]
            x = (x.unflatten(-1, (self.num_heads, -1)) * scale).flatten(-2)
            return (x, *args[1:])

        return hook

    def _neuron_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> Optional[tuple]:
            if self.neuron is None:
                return None
            return (args[0] * self.neuron[layer].to(args[0].dtype), *args[1:])

        return hook

    def __enter__(self) -> "MaskHooks":
        for layer, (attn_out, ffn_out) in enumerate(_mask_targets(self.model)):
            self._handles.append(attn_out.register_forward_pre_hook(self._head_hook(layer)))
            self._handles.append(ffn_out.register_forward_pre_hook(self._neuron_hook(layer)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ------------------------------------------------------------------------------------ batches
def default_device() -> str:
    """``"cuda"`` when PyTorch sees a GPU, else ``"cpu"``: where the reference runs unless told."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live: batches and statistics are made there (CPU or CUDA)."""
    return next(model.parameters()).device


def to_torch_batch(batch: Mapping[str, Any], regression: bool,
                   device: Optional[torch.device | str] = None) -> dict[str, torch.Tensor]:
    """A numpy batch dict (SPEC §7) as tensors on ``device`` (default CPU); ``attention_mask``,
    ``token_type_ids``, ``weights`` default to ones/zeros/ones as in :mod:`fisher_jax.stats`."""
    if "input_ids" not in batch:
        raise FisherJaxError(f"a batch needs 'input_ids' (got keys {sorted(batch)})")

    def t(x: Any, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(np.asarray(x), dtype=dtype, device=device)

    ids = t(batch["input_ids"], torch.long)
    out = {"input_ids": ids}
    am = batch.get("attention_mask")
    out["attention_mask"] = torch.ones_like(ids) if am is None else t(am, torch.long)
    tt = batch.get("token_type_ids")
    out["token_type_ids"] = torch.zeros_like(ids) if tt is None else t(tt, torch.long)
    w = batch.get("weights")
    out["weights"] = torch.ones(ids.shape[0], device=device) if w is None else t(w, torch.float32)
    if "labels" in batch and batch["labels"] is not None:
        out["labels"] = t(batch["labels"], torch.float32 if regression else torch.long)
    return out


def _model_inputs(model: nn.Module, tb: Mapping[str, torch.Tensor],
                  rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    """Keyword arguments of the HF forward pass (DistilBERT takes no ``token_type_ids``)."""
    kw = {"input_ids": tb["input_ids"][rows], "attention_mask": tb["attention_mask"][rows]}
    if _family(model).torch.token_types:
        kw["token_type_ids"] = tb["token_type_ids"][rows]
    return kw


def _labels(tb: Mapping[str, torch.Tensor], what: str) -> torch.Tensor:
    if "labels" not in tb:
        raise FisherJaxError(f"the {what} needs 'labels' in every batch")
    return tb["labels"]


def example_losses(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Per-example loss ``[B]``: ``-log p(y|x)`` (classification) or ``(f(x) - y)^2`` (regression)."""
    if regression:
        return (logits[..., 0] - labels.to(logits.dtype)) ** 2
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def _check_estimator(estimator: str, allowed: Sequence[str]) -> None:
    if estimator not in allowed:
        raise FisherJaxError(f"unknown estimator '{estimator}' (the reference offers: {', '.join(allowed)})")


# ------------------------------------------------------------------------- per-example squares
def _example_squared_grads(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], label: torch.Tensor, wrt: Sequence[torch.Tensor],
    estimator: str, regression: bool,
) -> list[torch.Tensor]:
    """``(d/dtheta loss)^2`` (empirical) or ``sum_c p(c|x) (d/dtheta log p(c|x))^2`` (expected) for
    one example; for regression the expected (Gaussian) Fisher is ``(d f(x)/dtheta)^2``."""
    logits = model(**inputs).logits[0]
    if estimator == "empirical":
        grads = torch.autograd.grad(example_losses(logits[None], label[None], regression)[0], wrt)
        return [g * g for g in grads]
    if regression:
        grads = torch.autograd.grad(logits[0], wrt)
        return [g * g for g in grads]
    logp = torch.log_softmax(logits.float(), dim=-1)
    probs = logp.detach().exp()
    acc = [torch.zeros_like(t) for t in wrt]
    for c in range(logp.shape[0]):  # one backward pass per class: what a PyTorch user writes
        grads = torch.autograd.grad(logp[c], wrt, retain_graph=c < logp.shape[0] - 1)
        for a, g in zip(acc, grads):
            a.add_(probs[c] * g * g)
    return acc


def _loop(model: nn.Module, batches: Iterable[Mapping[str, Any]], wrt: Sequence[torch.Tensor], estimator: str,
          max_examples: Optional[int] = None) -> tuple[list[torch.Tensor], float, int]:
    """``sum_n w_n s_n`` over examples one at a time (batch size 1, padding kept), ``sum_n w_n``, count."""
    regression = is_regression(model)
    acc = [torch.zeros_like(t, dtype=torch.float64) for t in wrt]
    total_w, count = 0.0, 0
    for batch in batches:
        tb = to_torch_batch(batch, regression, device_of(model))
        labels = _labels(tb, "Fisher")
        for n in range(tb["input_ids"].shape[0]):
            w = float(tb["weights"][n])
            if w == 0.0:  # padding rows of the last batch contribute nothing: skip the work
                continue
            sq = _example_squared_grads(model, _model_inputs(model, tb, slice(n, n + 1)), labels[n], wrt, estimator,
                                        regression)
            for a, s in zip(acc, sq):
                a.add_(s.double(), alpha=w)
            total_w += w
            count += 1
            if max_examples is not None and count >= max_examples:
                return acc, total_w, count
    return acc, total_w, count


def _additive_mask(model: nn.Module, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T]`` 0/1 -> ``[B, 1, 1, T]`` additive bias (0 or dtype min); decoders ``[B, 1, T, T]``
    with the causal (and sliding-window: key > query - window) structure.

    A ready 4-D mask makes transformers skip its mask builder, whose data-dependent ``mask.all()``
    shortcut cannot run under ``vmap``; the attention result is the same.
    """
    keep = attention_mask[:, None, None, :].bool()
    fam = _family(model)
    if not fam.torch.causal and any(fam.arch(model.config, int(model.config.num_labels), "float32").layer_windows):
        raise FisherJaxError(f"the reference's vmap method does not build {fam.model_type}'s local-attention "
                             "masks; use method='loop'")
    if fam.torch.causal:
        t = attention_mask.shape[-1]
        pos = torch.arange(t, device=attention_mask.device)
        allowed = pos[None, :] <= pos[:, None]
        windows = set(_family(model).arch(model.config, int(model.config.num_labels), "float32").layer_windows)
        if len(windows) > 1:
            raise FisherJaxError("the reference's vmap method needs one attention window for all layers; "
                                 "use method='loop'")
        window = next(iter(windows), 0)
        if window:
            allowed = allowed & (pos[None, :] > pos[:, None] - window)
        keep = keep & allowed[None, None]
    return (1.0 - keep.to(dtype)) * torch.finfo(dtype).min


@contextlib.contextmanager
def _eager_attention(model: nn.Module):
    """Temporarily use transformers' eager attention: SDPA has no vmap batching rule on CPU
    (torch.func falls back to a slow per-example loop and warns); eager is plain matmuls."""
    before = getattr(model.config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def _vmap_mask_sq_grads(model: nn.Module, hooks: MaskHooks, tb: Mapping[str, torch.Tensor], estimator: str,
                        chunk_size: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example squared mask gradients ``[B, L, H]``, ``[B, L, I]`` with ``torch.func``."""
    from torch.func import functional_call, grad, jacrev, vmap

    regression = is_regression(model)
    L, H, I = geometry(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    use_tt = _family(model).torch.token_types
    dtype = next(iter(params.values())).dtype

    def logits_of(head: torch.Tensor, neuron: torch.Tensor, ids: torch.Tensor, am: torch.Tensor,
                  tt: torch.Tensor) -> torch.Tensor:
        hooks.head, hooks.neuron = head, neuron  # the hooks read the transformed tensors
        plain = _family(model).torch.plain_mask  # DeBERTa reads a 0/1 mask (and no vmap-hostile shortcut)
        kw = {"input_ids": ids[None], "attention_mask": am[None] if plain else _additive_mask(model, am[None], dtype)}
        if use_tt:
            kw["token_type_ids"] = tt[None]
        return functional_call(model, (params, buffers), args=(), kwargs=kw).logits[0]

    head0 = torch.ones(L, H, dtype=dtype, device=device_of(model))
    neuron0 = torch.ones(L, I, dtype=dtype, device=device_of(model))
    args = (tb["input_ids"], tb["attention_mask"], tb["token_type_ids"])
    if estimator == "empirical":
        def loss(head, neuron, ids, am, tt, y):
            return example_losses(logits_of(head, neuron, ids, am, tt)[None], y[None], regression)[0]

        fn = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0, 0, 0), chunk_size=chunk_size)
        gh, gn = fn(head0, neuron0, *args, _labels(tb, "Fisher"))
        return gh * gh, gn * gn
    if regression:  # Gaussian expected Fisher: squared gradient of the prediction
        def pred(head, neuron, ids, am, tt):
            return logits_of(head, neuron, ids, am, tt)[0]

        fn = vmap(grad(pred, argnums=(0, 1)), in_dims=(None, None, 0, 0, 0), chunk_size=chunk_size)
        gh, gn = fn(head0, neuron0, *args)
        return gh * gh, gn * gn

    def logp(head, neuron, ids, am, tt):
        lp = torch.log_softmax(logits_of(head, neuron, ids, am, tt).float(), dim=-1)
        return lp, lp.exp()

    # jacrev gives d log p(c|x) for every class c at once: [B, C, L, H], [B, C, L, I].
    fn = vmap(jacrev(logp, argnums=(0, 1), has_aux=True), in_dims=(None, None, 0, 0, 0), chunk_size=chunk_size)
    (jh, jn), probs = fn(head0, neuron0, *args)
    return (torch.einsum("bc,bclh->blh", probs, jh * jh), torch.einsum("bc,bcli->bli", probs, jn * jn))


# ------------------------------------------------------------------------------- mask Fisher
def mask_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    estimator: Estimator = "empirical",
    method: Method = "loop",
    chunk_size: Optional[int] = None,
) -> MaskFisher:
    """Diagonal Fisher of the head and neuron mask nodes (SPEC §2), in PyTorch.

    ``empirical`` (the paper's formula) and ``expected``:
        F[m] = sum_n w_n s_n(m) / sum_n w_n,  s_n = (d/dm loss(x_n, y_n; m))^2  at m = 1
    (``expected``: s_n = sum_c p(c|x_n) (d/dm log p(c|x_n))^2; regression: (d f(x_n)/dm)^2), with
    ``method="loop"`` (one forward/backward per example) or ``method="vmap"`` (``torch.func``:
    ``vmap(grad(functional_call ...))`` over the examples of each batch; ``chunk_size`` bounds memory).

    ``batch`` (the released code): F[m] = sum_b (d/dm mean_{n in b} loss_n)^2, the batch mean
    weighted by ``weights``; summed, not averaged, over batches (not a per-example Fisher).

    The model runs in eval mode (no dropout) and its parameters get no gradients.
    """
    _check_estimator(estimator, ("empirical", "expected", "batch"))
    if method not in ("loop", "vmap"):
        raise FisherJaxError(f"unknown method '{method}' (choose 'loop' or 'vmap')")
    model.eval()
    L, H, I = geometry(model)
    regression = is_regression(model)
    was = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # gradients w.r.t. the masks only: cheaper, and params stay clean
        p.requires_grad_(False)
    try:
        head = torch.ones(L, H, requires_grad=True, device=device_of(model))
        neuron = torch.ones(L, I, requires_grad=True, device=device_of(model))
        with contextlib.ExitStack() as stack:
            hooks = stack.enter_context(MaskHooks(model))
            if estimator == "batch":
                fh, fn, total_w, count = _batch_mode(model, hooks, batches, head, neuron, regression)
            elif method == "loop":
                hooks.head, hooks.neuron = head, neuron
                (fh, fn), total_w, count = _loop(model, batches, [head, neuron], estimator)
                fh, fn = fh / max(total_w, 1e-30), fn / max(total_w, 1e-30)
            else:
                fh = torch.zeros(L, H, dtype=torch.float64, device=device_of(model))
                fn = torch.zeros(L, I, dtype=torch.float64, device=device_of(model))
                total_w, count = 0.0, 0
                stack.enter_context(_eager_attention(model))
                for batch in batches:
                    tb = to_torch_batch(batch, regression, device_of(model))
                    sh, sn = _vmap_mask_sq_grads(model, hooks, tb, estimator, chunk_size)
                    w = tb["weights"].double()
                    fh += torch.einsum("b,blh->lh", w, sh.double())
                    fn += torch.einsum("b,bli->li", w, sn.double())
                    total_w += float(w.sum())
                    count += int((w > 0).sum())
                fh, fn = fh / max(total_w, 1e-30), fn / max(total_w, 1e-30)
    finally:
        for p, r in zip(model.parameters(), was):
            p.requires_grad_(r)
    if count == 0:
        raise FisherJaxError("no examples with weight > 0 in the batches: nothing to estimate a Fisher from")
    meta = {"estimator": estimator, "method": "batch" if estimator == "batch" else method, "implementation": "torch"}
    return MaskFisher(fh.float().cpu().numpy(), fn.float().cpu().numpy(), count, meta)


def _batch_mode(model: nn.Module, hooks: MaskHooks, batches: Iterable[Mapping[str, Any]], head: torch.Tensor,
                neuron: torch.Tensor, regression: bool) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """``sum_b (grad of the weighted batch-mean loss)^2`` — the released code's estimator."""
    hooks.head, hooks.neuron = head, neuron
    fh = torch.zeros(head.shape, dtype=torch.float64, device=head.device)
    fn = torch.zeros(neuron.shape, dtype=torch.float64, device=head.device)
    total_w, count = 0.0, 0
    for batch in batches:
        tb = to_torch_batch(batch, regression, device_of(model))
        w = tb["weights"]
        if float(w.sum()) == 0.0:
            continue
        logits = model(**_model_inputs(model, tb)).logits
        loss = (w * example_losses(logits, _labels(tb, "Fisher"), regression)).sum() / w.sum()
        gh, gn = torch.autograd.grad(loss, [head, neuron])
        fh += gh.double() ** 2
        fn += gn.double() ** 2
        total_w += float(w.sum())
        count += int((w > 0).sum())
    return fh, fn, total_w, count


# ------------------------------------------------------------------------------- full Fisher
def body_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The body's parameters under their state-dict names (``bert.encoder...``); the head excluded."""
    prefix = model.base_model_prefix + "."
    return {k: p for k, p in model.named_parameters() if k.startswith(prefix)}


def full_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    estimator: Literal["empirical", "expected"] = "expected",
    max_examples: Optional[int] = None,
) -> dict[str, np.ndarray]:
    """Diagonal Fisher of every body parameter (Matena & Raffel 2022), one example at a time.

    F[theta] = sum_n w_n s_n(theta) / sum_n w_n with s_n as in :func:`mask_fisher` (``expected``:
    one backward pass per class). Returned under Hugging Face state-dict names, ``[out, in]``.
    """
    _check_estimator(estimator, ("empirical", "expected"))
    model.eval()
    params = body_parameters(model)
    acc, total_w, count = _loop(model, batches, list(params.values()), estimator, max_examples)
    if count == 0:
        raise FisherJaxError("no examples with weight > 0 in the batches: nothing to estimate a Fisher from")
    return {k: (a / total_w).float().cpu().numpy() for k, a in zip(params, acc)}


# ------------------------------------------------------------------------------------ Grams
def _linear_types() -> tuple[type, ...]:
    try:  # GPT-2's projections are transformers' Conv1D (y = x W + b, W [in, out]), not nn.Linear
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - depends on the transformers version
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


_LINEAR_TYPES = _linear_types()


def gram_stats(model: nn.Module, batches: Iterable[Mapping[str, Any]], mask_padding: bool = True) -> Grams:
    """RegMean Grams ``G = X^T X / #rows`` of the inputs of every ``nn.Linear`` in the body (SPEC §3).

    Collected with forward hooks. A token row counts when its example's weight is > 0 and, with
    ``mask_padding`` (the correct default), when the attention mask is 1; ``mask_padding=False`` counts
    padding tokens as the released code did. 2-D inputs (BERT's pooler sees one row per example)
    count the examples. Layers fed the same tensor in one forward pass (query, key
    and value) share one Gram array. Keys are body paths (``encoder/layer/0/attention/self/query``).
    """
    model.eval()
    regression = is_regression(model)
    base = base_model(model)
    linears = {name: mod for name, mod in base.named_modules() if isinstance(mod, _LINEAR_TYPES)}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    owner: dict[str, str] = {}  # layer -> the layer whose Gram it shares (same input tensor)
    state: dict[str, Any] = {}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach()
            if x.dim() == 3 and tuple(x.shape[:2]) != tuple(state["mask"].shape):
                return  # not per-token data: DeBERTa's relative embedding table (a parameter) has no Gram
            # Holding the tensor keeps its id from being reused by a later layer's input in this pass.
            _, first = state["seen"].setdefault(id(args[0]), (args[0], name))
            owner.setdefault(name, first)
            if owner[name] != name:
                return  # same input as an earlier layer of this pass: its Gram is this one's
            if x.dim() == 3:
                rw = state["weights"][:, None] * (state["mask"] if mask_padding else 1.0)
                rw = rw.expand(x.shape[:2]).reshape(-1)
                x = x.reshape(-1, x.shape[-1])
            else:
                rw = state["weights"]
            xd = x.double()
            g = (xd * rw.double()[:, None]).T @ xd
            sums[name] = g if name not in sums else sums[name] + g
            counts[name] = counts.get(name, 0.0) + float(rw.sum())

        return hook

    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in linears.items()]
    num_examples = 0
    try:
        with torch.no_grad():
            for batch in batches:
                tb = to_torch_batch(batch, regression, device_of(model))
                # Rows count when their weight is > 0 (0/1, as in fisher_jax.stats.gram).
                state.update(seen={}, weights=(tb["weights"] > 0).float(), mask=tb["attention_mask"].float())
                model(**_model_inputs(model, tb))
                num_examples += int((tb["weights"] > 0).sum())
    finally:
        for h in handles:
            h.remove()
    if not sums:
        raise FisherJaxError("no Linear layer of the body saw any input: are the batches empty?")
    grams = {name: (sums[name] / counts[name]).float().cpu().numpy() for name in sums}
    # Flax body paths: a fused HF projection (GPT-2's c_attn) is several Flax Dense layers on one input.
    paths = {name: _family(model).flax_modules(name) for name in linears}
    first = {name: paths[name][0] for name in linears}
    out, aliases = {}, {}
    for name in linears:
        if owner.get(name) not in grams:
            continue
        for path in paths[name]:
            out[path] = grams[owner[name]]
            if path != first[owner[name]]:
                aliases[path] = first[owner[name]]
    tokens = int(max(v for k, v in counts.items() if k != "pooler.dense"))
    return Grams(out, num_tokens=tokens, num_examples=num_examples,
                 meta={"implementation": "torch", "mask_padding": bool(mask_padding), "aliases": aliases})


# ------------------------------------------------------------------------------------ merges
def _body_prefix(state_dict: StateDict) -> str:
    """``bert.`` / ``transformer.`` / ``model.`` ...: the prefix of the body's keys."""
    return _body_family(state_dict).base_prefix + "."


def _body_family(state_dict: StateDict) -> Any:
    """The registry entry whose body names the state dict uses (RoBERTa and XLM-RoBERTa, or
    Llama, Qwen2 and Mistral, share their names: any of them will do)."""
    from ..models.families import REGISTRY

    found = [fam for fam in REGISTRY.values()
             if any(k.startswith(f"{fam.base_prefix}.{fam.embeddings_hf}.") for k in state_dict)]
    # Families sharing a prefix (DeBERTa v1 / v2) differ in their renamed tensors: take the one with
    # the most renames whose layer-0 HF modules are all present (v1's in_proj, q_bias).
    def present(fam: Any) -> bool:
        names = {f"{fam.base_prefix}.{r.hf.replace('{i}', '0')}" for r in fam.renames}
        return all(any(k == n or k.startswith(n + ".") for k in state_dict) for n in names)

    found = sorted((fam for fam in found if present(fam)), key=lambda fam: -len(fam.renames))
    if found:
        return found[0]
    raise FisherJaxError(f"not a sequence-classification state dict of a supported family ({', '.join(SUPPORTED)}): "
                         "no '<prefix>.<word embeddings>.*' keys")


def _role(name: str) -> tuple[Optional[int], list[str], str, bool]:
    """``encoder.layer.3.attention.self.query.weight`` -> ``(3, ["query"], "weight", False)``:
    layer, the role of each slice of a fused tensor (GPT-2's ``c_attn``: query, key, value), leaf,
    and whether weights are stored ``[in, out]`` (Conv1D). Embeddings, poolers and final norms
    have layer None ("universal" weight). Names resolve through the families' registry entries.
    """
    from ..models.families import REGISTRY

    module, leaf = name.rsplit(".", 1)
    for fam in REGISTRY.values():
        path = fam.flax_leaf(name)  # a tensor renamed leaf by leaf (DeBERTa v1's q_bias, v_bias)
        hit = fam.role(path) if path is not None else None
        if hit is not None:
            return hit[0], [hit[1]], hit[2], fam.conv1d_body
    for fam in REGISTRY.values():
        hits = [fam.role(f"{m}/{leaf}") for m in fam.flax_modules(module)]
        if hits and all(h is not None for h in hits):
            return hits[0][0], [h[1] for h in hits], leaf, fam.conv1d_body
    raise FisherJaxError(f"unknown body parameter '{name}'")


def _head_interleaved(name: str) -> bool:
    """Whether the fused body tensor ``name`` (no prefix) interleaves its parts per attention head."""
    from ..models.families import REGISTRY

    module = name.rsplit(".", 1)[0]
    return any(fam.head_interleaved(module) for fam in REGISTRY.values())


def _as_tensor(x: Any) -> torch.Tensor:
    # torch.tensor copies: numpy inputs may be read-only views (torch warns on those).
    return x.detach() if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x))


def _check_same_keys(state_dicts: Sequence[StateDict]) -> list[str]:
    """The body keys, checked to be the same (names and shapes) in every state dict.

    Heads may differ (tasks with different label counts): each model keeps its own.
    """
    if len(state_dicts) < 2:
        raise FisherJaxError(f"merging needs at least two models, got {len(state_dicts)}")
    prefix = _body_prefix(state_dicts[0])
    keys = [k for k in state_dicts[0] if k.startswith(prefix)]
    for j, sd in enumerate(state_dicts[1:], 1):
        body = {k for k in sd if k.startswith(prefix)}
        if body != set(keys):
            diff = sorted(body ^ set(keys))[0]
            raise FisherJaxError(f"state dict {j} and state dict 0 differ at '{diff}'")
        for k in keys:
            if tuple(sd[k].shape) != tuple(state_dicts[0][k].shape):
                raise FisherJaxError(f"'{k}' has shape {tuple(sd[k].shape)} in state dict {j} but "
                                     f"{tuple(state_dicts[0][k].shape)} in state dict 0")
    return keys


def _with_heads(state_dicts: Sequence[StateDict], body: dict[str, torch.Tensor]) -> list[dict]:
    """One state dict per model: the merged body plus that model's own (copied) head."""
    out = []
    for sd in state_dicts:
        merged = {k: body[k].clone() if k in body else _as_tensor(sd[k]).clone() for k in sd}
        out.append(merged)
    return out


def node_weight(name: str, shape: tuple[int, ...], head: np.ndarray, neuron: np.ndarray,
                mapping: str = "reference", head_dim: Optional[int] = None) -> np.ndarray:
    """One model's Fisher-node weight for the body parameter ``name`` (no prefix), PyTorch layout.

    ``reference`` (SPEC §3 table; weights are ``[out, in]``, Conv1D ``[in, out]``): query/key rows
    and bias entries of head h -> ``F_head[l, h]`` (grouped-query attention: key head g -> the mean
    of ``F_head[l, h]`` over the query heads reading it); value, attention output dense and its
    LayerNorm -> ``mean_h F_head[l]``; FFN intermediate (and gate) row/bias entry i ->
    ``F_neuron[l, i]``; FFN output dense and its LayerNorm -> ``mean_i F_neuron[l]``; embeddings,
    pooler and final norms -> ``mean_l (mean_h F_head[l] + mean_i F_neuron[l])``. ``node``: value
    rows of head h (kv head g) and attention-output *input columns* of head h -> ``F_head[l, h]``;
    FFN-output input column i -> ``F_neuron[l, i]``; their biases and the LayerNorms -> layer
    means. A fused tensor (GPT-2 ``c_attn``) takes each slice's weights. Returned broadcastable to
    ``shape`` (float64). ``head_dim`` defaults to the query width / H.
    """
    layer, roles, leaf, conv1d = _role(name)
    if layer is None:
        return np.asarray(np.mean(head.mean(axis=1) + neuron.mean(axis=1)))
    H = head.shape[1]
    node = mapping == "node"
    h_mean, n_mean = head[layer].mean(), neuron[layer].mean()
    out_axis = -1 if (conv1d and leaf == "weight") else 0
    part = shape[out_axis] // len(roles)

    def out_weights(role: str) -> Any:
        d = head_dim or (part // H if role == "query" else None)
        if role == "query":
            return np.repeat(head[layer], part // H)
        if role == "key" or (node and role == "value"):
            d = d or part // H  # without head_dim: plain multi-head attention
            return np.repeat(head[layer].reshape(part // d, -1).mean(axis=1), d)
        if role in ("ffn_in", "ffn_gate"):
            return neuron[layer]
        if role in ("value", "attn_out", "attn_ln"):
            return h_mean
        return n_mean  # ffn_out, ffn_ln

    role = roles[0]
    if node and leaf == "weight" and role in ("attn_out", "ffn_out"):
        in_axis = 1 if out_axis == 0 else 0
        vec = np.repeat(head[layer], shape[in_axis] // H) if role == "attn_out" else neuron[layer]
        return vec[None, :] if out_axis == 0 else vec[:, None]
    ws = [np.broadcast_to(np.asarray(out_weights(r), np.float64), (part,)) for r in roles]
    if len(ws) > 1 and _head_interleaved(name):  # DeBERTa v1's in_proj: rows [q_h | k_h | v_h] per head h
        w = np.stack([x.reshape(H, -1) for x in ws], axis=1).reshape(-1)
    else:
        w = np.concatenate(ws) if len(ws) > 1 else np.asarray(out_weights(role), np.float64)
    if w.ndim == 0 or len(shape) == 1:
        return w
    return w[:, None] if out_axis == 0 else w[None, :]


def _head_dim(state_dict: StateDict, prefix: str, num_heads: int) -> Optional[int]:
    """Query width / H from the first query weight (or bias) of the body; None if there is none."""
    for k, v in state_dict.items():
        if k.startswith(prefix) and k.endswith((".weight", ".bias")):
            layer, roles, leaf, conv1d = _role(k[len(prefix):])
            if layer is not None and roles[0] == "query":
                width = tuple(v.shape)[-1 if (conv1d and leaf == "weight") else 0] // len(roles)
                return width // num_heads
    return None


def _patched_nodes(fishers: Sequence[Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Float64 copies of each model's node Fishers; where every model's Fisher of a node is exactly
    0 they are all set to 1 (equal weights), as the released code does — on copies (SPEC §5)."""
    heads = [np.array(f.head, dtype=np.float64, copy=True) for f in fishers]
    neurons = [np.array(f.neuron, dtype=np.float64, copy=True) for f in fishers]
    for arrs in (heads, neurons):
        zero = np.all(np.stack(arrs) == 0, axis=0)
        for a in arrs:
            a[zero] = 1.0
    return heads, neurons


def fisher_nodes_merge(state_dicts: Sequence[StateDict], fishers: Sequence[Any],
                       mapping: Literal["reference", "node"] = "reference") -> list[dict[str, torch.Tensor]]:
    """Fisher mask nodes merge (Thennal D K, Nathan, M S; LREC-COLING 2024) on HF state dicts.

    theta = sum_j w_j(node(theta)) theta_j / sum_j w_j(node(theta)), elementwise over the body,
    weights from :func:`node_weight`, computed in float64. Task heads are not merged: model j's
    output keeps its own head. Inputs (state dicts and Fishers) are never modified.
    """
    if mapping not in ("reference", "node"):
        raise FisherJaxError(f"mapping must be 'reference' or 'node', got {mapping!r}")
    keys = _check_same_keys(state_dicts)
    if len(fishers) != len(state_dicts):
        raise FisherJaxError(f"got {len(fishers)} mask Fishers for {len(state_dicts)} models")
    prefix = _body_prefix(state_dicts[0])
    heads, neurons = _patched_nodes(fishers)  # float64 copies: the inputs are never patched
    head_dim = _head_dim(state_dicts[0], prefix, heads[0].shape[1])
    body = {}
    for k in keys:
        xs = [_as_tensor(sd[k]).double() for sd in state_dicts]
        shape = tuple(xs[0].shape)
        ws = [torch.as_tensor(node_weight(k[len(prefix):], shape, h, n, mapping, head_dim))
              for h, n in zip(heads, neurons)]
        num = sum(w * x for w, x in zip(ws, xs))
        den = sum(ws)
        body[k] = (num / den).to(_as_tensor(state_dicts[0][k]).dtype).expand(shape).contiguous()
    return _with_heads(state_dicts, body)


def simple_merge(state_dicts: Sequence[StateDict]) -> list[dict[str, torch.Tensor]]:
    """Elementwise mean of the bodies; heads kept per model."""
    body = {}
    for k in _check_same_keys(state_dicts):
        mean = torch.stack([_as_tensor(sd[k]).double() for sd in state_dicts]).mean(0)
        body[k] = mean.to(_as_tensor(state_dicts[0][k]).dtype)
    return _with_heads(state_dicts, body)


def regmean_merge(state_dicts: Sequence[StateDict], grams: Sequence[Mapping[str, Any]],
                  alpha: float = 1.0) -> list[dict[str, torch.Tensor]]:
    """RegMean (Jin et al., ICLR 2023) on HF state dicts.

    For every Linear (or Conv1D) with a Gram in every model (``grams[j]`` keyed by Flax body path,
    e.g. ``encoder/layer/0/attention/self/query``), with PyTorch weights ``W_j [out, in]``:
        W^T = solve(sum_j G~_j, sum_j G~_j W_j^T),   G~_j = alpha G_j + (1 - alpha) diag(G_j)
    (``torch.linalg.solve`` in float64). Everything else in the body: the mean. Heads kept.
    """
    keys = _check_same_keys(state_dicts)
    if len(grams) != len(state_dicts):
        raise FisherJaxError(f"got {len(grams)} Gram sets for {len(state_dicts)} models")
    if not 0.0 <= float(alpha) <= 1.0:
        raise FisherJaxError(f"alpha must be in [0, 1], got {alpha}")
    fam = _body_family(state_dicts[0])
    merged0 = simple_merge(state_dicts)[0]
    body = {k: merged0[k] for k in keys}
    layers = set.intersection(*[{str(k).removeprefix("body/") for k in g} for g in grams])
    if not layers:
        raise FisherJaxError("regmean: no layer has a Gram in every model")
    # Gram keys are Flax body paths; a fused HF tensor (GPT-2's c_attn) holds several of them,
    # all fed the same input (one Gram), and is solved whole.
    tensors: dict[str, tuple[Any, str]] = {}
    for layer in sorted(layers):
        ref = fam.hf_ref(f"body/{layer}/kernel")
        if ref.key not in body:
            raise FisherJaxError(f"a Gram names '{layer}', which is not a Linear layer of the body")
        tensors.setdefault(ref.key, (ref, layer))
    for key, (ref, layer) in tensors.items():
        lhs, rhs = None, None
        for sd, g in zip(state_dicts, grams):
            gm = _as_tensor(g.get(layer, g.get("body/" + layer))).double()
            gt = gm * (alpha + (1.0 - alpha) * torch.eye(gm.shape[0], dtype=torch.float64))
            w = _as_tensor(sd[key]).double()
            term = gt @ (w.T if ref.transpose else w)  # [in, out]
            lhs = gt if lhs is None else lhs + gt
            rhs = term if rhs is None else rhs + term
        solved = torch.linalg.solve(lhs, rhs)
        body[key] = (solved.T if ref.transpose else solved).to(_as_tensor(state_dicts[0][key]).dtype).contiguous()
    return _with_heads(state_dicts, body)


# ------------------------------------------------------------------------- models and outputs
def load_model(path: str, num_labels: Optional[int] = None, attn_implementation: Optional[str] = None) -> nn.Module:
    """``AutoModelForSequenceClassification.from_pretrained`` in eval mode (float32, CPU)."""
    from transformers import AutoModelForSequenceClassification

    kw: dict[str, Any] = {}
    if num_labels is not None:
        kw["num_labels"] = num_labels
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    return AutoModelForSequenceClassification.from_pretrained(str(path), **kw).eval()


def with_state_dict(model: nn.Module, state_dict: StateDict) -> nn.Module:
    """A copy of ``model`` holding ``state_dict`` (numpy or torch values; strict key match)."""
    new = copy.deepcopy(model)
    new.load_state_dict({k: _as_tensor(v).float() for k, v in state_dict.items()}, strict=True)
    return new.eval()


def state_dict_numpy(model_or_sd: Any) -> dict[str, np.ndarray]:
    """A model's (or a state dict's) values as float32 numpy arrays (comparable with
    :func:`fisher_jax.models.state_dict`)."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    return {k: np.asarray(_as_tensor(v).float().cpu().numpy(), np.float32) for k, v in sd.items()}


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits ``[N, C]``, labels ``[N]`` and weights ``[N]`` over all batches (padding rows kept;
    their weight is 0)."""
    model.eval()
    regression = is_regression(model)
    logits, labels, weights = [], [], []
    for batch in batches:
        tb = to_torch_batch(batch, regression, device_of(model))
        logits.append(model(**_model_inputs(model, tb)).logits.float().cpu().numpy())
        labels.append(np.asarray(batch["labels"]) if "labels" in batch else np.zeros(len(logits[-1])))
        weights.append(tb["weights"].cpu().numpy())
    if not logits:
        raise FisherJaxError("no batches to evaluate")
    return np.concatenate(logits), np.concatenate(labels), np.concatenate(weights)


__all__ = [
    "MaskHooks", "base_model", "body_parameters", "default_device", "device_of", "encoder_layers", "example_losses", "fisher_nodes_merge",
    "full_fisher", "geometry", "gram_stats", "is_regression", "load_model", "mask_fisher", "model_type",
    "node_weight", "predict", "regmean_merge", "simple_merge", "state_dict_numpy", "to_torch_batch",
    "with_state_dict",
]
