#!/usr/bin/env bash
# Create (if missing) a Python venv and install scripts/requirements.txt into it.
# Usage: scripts/setup_venv.sh [VENV_DIR]   (default: .venv, relative to the repository root)
# Idempotent: a stamp file in the venv records the sha256 of requirements.txt; when it matches,
# nothing is installed (a quick no-op). Set PYTHON to choose the interpreter (default python3).
# Set REQUIREMENTS to use another requirements file (used to test this script).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-.venv}"
case "$venv" in /*) ;; *) venv="$repo_root/$venv" ;; esac
req="${REQUIREMENTS:-$repo_root/scripts/requirements.txt}"
python="${PYTHON:-python3}"
stamp="$venv/.peftrt-requirements.sha256"

want="$( (sha256sum "$req" 2>/dev/null || shasum -a 256 "$req") | cut -d' ' -f1)"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup_venv: creating $venv" >&2
    "$python" -m venv "$venv"
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "setup_venv: $venv is up to date" >&2
    exit 0
fi

echo "setup_venv: installing $(basename "$req") into $venv" >&2
"$venv/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
"$venv/bin/python" -m pip install --disable-pip-version-check -r "$req"
echo "$want" > "$stamp"
echo "setup_venv: done" >&2
