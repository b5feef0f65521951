#!/usr/bin/env python3
"""Generate the trainer conformance fixtures in tests/fixtures/trainer/.

For each case of tests/fixtures/trainer/cases.json: an initial PEFT adapter on a tiny base
fixture (random non-zero lora_A / lora_B, so every LoRA weight has a gradient from the first
step), then 5 optimiser steps of transformers + peft training with torch.optim.AdamW, the
transformers cosine warm-up schedule and clip_grad_norm_, on fixed batches of the case's JSONL
file, tokenised exactly as the trainer tokenises it. Written per case:

  <case>/init/      the initial adapter (PEFT save_pretrained; the trainer's --init-adapter)
  <case>/final/     the adapter after the last step (PEFT save_pretrained)
  <case>/reference.safetensors
      ids_<k>, trained_<k>   I32: token ids and response mask of example k (file order)
      metadata: losses, lrs, grad_norms (JSON lists, one per step), generator

Batches: examples in file order (no shuffling), `batch_size` per micro-batch, `grad_accum`
micro-batches per step, cycling through the file (micro-batch m is batch m % per_epoch of the
file); right-padded with the EOS id; position t predicts token t+1 when that token is a response
token. A step's loss is the sum of token cross-entropies over its micro-batches divided by their
number of response tokens (transformers' Trainer with num_items_in_batch); gradients
accumulate over the micro-batches.

Tokenisation (the trainer's, tests/fixtures/trainer/README.md): chat records are rendered with
the tokenizer's chat template; for every assistant turn, the render of the conversation before
it with add_generation_prompt=True is prompt and the rest of the render up to and including it
is response; alpaca records are the chat [user: instruction (+ "\\n\\n" + input), assistant:
output]. Each piece is encoded on its own by tokenizers (no special tokens added), then
concatenated; examples longer than max_seq_len are cut.

Usage (from the repository root):  .venv/bin/python scripts/make_trainer_fixtures.py [--check]

Deterministic (fixed seeds, one CPU thread, float32, eager attention) with the pinned versions.
`--check` regenerates into a temporary directory and compares byte for byte.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixturelib import check_regeneration  # noqa: E402
# Importing make_fixtures (through make_adapter_fixtures) sets one CPU thread and deterministic
# algorithms.
from make_adapter_fixtures import load_base, randomise, save_adapter  # noqa: E402
from make_fixtures import DEFAULT_OUT as FIXTURES, save_safetensors  # noqa: E402

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoTokenizer, get_cosine_schedule_with_warmup  # noqa: E402

DEFAULT_OUT = FIXTURES / "trainer"
IGNORE = -100
LORA_STD = 0.1  # std of the initial adapter's random lora_A / lora_B entries


def chat_segments(tok, messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, trained) pieces of a conversation: each assistant turn is trained on."""
    def render(ms, gen):
        return tok.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    out, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], True), render(messages[: i + 1], False)
        assert upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= done
        out += [(full[done:len(prompt)], False), (full[len(prompt):len(upto)], True)]
        done = len(upto)
    assert out, "no assistant message"
    if done < len(full):
        out.append((full[done:], False))
    return out


def encode_file(base_dir: Path, data: Path, max_seq_len: int) -> list[tuple[list[int], list[bool]]]:
    tok = AutoTokenizer.from_pretrained(base_dir)  # for the chat template only
    bpe = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    examples = []
    for line in data.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "messages" in rec:
            segs = chat_segments(tok, rec["messages"])
        else:
            user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
            segs = chat_segments(tok, [{"role": "user", "content": user},
                                       {"role": "assistant", "content": rec["output"]}])
        ids, trained = [], []
        for text, t in segs:
            if not text:
                continue
            e = bpe.encode(text, add_special_tokens=False).ids
            ids += e
            trained += [t] * len(e)
        examples.append((ids[:max_seq_len], trained[:max_seq_len]))
    return examples


def make_batch(examples, pad: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    n = max(len(ids) for ids, _ in examples)
    ids_rows, label_rows = [], []
    for ids, trained in examples:
        ids_rows.append(ids + [pad] * (n - len(ids)))
        label_rows.append([ids[t + 1] if t + 1 < len(ids) and trained[t + 1] else IGNORE
                           for t in range(n)])
    labels = torch.tensor(label_rows)
    return torch.tensor(ids_rows), labels, int((labels != IGNORE).sum())


def run_case(name: str, case: dict, train: dict, out: Path) -> dict:
    base_dir = FIXTURES / case["base"]
    examples = encode_file(base_dir, DEFAULT_OUT / case["data"], train["max_seq_len"])
    assert any(len(ids) == train["max_seq_len"] for ids, _ in examples), "no example is truncated"
    pad = json.loads((base_dir / "config.json").read_text())["eos_token_id"]

    cfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **case["lora"])
    model = get_peft_model(load_base(case["base"]), cfg)
    randomise(model, case["seed"], LORA_STD)
    save_adapter(model, case["base"], out / "init")
    model.train()
    params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
    assert params and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=train["lr"], betas=tuple(train["betas"]), eps=train["eps"],
                            weight_decay=train["weight_decay"])
    assert train["schedule"] == "cosine"
    sched = get_cosine_schedule_with_warmup(opt, train["warmup_steps"], train["steps"])

    bs, accum = train["batch_size"], train["grad_accum"]
    per_epoch = -(-len(examples) // bs)
    losses, lrs, norms = [], [], []
    for step in range(train["steps"]):
        batches = []
        for k in range(accum):
            within = (step * accum + k) % per_epoch
            batches.append(make_batch(examples[within * bs:(within + 1) * bs], pad))
        n_targets = sum(b[2] for b in batches)
        total = 0.0
        for ids, labels, _ in batches:
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                reduction="sum") / n_targets
            loss.backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, train["max_grad_norm"])))
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total)
    save_adapter(model, case["base"], out / "final")

    tensors = {}
    for k, (ids, trained) in enumerate(examples):
        tensors[f"ids_{k}"] = torch.tensor(ids, dtype=torch.int32)
        tensors[f"trained_{k}"] = torch.tensor(trained, dtype=torch.int32)
    metadata = {
        "losses": json.dumps(losses), "lrs": json.dumps(lrs), "grad_norms": json.dumps(norms),
        "generator": (f"scripts/make_trainer_fixtures.py (peft {peft.__version__}, transformers "
                      f"{transformers.__version__}, torch {torch.__version__.split('+')[0]})"),
    }
    save_safetensors(tensors, out / "reference.safetensors", metadata)
    return {"losses": losses, "lrs": lrs, "grad_norms": norms}


def make_all(out_root: Path) -> dict:
    spec = json.loads((DEFAULT_OUT / "cases.json").read_text())
    summary = {}
    for name, case in spec["cases"].items():
        out = out_root / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        summary[name] = run_case(name, case, spec["train"], out)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare")
    args = ap.parse_args()
    if not args.check:
        print(json.dumps(make_all(DEFAULT_OUT), indent=1))
        return 0
    cases = json.loads((DEFAULT_OUT / "cases.json").read_text())["cases"]
    return check_regeneration("trainer fixtures", DEFAULT_OUT, make_all, within=lambda _: cases, stale=True)


if __name__ == "__main__":
    sys.exit(main())
