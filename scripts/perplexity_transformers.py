"""transformers' perplexity on a model with `peftrt perplexity`'s recipe: the float reference
for the GGUF perplexity rows of BENCHMARKS.md.

The Hugging Face sliding-window recipe (`runtime/src/perplexity.rs`): windows of WINDOW tokens
starting every STRIDE tokens, each scoring only the tokens the previous window did not,
log-softmax in float64. MODEL is a Hugging Face directory or a GGUF file (transformers' GGUF
loader dequantises it to float32: the same weights peftrt runs, in exact arithmetic). The tokens
are the model's tokenizer's, without BOS, as peftrt's.

Usage: python scripts/perplexity_transformers.py MODEL [TEXT] [--window 512] [--stride 256] [--threads 2]
Prints one JSON object: {"model", "perplexity", "tokens", "scored", "windows"}.
"""
import argparse
import json
import math
import os
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")


def perplexity(model, tokens, window, stride):
    """(perplexity, tokens scored, windows) of `tokens` under `model` (float64 log-softmax)."""
    import torch

    n = len(tokens)
    nll, count, windows, prev_end, start = 0.0, 0, 0, 0, 0
    while True:
        end = min(start + window, n)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens[start:end]]), use_cache=False).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        # Score targets start+1 .. end-1 not scored before (prediction at position i is of token i+1).
        for target in range(max(prev_end, start + 1), end):
            nll -= float(logp[target - start - 1, tokens[target]])
            count += 1
        windows += 1
        prev_end = end
        if end == n:
            break
        start += stride
    return math.exp(nll / count), count, windows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("text", nargs="?", default="data/public-domain.txt")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    path = Path(a.model)
    kw = {"gguf_file": path.name} if path.is_file() else {}
    where = str(path.parent if path.is_file() else path)
    tok = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw).eval()
    text = open(a.text, encoding="utf-8").read()
    tokens = tok(text, add_special_tokens=False)["input_ids"]
    n = len(tokens)
    assert n > 1, n

    ppl, count, windows = perplexity(model, tokens, a.window, a.stride)
    print(json.dumps({"model": a.model, "perplexity": ppl, "tokens": n, "scored": count,
                      "windows": windows}))


if __name__ == "__main__":
    main()
