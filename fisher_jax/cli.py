"""`fisher-jax` command line: a thin argparse layer over library functions.

Each subcommand lives beside the code it drives, as a pair ``add_{name}_args(parser)`` /
``run_{name}(args)``; this file only lists them, so every command is also an importable function that
a notebook can call, and a command whose module is absent (an optional extra) simply is not listed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

# name -> (module holding add_arguments/main, one-line help)
COMMANDS = {
    "finetune": ("fisher_jax.train.finetune", "fine-tune a model on a GLUE (or custom) task"),
    "evaluate": ("fisher_jax.train.evaluate", "evaluate a model on a task's dev split"),
    "zoo": ("fisher_jax.train.zoo", "fine-tune the MiniLM base on local GLUE tasks, one zoo per seed (cached)"),
    "fisher": ("fisher_jax.stats.cli", "mask-node or full Fisher of a model on a task"),
    "gram": ("fisher_jax.stats.cli", "RegMean Gram matrices of a model on a task"),
    "merge": ("fisher_jax.merging.cli", "merge fine-tuned models into one body"),
    "experiment": ("fisher_jax.experiment.runner", "the paper's pairwise-merge experiment from a YAML config"),
    "compare": ("fisher_jax.reference.compare", "JAX vs the PyTorch reference, side by side"),
    "demo": ("fisher_jax.experiment.demo", "end-to-end demo: fine-tune, Fisher, merge, evaluate (CPU, minutes)"),
}


def _available(module: str, name: str) -> bool:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False
    return _hook(mod, name, "add") is not None and _hook(mod, name, "run") is not None


def _hook(mod, name: str, kind: str):
    """``add_{name}_args`` / ``run_{name}_cli`` or ``run_{name}`` (module-wide ``add_arguments`` / ``run``)."""
    names = [f"add_{name}_args", "add_arguments"] if kind == "add" else [f"run_{name}_cli", f"run_{name}", "run"]
    return next((getattr(mod, n) for n in names if callable(getattr(mod, n, None))), None)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fisher-jax",
        description="Merge fine-tuned BERT-family models in JAX: Fisher mask nodes, RegMean and baselines.",
    )
    parser.add_argument("--version", action="version", version=f"fisher-jax {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (INFO level)")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if not _available(module, name):
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        _hook(mod, name, "add")(p)
        p.set_defaults(_run=_hook(mod, name, "run"))
    return parser


def use_compilation_cache() -> None:
    """JAX's persistent compilation cache under the cache root, for every command: a second run
    (or the next seed's process) loads its compiled steps instead of compiling them again.
    ``FISHER_JAX_COMPILATION_CACHE=0`` turns it off; an explicit ``JAX_COMPILATION_CACHE_DIR`` wins."""
    import os

    if os.environ.get("FISHER_JAX_COMPILATION_CACHE", "1") == "0":
        return
    from .experiment.config import cache_root

    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_root() / "jax_compilation_cache"))
    if "jax" in sys.modules:  # JAX reads the variable when it is imported
        sys.modules["jax"].config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import FisherJaxError
    from .parallel import use_cpu_cores

    # One XLA device per core, before anything touches JAX: every step is data-parallel, and on a
    # CPU this is what keeps all cores busy (JAX_NUM_CPU_DEVICES=1 opts out).
    use_compilation_cache()
    use_cpu_cores(strict=False)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
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
