#!/usr/bin/env bash
# bitsandbytes for the GPU machine's Python (issue #24): it has torch, transformers, peft and
# accelerate but no bitsandbytes and no registry. The wheel of the pinned version
# (scripts/requirements.txt) is 41 MiB, mostly one library per CUDA version; this keeps the
# CUDA 13.0 one (torch 2.11.0+cu130) and the CPU one, unpacked into target/device/pylib
# (~6 MiB; scripts/device_check.sh puts it on PYTHONPATH). Its dependencies (torch, numpy,
# packaging) are on the machine.
#   scripts/device_bundle.sh [CUDA_TAG]     (default cuda130)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tag="${1:-cuda130}"
version="$(grep -E '^bitsandbytes==' "$repo/scripts/requirements.txt" | cut -d= -f3)"
mkdir -p "$repo/.cache/pip"
"$repo/.venv/bin/python" -m pip download --quiet --no-deps -d "$repo/.cache/pip" "bitsandbytes==$version"
wheel="$(ls "$repo/.cache/pip"/bitsandbytes-"$version"-*manylinux*x86_64.whl | head -1)"
out="$repo/target/device/pylib"
rm -rf "$out/bitsandbytes" "$out"/bitsandbytes-*.dist-info
mkdir -p "$out"
unzip -q -o "$wheel" -d "$out"
find "$out/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name "libbitsandbytes_${tag}.so" ! -name 'libbitsandbytes_cpu.so' -delete
echo "device_bundle: bitsandbytes $version ($tag + cpu) in target/device/pylib: $(du -sh "$out" | cut -f1)" >&2
