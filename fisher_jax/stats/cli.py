"""`fisher-jax fisher` and `fisher-jax gram`: statistics of one model on one task, to a file."""

from __future__ import annotations

import argparse
from typing import Any


from ..errors import FisherJaxError


def _common(parser: argparse.ArgumentParser) -> None:
    from ..cli import TASK_HELP, add_no_progress, add_out_file

    parser.add_argument("--model", required=True, help="fine-tuned model folder (or Hub id)")
    parser.add_argument("--task", required=True, help=TASK_HELP)
    add_out_file(parser, "output .safetensors file", required=True)
    parser.add_argument("--glue-dir", default=None,
                        help="local GLUE folder (default: $GLUE_DIR, else the Hub; a task file names its own data)")
    parser.add_argument("--split", default="train", help="split to draw examples from (default: train)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the task's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example draw (and of sampled labels)")
    parser.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="resume a long run from here (orbax)")
    add_no_progress(parser)


def add_fisher_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``fisher-jax fisher``."""
    _common(parser)
    parser.add_argument("--kind", choices=("mask", "full"), default="mask",
                        help="mask: Fisher of the head and neuron mask nodes; full: of every body parameter")
    parser.add_argument("--estimator", choices=("empirical", "expected", "sampled", "batch"), default=None,
                        help="default: empirical (mask), expected (full); --reference implies batch")
    parser.add_argument("--num-examples", type=int, default=None, help="default: 128 (mask), 4096 (full)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step (default: 32)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="examples per device whose gradients are computed together (batch mode: added "
                             "up before squaring; default: full 8; mask 4 on CPU, the whole batch on GPU/TPU)")
    parser.add_argument("--reference", action="store_true",
                        help="the released code exactly: batch estimator, batch 32, 128 training rows drawn "
                             "as its np.random.seed(0); np.random.choice(n, 128), in draw order")
    parser.add_argument("--plot", default=None, metavar="PNG", help="mask Fisher: heatmap of heads, neuron spread")
    return parser


def add_gram_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``fisher-jax gram``."""
    _common(parser)
    parser.add_argument("--num-examples", type=int, default=256, help="examples to accumulate (default: 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step (default: 32)")
    parser.add_argument("--include-padding", action="store_true",
                        help="count padding tokens into the Grams, as the released RegMean code did")
    return parser


def _batches(model, args: argparse.Namespace, num_examples: int, with_replacement: bool, order=None):
    from ..data import batching
    from ..models.hub import load_tokenizer

    tokenizer = load_tokenizer(model)
    length = args.max_length or batching.default_max_length(args.task)
    from ..data.glue import resolve_glue_dir

    glue_dir = resolve_glue_dir(args.glue_dir)
    if with_replacement:
        out = batching.sample_task_batches(args.task, args.split, tokenizer, num_examples, args.batch_size,
                                           max_length=length, glue_dir=glue_dir, seed=args.seed)
    else:
        out = batching.task_batches(args.task, args.split, tokenizer, args.batch_size, max_length=length,
                                    glue_dir=glue_dir, shuffle=True, seed=args.seed, max_examples=num_examples)
    return out if order is None else batching.Relabelled(out, order)


def _load(args: argparse.Namespace):
    """The model, the task, and the checkpoint's label order for it (None: the ids agree)."""
    from ..data.glue import get_task, label_order
    from ..models.hub import from_pretrained

    spec = get_task(args.task)
    model = from_pretrained(args.model)
    if model.num_labels != spec.num_labels:
        raise FisherJaxError(f"model has {model.num_labels} output(s) but task {spec.name} needs {spec.num_labels}")
    return model, spec, label_order(getattr(model.config, "id2label", None), spec)


def run_fisher(args: argparse.Namespace) -> int:
    from .fisher import full_fisher, mask_fisher
    from .io import save_stats

    model, spec, order = _load(args)
    if args.reference:
        if args.kind != "mask":
            raise FisherJaxError("--reference reproduces the released mask-Fisher code; it has no full Fisher")
        estimator, num, args.batch_size, args.seed = "batch", args.num_examples or 128, 32, 0
    else:
        estimator = args.estimator or ("empirical" if args.kind == "mask" else "expected")
        num = args.num_examples or (128 if args.kind == "mask" else 4096)
    batches = _batches(model, args, num, with_replacement=args.reference, order=order)
    kw: dict[str, Any] = dict(estimator=estimator, seed=args.seed, checkpoint_dir=args.checkpoint_dir,
                              total=len(batches), task=spec.name, split=args.split, progress=not args.no_progress)
    if args.kind == "mask":
        stats = mask_fisher(model, batches, chunk_size=args.chunk_size, **kw)
    else:
        stats = full_fisher(model, batches, chunk_size=args.chunk_size or 8, **kw)
    path = save_stats(args.out, stats, task=spec.name, split=args.split)
    print(f"{args.kind} Fisher ({estimator}, {stats.num_examples if hasattr(stats, 'num_examples') else num} "
          f"examples of {spec.name}/{args.split}) -> {path}")
    if args.plot:
        if args.kind != "mask":
            raise FisherJaxError("--plot draws mask Fishers; use --kind mask")
        from .plots import plot_mask_fisher

        print(f"plot -> {plot_mask_fisher(stats, args.plot, title=f'{spec.name}: mask Fisher ({estimator})')}")
    return 0


def run_gram(args: argparse.Namespace) -> int:
    from .gram import gram_stats
    from .io import save_stats

    model, spec, _ = _load(args)  # Grams read inputs only: the label order does not matter
    batches = _batches(model, args, args.num_examples, with_replacement=False)
    grams = gram_stats(model, batches, mask_padding=not args.include_padding, checkpoint_dir=args.checkpoint_dir,
                       total=len(batches), task=spec.name, split=args.split, progress=not args.no_progress)
    path = save_stats(args.out, grams, task=spec.name, split=args.split)
    print(f"Grams of {len(set(map(id, grams.values())))} Dense inputs ({grams.num_tokens} tokens) -> {path}")
    return 0

