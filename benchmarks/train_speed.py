"""Training-step throughput: fisher_jax's jitted train step vs a PyTorch (transformers) step.

Same model (the MiniLM-L6 weights with a fresh 2-label head), same batch shapes, same update:
AdamW (lr 5e-5, weight decay 0.01 off biases/LayerNorms), global-norm clipping at 1.0, dropout on.
Warm-up steps (compilation for JAX, allocator warm-up for PyTorch) are excluded; the timed steps
end with a device sync in both frameworks. Each framework uses its default device: JAX's default
backend and, for PyTorch, CUDA when it sees a GPU, else the CPU.

    python benchmarks/train_speed.py [--steps 20] [--shapes 32x128,32x64] [--out FILE]

Prints a markdown table and writes benchmarks/results/train_speed.json (machine, date, versions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _batch(batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    ids = rs.randint(1000, 30000, (batch, length)).astype(np.int32)
    ids[:, 0] = 101
    ids[:, -1] = 102
    return {"input_ids": ids, "attention_mask": np.ones((batch, length), np.int32),
            "token_type_ids": np.zeros((batch, length), np.int32),
            "labels": rs.randint(0, 2, batch).astype(np.int32), "weights": np.ones(batch, np.float32)}


def time_jax(path: str, batch: int, length: int, steps: int, warmup: int) -> dict:
    import jax
    import jax.numpy as jnp

    import fisher_jax as fj
    from fisher_jax import parallel as par
    from fisher_jax.train.finetune import FinetuneConfig, dropout_key, make_optimizer, make_train_step

    model = fj.from_pretrained(path, num_labels=2)
    # No warm-up and a 10k-step decay: about the constant 5e-5 of the PyTorch loop, so both losses fall alike.
    tx, schedule = make_optimizer(FinetuneConfig(task="sst2", learning_rate=5e-5, warmup_ratio=0.0), total_steps=10_000)
    step_fn = make_train_step(model.module, tx, schedule, regression=False, dropout=True)
    mesh = par.local_mesh()  # as finetune(): state replicated, the batch split over the devices
    params = par.replicate(model.params, mesh)
    state = par.replicate({"step": jnp.asarray(0, jnp.int32), "params": params, "opt_state": tx.init(params)}, mesh)
    b = par.shard_batch(par.pad_rows(_batch(batch, length), mesh.size), mesh)
    key = par.replicate(dropout_key(0), mesh)
    t0 = time.perf_counter()
    for _ in range(warmup):
        state, metrics = step_fn(state, b, key)
    jax.block_until_ready(state)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step_fn(state, b, key)
    jax.block_until_ready((state, metrics))
    sec = time.perf_counter() - t0
    return {"seconds_per_step": sec / steps, "examples_per_s": batch * steps / sec, "warmup_s": warm_s,
            "final_loss": float(metrics["loss"])}


def time_torch(path: str, batch: int, length: int, steps: int, warmup: int) -> dict:
    import torch
    from transformers import BertForSequenceClassification

    from fisher_jax.reference import torch as rt

    torch.manual_seed(0)
    device = rt.default_device()
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2).to(device)
    model.train()
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=5e-5, betas=(0.9, 0.999), eps=1e-8)
    b = {k: torch.as_tensor(v).long().to(device) for k, v in _batch(batch, length).items() if k != "weights"}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # CUDA calls return before the work ends

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
                    labels=b["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return out.loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    sec = time.perf_counter() - t0
    return {"seconds_per_step": sec / steps, "examples_per_s": batch * steps / sec, "warmup_s": warm_s,
            "final_loss": float(loss.detach()), "torch_threads": torch.get_num_threads(), "torch_device": device}


def _machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jax

    versions = {"jax": jax.__version__}
    for name in ("flax", "optax", "torch", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "jax_backend": jax.default_backend(), "jax_device": jax.devices()[0].device_kind,
            "jax_devices": len(jax.devices()),
            "load_average_at_start": os.getloadavg(), "versions": versions}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the MiniLM package)")
    ap.add_argument("--shapes", default="32x128,32x64", help="comma-separated BATCHxLENGTH")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--frameworks", default="jax,torch")
    ap.add_argument("--out", default=str(HERE / "results" / "train_speed.json"))
    ap.add_argument("--append", action="store_true", help="keep rows of --out not measured in this run")
    ap.add_argument("--cpu-devices", type=int, default=None,
                    help="JAX CPU devices (default: one per core, as the fisher-jax command; 1 = JAX's default)")
    args = ap.parse_args(argv)
    from fisher_jax.parallel import use_cpu_cores

    use_cpu_cores(args.cpu_devices)  # before JAX computes anything
    from fisher_jax.models.hub import minilm_path

    path = args.model or minilm_path("pass --model DIR")
    machine = _machine()
    out = Path(args.out) if args.out else None
    rows: list[dict] = []
    if args.append and out is not None and out.is_file():  # keep rows measured earlier (own date/load)
        rows = json.loads(out.read_text()).get("results", [])
    for shape in args.shapes.split(","):
        batch, length = (int(x) for x in shape.lower().split("x"))
        for fw in args.frameworks.split(","):
            fn = {"jax": time_jax, "torch": time_torch}[fw]
            load_before = os.getloadavg()[0]
            res = fn(path, batch, length, args.steps, args.warmup)
            res.update(framework=fw, batch=batch, length=length, steps=args.steps, warmup=args.warmup,
                       date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       load_average_1min=[load_before, os.getloadavg()[0]])
            rows = [r for r in rows if (r["framework"], r["batch"], r["length"]) != (fw, batch, length)] + [res]
            print(f"{fw:6s} {batch}x{length}: {res['examples_per_s']:.1f} examples/s "
                  f"({res['seconds_per_step'] * 1000:.0f} ms/step, warm-up {res['warmup_s']:.1f} s)", flush=True)
            if out is not None:  # after every row, so an interrupted run keeps what it measured
                _write(out, machine, rows)
    rows.sort(key=lambda r: (-r["length"], r["batch"], r["framework"] != "jax"))
    print()
    print("| batch x length | framework | examples/s | ms/step | vs PyTorch |")
    print("|---|---|---|---|---|")
    for r in rows:
        ref = [x for x in rows if x["framework"] == "torch" and x["batch"] == r["batch"] and x["length"] == r["length"]]
        ratio = f"{r['examples_per_s'] / ref[0]['examples_per_s']:.2f}x" if ref else "-"
        print(f"| {r['batch']} x {r['length']} | {r['framework']} | {r['examples_per_s']:.1f} | "
              f"{r['seconds_per_step'] * 1000:.0f} | {ratio} |")
    if out is not None:
        _write(out, machine, rows)
        print(f"\nwrote {out}")
    return 0


def _write(out: Path, machine: dict, rows: list[dict]) -> None:
    result = {"benchmark": "train_step_speed", "model": "all-MiniLM-L6-v2 (+2-label head)",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {**machine, "load_average_at_end": os.getloadavg()},
              "update": "AdamW lr 5e-5 wd 0.01 (no decay on bias/LayerNorm), clip 1.0, dropout on",
              "note": "each row carries its own date and 1-minute load average (before, after): the 2-core "
                      "machine is shared, so absolute numbers depend on the load; compare rows of similar load",
              "results": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
