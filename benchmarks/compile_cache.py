"""How long a one-off ``fisher-jax fisher`` makes a user wait, and what JAX's persistent compilation
cache (on by default in every command) saves a second process.

    python benchmarks/compile_cache.py                       # the issue's case: --reference on 128 SST-2 rows
    python benchmarks/compile_cache.py --model DIR --glue-dir /work/shared/glue --repeats 3
    python benchmarks/compile_cache.py --no-torch            # JAX only

Every run is a fresh process (what a user waits for, imports included), against one fresh
temporary cache root (``FISHER_JAX_CACHE``), in this order:

1. ``fisher-jax fisher --reference ...``: the first process, which compiles and fills the cache;
2. the same command again: a second process, which loads the compiled steps from the cache;
3. the same command with ``FISHER_JAX_COMPILATION_CACHE=0``: no persistent cache;
4. the PyTorch reference (:func:`fisher_jax.reference.torch.mask_fisher`, the released code's
   ``batch`` estimator) on the batches ``--reference`` builds, in a fresh process.

JAX's compile log (``JAX_LOG_COMPILES=1``) gives each JAX run's compilation: the programs
compiled, the seconds in XLA compilation and in tracing + lowering, and the persistent-cache hits.
The command does not report the time inside its compiled steps; the PyTorch run reports its
gradient loop (the ``mask_fisher`` call). ``--repeats N`` runs steps 2-4 N times and reports
each (step 1 happens once: only the first process of a cache is a first process).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
ZOO_SST2 = Path("~/.cache/fisher_jax/zoo/minilm/seed0/sst2").expanduser()

# The PyTorch reference in its own process: the batches `fisher-jax fisher --reference` builds
# (128 rows drawn with replacement, seed 0, batch 32), then the released code's estimator.
TORCH_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
model_dir, task, glue_dir, num, batch = sys.argv[1], sys.argv[2], sys.argv[3] or None, int(sys.argv[4]), int(sys.argv[5])
from fisher_jax.data import batching
from fisher_jax.models.hub import load_tokenizer
from fisher_jax.reference import require_torch

rt = require_torch()
model = rt.load_model(model_dir)
batches = list(batching.sample_task_batches(task, "train", load_tokenizer(model_dir), num, batch,
                                            max_length=batching.default_max_length(task), glue_dir=glue_dir, seed=0))
t1 = time.perf_counter()
rt.mask_fisher(model, batches, estimator="batch")
t2 = time.perf_counter()
print(json.dumps({"gradient_loop_s": t2 - t1, "in_process_s": t2 - t0}))
"""

_COMPILE = re.compile(r"Finished XLA compilation of .* in ([0-9.eE+-]+) sec")
_TRACE = re.compile(r"Finished (?:tracing|jaxpr to MLIR module conversion) .* in ([0-9.eE+-]+) sec")
_HIT = re.compile(r"Persistent compilation cache hit")


def compile_log(stderr: str) -> dict:
    """Sums over JAX's compile log: programs compiled, XLA seconds, trace+lower seconds, cache hits."""
    xla = [float(m) for m in _COMPILE.findall(stderr)]
    return {"programs": len(xla), "xla_compile_s": sum(xla),
            "trace_lower_s": sum(float(m) for m in _TRACE.findall(stderr)), "cache_hits": len(_HIT.findall(stderr))}


def run(argv: list[str], env: dict, log_compiles: bool = True) -> dict:
    """Wall seconds of one fresh process running ``argv`` (must exit 0), its stdout and compile log."""
    env = {**env, **({"JAX_LOG_COMPILES": "1"} if log_compiles else {})}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "stdout": proc.stdout, **(compile_log(proc.stderr) if log_compiles else {})}


def table(rows: list[dict]) -> str:
    """The measurements as a markdown table, one row per run."""
    def cell(r: dict, key: str) -> str:
        v = r.get(key)
        return "" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    out = ["| run | wall (s) | XLA compile (s) | trace + lower (s) | programs (cached) | PyTorch gradient loop (s) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        programs = f"{r['programs']} ({r['cache_hits']})" if "programs" in r else ""
        out.append(f"| {r['run']} | {r['wall_s']:.2f} | {cell(r, 'xla_compile_s')} | {cell(r, 'trace_lower_s')} "
                   f"| {programs} | {cell(r, 'gradient_loop_s')} |")
    return "\n".join(out)


def default_model() -> str:
    """The zoo's SST-2 model when it is built, else the MiniLM package folder (a fresh 2-label head)."""
    if (ZOO_SST2 / "model.safetensors").is_file():
        return str(ZOO_SST2)
    sys.path.insert(0, str(ROOT))
    from fisher_jax.models.hub import minilm_path

    return minilm_path("pass --model DIR")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the zoo's SST-2 model, else MiniLM)")
    ap.add_argument("--task", default="sst2", help="GLUE task (default: sst2)")
    ap.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR") or None, help="local GLUE folder (default: $GLUE_DIR)")
    ap.add_argument("--repeats", type=int, default=1, help="times to run the warm, cache-off and PyTorch runs")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    ap.add_argument("--out", default=None, metavar="FILE.json", help="also write the measurements here")
    args = ap.parse_args(argv)

    model = args.model or default_model()
    root = Path(tempfile.mkdtemp(prefix="fisher_jax_compile_cache_"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
           and not k.startswith("FISHER_JAX_")}
    env.update(FISHER_JAX_CACHE=str(root / "cache"), PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    cli = [sys.executable, "-m", "fisher_jax.cli", "fisher", "--model", model, "--task", args.task, "--reference",
           "--out", str(root / "mask.safetensors"), "--no-progress"] + (["--glue-dir", args.glue_dir] if args.glue_dir else [])
    rows: list[dict] = []
    try:
        rows.append({"run": "first process (empty cache)", **run(cli, env)})
        for _ in range(args.repeats):
            rows.append({"run": "second process (warm cache)", **run(cli, env)})
            rows.append({"run": "FISHER_JAX_COMPILATION_CACHE=0", **run(cli, {**env, "FISHER_JAX_COMPILATION_CACHE": "0"})})
            if not args.no_torch:
                got = run([sys.executable, "-c", TORCH_SCRIPT, model, args.task, args.glue_dir or "", "128", "32"], env,
                          log_compiles=False)
                rows.append({"run": "PyTorch reference (batch estimator)", "wall_s": got["wall_s"],
                             **json.loads(got["stdout"].strip().splitlines()[-1])})
        cache_files = sum(1 for p in (root / "cache").rglob("*") if p.is_file() and "jax_compilation_cache" in str(p))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"model: {model} | task: {args.task} | --reference: 128 training rows, batch 32 | "
          f"{cache_files} persistent-cache entries written")
    print(table(rows))
    print("(programs: XLA programs the run built, 'cached' of them loaded from the persistent cache; "
          "the command does not report the time inside its compiled steps)")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": model, "task": args.task, "rows": [
            {k: v for k, v in r.items() if k != "stdout"} for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
