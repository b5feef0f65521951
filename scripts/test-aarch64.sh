#!/usr/bin/env bash
# Cross-compiles peftrt for aarch64 and runs, under qemu user emulation, the library's unit
# tests (NEON kernels against the scalar references, thread pool, GGUF, sampler...) and the
# small-model conformance tests (tiny fixtures against transformers' and PEFT's logits, LoRA,
# DoRA and NF4 on the NEON kernels), and the C API (libpeftrt.a with the C bad-input suite and
# the threads example). The real-model
# tests are left to the native run: they are slow under emulation and test no other code.
# Installs what is missing (Debian/Ubuntu, needs root or sudo); safe to run repeatedly.
#
# Usage: scripts/test-aarch64.sh [extra test filter args...]
set -euo pipefail

TARGET=aarch64-unknown-linux-gnu
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
[ -e /usr/aarch64-linux-gnu/lib/libc.so.6 ] || missing+=(libc6-dev-arm64-cross)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    $SUDO apt-get update
    $SUDO apt-get install -y "${missing[@]}"
fi

if ! rustup target list --installed | grep -qx "$TARGET"; then
    rustup target add "$TARGET"
fi

# Linker, qemu runner and the C cross compiler for onig come from .cargo/config.toml.
cargo test --release --target "$TARGET" -p peftrt --lib "$@"
cargo test --release --target "$TARGET" -p peftrt-conformance --test tiny_models --test adapters --test nf4 "$@"

# The C API on aarch64 (cheap under qemu: about a second): libpeftrt.a cross-built, the C
# bad-input suite and the threads example linked statically against it and run under qemu.
cargo build --release --target "$TARGET" -p peftrt-ffi
out="target/$TARGET/ffi-tests"
mkdir -p "$out"
F=tests/fixtures
for src in ffi/tests/c/bad_input.c examples/c/threads.c; do
    aarch64-linux-gnu-gcc -std=c11 -Wall -Wextra -Werror -O1 -Iinclude "$src" \
        "target/$TARGET/release/libpeftrt.a" -lpthread -ldl -lm -o "$out/$(basename "$src" .c)"
done
QEMU=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
"${QEMU[@]}" "$out/bad_input" $F/tiny-llama $F/adapters/llama-qv $F/tiny-llama3-tied
"${QEMU[@]}" "$out/threads" $F/tiny-llama $F/adapters/llama-qv $F/adapters/llama-all-rslora 4 8
