"""What the reference generators share: file listing and hashing, GGUF's Q/K row order undone,
and the `--check` mode (regenerate into a temporary directory, compare byte for byte).

Imported by the scripts beside it (`sys.path` holds the script's own directory when Python runs
`scripts/<name>.py`); standard library only, so importing it costs nothing.
"""

from __future__ import annotations

import filecmp
import hashlib
import tempfile
from pathlib import Path
from typing import Callable, Iterable


def all_files(root: Path) -> list[str]:
    """Every regular file under `root`, as sorted paths relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def sha256_file(path: Path, _cache: dict = {}) -> str:
    """The file's SHA-256 in hex, read in 1 MiB chunks; cached per (path, size, mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _cache[key] = h.hexdigest()
    return _cache[key]


def unpermute(w, n_head: int):
    """Undoes llama.cpp's convert-time permutation of attn_q/attn_k rows (GGUF keeps RoPE's
    pairs interleaved; transformers keeps them in halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def differences(fresh: Path, committed: Path, within: Iterable[str] | None = None,
                stale: bool = False, keep: Iterable[str] = ()) -> list[str]:
    """Files of `fresh` that `committed` lacks or holds with other bytes; with `stale`, also the
    files of `committed` that `fresh` lacks (except `keep`, hand-written files). `within` limits
    both sides to those subdirectories."""
    roots = list(within) if within is not None else ["."]
    bad = []
    for r in roots:
        prefix = "" if r == "." else f"{r}/"
        new = [prefix + f for f in all_files(fresh / r)]
        bad += [f for f in new if not (committed / f).is_file()
                or not filecmp.cmp(fresh / f, committed / f, shallow=False)]
        if stale and (committed / r).is_dir():
            known = set(new) | set(keep)
            bad += [f"{prefix}{f} (stale)" for f in all_files(committed / r) if prefix + f not in known]
    return bad


def check_regeneration(what: str, committed: Path, make: Callable[[Path], dict],
                       within: Callable[[dict], Iterable[str]] | None = None,
                       stale: bool = False, keep: Iterable[str] = ()) -> int:
    """The generators' `--check`: runs `make` into a temporary directory and compares with
    `committed` (see `differences`; `within` picks the subdirectories from `make`'s summary).
    Prints the verdict and returns the exit status."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = make(Path(tmp))
        dirs = within(summary) if within is not None else None
        bad = differences(Path(tmp), committed, dirs, stale=stale, keep=keep)
    if bad:
        print(f"{what} differ from a fresh regeneration:", *bad, sep="\n  ")
        return 1
    print(f"{what} are up to date")
    return 0
