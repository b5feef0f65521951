#!/usr/bin/env bash
# Installs libpeftrt (shared and static), its headers and pkg-config files under a prefix:
#   PREFIX/lib/libpeftrt.so, PREFIX/lib/libpeftrt.a
#   PREFIX/include/peftrt.h (C), PREFIX/include/peftrt.hpp (header-only C++17 wrapper)
#   PREFIX/lib/pkgconfig/peftrt.pc (shared), PREFIX/lib/pkgconfig/peftrt-static.pc (static)
#   PREFIX/lib/cmake/peftrt/peftrtConfig.cmake and peftrtConfigVersion.cmake
#     (find_package(peftrt); targets peftrt::peftrt and peftrt::peftrt_static)
# DESTDIR is honoured (staged installs for packaging).
#
# Usage: scripts/install.sh PREFIX [BUILD_DIR]   (BUILD_DIR default target/release; for a
#        cross build, target/aarch64-unknown-linux-gnu/release)
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${1:?usage: scripts/install.sh PREFIX [BUILD_DIR]}"
build="${2:-target/release}"
case "$prefix" in /*) ;; *) echo "install: PREFIX must be an absolute path (got $prefix)" >&2; exit 1 ;; esac
for f in libpeftrt.so libpeftrt.a; do
    [ -f "$build/$f" ] || { echo "install: $build/$f not found; build it: cargo build --release -p peftrt-ffi" >&2; exit 1; }
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
grep -q "#define PEFTRT_VERSION_STRING \"$version\"" include/peftrt.h ||
    { echo "install: include/peftrt.h does not say version $version (Cargo.toml)" >&2; exit 1; }

dest="${DESTDIR:-}$prefix"
install -d "$dest/lib/pkgconfig" "$dest/lib/cmake/peftrt" "$dest/include"
install -m 755 "$build/libpeftrt.so" "$dest/lib/"
install -m 644 "$build/libpeftrt.a" "$dest/lib/"
install -m 644 include/peftrt.h examples/cpp/peftrt.hpp "$dest/include/"
for pc in peftrt peftrt-static; do
    sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "ffi/$pc.pc.in" >"$dest/lib/pkgconfig/$pc.pc"
done
for f in peftrtConfig peftrtConfigVersion; do
    sed -e "s|@VERSION@|$version|" -e "s|@VERSION_MAJOR_MINOR@|${version%.*}|" "ffi/$f.cmake.in" \
        >"$dest/lib/cmake/peftrt/$f.cmake"
done
echo "installed libpeftrt $version under $dest"
