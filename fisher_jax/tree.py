"""Parameter trees as plain nested dicts, addressed by '/'-joined path names.

Every statistic and merge in fisher_jax is keyed by these names (``body/encoder/layer/0/...``),
so they are the one vocabulary shared by the models, the statistics files and the merges.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

Tree = Mapping[str, Any]


def flatten(tree: Tree, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a/b/c": leaf}`` in insertion order."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten`."""
    tree: dict[str, Any] = {}
    for name, leaf in flat.items():
        node = tree
        *parents, last = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return tree


def tree_map_with_names(fn: Callable[[str, Any], Any], tree: Tree, *rest: Tree) -> dict[str, Any]:
    """``fn(name, leaf, *leaves_of_rest)`` over every leaf; all trees must share one structure."""
    flat = flatten(tree)
    others = [flatten(t) for t in rest]
    for other in others:
        check_same_structure(flat, other)
    return unflatten({k: fn(k, v, *(o[k] for o in others)) for k, v in flat.items()})


def select(tree: Tree, pattern: str) -> dict[str, Any]:
    """Leaves whose path name matches ``pattern`` (``re.search``), as a flat dict."""
    rx = re.compile(pattern)
    return {k: v for k, v in flatten(tree).items() if rx.search(k)}


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def check_same_structure(a: Mapping[str, Any], b: Mapping[str, Any], what: str = "trees") -> None:
    """Raise a one-line error naming the first path (or shape) where two flat/nested trees differ."""
    from .errors import FisherJaxError

    fa = a if all(not isinstance(v, Mapping) for v in a.values()) else flatten(a)
    fb = b if all(not isinstance(v, Mapping) for v in b.values()) else flatten(b)
    for key in fa:
        if key not in fb:
            raise FisherJaxError(f"{what} differ: '{key}' is missing from the second{did_you_mean(key, fb)}")
        sa, sb = np.shape(fa[key]), np.shape(fb[key])
        if sa != sb:
            raise FisherJaxError(f"{what} differ at '{key}': shape {sa} vs {sb}")
    for key in fb:
        if key not in fa:
            raise FisherJaxError(f"{what} differ: '{key}' is missing from the first{did_you_mean(key, fa)}")


def num_params(tree: Tree) -> int:
    return int(sum(np.size(v) for v in flatten(tree).values()))


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON types: mappings -> dicts with string keys, tuples/lists/arrays -> lists,
    numpy scalars -> ``int``/``float``/``bool``; anything else JSON cannot hold -> ``str(x)``.

    ``json.loads(json.dumps(jsonable(x)))`` equals ``jsonable(x)``: what a record on disk reads back as.
    """
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)
