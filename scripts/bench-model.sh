#!/usr/bin/env bash
# Prefill/decode tokens/s of SmolLM2-135M Q4_1, 2 threads, batch 1: ramole (as stored and with
# Q4_1 re-quantized to Q8_0) and, if LLAMA_VENV points at a venv with llama-cpp-python, llama.cpp
# on the same file, one after another in one run. Usage: [LLAMA_VENV=dir] scripts/bench-model.sh
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-$(scripts/fetch-test-models.sh | sed -n 's/^smollm2_gguf=//p')}"
threads="${THREADS:-2}"
cargo build --release --locked -p ramole-cli >&2
RAYON_NUM_THREADS=$threads target/release/ramole bench model --base "$model" --prompt-tokens 256 --decode-tokens 64 --repeats 3
if [ -n "${LLAMA_VENV:-}" ]; then
  "$LLAMA_VENV/bin/python" scripts/bench-llamacpp.py "$model" "$threads" 256 64 3
fi
