#!/usr/bin/env python3
"""Reference outputs of the real SmolLM2-135M-Instruct (GGUF) computed by Hugging Face transformers.

Usage:  .venv/bin/python scripts/smollm2_reference.py GGUF OUT_DIR [--threads N] [--force]

Loads the GGUF with transformers' GGUF loader (dequantised to float32) and, for three prompts
(`text`: plain English, `code`: a Python snippet, `chat`: a chat-templated user message with the
generation prompt), writes OUT_DIR/smollm2_reference.safetensors:

  tokens_<name>  I32 [n]         the prompt's ids from transformers' tokenizer (no BOS added)
  logits_<name>  F32 [n, 49152]  logits at every position, one forward pass, use_cache=False
  greedy_<name>  I32 [32]        32 greedily generated tokens (eos does not stop generation)
  tokens_ppl     I32 [n]         data/public-domain.txt's ids (no BOS), scored for `perplexity`

Header metadata: `chat_prompt` (the rendered chat prompt), `prompt_<name>` (each prompt string),
`greedy_margin_<name>` (smallest top-1 minus top-2 logit over the greedy steps),
`eos_in_greedy_<name>` (ids of eos/special tokens among the generated ones, "" when none),
`perplexity` (of `tokens_ppl` with `peftrt perplexity`'s recipe, windows of 512 every 256,
scripts/perplexity_transformers.py), `gguf_sha256`, `generator`.

Idempotent: skipped when OUT_DIR already has the output and its stamp
(OUT_DIR/smollm2_reference.stamp) matches the GGUF's sha256 and this script's reference version.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import os
import warnings
from pathlib import Path

from fixturelib import sha256_file  # standard library only

os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's de-quantisation progress bar

# Bump when the prompts or the outputs change, so existing outputs are regenerated.
REFERENCE_VERSION = "2"
OUT_NAME = "smollm2_reference.safetensors"
STAMP_NAME = "smollm2_reference.stamp"
N_GREEDY = 32
PPL_WINDOW, PPL_STRIDE = 512, 256

# Chosen so that greedy decoding is never near a tie (smallest top-1 minus top-2 logit gap over the
# 32 steps: text 0.15, code 0.08, chat 0.51, all above the 1e-3 * max|logit| tolerance of ~0.04),
# eos never comes, and there are no multi-digit numbers (transformers' tokenizer built from the GGUF
# has a plain ByteLevel pre-tokenizer, without the Digits(individual_digits) step of SmolLM2's
# tokenizer.json; SmolLM2's vocabulary has no multi-digit tokens so ids rarely differ, but the
# prompts stay clear of it).
PROMPTS = {
    "text": "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "code": "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
}
CHAT = [{"role": "user", "content": "Explain what a neural network is in simple terms."}]


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """The fixtures' deterministic safetensors writer (imported late: torch only when needed)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_fixtures import save_safetensors as save

    save(tensors, path, metadata)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = ap.parse_args()

    t0 = time.time()
    gguf = args.gguf.resolve()
    out_dir = args.out_dir
    out, stamp_path = out_dir / OUT_NAME, out_dir / STAMP_NAME
    stamp = f"gguf_sha256={sha256_file(gguf)}\nreference_version={REFERENCE_VERSION}\n"
    if not args.force and out.exists() and stamp_path.exists() and stamp_path.read_text() == stamp:
        print(f"{out} is up to date")
        return 0

    import torch

    torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    t_load = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    t_load = time.time() - t_load
    vocab = model.config.vocab_size

    prompts = dict(PROMPTS)
    prompts["chat"] = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    stop_ids = {i for i in [model.config.eos_token_id, model.generation_config.eos_token_id,
                            tok.eos_token_id] if i is not None}
    stop_ids |= set(tok.all_special_ids)

    tensors, meta = {}, {"chat_prompt": prompts["chat"]}
    t_fwd = time.time()
    for name, text in prompts.items():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if name == "chat":
            via = tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
            via = via["input_ids"] if hasattr(via, "keys") else via
            assert list(via) == ids, (via, ids)
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x, use_cache=False).logits[0].float().contiguous()
            gc = GenerationConfig(do_sample=False, max_new_tokens=N_GREEDY, min_new_tokens=0,
                                  eos_token_id=None, pad_token_id=tok.pad_token_id or 0)
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                 generation_config=gc, return_dict_in_generate=True,
                                 output_logits=True)
        greedy = gen.sequences[0, len(ids):].tolist()
        assert len(greedy) == N_GREEDY, greedy
        # The first generated token must be the argmax of the single-pass logits.
        assert greedy[0] == int(torch.argmax(logits[-1])), (greedy[0], int(torch.argmax(logits[-1])))
        margin = min(float(t[0] - t[1]) for t in (torch.topk(s[0].float(), 2).values
                                                  for s in gen.logits))
        eos_hits = [i for i in greedy if i in stop_ids]
        assert logits.shape == (len(ids), vocab)
        tensors[f"tokens_{name}"] = torch.tensor(ids, dtype=torch.int32)
        tensors[f"logits_{name}"] = logits
        tensors[f"greedy_{name}"] = torch.tensor(greedy, dtype=torch.int32)
        meta[f"prompt_{name}"] = text
        meta[f"greedy_margin_{name}"] = f"{margin:.4g}"
        meta[f"eos_in_greedy_{name}"] = ",".join(map(str, eos_hits))
        print(f"{name}: {len(ids)} tokens, max|logit| {float(logits.abs().max()):.2f}, "
              f"greedy margin {margin:.3g}, eos/special in greedy: {eos_hits or 'none'}\n"
              f"  continuation: {tok.decode(greedy)!r}")
    # Perplexity with peftrt's recipe (runtime/src/perplexity.rs), on the ids transformers gives.
    from perplexity_transformers import perplexity

    text = (Path(__file__).resolve().parent.parent / "data" / "public-domain.txt").read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ppl, scored, _ = perplexity(model, ids, PPL_WINDOW, PPL_STRIDE)
    tensors["tokens_ppl"] = torch.tensor(ids, dtype=torch.int32)
    meta["perplexity"] = repr(ppl)
    print(f"perplexity {ppl:.6f} over {scored} tokens (windows of {PPL_WINDOW} every {PPL_STRIDE})")
    t_fwd = time.time() - t_fwd

    meta["gguf_sha256"] = stamp.split("\n")[0].split("=")[1]
    meta["generator"] = (f"scripts/smollm2_reference.py v{REFERENCE_VERSION} (transformers "
                         f"{transformers.__version__}, torch {torch.__version__.split('+')[0]})")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, out, meta)
    stamp_path.write_text(stamp)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): load {t_load:.1f} s, "
          f"forward+generate {t_fwd:.1f} s, total {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
