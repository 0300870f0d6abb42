#!/usr/bin/env bash
# Install the Debian packages MuJoCo offscreen rendering and opencv need, if they are missing.
set -u
pkgs="libegl1 libegl-mesa0 libgl1-mesa-dri libosmesa6 libgl1 libglib2.0-0 ffmpeg"
missing=""
for p in $pkgs; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_sysdeps: not a Debian system; please install:$missing" >&2; exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
echo "install_sysdeps: installing$missing"
$SUDO apt-get update -qq >/dev/null 2>&1 || true
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null \
  || echo "install_sysdeps: could not install$missing (MuJoCo rendering tests will be skipped)" >&2
