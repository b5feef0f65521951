#!/usr/bin/env bash
# Builds the `trainer` binary for a GPU machine whose Python has another torch than the venv's
# (issue #24: the H200 box has torch 2.11.0+cu130 and no Rust toolchain). x86-64, linked against
# that torch's libtorch; at run time it loads the machine's own torch/lib (LD_LIBRARY_PATH), so
# only the binary travels.
#
#   scripts/build_device_trainer.sh TORCH_VERSION OUT_BINARY
#   e.g. scripts/build_device_trainer.sh 2.11.0 target/device/trainer
#
# How: tch pins one libtorch per release (torch-sys' build.rs: TORCH_VERSION; 0.26 → 2.13,
# 0.25 → 2.12, 0.24 → 2.11, 0.23 → 2.10, CHANGELOG). Its generated bindings
# (libtch/torch_api_generated.cpp) are generated from that release's operator list, so a
# version-check bypass (LIBTORCH_BYPASS_VERSION_CHECK) against an older libtorch is not enough
# in general; the tch release made for the target torch is used instead. The repository is
# copied (git archive HEAD) to a scratch directory whose trainer/Cargo.toml asks for that tch,
# and built there against the libtorch of the wheel `torch==TORCH_VERSION` from PyPI (downloaded
# with pip into .cache/pip, unpacked once), with its own target directory. The CUDA libraries
# libtorch_cuda needs at link time come from the venv's nvidia-* packages (same CUDA major).
# Nothing in the working tree changes.
set -euo pipefail

version="${1:?usage: build_device_trainer.sh TORCH_VERSION OUT_BINARY}"
out="${2:?usage: build_device_trainer.sh TORCH_VERSION OUT_BINARY}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$repo/.venv/bin/python"
case "$version" in
    2.11.*) tch=0.24.0 ;;
    2.12.*) tch=0.25.0 ;;
    2.13.*) tch=0.26.0 ;;
    *) echo "build_device_trainer: no tch release known for torch $version" >&2; exit 2 ;;
esac

cache="$repo/.cache/device-torch-$version"
if [[ ! -d "$cache/torch/lib" ]]; then
    mkdir -p "$repo/.cache/pip" "$cache"
    "$py" -m pip download --quiet --no-deps -d "$repo/.cache/pip" "torch==$version"
    wheel="$(ls "$repo/.cache/pip"/torch-"$version"-*.whl | head -1)"
    unzip -q -o "$wheel" 'torch/lib/*' 'torch/include/*' 'torch/version.py' -d "$cache"
fi
echo "build_device_trainer: libtorch $(grep '^__version__' "$cache/torch/version.py" | cut -d"'" -f2), tch $tch" >&2

scratch="$repo/target/device-build"
rm -rf "$scratch/src" && mkdir -p "$scratch/src"
git -C "$repo" archive HEAD | tar -x -C "$scratch/src"
sed -i -E "s/^tch = \"[^\"]+\"/tch = \"=$tch\"/; s/^torch-sys = \"[^\"]+\"/torch-sys = \"=$tch\"/" "$scratch/src/trainer/Cargo.toml"

# The venv's CUDA runtime libraries (nvidia/*/lib), for the linker to resolve libtorch_cuda's needs.
nvlibs="$("$py" - <<'EOF'
import glob, os, site
dirs = sorted({os.path.dirname(p) for s in site.getsitepackages() for p in glob.glob(os.path.join(s, "nvidia", "*", "lib", "*.so*"))})
print(":".join(dirs))
EOF
)"
rpath_link=""
IFS=: read -ra dirs <<< "$nvlibs"
for d in "${dirs[@]}"; do rpath_link+=" -C link-arg=-Wl,-rpath-link,$d"; done

(
    cd "$scratch/src"
    export LIBTORCH="$cache/torch" LIBTORCH_CXX11_ABI=1 LIBTORCH_BYPASS_VERSION_CHECK=1
    export CARGO_TARGET_DIR="$scratch/target"
    export RUSTFLAGS="${RUSTFLAGS:-}$rpath_link"
    # release without LTO or debug info: a small binary, built quickly.
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=true \
        cargo build --release -p peftrt-trainer --bin trainer
)
mkdir -p "$(dirname "$out")"
cp "$scratch/target/release/trainer" "$out"
echo "build_device_trainer: $out ($(du -h "$out" | cut -f1)), needs at run time:" >&2
LD_LIBRARY_PATH="$cache/torch/lib:$nvlibs" ldd "$out" | grep -E "torch|c10" >&2 || true
