#!/usr/bin/env bash
# Runs the app on a fresh machine: fetches the SmolLM2 test model, builds the CLI in release mode
# and starts a chat reply. Extra arguments go to `ramole generate` (default: a short greeting).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-pip; }
model="$(scripts/fetch-test-models.sh | sed -n 's/^smollm2_gguf=//p')"
cargo build --release --locked -p ramole-cli >&2
if [ $# -eq 0 ]; then set -- --prompt "Say hello and introduce yourself."; fi
exec target/release/ramole generate --base "$model" --chat "$@"
