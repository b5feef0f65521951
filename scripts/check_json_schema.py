"""Validates replies against JSON Schemas with Python's `jsonschema` (the reference validator),
formats included: the constrained-decoding tests (tests/tests/constrained.rs) write one JSON
line per reply, {"schema": PATH, "text": REPLY, "what": LABEL}, and this exits 1 naming every
reply that is not JSON or breaks its schema.

Usage: python scripts/check_json_schema.py REPLIES.jsonl
"""
import json
import sys

import jsonschema


def main():
    bad, n = [], 0
    validators = {}
    for line in open(sys.argv[1], encoding="utf-8"):
        r = json.loads(line)
        if r["schema"] not in validators:
            schema = json.load(open(r["schema"], encoding="utf-8"))
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)
            validators[r["schema"]] = cls(schema, format_checker=cls.FORMAT_CHECKER)
        n += 1
        try:
            value = json.loads(r["text"])
        except json.JSONDecodeError as e:
            bad.append(f"{r['what']}: not JSON ({e}): {r['text']!r}")
            continue
        errors = [e.message for e in validators[r["schema"]].iter_errors(value)]
        if errors:
            bad.append(f"{r['what']}: {errors[0]}: {r['text']!r}")
    for b in bad:
        print(b)
    print(f"check_json_schema: {n - len(bad)} of {n} replies valid")
    sys.exit(1 if bad or n == 0 else 0)


if __name__ == "__main__":
    main()
