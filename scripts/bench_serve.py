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

With --llamacpp, each round also sends the same requests to llama.cpp's `llama-server -np N -cb`
(scripts/llamacpp_server.py: the same weights requantised by llama.cpp, the adapters converted to
GGUF and picked per request) and times them the same way, client side.

Usage: scripts/bench_serve.py [--sequences 1,8] [--setups none,one,per-sequence] [--rounds 3] [--model f32]
[--llamacpp] (`make bench-serve BENCH_ARGS=...`).
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
import llamacpp_server  # noqa: E402
from bench_engine import ADAPTER, MODELS, ensure_models, prompt, variants  # noqa: E402
from test_serve import Server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT_TOKENS, GEN_TOKENS = 128, 64


def http_round(server, n, model_of, vocab, rnd):
    """N streamed completions at once, round `rnd`'s prompts: (aggregate tok/s, [ttft ms])."""
    events = [[] for _ in range(n)]  # (time, pieces) per request
    starts = [0.0] * n
    errors = []

    def one(i):
        body = json.dumps({"model": model_of(i), "prompt": prompt(vocab, rnd, i), "max_tokens": GEN_TOKENS,
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
    ap.add_argument("--setups", default="none,one,per-sequence")
    ap.add_argument("--model", default="f32", choices=["f32", *sorted(MODELS)],
                    help="f32: models/smollm2-135m-instruct; bf16/nf4: made as bench_engine.py makes them")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peftrt", type=Path, default=ROOT / "target/release/peftrt")
    ap.add_argument("--out", type=Path, default=ROOT / "reports/bench-serve.json")
    ap.add_argument("--llamacpp", action="store_true", help="also llama.cpp's llama-server on the same requests")
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
            if setup not in ("none", "one", "per-sequence"):
                sys.exit(f"unknown setup {setup!r}: none, one or per-sequence")
            # "one": the reference all-linear adapter on every request (served as a0), as bench's
            # --adapter; "per-sequence": request i on variant i (a0, a1, ...).
            adapters = variants(n) if setup == "per-sequence" else [str(ADAPTER)] if setup == "one" else []
            args = ["--model", model, "--threads", a.threads, "--max-sequences", n,
                    "--ctx-size", PROMPT_TOKENS + GEN_TOKENS]
            for i, d in enumerate(adapters):
                args += ["--adapter", f"a{i}={d}"]
            s = Server(a.peftrt, args)
            base = s.url and json.loads(http_get(s, "/v1/models"))["data"][0]["id"]
            model_of = (lambda i: f"a{i}" if setup == "per-sequence" else "a0") if adapters else (lambda i: base)
            eng, web, lcp = [], [], []
            peer = None
            try:
                if a.llamacpp:
                    loras = [llamacpp_server.lora_gguf(d) for d in [ADAPTER, *variants(n)]] if adapters else []
                    peer = llamacpp_server.Server(llamacpp_server.base_gguf(a.model), n, PROMPT_TOKENS + GEN_TOKENS + 64,
                                                  loras, a.threads)
                    lora_of = ((lambda i: [{"id": 1 + i, "scale": 1.0}]) if setup == "per-sequence"
                               else (lambda i: [{"id": 0, "scale": 1.0}]) if adapters else (lambda i: []))
                    llamacpp_server.run_round(peer.port, [prompt(vocab, 0, i) for i in range(n)], lora_of, GEN_TOKENS)
                # Each round its own prompts (as bench's rounds), so that no prefix is reused.
                http_round(s, n, model_of, vocab, 0)  # warm-up
                for k in range(1, a.rounds + 1):
                    eng.append(engine_round(a, model, n, adapters))
                    web.append(http_round(s, n, model_of, vocab, k))
                    if peer:
                        res = llamacpp_server.run_round(peer.port, [prompt(vocab, k, i) for i in range(n)], lora_of,
                                                        GEN_TOKENS)
                        lcp.append((res["aggregate_tok_s"], res["ttft_ms"]))
            finally:
                s.stop()
                if peer:
                    peer.close()
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
            if lcp:
                lt = [t for _, ts in lcp for t in ts]
                row["llamacpp_tok_s"] = statistics.median(x for x, _ in lcp)
                row["llamacpp_ttft_ms_p50"], row["llamacpp_ttft_ms_p99"] = statistics.median(lt), p99(lt)
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
    if a.llamacpp:
        print("\n| model | N | adapters | peftrt HTTP tok/s | llama-server tok/s | peftrt / llama.cpp "
              "| llama-server first token p50 / p99 ms |\n|---|---:|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['model']} | {r['sequences']} | {r['adapters']} | {r['http_tok_s']:.1f} | "
                  f"{r['llamacpp_tok_s']:.1f} | {r['http_tok_s'] / r['llamacpp_tok_s']:.2f} | "
                  f"{r['llamacpp_ttft_ms_p50']:.0f} / {r['llamacpp_ttft_ms_p99']:.0f} |")


def http_get(s, path):
    c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    c.request("GET", path)
    return c.getresponse().read()


if __name__ == "__main__":
    main()
