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
# Rebuilding changes ui/dist, which makes cargo re-embed it and relink the app: skip it when
# nothing the UI is built from is newer than the last build.
if [ -f dist/index.html ] && [ -z "$(find src index.html package-lock.json vite.config.ts \
    svelte.config.js tsconfig.json -newer dist/index.html -print -quit)" ]; then
  exit 0
fi
npm run build >&2
