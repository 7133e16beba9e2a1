"""Merge recipes: one YAML file describing a whole merge, mergekit-style (``fisher-jax merge --config``).

```yaml
merge_method: ties                 # any name in fisher_jax.merging.METHODS
base_model: runs/bert-base         # when the method needs the pre-trained model
models:
  - model: runs/rte                # a model folder (or a plain string)
    parameters: {lam: 0.7}         # this model's coefficients
    statistics: rte.fisher.safetensors   # a statistics file to reuse, or
    task: rte                      # the data to compute them on
  - model: runs/mrpc
parameters:                        # every model; per-model values win
  density: 0.3                     # a number,
  lam: [0.2, 0.8]                  # a list: a gradient over the layers (as in mergekit),
  t:                               # or filters on the parameter's body path (first match wins)
    - {filter: attention, value: 0.3}
    - {value: 0.6}
statistics: {num_examples: 256, batch_size: 32, split: train}   # how to compute missing ones
dtype: float32                     # of the written models: float32, float16, bfloat16
out_dir: merged/                   # one HF folder per input model + merge_report.json
```

:func:`load_recipe` validates every key (with did-you-mean), every value it can check without
the models, and that every folder and file exists, before any model is loaded; the result is a
:class:`Recipe` whose :meth:`Recipe.resolved` form is what ``merge_report.json`` records.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from ..errors import FisherJaxError
from ..tree import did_you_mean

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "statistics", "dtype", "out_dir")
MODEL_KEYS = ("model", "parameters", "statistics", "task")
# How missing statistics are computed (fisher_jax.data.batching + fisher_jax.stats).
STATISTICS_KEYS = ("split", "num_examples", "batch_size", "seed", "max_length", "glue_dir", "estimator",
                   "mask_padding", "save_dir")
DTYPES = ("float32", "float16", "bfloat16")
# Value checks by keyword: what a method would refuse, checked before any model loads.
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "density": (lambda x: 0 < x <= 1, "in (0, 1]"), "drop_rate": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "t": (lambda x: 0 <= x <= 1, "in [0, 1]"), "epsilon": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "alpha": (lambda x: 0 <= x <= 1, "in [0, 1]"), "floor": (lambda x: x >= 0, ">= 0"),
    "lam": (math.isfinite, "finite"), "seed": (lambda x: x >= 0, ">= 0"),
}
_PROBE = ("embeddings/x", "encoder/layer/0/x", "encoder/layer/1/x", "pooler/x")  # names to try schedules on


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    path: str
    parameters: Mapping[str, Any]
    statistics: Optional[str] = None
    task: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe; :meth:`kwargs` gives ``merge``'s keywords (statistics apart)."""

    method: str
    models: tuple[ModelEntry, ...]
    base: Optional[str]
    parameters: Mapping[str, Any]
    statistics: Mapping[str, Any]
    dtype: str
    out_dir: str
    source: Optional[str] = None

    def kwargs(self) -> dict[str, Any]:
        """The method's keywords: global values, per-model lists where a model sets its own."""
        from . import REGISTRY

        params = _signature(REGISTRY[self.method])
        out: dict[str, Any] = {}
        keys = list(dict.fromkeys([*self.parameters, *(k for m in self.models for k in m.parameters)]))
        for key in keys:
            if any(key in m.parameters for m in self.models):
                default = self.parameters.get(key, params[key].default)
                out[key] = [_coefficient(m.parameters.get(key, default)) for m in self.models]
            else:
                out[key] = _coefficient(self.parameters[key])
        return out

    def stats_kind(self) -> Optional[str]:
        """The kind of per-model statistics the method needs (``full_fisher``, ``mask_fisher``, ``gram``, ``batches``)."""
        from . import REGISTRY

        return next((s.kind for s in REGISTRY[self.method].statistics if s.kind != "base"), None)

    def resolved(self) -> dict[str, Any]:
        """The recipe as run: JSON-ready, with the keywords the method received."""
        from .coefficients import describe

        return {"source": self.source, "merge_method": self.method, "base_model": self.base,
                "models": [{"model": m.path, "parameters": describe(dict(m.parameters)), "statistics": m.statistics,
                            "task": m.task} for m in self.models],
                "parameters": describe(dict(self.parameters)), "kwargs": describe(self.kwargs()),
                "statistics": describe(dict(self.statistics)), "dtype": self.dtype, "out_dir": self.out_dir}


def _coefficient(value: Any) -> Any:
    """A recipe value as :mod:`fisher_jax.merging.coefficients` reads it: a list of numbers is a layer gradient."""
    if isinstance(value, (list, tuple)) and value and all(_is_number(v) for v in value):
        return {"layers": list(value)}
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        return [{**v, "value": _coefficient(v["value"])} if "value" in v else dict(v) for v in value]
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_keys(path: str, keys: Iterable[Any], accepted: Sequence[str], method: Optional[str] = None) -> None:
    """One-line error, with a did-you-mean, for the first of ``keys`` not in ``accepted``: an unknown
    key at ``path``, or with ``method`` a keyword that merge method does not take (recipes and
    experiment configs alike)."""
    for key in keys:
        if key not in accepted:
            where, hint, ok = path + ": " if path else "", did_you_mean(str(key), accepted), ", ".join(accepted) or "none"
            if method:
                raise FisherJaxError(f"{where}method '{method}' takes no keyword '{key}'{hint}; it accepts: {ok}")
            raise FisherJaxError(f"{where}unknown key '{key}'{hint}; accepted: {ok}")


def _signature(spec: Any) -> dict[str, inspect.Parameter]:
    stats = {s.target for s in spec.statistics} | {s.keyword for s in spec.statistics}
    params = list(inspect.signature(spec.fn).parameters.values())[1:]
    return {p.name: p for p in params if p.name not in stats and p.name not in ("diagnostics", "num_heads")}


def _coefficient_keys(spec: Any) -> set[str]:
    """Keywords annotated as :data:`~fisher_jax.merging.coefficients.Coefficient` (per model / layer / filter)."""
    from .coefficients import Coefficient

    try:
        hints = typing.get_type_hints(spec.fn)
    except Exception:  # unresolvable annotations: treat nothing as a coefficient
        return set()
    out = set()
    for name, hint in hints.items():
        args = typing.get_args(hint)
        if hint == Coefficient or any(a == Coefficient for a in args) or set(typing.get_args(Coefficient)) <= set(args):
            out.add(name)
    return out


def _check_value(where: str, method: str, key: str, value: Any, spec: Any, per_model_ok: bool) -> None:
    from .coefficients import resolve

    hints = typing.get_type_hints(spec.fn) if spec.fn is not None else {}
    literals = _literals(hints.get(key))
    if literals:
        if value not in literals:
            extra = did_you_mean(str(value), map(str, literals)) if isinstance(value, str) else ""
            raise FisherJaxError(f"{where}{key}: {value!r} is not one of {', '.join(map(repr, literals))}{extra}")
        return
    coefficient = key in _coefficient_keys(spec)
    if (isinstance(value, (str, bool)) or value is None) and not coefficient:
        return  # names and switches (normalize, mapping, ...): the method checks them
    if isinstance(value, (list, tuple, Mapping)) and key not in _coefficient_keys(spec):
        if not (per_model_ok and isinstance(value, (list, tuple)) and all(_is_number(v) for v in value)):
            raise FisherJaxError(f"{where}{key}: method '{method}' takes one value for '{key}' (a number), "
                                 f"not a gradient or filters")
    check, must = RANGES.get(key, (None, ""))
    if not isinstance(value, (int, float, list, tuple, Mapping)) or isinstance(value, bool):
        raise FisherJaxError(f"{where}{key}: {value!r} is not a number, a list (a gradient over the layers) or filters")
    if coefficient or _is_number(value):
        resolve(_coefficient(value), _PROBE, 1, f"{where}{key}", check, must, models=True)


def _literals(hint: Any) -> tuple:
    if hint is None:
        return ()
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    return tuple(x for a in typing.get_args(hint) if typing.get_origin(a) is typing.Literal for x in typing.get_args(a))


def _folder(where: str, path: Any, base_dir: Path) -> str:
    if not isinstance(path, str) or not path:
        raise FisherJaxError(f"{where}: expected a model folder, got {path!r}")
    p = Path(os.path.expanduser(path))
    p = p if p.is_absolute() else base_dir / p
    if not (p / "config.json").is_file():
        raise FisherJaxError(f"{where}: '{path}' is not a model folder (no config.json in {p})")
    return str(p)


def _file(where: str, path: Any, base_dir: Path) -> str:
    if not isinstance(path, str) or not path:
        raise FisherJaxError(f"{where}: expected a statistics file, got {path!r}")
    p = Path(os.path.expanduser(path))
    p = p if p.is_absolute() else base_dir / p
    if not p.is_file():
        raise FisherJaxError(f"{where}: statistics file '{path}' does not exist")
    return str(p)


def from_dict(raw: Any, source: Optional[str] = None, base_dir: Optional[Path] = None,
              out_dir: Optional[str] = None) -> Recipe:
    """Validate a parsed recipe (see the module docstring); ``out_dir`` overrides the recipe's."""
    from . import METHODS, REGISTRY
    from .registry import canonical

    base_dir = base_dir or Path.cwd()
    if not isinstance(raw, Mapping):
        raise FisherJaxError(f"a recipe is a mapping with {', '.join(TOP_KEYS)}, got {type(raw).__name__}")
    check_keys("", raw, TOP_KEYS)
    if "merge_method" not in raw:
        raise FisherJaxError("merge_method: missing (one of " + ", ".join(METHODS) + ")")
    method = canonical(raw["merge_method"])
    if method not in METHODS:
        raise FisherJaxError(f"merge_method: unknown merge method '{raw['merge_method']}'{did_you_mean(method, METHODS)}; "
                             f"choose from {', '.join(METHODS)}")
    spec = REGISTRY.get(method)
    if spec is None or spec.fn is not METHODS[method]:
        from .registry import spec_for

        spec = spec_for(method, METHODS[method])
    params = _signature(spec)
    accepted = list(params)

    def check_params(where: str, values: Any, per_model: bool) -> dict[str, Any]:
        if values is None:
            return {}
        if not isinstance(values, Mapping):
            raise FisherJaxError(f"{where}: must be a mapping of keyword to value, got {type(values).__name__}")
        check_keys(where, values, accepted, method)
        for key, value in values.items():
            _check_value(f"{where}.", method, key, value, spec, per_model)
        return dict(values)

    parameters = check_params("parameters", raw.get("parameters"), False)
    models_raw = raw.get("models")
    if not isinstance(models_raw, (list, tuple)) or len(models_raw) < 2:
        raise FisherJaxError(f"models: a list of at least two models, got {models_raw!r}")
    kind = next((s.kind for s in spec.statistics if s.kind != "base"), None)
    stats_raw = raw.get("statistics") or {}
    if not isinstance(stats_raw, Mapping):
        raise FisherJaxError(f"statistics: must be a mapping with {', '.join(STATISTICS_KEYS)}, got {stats_raw!r}")
    check_keys("statistics", stats_raw, STATISTICS_KEYS)
    for key in ("num_examples", "batch_size", "max_length"):
        if key in stats_raw and not (isinstance(stats_raw[key], int) and not isinstance(stats_raw[key], bool)
                                     and stats_raw[key] >= 1):
            raise FisherJaxError(f"statistics.{key}: must be an integer >= 1, got {stats_raw[key]!r}")
    if "estimator" in stats_raw:
        from ..stats.records import ESTIMATORS  # no JAX import while validating

        if stats_raw["estimator"] not in ESTIMATORS:
            raise FisherJaxError(f"statistics.estimator: {stats_raw['estimator']!r} is not one of "
                                 f"{', '.join(ESTIMATORS)}{did_you_mean(str(stats_raw['estimator']), ESTIMATORS)}")
    entries = []
    for j, item in enumerate(models_raw):
        where = f"models[{j}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, Mapping):
            raise FisherJaxError(f"{where}: a folder or a mapping with {', '.join(MODEL_KEYS)}, got {item!r}")
        check_keys(where, item, MODEL_KEYS)
        if "model" not in item:
            raise FisherJaxError(f"{where}: missing 'model' (the model folder)")
        mparams = check_params(f"{where}.parameters", item.get("parameters"), False)
        stats_file = item.get("statistics")
        task = item.get("task")
        if stats_file is not None and kind in (None, "batches"):
            raise FisherJaxError(f"{where}.statistics: method '{method}' uses no statistics file")
        if kind is not None and stats_file is None and task is None:
            what = "a statistics file ('statistics') or the data to compute it on ('task')" if kind != "batches" else \
                "the data to run it on ('task')"
            raise FisherJaxError(f"{where}: method '{method}' needs {what}")
        if task is not None and not isinstance(task, str):
            raise FisherJaxError(f"{where}.task: a GLUE task name or a task file, got {task!r}")
        entries.append(ModelEntry(_folder(f"{where}.model", item["model"], base_dir), mparams,
                                  None if stats_file is None else _file(f"{where}.statistics", stats_file, base_dir),
                                  task))
    needs_base = any(s.kind == "base" and s.required for s in spec.statistics)
    base = raw.get("base_model")
    if needs_base and base is None:
        raise FisherJaxError(f"base_model: method '{method}' needs the pre-trained model the models were fine-tuned from")
    if base is not None and not any(s.kind == "base" for s in spec.statistics):
        raise FisherJaxError(f"base_model: method '{method}' uses no base model")
    base = None if base is None else _folder("base_model", base, base_dir)
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        raise FisherJaxError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}{did_you_mean(str(dtype), DTYPES)}")
    out = out_dir if out_dir is not None else raw.get("out_dir")
    if not isinstance(out, str) or not out:
        raise FisherJaxError("out_dir: missing (the folder the merged models are written to; or pass --out-dir)")
    out_path = Path(os.path.expanduser(out))
    out = str(out_path if out_path.is_absolute() or out_dir is not None else base_dir / out_path)
    recipe = Recipe(method, tuple(entries), base, parameters, dict(stats_raw), dtype, out, source)
    per_model = {k for m in entries for k in m.parameters}
    for key, value in recipe.kwargs().items():  # per-model values: a default for every model, a method that takes them
        if key not in per_model:
            continue
        if any(v is inspect.Parameter.empty for v in value):
            raise FisherJaxError(f"parameters.{key}: set it globally or for every model (method '{method}' has no default)")
        if key in spec.shared or (key not in _coefficient_keys(spec) and not _accepts_list(spec, key)):
            raise FisherJaxError(f"models[*].parameters.{key}: method '{method}' takes one '{key}' for all models; "
                                 f"set it under 'parameters'")
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in recipe.kwargs()]
    if missing:
        raise FisherJaxError(f"parameters: method '{method}' needs '{missing[0]}'")
    return recipe


def _accepts_list(spec: Any, key: str) -> bool:
    hints = typing.get_type_hints(spec.fn)
    hint = hints.get(key)
    origins = {typing.get_origin(a) for a in (hint, *typing.get_args(hint))}
    import collections.abc

    return bool(origins & {list, tuple, collections.abc.Sequence})


def load_recipe(path: str, out_dir: Optional[str] = None) -> Recipe:
    """Read and validate a recipe file; relative paths in it are relative to the file's folder."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FisherJaxError(f"recipe '{path}' does not exist")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise FisherJaxError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    try:
        return from_dict(raw, source=str(p), base_dir=p.resolve().parent, out_dir=out_dir)
    except FisherJaxError as err:
        raise FisherJaxError(f"{path}: {err}") from None


__all__ = ["DTYPES", "MODEL_KEYS", "Recipe", "STATISTICS_KEYS", "TOP_KEYS", "check_keys", "from_dict", "load_recipe"]
