#!/usr/bin/env bash
# Prepares Debian's arm64 Node.js (the nodejs package of the running Debian
# release, Node 18 on Debian 12, Node-API 9) in a private root, to run the
# arm64 prebuilt addon under qemu-aarch64 on an x64 machine. apt runs with its
# own lists, cache and an empty dpkg status in that folder: the machine's apt
# and dpkg state are not touched, and nothing is installed.
#
# Usage: scripts/arm64-node.sh DIR   -> prints the root; run Node as
#   qemu-aarch64 -L ROOT ROOT/usr/bin/node ...
set -euo pipefail

dir="${1:?usage: arm64-node.sh DIR}"
root="$dir/root"
if [ -x "$root/usr/bin/node" ]; then echo "$root"; exit 0; fi
command -v apt-get >/dev/null || { echo "arm64-node: needs apt-get (Debian)" >&2; exit 1; }

mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$root"
: >"$dir/status"
opts=(-o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Debug::NoLocking=1
      -o Dir::State::Lists="$dir/lists" -o Dir::State::status="$dir/status"
      -o Dir::Cache="$dir/cache" -o Dir::Cache::archives="$dir/cache/archives")
apt-get "${opts[@]}" update -qq >"$dir/apt.log" 2>&1 || { cat "$dir/apt.log" >&2; exit 1; }
apt-get "${opts[@]}" install --download-only -y -qq nodejs >>"$dir/apt.log" 2>&1 || { cat "$dir/apt.log" >&2; exit 1; }
for deb in "$dir"/cache/archives/*.deb; do dpkg -x "$deb" "$root"; done
[ -x "$root/usr/bin/node" ] || { echo "arm64-node: no usr/bin/node in the unpacked packages" >&2; exit 1; }
echo "$root"
