#!/usr/bin/env python3
"""Loads an NF4 model directory written by `peftrt quantize` with transformers + bitsandbytes and
checks its logits on a token sequence against a reference (both from safetensors files).

Usage:  .venv/bin/python scripts/check_nf4_loads.py MODEL_DIR REFERENCE.safetensors TOKENS_KEY LOGITS_KEY

Exits 0 when transformers loads the directory as a 4-bit model (every decoder linear a
bitsandbytes Linear4bit) and its logits equal the reference within 1e-5 of max |logit|.
Used by `make test` (tests/tests/nf4.rs) on tiny-llama quantised by peftrt, against the logits
transformers gave for the checkpoint bitsandbytes itself wrote.
"""
import os
import sys
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main() -> int:
    model_dir, ref, tokens_key, logits_key = sys.argv[1:5]
    torch.set_num_threads(1)
    import bitsandbytes.nn as bnn

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu",
                                                 attn_implementation="eager").eval()
    n4 = 0
    for m in model.modules():
        if isinstance(m, bnn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # the portable f32 path (see tests/fixtures/nf4)
            n4 += 1
    # transformers keeps the unquantised tensors (embeddings, norms, head) in the checkpoint's
    # dtype whatever `dtype` says; peftrt computes in f32, so widen them (exactly) to compare.
    for name, p in model.named_parameters():
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    with safe_open(ref, framework="pt") as f:
        tokens = f.get_tensor(tokens_key).long()
        want = f.get_tensor(logits_key)
    with torch.no_grad():
        got = model(tokens.unsqueeze(0), use_cache=False).logits[0]
    err = float((got - want).abs().max())
    scale = float(want.abs().max())
    print(f"{model_dir}: {n4} Linear4bit layers; max |Δlogit| {err:.3e} (max |logit| {scale:.2f})")
    return 0 if n4 > 0 and err <= 1e-5 * scale else 1


if __name__ == "__main__":
    sys.exit(main())
