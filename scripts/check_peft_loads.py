#!/usr/bin/env python3
"""Check that PEFT loads an adapter the trainer wrote and computes the trainer's logits.

Usage: check_peft_loads.py BASE_DIR ADAPTER_DIR LOGITS_FILE

LOGITS_FILE is a safetensors file with `tokens` (I32 [n]) and `logits` (F32 [n, vocab]): the
trainer's logits for those tokens with the adapter. The base is loaded with transformers
(float32, eager attention), the adapter with `PeftModel.from_pretrained`; exit status 0 when
max |Δlogit| <= 1e-4 * max |logit|. Run by trainer/tests/conformance.rs (PEFTRT_PYTHON).
"""

import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)


def main() -> int:
    base_dir, adapter_dir, logits_file = sys.argv[1:4]
    ref = load_file(logits_file)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                attn_implementation="eager")
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    n_lora = sum(1 for n, _ in model.named_parameters() if ".lora_A." in n)
    with torch.no_grad():
        logits = model(input_ids=ref["tokens"].long()[None]).logits[0]
    want = ref["logits"]
    d = float((logits - want).abs().max())
    m = float(want.abs().max())
    print(f"PEFT ({n_lora} LoRA layers) vs trainer: max |Δ| = {d:.3e}, max |logit| = {m:.3f}")
    return 0 if d <= 1e-4 * m else 1


if __name__ == "__main__":
    sys.exit(main())
