#!/usr/bin/env bash
# Installs the Debian packages the desktop app builds against (Tauri v2 on WebKitGTK 4.1) and
# its GUI tests need (Xvfb, WebKitWebDriver, ImageMagick's import), plus Python and a C
# compiler for the rest; only what is missing, so a warm machine skips apt entirely.
set -euo pipefail
packages=(
  libwebkit2gtk-4.1-dev libgtk-3-dev libsoup-3.0-dev libjavascriptcoregtk-4.1-dev
  librsvg2-dev libayatana-appindicator3-dev libxdo-dev libdbus-1-dev pkg-config
  xvfb xauth webkit2gtk-driver imagemagick
  python3 python3-pip build-essential
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
command -v npm >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
fi
