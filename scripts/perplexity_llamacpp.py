"""llama.cpp's perplexity on a GGUF file with `peftrt perplexity`'s recipe, for side-by-side numbers.

The Hugging Face sliding-window recipe (`runtime/src/perplexity.rs`): windows of WINDOW tokens
starting every STRIDE tokens, each scoring only the tokens the previous window did not, log-softmax
in f64. llama.cpp's own `llama-perplexity` scores non-overlapping chunks (and its strided mode
needs a longer text), so this runs llama.cpp through llama-cpp-python's low-level API instead: one
`llama_decode` per window with logits for every position, the KV cache cleared between windows.
The tokens are llama.cpp's own tokenisation of the text (no BOS, as peftrt's: the count is printed
to check against peftrt's).

Usage: python scripts/perplexity_llamacpp.py MODEL.gguf [TEXT] [--window 512] [--stride 256] [--threads 2]
Prints one JSON object: {"model", "perplexity", "tokens", "windows"}.
"""
import argparse
import ctypes
import json
import math

import llama_cpp as L
import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("text", nargs="?", default="data/public-domain.txt")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    L.llama_backend_init()
    model = L.llama_model_load_from_file(a.model.encode(), L.llama_model_default_params())
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    text = open(a.text, encoding="utf-8").read().encode()
    buf = (L.llama_token * (len(text) + 16))()
    n = L.llama_tokenize(vocab, text, len(text), buf, len(buf), False, False)
    assert n > 1, n
    tokens = list(buf[:n])

    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = a.window
    cp.n_threads = cp.n_threads_batch = a.threads
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(a.window, 0, 1)

    nll, count, windows, prev_end, start = 0.0, 0, 0, 0, 0
    while True:
        end = min(start + a.window, n)
        win = tokens[start:end]
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        batch.n_tokens = len(win)
        for i, t in enumerate(win):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        assert L.llama_decode(ctx, batch) == 0
        # Score targets start+1 .. end-1 not scored before (prediction at position i is of token i+1).
        first = max(prev_end, start + 1)
        for target in range(first, end):
            p = L.llama_get_logits_ith(ctx, target - start - 1)
            logits = np.ctypeslib.as_array(ctypes.cast(p, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).astype(np.float64)
            m = logits.max()
            lse = m + math.log(np.exp(logits - m).sum())
            nll += lse - logits[tokens[target]]
            count += 1
        windows += 1
        prev_end = end
        if end == n:
            break
        start += a.stride
    L.llama_batch_free(batch)
    print(json.dumps({"model": a.model, "perplexity": math.exp(nll / count), "tokens": n, "scored": count,
                      "windows": windows}))


if __name__ == "__main__":
    main()
