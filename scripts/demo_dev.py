#!/usr/bin/env python3
"""Score a JSON adapter of the demo on the development split, never on the test split.

The demo's settings are chosen on the development split of `scripts/demo_data.py`: held out from
training like the test split, with names, places, phrasings and an item style of its own, so it
measures what the test split measures (wordings never trained on) while the test split stays
untouched until the report. This script writes that split, asks `peftrt batch` for the replies
(greedy, the demo's short instruction and token limit) and prints schema-valid, exact-match and
field accuracy (the share of the expected object's leaf values and list lengths the reply gets
right: finer-grained than exact match on a small draw).

    scripts/demo_dev.py --model runs/demo/base-nf4/m --adapter runs/demo/adapter-json --out DIR
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo  # noqa: E402  (the demo's prompt, parser and scoring)

ROOT = Path(__file__).resolve().parent.parent


def leaves(value, path=""):
    """(path, value) for every leaf of a JSON value, plus the length of every list."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(value, list):
        yield f"{path}.len", len(value)
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, value


def field_accuracy(verdicts, tests):
    right = total = 0
    missing = object()
    for verdict, t in zip(verdicts, tests, strict=True):
        want = dict(leaves(t["target"]))
        got = verdict["value"] if verdict["json"] else None
        got = dict(leaves(got)) if got is not None else {}
        total += len(want)
        right += sum(got.get(k, missing) == v for k, v in want.items())
    return right / total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the base the adapter is served on")
    ap.add_argument("--adapter", type=Path, action="append", default=[], help="adapter directory (repeatable)")
    ap.add_argument("--out", type=Path, required=True, help="where the draw, requests and replies go")
    ap.add_argument("--seed", type=int, default=1234, help="the data's seed (the demo's)")
    ap.add_argument("--n", type=int, default=100, help="requests in the development split")
    ap.add_argument("--peftrt", type=Path, default=ROOT / "target/release/peftrt")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--truncate", type=int, default=0,
                    help="cut descriptions to this many characters (the tiny model's context, as `demo.py --tiny`)")
    a = ap.parse_args()

    a.out.mkdir(parents=True, exist_ok=True)
    demo.sh([sys.executable, ROOT / "scripts/demo_data.py", "--out", a.out / "draw", "--seed", a.seed,
             "--train", 1, "--test", 1, "--dev", a.n, "--general-train", 1, "--general-test", 1],
            stdout=subprocess.DEVNULL)
    tests = demo.read_jsonl(a.out / "draw/dev.jsonl")
    if a.truncate:
        tests = [dict(t, description=t["description"][:a.truncate]) for t in tests]
    demo.write_jsonl(a.out / "requests.jsonl",
                     [{"id": t["id"], "messages": demo.short_messages(t["description"])} for t in tests])
    demo.sh([a.peftrt, "batch", "--model", a.model, "--input", a.out / "requests.jsonl",
             "--out", a.out / "results.jsonl", "--max-tokens", a.max_tokens,
             *(x for ad in a.adapter for x in ("--adapter", ad))])
    results = demo.read_jsonl(a.out / "results.jsonl")
    verdicts = demo.judge_replies(a.peftrt, a.out / "results.jsonl", ROOT / "data/demo/order.schema.json")
    s = demo.score_rows(results, tests, verdicts)
    s["field_accuracy"] = field_accuracy(verdicts, tests)
    (a.out / "score.json").write_text(json.dumps(s, indent=1) + "\n")
    print(f"{s['n']} requests: JSON {demo.pct(s['parse_rate'])}, schema-valid {demo.pct(s['schema_valid_rate'])}, "
          f"exact {demo.pct(s['exact_match_rate'])}, fields {demo.pct(s['field_accuracy'])}")


if __name__ == "__main__":
    main()
