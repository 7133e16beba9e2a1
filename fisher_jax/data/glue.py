"""Task registry and example loading: GLUE (local folders or the Hub), task files (a user's own
data set, :mod:`fisher_jax.data.taskfile`) and single custom files; a checkpoint's label order.

Label ids follow the Hub dataset ``nyu-mll/glue`` so that a checkpoint fine-tuned on either source
predicts the same ids. Local files are read the way the original GLUE download script wrote them:
tab-separated, quoting turned off (``csv.QUOTE_NONE``; MRPC/MNLI/QQP contain unbalanced ``"``),
MRPC with a UTF-8 byte-order mark, CoLA without a header.

Where the data comes from, in order: the ``glue_dir`` argument, the ``GLUE_DIR`` environment
variable, then the Hub (``datasets.load_dataset("nyu-mll/glue", name)``). A local folder that lacks
the task is an error, never a silent fall back to the network.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from fisher_jax.errors import FisherJaxError

HUB_DATASET = "nyu-mll/glue"
GLUE_DIR_ENV = "GLUE_DIR"

Column = str | int  # a header name, or a 0-based index for header-less files
RowFilter = Callable[[int], bool]  # keep(i): is row i of the split read (its texts kept)?


@dataclass(frozen=True)
class TaskSpec:
    """Everything the library needs to know about one GLUE task.

    ``text_columns`` are the Hub column names (one for single sentences, two for pairs);
    ``local_*`` describe the GLUE-download TSV layout of the same data. ``label_names[i]`` is the
    name of label id ``i`` (None for regression). ``metrics`` are the GLUE dev metrics, averaged
    into the leaderboard ``score`` by :func:`fisher_jax.data.metrics.compute_metrics`.
    """

    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None
    is_regression: bool
    num_labels: int
    metrics: tuple[str, ...]
    local_dir: str | None
    local_files: tuple[tuple[str, str], ...] = (("train", "train.tsv"), ("dev", "dev.tsv"))
    hub_splits: tuple[tuple[str, str], ...] = (("train", "train"), ("dev", "validation"))
    local_header: bool = True
    local_text_columns: tuple[Column, ...] = ()
    local_label_column: Column = "label"
    local_encoding: str = "utf-8"
    local_num_columns: int | None = None  # fields per row in header-less files
    skip_malformed: bool = False
    max_length: int = 128
    label_range: tuple[float, float] | None = None  # regression targets must lie in it
    # A task file (fisher_jax.data.taskfile): the YAML it came from; its splits are the files in
    # ``local_files`` (absolute paths) or, with ``hub_dataset``, that data set's ``hub_splits``.
    task_file: str | None = None
    hub_dataset: str | None = None
    hub_config: str | None = None

    @property
    def is_pair(self) -> bool:
        """True for sentence-pair tasks (the tokenizer gets ``text_b``)."""
        return len(self.text_columns) == 2

    def local_file(self, split: str) -> str:
        """File name of ``split`` inside the task's local folder."""
        return dict(self.local_files)[split]

    def hub_split(self, split: str) -> str:
        """Name of ``split`` in the Hub dataset."""
        return dict(self.hub_splits)[split]

    @property
    def splits(self) -> tuple[str, ...]:
        """Canonical split names this task accepts ('train', 'dev', ...)."""
        pairs = self.hub_splits if self.hub_dataset else self.local_files
        return tuple(s for s, _ in pairs)


def _glue_task(name: str, text_columns: tuple[str, ...], label_names: tuple[str, ...] | None,
               metrics: tuple[str, ...], local_dir: str, **kw: Any) -> TaskSpec:
    is_regression = label_names is None
    return TaskSpec(name=name, text_columns=text_columns, label_names=label_names,
                    is_regression=is_regression,
                    num_labels=1 if is_regression else len(label_names or ()),
                    metrics=metrics, local_dir=local_dir, **kw)


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        _glue_task("cola", ("sentence",), ("unacceptable", "acceptable"), ("mcc",), "CoLA",
                   local_header=False, local_text_columns=(3,), local_label_column=1,
                   local_num_columns=4),
        _glue_task("sst2", ("sentence",), ("negative", "positive"), ("accuracy",), "SST-2",
                   local_text_columns=("sentence",), local_label_column="label", max_length=64),
        _glue_task("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                   ("accuracy", "f1"), "MRPC", local_text_columns=("#1 String", "#2 String"),
                   local_label_column="Quality", local_encoding="utf-8-sig"),
        _glue_task("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearman"), "STS-B",
                   local_text_columns=("sentence1", "sentence2"), local_label_column="score",
                   label_range=(0.0, 5.0)),
        # The GLUE-download QQP train file has a handful of truncated rows; every reader of it
        # (including transformers' GLUE processors) skips them.
        _glue_task("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"),
                   ("accuracy", "f1"), "QQP", local_text_columns=("question1", "question2"),
                   local_label_column="is_duplicate", skip_malformed=True),
        _glue_task("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                   ("accuracy",), "MNLI", local_text_columns=("sentence1", "sentence2"),
                   local_label_column="gold_label",
                   local_files=(("train", "train.tsv"), ("dev", "dev_matched.tsv"),
                                ("dev_mismatched", "dev_mismatched.tsv")),
                   hub_splits=(("train", "train"), ("dev", "validation_matched"),
                               ("dev_mismatched", "validation_mismatched"))),
        _glue_task("qnli", ("question", "sentence"), ("entailment", "not_entailment"),
                   ("accuracy",), "QNLI", local_text_columns=("question", "sentence")),
        _glue_task("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"),
                   ("accuracy",), "RTE", local_text_columns=("sentence1", "sentence2")),
        _glue_task("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"),
                   ("accuracy",), "WNLI", local_text_columns=("sentence1", "sentence2")),
    )
}

_SPLIT_ALIASES = {
    "validation": "dev",
    "val": "dev",
    "dev_matched": "dev",
    "validation_matched": "dev",
    "validation_mismatched": "dev_mismatched",
}


def _normalize_task_name(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in "-_ ")


# Task files loaded in this process, by name: after ``get_task("path/my_task.yaml")`` the name
# ``my_task`` works everywhere a task name does (statistics files and results record the name).
_REGISTERED: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Make ``spec`` reachable as ``get_task(spec.name)``; returns it.

    A GLUE name cannot be taken; a name already registered from another task file is an error
    unless the spec is the same (loading one file twice, or editing it and loading it again, is
    fine: the same file path replaces its earlier entry).
    """
    if _normalize_task_name(spec.name) in TASKS:
        raise FisherJaxError(f"task name '{spec.name}' is a GLUE task; give the task file another name")
    old = _REGISTERED.get(spec.name)
    if old is not None and old != spec and old.task_file != spec.task_file:
        raise FisherJaxError(
            f"task name '{spec.name}' is already defined by {old.task_file or 'another task'}"
            f"{f' (loading {spec.task_file})' if spec.task_file else ''}; give one of them another name")
    _REGISTERED[spec.name] = spec
    return spec


def _looks_like_task_file(name: str) -> bool:
    return name.lower().endswith((".yaml", ".yml")) or os.sep in name or "/" in name or Path(name).is_file()


def get_task(name: str | os.PathLike | TaskSpec) -> TaskSpec:
    """The task ``name`` names: a GLUE task (any spelling: 'SST-2', 'sts-b', 'MNLI'), a task file
    loaded before (by its ``name``), or the path of a YAML task file (loaded, validated and
    registered under its name; :mod:`fisher_jax.data.taskfile`).

    A :class:`TaskSpec` is passed through, so every function can take either.
    """
    if isinstance(name, TaskSpec):
        return name
    text = os.fspath(name) if isinstance(name, os.PathLike) else str(name)
    key = _normalize_task_name(text)
    if key in TASKS:
        return TASKS[key]
    if text in _REGISTERED:
        return _REGISTERED[text]
    if isinstance(name, os.PathLike) or _looks_like_task_file(text):
        from .taskfile import load_task_file

        return register_task(load_task_file(text))
    from ..tree import did_you_mean

    known = ", ".join([*TASKS, *_REGISTERED])
    raise FisherJaxError(
        f"unknown task '{name}'{did_you_mean(key, [*TASKS, *_REGISTERED])}: not a GLUE task nor a task "
        f"file (.yaml); known tasks: {known}")


def normalize_split(task: str | TaskSpec, split: str) -> str:
    """Canonical split name ('train', 'dev', 'dev_mismatched') for ``split`` or an alias."""
    spec = get_task(task)
    key = str(split).lower().replace("-", "_")
    key = _SPLIT_ALIASES.get(key, key)
    if key not in spec.splits:
        raise FisherJaxError(
            f"unknown split '{split}' for task {spec.name}; known splits: "
            f"{', '.join(spec.splits)} (aliases: validation = dev)")
    return key


@dataclass
class Examples:
    """The examples of one split: raw texts and label ids, before tokenisation.

    ``labels`` are int64 class ids (Hub ids) or float32 regression targets. ``source`` says where
    they were read from (a file path or ``hub:nyu-mll/glue/<task>:<split>``) for error messages
    and experiment logs. ``spec`` is the task (filled in from the registry for GLUE tasks; built
    on the fly by :func:`load_custom`).
    """

    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray
    task: str
    split: str
    source: str
    spec: TaskSpec | None = field(default=None, repr=False)
    # Rows in the split these came from (a selection read with ``keep`` holds fewer); None: len(self).
    num_rows: int | None = None

    def __post_init__(self) -> None:
        if self.spec is None:
            self.spec = get_task(self.task)
        n = len(self.text_a)
        if self.text_b is not None and len(self.text_b) != n:
            raise FisherJaxError(
                f"{self.source}: {n} first texts but {len(self.text_b)} second texts")
        if len(self.labels) != n:
            raise FisherJaxError(f"{self.source}: {n} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.text_a)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "Examples":
        """The examples at ``indices`` (in that order), e.g. a random sample or the first N."""
        idx = np.asarray(indices, dtype=np.int64)
        return Examples(
            text_a=[self.text_a[i] for i in idx],
            text_b=None if self.text_b is None else [self.text_b[i] for i in idx],
            labels=self.labels[idx],
            task=self.task, split=self.split, source=self.source, spec=self.spec, num_rows=self.num_rows)


# --------------------------------------------------------------------------------------------
# label parsing (shared by GLUE files, the Hub and custom files)


def _describe_labels(spec: TaskSpec) -> str:
    if spec.is_regression:
        lo, hi = spec.label_range or (-math.inf, math.inf)
        return f"a number in [{lo:g}, {hi:g}]"
    return ", ".join(f"{i}={n}" for i, n in enumerate(spec.label_names or ()))


def _where(location: str | Callable[[], str]) -> str:
    """A location for an error message (``file:line``), or the function that works it out."""
    return location() if callable(location) else location


def _parse_label(raw: Any, spec: TaskSpec, where: str | Callable[[], str]) -> float | int:
    """One label as a Hub id (classification) or a float (regression); ``where`` is file:line
    (or a function giving it, called only for an error message)."""
    if spec.is_regression:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise FisherJaxError(
                f"{_where(where)}: label {raw!r} is not a number (task {spec.name} is a regression task)"
            ) from None
        lo, hi = spec.label_range or (-math.inf, math.inf)
        if not (math.isfinite(value) and lo <= value <= hi):
            raise FisherJaxError(
                f"{_where(where)}: label {raw!r} is outside the label space of {spec.name} "
                f"({_describe_labels(spec)})")
        return value
    names = spec.label_names or ()
    value: int | None = None
    if isinstance(raw, str):
        text = raw.strip()
        if text in names:
            return names.index(text)
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if math.isfinite(number) and number.is_integer():
            value = int(number)
    elif isinstance(raw, (bool, np.bool_)):
        value = None  # True/False is not a class id
    elif isinstance(raw, (int, np.integer)):
        value = int(raw)
    elif isinstance(raw, (float, np.floating)) and math.isfinite(raw) and float(raw).is_integer():
        value = int(raw)
    if value is None or not 0 <= value < len(names):
        raise FisherJaxError(
            f"{_where(where)}: label {raw!r} is outside the label space of {spec.name} "
            f"({_describe_labels(spec)})")
    return value


def _labels_array(values: list[float | int], spec: TaskSpec) -> np.ndarray:
    return np.asarray(values, dtype=np.float32 if spec.is_regression else np.int64)


def _label_key(name: Any) -> str:
    """A label name compared without case or separators ('NOT_ENTAILMENT' == 'not entailment')."""
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def _generic_label(name: Any, i: int) -> bool:
    """Hugging Face's placeholder names (``LABEL_0``, ...) or the bare id: they carry no meaning."""
    return _label_key(name) in (f"label{i}", str(i))


def label_order(id2label: Mapping[Any, Any] | None, task: str | TaskSpec) -> tuple[int, ...] | None:
    """Where each of the task's labels sits among a checkpoint's outputs, from its ``id2label``.

    ``order[j]`` is the checkpoint's id of the task's label ``j`` (names compared without case or
    separators), so ``logits[:, order]`` are the task's columns in the task's order and a task
    label id ``y`` is the checkpoint's label ``order[y]``. None when nothing needs mapping: a
    regression task, no ``id2label``, generic names (``LABEL_0``, ``LABEL_1``, ...: the ids are
    trusted) or names already in the task's order. Names that do not match the task's one to one
    raise a one-line :class:`FisherJaxError` (a score under a guessed order would be silently wrong).
    """
    spec = get_task(task)
    if spec.is_regression or not id2label:
        return None
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise FisherJaxError(f"checkpoint id2label has non-integer ids: {dict(id2label)}") from None
    names = [by_id.get(i) for i in range(len(by_id))]
    if None in names:
        raise FisherJaxError(f"checkpoint id2label ids are not 0..{len(by_id) - 1}: {sorted(by_id)}")
    task_names = spec.label_names or ()
    if all(_generic_label(n, i) for i, n in enumerate(names)) \
            or all(_generic_label(n, i) for i, n in enumerate(task_names)):
        return None
    shown = ", ".join(f"{i}={n}" for i, n in enumerate(names))
    keys = [_label_key(n) for n in names]
    if len(names) != len(task_names) or sorted(keys) != sorted(map(_label_key, task_names)) \
            or len(set(keys)) != len(keys):
        raise FisherJaxError(
            f"the checkpoint's labels ({shown}) do not match task {spec.name}'s "
            f"({_describe_labels(spec)}): cannot tell which output is which class; fix id2label in "
            f"the checkpoint's config.json (or use LABEL_0.. names to trust its ids)")
    order = tuple(keys.index(_label_key(n)) for n in task_names)
    return None if order == tuple(range(len(order))) else order


# --------------------------------------------------------------------------------------------
# local GLUE folders


def resolve_glue_dir(glue_dir: str | os.PathLike | None = None) -> Path | None:
    """The local GLUE folder to use: the argument, else ``$GLUE_DIR``, else None (the Hub)."""
    if glue_dir is not None and str(glue_dir) != "":
        return Path(glue_dir).expanduser()
    env = os.environ.get(GLUE_DIR_ENV, "")
    return Path(env).expanduser() if env else None


def _task_folder(root: Path, spec: TaskSpec) -> Path:
    """The task's folder under ``root``; accepts common spellings ('SST-2', 'sst2', 'SST2')."""
    primary = spec.local_dir or spec.name
    for cand in dict.fromkeys([primary, spec.name, spec.name.upper(), primary.lower(),
                               primary.replace("-", "")]):
        if (root / cand).is_dir():
            return root / cand
    return root / primary


_TSV = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}  # GLUE style: tabs, no quoting


_LONE_CR = re.compile(r"(?<=\r)(?!\n)")  # where a text file read with newline="" also ends a line
_LONE_CR_BYTES = re.compile(rb"\r(?!\n)")
_LINE_END = re.compile(r"\r\n|\r|\n")


class _Lines:
    """The lines of a text file that start in the ``p``-th of ``n`` equal byte ranges
    (``part=(p, n)``), decoded, line ends kept, split where reading it whole would split them.

    Every line starts in exactly one range, so the ``n`` parts read one after the other are the
    file. Line numbers in the whole file cost a count of the earlier bytes' line ends, so
    :meth:`number` does that only when asked (an error message).
    """

    def __init__(self, path: Path, encoding: str, part: tuple[int, int]):
        self.path, self.encoding = path, encoding
        size = path.stat().st_size
        p, n = part
        self.start, self.stop = size * p // n, size * (p + 1) // n
        self.first = self.start  # byte offset of the range's first line, once read

    @property
    def holds_first_line(self) -> bool:
        return self.start == 0 < self.stop

    def __iter__(self) -> Iterator[str]:
        with open(self.path, "rb") as f:
            if self.start > 0:
                f.seek(self.start - 1)
                f.readline()  # the rest of the line that starts before the range
            pos = self.first = f.tell()
            while pos < self.stop:
                line = f.readline()
                if not line:
                    return
                pos += len(line)
                yield from _LONE_CR.split(line.decode(self.encoding))

    def number(self, local: int) -> int:
        """The whole file's line number of the range's ``local``-th line (1-based)."""
        count, left, cr_at_end = 0, self.first, False
        with open(self.path, "rb") as f:
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if cr_at_end and chunk.startswith(b"\n"):
                    count -= 1  # the previous chunk's last "\r" was half of a "\r\n"
                count += chunk.count(b"\n") + len(_LONE_CR_BYTES.findall(chunk))
                cr_at_end, left = chunk.endswith(b"\r"), left - len(chunk)
        return count + local


def _read_tsv_rows(path: Path, encoding: str, lines: _Lines | None = None,
                   **csv_options: Any) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-empty line; GLUE's TSV dialect unless options are given.

    ``lines``: only a byte range's lines; the numbers are then the range's own (``lines.number``
    turns one into the file's).
    """
    if lines is not None:
        reader = csv.reader(iter(lines), **(csv_options or _TSV))
        yield from _csv_rows(reader, lambda n: f"{path}:{lines.number(n)}")
        return
    with open(path, encoding=encoding, newline="") as f:
        yield from _csv_rows(csv.reader(f, **(csv_options or _TSV)), lambda n: f"{path}:{n}")


def _csv_rows(reader: Any, where: Callable[[int], str]) -> Iterator[tuple[int, list[str]]]:
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise FisherJaxError(f"{where(reader.line_num)}: malformed row ({e})") from None
        if row:
            yield reader.line_num, row


def byte_ranges_apply(path: str | os.PathLike) -> bool:
    """Whether a data file can be read by byte ranges (every line one row: GLUE-style TSV,
    ``.tsv``/``.txt`` without quoting, JSON Lines); quoted CSV and JSON arrays cannot."""
    return Path(path).suffix.lower() in (".tsv", ".txt", ".jsonl", ".ndjson")


def _column_index(header: list[str], col: Column, path: Path) -> int:
    if isinstance(col, int):
        return col
    if col not in header:
        raise FisherJaxError(
            f"{path}:1: header has no column '{col}' (found: {', '.join(header)})")
    return header.index(col)


def read_glue_tsv(path: str | os.PathLike, spec: TaskSpec, split: str,
                  keep: RowFilter | None = None, part: tuple[int, int] | None = None) -> Examples:
    """Read one GLUE-download TSV file with the task's column layout.

    Every row must have exactly as many fields as the header (or as CoLA's four columns):
    a different count means a tab inside a text or a truncated line, which would silently shift
    columns. Tasks flagged ``skip_malformed`` (QQP) drop such rows instead, as the GLUE tools do.
    ``keep(i)`` (row ``i`` of the split, counted after skipped rows) chooses the rows whose texts
    are kept; every row is still checked, so every reader of the file reports the same bad row.
    ``part=(p, n)`` reads only the rows whose lines start in the ``p``-th of ``n`` byte ranges
    (``keep`` then counts the range's rows); a range may hold none.
    """
    path = Path(path)
    lines = _Lines(path, spec.local_encoding, part) if part is not None else None
    rows = _read_tsv_rows(path, spec.local_encoding, lines)
    where = (lambda n: f"{path}:{n}") if lines is None else (lambda n: f"{path}:{lines.number(n)}")
    if spec.local_header:
        head = rows if lines is None or lines.holds_first_line else _read_tsv_rows(path, spec.local_encoding)
        first = next(head, None)
        if first is None:
            raise FisherJaxError(f"{path}: empty file (no header and no examples)")
        header = [h.strip() for h in first[1]]
        width = len(header)
    else:
        header = []
        width = spec.local_num_columns
    text_idx = [_column_index(header, c, path) for c in spec.local_text_columns]
    label_idx = _column_index(header, spec.local_label_column, path)
    needed = max(text_idx + [label_idx]) + 1
    texts: list[list[str]] = [[] for _ in text_idx]
    labels: list[float | int] = []
    count = 0
    for line, row in rows:
        if (width is not None and len(row) != width) or len(row) < needed:
            if spec.skip_malformed:
                continue
            expect = width if width is not None else needed
            raise FisherJaxError(
                f"{where(line)}: malformed row: expected {expect} tab-separated fields, "
                f"found {len(row)}")
        label = _parse_label(row[label_idx], spec, lambda: where(line))
        count += 1
        if keep is not None and not keep(count - 1):
            continue
        for out, i in zip(texts, text_idx):
            out.append(row[i])
        labels.append(label)
    if not count and part is None:
        raise FisherJaxError(f"{path}: no examples (empty dataset)")
    return Examples(text_a=texts[0], text_b=texts[1] if len(texts) > 1 else None,
                    labels=_labels_array(labels, spec), task=spec.name, split=split,
                    source=str(path), spec=spec, num_rows=count)


# --------------------------------------------------------------------------------------------
# the Hub


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def load_hub_split(spec: TaskSpec, split: str, keep: RowFilter | None = None) -> Examples:
    """Load ``split`` from ``nyu-mll/glue`` with 🤗 datasets; any failure is one FisherJaxError."""
    hint = (f"pass --glue-dir DIR or set {GLUE_DIR_ENV} to a local GLUE folder "
            f"(<TASK>/train.tsv, <TASK>/dev.tsv)")
    return hub_examples(spec, split, HUB_DATASET, spec.name, spec.text_columns, "label",
                        what=f"GLUE task {spec.name}", hint=hint, keep=keep)


def hub_examples(spec: TaskSpec, split: str, dataset: str, config: str | None,
                 text_columns: Sequence[str], label_column: str, what: str, hint: str,
                 keep: RowFilter | None = None) -> Examples:
    """``split`` (canonical name; ``spec.hub_split`` gives the Hub's) of a Hub data set, through
    🤗 datasets. Any failure to fetch (offline, no such data set or column) is one FisherJaxError
    naming ``what`` and ending with ``hint``. ``keep``: as in :func:`read_glue_tsv` (only the
    kept rows' texts leave the memory-mapped Arrow table; every label is checked).

    A ``ClassLabel`` column's ids are turned into its names first, so they are matched against
    the task's label names rather than trusted to be in the same order.
    """
    hub_split = spec.hub_split(split)
    try:
        import datasets  # heavy; only needed on this path

        ds = datasets.load_dataset(dataset, config, split=hub_split)
        total = len(ds)
        kept = None if keep is None else [i for i in range(total) if keep(i)]
        chosen = ds if kept is None else ds.select(kept)
        texts = [list(chosen[c]) for c in text_columns]
        raw_labels = list(ds[label_column])
        feature = ds.features.get(label_column)
    except Exception as e:  # network, offline mode, missing package, changed schema
        raise FisherJaxError(
            f"cannot load {what} split {split} from the Hub ({dataset}"
            f"{f', config {config}' if config and dataset != HUB_DATASET else ''}): "
            f"{type(e).__name__}: {_one_line(str(e))}; {hint}") from None
    names = getattr(feature, "names", None)
    if names and not spec.is_regression and tuple(names) != spec.label_names:
        raw_labels = [names[v] if isinstance(v, int) and 0 <= v < len(names) else v for v in raw_labels]
    source = f"hub:{dataset}/{config}:{hub_split}" if config else f"hub:{dataset}:{hub_split}"
    labels = [_parse_label(v, spec, f"{source}:row {i}") for i, v in enumerate(raw_labels)]
    if not labels:
        raise FisherJaxError(f"{source}: no examples (empty dataset)")
    return Examples(text_a=[str(t) for t in texts[0]],
                    text_b=[str(t) for t in texts[1]] if len(texts) > 1 else None,
                    labels=_labels_array(labels if keep is None else [labels[i] for i in kept], spec),
                    task=spec.name, split=split,
                    source=source, spec=spec, num_rows=total)


# --------------------------------------------------------------------------------------------
# public entry points


def load_split(task: str | TaskSpec, split: str, glue_dir: str | os.PathLike | None = None,
               keep: RowFilter | None = None, part: tuple[int, int] | None = None) -> Examples:
    """Examples of one split: a GLUE task's from ``glue_dir``, else ``$GLUE_DIR``, else the Hub;
    a task file's from the files (or Hub data set) it names.

    ``split`` is 'train', 'dev' (alias 'validation'; MNLI's matched dev set) or, for MNLI,
    'dev_mismatched'; a task file offers the splits it lists. Test splits carry no labels in GLUE
    and are not offered. ``keep(i)`` keeps only the rows it accepts (file order; ``num_rows``
    still counts them all): the file is streamed, so a process holds only the texts it keeps.
    ``part=(p, n)`` reads only the ``p``-th of ``n`` byte ranges of the file (the rows whose lines
    start in it; ``num_rows`` counts those), where :func:`split_reads_by_bytes` says it can.
    """
    spec = get_task(task)
    split = normalize_split(spec, split)
    if part is not None and not split_reads_by_bytes(spec, split, glue_dir):
        raise FisherJaxError(f"{spec.name} {split} cannot be read by byte ranges (quoted CSV, a JSON array "
                             f"or the Hub): read it with keep= instead")
    if spec.task_file is not None:  # a task file names its own data; glue_dir does not apply
        from .taskfile import load_task_split

        return load_task_split(spec, split, keep, part)
    root = resolve_glue_dir(glue_dir)
    if root is None:
        return load_hub_split(spec, split, keep)
    path = _task_folder(root, spec) / spec.local_file(split)
    if not path.is_file():
        raise FisherJaxError(
            f"missing {spec.name} {split} file: searched {path} "
            f"(GLUE folder {root} from {'--glue-dir' if glue_dir else GLUE_DIR_ENV})")
    return read_glue_tsv(path, spec, split, keep, part)


def split_reads_by_bytes(task: str | TaskSpec, split: str, glue_dir: str | os.PathLike | None = None) -> bool:
    """Whether ``load_split(..., part=(p, n))`` works for this split: a local GLUE file, or a task
    file's local file with one row per line (:func:`byte_ranges_apply`)."""
    spec = get_task(task)
    split = normalize_split(spec, split)
    if spec.task_file is not None:
        return spec.hub_dataset is None and byte_ranges_apply(spec.local_file(split))
    return resolve_glue_dir(glue_dir) is not None


def default_metrics(num_labels: int, is_regression: bool) -> tuple[str, ...]:
    """Metrics of a task that names none: Pearson and Spearman (regression), accuracy plus F1 of
    class 1 (two classes), accuracy (more)."""
    if is_regression:
        return ("pearson", "spearman")
    return ("accuracy", "f1") if num_labels == 2 else ("accuracy",)


def custom_task(name: str, num_text_columns: int, label_names: Sequence[str] | None = None,
                is_regression: bool = False, num_labels: int | None = None,
                **fields: Any) -> TaskSpec:
    """A TaskSpec for data that is not GLUE: accuracy (+F1 if binary) or Pearson/Spearman.

    ``fields`` set any other :class:`TaskSpec` field (a task file's columns, metrics, files).
    """
    fields.setdefault("text_columns", ("text_a", "text_b")[:num_text_columns])
    fields.setdefault("local_dir", None)
    if is_regression:
        fields.setdefault("metrics", default_metrics(1, True))
        return TaskSpec(name=name, label_names=None, is_regression=True, num_labels=1, **fields)
    if label_names is None:
        label_names = tuple(str(i) for i in range(num_labels or 0))
    names = tuple(str(n) for n in label_names)
    fields.setdefault("metrics", default_metrics(len(names), False))
    return TaskSpec(name=name, label_names=names, is_regression=False, num_labels=len(names), **fields)


def _read_table(path: Path, part: tuple[int, int] | None = None) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(location, record) of a CSV/TSV (header row required) or JSON/JSON Lines file.

    The location is ``file:line`` (``file:record N`` inside a JSON array) for error messages.
    ``part=(p, n)``: only the ``p``-th of ``n`` byte ranges of a file with one row per line
    (:func:`byte_ranges_apply`); its locations are then functions that give the text.
    """
    suffix = path.suffix.lower()
    if part is not None:
        yield from _read_table_range(path, _Lines(path, "utf-8-sig", part))
        return
    if suffix in (".csv", ".tsv", ".txt"):
        # TSV follows the GLUE convention (no quoting); CSV uses standard quoting.
        opts: dict[str, Any] = _TSV if suffix != ".csv" else {"delimiter": ","}
        header: list[str] | None = None
        for line_num, row in _read_tsv_rows(path, "utf-8-sig", **opts):
            if header is None:
                header = [h.strip() for h in row]
                continue
            if len(row) != len(header):
                raise FisherJaxError(
                    f"{path}:{line_num}: malformed row: expected {len(header)} "
                    f"fields, found {len(row)}")
            yield f"{path}:{line_num}", dict(zip(header, row))
    elif suffix in (".json", ".jsonl", ".ndjson"):
        text = path.read_text(encoding="utf-8-sig")
        stripped = text.lstrip()
        if suffix == ".json" and stripped.startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise FisherJaxError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
            for i, rec in enumerate(records):
                if not isinstance(rec, dict):
                    raise FisherJaxError(f"{path}:record {i + 1}: malformed row: not a JSON object")
                yield f"{path}:record {i + 1}", rec
            return
        for line_no, rec in _json_lines(path, _LINE_END.split(text), lambda n: n):  # the lines a byte range sees
            yield f"{path}:{line_no}", rec
    else:
        raise FisherJaxError(
            f"{path}: unsupported file type '{path.suffix}' (use .csv, .tsv, .json or .jsonl)")


def _read_table_range(path: Path, lines: _Lines) -> Iterator[tuple[Any, dict[str, Any]]]:
    """:func:`_read_table` of one byte range of a TSV or JSON Lines file (a location is a function)."""
    if path.suffix.lower() in (".tsv", ".txt"):
        first = next(_read_tsv_rows(path, "utf-8-sig"), None)
        if first is None:
            return  # an empty file: no rows in any range
        header = [h.strip() for h in first[1]]
        for line_num, row in _read_tsv_rows(path, "utf-8-sig", lines):
            if lines.holds_first_line and line_num == first[0]:
                continue  # the header's own line
            if len(row) != len(header):
                raise FisherJaxError(f"{path}:{lines.number(line_num)}: malformed row: expected {len(header)} "
                                     f"fields, found {len(row)}")
            yield (lambda n=line_num: f"{path}:{lines.number(n)}"), dict(zip(header, row))
        return
    for line_no, rec in _json_lines(path, lines, lines.number):
        yield (lambda n=line_no: f"{path}:{lines.number(n)}"), rec


def _json_lines(path: Path, lines: Iterable[str], number: Callable[[int], int]) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank JSON Lines line; ``number`` gives an error's line."""
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise FisherJaxError(f"{path}:{number(line_no)}: malformed JSON line ({e.msg})") from None
        if not isinstance(rec, dict):
            raise FisherJaxError(f"{path}:{number(line_no)}: malformed row: not a JSON object")
        yield line_no, rec


def read_columns(path: str | os.PathLike, text_columns: Sequence[str], label_column: str,
                 keep: RowFilter | None = None,
                 check_label: Callable[[Any, str], Any] | None = None,
                 part: tuple[int, int] | None = None) -> tuple[list[list[str]], list[tuple[str, Any]], int]:
    """The text columns and the raw labels (with their ``file:line``) of a CSV, TSV, JSON or JSON
    Lines file (:func:`_read_table`), and the number of rows; a row without one of the columns is
    a ``file:line`` error. ``keep``, ``part``: as in :func:`read_glue_tsv`;
    ``check_label(raw, where)`` runs on every row's label, kept or not."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FisherJaxError(f"missing data file: searched {path}")
    texts: list[list[str]] = [[] for _ in text_columns]
    raw_labels: list[tuple[str, Any]] = []
    count = 0
    for location, rec in _read_table(path, part):
        for c in text_columns:
            if c not in rec:
                raise FisherJaxError(f"{_where(location)}: malformed row: no column '{c}' "
                                     f"(found: {', '.join(map(str, rec))})")
        if label_column not in rec:
            raise FisherJaxError(f"{_where(location)}: malformed row: no label column '{label_column}' "
                                 f"(found: {', '.join(map(str, rec))})")
        if check_label is not None:
            check_label(rec[label_column], location)
        count += 1
        if keep is not None and not keep(count - 1):
            continue
        for out, c in zip(texts, text_columns):
            value = rec[c]
            out.append("" if value is None else str(value))
        raw_labels.append((location, rec[label_column]))
    if not count and part is None:
        raise FisherJaxError(f"{path}: no examples (empty dataset)")
    return texts, raw_labels, count


def table_examples(path: str | os.PathLike, spec: TaskSpec, split: str, text_columns: Sequence[str],
                   label_column: str, keep: RowFilter | None = None,
                   part: tuple[int, int] | None = None) -> Examples:
    """Examples of ``spec`` from one table file: labels are names of ``spec.label_names`` or ids
    (numbers for regression); a label outside them is an error naming the file and line.
    ``keep``, ``part``: as in :func:`read_glue_tsv`."""
    texts, raw_labels, count = read_columns(path, text_columns, label_column, keep, part=part,
                                            check_label=lambda raw, where: _parse_label(raw, spec, where))
    labels = [_parse_label(raw, spec, where) for where, raw in raw_labels]
    return Examples(text_a=texts[0], text_b=texts[1] if len(texts) == 2 else None,
                    labels=_labels_array(labels, spec), task=spec.name, split=split,
                    source=str(Path(path).expanduser()), spec=spec, num_rows=count)


def load_custom(path: str | os.PathLike, text_columns: Sequence[str] | str, label_column: str,
                label_names: Sequence[str] | None = None, is_regression: bool = False,
                split: str = "custom") -> Examples:
    """Examples from a user's own CSV, TSV, JSON (array of objects) or JSON Lines file.

    ``text_columns`` names one or two text fields. Labels may be given as names (when
    ``label_names`` is set) or as integer ids; without ``label_names`` the classes are
    ``0..max(label)``. ``is_regression`` reads float targets. The returned ``spec`` carries the
    metrics to use (accuracy, plus F1 when binary; Pearson/Spearman for regression). A task file
    (:mod:`fisher_jax.data.taskfile`) describes the same data once for every command.
    """
    path = Path(path).expanduser()
    cols = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
    if len(cols) not in (1, 2):
        raise FisherJaxError(f"text_columns must name one or two columns, got {list(cols)}")
    texts, raw_labels, _ = read_columns(path, cols, label_column)
    num_labels = None
    if not is_regression and label_names is None:
        num_labels = 1 + max(_integer_label(raw, where) for where, raw in raw_labels)
    spec = custom_task(path.stem, len(cols), label_names, is_regression, num_labels)
    labels = [_parse_label(raw, spec, where) for where, raw in raw_labels]
    return Examples(text_a=texts[0], text_b=texts[1] if len(cols) == 2 else None,
                    labels=_labels_array(labels, spec), task=spec.name, split=split,
                    source=str(path), spec=spec)


def _integer_label(raw: Any, where: str) -> int:
    """A non-negative integer class id, for custom files whose label names are not given."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(raw, bool) or not math.isfinite(value) or value < 0 or not value.is_integer():
        raise FisherJaxError(
            f"{where}: label {raw!r} is outside the label space (non-negative integer ids; "
            f"pass label_names to use names)")
    return int(value)


def iter_tasks(names: Iterable[str] | None = None) -> list[TaskSpec]:
    """TaskSpecs for ``names`` (all nine GLUE tasks when None), validating each name."""
    return [get_task(n) for n in (names if names is not None else TASKS)]
