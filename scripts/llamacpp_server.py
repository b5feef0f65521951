"""llama.cpp's `llama-server`, the serving peer of peftrt's batching engine (issue 21).

- `build()`: `llama-server` and `llama-quantize` from the llama.cpp source vendored in the PyPI
  sdist of llama-cpp-python (the version pinned in scripts/requirements-bench.txt), CMake with
  GGML_NATIVE, in models/bench/llama.cpp/ (cached; about 10 minutes on 2 cores).
- `base_gguf(dtype)`: the SmolLM2 Q4_1 GGUF requantised by that `llama-quantize` (allow-requantize):
  BF16 for peftrt's BF16 import, Q4_0 beside peftrt's NF4 (as scripts/bench.py pairs them).
- `lora_gguf(dir)`: a PEFT adapter converted by that source's `convert_lora_to_gguf.py`, in F32
  (peftrt keeps adapter tensors in F32 too).
- `Server`: `llama-server -np N -cb` with every adapter loaded at scale 0
  (`--lora-init-without-apply`); each request picks its own with `"lora": [{"id", "scale"}]`.
  llama.cpp batches only requests whose LoRA sets are equal (tools/server/README.md).
- `run_round()`: every request sent at once, streamed; tokens timed on arrival, client side.
  Aggregate decode tok/s counts the tokens that arrived after the last request got its first
  one, over the time from then to the end: the same rule as `peftrt bench --parallel`.

Used by scripts/bench_engine.py and scripts/bench_serve.py with --llamacpp; `python scripts/llamacpp_server.py --build` only builds.
"""
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "models/bench/llama.cpp"
SOURCE_GGUF = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_HF = ROOT / "models/smollm2-135m-instruct"  # config.json for the LoRA converter
QUANT = {"f32": "F32", "bf16": "BF16", "nf4": "Q4_0"}


def pinned_version():
    for line in (ROOT / "scripts/requirements-bench.txt").read_text().splitlines():
        if line.startswith("llama-cpp-python=="):
            return line.split("==", 1)[1].strip()
    sys.exit("scripts/requirements-bench.txt pins no llama-cpp-python version")


def source_dir():
    version = pinned_version()
    src = WORK / f"llama_cpp_python-{version}" / "vendor/llama.cpp"
    if not (src / "CMakeLists.txt").exists():
        WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(WORK)], check=True)
        with tarfile.open(WORK / f"llama_cpp_python-{version}.tar.gz") as t:
            t.extractall(WORK, filter="data")
    return src


def build():
    """Paths of llama-server and llama-quantize, built once."""
    src = source_dir()
    bins = src / "build/bin"
    server, quantize = bins / "llama-server", bins / "llama-quantize"
    if not (server.exists() and quantize.exists()):
        print(f"building llama-server from {src.relative_to(ROOT)} (several minutes)...", flush=True)
        subprocess.run(["cmake", "-B", "build", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=ON",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DCMAKE_BUILD_TYPE=Release"],
                       cwd=src, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", "build", "--target", "llama-server", "llama-quantize",
                        f"-j{os.cpu_count()}"], cwd=src, check=True, stdout=subprocess.DEVNULL)
    return server, quantize


def commit_of(src):
    """The llama.cpp commit the sdist vendors, when it says (its build info)."""
    info = src / "build/common/build-info.cpp"
    if info.exists():
        for line in info.read_text().splitlines():
            if "LLAMA_COMMIT" in line and '"' in line:
                return line.split('"')[1]
    return None


def base_gguf(dtype):
    _, quantize = build()
    out = WORK / f"smollm2-{dtype}.gguf"
    if not out.exists():
        tmp = out.with_suffix(".gguf.tmp")
        subprocess.run([quantize, "--allow-requantize", SOURCE_GGUF, tmp, QUANT[dtype]], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp.rename(out)
    return out


def lora_gguf(adapter_dir):
    adapter_dir = Path(adapter_dir)
    out = WORK / "adapters" / f"{adapter_dir.name}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        src = source_dir()
        tmp = out.with_suffix(".gguf.tmp")
        env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
        subprocess.run([sys.executable, src / "convert_lora_to_gguf.py", "--base", BASE_HF, "--outtype", "f32",
                        "--outfile", tmp, adapter_dir], env=env, check=True, capture_output=True)
        tmp.rename(out)
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """llama-server on 127.0.0.1 with `slots` parallel sequences of `ctx_per_slot` tokens each."""

    def __init__(self, model, slots, ctx_per_slot, loras, threads):
        server, _ = build()
        self.port = free_port()
        cmd = [server, "-m", model, "--host", "127.0.0.1", "--port", str(self.port), "-t", str(threads),
               "-tb", str(threads), "-np", str(slots), "-cb", "-c", str(slots * ctx_per_slot), "--no-webui",
               "--cache-reuse", "0", "--lora-init-without-apply"]
        if loras:
            cmd += ["--lora", ",".join(map(str, loras))]
        self.log = open(WORK / "llama-server.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}); see {WORK / 'llama-server.log'}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.close()
                raise RuntimeError("llama-server did not become healthy in 120 s")
            time.sleep(0.2)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def stream_one(port, body, arrivals, out, t0):
    """One streamed /completion; `arrivals` gets (time, tokens) per chunk."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        out["error"] = f"HTTP {r.status}: {r.read()[:300]!r}"
        return
    first, seen = None, 0
    for line in r:
        if not line.startswith(b"data: "):
            continue
        chunk = json.loads(line[6:])
        now = time.perf_counter()
        # `tokens_predicted` counts the request's tokens so far (a chunk may carry several).
        n = chunk.get("tokens_predicted", seen) - seen
        if n > 0:
            arrivals.append((now, n))
            seen += n
            first = first or now
        if chunk.get("stop"):
            out["ttft_ms"] = ((first or now) - t0) * 1e3
            out["tokens"] = seen
            break


def run_round(port, prompts, loras_of, gen_tokens):
    """All `prompts` at once; `loras_of(i)` is request i's `lora` list. Returns the round's timings."""
    t0 = time.perf_counter()
    arrivals = [[] for _ in prompts]
    outs = [{} for _ in prompts]
    threads = []
    for i, p in enumerate(prompts):
        body = {"prompt": p, "n_predict": gen_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
                "cache_prompt": False, "lora": loras_of(i)}
        th = threading.Thread(target=stream_one, args=(port, body, arrivals[i], outs[i], t0))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    end = time.perf_counter()
    for o in outs:
        if "error" in o:
            raise RuntimeError(o["error"])
    all_started = max(a[0][0] for a in arrivals)
    after = sum(n for a in arrivals for t, n in a if t > all_started)
    streams = []
    for a in arrivals:
        toks = sum(n for _, n in a) - a[0][1]
        streams.append(toks / (a[-1][0] - a[0][0]) if a[-1][0] > a[0][0] else float("nan"))
    return {"aggregate_tok_s": after / (end - all_started), "ttft_ms": [o["ttft_ms"] for o in outs],
            "per_stream_tok_s": streams, "tokens": [o["tokens"] for o in outs]}


if __name__ == "__main__":
    if sys.argv[1:] == ["--build"]:
        print(*build(), sep="\n")
    else:
        sys.exit(__doc__)
