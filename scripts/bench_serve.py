#!/usr/bin/env python3
"""The batching engine through the HTTP API (`peftrt serve`) beside the engine's own figures
(`peftrt bench --parallel N`), on the same model, requests and machine (issue 22's speed table).

For each N and adapter setup, a server runs with --max-sequences N; each round times the engine
in a fresh `peftrt bench --parallel N --repeat 1` process, then N streamed /v1/completions
requests sent at once through HTTP: the same 128 prompt token ids as bench's, 64 greedy tokens
with ignore_eos, and for "per-sequence" the same adapter per sequence (the all-linear r=16
reference adapter with lora_alpha 8, 9, ...). Measures, as bench does: aggregate tok/s = tokens
that arrive after every request has its first token, over the time since then; time to first
token per request (for HTTP from sending the request to its first text chunk, so it includes
the HTTP, tokenizer and queueing path; bench's from submit to the first sampled token).
Median over rounds; writes reports/bench-serve.json.

Usage: scripts/bench_serve.py [--sequences 1,8] [--setups none,per-sequence] [--rounds 3] [--model f32]
(`make bench-serve BENCH_ARGS=...`). llama.cpp's llama-server on the same requests is not run yet.
"""

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import MODELS, ensure_models, variants  # noqa: E402
from test_serve import Server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT_TOKENS, GEN_TOKENS = 128, 64


def prompt_of(i, vocab):
    """`peftrt bench --parallel`'s prompt of request i (runtime/src/bin/peftrt/bench.rs)."""
    pick = lambda j, mul: ((j * mul) % max(vocab - 200, 1)) + min(100, vocab - 1)
    return [pick(j + 1000 * i, 7919 + 2 * i) for j in range(PROMPT_TOKENS)]


def http_round(server, n, model_of, vocab):
    """N streamed completions at once: (aggregate tok/s, [ttft ms])."""
    events = [[] for _ in range(n)]  # (time, pieces) per request
    starts = [0.0] * n
    errors = []

    def one(i):
        body = json.dumps({"model": model_of(i), "prompt": prompt_of(i, vocab), "max_tokens": GEN_TOKENS,
                           "temperature": 0, "ignore_eos": True, "stream": True})
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
        starts[i] = time.perf_counter()
        c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            errors.append(f"{r.status}: {r.read()[:200]!r}")
            return
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            v = json.loads(line[6:])
            if v["choices"] and v["choices"][0]["text"]:
                events[i].append(time.perf_counter())
        c.close()

    ths = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    firsts = [e[0] for e in events]
    all_started = max(firsts)
    after = sum(1 for e in events for t in e if t > all_started)
    end = max(e[-1] for e in events)
    agg = after / (end - all_started) if end > all_started else float("nan")
    return agg, [(f - s) * 1e3 for f, s in zip(firsts, starts)]


def engine_round(a, model, n, adapters):
    cmd = [str(a.peftrt), "bench", "--model", str(model), "--threads", str(a.threads), "--prompt-tokens",
           str(PROMPT_TOKENS), "--gen-tokens", str(GEN_TOKENS), "--repeat", "1", "--json", "--parallel", str(n)]
    if adapters:
        cmd += ["--adapters-per-sequence", *adapters]
    p = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["parallel"]
    return p["aggregate_decode_tok_s"], p["ttft_ms_p50"], p["ttft_ms_p99"]


def p99(v):
    v = sorted(v)
    return v[min(len(v) - 1, max(0, -(-99 * len(v) // 100) - 1))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", default="1,8")
    ap.add_argument("--setups", default="none,per-sequence")
    ap.add_argument("--model", default="f32", choices=["f32", *sorted(MODELS)],
                    help="f32: models/smollm2-135m-instruct; bf16/nf4: made as bench_engine.py makes them")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peftrt", type=Path, default=ROOT / "target/release/peftrt")
    ap.add_argument("--out", type=Path, default=ROOT / "reports/bench-serve.json")
    a = ap.parse_args()
    if a.model == "f32":
        model = ROOT / "models/smollm2-135m-instruct"
    else:
        ensure_models(a.peftrt)
        model = MODELS[a.model]
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rows = []
    for n in [int(x) for x in a.sequences.split(",")]:
        for setup in a.setups.split(","):
            adapters = variants(n) if setup == "per-sequence" else []
            args = ["--model", model, "--threads", a.threads, "--max-sequences", n,
                    "--ctx-size", PROMPT_TOKENS + GEN_TOKENS]
            for i, d in enumerate(adapters):
                args += ["--adapter", f"a{i}={d}"]
            s = Server(a.peftrt, args)
            base = s.url and json.loads(http_get(s, "/v1/models"))["data"][0]["id"]
            model_of = (lambda i: f"a{i}") if adapters else (lambda i: base)
            eng, web = [], []
            try:
                http_round(s, n, model_of, vocab)  # warm-up
                for _ in range(a.rounds):
                    eng.append(engine_round(a, model, n, adapters))
                    web.append(http_round(s, n, model_of, vocab))
            finally:
                s.stop()
            ttfts = [t for _, ts in web for t in ts]
            row = {
                "model": a.model, "sequences": n, "adapters": setup,
                "engine_tok_s": statistics.median(e[0] for e in eng),
                "http_tok_s": statistics.median(w[0] for w in web),
                "engine_ttft_ms_p50": statistics.median(e[1] for e in eng),
                "engine_ttft_ms_p99": statistics.median(e[2] for e in eng),
                "http_ttft_ms_p50": statistics.median(ttfts), "http_ttft_ms_p99": p99(ttfts),
            }
            row["http_vs_engine"] = row["http_tok_s"] / row["engine_tok_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"rounds": a.rounds, "threads": a.threads, "rows": rows}, indent=1) + "\n")
    print("| model | N | adapters | engine tok/s | HTTP tok/s | HTTP / engine | engine first token p50 / p99 ms "
          "| HTTP first token p50 / p99 ms |\n|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['sequences']} | {r['adapters']} | {r['engine_tok_s']:.1f} | {r['http_tok_s']:.1f} "
              f"| {r['http_vs_engine']:.2f} | {r['engine_ttft_ms_p50']:.0f} / {r['engine_ttft_ms_p99']:.0f} "
              f"| {r['http_ttft_ms_p50']:.0f} / {r['http_ttft_ms_p99']:.0f} |")


def http_get(s, path):
    c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    c.request("GET", path)
    return c.getresponse().read()


if __name__ == "__main__":
    main()
