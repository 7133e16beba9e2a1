"""Task files: a user's own labelled text data set, described once in YAML, usable by every command.

A task file names the data and how to read it; ``get_task("path/my_task.yaml")`` loads it into a
:class:`~fisher_jax.data.glue.TaskSpec` like the GLUE ones (and registers its ``name``), so
bucketing, batching, held-out slices, metrics, statistics, merges and experiments treat it like a
GLUE task::

    name: my_task
    train: data/train.csv          # CSV, TSV, JSON or JSON Lines; paths relative to this file
    dev: data/dev.csv              # optional; also test, or any other split under `splits:`
    text: [question, sentence]     # one or two text columns
    label: label                   # column holding the label (default: label)
    labels: [entailment, not_entailment]   # class names in label-id order (omit for regression)
    regression: false
    metrics: [accuracy]            # default: accuracy (+ f1 for two classes); pearson, spearman
    max_length: 128

A Hub data set instead of files: ``hub: org/name`` (optional ``config: NAME``), and the split keys
give the Hub's split names (default ``train: train``, ``dev: validation``). Every key is checked
when the file is read; a mistake is one line naming the file and the key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from fisher_jax.errors import FisherJaxError
from fisher_jax.tree import did_you_mean

from .glue import (
    _SPLIT_ALIASES,
    TASKS,
    Examples,
    RowFilter,
    TaskSpec,
    _normalize_task_name,
    custom_task,
    hub_examples,
    table_examples,
)

# key -> what it holds (the error messages and the README list them)
KEYS: dict[str, str] = {
    "name": "the task's name (default: the file name without .yaml)",
    "train": "training split: a data file (or, with hub, the Hub split name)",
    "dev": "evaluation split: a data file (or the Hub split name)",
    "test": "another split: a data file (or the Hub split name)",
    "splits": "more named splits: {name: file}",
    "hub": "a Hub data set (org/name) instead of files",
    "config": "the Hub data set's configuration",
    "text": "one or two text columns",
    "label": "the column holding the label (default: label)",
    "labels": "class names in label-id order (omit for regression)",
    "regression": "true for a real-valued target (default: false)",
    "metrics": "metrics averaged into the score",
    "max_length": "tokens per example after truncation (default: 128)",
}
SPLIT_KEYS = ("train", "dev", "test")
DATA_SUFFIXES = (".csv", ".tsv", ".txt", ".json", ".jsonl", ".ndjson")
REGRESSION_METRICS = frozenset({"pearson", "spearman"})
BINARY_METRICS = frozenset({"f1"})  # F1 of class 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _fail(path: Path, key: str | None, message: str) -> FisherJaxError:
    return FisherJaxError(f"{path}: {f'{key}: ' if key else ''}{message}")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping a task file holds; a missing file, bad YAML or a non-mapping is one line."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise FisherJaxError(f"no such task file: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or type(e).__name__
        raise FisherJaxError(f"{where}: malformed YAML ({problem})") from None
    if not isinstance(raw, Mapping):
        raise _fail(path, None, f"a task file is a mapping of keys ({', '.join(KEYS)}), got {type(raw).__name__}")
    return dict(raw)


def _string(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, key, f"expected a non-empty string, got {value!r}")
    return value.strip()


def _string_list(path: Path, key: str, value: Any) -> tuple[str, ...]:
    """A string or a list of strings (YAML's bare yes/no/true/false are booleans: quote them)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise _fail(path, key, f"expected a name or a non-empty list of names, got {value!r}")
    out = []
    for item in items:
        if isinstance(item, bool) or item is None:
            raise _fail(path, key, f"{item!r} is not a name (YAML reads yes/no/true/false/null as values: quote it)")
        if not isinstance(item, (str, int)) or not str(item).strip():
            raise _fail(path, key, f"expected names, got {item!r}")
        out.append(str(item).strip())
    return tuple(out)


def _splits(path: Path, raw: Mapping[str, Any], hub: str | None) -> tuple[tuple[str, str], ...]:
    """``(canonical split, file path or Hub split)`` of every split the file lists."""
    named: dict[str, Any] = {k: raw[k] for k in SPLIT_KEYS if k in raw}
    extra = raw.get("splits", {})
    if not isinstance(extra, Mapping):
        raise _fail(path, "splits", f"expected a mapping {{split name: file}}, got {extra!r}")
    for name, value in extra.items():
        key = str(name).lower().replace("-", "_")
        if not _NAME.match(str(name)) or key in named or key in _SPLIT_ALIASES:
            taken = "is another name of dev" if _SPLIT_ALIASES.get(key) == "dev" else "is taken or not a name"
            raise _fail(path, "splits", f"split name '{name}' {taken}; use letters, digits, _ or -")
        named[key] = value
    if not named:
        if hub is None:
            raise _fail(path, None, "no data: give at least one split (train: FILE, dev: FILE)")
        named = {"train": "train", "dev": "validation"}
    out = []
    for split, value in named.items():
        where = split if split in SPLIT_KEYS else f"splits.{split}"
        value = _string(path, where, value)
        if hub is not None:
            out.append((split, value))
            continue
        file = (path.parent / Path(value).expanduser()).resolve()
        if file.suffix.lower() not in DATA_SUFFIXES:
            raise _fail(path, where, f"unsupported file type '{file.suffix}' (use .csv, .tsv, .json or .jsonl)")
        if not file.is_file():
            raise _fail(path, where, f"no such file {value} (relative to the task file: {file})")
        out.append((split, str(file)))
    return tuple(out)


def _metrics(path: Path, value: Any, num_labels: int, regression: bool) -> tuple[str, ...] | None:
    from .metrics import METRICS

    if value is None:
        return None
    names = _string_list(path, "metrics", value)
    for name in names:
        if name not in METRICS:
            raise _fail(path, "metrics", f"unknown metric '{name}'{did_you_mean(name, METRICS)}; "
                                         f"known: {', '.join(METRICS)}")
        if (name in REGRESSION_METRICS) != regression:
            kind = "a regression" if regression else "a classification"
            raise _fail(path, "metrics", f"'{name}' does not apply to {kind} task")
        if name in BINARY_METRICS and num_labels != 2:
            raise _fail(path, "metrics", f"'{name}' is the F1 of class 1 of a two-class task; this task has "
                                         f"{num_labels} classes (use accuracy or mcc)")
    if len(set(names)) != len(names):
        raise _fail(path, "metrics", f"a metric is listed twice: {list(names)}")
    return names


def parse_task(raw: Mapping[str, Any], path: str | os.PathLike) -> TaskSpec:
    """The :class:`TaskSpec` a task file's mapping describes; ``path`` is the file (relative data
    paths start from its folder). Every key and value is checked (see :data:`KEYS`)."""
    path = Path(path).expanduser().absolute()
    for key in raw:
        if key not in KEYS:
            raise _fail(path, None, f"unknown key '{key}'{did_you_mean(str(key), KEYS)}; "
                                    f"known keys: {', '.join(KEYS)}")
    name = _string(path, "name", raw["name"]) if "name" in raw else path.stem
    if not _NAME.match(name):
        raise _fail(path, "name", f"'{name}' is not a name: use letters, digits, _, - or .")
    if _normalize_task_name(name) in TASKS:
        raise _fail(path, "name", f"'{name}' is a GLUE task; give your task another name")
    hub = _string(path, "hub", raw["hub"]) if "hub" in raw else None
    if hub is not None and not re.match(r"^[\w.-]+(/[\w.-]+)?$", hub):
        raise _fail(path, "hub", f"'{hub}' is not a Hub data set id (org/name)")
    if "config" in raw and hub is None:
        raise _fail(path, "config", "only a Hub data set (hub: org/name) has a configuration")
    config = _string(path, "config", raw["config"]) if "config" in raw else None
    splits = _splits(path, raw, hub)

    if "text" not in raw:
        raise _fail(path, None, "missing key 'text': the one or two columns holding the text")
    text = _string_list(path, "text", raw["text"])
    if len(text) > 2:
        raise _fail(path, "text", f"one or two text columns, got {len(text)}: {list(text)}")
    label = _string(path, "label", raw.get("label", "label"))
    regression = raw.get("regression", False)
    if not isinstance(regression, bool):
        raise _fail(path, "regression", f"expected true or false, got {regression!r}")
    labels = None
    if regression:
        if "labels" in raw:
            raise _fail(path, "labels", "a regression task has no class names: drop labels or set regression: false")
    else:
        if "labels" not in raw:
            raise _fail(path, None, "missing key 'labels': class names in label-id order "
                                    "(or regression: true for a real-valued target)")
        labels = _string_list(path, "labels", raw["labels"])
        if len(labels) < 2:
            raise _fail(path, "labels", f"a classification task needs at least two classes, got {list(labels)}")
        if len(set(labels)) != len(labels):
            raise _fail(path, "labels", f"a class name is listed twice: {list(labels)}")
    max_length = raw.get("max_length", 128)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise _fail(path, "max_length", f"expected an integer >= 2 (room for [CLS] and [SEP]), got {max_length!r}")
    fields: dict[str, Any] = dict(
        text_columns=text, local_text_columns=text, local_label_column=label, max_length=max_length,
        task_file=str(path), hub_dataset=hub, hub_config=config)
    if hub is None:
        fields.update(local_files=splits, hub_splits=())
    else:
        fields.update(local_files=(), hub_splits=splits)
    metrics = _metrics(path, raw.get("metrics"), len(labels or ()), regression)
    if metrics is not None:
        fields["metrics"] = metrics
    return custom_task(name, len(text), labels, regression, **fields)


def load_task_file(path: str | os.PathLike) -> TaskSpec:
    """Read and validate a YAML task file (see the module docstring) into a :class:`TaskSpec`.

    :func:`fisher_jax.data.get_task` calls this for a path and registers the result by name.
    """
    return parse_task(read_yaml(path), path)


def load_task_split(spec: TaskSpec, split: str, keep: RowFilter | None = None,
                    part: tuple[int, int] | None = None) -> Examples:
    """Examples of a task file's ``split`` (canonical name): its data file, or its Hub data set
    (``keep``, ``part``: the rows to read, as in :func:`fisher_jax.data.glue.load_split`)."""
    if spec.task_file is None:
        raise FisherJaxError(f"task {spec.name} does not come from a task file")
    if spec.hub_dataset is not None:
        hint = f"download it while online first, or point the task file {spec.task_file} at local files"
        return hub_examples(spec, split, spec.hub_dataset, spec.hub_config, spec.local_text_columns,
                            str(spec.local_label_column), what=f"task {spec.name}", hint=hint, keep=keep)
    return table_examples(spec.local_file(split), spec, split, spec.local_text_columns,
                          str(spec.local_label_column), keep, part)
