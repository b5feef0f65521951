#!/usr/bin/env bash
# The functions include/peftrt.h declares and the symbols libpeftrt.so exports must be the
# same set: nothing undocumented leaks out, nothing documented is missing.
#
# Usage: ffi/tests/check_symbols.sh [LIB_DIR]   (default target/release)
set -euo pipefail
cd "$(dirname "$0")/../.."
lib="${1:-target/release}/libpeftrt.so"
[ -f "$lib" ] || { echo "check_symbols: $lib not found; build it: cargo build --release -p peftrt-ffi" >&2; exit 1; }

# A declaration is `type name(` at the start of a line, possibly after `*`s.
declared=$(grep -oE '^[a-z_][a-z0-9_ ]*[ *]+(peftrt_[a-z0-9_]+)\(' include/peftrt.h | grep -oE 'peftrt_[a-z0-9_]+\($' | tr -d '(' | sort)
# llguidance (constrained decoding) compiles its own C API, `llg_*`, into every crate that uses
# it, and a Rust cdylib exports each `#[no_mangle]` function of its dependencies (a version
# script cannot take them back: rustc's lists them by name). They are not peftrt's ABI: the
# header does not declare them and callers must not use them.
exported=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[TDBRW]$/ && $3 !~ /^llg_/ {print $3}' | sort)

if [ "$declared" != "$exported" ]; then
    echo "check_symbols: include/peftrt.h and $lib differ:" >&2
    diff <(echo "$declared") <(echo "$exported") | sed 's/^</  only in the header:/; s/^>/  only in the library:/' >&2
    exit 1
fi
n=$(echo "$declared" | wc -l)
[ "$n" -ge 20 ] || { echo "check_symbols: only $n functions found: is the header parsed?" >&2; exit 1; }
echo "check_symbols: the header declares exactly the $n functions the library exports"
