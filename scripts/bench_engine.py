"""The batching engine's speed (issue 21), on SmolLM2 BF16 and NF4, 2 threads.

For N sequences at once (1, 4, 8, 16 by default) and three adapter setups:
  (a) none: the base alone;
  (b) one: the all-linear r=16 adapter on every sequence;
  (c) per-sequence: a different all-linear r=16 adapter on each sequence (copies of the
      reference adapter with different lora_alpha, so each is its own set of tensors);
runs `peftrt bench --parallel N` in a fresh process, which times, in alternating rounds, one
session decoding the first request alone (its prompt and adapters) and the engine: aggregate decode tok/s once every sequence has its first token, time to first token
(p50/p99, all requests submitted at once) and per-stream decode tok/s. Each sequence has its own
128-token prompt and decodes 64 tokens.

With --llamacpp, each row is followed by llama.cpp's `llama-server -np N -cb` (scripts/llamacpp_server.py)
on the same requests: the same prompt tokens, 64 greedy tokens with EOS ignored, the same adapters
converted to GGUF, picked per request with `"lora": [{"id", "scale"}]`, the same rounds (one
warm-up, then --repeat); its base is the same Q4_1 file requantised by llama.cpp to BF16, and to
Q4_0 beside peftrt's NF4.

Usage: python scripts/bench_engine.py [--sequences 1,4,8,16] [--models bf16,nf4] [--repeat 2] [--llamacpp]
Writes reports/bench-engine.json and prints a table.
"""
import argparse
import contextlib
import json
import statistics
import subprocess
from pathlib import Path

import llamacpp_server

ROOT = Path(__file__).resolve().parent.parent
PEFTRT = ROOT / "target/release/peftrt"
GGUF = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
F32 = ROOT / "models/smollm2-135m-instruct"
MODELS = {"bf16": ROOT / "models/bench/smollm2-bf16", "nf4": ROOT / "models/bench/smollm2-nf4"}
ADAPTER = ROOT / "models/reference/adapters/all-linear-r16"
VARIANTS = ROOT / "models/bench/adapters"


def ensure_models(peftrt):
    if not (MODELS["bf16"] / "config.json").exists():
        subprocess.run([peftrt, "import", GGUF, MODELS["bf16"], "--dtype", "bf16"], check=True)
    if not (MODELS["nf4"] / "config.json").exists():
        subprocess.run([peftrt, "quantize", "--model", F32, "--out", MODELS["nf4"]], check=True)


def variants(n):
    """n different all-linear r=16 adapters: the reference one with lora_alpha 8, 9, ..."""
    cfg = json.loads((ADAPTER / "adapter_config.json").read_text())
    dirs = []
    for i in range(n):
        d = VARIANTS / f"all-linear-r16-alpha{8 + i}"
        if not (d / "adapter_config.json").exists():
            d.mkdir(parents=True, exist_ok=True)
            (d / "adapter_model.safetensors").write_bytes((ADAPTER / "adapter_model.safetensors").read_bytes())
            (d / "adapter_config.json").write_text(json.dumps(dict(cfg, lora_alpha=8 + i)))
        dirs.append(str(d))
    return dirs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", default="1,4,8,16")
    ap.add_argument("--models", default="bf16,nf4")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peftrt", type=Path, default=PEFTRT)
    ap.add_argument("--llamacpp", action="store_true", help="also time llama.cpp's llama-server on the same requests")
    a = ap.parse_args()
    ensure_models(a.peftrt)
    seqs = [int(s) for s in a.sequences.split(",")]
    rows = []
    vocab = json.loads((F32 / "config.json").read_text())["vocab_size"]
    for model in a.models.split(","):
        for n in seqs:
            for setup in ["none", "one", "per-sequence"]:
                # llama-server for "none" has no adapter loaded: with adapters loaded, even requests
                # that set none are several times slower there (measured: N = 8, 93 against 372 tok/s).
                server = contextlib.nullcontext()
                if a.llamacpp:
                    loras = [] if setup == "none" else [llamacpp_server.lora_gguf(d) for d in [ADAPTER, *variants(n)]]
                    server = llamacpp_server.Server(llamacpp_server.base_gguf(model), n, 256, loras, a.threads)
                with server as srv:
                    cmd = [str(a.peftrt), "bench", "--model", str(MODELS[model]), "--threads", str(a.threads),
                           "--prompt-tokens", "128", "--gen-tokens", "64", "--repeat", str(a.repeat), "--json",
                           "--parallel", str(n)]
                    if setup == "one":
                        cmd += ["--adapter", str(ADAPTER)]
                    elif setup == "per-sequence":
                        cmd += ["--adapters-per-sequence"] + variants(n)
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    v = json.loads(out)
                    p = v["parallel"]
                    row = {"model": model, "sequences": n, "adapters": setup,
                           **{k: p[k] for k in ["session_decode_tok_s", "aggregate_decode_tok_s", "ttft_ms_p50",
                                                "ttft_ms_p99", "per_stream_decode_tok_s", "vs_session_decode"]}}
                    if srv is not None:
                        row["llamacpp"] = llamacpp_rows(srv, n, setup, a.repeat, vocab)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    out = ROOT / "reports/bench-engine.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"threads": a.threads, "prompt_tokens": 128, "gen_tokens": 64}
    if a.llamacpp:
        meta["llama_cpp"] = {"llama_cpp_python_sdist": llamacpp_server.pinned_version(),
                             "commit": llamacpp_server.commit_of(llamacpp_server.source_dir())}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print()
    print("| model | N | adapters | session tok/s | engine tok/s in all | x session | per stream | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['sequences']} | {r['adapters']} | {r['session_decode_tok_s']:.1f} | "
              f"{r['aggregate_decode_tok_s']:.1f} | {r['vs_session_decode']:.2f} | {r['per_stream_decode_tok_s']:.1f} | "
              f"{r['ttft_ms_p50']:.0f} | {r['ttft_ms_p99']:.0f} |")
    if a.llamacpp:
        print()
        print("| model | N | adapters | peftrt engine tok/s | llama-server tok/s | peftrt / llama.cpp | llama.cpp TTFT p50 ms |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for r in rows:
            l = r["llamacpp"]
            print(f"| {r['model']} | {r['sequences']} | {r['adapters']} | {r['aggregate_decode_tok_s']:.1f} | "
                  f"{l['aggregate_decode_tok_s']:.1f} | {r['aggregate_decode_tok_s'] / l['aggregate_decode_tok_s']:.2f} | "
                  f"{l['ttft_ms_p50']:.0f} |")


def prompt(vocab, r, i, tokens=128):
    """Request i's prompt in round r, exactly as `peftrt bench --parallel` makes it."""
    mul = 7919 + 2 * i
    return [((j + 1000 * i + 100_000 * r) * mul & 0xFFFFFFFF) % max(vocab - 200, 1) + min(100, vocab - 1)
            for j in range(tokens)]


def llamacpp_rows(srv, n, setup, repeat, vocab):
    """llama-server on the requests `peftrt bench --parallel n` makes: adapter 0 is the reference
    all-linear adapter, adapter 1 + i the i-th per-sequence variant."""
    def loras_of(i):
        chosen = {"none": None, "one": 0, "per-sequence": 1 + i}[setup]
        return [] if chosen is None else [{"id": chosen, "scale": 1.0}]
    agg, ttft, streams = [], [], []
    for r in range(repeat + 1):
        res = llamacpp_server.run_round(srv.port, [prompt(vocab, r, i) for i in range(n)], loras_of, 64)
        if any(t != 64 for t in res["tokens"]):
            raise RuntimeError(f"llama-server returned {res['tokens']} tokens, not 64 each")
        if r > 0:
            agg.append(res["aggregate_tok_s"])
            ttft += res["ttft_ms"]
            streams += res["per_stream_tok_s"]
    ttft.sort()
    return {"aggregate_decode_tok_s": statistics.median(agg), "ttft_ms_p50": statistics.median(ttft),
            "ttft_ms_p99": ttft[min(len(ttft) - 1, max(0, -(-len(ttft) * 99 // 100) - 1))],
            "per_stream_decode_tok_s": statistics.median(streams)}


if __name__ == "__main__":
    main()
