#!/usr/bin/env python3
"""The Python side of scripts/device_check.sh (issue #24): PEFT on the same device as the trainer.

  device_compare.py metrics TRAINER.jsonl PEFT.jsonl --tol REL [--first-loss-only] [--json OUT]
      per-step loss, grad_norm and lr of the trainer's metrics against the exported job's
      (train_trl.py), max relative difference per key; exit 1 above --tol.
  device_compare.py forward --job JOBDIR --base DIR --adapter DIR --data FILE --device D
                    --trainer-json EVAL.json --tol REL [--qlora] [--json OUT]
      PEFT's mean cross-entropy over the response tokens of FILE (tokenised by the exported
      train_trl.py, which tokenises as the trainer does), bf16 base on CUDA / f32 on a CPU,
      against `trainer eval`'s loss on the same device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def cmd_metrics(a) -> int:
    load = lambda p: [json.loads(l) for l in Path(p).read_text().splitlines() if l.strip()]
    ours, theirs = load(a.trainer), load(a.peft)
    if len(ours) != len(theirs):
        print(f"steps: trainer {len(ours)}, PEFT {len(theirs)}")
        return 1
    worst = {}
    for x, y in zip(ours, theirs):
        for k in ("loss", "grad_norm", "lr"):
            if a.first_loss_only and (k != "loss" or x["step"] != 1):
                continue
            if x.get(k) is None or y.get(k) is None:
                continue
            r = rel(x[k], y[k]) if abs(y[k]) > 1e-12 else abs(x[k] - y[k])
            worst[k] = max(worst.get(k, 0.0), r)
            print(f"step {x['step']}: {k} trainer {x[k]:.7g} PEFT {y[k]:.7g} rel {r:.2e}")
    ok = all(v <= a.tol for v in worst.values())
    result = {"steps": len(ours), "max_rel": worst, "tol": a.tol, "ok": ok}
    print(json.dumps(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


def cmd_forward(a) -> int:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(a.job)))
    import train_trl  # the trainer's tokenisation

    job = json.loads((Path(a.job) / "job.json").read_text())
    cuda = a.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    kw = {"dtype": dtype}
    if a.qlora:
        from transformers import BitsAndBytesConfig
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
        kw["device_map"] = {"": 0 if cuda else "cpu"}
    tok = AutoTokenizer.from_pretrained(a.base)
    model = AutoModelForCausalLM.from_pretrained(a.base, **kw)
    if not a.qlora:
        model = model.to(a.device)
    if a.adapter:
        model = PeftModel.from_pretrained(model, a.adapter)
    model.eval()
    data = train_trl.load_data(a.data, None, tok, job["eos_id"], job["max_seq_len"])
    total, n = 0.0, 0
    with torch.no_grad():
        for ids, trained in data["examples"]:
            labels = train_trl.labels_of(ids, trained)
            x = torch.tensor([ids], device=a.device)
            logits = model(input_ids=x).logits.float()[0, :-1]
            y = torch.tensor(labels[1:], device=a.device)
            total += torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum").item()
            n += int((y != -100).sum())
    peft_loss = total / n
    trainer_loss = json.loads(Path(a.trainer_json).read_text())["loss"]
    r = rel(trainer_loss, peft_loss)
    result = {"trainer_loss": trainer_loss, "peft_loss": peft_loss, "rel": r, "tol": a.tol, "ok": r <= a.tol,
              "response_tokens": n}
    if cuda:
        result["peft_peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("metrics")
    m.add_argument("trainer")
    m.add_argument("peft")
    m.add_argument("--tol", type=float, required=True)
    m.add_argument("--first-loss-only", action="store_true",
                   help="fresh adapters (another random lora_A): compare the first step's loss only")
    m.add_argument("--json")
    f = sub.add_parser("forward")
    for k in ("--job", "--base", "--data", "--device", "--trainer-json"):
        f.add_argument(k, required=True)
    f.add_argument("--adapter")
    f.add_argument("--qlora", action="store_true")
    f.add_argument("--tol", type=float, required=True)
    f.add_argument("--json")
    a = ap.parse_args()
    return cmd_metrics(a) if a.cmd == "metrics" else cmd_forward(a)


if __name__ == "__main__":
    sys.exit(main())
