"""Statistics records (mask Fisher, full Fisher, Grams) and their files.

A statistics file is one ``.safetensors`` file: the arrays under flat names, plus JSON metadata
in the safetensors header (``metadata["fisher_jax"]``, a string). This module needs only numpy
and safetensors — no JAX — so statistics can be inspected anywhere::

    from safetensors import safe_open
    with safe_open("rte.fisher.safetensors", framework="np") as f:
        meta = json.loads(f.metadata()["fisher_jax"]); head = f.get_tensor("head")

Array names: mask Fisher ``head`` ``[L, H]`` and ``neuron`` ``[L, I]``; full Fisher the body
paths (``body/encoder/layer/0/attention/self/query/kernel``...); Grams the Dense module paths
(``encoder/layer/0/attention/self/query``), each distinct array stored once: query, key and
value share one Gram, and ``meta["aliases"]`` maps ``.../key`` and ``.../value`` to ``.../query``.

Metadata (all kinds): ``kind`` (mask_fisher | full_fisher | gram), ``estimator``,
``num_examples``, ``task``, ``split``, ``fingerprint`` (see :func:`fingerprint`), ``arch`` (the
shape-defining architecture fields), ``library_version``, ``created`` (UTC, ISO 8601). Fishers
add ``loss`` (``cross_entropy`` | ``mse``; older files: see :func:`loss_of`) and, for regression's
``expected``/``sampled`` estimators, ``noise_variance`` (the Gaussian likelihood's sigma^2).
:func:`check_fits` compares a record against a model: shapes and architecture must match
(error), the weights fingerprint should (warning).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from .. import tree
from ..errors import FisherJaxError

FORMAT = "fisher_jax.stats/1"
KINDS = ("mask_fisher", "full_fisher", "gram")
# Architecture fields whose mismatch makes statistics meaningless for a model (an error).
SHAPE_FIELDS = ("model_type", "num_layers", "num_heads", "intermediate_size", "hidden_size", "embedding_size")
# Fields recorded (and hashed into the fingerprint) besides the shape fields.
ARCH_FIELDS = SHAPE_FIELDS + ("vocab_size", "max_position_embeddings", "type_vocab_size", "hidden_act", "num_labels")


# --------------------------------------------------------------------------- records
@dataclasses.dataclass
class MaskFisher:
    """Diagonal Fisher of the mask nodes (SPEC §2): ``head [L, H]``, ``neuron [L, I]`` (float32).

    ``num_examples`` counts the real (weight > 0) examples; ``meta`` says how it was made.
    """

    head: np.ndarray
    neuron: np.ndarray
    num_examples: int
    meta: dict = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"MaskFisher(head={tuple(np.shape(self.head))}, neuron={tuple(np.shape(self.neuron))}, "
                f"num_examples={self.num_examples}, estimator={self.meta.get('estimator')!r})")


class FullFisher(dict):
    """Diagonal Fisher of every body parameter: ``{"body": tree}`` shaped like ``params["body"]``.

    A plain dict (what merges expect) with ``num_examples`` and ``meta`` attributes.
    """

    def __init__(self, body: Mapping[str, Any], num_examples: int = 0, meta: Optional[dict] = None):
        super().__init__(body=body)
        self.num_examples = int(num_examples)
        self.meta = dict(meta or {})

    def __repr__(self) -> str:
        return (f"FullFisher({len(tree.flatten(self['body']))} tensors, num_examples={self.num_examples}, "
                f"estimator={self.meta.get('estimator')!r})")


class Grams(dict):
    """RegMean Grams ``G = X^T X / #rows`` keyed by Dense body path (``encoder/layer/0/attention/self/query``).

    A flat dict (what ``fj.merge("regmean", grams=[...])`` expects); query, key and value map to the
    *same* array object. ``num_tokens`` counts the token rows every per-token layer saw,
    ``num_examples`` the examples (the BERT pooler's rows); ``aliases`` maps shared keys to the key
    that owns the array.
    """

    def __init__(self, grams: Mapping[str, np.ndarray], num_tokens: int = 0, num_examples: int = 0,
                 meta: Optional[dict] = None):
        super().__init__(grams)
        self.num_tokens = int(num_tokens)
        self.num_examples = int(num_examples)
        self.meta = dict(meta or {})

    @property
    def grams(self) -> dict[str, np.ndarray]:
        return dict(self)

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self.meta.get("aliases", {}))

    def __repr__(self) -> str:
        return f"Grams({len(self)} layers, num_tokens={self.num_tokens}, num_examples={self.num_examples})"


Stats = Union[MaskFisher, FullFisher, Grams]


def kind_of(stats: Any) -> str:
    if isinstance(stats, MaskFisher) or (hasattr(stats, "head") and hasattr(stats, "neuron")):
        return "mask_fisher"
    if isinstance(stats, Grams):
        return "gram"
    if isinstance(stats, Mapping) and "body" in stats:
        return "full_fisher"
    raise FisherJaxError(
        f"cannot tell what statistics a {type(stats).__name__} holds: expected a MaskFisher, a full Fisher "
        "({'body': tree}) or Grams"
    )


# --------------------------------------------------------------------------- fingerprints
def arch_dict(arch: Any) -> dict[str, Any]:
    """The recorded architecture fields of an ``ArchConfig`` (or a model)."""
    arch = getattr(arch, "arch", arch)
    return {f: getattr(arch, f) for f in ARCH_FIELDS}


def _sample(x: Any, n: int = 4096) -> bytes:
    a = np.asarray(x, dtype=np.float32).ravel()
    step = max(1, a.size // n)
    return np.ascontiguousarray(a[::step][:n]).tobytes()


def fingerprint(model: Any) -> str:
    """``"<arch>-<weights>"``: sha256 of the architecture fields + of a strided sample of a few tensors.

    Cheap (a few thousand numbers), stable across save/load, and different for any fine-tune or
    merge in practice: it samples the word embeddings, the first and last layer's query kernel and
    FFN output kernel, and the task head.
    """
    arch_hash = hashlib.sha256(json.dumps(arch_dict(model), sort_keys=True).encode()).hexdigest()
    flat = tree.flatten(model.params)
    names = sorted(flat)
    body = [n for n in names if n.startswith("body/")]
    layer_keys = [n for n in body if n.endswith(("query/kernel", "q_lin/kernel", "output/dense/kernel", "lin2/kernel"))]
    picks = [n for n in body if n.endswith("word_embeddings/embedding")]
    picks += layer_keys[:2] + layer_keys[-2:]
    picks += [n for n in names if n.startswith("head/") and n.endswith("kernel")][-1:]
    h = hashlib.sha256()
    for n in dict.fromkeys(picks):
        h.update(n.encode())
        h.update(_sample(flat[n]))
    return f"{arch_hash[:12]}-{h.hexdigest()[:16]}"


def base_meta(kind: str, model: Any, estimator: Optional[str] = None, **extra: Any) -> dict[str, Any]:
    """Metadata every statistics record starts from."""
    from .. import __version__

    meta = {
        "kind": kind,
        "estimator": estimator,
        "task": None,
        "split": None,
        "fingerprint": fingerprint(model),
        "arch": arch_dict(model),
        "library_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(extra)
    return meta


LOSSES = ("cross_entropy", "mse")


def loss_name(regression: bool) -> str:
    """The training loss a Fisher differentiates: ``"mse"`` for regression, else ``"cross_entropy"``."""
    return "mse" if regression else "cross_entropy"


def loss_of(meta: Mapping[str, Any]) -> Optional[str]:
    """A Fisher record's loss: ``meta["loss"]``, or for files written before it was recorded,
    inferred from the architecture's ``num_labels`` (1 = regression) or the task's registry entry;
    ``None`` when nothing says."""
    loss = meta.get("loss")
    if loss in LOSSES:
        return loss
    labels = (meta.get("arch") or {}).get("num_labels")
    if isinstance(labels, int) and labels > 0:
        return loss_name(labels == 1)
    task = meta.get("task")
    if task:
        from ..data.glue import get_task  # only files without `loss` or `arch` get here

        try:
            return loss_name(get_task(task).is_regression)
        except FisherJaxError:  # a custom task name the registry does not know
            return None
    return None


# --------------------------------------------------------------------------- files
def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def save_stats(path: Union[str, os.PathLike], stats: Stats, *, task: Optional[str] = None,
               split: Optional[str] = None) -> Path:
    """Write ``stats`` to a ``.safetensors`` file (atomically); ``task``/``split`` override the metadata.

    Returns the path written.
    """
    from safetensors.numpy import save_file

    kind = kind_of(stats)
    meta = dict(getattr(stats, "meta", {}) or {})
    meta["kind"] = kind
    if task is not None:
        meta["task"] = task
    if split is not None:
        meta["split"] = split
    meta["num_examples"] = int(getattr(stats, "num_examples", meta.get("num_examples", 0)) or 0)
    if kind == "mask_fisher":
        arrays = {"head": stats.head, "neuron": stats.neuron}
    elif kind == "full_fisher":
        arrays = tree.flatten({"body": stats["body"]})
    else:
        meta["num_tokens"] = int(getattr(stats, "num_tokens", meta.get("num_tokens", 0)) or 0)
        owners: dict[int, str] = {}
        aliases: dict[str, str] = {}
        arrays = {}
        for key, g in stats.items():
            if id(g) in owners:  # q/k/v: one array, stored once
                aliases[key] = owners[id(g)]
            else:
                owners[id(g)] = key
                arrays[key] = g
        meta["aliases"] = aliases
        meta["order"] = list(stats)  # safetensors sorts names; keep the layer order
    arrays = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp), metadata={"format": FORMAT, "kind": kind, "fisher_jax": json.dumps(_jsonable(meta))})
    os.replace(tmp, path)
    return path


def read_stats_file(path: Union[str, os.PathLike]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, meta)`` of a statistics file; every failure is a one-line ``FisherJaxError``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FisherJaxError(f"statistics file '{path}' does not exist")
    try:
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError / OSError on bad files
        raise FisherJaxError(f"cannot read statistics file '{path}' (corrupt or not safetensors): {e}") from None
    if "fisher_jax" not in header:
        raise FisherJaxError(f"'{path}' is a safetensors file but not a fisher_jax statistics file (no metadata)")
    try:
        meta = json.loads(header["fisher_jax"])
    except json.JSONDecodeError as e:
        raise FisherJaxError(f"statistics file '{path}' has corrupt metadata: {e}") from None
    if meta.get("kind") not in KINDS:
        raise FisherJaxError(f"statistics file '{path}' has unknown kind {meta.get('kind')!r}")
    return arrays, meta


def load_stats(path: Union[str, os.PathLike]) -> Stats:
    """Read a file written by :func:`save_stats` back into a MaskFisher, FullFisher or Grams."""
    arrays, meta = read_stats_file(path)
    kind = meta["kind"]
    n = int(meta.get("num_examples", 0))
    if kind == "mask_fisher":
        missing = {"head", "neuron"} - set(arrays)
        if missing:
            raise FisherJaxError(f"mask Fisher file '{path}' lacks {sorted(missing)}")
        return MaskFisher(arrays["head"], arrays["neuron"], n, meta)
    if kind == "full_fisher":
        if not arrays or not all(k.startswith("body/") for k in arrays):
            raise FisherJaxError(f"full Fisher file '{path}' holds no body tensors")
        return FullFisher(tree.unflatten(arrays)["body"], n, meta)
    grams = dict(arrays)
    for alias, owner in meta.get("aliases", {}).items():
        if owner not in grams:
            raise FisherJaxError(f"Gram file '{path}': '{alias}' refers to missing '{owner}'")
        grams[alias] = grams[owner]  # the same object, as gram_stats returns it
    order = [k for k in meta.get("order", []) if k in grams]
    grams = {k: grams[k] for k in order + sorted(set(grams) - set(order))}
    return Grams(grams, meta.get("num_tokens", 0), n, meta)


# --------------------------------------------------------------------------- fit checks
def _describe(a: Mapping[str, Any]) -> str:
    return (f"{a.get('model_type')} with {a.get('num_layers')} layers x {a.get('num_heads')} heads, "
            f"FFN {a.get('intermediate_size')}, hidden {a.get('hidden_size')}")


def check_fits(stats: Stats, model: Any) -> None:
    """Raise ``FisherJaxError`` unless ``stats`` fit ``model``'s architecture and shapes.

    Statistics of another architecture (layers, heads, FFN width, hidden size, family) are an
    error. Same shapes but a different weights fingerprint (e.g. the stats were computed on another
    fine-tune, or before a merge) is only a warning: legitimate, but worth knowing.
    """
    kind = kind_of(stats)
    meta = getattr(stats, "meta", {}) or {}
    want = arch_dict(model)
    have = meta.get("arch")
    if have:
        diff = [f for f in SHAPE_FIELDS if f in have and have[f] != want[f]]
        if diff:
            raise FisherJaxError(
                f"{kind} statistics were computed for a {_describe(have)}, but the model is a {_describe(want)} "
                f"(mismatch in {', '.join(diff)})"
            )
    L, H, I = want["num_layers"], want["num_heads"], want["intermediate_size"]
    if kind == "mask_fisher":
        if np.shape(stats.head) != (L, H) or np.shape(stats.neuron) != (L, I):
            raise FisherJaxError(
                f"mask Fisher has head {np.shape(stats.head)} and neuron {np.shape(stats.neuron)}, but the model "
                f"needs head ({L}, {H}) and neuron ({L}, {I}): statistics for another model"
            )
    elif kind == "full_fisher":
        try:
            tree.check_same_structure(tree.flatten(stats["body"]), tree.flatten(model.params["body"]),
                                      what="full Fisher and model body")
        except FisherJaxError as e:
            raise FisherJaxError(f"{e}: statistics for another model") from None
    else:
        body = tree.flatten(model.params["body"])
        for key, g in stats.items():
            kernel = body.get(f"{key}/kernel")
            if kernel is None:
                raise FisherJaxError(f"Gram '{key}' names no Dense layer of this model's body"
                                     f"{tree.did_you_mean(key + '/kernel', body)}")
            d = int(np.shape(kernel)[0])
            if np.shape(g) != (d, d):
                raise FisherJaxError(f"Gram '{key}' has shape {tuple(np.shape(g))} but the layer's input is {d}-dim: "
                                     "statistics for another model")
    fp = meta.get("fingerprint")
    if fp:
        mine = fingerprint(model)
        if fp != mine:
            warnings.warn(
                f"{kind} statistics were computed on different weights (fingerprint {fp}, model {mine}); "
                "fine if they belong to this model before a merge or fine-tune",
                stacklevel=2,
            )




# --------------------------------------------------------------------------- resumable runs
class Checkpointer:
    """Running sums of a long statistics pass, saved with orbax every ``every`` batches.

    The directory holds one checkpoint (the latest): the sums (numpy) plus JSON with the number of
    batches consumed and a ``run`` record (kind, estimator, seed, model fingerprint). Resuming
    with a different ``run`` record is refused rather than silently mixing two runs.
    """

    def __init__(self, directory: Union[str, os.PathLike], run: Mapping[str, Any], every: int = 50):
        import orbax.checkpoint as ocp

        if every < 1:
            raise FisherJaxError(f"checkpoint_every must be >= 1, got {every}")
        self._ocp = ocp
        self.directory = Path(directory).expanduser().absolute()
        self.run = _jsonable(dict(run))
        self.every = int(every)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True),
        )

    def restore(self, template: Any) -> Optional[tuple[Any, int]]:
        """``(sums, batches_consumed)`` of the latest checkpoint, or ``None`` when there is none."""
        step = self._manager.latest_step()
        if step is None:
            return None
        ocp = self._ocp
        try:
            got = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore())
            )
        except Exception as e:
            raise FisherJaxError(f"cannot resume from checkpoint '{self.directory}' (step {step}): {e}") from None
        if got.meta.get("run") != self.run:
            raise FisherJaxError(
                f"checkpoint_dir '{self.directory}' holds another run ({got.meta.get('run')}), not {self.run}: "
                "use a fresh directory"
            )
        return got.state, int(got.meta["batches"])

    def save(self, state: Any, batches: int) -> None:
        ocp = self._ocp
        self._manager.save(
            batches,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave({"run": self.run, "batches": int(batches)})),
            force=True,
        )
        self._manager.wait_until_finished()


__all__ = [
    "Checkpointer", "FullFisher", "Grams", "LOSSES", "MaskFisher", "arch_dict", "base_meta", "check_fits", "fingerprint",
    "kind_of", "load_stats", "loss_name", "loss_of", "read_stats_file", "save_stats",
]
