#!/usr/bin/env python3
"""Reference token ids and weights for the SmolLM2 GGUF conformance test
(`tests/tests/smollm2_tokenizer.rs`).

Usage: python scripts/smollm2_tokens.py GGUF OUT.json [--cross-check]

Writes OUT.json and, next to it, OUT's stem + `.weights.f32` (little-endian f32; its index is
in OUT.json under "weights").

Tokens: for a varied text set, the ids of transformers' tokenizer loaded from the GGUF
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, add_special_tokens=False) are recorded
as "transformers_ids". transformers' GGUF conversion drops SmolLM2's digit pre-tokenizer: it
uses only the GPT-2 ByteLevel regex, whereas SmolLM2's own tokenizer.json (on the Hugging Face
hub) and llama.cpp's `smollm` pre-type split every digit first (`Digits(individual_digits=True)`,
then ByteLevel). The two differ on whitespace runs before digits ("a  1"). So "ids", the
reference the test compares against, come from the same transformers tokenizer with its
pre-tokenizer set to SmolLM2's true one; "transformers_agrees" records where they coincide.

Weights: a few tensors as gguf-py dequantises them, with Q/K rows un-permuted (the inverse of
convert_hf_to_gguf.py's LlamaModel.permute). With --cross-check, these are also compared with
transformers' own GGUF loading (AutoModelForCausalLM.from_pretrained(..., gguf_file=...)).
"""

import json
import sys
from pathlib import Path

import numpy as np
import gguf
import transformers
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoTokenizer

from fixturelib import unpermute

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces",
    "trailing spaces   ",
    "many     spaces between",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\nline four\r\nwindows",
    "\n\n\n",
    " ",
    "a  1",
    "year 2024\n  42",
    "3.14159 2.71828 1234567890 0x1F 1e-10 -42",
    "phone: +1 (555) 123-4567, total   $1,000,000.00",
    "x²+y³=z¼ ½ ٣ ៣",
    "Café naïve résumé coöperate Ångström façade",
    "日本語のテキストと中文文本，还有한국어",
    "emoji 🤗🚀👍🏽 and 👨‍👩‍👧",
    "Ελληνικά и русский текст",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>after end",
    "don't won't it's I'm you're they've we'll he'd",
    "URL: https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct?x=1&y=2",
    "",
]

WEIGHTS = [  # (GGUF name, HF name, rows to keep or None for all)
    ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", None),
    ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", None),
    ("blk.7.attn_k.weight", "model.layers.7.self_attn.k_proj.weight", None),
    ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", None),
    ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight", None),
    ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight", None),
    ("output_norm.weight", "model.norm.weight", None),
    ("token_embd.weight", "model.embed_tokens.weight", 64),
]


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        sys.exit(__doc__)
    gguf_path, out = Path(args[0]), Path(args[1])
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    true_tok = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    true_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    cases = []
    for text in TEXTS:
        t_ids = tok(text, add_special_tokens=False)["input_ids"]
        ids = true_tok.encode(text, add_special_tokens=False).ids
        cases.append({"text": text, "ids": ids, "transformers_ids": t_ids, "transformers_agrees": ids == t_ids})

    reader = gguf.GGUFReader(str(gguf_path))
    field = lambda k: reader.fields[k].contents()
    n_head, n_kv = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    tensors = {t.name: t for t in reader.tensors}
    index, blobs, offset, values = {}, [], 0, {}
    for name, hf, rows in WEIGHTS:
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype("<f4")
        if ".attn_q." in name:
            w = unpermute(w, n_head)
        elif ".attn_k." in name:
            w = unpermute(w, n_kv)
        values[hf] = w
        if rows is not None:
            w = w[:rows]
        index[hf] = {"shape": list(values[hf].shape), "rows": w.shape[0], "offset": offset}
        offset += w.size
        blobs.append(np.ascontiguousarray(w).tobytes())
    weights_file = out.with_name(out.stem + ".weights.f32")
    weights_file.write_bytes(b"".join(blobs))

    if "--cross-check" in sys.argv:
        # transformers' own GGUF tensor loading (dequantise + reverse permute); a randomly
        # initialised model only supplies the tensor-name mapping (no accelerate needed).
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_config(config)
        sd = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
        sd = {k: (v if hasattr(v, "float") else __import__("torch").from_numpy(np.asarray(v))) for k, v in sd.items()}
        for hf, w in values.items():
            assert np.array_equal(sd[hf].float().numpy(), w), f"{hf} differs from transformers"
        print("weights agree with transformers' GGUF loading")

    out.write_text(json.dumps({
        "gguf": gguf_path.name,
        "transformers_version": transformers.__version__,
        "gguf_py_version": getattr(gguf, "__version__", "?"),
        "note": __doc__.split("\n\n")[2],
        "cases": cases,
        "weights_file": weights_file.name,
        "weights": index,
    }, ensure_ascii=False, indent=1) + "\n")
    n_diff = sum(not c["transformers_agrees"] for c in cases)
    print(f"wrote {out} ({len(cases)} texts, transformers' GGUF tokenizer differs on {n_diff}) and {weights_file}")


if __name__ == "__main__":
    main()
