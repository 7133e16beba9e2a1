#!/usr/bin/env bash
# A user's own task end to end through the command line: a CSV data set made here (not a GLUE
# name), MiniLM fine-tuned on it, its mask Fisher, a merge with the zoo's SST-2 model, and both
# tasks evaluated on the merged body. Prints the commands it runs; figures go to RESULTS.
#   benchmarks/own_task.sh [WORK_DIR]   (needs GLUE_DIR for the source sentences and the zoo's seed 0)
set -euo pipefail
WORK=${1:-$HOME/.cache/fisher_jax/own_task}
GLUE=${GLUE_DIR:?set GLUE_DIR to the local GLUE folder}
ZOO=${ZOO:-$HOME/.cache/fisher_jax/zoo/minilm/seed0}
PY=${PYTHON:-python}
mkdir -p "$WORK/data"
cd "$WORK"
# The data set: is a sentence from a news wire (MRPC) or a linguistics textbook example (CoLA)?
"$PY" - "$GLUE" <<'PYEOF'
import csv, random, sys
glue = sys.argv[1]
def rows(path, col, header=True):
    with open(path, newline="", encoding="utf-8") as f:
        r = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [x[col] for x in (r[1:] if header else r) if len(x) > col]
news = rows(f"{glue}/MRPC/train.tsv", 3) + rows(f"{glue}/MRPC/train.tsv", 4)
book = rows(f"{glue}/CoLA/train.tsv", 3, header=False)
rng = random.Random(0)
rng.shuffle(news); rng.shuffle(book)
data = [(s, "news") for s in news[:1200]] + [(s, "textbook") for s in book[:1200]]
rng.shuffle(data)
for name, part in (("train", data[:2000]), ("dev", data[2000:])):
    with open(f"data/{name}.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f); w.writerow(["sentence", "source"]); w.writerows(part)
PYEOF
cat > source.yaml <<'YAML'
name: source
train: data/train.csv
dev: data/dev.csv
text: sentence
label: source
labels: [news, textbook]
metrics: [accuracy, f1]
max_length: 64
YAML
run() { echo "+ $*"; /usr/bin/time -f "  (%e s)" "$@"; }
BASE=$("$PY" -c "from fisher_jax.models.hub import minilm_path; print(minilm_path())")
[ -f out/source/zoo_done.json ] || [ -f out/source/config.json ] || \
  run fisher-jax finetune --task source.yaml --model "$BASE" --out-dir out/source --max-train-examples 1500 --epochs 1 --lr 1e-4 --buckets 32 64 --no-progress
run fisher-jax evaluate --model out/source --task source.yaml --out eval_source.json
run fisher-jax fisher --model out/source --task source.yaml --num-examples 128 --out source_mask.safetensors --no-progress
run fisher-jax fisher --model "$ZOO/sst2" --task sst2 --glue-dir "$GLUE" --num-examples 128 --out sst2_mask.safetensors --no-progress
run fisher-jax merge --method fisher_nodes --normalize layer --models out/source "$ZOO/sst2" \
    --stats source_mask.safetensors sst2_mask.safetensors --out-dir merged --no-progress
ls merged
for d in merged/*/; do
  case "$d" in *source*) t=source.yaml;; *) t=sst2;; esac
  run fisher-jax evaluate --model "$d" --task "$t" --glue-dir "$GLUE" --max-examples 400 --out "eval_merged_$(basename "$d").json"
done
run fisher-jax evaluate --model "$ZOO/sst2" --task sst2 --glue-dir "$GLUE" --max-examples 400 --out eval_sst2.json
"$PY" - <<'PYEOF'
import glob, json
for f in sorted(glob.glob("eval_*.json")):
    d = json.load(open(f)); m = d.get("metrics", d)
    print(f, {k: round(v, 4) for k, v in m.items() if isinstance(v, float)})
PYEOF
