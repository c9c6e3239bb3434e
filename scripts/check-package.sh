#!/usr/bin/env bash
# Tests the package the way a user gets it (run by .ci/run):
#  1. npm pack (prepack builds dist/ and the prebuilt addon); the tarball holds
#     what users need and nothing else, and its prebuilt addon passes
#     scripts/check-prebuilds.sh;
#  2. install the tarball into a fresh temporary project with the compilers
#     masked on PATH (cc, gcc, g++, c++, clang, make, python3 fail and log);
#  3. import it from ESM, require it from CommonJS, type-check a TypeScript
#     file against it under strict;
#  4. run the bin (npx snapstream --help, write, list);
#  5. write a small snapshot stream through it (raw and qcow2, checked against
#     a sha256 of the input and qemu-img);
#  6. installed with --ignore-scripts, the prebuild still loads; the arm64
#     prebuild runs the ESM check under qemu-aarch64 with Debian's arm64 Node;
#  7. the fallback, where no prebuild fits (none for this platform, or one that
#     does not load): the install compiles from source when compilers are
#     there, and fails loudly when they are not.
#
# Usage: scripts/check-package.sh   (needs network access to the npm registry
# for the package's dependencies and Debian's arm64 nodejs, qemu-img, and
# qemu-aarch64 when the package carries an arm64 prebuild)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
say() { echo "package: $*"; }
fail() { echo "package: FAILED: $*" >&2; exit 1; }
command -v qemu-img >/dev/null || fail "qemu-img is needed (Debian: qemu-utils)"

work="$(mktemp -d "${TMPDIR:-/tmp}/snapstream-package.XXXXXX")"
trap 'rm -rf "$work"' EXIT
npm_quiet=(--no-audit --no-fund --loglevel=error)

# 1. Pack.
npm pack --pack-destination "$work" >"$work/pack.log" 2>&1 || { cat "$work/pack.log" >&2; fail "npm pack"; }
tarball="$(ls "$work"/snapstream-*.tgz)"
listing="$(tar -tzf "$tarball" | sed 's|^package/||' | sort)"
unexpected="$(grep -vE '^(dist/.+\.(js|d\.ts)|bin/[^/]+\.js|native/[^/]+\.(cc|h)|prebuilds/linux-(x64|arm64)/[^/]+\.node|binding\.gyp|package\.json|README\.md|LICENSE)$' <<<"$listing" || true)"
[ -z "$unexpected" ] || fail "the tarball holds files users do not need:"$'\n'"$unexpected"
for need in dist/index.js dist/index.d.ts bin/snapstream.js binding.gyp native/addon.cc README.md LICENSE package.json \
            "prebuilds/linux-$(node -p process.arch)/snapstream.napi.glibc.node"; do
  grep -qxF "$need" <<<"$listing" || fail "the tarball lacks $need"
done
mkdir "$work/unpacked"
tar -xzf "$tarball" -C "$work/unpacked"
bash scripts/check-prebuilds.sh "$work/unpacked/package/prebuilds"
say "tarball $(basename "$tarball"): $(wc -l <<<"$listing") files, $(stat -c %s "$tarball") bytes packed, $(du -sb "$work/unpacked/package" | cut -f1) bytes unpacked"

# 2. Compilers masked: each shim logs its call and fails.
shims="$work/no-compilers"
mkdir "$shims"
for tool in cc gcc g++ c++ clang clang++ make gmake python python3; do
  printf '#!/bin/sh\necho "%s $*" >>"%s/calls.log"\necho "%s is masked for this check" >&2\nexit 127\n' \
    "$tool" "$shims" "$tool" >"$shims/$tool"
  chmod +x "$shims/$tool"
done
masked_path="$shims:$PATH"

# A fresh project, as a user makes one. TypeScript and @types/node at the
# versions this repository uses (from the npm cache when it has them).
new_project() {
  mkdir -p "$1"
  printf '{ "name": "user-project", "private": true, "type": "module" }\n' >"$1/package.json"
}
project="$work/project"
new_project "$project"
cp scripts/package-check/* "$project"/
ts_version="$(node -p 'require("typescript/package.json").version')"
types_version="$(node -p 'require("@types/node/package.json").version')"
say "installing the tarball with compilers masked"
(cd "$project" && PATH="$masked_path" npm install "${npm_quiet[@]}" "$tarball" \
  "typescript@$ts_version" "@types/node@$types_version") || fail "npm install of the tarball (compilers masked)"
[ ! -e "$shims/calls.log" ] || fail "the install called a compiler: $(cat "$shims/calls.log")"
[ ! -e "$project/node_modules/snapstream/build" ] || fail "the install built the addon instead of using the prebuild"

# 3-5. Import, require, type-check, bin, a snapshot stream.
data="$work/data"
mkdir "$data"
(
  cd "$project"
  export PATH="$masked_path"
  node esm.mjs "$data"
  node cjs.cjs "$data"
  npx --no-install tsc -p tsconfig.json || fail "tsc: types.ts does not type-check against the package"
  say "types: ok (strict, skipLibCheck off)"
  help="$(npx --no-install snapstream --help)"
  [[ "$help" == *"Usage: snapstream"* ]] || fail "snapstream --help printed: $help"
  [ "$(npx --no-install snapstream --version)" = "$(node -p 'require("snapstream/package.json").version')" ] || fail "snapstream --version"
  head -c 3000000 /dev/urandom >"$data/bin-input"
  npx --no-install snapstream write --quiet "$data/bin.raw" <"$data/bin-input"
  [ "$(sha256sum <"$data/bin.raw")" = "$(sha256sum <"$data/bin-input")" ] || fail "snapstream write: output differs from input"
  npx --no-install snapstream list "$data/disk.qcow2" | grep -q package-check || fail "snapstream list"
  say "bin: ok (--help, --version, write sha256-equal, list)"
) || fail "the installed package"
[ ! -e "$shims/calls.log" ] || fail "a compiler was called: $(cat "$shims/calls.log")"

# Install scripts skipped (npm --ignore-scripts, or an allowScripts policy that
# blocks them): the prebuild is found at load time all the same.
project4="$work/project-ignore-scripts"
new_project "$project4"
(cd "$project4" && PATH="$masked_path" npm install "${npm_quiet[@]}" --ignore-scripts "$tarball" >/dev/null) || fail "npm install --ignore-scripts"
(cd "$project4" && PATH="$masked_path" node -e '
  import("snapstream").then(async ({ createSnapshotStream }) => {
    const { pipeline } = await import("node:stream/promises");
    await pipeline([Buffer.alloc(4096, 7)], createSnapshotStream(process.argv[1]));
  });' "$data/ignore-scripts.raw") || fail "the package installed with --ignore-scripts does not run"
[ "$(stat -c %s "$data/ignore-scripts.raw")" = 4096 ] || fail "the package installed with --ignore-scripts wrote the wrong length"
say "installed with --ignore-scripts: the prebuild loads and writes"

# The arm64 prebuild, on an x64 machine: Debian's arm64 Node under
# qemu-aarch64 loads it from the installed package and runs the ESM check.
# (qemu-user's statx lacks STATX_DIOALIGN, so this exercises the page-cache
# path; O_DIRECT itself is exercised natively on x64.)
if [ -d "$project4/node_modules/snapstream/prebuilds/linux-arm64" ] && [ "$(node -p process.arch)" != arm64 ]; then
  command -v qemu-aarch64 >/dev/null || fail "qemu-aarch64 is needed to run the arm64 prebuild (Debian: qemu-user)"
  arm64_root="$(bash scripts/arm64-node.sh "${SNAPSTREAM_ARM64_NODE_DIR:-$work/arm64-node}")" || fail "preparing an arm64 Node"
  arm64_node=(qemu-aarch64 -L "$arm64_root" "$arm64_root/usr/bin/node")
  cp scripts/package-check/esm.mjs "$project4"/
  mkdir "$data/arm64"
  (cd "$project4" && PATH="$masked_path" "${arm64_node[@]}" esm.mjs "$data/arm64") || fail "the arm64 prebuild under qemu-aarch64"
  say "arm64: the prebuild ran the ESM check in $("${arm64_node[@]}" -p '`node ${process.version} ${process.arch}`') under qemu-aarch64"
fi

# 7. No prebuild fits: compile at install when possible, else fail loudly.
# Two repacked tarballs: one without this machine's platform folder (another
# architecture, musl), one whose prebuild for this machine does not load (an
# older glibc or libstdc++), which node-gyp-build's install-time load test catches.
host_tuple="linux-$(node -p process.arch)"
repack() { # NAME: the unpacked package with its prebuilds as they are now
  tar -czf "$work/$1.tgz" -C "$work/unpacked" package
  echo "$work/$1.tgz"
}
rm -rf "$work/unpacked/package/prebuilds/$host_tuple"
no_match="$(repack snapstream-no-matching-prebuild)"
mkdir "$work/unpacked/package/prebuilds/$host_tuple"
echo 'not an ELF file' >"$work/unpacked/package/prebuilds/$host_tuple/snapstream.napi.glibc.node"
no_load="$(repack snapstream-prebuild-does-not-load)"

project2="$work/project-no-prebuild-no-compiler"
new_project "$project2"
if (cd "$project2" && PATH="$masked_path" npm install "${npm_quiet[@]}" "$no_match" >"$work/fail.log" 2>&1); then
  fail "an install with no matching prebuild and no compiler succeeded"
fi
[ -e "$shims/calls.log" ] || { cat "$work/fail.log" >&2; fail "the install without a matching prebuild failed without trying to compile"; }
say "no matching prebuild, no compiler: the install tried to compile ($(cut -d' ' -f1 "$shims/calls.log" | sort -u | tr '\n' ' ')) and failed: $(grep -m1 -oE 'gyp ERR! stack Error: .*' "$work/fail.log" || tail -n1 "$work/fail.log")"
rm -f "$shims/calls.log"

project3="$work/project-from-source"
new_project "$project3"
(cd "$project3" && npm install "${npm_quiet[@]}" "$no_load" >"$work/source.log" 2>&1) || { cat "$work/source.log" >&2; fail "install compiling from source"; }
[ -e "$project3/node_modules/snapstream/build/Release/snapstream.node" ] || fail "the install did not compile the addon in place of the prebuild that does not load"
(cd "$project3" && node -e 'import("snapstream").then((m) => { if (typeof m.createSnapshotStream !== "function") process.exit(1); })') \
  || fail "the package compiled from source does not load"
say "prebuild that does not load, compilers present: compiled from source at install, loads"
say "ok"
