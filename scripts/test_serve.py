#!/usr/bin/env python3
"""`peftrt serve` end to end with the real `openai` Python client (issue 22).

Starts the server (on 127.0.0.1, a port the OS picks) on the tiny fixture model and on
SmolLM2-135M-Instruct with LoRA adapters, and checks:
- list models; chat and completion, streamed and not (the tiny fixture);
- 16 requests over 4 adapters, the base and a mix of two, 8 at a time: every reply's text equals
  that of the same request run alone with `peftrt generate --chat` (greedy, same adapters and scales,
  same max tokens);
- a `response_format` json_schema reply validates against its schema;
- load, use, then unload an adapter (only from under --adapter-dir);
- every error case with its status code (malformed JSON, unknown model, over-long prompt, bad
  schema, oversized body, missing/wrong API key, adapter paths out of --adapter-dir, full queue
  with Retry-After);
- a client killed mid-stream leaves no active sequence (/metrics);
- SIGINT with a request running: the server stops within its shutdown timeout, exit status 0;
  SIGINT while loading: exit status 0;
- a bounded load test: 32 clients on mixed adapters for --load-seconds, no 5xx, p99 time to first
  token reported.

Usage: scripts/test_serve.py --peftrt target/release/peftrt --smollm2 models/smollm2-135m-instruct \\
           --adapters models/reference/adapters [--load-seconds 60]
Ends with "N passed, N failed"; exit status 1 if any check failed.
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jsonschema
import openai

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-3f9c"
results = {"passed": 0, "failed": 0}


def check(name, fn):
    t = time.time()
    try:
        fn()
    except Exception as e:  # a failed check is reported and the others still run
        results["failed"] += 1
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
    else:
        results["passed"] += 1
        print(f"ok   {name} ({time.time() - t:.1f} s)", flush=True)


class Server:
    """peftrt serve on 127.0.0.1, port 0 (the OS picks a free one; the server prints it)."""

    def __init__(self, peftrt, args, wait=True):
        self.p = subprocess.Popen([str(peftrt), "serve", "--host", "127.0.0.1", "--port", "0", *map(str, args)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines = []
        self.url = None
        self.ready = threading.Event()
        self.loading = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if wait:
            if not self.ready.wait(120) or self.url is None:
                self.kill()
                raise RuntimeError("the server did not start:\n" + "".join(self.lines))

    def _read(self):
        for line in self.p.stderr:
            self.lines.append(line)
            if "loading" in line:
                self.loading.set()
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                self.ready.set()
        self.ready.set()
        self.loading.set()

    @property
    def port(self):
        return int(self.url.rsplit(":", 1)[1])

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=300)

    def stop(self, sig=signal.SIGINT, timeout=30):
        """Sends `sig`; returns (exit status, seconds until it exited)."""
        t = time.time()
        self.p.send_signal(sig)
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the server did not exit within {timeout} s of signal {sig}")
        return rc, time.time() - t

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def raw(server, method, path, body=b"", key=KEY, headers=None):
    """One request with http.client: (status, headers, body bytes)."""
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), data


def expect_error(status, fn, code=None):
    """`fn` raises the openai client's error for `status`, with OpenAI's error JSON."""
    try:
        fn()
    except openai.APIStatusError as e:
        assert e.status_code == status, f"status {e.status_code}, expected {status}: {e.message}"
        body = e.body if isinstance(e.body, dict) else {}
        assert "message" in body and "type" in body, f"not OpenAI's error JSON: {e.body}"
        if code:
            assert body.get("code") == code, f"code {body.get('code')}, expected {code}"
        return
    raise AssertionError(f"no error; expected {status}")


def raw_error(status, got):
    s, _, data = got
    assert s == status, f"status {s}, expected {status}: {data[:300]!r}"
    e = json.loads(data)["error"]
    assert set(e) >= {"message", "type", "param", "code"}, e


def metric(server, name):
    _, _, data = raw(server, "GET", "/metrics")
    m = re.search(rf"^{re.escape(name)} (\S+)$", data.decode(), re.M)
    assert m, f"/metrics has no {name}"
    return float(m.group(1))


def wait_idle(server, seconds, what, queue=False):
    """Waits until /metrics shows no active sequence (and, with `queue`, no queued request);
    fails with `what` after `seconds`."""
    t = time.time()
    while metric(server, "peftrt_active_sequences") != 0 or (queue and metric(server, "peftrt_queue_depth") != 0):
        assert time.time() - t < seconds, what
        time.sleep(0.1)


def generate_alone(a, adapters, prompt, max_tokens):
    """The reply of `peftrt generate --chat` (greedy) with `adapters` [(dir, scale)]."""
    cmd = [str(a.peftrt), "generate", "--model", str(a.smollm2), "--chat", "--prompt", prompt,
           "--max-tokens", str(max_tokens), "--threads", str(a.threads)]
    for d, s in adapters:
        cmd += ["--adapter", f"{d}:{s}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    assert out.endswith("\n")
    return out[:-1]  # generate ends the reply with a newline


def variant(src, dst, alpha):
    """A copy of adapter `src` with another lora_alpha (another adapter, same shapes)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "adapter_model.safetensors", dst / "adapter_model.safetensors")
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(dict(cfg, lora_alpha=alpha)))


def stream_text(chunks):
    text, finish, usage = "", None, None
    for c in chunks:
        if c.usage:
            usage = c.usage
        for ch in c.choices:
            text += (ch.delta.content or "") if hasattr(ch, "delta") else (ch.text or "")
            finish = ch.finish_reason or finish
    return text, finish, usage


def tiny_tests(a, tmp):
    root = tmp / "tiny-adapters"
    (root / "qv").mkdir(parents=True)
    qv = a.fixtures / "adapters/llama-qv"
    for f in ["adapter_config.json", "adapter_model.safetensors"]:
        shutil.copyfile(qv / f, root / "qv" / f)
    os.symlink(qv, root / "escape")  # a link out of --adapter-dir
    s = Server(a.peftrt, ["--model", a.fixtures / "tiny-llama", "--adapter", f"qv={qv}", "--api-key", KEY,
                          "--ctx-size", "64", "--max-body-bytes", "65536", "--adapter-dir", root, "--threads", "1"])
    c = s.client()
    try:
        def models():
            ids = [m.id for m in c.models.list().data]
            assert ids == ["tiny-llama", "qv"], ids
        check("tiny: list models", models)

        def chat():
            msgs = [{"role": "user", "content": "hello"}]
            r = c.chat.completions.create(model="qv", messages=msgs, max_tokens=10, temperature=0)
            assert r.object == "chat.completion" and r.model == "qv"
            assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
            st = c.chat.completions.create(model="qv", messages=msgs, max_tokens=10, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
            text, finish, usage = stream_text(st)
            assert text == r.choices[0].message.content, (text, r.choices[0].message.content)
            assert finish == r.choices[0].finish_reason and usage.total_tokens == r.usage.total_tokens
        check("tiny: chat, streamed and not, the same text", chat)

        def completion():
            r = c.completions.create(model="tiny-llama", prompt="one two", max_tokens=6, temperature=0)
            assert r.object == "text_completion" and r.usage.completion_tokens == 6, r
            st = c.completions.create(model="tiny-llama", prompt="one two", max_tokens=6, temperature=0, stream=True)
            text, finish, _ = stream_text(st)
            assert text == r.choices[0].text and finish == "length"
        check("tiny: completion, streamed and not, the same text", completion)

        def errors():
            msgs = [{"role": "user", "content": "hi"}]
            expect_error(404, lambda: c.chat.completions.create(model="nope", messages=msgs), "model_not_found")
            expect_error(400, lambda: c.chat.completions.create(model="qv", messages=[
                {"role": "user", "content": "word " * 100}]), "context_length_exceeded")
            bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}
            expect_error(400, lambda: c.chat.completions.create(model="qv", messages=msgs, response_format=bad_schema))
            expect_error(400, lambda: c.chat.completions.create(model="qv", messages=msgs, n=2))
            expect_error(401, lambda: s.client("wrong").models.list())
            raw_error(401, raw(s, "GET", "/v1/models", key=None))
            assert raw(s, "GET", "/health", key=None)[0] == 200
            raw_error(400, raw(s, "POST", "/v1/chat/completions", b'{"model": "qv", "messages": ['))
            raw_error(413, raw(s, "POST", "/v1/completions", json.dumps({"model": "qv", "prompt": "x" * 70000}).encode()))
            for path in ["escape", "../", "/etc", str(qv)]:
                body = json.dumps({"lora_name": "x", "lora_path": path}).encode()
                raw_error(403, raw(s, "POST", "/v1/load_lora_adapter", body))
            raw_error(404, raw(s, "POST", "/v1/unload_lora_adapter", b'{"lora_name": "nope"}'))
        check("tiny: each error case gets its status and OpenAI's error JSON", errors)
    finally:
        def idle_stop():
            rc, secs = s.stop()
            assert rc == 0 and secs < 5, f"exit status {rc} after {secs:.1f} s"
        check("tiny: SIGINT when idle stops at once with status 0", idle_stop)


def smollm2_tests(a, tmp):
    adir = tmp / "adapters"
    ref = a.adapters
    variant(ref / "all-linear-r16", adir / "a8", 8)
    variant(ref / "all-linear-r16", adir / "a24", 24)
    variant(ref / "all-linear-r16", adir / "a12", 12)
    served = {"qkvo": (ref / "qkvo-r16", 1.0), "all": (ref / "all-linear-r16", 0.5),
              "a8": (adir / "a8", 1.0), "a24": (adir / "a24", 1.0)}
    args = ["--model", a.smollm2, "--threads", a.threads, "--max-sequences", 8, "--max-queue", 24,
            "--adapter-dir", adir, "--api-key", KEY, "--shutdown-timeout", 3]
    for name, (d, sc) in served.items():
        args += ["--adapter", f"{name}={d}:{sc}"]
    s = Server(a.peftrt, args)
    c = s.client()
    try:
        def parity():
            prompts = ["Name three colours.", "What is the capital of France?", "Write a haiku about rain.",
                       "Give me a tip for sleeping well.", "What is 12 times 7?", "Describe a cat in one sentence.",
                       "List two fruits.", "Say hello in Spanish."]
            # 4 adapters and the base, and a mix of two through the `adapters` extension field.
            setups = [("smollm2-135m-instruct", None), ("qkvo", None), ("all", None), ("a8", None), ("a24", None),
                      ("smollm2-135m-instruct", [("qkvo", 0.7), ("a8", 0.5)])]
            reqs = [(setups[i % len(setups)], prompts[i % len(prompts)], i % 2 == 1) for i in range(16)]

            def ask(r):
                (model, mix), prompt, stream = r
                kw = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0)
                if mix:
                    kw["extra_body"] = {"adapters": [{"name": n, "scale": sc} for n, sc in mix]}
                if stream:
                    return stream_text(c.chat.completions.create(stream=True, **kw))[0]
                return c.chat.completions.create(**kw).choices[0].message.content

            with concurrent.futures.ThreadPoolExecutor(8) as ex:
                got = list(ex.map(ask, reqs))
            base = metric(s, "peftrt_batch_size_sum") / max(metric(s, "peftrt_batch_size_count"), 1)
            print(f"     16 requests, 8 at a time: mean batch {base:.1f} sequences per step")
            assert base > 1.5, "the requests did not share the engine's steps"
            for ((model, mix), prompt, stream), text in zip(reqs, got):
                ads = [served[model]] if model in served else []
                ads += [(served[n][0], sc) for n, sc in (mix or [])]
                want = generate_alone(a, ads, prompt, 24)
                assert text == want, f"{model} {mix} {prompt!r} (stream={stream}):\n server:   {text!r}\n generate: {want!r}"
        check("smollm2: 16 requests over 4 adapters + base (+ a mix), 8 at a time == peftrt generate alone", parity)

        def schema():
            sch = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                   "required": ["name", "age"], "additionalProperties": False}
            r = c.chat.completions.create(
                model="qkvo", messages=[{"role": "user", "content": "Invent a person; reply as JSON."}],
                max_tokens=64, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": sch}})
            jsonschema.validate(json.loads(r.choices[0].message.content), sch)
            assert r.choices[0].finish_reason == "stop"
        check("smollm2: response_format json_schema reply validates", schema)

        def load_use_unload():
            st, _, body = raw(s, "POST", "/v1/load_lora_adapter", json.dumps({"lora_name": "a12", "lora_path": "a12"}).encode())
            assert st == 200, body
            assert "a12" in [m.id for m in c.models.list().data]
            msgs = [{"role": "user", "content": "Name three colours."}]
            r = c.chat.completions.create(model="a12", messages=msgs, max_tokens=16, temperature=0)
            assert r.choices[0].message.content == generate_alone(a, [(adir / "a12", 1.0)], msgs[0]["content"], 16)
            # Unloaded while a request streams with it: that request keeps it to the end.
            st = c.chat.completions.create(model="a12", messages=msgs, max_tokens=48, temperature=0, stream=True)
            it = iter(st)
            first = next(it)
            st_, _, body = raw(s, "POST", "/v1/unload_lora_adapter", b'{"lora_name": "a12"}')
            assert st_ == 200, body
            text = stream_text([first, *it])[0]
            assert text == generate_alone(a, [(adir / "a12", 1.0)], msgs[0]["content"], 48), text
            expect_error(404, lambda: c.chat.completions.create(model="a12", messages=msgs, max_tokens=4))
            assert "a12" not in [m.id for m in c.models.list().data]
        check("smollm2: load, use, unload an adapter (a request running with it keeps it)", load_use_unload)

        def killed_client():
            code = ("import openai, sys\n"
                    f"c = openai.OpenAI(base_url={s.url + '/v1'!r}, api_key={KEY!r}, max_retries=0)\n"
                    "for ch in c.chat.completions.create(model='all', stream=True, max_tokens=1500, temperature=0,"
                    " messages=[{'role': 'user', 'content': 'Write a very long story about the sea.'}]):\n"
                    "    print('chunk', flush=True)\n")
            p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
            for _ in range(3):
                p.stdout.readline()
            assert metric(s, "peftrt_active_sequences") >= 1, "the stream is not running"
            p.kill()
            p.wait()
            wait_idle(s, 10, "a killed client's sequence is still active after 10 s")
            assert metric(s, 'peftrt_requests_total{outcome="cancelled"}') >= 1
            # Not streamed: a client killed while it waits for the whole reply cancels it too.
            code = ("import openai\n"
                    f"c = openai.OpenAI(base_url={s.url + '/v1'!r}, api_key={KEY!r}, max_retries=0)\n"
                    "c.chat.completions.create(model='all', max_tokens=1500, temperature=0,"
                    " messages=[{'role': 'user', 'content': 'Write a very long story about the sea.'}])\n")
            p = subprocess.Popen([sys.executable, "-c", code])
            t = time.time()
            while metric(s, "peftrt_active_sequences") < 1:
                assert time.time() - t < 30, "the request did not start"
                time.sleep(0.05)
            p.kill()
            p.wait()
            wait_idle(s, 10, "a killed client's sequence is still active after 10 s")
        check("smollm2: a client killed mid-stream (or mid-wait) leaves no active sequence", killed_client)

        def queue_full():
            # 8 running + 24 waiting is the limit: the 33rd request gets 429 with Retry-After.
            conns = []
            body = json.dumps({"model": "a8", "stream": True, "max_tokens": 1500, "temperature": 0,
                               "messages": [{"role": "user", "content": "Write a very long story about the sea."}]})
            try:
                for _ in range(32):
                    k = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
                    k.request("POST", "/v1/chat/completions", body=body,
                              headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
                    conns.append(k)
                for k in conns:
                    assert k.getresponse().status == 200
                st, h, data = raw(s, "POST", "/v1/chat/completions", body.encode())
                raw_error(429, (st, h, data))
                assert {k.lower(): v for k, v in h.items()}.get("retry-after") == "1", h
            finally:
                for k in conns:
                    k.sock.close() if k.sock else None
                    k.close()
            wait_idle(s, 15, "closed clients' requests are still running or queued", queue=True)
        check("smollm2: full queue -> 429 with Retry-After; closed clients free every slot", queue_full)

        if a.load_seconds > 0:
            check(f"smollm2: load test, 32 clients for {a.load_seconds} s, no 5xx", lambda: load_test(s, a.load_seconds))

        def graceful():
            # 10 long requests on 8 slots: 8 run and 2 wait when SIGINT comes.
            out = {}

            def long_request(i):
                try:
                    c.chat.completions.create(model="qkvo", max_tokens=1500, temperature=0, messages=[
                        {"role": "user", "content": f"Write a very long story about the sea, number {i}."}])
                    out[i] = "finished"
                except openai.APIStatusError as e:
                    out[i] = e.status_code
                except openai.APIConnectionError as e:
                    out[i] = f"connection: {e}"
            ths = [threading.Thread(target=long_request, args=(i,)) for i in range(10)]
            for th in ths:
                th.start()
            t = time.time()
            while metric(s, "peftrt_active_sequences") < 8 or metric(s, "peftrt_queue_depth") < 2:
                assert time.time() - t < 30, "the 10 requests did not all arrive"
                time.sleep(0.05)
            rc, secs = s.stop(signal.SIGINT, timeout=30)
            for th in ths:
                th.join(30)
            assert rc == 0, f"exit status {rc}"
            assert secs < 3 + 6, f"took {secs:.1f} s with --shutdown-timeout 3"
            # Cancelled at the end of the grace period (503), unless they finished before.
            assert len(out) == 10 and all(r in ("finished", 503) for r in out.values()), out
            print(f"     stopped in {secs:.1f} s; the 10 requests: {sorted(map(str, out.values()))}")
        check("smollm2: SIGINT with 8 requests running and 2 waiting: bounded stop, exit status 0", graceful)
    finally:
        s.kill()

    def ctrl_c_while_loading():
        s2 = Server(a.peftrt, ["--model", a.smollm2, "--threads", a.threads] +
                    [x for n, (d, sc) in served.items() for x in ("--adapter", f"{n}={d}:{sc}")], wait=False)
        assert s2.loading.wait(60), "the server did not start loading"
        rc, secs = s2.stop(signal.SIGINT, timeout=20)
        assert rc == 0, f"exit status {rc}:\n{''.join(s2.lines)}"
        print(f"     exited in {secs:.2f} s: {s2.lines[-1].strip()}")
    check("smollm2: Ctrl-C during load exits with status 0", ctrl_c_while_loading)


def load_test(s, seconds):
    """32 clients, each streaming chat requests in a loop on a model picked in turn; counts
    statuses and times to first token."""
    models = ["smollm2-135m-instruct", "qkvo", "all", "a8", "a24"]
    ttft, statuses, lock = [], {}, threading.Lock()
    end = time.time() + seconds

    def client(i):
        c = s.client()
        n = 0
        while time.time() < end:
            t = time.time()
            try:
                first = None
                for ch in c.chat.completions.create(
                        model=models[(i + n) % len(models)], stream=True, max_tokens=16, temperature=0.7, seed=i,
                        messages=[{"role": "user", "content": f"Tell me fact number {n} about the moon."}]):
                    if first is None and ch.choices and ch.choices[0].delta.content:
                        first = time.time() - t
                code = 200
            except openai.APIStatusError as e:
                code, first = e.status_code, None
                if code == 429:
                    time.sleep(1)
            with lock:
                statuses[code] = statuses.get(code, 0) + 1
                if first is not None:
                    ttft.append(first)
            n += 1

    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        list(ex.map(client, range(32)))
    ttft.sort()
    p = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else float("nan")
    print(f"     statuses {statuses}; time to first token p50 {p(0.5):.2f} s, p99 {p(0.99):.2f} s "
          f"over {len(ttft)} replies")
    assert not any(k >= 500 for k in statuses), statuses
    assert statuses.get(200, 0) > 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peftrt", type=Path, default=ROOT / "target/release/peftrt")
    ap.add_argument("--smollm2", type=Path, default=ROOT / "models/smollm2-135m-instruct")
    ap.add_argument("--adapters", type=Path, default=ROOT / "models/reference/adapters")
    ap.add_argument("--fixtures", type=Path, default=ROOT / "tests/fixtures")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--load-seconds", type=int, default=60)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="peftrt-serve-test-") as t:
        tiny_tests(a, Path(t))
        smollm2_tests(a, Path(t))
    print(f"{results['passed']} passed, {results['failed']} failed")
    sys.exit(1 if results["failed"] else 0)


if __name__ == "__main__":
    main()
