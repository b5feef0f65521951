"""The trainer beside transformers + peft on CPU: LoRA training speed and peak memory (`make bench-trainer`).

Issue #6 ("Speed"): tokens/s and peak RSS of a LoRA run on SmolLM2-135M-Instruct (r=16, alpha=32 on
q_proj,v_proj, batch 4 × 128 tokens, f32) with `trainer train`, and the same run with transformers +
peft + torch.optim.AdamW in PyTorch, on the same machine.

Same work on both sides:
- Data: a fixed synthetic alpaca file written here (seeded, no network): an instruction of ~30 words
  and a response of ~150 words, so every example is cut to exactly --max-seq-len tokens (no padding
  anywhere). Both sides read the same file in file order (`--no-shuffle`); PyTorch tokenises it as the
  trainer does (the chat template renders the prompt, prompt and response are encoded apart and
  concatenated, the loss is on response tokens only). The first step's loss, which does not depend on
  the random lora_A (lora_B starts at zero), is compared between the two sides: it checks that they
  train on the same tokens with the same loss mask.
- Hyper-parameters: r 16, alpha 32, dropout 0.05, lr 2e-4, cosine schedule, AdamW (betas 0.9,0.999,
  eps 1e-8, weight decay 0.01), gradient clipping at 1.0, no gradient checkpointing, f32 on the CPU.
- Threads: OMP_NUM_THREADS = MKL_NUM_THREADS = --threads in both children's environments,
  `torch.set_num_threads` in PyTorch, `--threads` (libtorch's `set_num_threads`) for the trainer; each
  side reports the intra-op thread count it ran with.
- Timing: one warm-up step, then --steps timed steps. A step is: build the batch, zero the gradients,
  forward, backward, clip, AdamW update, schedule; it is timed inside each process (the trainer's
  metrics JSONL records `step_s`, PyTorch's loop `time.perf_counter`). Loading, the warm-up step and
  saving are excluded. Tokens/s = tokens of the timed steps / their summed time, where a token is an
  input token of the batch (every one is a real, non-padding token: 4 × 128 = 512 per step). The
  response tokens (those with a loss) are reported too.
- Memory: the peak RSS of each child process (`ru_maxrss` from wait4), loading included: the whole
  run's high-water mark.
- Every run is a fresh process; each round runs the trainer then PyTorch back to back, rounds repeat,
  and the report gives medians over rounds and the ratio of medians. The machine is shared and
  noisy: the load average is recorded before each round.

Prints a markdown table and writes reports/bench-trainer.json. Needs `make build-trainer` and the
model (`make models`); run through `make bench-trainer`, which sets the trainer's environment.
"""
import argparse, datetime, json, os, random, re, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = Path("models/smollm2-135m-instruct")
TRAINER = Path("target/release/trainer")
IGNORE = -100
# The hyper-parameters of both sides.
HP = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "v_proj"], "lr": 2e-4, "betas": [0.9, 0.999],
      "eps": 1e-8, "weight_decay": 0.01, "max_grad_norm": 1.0, "warmup_steps": 0, "schedule": "cosine"}

WORDS = ("river stone lantern harbor meadow engine signal garden market winter copper window ledger bridge "
         "orchard canvas compass thunder pocket village mirror anchor velvet circuit falcon summit archive "
         "cotton ember glacier harvest island jacket kettle ladder marble needle oyster pepper quartz ribbon "
         "saddle timber umbrella violet walnut yarn zephyr").split()
TOPICS = ("the history of a small fishing town", "how a steam engine converts heat into motion",
          "the rules of a card game played in winter", "why copper is used in electrical wiring",
          "the life cycle of an orchard through one year", "how lighthouses guided ships before radio",
          "the care of a vegetable garden in dry weather", "the way a market sets prices for bread")


def make_data(path, n, seed=0):
    """`n` alpaca records, each far longer than 128 tokens: a deterministic function of `seed`."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            detail = " ".join(rng.choice(WORDS) for _ in range(12))
            instruction = f"Write a short explanation of {topic}, and mention these words somewhere: {detail}."
            sentences = []
            for _ in range(14):
                w = [rng.choice(WORDS) for _ in range(9)]
                sentences.append(f"The {w[0]} near the {w[1]} was {w[2]}, so the {w[3]} {w[4]} kept the {w[5]} "
                                 f"and the {w[6]} beside the {w[7]} {w[8]}.")
            f.write(json.dumps({"instruction": instruction, "input": "", "output": " ".join(sentences)}) + "\n")


def peft_worker(a):
    """Runs in a fresh Python process: transformers + peft + torch.optim.AdamW, timed per step. Prints JSON."""
    import torch
    torch.set_num_threads(a.threads)
    import peft, transformers
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model)  # its chat template
    bpe = Tokenizer.from_file(str(Path(a.model) / "tokenizer.json"))
    examples = []
    for line in Path(a.data).read_text().splitlines():
        rec = json.loads(line)
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
        prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs, tokenize=False)
        assert full.startswith(prompt)
        p = bpe.encode(prompt, add_special_tokens=False).ids
        r = bpe.encode(full[len(prompt):], add_special_tokens=False).ids
        ids, trained = (p + r)[:a.max_seq_len], ([False] * len(p) + [True] * len(r))[:a.max_seq_len]
        # transformers' convention: labels[t] = ids[t] where trained, the model shifts them.
        examples.append((ids, [i if t else IGNORE for i, t in zip(ids, trained)]))
    assert all(len(ids) == a.max_seq_len for ids, _ in examples), "an example is shorter than --max-seq-len"

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    cfg = LoraConfig(r=HP["r"], lora_alpha=HP["alpha"], lora_dropout=HP["dropout"], target_modules=HP["targets"],
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=HP["lr"], betas=tuple(HP["betas"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"])
    steps = a.steps + 1
    sched = get_cosine_schedule_with_warmup(opt, HP["warmup_steps"], steps)
    bs = a.batch_size
    records = []
    for step in range(steps):
        t0 = time.perf_counter()
        rows = examples[step * bs:(step + 1) * bs]
        ids = torch.tensor([r[0] for r in rows])
        labels = torch.tensor([r[1] for r in rows])
        opt.zero_grad()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, HP["max_grad_norm"])
        opt.step()
        sched.step()
        loss = out.loss.item()
        records.append({"step": step + 1, "loss": loss, "step_s": time.perf_counter() - t0,
                        "tokens": ids.numel(), "targets": int((labels[:, 1:] != IGNORE).sum())})
    print(json.dumps({"steps": records, "threads": torch.get_num_threads(),
                      "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                   "peft": peft.__version__}}))


def run_child(cmd, env):
    """Runs `cmd`; returns (stdout, stderr, peak RSS in bytes of that process, from wait4's rusage)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{stderr[-4000:]}")
    return stdout, stderr, usage.ru_maxrss * 1024


def summarise(steps, warmup=1):
    timed = steps[warmup:]
    tokens, secs = sum(s["tokens"] for s in timed), sum(s["step_s"] for s in timed)
    return {"tok_s": tokens / secs, "step_s": [s["step_s"] for s in timed], "tokens_per_step": timed[0]["tokens"],
            "targets_per_step": [s["targets"] for s in timed], "losses": [s["loss"] for s in steps]}


def trainer_run(a, data, env, work):
    out, metrics = work / "adapter", work / "metrics.jsonl"
    cmd = [str(TRAINER), "train", "--base", str(MODEL), "--data", str(data), "--output", str(out), "--overwrite",
           "--format", "alpaca", "--no-shuffle", "--quiet", "--device", "cpu", "--threads", str(a.threads),
           "--max-seq-len", str(a.max_seq_len), "--batch-size", str(a.batch_size), "--max-steps", str(a.steps + 1),
           "--r", str(HP["r"]), "--alpha", str(HP["alpha"]), "--dropout", str(HP["dropout"]),
           "--target", ",".join(HP["targets"]), "--lr", str(HP["lr"]), "--schedule", HP["schedule"],
           "--warmup-steps", str(HP["warmup_steps"]), "--betas", ",".join(map(str, HP["betas"])),
           "--eps", str(HP["eps"]), "--weight-decay", str(HP["weight_decay"]),
           "--max-grad-norm", str(HP["max_grad_norm"]), "--seed", str(a.seed), "--metrics", str(metrics)]
    _, stderr, rss = run_child(cmd, env)
    steps = [json.loads(l) for l in metrics.read_text().splitlines()]
    recs = [{"step": s["step"], "loss": s["loss"], "step_s": s["step_s"], "tokens": s["tokens"],
             "targets": s["response_tokens"]} for s in steps]
    # "training on cpu, 2 CPU threads"
    m = re.search(r"training on \S+, (\d+) CPU threads", stderr)
    threads = int(m.group(1)) if m else None
    return {**summarise(recs), "peak_rss_bytes": rss, "threads": threads}


def peft_run(a, data, env):
    cmd = [sys.executable, __file__, "--peft-worker", "--model", str(MODEL), "--data", str(data),
           "--threads", str(a.threads), "--steps", str(a.steps), "--batch-size", str(a.batch_size),
           "--max-seq-len", str(a.max_seq_len), "--seed", str(a.seed)]
    stdout, _, rss = run_child(cmd, env)
    r = json.loads(stdout.strip().splitlines()[-1])
    return {**summarise(r["steps"]), "peak_rss_bytes": rss, "threads": r["threads"], "versions": r["versions"]}


def machine(threads):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git_commit": git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed steps, after one warm-up step")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default="reports/bench-trainer.json")
    a = ap.parse_args()
    os.chdir(ROOT)
    for f in (MODEL / "config.json", TRAINER):
        if not f.exists():
            sys.exit(f"{f} is missing: run `make models build-trainer` first")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), RUST_LOG="warn",
               TOKENIZERS_PARALLELISM="false")
    binary = TRAINER.stat().st_mtime_ns
    runs = {"trainer": [], "peft": []}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "bench.jsonl"
        make_data(data, (a.steps + 1) * a.batch_size)
        for r in range(1, a.rounds + 1):
            loads.append(os.getloadavg()[0])
            runs["trainer"].append(trainer_run(a, data, env, work))
            runs["peft"].append(peft_run(a, data, env))
            t, p = runs["trainer"][-1], runs["peft"][-1]
            print(f"round {r}/{a.rounds} (load {loads[-1]:.2f}): trainer {t['tok_s']:.1f} tok/s "
                  f"{t['peak_rss_bytes'] / 2**20:.0f} MiB, transformers+peft {p['tok_s']:.1f} tok/s "
                  f"{p['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    if TRAINER.stat().st_mtime_ns != binary:
        sys.exit(f"{TRAINER} was rebuilt during the run: the numbers mix two builds; run again")

    t0, p0 = runs["trainer"][0], runs["peft"][0]
    # lora_B starts at zero, so step 1's loss is the base model's on the same tokens and mask.
    first = (t0["losses"][0], p0["losses"][0])
    same_data = abs(first[0] - first[1]) <= 1e-4 * abs(first[1]) and t0["targets_per_step"] == p0["targets_per_step"]
    med = lambda side, k: statistics.median(x[k] for x in runs[side])
    res = {side: {"tok_s": med(side, "tok_s"), "peak_rss_bytes": med(side, "peak_rss_bytes"),
                  "threads": runs[side][0]["threads"]} for side in runs}
    speed = res["trainer"]["tok_s"] / res["peft"]["tok_s"]
    mem = res["trainer"]["peak_rss_bytes"] / res["peft"]["peak_rss_bytes"]
    info = machine(a.threads)
    report = {"machine": info, "model": str(MODEL), "hyperparameters": HP, "batch_size": a.batch_size,
              "max_seq_len": a.max_seq_len, "warmup_steps_excluded": 1, "timed_steps": a.steps, "rounds": a.rounds,
              "load_average_before_rounds": loads, "versions": p0["versions"],
              "first_step_loss": {"trainer": first[0], "peft": first[1], "same_data": same_data},
              "tokens_per_step": t0["tokens_per_step"], "response_tokens_per_step": t0["targets_per_step"],
              "results": res, "speed_ratio": speed, "rss_ratio": mem,
              "paired_speed_ratios": [t["tok_s"] / p["tok_s"] for t, p in zip(runs["trainer"], runs["peft"])],
              "targets": {"speed_ge_1_5x": speed >= 1.5, "rss_le_peft": mem <= 1.0}, "runs": runs}
    v = p0["versions"]
    lines = [f"{info['cpu']}, {info['cores']} cores, {a.threads} threads; {info['date']}; peftrt {info['git_commit']}; "
             f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}; median of {a.rounds} rounds "
             f"of {a.steps} timed steps (after 1 warm-up) of {a.batch_size} × {a.max_seq_len} tokens", "",
             "| | tokens/s | peak RSS | intra-op threads |", "|---|---:|---:|---:|"]
    for side, name in (("trainer", "trainer (libtorch)"), ("peft", "transformers + peft")):
        x = res[side]
        lines.append(f"| {name} | {x['tok_s']:.1f} | {x['peak_rss_bytes'] / 2**20:.0f} MiB | {x['threads']} |")
    lines += ["", f"trainer / transformers+peft: **{speed:.2f}×** tokens/s (target ≥ 1.5×: "
              f"{'met' if speed >= 1.5 else 'not met'}), **{mem:.2f}×** peak RSS (target ≤ 1: "
              f"{'met' if mem <= 1 else 'not met'}); per-round speed ratios "
              + ", ".join(f"{x:.2f}" for x in report["paired_speed_ratios"]),
              f"first-step loss (lora_B = 0): trainer {first[0]:.6f}, transformers+peft {first[1]:.6f} "
              f"({'same data' if same_data else 'MISMATCH: the two sides did not train on the same tokens'})"]
    print("\n" + "\n".join(lines))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {a.out}")
    if not same_data:
        sys.exit(1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peft-worker"]:
        ap = argparse.ArgumentParser()
        for k in ("model", "data"):
            ap.add_argument(f"--{k}")
        for k in ("threads", "steps", "batch-size", "max-seq-len", "seed"):
            ap.add_argument(f"--{k}", type=int)
        peft_worker(ap.parse_args(sys.argv[2:]))
    else:
        main()
