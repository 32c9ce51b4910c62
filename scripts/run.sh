#!/usr/bin/env bash
# Runs the app on a fresh machine: fetches the SmolLM2 and MiniLM test models, builds the CLI in
# release mode, initialises the library in $RAMOLE_HOME (default ~/.local/share/ramole) with them
# when it is not set up yet, and answers a chat message with retrieved adapters. Extra arguments
# go to `ramole chat` (default: a short greeting).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-pip; }
models="$(scripts/fetch-test-models.sh)"
model="$(sed -n 's/^smollm2_gguf=//p' <<<"$models")"
embedder="$(sed -n 's/^minilm_dir=//p' <<<"$models")"
cargo build --release --locked -p ramole-cli >&2
ramole=target/release/ramole
home="${RAMOLE_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/ramole}"
if [ ! -f "$home/settings.json" ]; then
  "$ramole" init --base "$model" --embedder "$embedder" >&2
fi
if [ $# -eq 0 ]; then set -- --text "Say hello and introduce yourself."; fi
exec "$ramole" chat "$@"
