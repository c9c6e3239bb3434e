#!/usr/bin/env bash
# Builds the prebuilt addon shipped inside the npm package (run by `prepack`,
# so by `npm pack` and `npm publish`; never committed). Output:
#   prebuilds/linux-<arch>/snapstream.napi.glibc.node
# One Node-API binary serves every Node version; node-gyp-build picks it at
# install and at load time when it matches the machine, else the install
# compiles from source with node-gyp.
#
# The build runs in a private copy so the developer's build/Release (which
# node-gyp-build prefers) is left alone. The binary is built against the
# running Node's headers (the npm `nodedir` when one is configured), not
# against headers downloaded for some other Node version.
#
# Usage: scripts/prebuild.sh        (host architecture only)
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

rm -rf prebuilds
arch="$(node -p process.arch)"
echo "prebuild: building the Node-API addon for linux-$arch (glibc)"
node_modules/.bin/prebuildify --napi --strip --tag-libc --name snapstream.napi \
  --target "node@$(node -p process.versions.node)" --arch "$arch" --out "$root" "$work" \
  >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }

bash scripts/check-prebuilds.sh prebuilds
