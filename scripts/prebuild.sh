#!/usr/bin/env bash
# Builds the prebuilt addon shipped inside the npm package (run by `prepack`,
# so by `npm pack` and `npm publish`; never committed, and removed again by
# `postpack`, so a checkout never loads a stale prebuild in place of what it
# compiles itself). Output:
#   prebuilds/linux-<arch>/snapstream.napi.glibc.node
# One Node-API binary serves every Node version; node-gyp-build picks it at
# install and at load time when it matches the machine, else the install
# compiles from source with node-gyp.
# package.json's install script: where prebuilds/ exists (the packed package)
# it runs node-gyp-build (keep a prebuild that loads, else compile); where it
# does not (a clone) it runs `node-gyp rebuild`, so `npm ci` always compiles
# the checkout's own sources and never keeps a stale build/Release.
#
# The build runs in a private copy so the developer's build/Release (which
# node-gyp-build prefers) is left alone. The binary is built against the
# running Node's headers (the npm `nodedir` when one is configured), not
# against headers downloaded for some other Node version.
#
# Architectures: SNAPSTREAM_PREBUILD_ARCHS (default "x64 arm64"). The host's is
# built natively; another is cross-built with the Debian cross compiler
# (g++-aarch64-linux-gnu for arm64, g++-x86-64-linux-gnu for x64), and a
# missing cross compiler is an error, so a pack never silently lacks one.
# scripts/check-package.sh loads and runs the arm64 binary under qemu-aarch64
# with Debian's arm64 Node (scripts/arm64-node.sh).
#
# Usage: scripts/prebuild.sh
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if [ "$(uname -s)" != Linux ]; then echo "prebuild: Linux only" >&2; exit 1; fi

work="$(mktemp -d "${TMPDIR:-/tmp}/snapstream-prebuild.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cp -r binding.gyp package.json native "$work"/
ln -s "$root/node_modules" "$work/node_modules"

if [ -z "${npm_config_nodedir:-}" ]; then
  nodedir="$(npm config get nodedir 2>/dev/null || true)"
  if [ -n "$nodedir" ] && [ "$nodedir" != undefined ] && [ -d "$nodedir/include/node" ]; then
    export npm_config_nodedir="$nodedir"
  fi
fi

host="$(node -p process.arch)"
rm -rf prebuilds
for arch in ${SNAPSTREAM_PREBUILD_ARCHS:-x64 arm64}; do
  case "$arch" in
    x64) triplet=x86_64-linux-gnu ;;
    arm64) triplet=aarch64-linux-gnu ;;
    *) echo "prebuild: unsupported architecture $arch (x64, arm64)" >&2; exit 1 ;;
  esac
  cross=()
  strip_bin=strip
  if [ "$arch" != "$host" ]; then
    if ! command -v "$triplet-g++" >/dev/null; then
      echo "prebuild: $triplet-g++ not found: install the cross compiler (Debian: g++-${triplet//_/-}) or set SNAPSTREAM_PREBUILD_ARCHS=$host" >&2
      exit 1
    fi
    cross=(CC="$triplet-gcc" CXX="$triplet-g++" LINK="$triplet-g++" AR="$triplet-ar")
    strip_bin="$triplet-strip"
  fi
  echo "prebuild: building the Node-API addon for linux-$arch (glibc)${cross:+, cross-compiled with $triplet-g++}"
  env "${cross[@]}" node_modules/.bin/prebuildify --napi --strip --strip-bin "$strip_bin" --tag-libc --name snapstream.napi \
    --target "node@$(node -p process.versions.node)" --arch "$arch" --out "$root" "$work" \
    >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
done

bash scripts/check-prebuilds.sh prebuilds
