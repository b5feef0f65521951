"""What a JSON-schema constraint costs in decode speed (issue 20), on SmolLM2 NF4 and BF16.

Each round runs `peftrt bench --json-schema SCHEMA` once per model, alternating, in fresh
processes. Inside each process peftrt compiles the schema (the first compile also builds the
model's token trie), then times greedy decoding after the same 128-token prompt without and
with the constraint, alternating, medians of `--repeat` runs. The prompt is bench's fixed
pseudo-random tokens, so the model rarely writes what the schema wants on its own: most steps
need the grammar's full token mask, the costly case.

Usage: python scripts/bench_constraint.py [--rounds 3] [--schema data/demo/order.constraint.schema.json]
Writes reports/bench-constraint.json and prints a table.
"""
import argparse
import json
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEFTRT = ROOT / "target/release/peftrt"
GGUF = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
F32 = ROOT / "models/smollm2-135m-instruct"
MODELS = {"nf4": ROOT / "models/bench/smollm2-nf4", "bf16": ROOT / "models/bench/smollm2-bf16"}


def ensure_models(peftrt):
    if not (MODELS["bf16"] / "config.json").exists():
        subprocess.run([peftrt, "import", GGUF, MODELS["bf16"], "--dtype", "bf16"], check=True)
    if not (MODELS["nf4"] / "config.json").exists():
        subprocess.run([peftrt, "quantize", "--model", F32, "--out", MODELS["nf4"]], check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--schema", type=Path, default=ROOT / "data/demo/order.constraint.schema.json")
    ap.add_argument("--peftrt", type=Path, default=PEFTRT)
    a = ap.parse_args()
    ensure_models(a.peftrt)
    runs = {name: [] for name in MODELS}
    for r in range(a.rounds):
        for name, model in MODELS.items():
            out = subprocess.run([a.peftrt, "bench", "--model", model, "--threads", str(a.threads),
                                  "--prompt-tokens", "128", "--gen-tokens", "64", "--repeat", str(a.repeat),
                                  "--json", "--json-schema", a.schema], check=True, capture_output=True, text=True)
            v = json.loads(out.stdout)
            runs[name].append(v["constraint"])
            print(f"round {r} {name}: {v['constraint']}", flush=True)
    summary = {}
    print("\n| model | free tok/s | constrained tok/s | ratio (median of rounds) | full masks | compile ms | first compile ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rs in runs.items():
        med = {k: statistics.median(x[k] for x in rs)
               for k in ["greedy_decode_tok_s", "constrained_decode_tok_s", "ratio", "compile_ms", "first_compile_ms"]}
        masks = f"{sum(x['masked_steps'] for x in rs)} of {sum(x['steps'] for x in rs)}"
        summary[name] = dict(med, masks=masks, rounds=rs)
        print(f"| {name} | {med['greedy_decode_tok_s']:.1f} | {med['constrained_decode_tok_s']:.1f} | "
              f"{med['ratio']:.3f} | {masks} | {med['compile_ms']:.2f} | {med['first_compile_ms']:.0f} |")
    (ROOT / "reports").mkdir(exist_ok=True)
    (ROOT / "reports/bench-constraint.json").write_text(json.dumps(
        {"schema": str(a.schema.relative_to(ROOT) if a.schema.is_relative_to(ROOT) else a.schema),
         "threads": a.threads, "results": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
