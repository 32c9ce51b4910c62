#!/usr/bin/env bash
# Runs every check and test on a fresh machine of this kind: installs what it needs (Debian
# packages for the desktop app and its GUI tests, the UI's npm packages, rustfmt/clippy), fetches
# the test models, builds and tests the UI (svelte-check, Vitest), then fmt, clippy and every
# cargo test — the GUI test drives the real app under Xvfb (screenshots in target/gui-shots/),
# and a test checks that the UI's generated TypeScript matches the Rust types.
set -euo pipefail
cd "$(dirname "$0")/.."
# One clean build: incremental data would only be written, never read.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

scripts/system-deps.sh
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy

scripts/fetch-test-models.sh
scripts/build-ui.sh --check

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# `--tests`: every library's unit tests and every crate's integration-test binary; examples are
# type-checked by clippy above instead of linked here.
cargo test --workspace --locked --tests
