"""ExperimentConfig: one frozen record for the paper's protocol, read from YAML and validated
completely when it is loaded, before anything is computed.

```yaml
name: minilm_zoo
base: minilm                      # pre-trained body: folder, Hub id, or "minilm" (the pip package)
tasks:                            # fine-tuned checkpoints: one per task, or one per fine-tuning seed
  rte: [~/.cache/fisher_jax/zoo/minilm/rte_s0, ~/.cache/fisher_jax/zoo/minilm/rte_s1]
  mrpc: [~/.cache/fisher_jax/zoo/minilm/mrpc_s0, ~/.cache/fisher_jax/zoo/minilm/mrpc_s1]
methods: [simple, task_arithmetic, ties, dare, fisher, fisher_nodes, fisher_nodes_node, regmean]
method_kwargs: {ties: {density: 0.2, lam: 1.0}}               # optional overrides per method label
mask_fisher: {estimator: batch, num_examples: 128, batch_size: 32, seed: 0}   # seed: default `seed`
full_fisher: {estimator: expected, num_examples: 256, batch_size: 8}
gram: {num_examples: 256, batch_size: 32, mask_padding: true}
pairs: true                       # every pair of tasks
all_tasks: true                   # and the merge of all tasks
max_eval_examples: null           # cap dev rows per task (null: the whole dev split)
eval_seed: 0                      # seed of the random dev subset when max_eval_examples caps it
search: {held_out: 256, grid: {task_arithmetic: {lam: [0.3, 0.5, 0.7, 1.0]}}}   # optional
output_dir: benchmarks/results/zoo_experiment
```

A statistics section accepts the data keys :data:`DATA_KEYS` and every keyword parameter of its
callee (:data:`SECTIONS`) except those the runner supplies (:data:`RUNNER_SUPPLIED`); a method
entry accepts every parameter of ``fisher_jax.merging.METHODS[method]`` except the statistics and
base that ``merge`` supplies (:data:`MERGE_SUPPLIED`). Both are read from the callees' signatures,
so a new keyword of a callee is valid here at once; values are checked against its annotations.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import logging
import math
import os
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Union

from ..errors import FisherJaxError
from ..tree import did_you_mean

log = logging.getLogger(__name__)

# Statistics section -> its callee in fisher_jax.stats.
SECTIONS: dict[str, str] = {"mask_fisher": "mask_fisher", "full_fisher": "full_fisher", "gram": "gram_stats"}
# Keys of a statistics section that choose the examples (the runner's batching), not the callee.
DATA_KEYS: tuple[str, ...] = ("num_examples", "batch_size", "seed")
# Callee parameters the runner passes itself: never config keys.
# `modules` too: merges take every layer's Grams (RegMean++ asks for its stages itself).
RUNNER_SUPPLIED: tuple[str, ...] = ("model", "batches", "mesh", "checkpoint_dir", "checkpoint_every", "progress",
                                    "total", "task", "split", "modules")
# Merge-function parameters merge() fills in (bodies are the first positional one): never config keys.
MERGE_SUPPLIED: tuple[str, ...] = ("base", "fishers", "mask_fishers", "grams", "batches", "num_heads", "diagnostics",
                                   "report")
# The config's own defaults for each section; the callee's defaults fill in the rest.
SECTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "mask_fisher": {"estimator": "batch", "num_examples": 128, "batch_size": 32},
    "full_fisher": {"estimator": "expected", "num_examples": 256, "batch_size": 8},
    "gram": {"num_examples": 256, "batch_size": 32},
}
SEARCH_DEFAULTS: dict[str, Any] = {"held_out": 256, "grid": {}}
# Ranges by keyword name wherever it occurs (sections, methods, top level): checked at load so a
# bad value fails before statistics are computed; the callees keep their own checks.
POSITIVE = ("num_examples", "batch_size", "chunk_size", "eval_batch_size", "max_eval_examples", "held_out")
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    **{k: (lambda x: x >= 1, ">= 1") for k in POSITIVE},
    "seed": (lambda x: x >= 0, ">= 0"), "eval_seed": (lambda x: x >= 0, ">= 0"),
    "density": (lambda x: 0 < x <= 1, "in (0, 1]"), "drop_rate": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "alpha": (lambda x: 0 <= x <= 1, "in [0, 1]"), "floor": (lambda x: x >= 0, ">= 0"),
    "lam": (math.isfinite, "finite"), "rtol": (lambda x: x > 0, "> 0"), "noise_variance": (lambda x: x > 0, "> 0"),
}


def cache_root() -> Path:
    """``$FISHER_JAX_CACHE`` (read at call time, so a notebook may set it late), else ~/.cache/fisher_jax."""
    return Path(os.environ.get("FISHER_JAX_CACHE", Path.home() / ".cache" / "fisher_jax")).expanduser()


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A table column: ``label`` (e.g. "fisher_nodes_node") = ``method`` with ``kwargs``."""

    label: str
    method: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def _declared(self) -> tuple[str, ...]:
        """The statistics kinds the merge registry declares for this method."""
        from ..merging import REGISTRY

        spec = REGISTRY.get(self.method)
        return spec.needs if spec is not None else ()

    @property
    def needs(self) -> Optional[str]:
        """The statistics section whose files this method merges with (None: none)."""
        return next((k for k in self._declared() if k in SECTIONS), None)

    def accepts(self, n_models: int) -> bool:
        """Whether the method merges a subset of ``n_models`` tasks (slerp: pairs only)."""
        from ..merging import REGISTRY

        spec = REGISTRY.get(self.method)
        return spec is None or spec.accepts(n_models)

    @property
    def needs_base(self) -> bool:
        return "base" in self._declared()

    @property
    def needs_batches(self) -> bool:
        """Methods that run the network on each task's data (RegMean++, AdaMerging): the runner
        passes the ``gram`` section's training batches (never dev rows)."""
        return "batches" in self._declared()


# Labels a config may use without spelling out the method and its defaults.
DEFAULT_METHODS: dict[str, MethodSpec] = {
    "simple": MethodSpec("simple", "simple"),
    "task_arithmetic": MethodSpec("task_arithmetic", "task_arithmetic", (("lam", 0.5),)),
    "ties": MethodSpec("ties", "ties", (("density", 0.2), ("lam", 1.0))),
    "dare": MethodSpec("dare", "dare", (("drop_rate", 0.5), ("lam", 0.5), ("seed", 0))),
    "fisher": MethodSpec("fisher", "fisher", ()),
    # The *_normalized columns put each model's Fisher on one scale first (cross-entropy and
    # squared-error Fishers differ by orders of magnitude); their twins stay the released behaviour.
    "fisher_normalized": MethodSpec("fisher_normalized", "fisher", (("normalize", "layer"),)),
    "fisher_nodes": MethodSpec("fisher_nodes", "fisher_nodes", (("mapping", "reference"),)),
    "fisher_nodes_node": MethodSpec("fisher_nodes_node", "fisher_nodes", (("mapping", "node"),)),
    "fisher_nodes_normalized": MethodSpec("fisher_nodes_normalized", "fisher_nodes",
                                          (("mapping", "reference"), ("normalize", "layer"))),
    "regmean": MethodSpec("regmean", "regmean", (("alpha", 1.0),)),
    # Grams through the partially merged model, layer by layer (the gram section's training rows).
    "regmean_plusplus": MethodSpec("regmean_plusplus", "regmean_plusplus", (("alpha", 1.0),)),
    # mergekit's data-free methods and AdaMerging, at their papers' defaults; slerp takes two models.
    "slerp": MethodSpec("slerp", "slerp", (("t", 0.5),)),
    "model_stock": MethodSpec("model_stock", "model_stock"),
    "breadcrumbs": MethodSpec("breadcrumbs", "breadcrumbs"),
    "della": MethodSpec("della", "della"),
    "adamerging": MethodSpec("adamerging", "adamerging"),
}


# A config without `methods:` runs the seed papers' columns (and their normalised variants); the
# newer methods are opt-in by label.
CLASSIC_METHODS: tuple[str, ...] = ("simple", "task_arithmetic", "ties", "dare", "fisher", "fisher_normalized",
                                    "fisher_nodes", "fisher_nodes_node", "fisher_nodes_normalized", "regmean")


# --------------------------------------------------------------------------- what the callees accept
def _keyword_params(fn: Callable[..., Any], skip: tuple[str, ...], drop_first: bool) -> dict[str, inspect.Parameter]:
    params = list(inspect.signature(fn).parameters.values())[1 if drop_first else 0:]
    return {p.name: p for p in params
            if p.name not in skip and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


def _defaults(params: Mapping[str, inspect.Parameter]) -> dict[str, Any]:
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve (a TYPE_CHECKING import): values go unchecked
        return {}


def section_callee(name: str) -> Callable[..., Any]:
    """The ``fisher_jax.stats`` function a statistics section configures (:data:`SECTIONS`; imports JAX)."""
    from .. import stats

    if name not in SECTIONS:
        raise FisherJaxError(f"unknown statistics section '{name}'{did_you_mean(str(name), SECTIONS)}; "
                             f"known: {', '.join(SECTIONS)}")
    return getattr(stats, SECTIONS[name])


def section_params(name: str) -> dict[str, inspect.Parameter]:
    """Parameters of the section's callee a config may set: its signature minus :data:`RUNNER_SUPPLIED`."""
    return _keyword_params(section_callee(name), RUNNER_SUPPLIED, drop_first=False)


def section_keys(name: str) -> tuple[str, ...]:
    """Every key a statistics section accepts: :data:`DATA_KEYS`, then the callee's keywords."""
    return DATA_KEYS + tuple(k for k in section_params(name) if k not in DATA_KEYS)


def method_function(method: str) -> Callable[..., Any]:
    """``fisher_jax.merging.METHODS[method]``, with a did-you-mean for a misspelt name."""
    from ..merging import METHODS

    if method not in METHODS:
        raise FisherJaxError(f"unknown merge method '{method}'{did_you_mean(str(method), METHODS)}; "
                             f"known: {', '.join(METHODS)}")
    return METHODS[method]


def method_params(method: str) -> dict[str, inspect.Parameter]:
    """Parameters of a merge function a config may set: all but the bodies and :data:`MERGE_SUPPLIED`."""
    return _keyword_params(method_function(method), MERGE_SUPPLIED, drop_first=True)


# --------------------------------------------------------------------------- value checks
def _at(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _literals(hint: Any) -> tuple:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return typing.get_args(hint)
    if _is_union(origin):
        return tuple(x for a in typing.get_args(hint) for x in _literals(a))
    return ()


def _is_union(origin: Any) -> bool:
    import types

    return origin is Union or origin is getattr(types, "UnionType", Union)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value has the annotated type (int for float is fine; bool is never a number)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if _is_union(origin):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool or hint is str:
        return isinstance(value, hint)
    if hint is int:
        return number and isinstance(value, int)
    if hint is float:
        return number
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_fits, value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping):
        return isinstance(value, Mapping)
    return True  # trees, models, meshes: not values a config can hold


def _spell(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "").replace("NoneType", "None")


def check_value(path: str, key: str, value: Any, hint: Any = Any, choices: tuple = ()) -> None:
    """One config value against its annotation ``hint``, a fixed set ``choices`` and :data:`RANGES`."""
    if not _fits(value, hint) or (choices and value not in choices):
        options = choices or _literals(hint)
        want = "one of " + ", ".join(map(repr, options)) if choices else _spell(hint)
        extra = did_you_mean(value, map(str, options)) if isinstance(value, str) and options else ""
        if isinstance(value, str) and not extra and _fits(1.0, hint):
            try:
                float(value)
                extra = " (YAML 1.1 reads a number without a '.', such as 1e-6, as text: write 1.0e-6)"
            except ValueError:
                pass
        raise FisherJaxError(f"{_at(path, key)}: {value!r} is not {want}{extra}")
    check, what = RANGES.get(key, (None, ""))
    for v in value if isinstance(value, (list, tuple)) else (value,):
        if check and isinstance(v, (int, float)) and not isinstance(v, bool) and not check(v):
            raise FisherJaxError(f"{_at(path, key)} must be {what}, got {v!r}")


def _check_keys(path: str, keys: Any, accepted: list[str] | tuple[str, ...], method: Optional[str] = None) -> None:
    from ..merging.recipe import check_keys  # one unknown-key message for merge recipes and experiment configs

    check_keys(path, keys, accepted, method)


def _check_label(where: str, label: Any, labels: list[str]) -> None:
    """One-line error, with a did-you-mean, when ``label`` names no entry of ``methods``."""
    if label not in labels:
        raise FisherJaxError(f"{where}: '{label}' is not a label in methods{did_you_mean(str(label), labels)}; "
                             f"labels: {', '.join(labels)}")


def check_section(name: str, values: Mapping[str, Any]) -> None:
    """A statistics section's keys against :func:`section_keys` and its values against the callee's
    annotations; ``estimator`` against ``fisher_jax.stats.records.ESTIMATORS``."""
    from ..stats.records import ESTIMATORS  # no JAX import while validating

    if not isinstance(values, Mapping):
        raise FisherJaxError(f"{name}: must be a mapping of keys to values, got {type(values).__name__}")
    _check_keys(name, values, section_keys(name))
    hints = _hints(section_callee(name))
    for key, value in values.items():
        check_value(name, key, value, int if key in DATA_KEYS else hints.get(key, Any),
                    tuple(ESTIMATORS) if key == "estimator" else ())


def check_method_kwargs(path: str, method: str, kwargs: Mapping[str, Any]) -> None:
    """``kwargs`` against the parameters of ``fisher_jax.merging.METHODS[method]`` and their annotations."""
    if not isinstance(kwargs, Mapping):
        raise FisherJaxError(f"{path}: must be a mapping of keyword to value, got {type(kwargs).__name__}")
    params = method_params(method)
    _check_keys(path, kwargs, list(params), method=method)
    hints = _hints(method_function(method))
    for key, value in kwargs.items():
        check_value(path, key, value, hints.get(key, Any))


def _frozen(v: Any) -> Any:
    if isinstance(v, Mapping):
        return tuple((k, _frozen(x)) for k, x in v.items())
    return tuple(_frozen(x) for x in v) if isinstance(v, (list, tuple)) else v


def _freeze(d: Mapping[str, Any]) -> tuple:
    return _frozen(d)


def _thaw(t: Any) -> Any:
    if isinstance(t, tuple) and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in t):
        return {k: _thaw(v) for k, v in t}
    return list(t) if isinstance(t, tuple) else t


def _plain(v: Any) -> Any:
    """Tuples as lists, recursively: the JSON form of a resolved value."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


# --------------------------------------------------------------------------- the record
_SCALARS = ("name", "base", "glue_dir", "output_dir", "cache_dir", "pairs", "all_tasks", "max_eval_examples",
            "eval_batch_size", "eval_seed", "seed")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The protocol of one experiment; checked completely on construction (:func:`validate`).

    ``tasks``: ``(task, (checkpoint, ...))`` in table order; one checkpoint per fine-tuning seed
    (:attr:`replicates`), or one serving every replicate. A plain ``(task, path)`` is accepted and
    stored as ``(task, (path,))``. Statistics sections hold only what the config sets;
    :meth:`section` resolves them.
    """

    name: str
    tasks: tuple[tuple[str, tuple[str, ...]], ...]
    base: Optional[str] = None
    methods: tuple[MethodSpec, ...] = tuple(DEFAULT_METHODS[m] for m in CLASSIC_METHODS)
    glue_dir: Optional[str] = None
    output_dir: str = dataclasses.field(default_factory=lambda: str(cache_root() / "experiments" / "default"))
    cache_dir: str = dataclasses.field(default_factory=lambda: str(cache_root() / "stats"))
    mask_fisher: tuple[tuple[str, Any], ...] = tuple(SECTION_DEFAULTS["mask_fisher"].items())
    full_fisher: tuple[tuple[str, Any], ...] = tuple(SECTION_DEFAULTS["full_fisher"].items())
    gram: tuple[tuple[str, Any], ...] = tuple(SECTION_DEFAULTS["gram"].items())
    pairs: bool = True
    all_tasks: bool = True
    max_eval_examples: Optional[int] = None
    eval_batch_size: int = 64
    eval_seed: int = 0
    search: tuple[tuple[str, Any], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        def set_(key: str, value: Any) -> None:  # frozen: normalise in place, once, before validating
            object.__setattr__(self, key, value)

        set_("tasks", _normalize_tasks(self.tasks))
        for key in ("base", "glue_dir", "output_dir", "cache_dir"):
            if isinstance(getattr(self, key), os.PathLike):
                set_(key, os.fspath(getattr(self, key)))
        if self.max_eval_examples == 0 and not isinstance(self.max_eval_examples, bool):
            set_("max_eval_examples", None)  # the CLI's "0: the whole dev split"
        for key in (*SECTIONS, "search"):
            if isinstance(getattr(self, key), Mapping):
                set_(key, _freeze(getattr(self, key)))
        set_("methods", tuple(self.methods))
        validate(self)

    # ------------------------------------------------------------------ tasks and checkpoints
    @property
    def task_names(self) -> list[str]:
        return [t for t, _ in self.tasks]

    @property
    def replicates(self) -> int:
        """Number of fine-tuning seeds: the longest checkpoint list (every list has it, or one entry)."""
        return max(len(paths) for _, paths in self.tasks)

    def checkpoints(self, replicate: int = 0) -> dict[str, str]:
        """``{task: checkpoint}`` of replicate ``replicate`` (a single checkpoint serves every replicate)."""
        if not isinstance(replicate, int) or not 0 <= replicate < self.replicates:
            raise FisherJaxError(f"replicate must be in 0..{self.replicates - 1}, got {replicate!r}")
        return {t: paths[replicate if len(paths) > 1 else 0] for t, paths in self.tasks}

    # ------------------------------------------------------------------ resolved settings
    def method(self, label: str) -> MethodSpec:
        """The column labelled ``label``."""
        for spec in self.methods:
            if spec.label == label:
                return spec
        labels = [m.label for m in self.methods]
        raise FisherJaxError(f"no method labelled '{label}'{did_you_mean(str(label), labels)}; "
                             f"labels: {', '.join(labels)}")

    def resolved_method_kwargs(self, label: str) -> dict[str, Any]:
        """Keywords the column ``label`` merges with: its method function's defaults (every parameter
        but those :data:`MERGE_SUPPLIED`) overlaid with the config's."""
        spec = self.method(label)
        return {**_defaults(method_params(spec.method)), **dict(spec.kwargs)}

    def section(self, name: str) -> dict[str, Any]:
        """A resolved section. Statistics (``mask_fisher``, ``full_fisher``, ``gram``): the callee's
        defaults < :data:`SECTION_DEFAULTS` < ``seed`` (the config's) < the config's section, data
        keys first. ``search``: :data:`SEARCH_DEFAULTS` < the config's, or ``{}`` when there is none."""
        if name == "search":
            return {**SEARCH_DEFAULTS, **_thaw(self.search)} if self.search else {}
        params = section_params(name)  # raises for an unknown name
        out = {**_defaults(params), **SECTION_DEFAULTS[name], "seed": self.seed, **dict(getattr(self, name))}
        return {k: out[k] for k in section_keys(name) if k in out}

    def stats_kwargs(self, name: str) -> dict[str, Any]:
        """The resolved section's keywords of its callee (``seed`` included where the callee takes one)."""
        params = section_params(name)
        return {k: v for k, v in self.section(name).items() if k in params}

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved config (JSON types): every default filled in, every method's resolved
        keywords, every section with its seed. ``from_dict(c.to_dict())`` gives the same ``to_dict()``."""
        return {
            "name": self.name, "base": self.base, "tasks": {t: _task_entry(t, p) for t, p in self.tasks},
            "methods": [{"label": m.label, "method": m.method, **_plain(self.resolved_method_kwargs(m.label))}
                        for m in self.methods],
            "glue_dir": self.glue_dir, "output_dir": self.output_dir, "cache_dir": self.cache_dir,
            **{s: _plain(self.section(s)) for s in SECTIONS},
            "pairs": self.pairs, "all_tasks": self.all_tasks, "max_eval_examples": self.max_eval_examples,
            "eval_batch_size": self.eval_batch_size, "eval_seed": self.eval_seed,
            "search": _plain(self.section("search")), "seed": self.seed,
        }


def _task_entry(task: str, paths: tuple[str, ...]) -> Any:
    """How ``to_dict`` writes a task: its checkpoints, with its task file when it came from one."""
    from ..data.glue import get_task

    spec_file = get_task(task).task_file
    return {"task": spec_file, "checkpoint": list(paths)} if spec_file else list(paths)


def _is_task_file(task: Any) -> bool:
    return str(task).lower().endswith((".yaml", ".yml"))


def _task_files_relative_to(raw: Mapping[str, Any], folder: Path) -> Mapping[str, Any]:
    """``raw`` with relative task-file paths in ``tasks`` made relative to the config's folder."""
    tasks = raw.get("tasks")
    if not isinstance(tasks, Mapping):
        return raw

    def fix(t: Any) -> Any:
        return str(folder / t) if _is_task_file(t) and not Path(str(t)).expanduser().is_absolute() else t

    fixed = {}
    for key, value in tasks.items():
        if isinstance(value, Mapping) and "task" in value:
            value = {**value, "task": fix(value["task"])}
        fixed[fix(key)] = value
    return {**raw, "tasks": fixed}


def _normalize_tasks(tasks: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``{task: path | [paths]}`` or ``((task, path | paths), ...)`` -> ``((task, (paths...)), ...)``."""
    from ..data.glue import TASKS, get_task

    items = list(tasks.items()) if isinstance(tasks, Mapping) else tasks
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, (list, tuple)) and len(x) == 2 for x in items) \
            or len(items) < 2:
        raise FisherJaxError("tasks: must map at least two task names to checkpoints")
    out: dict[str, tuple[str, ...]] = {}
    for task, paths in items:
        if isinstance(paths, Mapping):  # {name: {task: TASK_FILE_OR_GLUE_NAME, checkpoint: DIR | [DIRs]}}
            extra = sorted(set(map(str, paths)) - {"task", "checkpoint", "checkpoints"})
            if extra:
                raise FisherJaxError(f"tasks.{task}: unknown key '{extra[0]}'"
                                     f"{did_you_mean(extra[0], ('task', 'checkpoint'))}; give task: and checkpoint:")
            if "task" not in paths or not ({"checkpoint", "checkpoints"} & set(paths)):
                raise FisherJaxError(f"tasks.{task}: give task: (a GLUE name or task file) and checkpoint:")
            task, paths = paths["task"], paths.get("checkpoint", paths.get("checkpoints"))
        if _is_task_file(task):
            try:
                name = get_task(os.fspath(task)).name
            except FisherJaxError as exc:
                raise FisherJaxError(f"tasks: {exc}") from None
        else:
            try:
                name = get_task(str(task)).name
            except FisherJaxError:
                raise FisherJaxError(f"tasks: unknown GLUE task '{task}'{did_you_mean(str(task).lower(), TASKS)}; "
                                     f"known tasks: {', '.join(TASKS)} (or give a task file: *.yaml)") from None
        if name in out:
            raise FisherJaxError(f"tasks: '{task}' names {name} a second time")
        paths = (paths,) if isinstance(paths, (str, os.PathLike)) else paths
        if not isinstance(paths, (list, tuple)) or not paths \
                or not all(isinstance(p, (str, os.PathLike)) and str(p) for p in paths):
            raise FisherJaxError(f"tasks.{task}: give a checkpoint (folder or Hub id) or a non-empty list of them, "
                                 f"got {paths!r}")
        out[name] = tuple(os.fspath(p) for p in paths)
    counts = {len(p) for p in out.values()} - {1}
    if len(counts) > 1:
        listed = ", ".join(f"{t}: {len(p)}" for t, p in out.items())
        raise FisherJaxError(f"tasks: every task must list the same number of checkpoints (or one); got {listed}")
    return tuple(out.items())


def validate(config: ExperimentConfig) -> None:
    """Every value of ``config``: top-level types and ranges (the dataclass annotations), statistics
    sections (:func:`check_section`), methods (names, unique labels, :func:`check_method_kwargs`)
    and ``search`` (keys, grid labels and keywords). Raises a one-line ``FisherJaxError``."""
    hints = typing.get_type_hints(ExperimentConfig)
    for key in _SCALARS:
        check_value("", key, getattr(config, key), hints[key])
    for name in SECTIONS:  # with the config's defaults, which a changed callee could invalidate
        check_section(name, {**SECTION_DEFAULTS[name], **_thaw(getattr(config, name))})
    labels = []
    for spec in config.methods:
        if not isinstance(spec, MethodSpec):
            raise FisherJaxError(f"methods: expected MethodSpec entries, got {spec!r}")
        if spec.label in labels:
            raise FisherJaxError(f"methods: label '{spec.label}' appears twice; give one entry another 'label'")
        labels.append(spec.label)
        method_function(spec.method)
        params = method_params(spec.method)
        check_method_kwargs(f"methods.{spec.label}", spec.method, dict(spec.kwargs))
        missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in dict(spec.kwargs)]
        if missing:
            raise FisherJaxError(f"methods.{spec.label}: method '{spec.method}' needs keyword '{missing[0]}'")
    if not labels:
        raise FisherJaxError("methods: no method to run")
    _check_search(config)


def _check_search(config: ExperimentConfig) -> None:
    search = _thaw(config.search) if config.search else {}
    if not isinstance(search, Mapping):
        raise FisherJaxError(f"search: must be a mapping with {', '.join(SEARCH_DEFAULTS)}, got {search!r}")
    _check_keys("search", search, list(SEARCH_DEFAULTS))
    if "held_out" in search:
        check_value("search", "held_out", search["held_out"], int)
    grid = search.get("grid") or {}
    if not isinstance(grid, Mapping):
        raise FisherJaxError(f"search.grid: must map method labels to {{keyword: [values]}}, got {grid!r}")
    labels = [m.label for m in config.methods]
    for label, space in grid.items():
        _check_label("search.grid", label, labels)
        method = config.method(label).method
        space = space if isinstance(space, Mapping) else None
        if not space:
            raise FisherJaxError(f"search.grid.{label}: must map keywords to lists of values")
        _check_keys(f"search.grid.{label}", space, list(method_params(method)), method=method)
        hints = _hints(method_function(method))
        for key, values in space.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise FisherJaxError(f"search.grid.{label}.{key}: must be a non-empty list of values, got {values!r}")
            for v in values:
                check_value(f"search.grid.{label}", key, v, hints.get(key, Any))


# --------------------------------------------------------------------------- reading
def _methods(raw: Any, overrides: Any) -> tuple[MethodSpec, ...]:
    from ..merging import METHODS

    names = list(DEFAULT_METHODS) + [m for m in METHODS if m not in DEFAULT_METHODS]
    if raw is None:
        raw = list(DEFAULT_METHODS)
    if not isinstance(raw, (list, tuple)) or not raw:
        raise FisherJaxError(f"methods: must be a non-empty list of labels ({', '.join(names)}) or "
                             f"{{method: ..., label: ..., keyword: value}} entries, got {raw!r}")
    specs = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            if item not in names:
                raise FisherJaxError(f"methods: unknown method '{item}'{did_you_mean(item, names)}; "
                                     f"known: {', '.join(names)}")
            spec = DEFAULT_METHODS.get(item) or MethodSpec(item, item)
        elif isinstance(item, Mapping) and "method" in item:
            method, label = item["method"], item.get("label", item["method"])
            if not isinstance(method, str) or not isinstance(label, str):
                raise FisherJaxError(f"methods[{i}]: 'method' and 'label' must be names, got {method!r} and {label!r}")
            try:
                method_function(method)
            except FisherJaxError as exc:
                raise FisherJaxError(f"methods.{label}: {exc}") from None
            kw = {k: v for k, v in item.items() if k not in ("label", "method")}
            check_method_kwargs(f"methods.{label}", method, kw)
            spec = MethodSpec(label, method, _frozen(kw))
        else:
            raise FisherJaxError(f"methods[{i}]: an entry must be a method label or a mapping with 'method', "
                                 f"got {item!r}")
        specs.append(spec)
    labels = [s.label for s in specs]
    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, Mapping):
        raise FisherJaxError(f"method_kwargs: must map method labels to {{keyword: value}}, got {overrides!r}")
    for label in overrides:
        _check_label("method_kwargs", label, labels)
    out = []
    for spec in specs:
        if spec.label in overrides:
            check_method_kwargs(f"method_kwargs.{spec.label}", spec.method, overrides[spec.label])
            spec = dataclasses.replace(spec, kwargs=_frozen({**dict(spec.kwargs), **overrides[spec.label]}))
        out.append(spec)
    return tuple(out)


def _from_dict(raw: Any, where: str) -> ExperimentConfig:
    if not isinstance(raw, Mapping):
        raise FisherJaxError(f"expected a mapping at the top level, got {type(raw).__name__}")
    _check_keys("", raw, [f.name for f in dataclasses.fields(ExperimentConfig)] + ["method_kwargs"])
    kw: dict[str, Any] = {k: raw[k] for k in _SCALARS if raw.get(k) is not None}
    kw.setdefault("name", Path(where).stem)
    kw["tasks"] = raw.get("tasks")
    for key in (*SECTIONS, "search"):
        if raw.get(key) is not None:
            if not isinstance(raw[key], Mapping):
                raise FisherJaxError(f"{key}: must be a mapping of keys to values, got {raw[key]!r}")
            if key in SECTIONS:
                check_section(key, raw[key])  # before the methods: the first typo in file order
            kw[key] = _freeze(raw[key])
    kw["methods"] = _methods(raw.get("methods"), raw.get("method_kwargs"))
    return ExperimentConfig(**kw)


def from_dict(raw: Mapping[str, Any], where: str = "config") -> ExperimentConfig:
    """An :class:`ExperimentConfig` from a YAML mapping, validated completely (:func:`validate`);
    every problem is one ``FisherJaxError`` line ``"<where>: <section>.<key>: ..."``."""
    try:
        config = _from_dict(raw, where)
    except FisherJaxError as exc:
        raise FisherJaxError(f"{where}: {exc}") from None
    single = [t for t, p in config.tasks if len(p) == 1]
    if config.replicates > 1 and single:
        log.warning("%s: %s list(s) one checkpoint, which serves all %d replicates", where, ", ".join(single),
                    config.replicates)
    return config


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    """:func:`from_dict` of a YAML file, or of a packaged config by name (``minilm_zoo``)."""
    import yaml

    p = Path(path)
    packaged = Path(__file__).resolve().parents[1] / "configs" / f"{p.stem}.yaml"
    if not p.is_file() and packaged.is_file() and p.name in (p.stem, packaged.name):
        p = packaged  # a packaged config by name: "minilm_zoo" or "minilm_zoo.yaml"
    if not p.is_file():
        known = ", ".join(sorted(x.stem for x in packaged.parent.glob("*.yaml")))
        raise FisherJaxError(f"experiment config '{p}' does not exist (packaged configs: {known})")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise FisherJaxError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, Mapping):
        raise FisherJaxError(f"{p}: expected a mapping at the top level")
    # Relative output_dir is relative to the working directory, as for every other CLI path; a
    # task file is part of the config, so its relative path is relative to the config's folder.
    return from_dict(_task_files_relative_to(raw, p.resolve().parent), str(p))
