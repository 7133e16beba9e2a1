"""`fisher-jax` command line: a thin argparse layer over library functions.

Each subcommand lives beside the code it drives, as a pair of functions (add its options to a
parser / run it from the parsed arguments), so every command is also an importable function a
notebook can call. :data:`COMMANDS` lists them explicitly. Only the module of the command being
run is imported: ``fisher-jax --help`` answers without importing JAX. A command whose module (or
an optional package it needs) cannot be imported is still listed, marked "(unavailable: reason)",
and running it says why in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
from typing import Callable, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: ``module.add(parser)`` declares its options, ``module.run(args)`` runs it.

    ``needs`` are the third-party packages the module imports, checked without importing them so
    that the top-level help can say which commands this installation lacks.
    """

    name: str
    module: str
    add: str
    run: str
    help: str
    needs: tuple[str, ...] = ()


_CORE = ("numpy", "jax", "flax", "transformers", "safetensors")
COMMANDS: tuple[Command, ...] = (
    Command("finetune", "fisher_jax.train.finetune", "add_finetune_args", "run_finetune",
            "fine-tune a model on a GLUE task or a task file", (*_CORE, "optax", "orbax")),
    Command("evaluate", "fisher_jax.train.evaluate", "add_evaluate_args", "run_evaluate",
            "evaluate a model on a task's dev split (GLUE or a task file)", _CORE),
    Command("zoo", "fisher_jax.train.zoo", "add_zoo_args", "run_zoo",
            "fine-tune the MiniLM base on several tasks, one zoo per seed (cached)", (*_CORE, "optax", "orbax")),
    Command("fisher", "fisher_jax.stats.cli", "add_fisher_args", "run_fisher",
            "mask-node or full Fisher of a model on a task", _CORE),
    Command("gram", "fisher_jax.stats.cli", "add_gram_args", "run_gram",
            "RegMean Gram matrices of a model on a task", _CORE),
    Command("merge", "fisher_jax.merging.cli", "add_merge_args", "run_merge",
            "merge fine-tuned models into one body", (*_CORE, "scipy")),
    Command("experiment", "fisher_jax.experiment.runner", "add_experiment_args", "run_experiment_cli",
            "the paper's pairwise-merge experiment from a YAML config", (*_CORE, "optax", "scipy", "yaml")),
    Command("compare", "fisher_jax.reference.compare", "add_arguments", "main",
            "JAX vs the PyTorch reference, side by side", (*_CORE, "torch")),
    Command("demo", "fisher_jax.experiment.demo", "add_demo_args", "run_demo_cli",
            "end-to-end demo: fine-tune, Fisher, merge, evaluate (CPU, minutes)", (*_CORE, "optax", "scipy", "yaml")),
)


# ----------------------------------------------------------------------------- shared vocabulary
# Every command's argparse function uses these, so files are `--out FILE`, folders `--out-dir DIR`,
# lists take space- or comma-separated values, and `--no-progress` silences every long command.

TASK_HELP = "a GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli) or the path of a YAML task file"


class _Deprecated(argparse.Action):
    """A hidden old spelling of an option: stores like the new one and says so on stderr."""

    def __init__(self, option_strings, dest, new: str = "", **kw):
        super().__init__(option_strings, dest, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def add_option(parser: argparse.ArgumentParser, flag: str, *, old: Sequence[str] = (), required: bool = False,
               **kw) -> None:
    """``parser.add_argument(flag, **kw)`` plus hidden deprecated spellings ``old`` that still work
    (and warn). A required option stays required when given under an old spelling."""
    kw.setdefault("dest", flag.lstrip("-").replace("-", "_"))
    if not kw.get("help"):
        raise ValueError(f"{flag}: every option needs a help string")
    target = parser.add_mutually_exclusive_group(required=True) if required and old else parser
    target.add_argument(flag, required=required and not old, **kw)
    flag_like = kw.get("action") in ("store_true", "store_false")
    for name in old:
        extra = {"nargs": 0} if flag_like else {"type": kw.get("type"), "metavar": kw.get("metavar")}
        target.add_argument(name, dest=kw["dest"], action=_Deprecated, new=flag, default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS, **extra)


def add_out_file(parser: argparse.ArgumentParser, help: str, *, required: bool = False, old: Sequence[str] = (),
                 metavar: str = "FILE") -> None:
    """``--out FILE``: where a command writes its one output file."""
    add_option(parser, "--out", old=old, required=required, default=None, metavar=metavar, help=help)


def add_out_dir(parser: argparse.ArgumentParser, help: str, *, required: bool = False, old: Sequence[str] = (),
                dest: str = "out_dir", default: Optional[str] = None) -> None:
    """``--out-dir DIR``: the folder a command writes into."""
    add_option(parser, "--out-dir", old=old, required=required, default=default, metavar="DIR", dest=dest, help=help)


def add_no_progress(parser: argparse.ArgumentParser) -> None:
    """``--no-progress`` (old spelling ``--quiet``): ``args.no_progress``."""
    add_option(parser, "--no-progress", old=("--quiet",), action="store_true", help="no progress bars")


class SplitList(argparse.Action):
    """A list option: space-separated values, each also split at commas (``--tasks a b``,
    ``--tasks a,b``); repeating the option adds to the list."""

    def __init__(self, option_strings, dest, item_type: Callable = str, **kw):
        kw.setdefault("nargs", "+")
        super().__init__(option_strings, dest, **kw)
        self.item_type = item_type

    def __call__(self, parser, namespace, values, option_string=None):
        items = []
        for value in values:
            for part in str(value).split(","):
                if part.strip():
                    try:
                        items.append(self.item_type(part.strip()))
                    except ValueError:
                        parser.error(f"{option_string}: invalid value {part.strip()!r}")
        current = getattr(namespace, self.dest, None)
        keep = [] if current is None or current is self.default else list(current)
        setattr(namespace, self.dest, keep + items)


def add_list(parser: argparse.ArgumentParser, flag: str, *, item_type: Callable = str, **kw) -> None:
    """A :class:`SplitList` option (every option needs ``help``)."""
    if not kw.get("help"):
        raise ValueError(f"{flag}: every option needs a help string")
    parser.add_argument(flag, action=SplitList, item_type=item_type, **kw)


# ----------------------------------------------------------------------------- the command table
def missing_packages(command: Command) -> list[str]:
    """The packages of ``command.needs`` that are not installed (looked up, never imported)."""
    out = []
    for name in command.needs:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def load_command(command: Command) -> tuple[Callable, Callable]:
    """Import ``command``'s module: its ``(add, run)`` functions. ImportError names the reason."""
    missing = missing_packages(command)
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed")
    try:
        mod = importlib.import_module(command.module)
    except ImportError as exc:
        raise ImportError(f"{type(exc).__name__}: {exc}") from exc
    add, run = getattr(mod, command.add, None), getattr(mod, command.run, None)
    if not callable(add) or not callable(run):
        raise ImportError(f"{command.module} has no {command.add if not callable(add) else command.run}()")
    return add, run


def _chosen(argv: Sequence[str]) -> Optional[str]:
    """The subcommand named in ``argv`` (its first word that is a command's name), if any."""
    names = {c.name for c in COMMANDS}
    return next((a for a in argv if a in names), None)


def build_parser(load: str | Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``fisher-jax`` parser; the options of the commands in ``load`` (a name, names, or
    ``"all"``) are declared, which imports their modules. Other commands parse as bare names."""
    from . import __version__

    wanted = {c.name for c in COMMANDS} if load == "all" else {load} if isinstance(load, str) else set(load or ())
    parser = argparse.ArgumentParser(
        prog="fisher-jax",
        description="Merge fine-tuned transformers in JAX: Fisher mask nodes, RegMean and baselines. "
                    "Every --task takes a GLUE name or the path of a YAML task file.",
    )
    parser.add_argument("--version", action="version", version=f"fisher-jax {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (INFO level)")
    add_distributed_args(parser)
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for command in COMMANDS:
        reason = None
        if command.name in wanted:
            try:
                add, run = load_command(command)
            except ImportError as exc:
                reason = str(exc)
        else:
            missing = missing_packages(command)
            reason = f"{', '.join(missing)} not installed" if missing else None
        help_text = command.help if reason is None else f"{command.help} (unavailable: {reason})"
        p = sub.add_parser(command.name, help=help_text, description=help_text)
        if reason is not None:
            p.set_defaults(_unavailable=reason)
        elif command.name in wanted:
            add(p)
            p.set_defaults(_run=run)
    return parser


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """The global multi-process options (before the subcommand; :mod:`fisher_jax.distributed`)."""
    g = parser.add_argument_group(
        "several processes", "one run over N JAX processes (each reads its slice of every batch; process 0 writes "
        "and prints); also FISHER_JAX_COORDINATOR / FISHER_JAX_NUM_PROCESSES / FISHER_JAX_PROCESS_ID; SLURM, "
        "Open MPI and TPU slices are detected (FISHER_JAX_DISTRIBUTED=off: never)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordinator service, the same in every process")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="how many processes join the run")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's index, 0..N-1")
    g.add_argument("--model-parallel", type=int, default=None, metavar="K",
                   help="split parameters over K devices (a 'model' mesh axis; K divides each process's device "
                        "count; default 1: replicated; also FISHER_JAX_MODEL_PARALLEL)")


class _Follower:
    """Around a command in a process other than the main one: its stdout is dropped, its progress
    bars are off, and its ``--out`` / ``--plot`` files go to a scratch folder removed afterwards,
    so only process 0 prints and writes (commands that write folders check
    ``fisher_jax.distributed.is_main_process`` themselves)."""

    FILE_OPTIONS = ("out", "plot")

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __enter__(self):
        import os
        import tempfile

        self.scratch = tempfile.mkdtemp(prefix="fisher_jax_follower_")
        for name in self.FILE_OPTIONS:
            value = getattr(self.args, name, None)
            if isinstance(value, str) and value:
                setattr(self.args, name, os.path.join(self.scratch, os.path.basename(value) or name))
        if hasattr(self.args, "no_progress"):
            self.args.no_progress = True
        self.stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
        return self

    def __exit__(self, *exc):
        import shutil

        sys.stdout.close()
        sys.stdout = self.stdout
        shutil.rmtree(self.scratch, ignore_errors=True)
        return False


def use_compilation_cache() -> None:
    """JAX's persistent compilation cache under the cache root, for every command: a second run
    (or the next seed's process) loads its compiled steps instead of compiling them again.
    ``FISHER_JAX_COMPILATION_CACHE=0`` turns it off; an explicit ``JAX_COMPILATION_CACHE_DIR`` wins.
    Programs that compile in more than 0.1 s are kept (JAX's default, 1 s, leaves out most of a CPU
    run's small steps, which together are much of its compile time); an explicit
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` wins."""
    import os

    if os.environ.get("FISHER_JAX_COMPILATION_CACHE", "1") == "0":
        return
    from .experiment.config import cache_root

    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_root() / "jax_compilation_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    if "jax" in sys.modules:  # JAX reads the variables when it is imported
        config = sys.modules["jax"].config
        config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
        config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import FisherJaxError

    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = _chosen(argv)
    parser = build_parser(chosen)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_unavailable", None):
        parser.parse_args(argv)  # argparse's own "unrecognized arguments" error and exit
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if getattr(args, "_unavailable", None):
        print(f"fisher-jax {args.command}: error: unavailable: {args._unavailable}", file=sys.stderr)
        return 2
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    # Before anything computes with JAX: the compilation cache, and one XLA device per core (every
    # step is data-parallel; on a CPU this keeps all cores busy; JAX_NUM_CPU_DEVICES=1 opts out).
    import contextlib

    from .distributed import initialize, is_main_process
    from .parallel import use_cpu_cores

    use_compilation_cache()
    try:  # several processes join here, before JAX computes anything
        initialize(args.coordinator, args.num_processes, args.process_id)
    except FisherJaxError as exc:
        print(f"fisher-jax: error: {exc}", file=sys.stderr)
        return 2
    use_cpu_cores(strict=False)
    parallel_k = args.model_parallel if args.model_parallel is not None else os.environ.get("FISHER_JAX_MODEL_PARALLEL")
    if parallel_k is not None:
        from .parallel import use_model_parallel

        try:
            use_model_parallel(int(parallel_k))
        except (FisherJaxError, ValueError) as exc:
            print(f"fisher-jax: error: --model-parallel: {exc}", file=sys.stderr)
            return 2
    try:
        with (contextlib.nullcontext() if is_main_process() else _Follower(args)):
            result = args._run(args)
    except FisherJaxError as exc:
        print(f"fisher-jax {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fisher-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
