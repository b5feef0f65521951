"""llama.cpp's greedy continuations of the SmolLM2 conformance prompts on a GGUF file, for
`tests/tests/gguf_native.rs` to compare peftrt's native greedy tokens with.

The prompts are the token ids of `scripts/smollm2_reference.py`'s reference file (`tokens_text`,
`tokens_code`, `tokens_chat`), so both programs start from the same ids. llama.cpp (through
llama-cpp-python's low-level API, CPU) reads the prompt in one batch, then takes the argmax of the
last logits and feeds it back, N_GREEDY times (end-of-text does not stop it), as peftrt's greedy
sampler and transformers' `generate(do_sample=False)` do. Each step also records the gap between
llama.cpp's top two logits, so a divergence can be told from a near-tie.

Usage: python scripts/greedy_llamacpp.py MODEL.gguf REFERENCE.safetensors OUT.json [--threads 2] [--check]
(`make bench` builds llama-cpp-python into the venv; the output is committed as a fixture.
`--check` compares a fresh run with OUT.json instead of writing it, and fails if they differ.)
"""
import argparse
import ctypes
import hashlib
import json
from pathlib import Path

import llama_cpp as L
import numpy as np
from safetensors.numpy import load_file

N_GREEDY = 32
CASES = ("text", "code", "chat")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("reference")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="compare with OUT.json instead of writing it")
    a = ap.parse_args()

    ref = load_file(a.reference)
    L.llama_backend_init()
    model = L.llama_model_load_from_file(a.model.encode(), L.llama_model_default_params())
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 512
    cp.n_threads = cp.n_threads_batch = a.threads
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(512, 0, 1)

    def decode(tokens, pos0):
        batch.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = int(i == len(tokens) - 1)
        assert L.llama_decode(ctx, batch) == 0
        p = L.llama_get_logits_ith(ctx, len(tokens) - 1)
        return np.ctypeslib.as_array(ctypes.cast(p, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).copy()

    cases = {}
    for name in CASES:
        prompt = [int(t) for t in ref[f"tokens_{name}"]]
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        logits = decode(prompt, 0)
        greedy, margins = [], []
        for step in range(N_GREEDY):
            top2 = np.sort(logits)[-2:]
            margins.append(round(float(top2[1] - top2[0]), 5))
            t = int(np.argmax(logits))
            greedy.append(t)
            if step + 1 < N_GREEDY:
                logits = decode([t], len(prompt) + step)
        cases[name] = {"prompt": prompt, "greedy": greedy, "margins": margins}
        print(f"{name}: {len(prompt)} prompt tokens, smallest top-2 gap {min(margins):.3g}")
    L.llama_batch_free(batch)

    out = {
        "generator": "scripts/greedy_llamacpp.py",
        "llama_cpp_python": L.__version__,
        "gguf": Path(a.model).name,
        "gguf_sha256": sha256(a.model),
        "n_greedy": N_GREEDY,
        "cases": cases,
    }
    text = json.dumps(out, indent=1) + "\n"
    if a.check:
        if Path(a.out).read_text() != text:
            raise SystemExit(f"{a.out} differs from a fresh run (another llama.cpp or GGUF?)")
        print(f"{a.out}: the same as a fresh run")
    else:
        Path(a.out).write_text(text)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
