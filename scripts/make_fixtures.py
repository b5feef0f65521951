#!/usr/bin/env python3
"""Generate the tiny conformance fixtures in tests/fixtures/<name>/.

Each fixture is a complete Hugging Face model directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a ChatML chat_template, generation_config.json) of a
tiny randomly initialised model, plus `reference.safetensors` with reference outputs computed by
transformers on CPU in float32. See tests/fixtures/README.md for the contents.

Usage (from the repository root):  .venv/bin/python scripts/make_fixtures.py [--out DIR] [--check]

Deterministic: fixed seeds, one CPU thread, eager attention; running it twice gives byte-identical
files (with the versions pinned in scripts/requirements.txt). `--check` regenerates into a
temporary directory and compares byte-for-byte against the committed fixtures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import struct
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixturelib import check_regeneration  # noqa: E402

import torch  # noqa: E402
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values -> cache rename

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures"

# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (as SmolLM2)
BOS, EOS, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VOCAB_SIZE = 400

# ChatML, as SmolLM2-Instruct's template (default system prompt when none is given).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun all day long.",
    "A small language model can still learn the shape of the text it is trained on.",
    "In the morning the weather was cold, but by the afternoon the sun came out and the "
    "children went to play in the park near the river.",
    "Once upon a time there was a little girl who lived in a house at the edge of the forest. "
    "Every day she walked to the village to buy bread and milk for her grandmother.",
    "Fine-tuning adapts a general model to a specific task with a small amount of data. "
    "Low-rank adapters train only two thin matrices for each projection.",
    "The meeting is on Tuesday at 10:30 in room 42. Please bring the report and your notes.",
    "Water boils at 100 degrees Celsius at sea level, and freezes at 0 degrees.",
    "She said: \"I will be there in five minutes!\" Then she ran to the station.",
    "def add(a, b):\n    return a + b\n\n\ndef main():\n    print(add(2, 3))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n    else:\n        "
    "print(i, 'is odd')\n",
    "fn main() {\n    let xs: Vec<i32> = (0..10).collect();\n    let s: i32 = xs.iter().sum();\n"
    "    println!(\"sum = {}\", s);\n}\n",
    "int main(void) {\n    int x = 0;\n    for (int i = 0; i < 8; i++) {\n        x += i * i;\n"
    "    }\n    return x;\n}\n",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\nprint(x.shape)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "What is the capital of France? The capital of France is Paris.",
    "How many legs does a spider have? A spider has eight legs.",
    "You are a helpful assistant. Answer the question as well as you can.",
]


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    # As SmolLM2 / GPT-2 style byte-level BPE: single digits, then byte-level with regex split.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TRAIN_TEXT * 4, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


# Qwen2's own pre-tokenization. transformers 5's AutoTokenizer picks Qwen2Tokenizer for
# model_type qwen2 (whatever tokenizer_config.json's tokenizer_class says) and that class replaces
# tokenizer.json's normalizer/pre-tokenizer with these, so the qwen2 fixture's tokenizer.json uses
# them too (as real Qwen2 checkpoints do) and both tokenizers agree.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen2_style(tok: Tokenizer) -> Tokenizer:
    from tokenizers import Regex, normalizers

    q = Tokenizer.from_str(tok.to_str())
    q.normalizer = normalizers.NFC()
    q.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return q


def tokenizer_config(tok: Tokenizer, model_max_length: int, tokenizer_class: str) -> dict:
    added = {}
    for t in SPECIAL_TOKENS:
        added[str(tok.token_to_id(t))] = {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [BOS, EOS],
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": model_max_length,
        "pad_token": EOS,
        "tokenizer_class": tokenizer_class,
        "unk_token": UNK,
    }


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors writer with a deterministic header (sorted keys). safetensors' own writer keeps
    `__metadata__` in a Rust HashMap, whose order changes from run to run."""
    dtypes = {torch.float32: "F32", torch.int32: "I32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.uint8: "U8"}
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    h += b" " * (-len(h) % 8)
    tmp = path.with_suffix(".tmp")  # written aside, renamed into place: never half a file
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    tmp.replace(path)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    attn_implementation="eager",
)


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Larger-than-default random init so logits are peaked and greedy decoding is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                val = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            elif name.endswith(".bias"):
                val = 0.3 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name or "lm_head" in name:
                val = 0.4 * torch.randn(p.shape, generator=g)
            else:
                val = 0.15 * torch.randn(p.shape, generator=g)
            p.copy_(val.to(p.dtype))


def legacy_rope_config(path: Path) -> None:
    """Rewrite config.json's `rope_parameters` (transformers 5 style) into the legacy top-level
    `rope_theta` (+ `rope_scaling`) that most Hub checkpoints (SmolLM2, Llama 3.x) still use."""
    cfg = json.loads(path.read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    if rp.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rp
    write_json(path, cfg)


def normalize_config_json(path: Path) -> None:
    write_json(path, json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------------
# Reference outputs
# ----------------------------------------------------------------------------------------------

TEXT_A = "The quick brown fox jumps."
TEXT_B = "def main():\n    print(add(2, 3))\n\nThe sun came out and the children went to the park."
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
N_GREEDY = 16  # seeds below: 5 (llama), 4 (llama3-tied), 6 (mistral), 7 (qwen2)
N_PREFIX_INCREMENTAL = 20


def forward_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().contiguous()


def greedy_manual(model, ids: list[int], n: int) -> tuple[list[int], float]:
    """Greedy decoding by full recomputation; returns tokens and the smallest top1-top2 margin."""
    seq = list(ids)
    margin = float("inf")
    for _ in range(n):
        last = forward_logits(model, seq)[-1]
        top2 = torch.topk(last, 2).values
        margin = min(margin, float(top2[0] - top2[1]))
        seq.append(int(torch.argmax(last)))
    return seq[len(ids):], margin


def greedy_generate(model, ids: list[int], n: int) -> list[int]:
    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=model.config.pad_token_id,
        bos_token_id=model.config.bos_token_id,
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            generation_config=gc,
        )
    return out[0, len(ids):].tolist()


def incremental_logits(model, ids: list[int], prefix: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids[:prefix]]), use_cache=True)
        pkv = out.past_key_values
        rows = [out.logits[0]]
        for i in range(prefix, len(ids)):
            out = model(
                input_ids=torch.tensor([[ids[i]]]),
                past_key_values=pkv,
                use_cache=True,
                cache_position=torch.tensor([i]),
            )
            pkv = out.past_key_values
            rows.append(out.logits[0])
    return torch.cat(rows, 0).float().contiguous()


def check_reference_file(path: Path, tensors: dict, metadata: dict) -> None:
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == metadata
        assert sorted(f.keys()) == sorted(tensors)
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), tensors[k]), k


def write_reference(model_dir: Path, load_dtype: torch.dtype, description: str) -> dict:
    """Reload the saved directory with transformers and compute the reference outputs."""
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    raw_tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=load_dtype, attn_implementation="eager"
    )
    model = model.to(torch.float32).eval()

    def encode(text: str) -> list[int]:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == raw_tok.encode(text, add_special_tokens=False).ids
        assert hf_tok.decode(ids) == text
        return ids

    tokens_a = encode(TEXT_A)
    tokens_b = encode(TEXT_B)
    chat_prompt = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    tokens_chat = encode(chat_prompt)
    via_template = hf_tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    if isinstance(via_template, dict) or hasattr(via_template, "keys"):
        via_template = via_template["input_ids"]
    assert list(via_template) == tokens_chat, (via_template, tokens_chat)

    logits_a = forward_logits(model, tokens_a)
    logits_b = forward_logits(model, tokens_b)
    logits_chat = forward_logits(model, tokens_chat)
    greedy_a, margin = greedy_manual(model, tokens_a, N_GREEDY)
    gen = greedy_generate(model, tokens_a, N_GREEDY)
    assert gen == greedy_a, (gen, greedy_a)
    # Seeds were chosen so greedy decoding is varied and never near a tie: the runtime may be off
    # by up to 1e-3 * max|logit| (~0.015 here) and must still pick the same tokens.
    assert len(set(greedy_a)) >= 8, f"greedy continuation is degenerate: {greedy_a}"
    assert margin >= 0.05, f"greedy continuation has a near-tie (top1 - top2 = {margin})"
    logits_inc = incremental_logits(model, tokens_b, N_PREFIX_INCREMENTAL)
    inc_err = float((logits_inc - logits_b).abs().max())
    assert inc_err <= 1e-4 * float(logits_b.abs().max()), inc_err

    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    tensors = {
        "tokens_a": i32(tokens_a),
        "logits_a": logits_a,
        "tokens_b": i32(tokens_b),
        "logits_b": logits_b,
        "greedy_a": i32(greedy_a),
        "tokens_chat": i32(tokens_chat),
        "logits_chat": logits_chat,
        "logits_incremental": logits_inc,
    }
    metadata = {
        "chat_prompt": chat_prompt,
        "text_a": TEXT_A,
        "text_b": TEXT_B,
        "incremental_prefix": str(N_PREFIX_INCREMENTAL),
        "description": description,
        "generator": f"scripts/make_fixtures.py (transformers {transformers.__version__}, "
        f"torch {torch.__version__.split('+')[0]})",
    }
    save_safetensors(tensors, model_dir / "reference.safetensors", metadata)
    check_reference_file(model_dir / "reference.safetensors", tensors, metadata)
    return {
        "len_a": len(tokens_a),
        "len_b": len(tokens_b),
        "len_chat": len(tokens_chat),
        "greedy_a": greedy_a,
        "greedy_min_margin": margin,
        "max_abs_logit": float(logits_b.abs().max()),
        "logit_std": float(logits_b.std()),
        "incremental_max_err": inc_err,
    }


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


def save_model_dir(model, tok: Tokenizer, out: Path, dtype: torch.dtype, legacy_rope: bool,
                   tokenizer_class: str = "PreTrainedTokenizerFast") -> None:
    out.mkdir(parents=True, exist_ok=True)
    # Convert a copy: converting `model` in place and back would leave it rounded to `dtype`.
    copy.deepcopy(model).to(dtype).save_pretrained(out, safe_serialization=True)
    cfg_path = out / "config.json"
    if legacy_rope:
        legacy_rope_config(cfg_path)
    else:
        normalize_config_json(cfg_path)
    normalize_config_json(out / "generation_config.json")
    tok.save(str(out / "tokenizer.json"), pretty=True)
    write_json(out / "tokenizer_config.json",
               tokenizer_config(tok, model.config.max_position_embeddings, tokenizer_class))


def make_all(out_root: Path) -> dict:
    tok = build_tokenizer()
    vocab = tok.get_vocab_size()
    summary = {"vocab_size": vocab}

    # tiny-llama: untied, GQA, explicit head_dim, plain rope (legacy `rope_theta` key).
    cfg = LlamaConfig(**COMMON, vocab_size=vocab, head_dim=16, rope_theta=10000.0,
                      tie_word_embeddings=False)
    torch.manual_seed(5)
    llama = LlamaForCausalLM(cfg)
    init_weights(llama, seed=5)
    for name, dtype in [("tiny-llama", torch.float32), ("tiny-llama-bf16", torch.bfloat16),
                        ("tiny-llama-f16", torch.float16)]:
        d = out_root / name
        save_model_dir(llama, tok, d, dtype, legacy_rope=True)
        desc = {
            torch.float32: "LlamaForCausalLM, untied embeddings, GQA 4q/2kv heads, head_dim 16, "
            "rope_theta 10000, float32 weights",
            torch.bfloat16: "tiny-llama's weights rounded to bfloat16; reference = bf16 weights "
            "upcast to float32",
            torch.float16: "tiny-llama's weights rounded to float16; reference = f16 weights "
            "upcast to float32",
        }[dtype]
        summary[name] = write_reference(d, dtype, desc)

    # tiny-llama3-tied: tied embeddings, llama3 rope scaling, head_dim != hidden/heads.
    rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    cfg = LlamaConfig(**COMMON, vocab_size=vocab, head_dim=32, rope_theta=10000.0,
                      rope_scaling=rope_scaling, tie_word_embeddings=True)
    torch.manual_seed(4)
    m = LlamaForCausalLM(cfg)
    init_weights(m, seed=4)
    d = out_root / "tiny-llama3-tied"
    save_model_dir(m, tok, d, torch.float32, legacy_rope=True)
    summary["tiny-llama3-tied"] = write_reference(
        d, torch.float32, "LlamaForCausalLM, tied embeddings, llama3 rope scaling (factor 8, "
        "original_max_position_embeddings 32), head_dim 32 with hidden 64 / 4 heads, GQA 4q/2kv")
    check_llama3_scaling(d)

    # tiny-mistral: GQA, sliding_window null.
    cfg = MistralConfig(**COMMON, vocab_size=vocab, head_dim=16, rope_theta=10000.0,
                        sliding_window=None, tie_word_embeddings=False)
    torch.manual_seed(6)
    m = MistralForCausalLM(cfg)
    init_weights(m, seed=6)
    d = out_root / "tiny-mistral"
    save_model_dir(m, tok, d, torch.float32, legacy_rope=True)
    summary["tiny-mistral"] = write_reference(
        d, torch.float32, "MistralForCausalLM, untied, GQA 4q/2kv, head_dim 16, sliding_window null")

    # tiny-qwen2: q/k/v biases (random, non-zero), tied embeddings; native `rope_parameters`.
    cfg = Qwen2Config(**COMMON, vocab_size=vocab, rope_theta=1000000.0, tie_word_embeddings=True,
                      use_sliding_window=False, sliding_window=None)
    torch.manual_seed(7)
    m = Qwen2ForCausalLM(cfg)
    init_weights(m, seed=7)
    assert float(m.model.layers[0].self_attn.q_proj.bias.detach().abs().min()) > 0
    d = out_root / "tiny-qwen2"
    save_model_dir(m, qwen2_style(tok), d, torch.float32, legacy_rope=False,
                   tokenizer_class="Qwen2Tokenizer")
    summary["tiny-qwen2"] = write_reference(
        d, torch.float32, "Qwen2ForCausalLM, random q/k/v biases, tied embeddings, GQA 4q/2kv, "
        "rope_theta 1e6 (transformers-5 `rope_parameters` config key)")

    # tiny-llama-gelu / tiny-llama-gelu-tanh: GeGLU MLPs (`hidden_act` gelu, gelu_pytorch_tanh),
    # otherwise tiny-llama's shapes: the runtime must run the activation the config names.
    for name, act, seed in [("tiny-llama-gelu", "gelu", 9), ("tiny-llama-gelu-tanh", "gelu_pytorch_tanh", 9)]:
        cfg = LlamaConfig(**{**COMMON, "hidden_act": act}, vocab_size=vocab, head_dim=16,
                          rope_theta=10000.0, tie_word_embeddings=False)
        torch.manual_seed(seed)
        m = LlamaForCausalLM(cfg)
        init_weights(m, seed=seed)
        d = out_root / name
        save_model_dir(m, tok, d, torch.float32, legacy_rope=True)
        summary[name] = write_reference(
            d, torch.float32, f"LlamaForCausalLM with hidden_act {act}, untied, GQA 4q/2kv, head_dim 16")
    return summary


def check_llama3_scaling(d: Path) -> None:
    """Make sure the llama3 scaling really changes the frequencies at these sizes."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = AutoConfig.from_pretrained(d)
    assert cfg.rope_parameters["rope_type"] == "llama3", cfg.rope_parameters
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))
    changed = int((~torch.isclose(scaled, base)).sum())
    assert changed >= 4, (scaled, base)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temp dir and compare with --out byte-for-byte")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()

    if args.check:
        return check_regeneration("fixtures", args.out, make_all,
                                  within=lambda summary: sorted(k for k in summary if k != "vocab_size"))

    names = ["tiny-llama", "tiny-llama-bf16", "tiny-llama-f16", "tiny-llama3-tied",
             "tiny-mistral", "tiny-qwen2", "tiny-llama-gelu", "tiny-llama-gelu-tanh"]
    for n in names:  # start clean so no stale files survive
        if (args.out / n).exists():
            shutil.rmtree(args.out / n)
    summary = make_all(args.out)
    if args.verbose:
        print(json.dumps(summary, indent=1))
    else:
        for n in names:
            s = summary[n]
            print(f"{n}: tokens a/b/chat = {s['len_a']}/{s['len_b']}/{s['len_chat']}, "
                  f"max|logit| {s['max_abs_logit']:.2f}, greedy margin {s['greedy_min_margin']:.3g}, "
                  f"kv-cache err {s['incremental_max_err']:.2g}, greedy {s['greedy_a']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
