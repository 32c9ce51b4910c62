#!/usr/bin/env bash
# Rewrites ui/src/lib/api/generated.ts, the UI's TypeScript generated from the Rust types that
# cross into it (src-tauri/src/bindings.rs). `cargo test` fails while the committed file is
# stale; run this after changing a DTO, an error code or a word of the vocabulary, and commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
# The desktop crate embeds the built UI: it must exist for the crate to compile.
[ -f ui/dist/index.html ] || scripts/build-ui.sh
RAMOLE_BLESS=1 cargo test -p ramole-desktop --lib --locked bindings:: >&2
git --no-pager diff --stat -- ui/src/lib/api/generated.ts >&2 || true
