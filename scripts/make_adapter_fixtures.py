#!/usr/bin/env python3
"""Generate the LoRA adapter fixtures in tests/fixtures/adapters/.

PEFT adapters (adapter_config.json + adapter_model.safetensors) on the tiny base models of
scripts/make_fixtures.py, with random non-zero lora_A / lora_B (and DoRA magnitudes), plus
`reference.safetensors` with PEFT's logits and a merged model directory. See
tests/fixtures/adapters/README.md for the contents.

Usage (from the repository root):  .venv/bin/python scripts/make_adapter_fixtures.py [--check]

Needs the base fixtures (tests/fixtures/tiny-llama, tests/fixtures/tiny-qwen2) to exist.
Deterministic: fixed seeds, one CPU thread, float32, eager attention; two runs give byte-identical
files. `--check` regenerates into a temporary directory and compares byte-for-byte.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixturelib import check_regeneration  # noqa: E402
# Importing make_fixtures also sets one CPU thread, deterministic algorithms, quiet logging.
from make_fixtures import (  # noqa: E402
    DEFAULT_OUT as FIXTURES,
    check_reference_file,
    forward_logits,
    legacy_rope_config,
    normalize_config_json,
    save_safetensors,
    write_json,
)

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

DEFAULT_OUT = FIXTURES / "adapters"
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# name -> (base fixture, seed, LoraConfig kwargs)
ADAPTERS: dict[str, tuple[str, int, dict]] = {
    "llama-qv": ("tiny-llama", 101, dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    "llama-all-rslora": ("tiny-llama", 102, dict(r=4, lora_alpha=8, target_modules="all-linear",
                                                 use_rslora=True)),
    "llama-patterns": ("tiny-llama", 103, dict(
        r=8, lora_alpha=16, target_modules=ATTN + MLP,
        rank_pattern={"k_proj": 2, "layers.1.mlp.down_proj": 4}, alpha_pattern={"o_proj": 32})),
    "llama-layers": ("tiny-llama", 104, dict(r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"],
                                             layers_to_transform=[1], layers_pattern="layers")),
    "llama-dora": ("tiny-llama", 105, dict(r=4, lora_alpha=8,
                                           target_modules=["q_proj", "v_proj", "down_proj"],
                                           use_dora=True)),
    "qwen2-qkvo": ("tiny-qwen2", 106, dict(r=8, lora_alpha=16, target_modules=ATTN)),
}
LORA_STD = 0.1        # std of the random lora_A / lora_B entries
DORA_HALF = 0.5  # the llama-dora adapter is also evaluated at this scale
MAGNITUDE_NOISE = 0.1  # DoRA magnitude = initial (row norm of W) * (1 + 0.1 * N(0, 1))
ON_BF16 = ["llama-all-rslora", "llama-dora"]  # also evaluated on tiny-llama-bf16
TWO = [("llama-qv", 1.0), ("llama-all-rslora", 0.5)]  # logits_two_llama: adapters and scales


def load_base(base: str):
    m = AutoModelForCausalLM.from_pretrained(FIXTURES / base, dtype=torch.float32,
                                             attn_implementation="eager")
    return m.eval()


def tokens_b(base: str) -> list[int]:
    with safe_open(str(FIXTURES / base / "reference.safetensors"), framework="pt") as f:
        return f.get_tensor("tokens_b").tolist()


def lora_layers(model) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def randomise(model, seed: int, std: float = LORA_STD) -> None:
    """lora_A, lora_B ~ std·N(0, 1) and DoRA magnitudes × (1 + MAGNITUDE_NOISE·N(0, 1)), drawn in
    parameter-name order from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(std * torch.randn(p.shape, generator=g))
            elif ".lora_magnitude_vector." in name:
                p.mul_(1.0 + MAGNITUDE_NOISE * torch.randn(p.shape, generator=g))


def check_semantics(name: str, model) -> None:
    """Check the per-layer scaling (and DoRA's formula) against the documented PEFT semantics."""
    cfg = ADAPTERS[name][2]
    layers = lora_layers(model)
    assert layers, name
    g = torch.Generator().manual_seed(0)
    for lname, layer in layers:
        r, alpha = layer.r["default"], layer.lora_alpha["default"]
        exp_r, exp_alpha = cfg["r"], cfg["lora_alpha"]
        for pat, v in cfg.get("rank_pattern", {}).items():  # suffix match at a "." boundary
            if lname == pat or lname.endswith("." + pat):
                exp_r = v
                break
        for pat, v in cfg.get("alpha_pattern", {}).items():
            if lname == pat or lname.endswith("." + pat):
                exp_alpha = v
                break
        assert (r, alpha) == (exp_r, exp_alpha), (name, lname, r, alpha)
        assert tuple(layer.lora_A["default"].weight.shape) == (r, layer.in_features)
        exp_scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        assert layer.scaling["default"] == exp_scale, (name, lname, layer.scaling)
        # One projection, recomputed by hand: y = W x (+ b) + s B A x, or DoRA.
        x = torch.randn(3, layer.in_features, generator=g)
        W, b = layer.base_layer.weight, layer.base_layer.bias
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            got = layer(x)
            if cfg.get("use_dora"):
                mag = layer.lora_magnitude_vector["default"].weight
                merged = W + exp_scale * (B @ A)
                norm = torch.linalg.norm(merged, dim=1)  # per output row
                exp = (x @ merged.T) * (mag / norm)
            else:
                exp = x @ W.T + exp_scale * (x @ A.T @ B.T)
            if b is not None:
                exp = exp + b
        err = float((got - exp).abs().max())
        assert err <= 1e-5 * float(exp.abs().max()), (name, lname, err)


def save_adapter(model, base: str, out: Path) -> None:
    model.peft_config["default"].base_model_name_or_path = base  # a fixture name, not a path
    # save_embedding_layers=False: no embeddings are adapted, and "auto" looks the base up online.
    model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's generated model card
    # PEFT keeps target_modules as a set: its saved order depends on the string hash seed.
    cfg = json.loads((out / "adapter_config.json").read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    write_json(out / "adapter_config.json", cfg)
    # Rewrite with the sorted-header writer (same tensors, same {"format": "pt"} metadata).
    path = out / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    save_safetensors(load_file(str(path)), path, meta)


def make_all(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    summary: dict = {}
    toks = {b: tokens_b(b) for b in sorted({v[0] for v in ADAPTERS.values()})}
    for b, ids in toks.items():
        tensors[f"tokens_b_{b.replace('-', '_')}"] = torch.tensor(ids, dtype=torch.int32)

    base_logits = {}
    for name, (base, seed, kw) in ADAPTERS.items():
        if base not in base_logits:
            base_logits[base] = forward_logits(load_base(base), toks[base])
        cfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **kw)
        model = get_peft_model(load_base(base), cfg).eval()
        randomise(model, seed)
        check_semantics(name, model)
        live = forward_logits(model, toks[base])
        save_adapter(model, base, out / name)
        # The reference comes from the adapter as saved, reloaded by PEFT.
        reloaded = PeftModel.from_pretrained(load_base(base), out / name).eval()
        logits = forward_logits(reloaded, toks[base])
        assert torch.equal(logits, live), name
        delta = float((logits - base_logits[base]).abs().max())
        assert delta > 1e-2 * float(base_logits[base].abs().max()), (name, delta)
        key = name.replace("-", "_")
        tensors[f"logits_{key}"] = logits
        metadata[f"base_{key}"] = base
        summary[name] = {"max_abs_delta": delta, "max_abs_logit": float(logits.abs().max()),
                         "n_lora_layers": len(lora_layers(model))}

        if name == "llama-dora":  # DoRA's row norm depends on the scale: check a second one
            for _, layer in lora_layers(reloaded):
                layer.set_scale("default", DORA_HALF)
            half = forward_logits(reloaded, toks[base])
            d = float((half - logits).abs().max())
            assert d > 1e-2 * float(logits.abs().max()), d
            tensors["logits_llama_dora_half"] = half
            metadata["base_llama_dora_half"] = base
            metadata["llama_dora_half_scale"] = str(DORA_HALF)

        if name == "llama-qv":  # merged copy, as a full model directory
            mdir = out / "merged-llama-qv"
            merged = reloaded.merge_and_unload()
            merged.save_pretrained(mdir, safe_serialization=True)
            legacy_rope_config(mdir / "config.json")
            normalize_config_json(mdir / "generation_config.json")
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(FIXTURES / base / f, mdir / f)
            m2 = load_base_dir(mdir)
            lm = forward_logits(m2, toks[base])
            err = float((lm - logits).abs().max())
            assert err <= 1e-4 * float(logits.abs().max()), err
            tensors["logits_merged_llama_qv"] = lm
            metadata["base_merged_llama_qv"] = base
            summary["merged-llama-qv"] = {"max_err_vs_unmerged": err}

    # Adapters trained on tiny-llama, applied on its BF16 copy (same weights rounded; the base
    # fingerprint matches): PEFT in f32 on the BF16 weights, which peftrt must match within its
    # BF16 tolerance (it may hold these adapters in bf16 on such a base).
    for name in ON_BF16:
        base, bf = ADAPTERS[name][0], "tiny-llama-bf16"
        ids = tokens_b(bf)
        tensors[f"tokens_b_{bf.replace('-', '_')}"] = torch.tensor(ids, dtype=torch.int32)
        m = PeftModel.from_pretrained(load_base(bf), out / name).eval()
        key = f"{name.replace('-', '_')}_on_bf16"
        tensors[f"logits_{key}"] = forward_logits(m, ids)
        metadata[f"base_{key}"] = bf

    # Two adapters active at once, the second at half scale.
    (n1, s1), (n2, s2) = TWO
    base = ADAPTERS[n1][0]
    assert ADAPTERS[n2][0] == base
    model = PeftModel.from_pretrained(load_base(base), out / n1, adapter_name=n1)
    model.load_adapter(out / n2, adapter_name=n2)
    model.base_model.set_adapter([n1, n2])
    model.eval()
    for _, layer in lora_layers(model):
        for n, s in TWO:
            layer.set_scale(n, s)  # scaling = s * alpha / r (or s * alpha / sqrt(r) with rslora)
    for _, layer in lora_layers(model):
        if n2 in layer.scaling:
            assert layer.scaling[n2] == s2 * 8 / math.sqrt(4), layer.scaling
    logits = forward_logits(model, toks[base])
    for n, _ in TWO:
        d = float((logits - tensors[f"logits_{n.replace('-', '_')}"]).abs().max())
        assert d > 1e-2 * float(logits.abs().max()), (n, d)
    tensors["logits_two_llama"] = logits
    metadata["base_two_llama"] = base
    metadata["two_llama_adapters"] = ",".join(n for n, _ in TWO)
    metadata["two_llama_scales"] = ",".join(str(s) for _, s in TWO)
    metadata["two_llama_scale_method"] = (
        "LoraLayer.set_scale(adapter, s) on every LoRA layer: scaling = s*alpha/r "
        "(s*alpha/sqrt(r) with use_rslora); outputs of active adapters are summed")

    metadata["generator"] = (
        f"scripts/make_adapter_fixtures.py (peft {peft.__version__}, transformers "
        f"{transformers.__version__}, torch {torch.__version__.split('+')[0]})")
    metadata["lora_init"] = (f"lora_A, lora_B ~ {LORA_STD}*N(0,1); DoRA magnitude = row norm of W "
                             f"* (1 + {MAGNITUDE_NOISE}*N(0,1))")
    ref = out / "reference.safetensors"
    save_safetensors(tensors, ref, metadata)
    check_reference_file(ref, tensors, metadata)
    return summary


def load_base_dir(d: Path):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temp dir and compare with --out byte-for-byte")
    args = ap.parse_args()

    if args.check:
        return check_regeneration("adapter fixtures", args.out, make_all)

    for n in [*ADAPTERS, "merged-llama-qv"]:  # start clean so no stale files survive
        if (args.out / n).exists():
            shutil.rmtree(args.out / n)
    summary = make_all(args.out)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
