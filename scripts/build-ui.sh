#!/usr/bin/env bash
# Builds the web UI into ui/dist (the app embeds it at compile time). `--check` also type-checks
# and runs the UI's unit tests (Vitest) first.
set -euo pipefail
cd "$(dirname "$0")/../ui"
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund >&2
fi
if [ "${1:-}" = "--check" ]; then
  npm run check >&2
  npm test >&2
fi
npm run build >&2
