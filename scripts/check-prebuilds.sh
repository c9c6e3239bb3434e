#!/usr/bin/env bash
# Checks the prebuilt addons in a prebuilds/ folder (the package's own, or one
# unpacked from the tarball) before they are shipped:
# - the ELF header: a 64-bit shared object for the architecture its folder names;
# - the symbol versions it needs: at most GLIBC_2.36 and GLIBCXX_3.4.30 /
#   CXXABI_1.3.13, i.e. what Debian 12 (glibc 2.36, GCC 12's libstdc++) has;
# - the libraries it links: libc, libm, libstdc++ and libgcc_s only;
# - stripped, with the Node-API entry point napi_register_module_v1;
# - on a matching machine: Node loads it, it has the functions the library
#   calls, and a C++ exception thrown in it arrives as a JS TypeError.
#
# Usage: scripts/check-prebuilds.sh PREBUILDS_DIR
set -euo pipefail

dir="${1:?usage: check-prebuilds.sh PREBUILDS_DIR}"
max_glibc=2.36 max_glibcxx=3.4.30 max_cxxabi=1.3.13
fail() { echo "check-prebuilds: $*" >&2; exit 1; }
# True when version $1 <= $2 (dotted numbers).
version_le() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$1" ]; }
# The highest version of one prefix (GLIBC, GLIBCXX, CXXABI) the file needs.
highest() { readelf -V -W "$2" | grep -oE "Name: $1_[0-9.]+" | sed "s/^Name: $1_//" | sort -V | tail -n1; }

shopt -s nullglob
found=0
for file in "$dir"/*/*.node; do
  found=$((found + 1))
  tuple="$(basename "$(dirname "$file")")"
  case "$tuple" in
    linux-x64) machine='Advanced Micro Devices X86-64' ;;
    linux-arm64) machine='AArch64' ;;
    *) fail "$file: unexpected platform folder $tuple" ;;
  esac
  [[ "$(basename "$file")" == *.glibc.node ]] || fail "$file: not tagged glibc"
  header="$(readelf -h "$file")"
  [[ "$header" == *"Class:"*"ELF64"* ]] || fail "$file: not ELF64"
  [[ "$header" == *"Type:"*"DYN"* ]] || fail "$file: not a shared object"
  [[ "$header" == *"Machine:"*"$machine"* ]] || fail "$file: machine is not $machine"

  glibc="$(highest GLIBC "$file")"
  glibcxx="$(highest GLIBCXX "$file")"
  cxxabi="$(highest CXXABI "$file")"
  version_le "${glibc:-0}" "$max_glibc" || fail "$file needs GLIBC_$glibc (> $max_glibc)"
  version_le "${glibcxx:-0}" "$max_glibcxx" || fail "$file needs GLIBCXX_$glibcxx (> $max_glibcxx)"
  version_le "${cxxabi:-0}" "$max_cxxabi" || fail "$file needs CXXABI_$cxxabi (> $max_cxxabi)"

  needed="$(readelf -d "$file" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort | tr '\n' ' ')"
  for lib in $needed; do
    case "$lib" in libc.so.6 | libm.so.6 | libstdc++.so.6 | libgcc_s.so.1) ;; *) fail "$file links $lib" ;; esac
  done
  sections="$(readelf -S -W "$file")"
  [[ "$sections" != *" .symtab "* ]] || fail "$file is not stripped"
  # Captured first: `readelf | grep -q` under pipefail fails at random (SIGPIPE).
  dynsyms="$(readelf --dyn-syms -W "$file")"
  [[ "$dynsyms" == *" GLOBAL DEFAULT "*" napi_register_module_v1"* ]] || fail "$file has no napi_register_module_v1"

  loaded="not loaded here (another architecture)"
  if [ "$tuple" = "linux-$(node -p process.arch)" ]; then
    node -e '
      const m = { exports: {} };
      process.dlopen(m, process.argv[1]);
      if (typeof m.exports.NativeFile !== "function" || typeof m.exports.alignmentSkip !== "function") {
        throw new Error("NativeFile/alignmentSkip missing: " + Object.keys(m.exports));
      }
      // A C++ exception thrown in the addon must arrive as a JS exception.
      let caught;
      try { m.exports.alignmentSkip(); } catch (err) { caught = err; }
      if (!(caught instanceof TypeError)) throw new Error("alignmentSkip() did not throw a TypeError: " + caught);
      if (m.exports.alignmentSkip(new ArrayBuffer(64), 1) !== 0) throw new Error("alignmentSkip(buffer, 1) is not 0");
    ' "$(cd "$(dirname "$file")" && pwd)/$(basename "$file")" || fail "$file does not load in node $(node --version)"
    loaded="loads in node $(node --version)"
  fi
  echo "check-prebuilds: $tuple/$(basename "$file"): $(stat -c %s "$file") bytes, needs GLIBC_$glibc GLIBCXX_$glibcxx CXXABI_${cxxabi:-none}, links ${needed% }; $loaded"
done
[ "$found" -gt 0 ] || fail "no prebuilt addon in $dir"
