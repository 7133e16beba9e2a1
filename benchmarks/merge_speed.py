"""How long each merge takes on CPU for 2, 5 and 8 bert-base-sized bodies, and how accurate
RegMean's float32 device solve is against its default float64 host solve.

    python benchmarks/merge_speed.py            # bert-base: 12 layers, hidden 768, 12 heads, FFN 3072, vocab 30522
    python benchmarks/merge_speed.py --quick    # a small model, 2 and 3 bodies (seconds)

Bodies are random float32 trees with BERT names (fine-tunes = base + small task vectors); full
Fishers are random non-negative trees, mask Fishers random ``[L, H]``/``[L, I]``; RegMean Grams
are random SPD matrices with a spread of feature scales (activation Grams are ill-conditioned).
To keep eight models' Grams from taking 4 GB, each model draws one Gram per input width and every
Dense layer gets its own *view* of it: RegMean solves each layer separately (query/key/value share
one Gram, as ``gram_stats`` produces), so the work is that of real statistics.

Each method runs twice per model count: the first call includes jit compilation (one compile per
distinct leaf shape), the second is the steady-state time; ``compile`` is their difference. One
timed repeat only: a bert-base merge of eight bodies is tens of seconds for some methods. Wall
and process-CPU seconds are both recorded (on a shared machine wall time includes waiting).
The ``regmean`` row times the default (float64 host solve); at the smallest and largest count
(``--f64-counts``) the ``dtype="float32"`` device solve is timed too and compared with it.
Results: a markdown table on stdout and ``benchmarks/results/merge_speed.json``
(rewritten after every row; ``--append`` re-measures some rows of an existing file).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from fisher_jax.merging import MaskFisher, dare, fisher, fisher_nodes, regmean, simple, task_arithmetic, ties
from fisher_jax.tree import flatten, num_params, unflatten

FULL = dict(layers=12, hidden=768, heads=12, ffn=3072, vocab=30522, positions=512, counts=(2, 5, 8))
QUICK = dict(layers=2, hidden=256, heads=4, ffn=1024, vocab=4000, positions=128, counts=(2, 3))
METHOD_NAMES = ("simple", "task_arithmetic", "ties", "dare", "fisher", "fisher_nodes", "regmean")


def body_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    d, i = c["hidden"], c["ffn"]
    s: dict[str, tuple[int, ...]] = {
        "embeddings/word_embeddings/embedding": (c["vocab"], d),
        "embeddings/position_embeddings/embedding": (c["positions"], d),
        "embeddings/token_type_embeddings/embedding": (2, d),
        "embeddings/LayerNorm/scale": (d,),
        "embeddings/LayerNorm/bias": (d,),
    }
    for l in range(c["layers"]):
        p = f"encoder/layer/{l}"
        for m in ("attention/self/query", "attention/self/key", "attention/self/value", "attention/output/dense"):
            s[f"{p}/{m}/kernel"], s[f"{p}/{m}/bias"] = (d, d), (d,)
        s[f"{p}/attention/output/LayerNorm/scale"] = s[f"{p}/attention/output/LayerNorm/bias"] = (d,)
        s[f"{p}/intermediate/dense/kernel"], s[f"{p}/intermediate/dense/bias"] = (d, i), (i,)
        s[f"{p}/output/dense/kernel"], s[f"{p}/output/dense/bias"] = (i, d), (d,)
        s[f"{p}/output/LayerNorm/scale"] = s[f"{p}/output/LayerNorm/bias"] = (d,)
    s["pooler/dense/kernel"], s["pooler/dense/bias"] = (d, d), (d,)
    return s


def random_tree(shapes: dict, rng: np.random.Generator, scale: float, around: dict | None = None) -> dict:
    out = {}
    for k, shape in shapes.items():
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= scale
        if around is not None:
            x += around[k]
        out[k] = x
    return unflatten(out)


def random_fisher(shapes: dict, rng: np.random.Generator) -> dict:
    out = {}
    for k, shape in shapes.items():
        x = rng.random(shape, dtype=np.float32)
        out[k] = x * x * x * x * 1e-4  # heavy-tailed, non-negative
    return unflatten(out)


def random_gram(n: int, rng: np.random.Generator) -> np.ndarray:
    """SPD ``X^T X / k`` with per-feature scales spread over two decades (outlier dimensions)."""
    k = n  # square X: the smallest eigenvalues approach 0 (Marchenko-Pastur at ratio 1)
    x = rng.standard_normal((k, n), dtype=np.float32) * np.exp(rng.uniform(np.log(0.1), np.log(10.0), n)).astype(np.float32)
    g = x.T @ x / k
    g += 1e-4 * float(np.mean(np.diag(g))) * np.eye(n, dtype=np.float32)
    return g.astype(np.float32)


def gram_set(c: dict, g_hidden: np.ndarray, g_ffn: np.ndarray) -> dict:
    grams = {}
    for l in range(c["layers"]):
        p = f"encoder/layer/{l}"
        qkv = g_hidden.view()  # one object shared by query/key/value: solved together
        grams.update({f"{p}/attention/self/{m}": qkv for m in ("query", "key", "value")})
        grams[f"{p}/attention/output/dense"] = g_hidden.view()
        grams[f"{p}/intermediate/dense"] = g_hidden.view()
        grams[f"{p}/output/dense"] = g_ffn.view()
    grams["pooler/dense"] = g_hidden.view()
    return grams


def timed(fn: Callable[[], Any], cpu: list | None = None) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` (to completion); its process CPU seconds are appended to ``cpu``."""
    c, t = time.process_time(), time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    wall = time.perf_counter() - t
    if cpu is not None:
        cpu.append(time.process_time() - c)
    return wall, out


def max_rel_diff(a: dict, b: dict) -> float:
    """max over Dense kernels of max|a - b| / max|b|."""
    fa, fb = flatten(a), flatten(b)
    worst = 0.0
    for k in fa:
        if k.endswith("/kernel"):
            x, y = np.asarray(fa[k], np.float64), np.asarray(fb[k], np.float64)
            worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)))
    return worst


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, 2 and 3 bodies")
    ap.add_argument("--counts", type=int, nargs="+", help="model counts (default 2 5 8; quick: 2 3)")
    ap.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=METHOD_NAMES)
    ap.add_argument("--f64-counts", type=int, nargs="*",
                    help="model counts for the float64 RegMean accuracy check (default: smallest and largest; "
                         "none: skip). Each costs about twice the float32 merge")
    ap.add_argument("--append", action="store_true",
                    help="keep the other rows of an existing --out file (same model size); re-measured rows replace old ones")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "merge_speed.json"))
    args = ap.parse_args(argv)
    c = dict(QUICK if args.quick else FULL)
    counts = tuple(args.counts or c["counts"])
    nmax = max(counts)
    shapes = body_shapes(c)
    rng = np.random.default_rng(0)

    t0 = time.perf_counter()
    base = random_tree(shapes, rng, 0.02)
    bflat = flatten(base)
    bodies = [random_tree(shapes, rng, 0.002, around=bflat) for _ in range(nmax)]
    mfs = [
        MaskFisher(rng.random((c["layers"], c["heads"])) ** 4, rng.random((c["layers"], c["ffn"])) ** 4, 0, {})
        for _ in range(nmax)
    ]
    grams = None
    cond = {}
    if "regmean" in args.methods:
        gh = [random_gram(c["hidden"], rng) for _ in range(nmax)]
        gf = [random_gram(c["ffn"], rng) for _ in range(nmax)]
        grams = [gram_set(c, gh[j], gf[j]) for j in range(nmax)]
        for name, g in (("hidden", gh[0]), ("ffn", gf[0])):
            ev = np.linalg.eigvalsh(np.asarray(g, np.float64))
            cond[name] = float(ev[-1] / ev[0])
    setup_s = time.perf_counter() - t0
    params = num_params(base)
    print(f"# merge_speed: {params / 1e6:.1f}M parameters per body, counts {counts}, setup {setup_s:.0f}s, "
          f"{os.cpu_count()} CPU(s), jax {jax.__version__} on {jax.devices()[0].platform}", flush=True)

    runners: dict[str, Callable[[int], Any]] = {
        "simple": lambda n: simple(bodies[:n]),
        "task_arithmetic": lambda n: task_arithmetic(bodies[:n], base, lam=1.0 / n),
        "ties": lambda n: ties(bodies[:n], base, density=0.2, lam=1.0),
        "dare": lambda n: dare(bodies[:n], base, drop_rate=0.9, seed=0, lam=1.0 / n),
        "fisher": lambda n: fisher(bodies[:n], fishers[:n]),
        "fisher_nodes": lambda n: fisher_nodes(bodies[:n], mfs[:n], mapping="reference"),
        "regmean": lambda n: regmean(bodies[:n], grams[:n]),
    }
    f64_counts = set(args.f64_counts if args.f64_counts is not None else (min(counts), max(counts)))
    results: list[dict] = []
    precision: list[dict] = []
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    all_counts = set(counts)
    if args.append and out_path.exists():
        prev = json.loads(out_path.read_text())
        same = {k: v for k, v in prev["config"].items() if k not in ("counts",)} == \
            {k: v for k, v in c.items() if k != "counts"} | {"quick": args.quick}
        if not same:
            raise SystemExit(f"--append: {out_path} was measured with another configuration: {prev['config']}")
        redo = {(m, n) for m in args.methods for n in counts}
        results = [r for r in prev["timing"] if (r["method"], r["n"]) not in redo]
        precision = [p for p in prev["regmean_precision"] if not ("regmean" in args.methods and p["n"] in f64_counts)]
        cond = cond or prev.get("gram_condition_numbers", {})
        all_counts |= set(prev["config"]["counts"])

    def write_report() -> dict:
        # Rewritten after every measurement: a run cut short (e.g. killed for memory) keeps its rows.
        report = {
            "config": {k: v for k, v in c.items() if k != "counts"} | {"counts": sorted(all_counts), "quick": args.quick},
            "params_per_body": params,
            "setup_s": setup_s,
            "machine": {"cpus": os.cpu_count(), "loadavg_at_write": list(os.getloadavg()), "platform": platform.platform(),
                        "jax": jax.__version__, "backend": jax.devices()[0].platform},
            "timing": sorted(results, key=lambda r: (METHOD_NAMES.index(r["method"]), r["n"])),
            "regmean_precision": sorted(precision, key=lambda p: p["n"]),
            "gram_condition_numbers": cond,
        }
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        return report

    for method in args.methods:
        if method == "fisher":
            # Full Fishers are as big as the bodies (3.5 GB for eight bert-base): only while needed.
            fishers = [random_fisher(shapes, np.random.default_rng(100 + j)) for j in range(nmax)]
        for n in counts:
            cpu: list[float] = []
            first, out = timed(lambda: runners[method](n), cpu)
            del out
            steady, out = timed(lambda: runners[method](n), cpu)
            row = {"method": method, "n": n, "first_s": first, "steady_s": steady, "compile_s": max(first - steady, 0.0),
                   "first_cpu_s": cpu[0], "steady_cpu_s": cpu[1], "loadavg_1min": os.getloadavg()[0]}
            if method == "regmean" and n in f64_counts:
                timed(lambda: regmean(bodies[:n], grams[:n], dtype="float32"))  # compile
                f32_s, f32 = timed(lambda: regmean(bodies[:n], grams[:n], dtype="float32"))
                prec = {"n": n, "max_rel_diff": max_rel_diff(f32, out), "float64_s": steady, "float32_s": f32_s}
                precision.append(prec)
                del f32
                print(f"  regmean n={n}: float32 vs float64 max relative difference {prec['max_rel_diff']:.2e} "
                      f"(float32 device solve {f32_s:.1f}s)", flush=True)
            del out
            gc.collect()
            results.append(row)
            write_report()
            print(f"  {method:16s} n={n}: steady {steady:7.2f}s (cpu {cpu[1]:6.2f}s)  first call {first:7.2f}s  "
                  f"load {row['loadavg_1min']:.1f}", flush=True)
        if method == "fisher":
            del fishers
            gc.collect()

    report = write_report()
    shown = sorted(all_counts)
    print()
    print("| method | " + " | ".join(f"{n} bodies: wall s / CPU s (compile s)" for n in shown) + " |")
    print("|---|" + "---|" * len(shown))
    for method in METHOD_NAMES:
        cells = []
        for n in shown:
            r = next((r for r in results if r["method"] == method and r["n"] == n), None)
            cells.append("—" if r is None else f"{r['steady_s']:.2f} / {r['steady_cpu_s']:.2f} ({r['compile_s']:.2f})")
        if any(c != "—" for c in cells):
            print(f"| {method} | " + " | ".join(cells) + " |")
    precision = report["regmean_precision"]
    if precision:
        print()
        print("| RegMean | " + " | ".join(f"{p['n']} bodies" for p in precision) + " |")
        print("|---|" + "---|" * len(precision))
        print("| max rel. diff float32 vs float64 | " + " | ".join(f"{p['max_rel_diff']:.2e}" for p in precision) + " |")
        print("| float32 device solve, s | " + " | ".join(f"{p['float32_s']:.2f}" for p in precision) + " |")
        print("\nGram condition numbers (model 0): " + ", ".join(f"{k} {v:.2e}" for k, v in cond.items()))

    print(f"\nwrote {out_path}")
    return report


if __name__ == "__main__":
    main()
