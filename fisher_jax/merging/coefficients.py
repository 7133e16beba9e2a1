"""One resolver for per-model, per-layer and per-parameter merge coefficients (``lam``, ``density``, ``t`` ...).

A coefficient is given as

- a number: every model, every parameter;
- a list with one entry per model (each entry any of the forms below);
- a layer schedule ``{"layers": [v_0, ..., v_K]}``: the anchors are spread evenly over the encoder
  layers and interpolated linearly (mergekit's "gradient"): layer ``l`` of ``L`` sits at
  ``l / (L - 1)`` on ``[0, 1]``. Parameters outside the layers take the end they sit at:
  embeddings the first anchor, the pooler (and anything else after the layers) the last;
- filters by parameter name, mergekit-style: a list of ``{"filter": regex, "value": v}`` entries,
  the first whose regex matches the parameter's body path (``re.search``) wins; an entry without
  ``"filter"`` is the default. ``v`` may itself be a number or a layer schedule.

:func:`resolve` turns any of these into ``{parameter path: float64 [N]}`` (one value per model)
and checks every value with the method's own range check.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import FisherJaxError

# The annotation merge functions give such keywords: the experiment config accepts numbers,
# lists and mappings for them (the callee checks the structure).
Coefficient = Union[float, Sequence[Any], Mapping[str, Any]]

_LAYER_RX = re.compile(r"(?:^|/)(?:layer|layers|h|block|blocks)/(\d+)/")


def layer_of(name: str) -> Optional[int]:
    """Encoder layer index of a body path (``encoder/layer/3/...`` -> 3), else None."""
    from ..models.layout import param_role

    try:
        return param_role(name).layer
    except ValueError:
        m = _LAYER_RX.search(name)
        return int(m.group(1)) if m else None


def layer_positions(names: Sequence[str]) -> dict[str, float]:
    """Position on ``[0, 1]`` of every path: ``l / (L - 1)`` in the layers, 0 before them, 1 after."""
    layers = {k: layer_of(k) for k in names}
    count = max((l for l in layers.values() if l is not None), default=-1) + 1
    out = {}
    for k, l in layers.items():
        if l is None:
            stripped = k[5:] if k.startswith("body/") else k
            out[k] = 0.0 if stripped.startswith("embeddings") else 1.0
        else:
            out[k] = l / (count - 1) if count > 1 else 0.0
    return out


def _is_filters(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Mapping) and "value" in v for v in value)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise FisherJaxError(
            f"{what}: {value!r} is not a number, a list per model, {{'layers': [...]}} or a list of "
            f"{{'filter': regex, 'value': v}}"
        )
    return float(value)


def _schedule(anchors: Any, what: str) -> np.ndarray:
    if not isinstance(anchors, (list, tuple)) or not anchors:
        raise FisherJaxError(f"{what}: 'layers' must be a non-empty list of numbers, got {anchors!r}")
    return np.asarray([_number(a, f"{what}.layers[{i}]") for i, a in enumerate(anchors)], np.float64)


def _single(value: Any, what: str) -> Callable[[str, float], float]:
    """``(path, position) -> value`` for one model's coefficient (a number, a schedule or filters)."""
    if isinstance(value, Mapping):
        extra = [k for k in value if k != "layers"]
        if extra or "layers" not in value:
            from ..tree import did_you_mean

            key = (extra or ["(none)"])[0]
            raise FisherJaxError(f"{what}: a schedule is {{'layers': [...]}}; unknown key '{key}'{did_you_mean(str(key), ['layers'])}")
        anchors = _schedule(value["layers"], what)
        grid = np.linspace(0.0, 1.0, anchors.size) if anchors.size > 1 else np.zeros(1)
        return lambda name, pos: float(np.interp(pos, grid, anchors)) if anchors.size > 1 else float(anchors[0])
    if _is_filters(value):
        rules = []
        for i, entry in enumerate(value):
            extra = [k for k in entry if k not in ("filter", "value")]
            if extra:
                from ..tree import did_you_mean

                raise FisherJaxError(f"{what}[{i}]: unknown key '{extra[0]}'{did_you_mean(str(extra[0]), ['filter', 'value'])}")
            pattern = entry.get("filter")
            try:
                rx = None if pattern is None else re.compile(str(pattern))
            except re.error as err:
                raise FisherJaxError(f"{what}[{i}].filter: {pattern!r} is not a regular expression ({err})") from None
            rules.append((rx, _single(entry["value"], f"{what}[{i}].value")))

        def pick(name: str, pos: float) -> float:
            for rx, fn in rules:
                if rx is None or rx.search(name):
                    return fn(name, pos)
            raise FisherJaxError(f"{what}: no filter matches '{name}' and there is no default entry (one without 'filter')")

        return pick
    number = _number(value, what)
    return lambda name, pos: number


def per_model(value: Any) -> bool:
    """Whether ``value`` is a list with one coefficient per model (not a filter list)."""
    return isinstance(value, (list, tuple, np.ndarray)) and not _is_filters(value)


def resolve(
    value: Any,
    names: Sequence[str],
    n: int,
    what: str,
    check: Optional[Callable[[float], bool]] = None,
    must: str = "",
    models: bool = True,
) -> dict[str, np.ndarray]:
    """``{path: float64 [n]}``: model ``j``'s coefficient ``what`` at every parameter ``path``.

    ``check(v)`` is the method's range (``must`` says it in words, e.g. ``"in (0, 1]"``);
    ``models=False`` refuses a per-model list (a method with one value per parameter, like slerp's ``t``).
    """
    if per_model(value):
        entries = list(value)
        if not models:
            raise FisherJaxError(f"{what} takes one value per parameter (a number, {{'layers': [...]}} or filters), not a list per model")
        if len(entries) != n:
            raise FisherJaxError(f"{what} has {len(entries)} entries for {n} models")
        fns = [_single(v, f"{what}[{j}]") for j, v in enumerate(entries)]
    else:
        fns = [_single(value, what)] * n
    pos = layer_positions(names) if any(isinstance(v, Mapping) or _is_filters(v) for v in
                                        (entries if per_model(value) else [value])) else {k: 0.0 for k in names}
    out: dict[str, np.ndarray] = {}
    cache: dict[int, dict[str, float]] = {}
    for k in names:
        row = np.empty(n, np.float64)
        for j, fn in enumerate(fns):
            key = id(fn)
            if key not in cache:
                cache[key] = {}
            v = cache[key].get(k)
            if v is None:
                v = cache[key][k] = fn(k, pos[k])
            row[j] = v
        for v in row:
            if not math.isfinite(v) or (check is not None and not check(v)):
                raise FisherJaxError(f"{what} must be {must or 'finite'}, got {v}" + (f" at '{k}'" if not _plain(value) else ""))
        out[k] = row
    return out


def _plain(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def uniform(row: np.ndarray) -> bool:
    """Whether every model has the same value (the fast, scalar path of a kernel applies)."""
    return bool(np.all(row == row[0]))


def constant(values: Mapping[str, np.ndarray]) -> bool:
    """Whether the coefficient is one number for every model and parameter."""
    rows = list(values.values())
    return all(uniform(r) and r[0] == rows[0][0] for r in rows)


def describe(value: Any) -> Any:
    """A JSON-ready copy of a coefficient as given (tuples as lists), for reports."""
    if isinstance(value, Mapping):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [describe(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


__all__ = ["Coefficient", "constant", "describe", "layer_of", "layer_positions", "per_model", "resolve", "uniform"]
