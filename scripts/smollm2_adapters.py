#!/usr/bin/env python3
"""LoRA adapters for the real SmolLM2-135M-Instruct and PEFT's outputs with them (issue 3).

Usage:  .venv/bin/python scripts/smollm2_adapters.py MODEL_DIR OUT_DIR [--force]

MODEL_DIR is the model directory peftrt loads (`make models`: `peftrt import` of the GGUF, float32),
loaded here by transformers in float32. Two adapters with seeded random non-zero lora_A and lora_B
(~ LORA_STD * N(0, 1), as scripts/make_adapter_fixtures.py does for the tiny fixtures) are saved by
PEFT's `save_pretrained` (safetensors) to

  OUT_DIR/adapters/qkvo-r16        r=16, lora_alpha=32, q/k/v/o_proj          (scale 32/16 = 2)
  OUT_DIR/adapters/all-linear-r16  r=16, lora_alpha=16, all-linear, rsLoRA    (scale 16/√16 = 4)

They are also the adapters `scripts/bench.py --adapters` times. For two prompts (`text`: plain
English, `chat`: a chat-templated user message with the generation prompt; tokenised by MODEL_DIR's
tokenizer, no BOS added), OUT_DIR/smollm2_adapters.safetensors holds, from PEFT reloading the saved
adapters:

  tokens_<case>            I32 [n]          the prompt's ids
  logits_<adapter>_<case>  F32 [n, 49152]   logits at every position, one pass, use_cache=False
  greedy_<adapter>_<case>  I32 [16]         16 greedily generated tokens (eos does not stop)

with <adapter> = qkvo_r16, all_linear_r16, or two (qkvo-r16 at scale 1.0 and all-linear-r16 at
0.5, both active: LoraLayer.set_scale, as make_adapter_fixtures.py). Header metadata:
`prompt_<case>`, `chat_prompt` (rendered) and `chat_messages` (JSON),
`max_abs_delta_<adapter>_<case>` (largest change of a logit against the base model),
`greedy_margin_<adapter>_<case>` (smallest top-1 minus top-2 logit over the greedy steps), the
adapter and scale lists of `two`, `lora_init`, `model_sha256`, `generator`.

Idempotent: skipped when the outputs exist and OUT_DIR/smollm2_adapters.stamp matches the sha256
of the model's files and of this script (any edit here regenerates). Deterministic: fixed seeds,
one CPU thread; two runs give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from fixturelib import sha256_file  # standard library only

os.environ.setdefault("TQDM_DISABLE", "1")

# Bump when the adapters, prompts or outputs change, so existing outputs are regenerated.
VERSION = "1"
OUT_NAME = "smollm2_adapters.safetensors"
STAMP_NAME = "smollm2_adapters.stamp"
MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
N_GREEDY = 16
ALL_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

# name -> (seed, LoraConfig kwargs). Seeds chosen (from 310..339) so that no greedy step is near a
# tie: the smallest top-1 minus top-2 logit over every adapter x prompt is 0.12, three times the
# 1e-3 * max|logit| tolerance (~0.04), so greedy tokens can be compared exactly.
ADAPTERS: dict[str, tuple[int, dict]] = {
    "qkvo-r16": (311, dict(r=16, lora_alpha=32, target_modules=ALL_ATTN)),
    "all-linear-r16": (317, dict(r=16, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
}
TWO = [("qkvo-r16", 1.0), ("all-linear-r16", 0.5)]
# Std of the random lora_A / lora_B entries: large enough that every adapter moves the logits by
# a few units (well above the 1e-3 * max|logit| tolerance), small enough that the model still
# writes sensible text. Each ΔW entry has std scale * sqrt(r) * LORA_STD².
LORA_STD = 0.02

PROMPTS = {"text": "Once upon a time, in a small village by the sea, there lived an old fisherman who"}
CHAT = [{"role": "user", "content": "Give me three tips for staying focused while studying."}]


def key(name: str) -> str:
    return name.replace("-", "_")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = ap.parse_args()

    t0 = time.time()
    model_dir, out_dir = args.model_dir, args.out_dir
    out, stamp_path, adapters_dir = out_dir / OUT_NAME, out_dir / STAMP_NAME, out_dir / "adapters"
    hashes = {f: sha256_file(model_dir / f) for f in MODEL_FILES}
    stamp = "".join(f"{f}_sha256={h}\n" for f, h in hashes.items())
    stamp += f"version={VERSION}\nscript_sha256={sha256_file(Path(__file__))}\n"
    done = out.exists() and all((adapters_dir / n / "adapter_model.safetensors").exists() for n in ADAPTERS)
    if not args.force and done and stamp_path.exists() and stamp_path.read_text() == stamp:
        print(f"{out} and {adapters_dir} are up to date")
        return 0
    stamp_path.unlink(missing_ok=True)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    # Importing make_fixtures sets one CPU thread, deterministic algorithms and quiet logging.
    from make_fixtures import check_reference_file, forward_logits, save_safetensors, write_json
    from make_adapter_fixtures import lora_layers, randomise

    import peft
    import torch
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    def load_base():
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        return m.eval()

    def save_adapter(model, path: Path) -> None:
        # A name, not this machine's path; save_embedding_layers=False: "auto" looks the base up online.
        model.peft_config["default"].base_model_name_or_path = model_dir.resolve().name
        model.save_pretrained(path, safe_serialization=True, save_embedding_layers=False)
        (path / "README.md").unlink(missing_ok=True)  # PEFT's generated model card
        cfg = json.loads((path / "adapter_config.json").read_text())
        if isinstance(cfg.get("target_modules"), list):  # a set in PEFT: order depends on the hash seed
            cfg["target_modules"] = sorted(cfg["target_modules"])
        write_json(path / "adapter_config.json", cfg)
        st = path / "adapter_model.safetensors"
        with safe_open(str(st), framework="pt") as f:
            meta = f.metadata() or {}
        save_safetensors(load_file(str(st)), st, meta)  # sorted header: byte-identical reruns

    def greedy(model, ids: list[int]) -> tuple[list[int], float]:
        gc = GenerationConfig(do_sample=False, max_new_tokens=N_GREEDY, min_new_tokens=0, eos_token_id=None,
                              pad_token_id=model.config.pad_token_id, bos_token_id=model.config.bos_token_id)
        x = torch.tensor([ids])
        with torch.no_grad():
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc,
                                 return_dict_in_generate=True, output_logits=True)
        toks = gen.sequences[0, len(ids):].tolist()
        assert len(toks) == N_GREEDY, toks
        margin = min(float(t[0] - t[1]) for t in (torch.topk(s[0].float(), 2).values for s in gen.logits))
        return toks, margin

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = dict(PROMPTS)
    prompts["chat"] = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = {"chat_prompt": prompts["chat"], "chat_messages": json.dumps(CHAT, ensure_ascii=False)}
    ids = {}
    for case, text in prompts.items():
        ids[case] = tok(text, add_special_tokens=False)["input_ids"]
        assert 0 < len(ids[case]) <= 64, (case, len(ids[case]))
        tensors[f"tokens_{case}"] = torch.tensor(ids[case], dtype=torch.int32)
        meta[f"prompt_{case}"] = text

    base = load_base()
    base_logits = {case: forward_logits(base, x) for case, x in ids.items()}
    summary = {}

    def record(name: str, model) -> None:
        for case, x in ids.items():
            logits = forward_logits(model, x)
            toks, margin = greedy(model, x)
            assert toks[0] == int(torch.argmax(logits[-1])), (name, case)
            delta = float((logits - base_logits[case]).abs().max())
            top = float(logits.abs().max())
            assert delta > 2e-2 * top, (name, case, delta, top)  # far above the 1e-3 tolerance
            k = f"{key(name)}_{case}"
            tensors[f"logits_{k}"] = logits
            tensors[f"greedy_{k}"] = torch.tensor(toks, dtype=torch.int32)
            meta[f"max_abs_delta_{k}"] = f"{delta:.4g}"
            meta[f"greedy_margin_{k}"] = f"{margin:.4g}"
            summary[k] = {"max_abs_delta": round(delta, 3), "max_abs_logit": round(top, 3),
                          "greedy_margin": round(margin, 4), "continuation": tok.decode(toks)}

    if adapters_dir.exists():
        shutil.rmtree(adapters_dir)  # start clean: no stale files survive
    for name, (seed, kw) in ADAPTERS.items():
        cfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **kw)
        model = get_peft_model(load_base(), cfg).eval()
        randomise(model, seed, LORA_STD)
        for _, layer in lora_layers(model):
            s = kw["lora_alpha"] / (math.sqrt(kw["r"]) if kw.get("use_rslora") else kw["r"])
            assert layer.scaling["default"] == s, (name, layer.scaling)
        live = forward_logits(model, ids["text"])
        save_adapter(model, adapters_dir / name)
        # The reference comes from the adapter as saved, reloaded by PEFT.
        reloaded = PeftModel.from_pretrained(load_base(), adapters_dir / name).eval()
        assert torch.equal(forward_logits(reloaded, ids["text"]), live), name
        meta[f"n_lora_layers_{key(name)}"] = str(len(lora_layers(reloaded)))
        record(name, reloaded)

    # Both adapters active at once, with scales (as make_adapter_fixtures.py's two-adapter case).
    (n1, s1), (n2, s2) = TWO
    model = PeftModel.from_pretrained(load_base(), adapters_dir / n1, adapter_name=n1)
    model.load_adapter(adapters_dir / n2, adapter_name=n2)
    model.base_model.set_adapter([n1, n2])
    model.eval()
    for _, layer in lora_layers(model):
        for n, s in TWO:
            layer.set_scale(n, s)  # scaling = s*alpha/r (s*alpha/sqrt(r) with rslora)
    for _, layer in lora_layers(model):
        assert layer.scaling[n2] == s2 * 16 / math.sqrt(16), layer.scaling
        if n1 in layer.scaling:
            assert layer.scaling[n1] == s1 * 32 / 16, layer.scaling
    record("two", model)
    meta["two_adapters"] = ",".join(n for n, _ in TWO)
    meta["two_scales"] = ",".join(str(s) for _, s in TWO)
    meta["two_scale_method"] = ("LoraLayer.set_scale(adapter, s) on every LoRA layer: scaling = s*alpha/r "
                                "(s*alpha/sqrt(r) with use_rslora); outputs of active adapters are summed")
    meta["lora_init"] = f"lora_A, lora_B ~ {LORA_STD}*N(0,1), seeds " + ", ".join(
        f"{n}: {seed}" for n, (seed, _) in ADAPTERS.items())
    meta["model_sha256"] = hashes["model.safetensors"]
    meta["generator"] = (f"scripts/smollm2_adapters.py v{VERSION} (peft {peft.__version__}, transformers "
                         f"{transformers.__version__}, torch {torch.__version__.split('+')[0]})")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, out, meta)
    check_reference_file(out, tensors, meta)
    stamp_path.write_text(stamp)
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    print(f"wrote {adapters_dir} and {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
