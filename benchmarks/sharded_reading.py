"""What reading a split costs one process and each of N processes: a whole training pass's batches
(``task_batches``, shuffled, every row), built by one process and by N CPU processes joined with
``jax.distributed`` (gloo over the loopback interface).

    python benchmarks/sharded_reading.py --glue-dir ../shared/glue                  # SST-2 train, 1 and 2 processes
    python benchmarks/sharded_reading.py --glue-dir ../shared/glue --windows 1      # also one all-gather per batch
    python benchmarks/sharded_reading.py --task qqp --processes 1 2 4 --out benchmarks/results/sharded_reading.json

Each process reports: the rows of the split it kept (texts held) and tokenised, the seconds to
plan the pass (counting pass, reading its share, tokenising it, all-gathering lengths and labels:
the ``task_batches`` call) and to build every batch (its slices, each global batch's token rows
all-gathered from their holders), and its peak resident memory. The runs check that every row
lands in exactly one process's slice and that the processes tokenise, together, what one does
(tests/test_multiprocess.py checks the batches themselves against one process's).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

WORKER = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np
    task, glue_dir, batch, n, pid, address, out, window = sys.argv[1:9]
    batch, n, pid = int(batch), int(n), int(pid)
    import fisher_jax.distributed as dist
    if n > 1:
        dist.initialize(address, n, pid)
    from fisher_jax.data import batching
    from fisher_jax.models.hub import load_tokenizer, minilm_path

    kept, tokenised = [], []
    _load, _encode = batching.load_split, batching.encode
    def load_split(*a, **k):
        got = _load(*a, **k)
        kept.append(len(got))
        return got
    def encode(tok, examples, max_length=128):
        tokenised.append(len(examples))
        return _encode(tok, examples, max_length)
    batching.load_split, batching.encode = load_split, encode
    if window:
        batching.EXCHANGE_WINDOW = int(window)

    tok = load_tokenizer(minilm_path())
    dist.barrier("start") if n > 1 else None
    t0 = time.perf_counter()
    it = batching.task_batches(task, "train", tok, batch, glue_dir=glue_dir, shuffle=True, seed=0)
    t1 = time.perf_counter()
    rows = 0
    for b in it:
        rows += int(b["weights"].sum())
    t2 = time.perf_counter()
    json.dump({"process": pid, "processes": n, "window": batching.EXCHANGE_WINDOW, "split_rows": len(it.encoded), "batches": len(it),
               "rows_kept": max(kept), "reads": len(kept), "rows_tokenised": sum(tokenised),
               "rows_in_slices": rows, "plan_s": t1 - t0, "build_s": t2 - t1,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, open(out, "w"))
""")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(task: str, glue_dir: str, batch: int, n: int, tmp: Path, window: str = "") -> list[dict]:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
    address = f"127.0.0.1:{_port()}"
    outs = [tmp / f"{n}.{p}.{window}.json" for p in range(n)]
    procs = [subprocess.Popen([sys.executable, str(script), task, glue_dir, str(batch), str(n), str(p), address,
                               str(outs[p]), window], env=env) for p in range(n)]
    for proc in procs:
        if proc.wait(timeout=1800) != 0:
            raise SystemExit(f"a process of the {n}-process run failed (exit {proc.returncode})")
    return [json.loads(o.read_text()) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", ""))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--windows", type=int, nargs="+", default=[],
                    help="also run the multi-process cases with these EXCHANGE_WINDOW values (1: a collective per batch)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.processes:
            results.extend(run(args.task, args.glue_dir, args.batch_size, n, Path(tmp)))
            if n > 1:
                for w in args.windows:
                    results.extend(run(args.task, args.glue_dir, args.batch_size, n, Path(tmp), str(w)))
    one = [r for r in results if r["processes"] == 1]
    print(f"{args.task} train, batch {args.batch_size}, {results[0]['split_rows']} rows, "
          f"{results[0]['batches']} batches")
    print("| processes | process | window (batches) | rows kept | rows tokenised | plan (s) | build batches (s) | "
          "peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        window = r["window"] if r["processes"] > 1 else ""
        print(f"| {r['processes']} | {r['process']} | {window} | {r['rows_kept']} | {r['rows_tokenised']} | "
              f"{r['plan_s']:.2f} | {r['build_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    for n, w in sorted({(r["processes"], r["window"]) for r in results if r["processes"] > 1}):
        group = [r for r in results if r["processes"] == n and r["window"] == w]
        total = sum(r["rows_in_slices"] for r in group)
        assert total == group[0]["split_rows"], (n, total)  # every row in exactly one process's slice
        if one:
            assert sum(r["rows_tokenised"] for r in group) == one[0]["rows_tokenised"]
    if args.out:
        Path(args.out).write_text(json.dumps({"task": args.task, "batch_size": args.batch_size,
                                              "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
