#!/usr/bin/env python3
"""A peftrt `trainer train` job on TRL + PEFT, for training past one GPU.

Written by `trainer export --to trl OUT/` beside `job.json` (the job: paths, LoRA configuration,
schedule, seed, provenance) and `accelerate` configurations. It trains the same adapter as the
trainer:

- the same tokens: the JSONL data (alpaca, chat or completion records) is tokenised here as the
  trainer tokenises it (trainer/src/data.rs): prompt and response rendered with the model's chat
  template and encoded separately, loss on response tokens only, EOS after plain text, examples
  cut to max_seq_len (and dropped when no response token is left); the records go to TRL's
  `SFTTrainer` already tokenised, with their labels;
- the same optimisation: `LoraConfig` (r, alpha, dropout, targets, rsLoRA, layers, init) or the
  initial adapter, `torch.optim.AdamW` with the trainer's betas/eps/weight decay, transformers'
  warm-up + cosine/linear/constant schedule, gradient clipping, the loss summed over a step's
  micro-batches and divided by their response tokens, the seed;
- the same output: a PEFT adapter directory whose `adapter_model.safetensors` (F32) carries the
  trainer's provenance in its header (`peftrt.base_model`, the fingerprint `peftrt` checks;
  `peftrt.dataset`; `peftrt.hyperparameters`; `peftrt.trainer`), `peftrt_provenance.json`
  and `training_metrics.jsonl` — served by `peftrt` as the trainer's own.

What differs from the trainer: the order of the examples when shuffling (PyTorch's sampler, seeded
with the job's seed, instead of the trainer's SplitMix64) and the random initial `lora_A` (PEFT's
Kaiming-uniform draw, same distribution). With `shuffle: false` and an initial adapter the two
runs see the same batches from the same weights, and their losses agree (trainer/tests/export.rs).

Run:
    python train_trl.py                                             # one process (GPU or CPU)
    accelerate launch --config_file accelerate_config.yaml train_trl.py          # DDP, all GPUs
    accelerate launch --config_file accelerate_deepspeed_zero3.yaml train_trl.py # ZeRO-3
Options override job.json: --base, --data, --output, --overwrite, --max-steps, --device;
--engine transformers runs the same job on transformers' Trainer without trl and datasets.
Needs torch, transformers, peft, trl, datasets and accelerate (scripts/requirements.txt of peftrt
pins versions that are tested together); bitsandbytes for QLoRA.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

IGNORE = -100
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
# Data: trainer/src/data.rs, line for line.

class DataError(ValueError):
    pass


def detect(record: dict) -> str | None:
    if "messages" in record:
        return "chat"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record or "completion" in record or "text" in record:
        return "completion"
    return None


def string_field(record: dict, key: str) -> str | None:
    v = record.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise DataError(f"field `{key}` must be a string")
    return v


def required(record: dict, key: str) -> str:
    v = string_field(record, key)
    if v is None:
        raise DataError(f"missing field `{key}`")
    return v


def nonempty(s: str, key: str) -> str:
    if not s:
        raise DataError(f"field `{key}` is empty: the example has no response tokens to train on")
    return s


def chat_segments(tok, messages: list[dict]) -> list[tuple[str, bool, bool]]:
    """(text, trained, add_special) pieces of a conversation: every assistant turn is trained on."""
    def render(ms, gen):
        return tok.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    out, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= done):
            raise DataError(f"the chat template does not render messages[{i}] as a continuation of the "
                            "conversation before it; cannot tell prompt from response")
        out += [(full[done:len(prompt)], False, False), (full[len(prompt):len(upto)], True, False)]
        done = len(upto)
    if not out:
        raise DataError("no assistant message: nothing to train on")
    if done < len(full):
        out.append((full[done:], False, False))
    return out


def segments(fmt: str, record: dict, tok) -> list[tuple[str, bool, bool]]:
    has_template = bool(getattr(tok, "chat_template", None))
    if fmt == "alpaca":
        instruction = required(record, "instruction")
        inp = string_field(record, "input") or ""
        output = nonempty(required(record, "output"), "output")
        if has_template:
            user = f"{instruction}\n\n{inp}" if inp else instruction
            return chat_segments(tok, [{"role": "user", "content": user},
                                       {"role": "assistant", "content": output}])
        prompt = f"### Instruction:\n{instruction}\n\n"
        if inp:
            prompt += f"### Input:\n{inp}\n\n"
        prompt += "### Response:\n"
        return [(prompt, False, True), (output, True, False)]
    if fmt == "chat":
        msgs = record.get("messages")
        if not isinstance(msgs, list):
            raise DataError("field `messages` must be an array")
        messages = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise DataError(f"messages[{i}] must be an object with `role` and `content`")
            role, content = required(m, "role"), required(m, "content")
            if role == "assistant":
                nonempty(content, "content")
            messages.append({"role": role, "content": content})
        if not has_template:
            raise DataError("chat records need the base model's chat template, and this model has none")
        return chat_segments(tok, messages)
    text = string_field(record, "text")
    if text is not None:
        if "prompt" in record or "completion" in record:
            raise DataError("has both `text` and `prompt`/`completion`; use one form")
        return [(nonempty(text, "text"), True, True)]
    prompt = required(record, "prompt")
    completion = nonempty(required(record, "completion"), "completion")
    return [(prompt, False, True), (completion, True, False)]


def tokenize(segs, fmt: str, tok, eos_id: int | None) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    trained: list[bool] = []
    for text, tr, add_special in segs:
        if not text and not add_special:
            continue
        t = tok(text, add_special_tokens=add_special)["input_ids"]
        ids += t
        trained += [tr] * len(t)
    plain = fmt == "completion" or (fmt == "alpaca" and not getattr(tok, "chat_template", None))
    if plain and eos_id is not None:
        ids.append(eos_id)
        trained.append(True)
    return ids, trained


def n_targets(trained: list[bool]) -> int:
    return sum(trained[1:])


def load_data(path: str, fmt: str | None, tok, eos_id: int | None, max_len: int) -> dict:
    """Tokenised examples of a JSONL file: {"examples": [(ids, trained)], "format", "sha256",
    "truncated", "dropped"}."""
    raw = Path(path).read_bytes()
    examples, truncated, dropped = [], 0, 0
    for line_no, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise DataError("expected a JSON object, one per line")
            if fmt is None:
                fmt = detect(record)
                if fmt is None:
                    raise DataError("cannot tell the format from the fields; set `format` in job.json")
            ids, trained = tokenize(segments(fmt, record, tok), fmt, tok, eos_id)
            if n_targets(trained) == 0:
                raise DataError(f"no response token to predict [format {fmt}]")
        except (DataError, json.JSONDecodeError) as e:
            raise SystemExit(f"{path}:{line_no}: {e}")
        if len(ids) > max_len:
            ids, trained = ids[:max_len], trained[:max_len]
            truncated += 1
            if n_targets(trained) == 0:
                dropped += 1
                continue
        examples.append((ids, trained))
    if not examples:
        raise SystemExit(f"{path}: no examples to train on")
    return {"examples": examples, "format": fmt or "completion", "sha256": hashlib.sha256(raw).hexdigest(),
            "truncated": truncated, "dropped": dropped}


def labels_of(ids: list[int], trained: list[bool]) -> list[int]:
    """transformers' labels (the model shifts them): token t is a target when it is trained and
    not the first."""
    return [IGNORE if t == 0 or not trained[t] else ids[t] for t in range(len(ids))]


class SplitMix64:
    """trainer/src/data/order.rs: the trainer's --eval-split draws its held-out set with it."""
    GAMMA = 0x9E3779B97F4A7C15
    M = (1 << 64) - 1

    def __init__(self, seed: int):
        self.state = seed & self.M

    def next_u64(self) -> int:
        self.state = (self.state + self.GAMMA) & self.M
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.M
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        zone = self.M - self.M % n
        while True:
            x = self.next_u64()
            if x < zone:
                return x % n

    def shuffle(self, v: list) -> None:
        for i in range(len(v) - 1, 0, -1):
            j = self.below(i + 1)
            v[i], v[j] = v[j], v[i]


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    n = len(examples)
    k = max(1, math.floor(n * fraction + 0.5))
    if not 0 < fraction < 1 or k >= n:
        raise SystemExit(f"eval_split {fraction}: the data has {n} example(s), too few to hold out {k}")
    order = list(range(n))
    SplitMix64(seed ^ 0x5EEDE7A1).shuffle(order)
    held = set(order[:k])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


# ---------------------------------------------------------------------------------------------
# The run.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", default=str(HERE / "job.json"), help="the job (default: job.json beside this script)")
    p.add_argument("--base", help="base model directory (default: the job's)")
    p.add_argument("--data", help="training JSONL (default: the job's)")
    p.add_argument("--output", help="adapter directory to write (default: the job's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    p.add_argument("--device", help="auto | cpu | cuda (default: the job's)")
    p.add_argument("--stats", help="write the run's wall time, tokens and peak GPU memory here (JSON)")
    p.add_argument("--engine", choices=["trl", "transformers"], default="trl",
                   help="trl: TRL's SFTTrainer (default); transformers: transformers' Trainer alone, same job")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    job = json.loads(Path(args.job).read_text())
    for key in ("base", "data", "output", "device"):
        if getattr(args, key):
            job[key] = getattr(args, key)
    if args.overwrite:
        job["overwrite"] = True
    if args.max_steps is not None:
        job["max_steps"] = args.max_steps

    import torch
    import peft
    import transformers
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    if args.engine == "trl":
        import datasets
        import trl
        from trl import SFTConfig, SFTTrainer

    output = Path(job["output"])
    if output.exists() and not job["overwrite"]:
        raise SystemExit(f"{output}: already exists; choose another output or pass --overwrite")
    use_cuda = torch.cuda.is_available() and job["device"] != "cpu"
    if job["device"].startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"device {job['device']}: CUDA is not available here")
    transformers.set_seed(job["seed"])

    tok = AutoTokenizer.from_pretrained(job["base"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    fmt = None if job["format"] == "auto" else job["format"]
    data = load_data(job["data"], fmt, tok, job["eos_id"], job["max_seq_len"])
    train_ex, eval_ex = data["examples"], []
    if job["eval_data"]:
        eval_ex = load_data(job["eval_data"], data["format"], tok, job["eos_id"], job["max_seq_len"])["examples"]
    elif job["eval_split"]:
        train_ex, eval_ex = split_eval(train_ex, job["eval_split"], job["seed"])

    def as_dataset(examples):
        rows = {"input_ids": [ids for ids, _ in examples], "labels": [labels_of(ids, tr) for ids, tr in examples]}
        if args.engine == "trl":
            return datasets.Dataset.from_dict(rows)
        return [{"input_ids": i, "labels": l} for i, l in zip(rows["input_ids"], rows["labels"])]

    # The trainer's frozen base is bf16 on CUDA (LoRA, norms and logits f32), f32 on a CPU.
    dtype = torch.bfloat16 if use_cuda else torch.float32
    model_kwargs = {"dtype": dtype}
    if job["qlora"]:
        from transformers import BitsAndBytesConfig
        from accelerate import PartialState
        # NF4 with double-quantised absmax: the layout the trainer and peftrt use.
        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
        model_kwargs["device_map"] = {"": PartialState().process_index if use_cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(job["base"], **model_kwargs)

    lora = job["lora"]
    peft_config = None
    if job["init_adapter"]:
        cfg = LoraConfig.from_pretrained(job["init_adapter"])
        cfg.lora_dropout = lora["lora_dropout"]
        cfg.inference_mode = False
        model = PeftModel.from_pretrained(model, job["init_adapter"], config=cfg, is_trainable=True)
        # PEFT loads the adapter in the base's dtype: the trainer's LoRA weights are f32.
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        peft_config = LoraConfig(
            r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"],
            target_modules=lora["target_modules"], use_rslora=lora["use_rslora"],
            init_lora_weights=lora["init_lora_weights"], layers_to_transform=lora["layers_to_transform"],
            layers_pattern="layers" if lora["layers_to_transform"] is not None else None,
            rank_pattern=lora["rank_pattern"], alpha_pattern=lora["alpha_pattern"],
            bias="none", task_type="CAUSAL_LM")

    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[job["schedule"]]
    sampling = "group_by_length" if job["group_by_length"] else ("random" if job["shuffle"] else "sequential")
    n_micro = math.ceil(len(train_ex) / job["batch_size"])
    total = job["max_steps"] or max(1, math.ceil(job["epochs"] * n_micro / job["grad_accum"]))
    eval_every = job["eval_every"] or max(total // 10, 1)
    work = Path(job["checkpoint_dir"])
    common = dict(
        output_dir=str(work),
        per_device_train_batch_size=job["batch_size"],
        per_device_eval_batch_size=job["batch_size"],
        gradient_accumulation_steps=job["grad_accum"],
        num_train_epochs=job["epochs"],
        max_steps=job["max_steps"] or -1,
        learning_rate=job["lr"],
        warmup_steps=job["warmup_steps"],
        lr_scheduler_type=schedule,
        optim="adamw_torch",
        adam_beta1=job["betas"][0], adam_beta2=job["betas"][1], adam_epsilon=job["eps"],
        weight_decay=job["weight_decay"],
        max_grad_norm=job["max_grad_norm"] or 0.0,
        seed=job["seed"], data_seed=job["seed"],
        train_sampling_strategy=sampling,
        gradient_checkpointing=job["grad_checkpoint"],
        bf16=use_cuda,
        use_cpu=not use_cuda,
        logging_steps=1,
        logging_strategy="steps",
        eval_strategy="steps" if eval_ex else "no",
        eval_steps=eval_every,
        save_strategy="steps" if job["checkpoint_every"] else "no",
        save_steps=job["checkpoint_every"] or 500,
        save_total_limit=1,
        report_to="none",
        dataloader_drop_last=False,
        disable_tqdm=not sys.stderr.isatty(),
    )

    metrics: list[dict] = []

    class Metrics(TrainerCallback):
        """The trainer's metrics JSONL: one object per step (loss, lr, grad_norm, eval_loss)."""
        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" in logs:
                metrics.append({"step": state.global_step, "epoch": state.epoch, "loss": logs["loss"],
                                "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm")})
            if "eval_loss" in logs and metrics:
                metrics[-1]["eval_loss"] = logs["eval_loss"]

    train_ds, eval_ds = as_dataset(train_ex), (as_dataset(eval_ex) if eval_ex else None)
    if args.engine == "trl":
        config = SFTConfig(**common, max_length=job["max_seq_len"], packing=False)
        trainer = SFTTrainer(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tok, peft_config=peft_config, callbacks=[Metrics()])
        engine = f"trl {trl.__version__} + "
    else:
        # The same job on transformers' Trainer alone (no trl/datasets: e.g. a machine that has
        # only torch, transformers, peft and accelerate): the records are tokenised already, so
        # SFTTrainer would add nothing but its padding collator, written out here.
        if peft_config is not None:
            if job["qlora"]:
                model = peft.prepare_model_for_kbit_training(
                    model, use_gradient_checkpointing=job["grad_checkpoint"])
            model = peft.get_peft_model(model, peft_config)
        pad_id = tok.pad_token_id

        def collate(rows):
            n = max(len(r["input_ids"]) for r in rows)
            ids = [r["input_ids"] + [pad_id] * (n - len(r["input_ids"])) for r in rows]
            labels = [r["labels"] + [IGNORE] * (n - len(r["labels"])) for r in rows]
            mask = [[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in rows]
            return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}

        config = transformers.TrainingArguments(**common, remove_unused_columns=False)
        trainer = transformers.Trainer(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                                       data_collator=collate, callbacks=[Metrics()])
        engine = "transformers Trainer + "
    import time
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    if args.stats:
        # Unpadded tokens of the examples the steps took (whole epochs: every example once each).
        per_step = job["batch_size"] * job["grad_accum"]
        seen = trainer.state.global_step * per_step
        lens = [len(ids) for ids, _ in train_ex]
        tokens = sum(lens) * (seen // len(lens)) + sum(lens[: seen % len(lens)])
        stats = {"engine": args.engine, "steps": trainer.state.global_step, "train_s": train_s, "tokens": tokens,
                 "tokens_per_s": tokens / train_s,
                 "peak_gpu_bytes": torch.cuda.max_memory_allocated() if use_cuda else None}
        Path(args.stats).write_text(json.dumps(stats, indent=2) + "\n")

    # Save: PEFT's adapter (gathered under ZeRO-3 / FSDP by save_model), then the trainer's form.
    staging = Path(str(output) + ".trl-tmp")
    trainer.save_model(str(staging))
    if not trainer.accelerator.is_main_process:
        return
    write_adapter(job, data, len(train_ex), trainer.state.global_step, metrics, staging, output,
                  engine=f"{engine}peft {peft.__version__} (transformers {transformers.__version__}, "
                         f"torch {torch.__version__})")


def write_adapter(job, data, n_examples, steps, metrics, staging: Path, output: Path, engine: str) -> None:
    """`staging` (PEFT's save) → `output` with the trainer's files: F32 tensors with the
    provenance in the safetensors header, peftrt_provenance.json, training_metrics.jsonl."""
    from safetensors.torch import load_file, save_file

    tensors = {k: v.float().contiguous() for k, v in load_file(str(staging / "adapter_model.safetensors")).items()}
    prov = job["provenance"]
    hyper = dict(prov["hyperparameters"], steps=steps)
    dataset = {"sha256": data["sha256"], "file": Path(job["data"]).name, "version": job["dataset_version"],
               "format": data["format"], "examples": n_examples, "truncated": data["truncated"]}
    trainer_field = f"{engine}; job exported by {job['exported_by']}"
    metadata = {"format": "pt", "peftrt.base_model": prov["base_model"], "peftrt.dataset": json.dumps(dataset),
                "peftrt.hyperparameters": json.dumps(hyper), "peftrt.trainer": trainer_field}
    save_file(tensors, str(staging / "adapter_model.safetensors"), metadata=metadata)
    sidecar = {"base_model": json.loads(prov["base_model"]), "dataset": dataset, "hyperparameters": hyper,
               "trainer": trainer_field}
    (staging / "peftrt_provenance.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    lines = "".join(json.dumps(m) + "\n" for m in metrics)
    (staging / "training_metrics.jsonl").write_text(lines)
    Path(job["metrics"]).parent.mkdir(parents=True, exist_ok=True)
    Path(job["metrics"]).write_text(lines)
    config = json.loads((staging / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = prov["base_model_name_or_path"]  # as the trainer writes it
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    keep = {"adapter_config.json", "adapter_model.safetensors", "peftrt_provenance.json", "training_metrics.jsonl"}
    for extra in staging.iterdir():  # save_model's tokenizer copy, training_args.bin, model card
        if extra.name not in keep:
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    if output.exists():
        shutil.rmtree(output)
    os.replace(staging, output)
    print(f"{steps} steps: loss {metrics[0]['loss']:.4f} → {metrics[-1]['loss']:.4f}; adapter written to {output}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
