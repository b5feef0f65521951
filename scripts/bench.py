"""peftrt beside llama.cpp on CPU: prefill and decode speed for SmolLM2-135M-Instruct (`make bench`).

Fairness (see shared/bench/README.md, the team's agreed way to time llama.cpp):
- Same weights: both models are made from models/SmolLM2-135M-Instruct.Q4_1.gguf, dequantised and
  rounded to the benchmarked dtype; llama.cpp's GGUF by llama.cpp's own quantiser
  (`llama_model_quantize`, allow_requantize), peftrt's directory by `peftrt import --dtype`.
- Same work: 128-token prompt in one batch (prefill), then 64 tokens decoded one at a time, the same
  fixed pseudo-random token ids, the same thread count; one warm-up run then the median of 3 runs,
  inside each process.
- llama.cpp is timed through llama-cpp-python's low-level API (one `llama_decode` per step), never
  the high-level `Llama.eval`, whose Python-side copies add milliseconds per token.
- Every measurement is a fresh process (no state, caches or allocator warmth carried over).
- The machine is shared and noisy: in each round peftrt and llama.cpp run back to back for each
  dtype, rounds repeat, and the report gives the median over rounds and the peftrt/llama.cpp ratios.

Writes the table to stdout and the same as JSON to reports/bench.json.

`--adapters DIR...` times LoRA adapters instead (issue 3), peftrt alone: in each round, for each
dtype (default bf16), no adapter then each adapter directory in turn, in fresh processes; the
report gives medians over rounds, adapter load and switch times, and each adapter's prefill and
decode time overhead against the no-adapter run of the same round (median over rounds), and
the same measured inside each adapter run (`peftrt bench --adapter` also runs each round without
it, alternating: "in one process"), in reports/bench-adapters.json. `make bench` runs it on the adapters of scripts/smollm2_adapters.py.
"""
import argparse, datetime, importlib.metadata, importlib.util, json, os, platform, statistics, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path("models/SmolLM2-135M-Instruct.Q4_1.gguf")
OUT_DIR = Path("models/bench")
PEFTRT = Path("target/release/peftrt")
PROMPT_TOKENS, GEN_TOKENS, REPEAT = 128, 64, 3
# peftrt dtype -> llama.cpp ftype of the peer model (ftype 0, 32, 2). NF4 (4 bits + one f32 scale per
# 64 weights, double-quantised) is set beside llama.cpp's Q4_0 (4 bits + one f16 scale per 32).
# "nf4h" is NF4 with the output head quantised too (`peftrt quantize --quantize-head`).
DTYPES = {"f32": "LLAMA_FTYPE_ALL_F32", "bf16": "LLAMA_FTYPE_MOSTLY_BF16", "nf4": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "nf4h": "LLAMA_FTYPE_MOSTLY_Q4_0"}
# GGUF files both run as they are (peftrt natively, no import): the SmolLM2 Q4_1 file itself, and
# llama.cpp's requantisations of it. Same file on both sides.
GGUF_DTYPES = {"q4_1": None, "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
               "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
DTYPES.update(GGUF_DTYPES)


def llamacpp_bench(path, threads):
    """Runs in a fresh process: exactly shared/bench/llamacpp_bench.py. Prints one JSON object."""
    import resource, time, llama_cpp as L
    L.llama_backend_init()
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 512
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    arr = (L.llama_token * PROMPT_TOKENS)(*[(i * 7919) % (n_vocab - 200) + 100 for i in range(PROMPT_TOKENS)])
    one = (L.llama_token * 1)()
    pp, tg = [], []
    for _ in range(REPEAT + 1):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        t = time.perf_counter()
        assert L.llama_decode(ctx, L.llama_batch_get_one(arr, PROMPT_TOKENS)) == 0
        L.llama_get_logits_ith(ctx, -1); L.llama_synchronize(ctx)
        pp.append(PROMPT_TOKENS / (time.perf_counter() - t))
        t = time.perf_counter()
        for i in range(GEN_TOKENS):
            one[0] = (i * 31) % (n_vocab - 200) + 100
            assert L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) == 0
            L.llama_get_logits_ith(ctx, -1)
        L.llama_synchronize(ctx)
        tg.append(GEN_TOKENS / (time.perf_counter() - t))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # includes the Python interpreter
    print(json.dumps({"prefill_tok_s": statistics.median(pp[1:]), "decode_tok_s": statistics.median(tg[1:]),
                      "peak_rss_bytes_with_python": rss}))


def llamacpp_quantize(src, dst, ftype_name):
    """llama.cpp's own quantiser (as shared/bench/llamacpp_quantize.py), in a child process: its log is long."""
    import ctypes, llama_cpp as L
    p = L.llama_model_quantize_default_params()
    p.ftype, p.allow_requantize, p.nthread = getattr(L, ftype_name), True, os.cpu_count()
    rc = L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    print(json.dumps({"rc": rc}))
    sys.exit(rc)


def run_json(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def ensure_llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        print("installing llama-cpp-python (builds llama.cpp from source, several minutes)...", flush=True)
        env = dict(os.environ, CMAKE_ARGS=os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=ON"))
        subprocess.run([sys.executable, "-m", "pip", "install", "-r", "scripts/requirements-bench.txt"], env=env, check=True)


def prepare(dtype, llamacpp=True):
    """The llama.cpp GGUF and the peftrt directory for one dtype, both from SOURCE (cached)."""
    if dtype in GGUF_DTYPES:  # one file for both
        gguf = SOURCE if GGUF_DTYPES[dtype] is None else OUT_DIR / f"smollm2-{dtype}.gguf"
        if not gguf.exists():
            tmp = gguf.with_suffix(".gguf.tmp")
            run_json([sys.executable, __file__, "--llamacpp-quantize", str(SOURCE), str(tmp), DTYPES[dtype]])
            tmp.rename(gguf)
        return gguf, gguf
    # Both NF4 variants are timed beside the same llama.cpp Q4_0 model.
    gguf, pdir = OUT_DIR / f"smollm2-{'nf4' if dtype == 'nf4h' else dtype}.gguf", OUT_DIR / f"smollm2-{dtype}"
    if llamacpp and not gguf.exists():
        tmp = gguf.with_suffix(".gguf.tmp")
        run_json([sys.executable, __file__, "--llamacpp-quantize", str(SOURCE), str(tmp), DTYPES[dtype]])
        tmp.rename(gguf)
    if not pdir.exists():
        if dtype in ("nf4", "nf4h"):  # `peftrt quantize` of the BF16 import: 4-bit decoder layers, BF16 embeddings
            _, bf16 = prepare("bf16", llamacpp=False)
            head = ["--quantize-head"] if dtype == "nf4h" else []
            subprocess.run([PEFTRT, "quantize", "--model", bf16, "--out", pdir, *head], check=True)
        else:
            subprocess.run([PEFTRT, "import", SOURCE, pdir, "--dtype", dtype], check=True)
    return gguf, pdir


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git_commit": git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else ""),
            "llama_cpp_python": version("llama-cpp-python")}


def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def peftrt_bench(pdir, threads, extra=()):
    return run_json([PEFTRT, "bench", "--model", pdir, "--threads", str(threads), "--prompt-tokens", str(PROMPT_TOKENS),
                     "--gen-tokens", str(GEN_TOKENS), "--repeat", str(REPEAT), "--json", *extra])


def adapters_main(a, dtypes):
    """peftrt with no adapter and with each of `a.adapters`, alternating within each round."""
    variants = [("none", [])] + [(Path(d).name, ["--adapter", d]) for d in a.adapters]
    if len({n for n, _ in variants}) != len(variants):
        sys.exit(f"adapter directories need distinct names (and none called 'none'): {a.adapters}")
    for _, extra in variants[1:]:
        if not (Path(extra[1]) / "adapter_config.json").exists():
            sys.exit(f"{extra[1]} is not a PEFT adapter directory: run `make test` or scripts/smollm2_adapters.py")
    models = {d: prepare(d, llamacpp=False)[1] for d in dtypes}
    binary = PEFTRT.stat().st_mtime_ns
    runs = {d: {n: [] for n, _ in variants} for d in dtypes}
    for r in range(1, a.rounds + 1):
        for d in dtypes:
            for n, extra in variants:
                runs[d][n].append(peftrt_bench(models[d], a.threads, extra))
            print(f"round {r}/{a.rounds} {d} decode tok/s: "
                  + ", ".join(f"{n} {runs[d][n][-1]['decode_tok_s']:.1f}" for n, _ in variants), flush=True)

    med = statistics.median
    results = []
    for d in dtypes:
        none = runs[d]["none"]
        for n, _ in variants:
            rs = runs[d][n]
            row = {"dtype": d, "adapter": n,
                   "adapter_load_ms": med(x["adapter_load_ms"] for x in rs),
                   "adapter_switch_us": med(x["adapter_switch_us"] for x in rs),
                   "peak_rss_bytes": med(x["peak_rss_bytes"] for x in rs)}
            for k in ("prefill", "decode"):
                row[f"{k}_tok_s"] = med(x[f"{k}_tok_s"] for x in rs)
                # Time per token against no adapter, paired within each round: the machine drifts.
                row[f"{k}_overhead"] = med(b[f"{k}_tok_s"] / x[f"{k}_tok_s"] - 1 for b, x in zip(none, rs))
                # The same, measured inside each adapter run (each of its rounds also without the
                # adapter, alternating): pairs that saw the same state of the machine.
                if n != "none":
                    row[f"{k}_overhead_in_process"] = med(x["adapter_overhead"][k] for x in rs)
            row["rounds"] = rs
            results.append(row)

    info = machine()
    if PEFTRT.stat().st_mtime_ns != binary:
        sys.exit(f"{PEFTRT} was rebuilt during the run: the numbers mix two builds; run again")
    report = {"machine": info, "threads": a.threads, "prompt_tokens": PROMPT_TOKENS, "gen_tokens": GEN_TOKENS,
              "repeat": REPEAT, "rounds": a.rounds, "adapters": a.adapters, "results": results}
    lines = [f"{info['cpu']}, {info['cores']} cores, {a.threads} threads; {info['date']}; peftrt {info['git_commit']}; "
             f"median of {a.rounds} rounds; overhead = time per token against no adapter, same round; "
             f"in one process = the same, alternating inside each adapter run", "",
             "| dtype | adapter | load | switch | prefill tok/s | prefill overhead (in one process) "
             "| decode tok/s | decode overhead (in one process) | peak RSS |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for x in results:
        rss = f"{x['peak_rss_bytes'] / 2**20:.0f} MiB"
        if x["adapter"] == "none":
            lines.append(f"| {x['dtype']} | none | | | {x['prefill_tok_s']:.1f} | | {x['decode_tok_s']:.1f} | | {rss} |")
        else:
            lines.append(f"| {x['dtype']} | {x['adapter']} | {x['adapter_load_ms']:.2f} ms | {x['adapter_switch_us']:.2f} µs "
                         f"| {x['prefill_tok_s']:.1f} | {100 * x['prefill_overhead']:+.1f}% "
                         f"({100 * x['prefill_overhead_in_process']:+.1f}%) "
                         f"| {x['decode_tok_s']:.1f} | {100 * x['decode_overhead']:+.1f}% "
                         f"({100 * x['decode_overhead_in_process']:+.1f}%) | {rss} |")
    return report, lines


def main():
    global PEFTRT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", help=f"comma-separated, from {','.join(DTYPES)} (default f32,bf16,nf4,nf4h; bf16 with --adapters)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", help="default reports/bench.json (reports/bench-adapters.json with --adapters)")
    ap.add_argument("--adapters", nargs="+", metavar="DIR",
                    help="time these PEFT adapter directories against no adapter (peftrt only)")
    ap.add_argument("--peftrt", type=Path, default=PEFTRT, help=f"the peftrt binary (default {PEFTRT})")
    a = ap.parse_args()
    PEFTRT = a.peftrt if a.peftrt == PEFTRT else a.peftrt.resolve()  # paths given are from here, not ROOT
    a.adapters = [str(Path(d).resolve()) for d in a.adapters or []]
    os.chdir(ROOT)
    dtypes = (a.dtypes or ("bf16" if a.adapters else "f32,bf16,nf4,nf4h")).split(",")
    if unknown := [d for d in dtypes if d not in DTYPES]:
        sys.exit(f"unknown dtypes {unknown}; known: {list(DTYPES)}")
    for f in (SOURCE, PEFTRT):
        if not f.exists():
            sys.exit(f"{f} is missing: run `make models build` first")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    if a.adapters:
        report, lines = adapters_main(a, dtypes)
        write_report(report, lines, a.out or "reports/bench-adapters.json")
        return
    ensure_llama_cpp()
    models = {d: prepare(d) for d in dtypes}

    binary = PEFTRT.stat().st_mtime_ns  # a shared target dir can be rebuilt under us mid-run
    runs = {d: {"peftrt": [], "llamacpp": []} for d in dtypes}
    for r in range(1, a.rounds + 1):
        for d in dtypes:
            gguf, pdir = models[d]
            runs[d]["peftrt"].append(peftrt_bench(pdir, a.threads))
            runs[d]["llamacpp"].append(run_json([sys.executable, __file__, "--llamacpp-bench", str(gguf), str(a.threads)]))
            p, l = runs[d]["peftrt"][-1], runs[d]["llamacpp"][-1]
            print(f"round {r}/{a.rounds} {d}: peftrt {p['prefill_tok_s']:.1f}/{p['decode_tok_s']:.1f}, "
                  f"llama.cpp {l['prefill_tok_s']:.1f}/{l['decode_tok_s']:.1f} tok/s (prefill/decode)", flush=True)

    med = lambda rs, k: statistics.median(x[k] for x in rs)
    results = []
    for d in dtypes:
        p, l = runs[d]["peftrt"], runs[d]["llamacpp"]
        row = {"dtype": d}
        for k in ("prefill", "decode"):
            row[f"peftrt_{k}_tok_s"], row[f"llamacpp_{k}_tok_s"] = med(p, f"{k}_tok_s"), med(l, f"{k}_tok_s")
            row[f"{k}_ratio"] = row[f"peftrt_{k}_tok_s"] / row[f"llamacpp_{k}_tok_s"]
        row["peftrt_peak_rss_bytes"], row["peftrt_load_ms"] = med(p, "peak_rss_bytes"), med(p, "load_ms")
        row["rounds"] = runs[d]
        results.append(row)

    info = machine()
    if PEFTRT.stat().st_mtime_ns != binary:
        sys.exit(f"{PEFTRT} was rebuilt during the run: the peftrt numbers mix two builds; run again")
    report = {"machine": info, "threads": a.threads, "prompt_tokens": PROMPT_TOKENS, "gen_tokens": GEN_TOKENS,
              "repeat": REPEAT, "rounds": a.rounds, "source": str(SOURCE), "results": results}
    lines = [f"{info['cpu']}, {info['cores']} cores, {a.threads} threads; {info['date']}; peftrt {info['git_commit']}, "
             f"llama-cpp-python {info['llama_cpp_python']}; median of {a.rounds} rounds (tok/s)", "",
             "| dtype | peftrt prefill | llama.cpp prefill | ratio | peftrt decode | llama.cpp decode | ratio | peftrt peak RSS |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for x in results:
        lines.append(f"| {x['dtype']} | {x['peftrt_prefill_tok_s']:.1f} | {x['llamacpp_prefill_tok_s']:.1f} | {x['prefill_ratio']:.2f} "
                     f"| {x['peftrt_decode_tok_s']:.1f} | {x['llamacpp_decode_tok_s']:.1f} | {x['decode_ratio']:.2f} "
                     f"| {x['peftrt_peak_rss_bytes'] / 2**20:.0f} MiB |")
    write_report(report, lines, a.out or "reports/bench.json")


def write_report(report, lines, out):
    print("\n" + "\n".join(lines))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--llamacpp-bench"]:
        llamacpp_bench(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["--llamacpp-quantize"]:
        llamacpp_quantize(*sys.argv[2:5])
    else:
        main()
