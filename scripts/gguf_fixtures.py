#!/usr/bin/env python3
"""Writes the GGUF test fixtures of `runtime/tests/data/gguf/` (run from the repository root).

1. For each ggml type peftrt dequantises: `<TYPE>.bin`, a few random-but-valid blocks (random
   bytes with finite f16 scales), and `<TYPE>.f32`, their dequantisation by gguf-py
   (`gguf.quants.dequantize`, which follows ggml-quants.c bit for bit) as little-endian f32.
3. `tiny_llama_k.gguf`: a 1-layer llama of width 256 whose weights are K-quants (Q2_K..Q6_K;
   random valid blocks, since gguf-py cannot quantise to them), for the native kernels' tests.
2. `tiny_llama.gguf`: a 2-layer llama with a 270-token byte-level BPE vocabulary, written with
   gguf-py's GGUFWriter the way convert_hf_to_gguf.py writes a llama (Q and K rows permuted for
   rotary embeddings), with several tensor types; and `tiny_llama.expected.json` (name -> shape
   and element offset) with `tiny_llama.expected.f32`: the values the import must produce for a
   few tensors (gguf-py's dequantisation, Q/K un-permuted with numpy).

Usage: python scripts/gguf_fixtures.py [OUT_DIR]   (needs numpy and gguf-py)
"""

import json
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

from fixturelib import unpermute

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "runtime/tests/data/gguf")
rng = np.random.default_rng(20240611)

# Byte offsets of the f16 scale fields of each block (ggml-common.h).
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
N_ELEMENTS = 1024  # per type: 32 legacy blocks or 4 k-quant super-blocks


def random_blocks(qtype):
    """Random bytes for whole blocks, with each f16 field a finite value of modest size."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype == T.F32:
        return rng.standard_normal(N_ELEMENTS).astype("<f4").view(np.uint8)
    if qtype == T.F16:
        return rng.standard_normal(N_ELEMENTS).astype("<f2").view(np.uint8)
    if qtype == T.BF16:
        f = rng.standard_normal(N_ELEMENTS).astype("<f4")
        return (f.view("<u4") >> 16).astype("<u2").view(np.uint8)
    n = N_ELEMENTS // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        # Mix signs, tiny (subnormal) and ordinary magnitudes.
        scale = rng.standard_normal(n) * np.exp2(rng.integers(-20, 2, size=n))
        raw[:, off:off + 2] = scale.astype("<f2").view(np.uint8).reshape(n, 2)
    return raw.reshape(-1)


def write_blobs():
    for qtype in [T.F32, T.F16, T.BF16, *F16_FIELDS]:
        raw = random_blocks(qtype)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = raw.reshape(1, -1)
        values = gguf.quants.dequantize(rows, qtype).astype("<f4").reshape(-1)
        assert values.size == N_ELEMENTS and np.isfinite(values).all(), qtype.name
        (OUT / f"{qtype.name}.bin").write_bytes(raw.tobytes())
        (OUT / f"{qtype.name}.f32").write_bytes(values.tobytes())


def bytes_to_unicode():
    """GPT-2's byte -> printable character map (as in its encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute: interleave the two rotary halves of each head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama_writer(path, hidden, inter, n_layer, n_head, n_kv):
    """A GGUFWriter with a tiny llama's metadata and byte-level vocabulary; returns (writer, vocab size)."""
    head_dim = hidden // n_head
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "1 2", "Ġ 1"]
    tokens = specials + list(bytes_to_unicode().values()) + ["".join(m.split()) for m in merges]
    types = [gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * (len(tokens) - len(specials))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama fixture")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    return w, len(tokens)


def write_tiny_llama_k():
    """K-quant weights: random bytes with small finite f16 scales (a random but valid model)."""
    krng = np.random.default_rng(20261207)
    hidden, inter, n_head, n_kv = 256, 256, 4, 2
    head_dim = hidden // n_head
    w, vocab = tiny_llama_writer(OUT / "tiny_llama_k.gguf", hidden, inter, 1, n_head, n_kv)

    def kquant(rows, cols, qtype):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n = rows * cols // block
        raw = krng.integers(0, 256, size=(n, size), dtype=np.uint8)
        for off in F16_FIELDS[qtype]:
            raw[:, off:off + 2] = (krng.standard_normal(n) * 0.0005).astype("<f2").view(np.uint8).reshape(n, 2)
        return raw.reshape(rows, cols // block * size)

    def add(name, rows, cols, qtype):
        if qtype == T.F32:
            w.add_tensor(name, (1 + krng.standard_normal(rows) * 0.1).astype(np.float32))
        else:
            w.add_tensor(name, kquant(rows, cols, qtype), raw_dtype=qtype)

    add("token_embd.weight", vocab, hidden, T.Q4_K)
    add("blk.0.attn_norm.weight", hidden, 1, T.F32)
    add("blk.0.attn_q.weight", n_head * head_dim, hidden, T.Q4_K)
    add("blk.0.attn_k.weight", n_kv * head_dim, hidden, T.Q5_K)
    add("blk.0.attn_v.weight", n_kv * head_dim, hidden, T.Q6_K)
    add("blk.0.attn_output.weight", hidden, hidden, T.Q2_K)
    add("blk.0.ffn_norm.weight", hidden, 1, T.F32)
    add("blk.0.ffn_gate.weight", inter, hidden, T.Q3_K)
    add("blk.0.ffn_up.weight", inter, hidden, T.Q4_K)
    add("blk.0.ffn_down.weight", hidden, inter, T.Q6_K)
    add("output_norm.weight", hidden, 1, T.F32)
    add("output.weight", vocab, hidden, T.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_llama():
    hidden, inter, n_layer, n_head, n_kv = 64, 64, 2, 4, 2
    head_dim = hidden // n_head
    w, vocab = tiny_llama_writer(OUT / "tiny_llama.gguf", hidden, inter, n_layer, n_head, n_kv)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")

    expected = {}

    def add(name, hf_name, arr, qtype, perm_heads=None):
        arr = arr.astype(np.float32)
        if perm_heads is not None:
            arr = permute(arr, perm_heads)
        if qtype == T.F32:
            data, deq = arr, arr
        elif qtype == T.F16:
            data = arr.astype(np.float16)
            deq = data.astype(np.float32)
        else:
            data = gguf.quants.quantize(arr, qtype)
            deq = gguf.quants.dequantize(data, qtype)
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        if perm_heads is not None:
            deq = unpermute(deq, perm_heads)
        expected[hf_name] = deq.astype("<f4")

    def rnd(*shape):
        return rng.standard_normal(shape) * 0.1

    add("token_embd.weight", "model.embed_tokens.weight", rnd(vocab, hidden), T.Q8_0)
    for i in range(n_layer):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", 1 + rnd(hidden), T.F32)
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", rnd(n_head * head_dim, hidden), T.Q4_0, n_head)
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", rnd(n_kv * head_dim, hidden), T.Q4_1, n_kv)
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", rnd(n_kv * head_dim, hidden), T.Q5_0)
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", rnd(hidden, hidden), T.Q5_1)
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", 1 + rnd(hidden), T.F32)
        add(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", rnd(inter, hidden), T.F16)
        add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", rnd(inter, hidden), T.BF16)
        add(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", rnd(hidden, inter), T.Q8_0)
    add("output_norm.weight", "model.norm.weight", 1 + rnd(hidden), T.F32)
    add("output.weight", "lm_head.weight", rnd(vocab, hidden), T.Q8_0)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # Keep the committed reference small: layer 0 attention and the norms.
    keep = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
            "model.layers.1.input_layernorm.weight", "model.norm.weight"]
    index, blobs, offset = {}, [], 0
    for k in keep:
        index[k] = {"shape": list(expected[k].shape), "offset": offset}
        offset += expected[k].size
        blobs.append(expected[k].reshape(-1).tobytes())
    (OUT / "tiny_llama.expected.json").write_text(json.dumps(index, indent=1) + "\n")
    (OUT / "tiny_llama.expected.f32").write_bytes(b"".join(blobs))


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    write_blobs()
    write_tiny_llama()
    write_tiny_llama_k()
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(list(OUT.iterdir()))} files, {total} bytes, to {OUT}")
