#!/usr/bin/env bash
# Issue 6's GPU figures in one call on a lent GPU machine (the device tool's `run`), within its
# 15-minute budget:
#
#   bash benchmarks/gpu_check.sh prepare        # here, once: .gpu/ = MiniLM in float16 (45 MB)
#   run(command="bash benchmarks/gpu_check.sh run", carry=[".gpu"], timeout_s=590)   # there
#
# Why float16: the MiniLM weights are 91 MB in float32 and a carried tree may hold 64 MiB; the
# copy is cast back to float32 there, so both frameworks load the same (rounded) weights and the
# Fisher-agreement checks still compare like with like. The GPU machine cannot install anything:
# `run` uses its python3 (JAX with CUDA, PyTorch, flax, optax, transformers) with this checkout
# on PYTHONPATH. Every result file and the whole log land in $OUT (fetched back by the tool);
# each benchmark has its own time limit, so a slow one cannot eat the others' share. It runs
# benchmarks/jax_vs_torch.py (MiniLM and bert-base in float32, bert-base in TF32), not
# fisher_speed.py: a 15-minute lease cannot compile both.
#
#   bash benchmarks/gpu_check.sh run --quick    # a CPU dry run of the same steps (tiny sizes)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# cast_folder PYTHON SRC DST FROM TO: copy a model folder's files, its float FROM weights as TO.
cast_folder() {
    "$1" - "$2" "$3" "$4" "$5" <<'EOF'
import shutil, sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

src, dst, old, new = Path(sys.argv[1]), Path(sys.argv[2]), np.dtype(sys.argv[3]), np.dtype(sys.argv[4])
dst.mkdir(parents=True, exist_ok=True)
weights = load_file(str(src / "model.safetensors"))
save_file({k: v.astype(new) if v.dtype == old else v for k, v in weights.items()},
          str(dst / "model.safetensors"), metadata={"format": "pt"})
for f in src.iterdir():  # config, tokenizer, card (folders such as 1_Pooling are not needed)
    if f.is_file() and f.name != "model.safetensors":
        shutil.copyfile(f, dst / f.name)
print(f"wrote {dst}: {sum(f.stat().st_size for f in dst.iterdir()) / 2**20:.0f} MiB, weights {new}")
EOF
}

prepare() {
    local py=${PYTHON:-.venv/bin/python}
    cast_folder "$py" "$("$py" -c 'from fisher_jax.models.hub import minilm_path; print(minilm_path())')" \
        .gpu/minilm16 float32 float16 && echo "carry '.gpu' in the device run"
}

run() {
    # Most important first; worst case 150 + 200 + 200 s. Compiling dominates: on the H100
    # (2026-11-23, results/h100/jax_vs_torch_*.json) JAX's three steps compiled in 81 s for
    # MiniLM and 116 s for bert-base, against ~30 s of timed work for both frameworks.
    local quick=() device=cuda rounds=3 batches=8 limits=(150 200 200)
    if [[ "${1:-}" == "--quick" ]]; then
        quick=(--quick); device=cpu; rounds=1; batches=1; limits=(300 300 300)
    fi
    OUT=${OUT:-/tmp/gpu_check}
    mkdir -p "$OUT"
    local log="$OUT/gpu_check.log" minilm=/tmp/gpu_check_minilm
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    [[ -f .gpu/minilm16/model.safetensors ]] || { echo "no .gpu/minilm16: run 'bash benchmarks/gpu_check.sh prepare' here and carry '.gpu'" | tee "$log"; return 2; }
    {
        date -u +"start %Y-%m-%dT%H:%M:%SZ"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
        $PY -c "import jax, torch, flax, transformers; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available(), '| flax', flax.__version__, '| transformers', transformers.__version__)"
    } 2>&1 | tee "$log"
    cast_folder "$PY" .gpu/minilm16 "$minilm" float16 float32 2>&1 | tee -a "$log"
    local status=0
    step() {  # step NAME LIMIT_S COMMAND...: one benchmark, logged, within its own time limit
        local name=$1 secs=$2; shift 2
        echo "== $name ($(date -u +%H:%M:%S), limit ${secs}s): $*" | tee -a "$log"
        timeout "$secs" "$@" 2>&1 | grep -v -e "it/s]" -e "MISSING" | tee -a "$log"
        local rc=${PIPESTATUS[0]}
        echo "== $name: exit $rc" | tee -a "$log"
        [[ $rc == 0 ]] || status=1
    }
    local same=(--device "$device" --num-batches "$batches" --full-examples 16 --rounds "$rounds" "${quick[@]}")
    step jax_vs_torch_minilm "${limits[0]}" $PY benchmarks/jax_vs_torch.py --minilm "$minilm" "${same[@]}" \
        --out "$OUT/jax_vs_torch_minilm.json"
    step jax_vs_torch_bert_base "${limits[1]}" $PY benchmarks/jax_vs_torch.py --bert-base "${same[@]}" \
        --out "$OUT/jax_vs_torch_bert_base.json"
    if [[ $device == cuda ]]; then  # TF32 matmuls in both frameworks: JAX's default on this GPU
        step jax_vs_torch_bert_base_tf32 "${limits[2]}" $PY benchmarks/jax_vs_torch.py --bert-base "${same[@]}" \
            --precision tf32 --out "$OUT/jax_vs_torch_bert_base_tf32.json"
    fi
    date -u +"end %Y-%m-%dT%H:%M:%SZ" | tee -a "$log"
    return $status
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash benchmarks/gpu_check.sh prepare | run [--quick]" >&2; exit 2 ;;
esac
