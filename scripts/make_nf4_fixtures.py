#!/usr/bin/env python3
"""Generate the NF4 (bitsandbytes 4-bit) fixtures in tests/fixtures/nf4/.

What bitsandbytes does when it quantises a weight to NF4 on the CPU, as exact data for the Rust
runtime to match bit for bit, and the reference outputs of transformers on an NF4 model:

- `quantize_cases.safetensors`: inputs (F32, BF16, F16; awkward shapes, ties, zero blocks,
  denormals, huge values) with the outputs of `bitsandbytes.functional.quantize_4bit(...,
  quant_type="nf4")` with and without `compress_statistics`, torch's float mean on fixed inputs,
  and the 8-bit blockwise kernel that double quantisation uses;
- `tiny-llama-nf4/`: tests/fixtures/tiny-llama loaded by transformers with a 4-bit NF4
  `BitsAndBytesConfig` (double quantisation) and saved with `save_pretrained`;
- `llama-nf4-qvd/`: a PEFT LoRA adapter (q/v/down_proj, random weights) on that NF4 model;
- `reference.safetensors`: transformers' (+ PEFT's) logits on the NF4 model.

tests/fixtures/nf4/README.md is the written specification; this script checks every statement
in it that can be checked: a plain-numpy reimplementation of each step (no torch ops) is
compared bit for bit with bitsandbytes on random and adversarial tensors before anything is
written.

Usage (from the repository root):  .venv/bin/python scripts/make_nf4_fixtures.py [--check]

Needs tests/fixtures/tiny-llama (scripts/make_fixtures.py). Deterministic: fixed seeds, one CPU
thread, float32, eager attention; two runs give byte-identical files. `--check` regenerates into
a temporary directory and compares byte-for-byte. The reference depends on the CPU only through
torch's float kernels, as the other fixtures do.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixturelib import all_files, check_regeneration  # noqa: E402
# Importing make_fixtures also sets one CPU thread, deterministic algorithms, quiet logging.
from make_fixtures import (  # noqa: E402
    DEFAULT_OUT as FIXTURES,
    REPO_ROOT,
    check_reference_file,
    forward_logits,
    greedy_manual,
    save_safetensors,
)
from make_adapter_fixtures import lora_layers, randomise, save_adapter  # noqa: E402

import bitsandbytes  # noqa: E402
import bitsandbytes.functional as BF  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

DEFAULT_OUT = FIXTURES / "nf4"
BASE = "tiny-llama"
NF4_DIR = "tiny-llama-nf4"
ADAPTER = "llama-nf4-qvd"
ADAPTER_SEED = 107
ADAPTER_CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
EQUIV_RTOL = 1e-5  # NF4 forward vs float forward of the dequantised weights (relative to max|logit|)

F32 = np.float32
U32 = np.uint32

# ----------------------------------------------------------------------------------------------
# The reference implementation, in plain numpy (no torch ops). Every function here is compared
# bit for bit with bitsandbytes in `verify_against_bitsandbytes` before the fixtures are written.
# ----------------------------------------------------------------------------------------------

# NF4 code, index order = value order (bitsandbytes `get_4bit_type("nf4")`). Each decimal string
# is the exact value of an f32 (checked), so parsing it as f64 or f32 gives the same f32.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=F32)
# Decision bounds: f32 (code[i] + code[i+1]) / 2 (the sum rounded to f32, the halving exact).
NF4_BOUNDS = ((NF4[:-1] + NF4[1:]) / F32(2)).astype(F32)
ABSMAX_FLOOR = F32(1e-38)  # torch clamp(min=1e-38) on an f32 tensor: the f32 nearest 1e-38 (subnormal)


def nf4_quantize(x: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' CPU `quantize_4bit(quant_type="nf4")` (its torch "default" kernel).

    x: the input widened to f32 (exact for bf16/f16), any shape; blocks run over the flat
    row-major order. Returns (packed u8 [(n + 1) // 2], absmax f32 [ceil(n / blocksize)]).
    """
    x = np.asarray(x, F32).reshape(-1)
    n = x.size
    full = n - n % blocksize
    blocks = x[:full].reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1).astype(F32) if full else np.zeros(0, F32)
    # Full blocks: multiply by the f32 reciprocal of max(absmax, 1e-38); the stored absmax is
    # the unclamped one.
    recip = (F32(1) / np.maximum(absmax, ABSMAX_FLOOR)).astype(F32)
    scaled = np.clip((blocks * recip[:, None]).astype(F32), F32(-1), F32(1)).reshape(-1)
    if full < n:
        # The last, partial block: a true f32 division by max(absmax, 1e-38), and the stored
        # absmax is the clamped one.
        tail_max = np.maximum(np.abs(x[full:]).max(), ABSMAX_FLOOR).astype(F32)
        absmax = np.concatenate([absmax, [tail_max]]).astype(F32)
        scaled = np.concatenate(
            [scaled, np.clip((x[full:] / tail_max).astype(F32), F32(-1), F32(1))])
    if n % 2:
        scaled = np.concatenate([scaled, np.zeros(1, F32)])  # pad value 0.0 -> code 7
    # Index = number of bounds strictly below the value: a value equal to a bound takes the
    # lower code (torch.bucketize, right=False).
    codes = np.searchsorted(NF4_BOUNDS, scaled, side="left").astype(np.uint8)
    packed = ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)  # even element: high nibble
    return packed, absmax


def nf4_unpack(packed: np.ndarray, n: int) -> np.ndarray:
    p = np.asarray(packed, np.uint8).reshape(-1)
    return np.stack([p >> 4, p & 0xF], axis=1).reshape(-1)[:n]


def nf4_dequantize(packed: np.ndarray, absmax: np.ndarray, n: int, blocksize: int) -> np.ndarray:
    """w[i] = f32(NF4[code[i]] * absmax[i // blocksize]), flat blocks."""
    idx = np.arange(n) // blocksize
    return (NF4[nf4_unpack(packed, n)] * np.asarray(absmax, F32)[idx]).astype(F32)


# torch's float sum on CPU (aten/src/ATen/native/cpu/SumKernel.cpp, `cascade_sum`), which
# `Tensor.mean()` divides by n. All arithmetic in f32. Vectorized<float> is 8 lanes wide for
# this kernel on x86-64, whatever `torch.backends.cpu.get_cpu_capability()` says (checked).
TORCH_SUM_LANES = 8
TORCH_GRAIN = 32768  # at::internal::GRAIN_SIZE: below it a reduction never runs in parallel


def _cascade(rows: np.ndarray) -> np.ndarray:
    """ATen `multi_row_sum`: rows [size, 4, *lanes] -> [4, *lanes], four cascade levels."""
    size = rows.shape[0]
    zero = np.zeros(rows.shape[1:], F32)
    ceil_log2 = 1 if size <= 2 else (size - 1).bit_length()  # ATen utils::CeilLog2
    level_power = max(4, ceil_log2 // 4)
    step = 1 << level_power
    mask = step - 1
    acc = [zero.copy() for _ in range(4)]
    i = 0
    while i + step <= size:
        for _ in range(step):
            acc[0] = (acc[0] + rows[i]).astype(F32)
            i += 1
        for j in range(1, 4):
            acc[j] = (acc[j] + acc[j - 1]).astype(F32)
            acc[j - 1] = zero.copy()
            if i & (mask << (j * level_power)):
                break
    while i < size:
        acc[0] = (acc[0] + rows[i]).astype(F32)
        i += 1
    for j in range(1, 4):
        acc[0] = (acc[0] + acc[j]).astype(F32)
    return acc[0]


def _row_sum(elems: np.ndarray) -> np.ndarray:
    """ATen `row_sum`: elems [size, *lanes], as 4 interleaved cascades then a running sum."""
    size = elems.shape[0]
    rows = size // 4
    if rows:
        part = list(_cascade(elems[: rows * 4].reshape((rows, 4) + elems.shape[1:])))
    else:
        part = [np.zeros(elems.shape[1:], F32) for _ in range(4)]
    for i in range(rows * 4, size):
        part[0] = (part[0] + elems[i]).astype(F32)
    for k in range(1, 4):
        part[0] = (part[0] + part[k]).astype(F32)
    return part[0]


def torch_sum_serial(x: np.ndarray) -> F32:
    x = np.asarray(x, F32).reshape(-1)
    n, w = x.size, TORCH_SUM_LANES
    if n < w:
        return F32(_row_sum(x))
    nvec = n // w
    lanes = _row_sum(x[: nvec * w].reshape(nvec, w))  # lane-wise, f32
    total = F32(0)
    for k in range(nvec * w, n):  # the elements after the last full vector first
        total = F32(total + x[k])
    for lane in range(w):  # then the lanes, in order
        total = F32(total + lanes[lane])
    return total


def torch_mean(x: np.ndarray, threads: int = 1) -> F32:
    """f32 `Tensor.mean()` of a contiguous 1-D tensor on CPU with `threads` torch threads."""
    x = np.asarray(x, F32).reshape(-1)
    n = x.size
    if n < TORCH_GRAIN or threads == 1:
        total = torch_sum_serial(x)
    else:  # two-pass: one partial sum per thread over equal chunks, then a sum of the partials
        used = min(threads, -(-n // TORCH_GRAIN))
        chunk = -(-n // used)
        partial = np.zeros(threads, F32)
        for t in range(used):
            partial[t] = torch_sum_serial(x[t * chunk: min(n, (t + 1) * chunk)])
        total = torch_sum_serial(partial)
    return F32(total / F32(n))


# bitsandbytes' CPU 8-bit blockwise quantiser (csrc/cpu_ops.cpp `quantize_cpu_impl`, called as
# `cquantize_blockwise_cpu_fp32`): NOT a nearest-code search. The value scaled to [-1, 1] is first
# rounded onto a uniform grid of 65536 points, and a table built from the code maps each grid
# point to the code nearest to that grid point.
LUT_SIZE = 65536


def blockwise8_lut(code: np.ndarray) -> np.ndarray:
    code = np.asarray(code, F32)
    mid = ((code[:-1] + code[1:]).astype(F32) * F32(0.5)).astype(F32)
    j = np.arange(LUT_SIZE)
    grid = ((F32(2) * j.astype(F32)) / F32(LUT_SIZE - 1)).astype(F32) - F32(1)  # f32 each step
    # Code index = number of midpoints strictly below the grid value (ties: the lower code).
    return np.searchsorted(mid, grid.astype(F32), side="left").astype(np.uint8)


def blockwise8_grid_index(c: np.ndarray) -> np.ndarray:
    """j = trunc(f32(h * 65535 + 0.5)), h = f32(f32(c + 1) * 0.5). The library computes the
    product and sum with one fused multiply-add; h is a multiple of 2^-25 below 1, so the f64
    expression below is exact and its rounding to f32 is the FMA's single rounding. (A separate
    multiply and add gives the same index for every input: checked.)"""
    h = ((np.asarray(c, F32) + F32(1)).astype(F32) * F32(0.5)).astype(F32)
    return (h.astype(np.float64) * 65535.0 + 0.5).astype(F32).astype(np.int64)


def blockwise8_quantize(x: np.ndarray, code: np.ndarray, blocksize: int = 256
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Returns (codes u8 [n], absmax f32 [ceil(n / blocksize)])."""
    x = np.asarray(x, F32).reshape(-1)
    lut = blockwise8_lut(code)
    n = x.size
    nblocks = -(-n // blocksize)
    out = np.zeros(n, np.uint8)
    absmax = np.zeros(nblocks, F32)
    for b in range(nblocks):
        v = x[b * blocksize: (b + 1) * blocksize]
        a = F32(np.abs(v).max())
        absmax[b] = a
        if a == 0:
            continue  # all codes 0 (the code's most negative entry), absmax 0
        recip = F32(F32(1) / a)
        c = np.clip((v * recip).astype(F32), F32(-1), F32(1))
        out[b * blocksize: (b + 1) * blocksize] = lut[blockwise8_grid_index(c)]
    return out, absmax


def double_quantize(absmax: np.ndarray, code: np.ndarray, threads: int = 1):
    """compress_statistics=True: (offset f32, qabsmax u8 [nb], nested_absmax f32 [ceil(nb/256)])."""
    absmax = np.asarray(absmax, F32)
    offset = torch_mean(absmax, threads)
    q, nested = blockwise8_quantize((absmax - offset).astype(F32), code, 256)
    return offset, q, nested


def double_dequantize(qabsmax, nested_absmax, code, offset) -> np.ndarray:
    """absmax[i] = f32(f32(code[qabsmax[i]] * nested_absmax[i // 256]) + offset)."""
    q = np.asarray(qabsmax, np.uint8)
    idx = np.arange(q.size) // 256
    scaled = (np.asarray(code, F32)[q] * np.asarray(nested_absmax, F32)[idx]).astype(F32)
    return (scaled + F32(offset)).astype(F32)


# ----------------------------------------------------------------------------------------------
# Verification against bitsandbytes
# ----------------------------------------------------------------------------------------------

def bnb_quantize(t: torch.Tensor, blocksize: int, double: bool):
    packed, st = BF.quantize_4bit(t, blocksize=blocksize, quant_type="nf4",
                                  compress_statistics=double)
    return packed, st


def bits(a) -> np.ndarray:
    return np.asarray(a, F32).view(U32)


def check_case(t: torch.Tensor, blocksize: int, what: str) -> dict:
    """Quantise `t` with bitsandbytes (both ways) and with the numpy reference; assert equal."""
    x = t.float().numpy().reshape(-1)
    packed, absmax = nf4_quantize(x, blocksize)
    p1, st1 = bnb_quantize(t, blocksize, False)
    assert tuple(p1.shape) == (packed.size, 1) and p1.dtype == torch.uint8, (what, p1.shape)
    assert np.array_equal(p1.numpy().reshape(-1), packed), f"{what}: NF4 codes differ"
    assert np.array_equal(bits(st1.absmax.numpy()), bits(absmax)), f"{what}: absmax differs"
    p2, st2 = bnb_quantize(t, blocksize, True)
    assert torch.equal(p1, p2), what
    code = st2.state2.code.numpy()
    offset, q, nested = double_quantize(absmax, code)
    assert bits(st2.offset.numpy()) == bits(offset), (what, st2.offset.item(), offset)
    assert np.array_equal(st2.absmax.numpy(), q), f"{what}: qabsmax differs"
    assert np.array_equal(bits(st2.state2.absmax.numpy()), bits(nested)), what
    assert st2.state2.blocksize == 256 and st2.dtype == t.dtype, what
    return dict(packed=packed, absmax=absmax, offset=offset, qabsmax=q, nested=nested,
                st1=st1, st2=st2, p=p1)


def adversarial_nf4_inputs() -> dict[str, tuple[torch.Tensor, int, str]]:
    """name -> (input tensor, blocksize, what it covers)."""
    rng = np.random.default_rng(20240)
    cases: dict[str, tuple[torch.Tensor, int, str]] = {}

    def f32(a):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(a, F32)))

    # Values exactly on the decision bounds and one ulp either side, with absmax 1 (exact
    # scaling), 1/8 (exact), 3 (inexact reciprocal) and 1e-3.
    up, down = np.nextafter(NF4_BOUNDS, F32(2)), np.nextafter(NF4_BOUNDS, F32(-2))
    core = np.concatenate([[1.0], NF4_BOUNDS, up, down, -NF4_BOUNDS, [0.0, -0.0, -1.0]]).astype(F32)
    assert core.size == 64
    cases["ties_f32"] = (f32(np.stack([core, core * F32(0.125), (core * F32(3)).astype(F32),
                                       (core * F32(1e-3)).astype(F32)])), 64,
                         "values on the NF4 decision bounds (and one ulp either side), "
                         "absmax 1, 1/8, 3, 1e-3: a value on a bound takes the lower code")

    # Full block (reciprocal) and partial last block (division) with the same values where
    # x * f32(1/a) and x / a fall on different sides of a bound.
    xs = np.zeros(0, F32)
    for a0 in rng.uniform(0.05, 20.0, 4000).astype(F32):
        recip = F32(F32(1) / a0)
        found = []
        for b in NF4_BOUNDS:
            x0 = F32(b * a0)
            for x in (x0, np.nextafter(x0, F32(100)), np.nextafter(x0, F32(-100))):
                by_mul = np.searchsorted(NF4_BOUNDS, F32(x * recip), side="left")
                by_div = np.searchsorted(NF4_BOUNDS, F32(x / a0), side="left")
                if by_mul != by_div and abs(x) <= a0:
                    found.append(x)
        if len(found) >= 3:
            xs = np.array(found, F32)
            break
    assert xs.size >= 3, "no reciprocal-vs-division disagreement found"
    block = np.concatenate([[a0], xs, rng.uniform(-0.5, 0.5, 64).astype(F32) * a0])[:64]
    tail = np.concatenate([[a0], xs, rng.uniform(-0.5, 0.5, 40).astype(F32) * a0])[:40]
    cases["recip_vs_div_f32"] = (f32(np.concatenate([block, tail]).reshape(1, 104)), 64,
                                 "a full block and the partial last block holding the same values "
                                 "where x*f32(1/absmax) and x/absmax give different codes")

    zeros = rng.standard_normal((3, 70)).astype(F32) * F32(0.2)
    flat = zeros.reshape(-1)
    flat[64:128] = 0.0  # an all-zero full block
    flat[192:] = 0.0  # an all-zero partial last block
    cases["zero_blocks_f32"] = (f32(zeros), 64, "an all-zero full block (absmax stored 0) and an "
                                "all-zero partial last block (absmax stored f32(1e-38))")

    ext = np.zeros((5, 64), F32)
    ext[0] = rng.uniform(-1, 1, 64) * 1e-39  # subnormal block: absmax below the 1e-38 floor
    ext[1] = rng.uniform(-1, 1, 64) * 3e38   # huge block: the reciprocal is subnormal
    ext[1, 5] = F32(3.4028235e38)
    ext[2] = np.where(rng.uniform(size=64) < 0.5, 1e-30, 1e30) * rng.choice([-1, 1], 64)
    ext[3] = rng.uniform(-1, 1, 64) * 1.2e-38  # absmax just above the floor
    ext[3, 0] = F32(1.1754944e-38)
    ext[4, ::2] = -0.0
    ext[4, 1::2] = rng.standard_normal(32) * 1e-3
    cases["extremes_f32"] = (f32(ext), 64, "subnormal block (absmax < 1e-38: scaled by the 1e-38 "
                             "floor), huge values (subnormal reciprocal), 1e-30 beside 1e30, "
                             "absmax near the smallest normal, -0.0")

    cases["odd_f32"] = (f32(rng.standard_normal((5, 13)) * 0.3), 64,
                        "65 elements: one full block, a 1-element last block, odd count "
                        "(the last byte's low nibble is padding, code 7)")
    cases["single_f32"] = (f32([[-0.75]]), 64, "a single element")

    bf = torch.from_numpy(rng.standard_normal((5, 96)).astype(F32) * 0.05).to(torch.bfloat16)
    cases["bf16"] = (bf, 64, "BF16 input, 480 elements: 7 full blocks and a 32-element last block")
    h = rng.standard_normal((4, 80)).astype(F32) * 0.5
    h[1, :] = rng.uniform(-1, 1, 80) * 6e-5  # f16 subnormals (< 6.1e-5)
    h[2, 7] = 65504.0
    cases["f16"] = (torch.from_numpy(h).to(torch.float16), 64,
                    "F16 input with a block of f16 subnormals and the f16 maximum 65504")
    cases["bs32_f32"] = (f32(rng.standard_normal((4, 96)) * 0.1), 32, "blocksize 32")
    cases["bs128_f32"] = (f32(rng.standard_normal((3, 200)) * 0.1), 128,
                          "blocksize 128, 600 elements (last block 88)")
    cases["bs256_bf16"] = (torch.from_numpy(rng.standard_normal((2, 300)).astype(F32) * 0.1
                                            ).to(torch.bfloat16), 256,
                           "blocksize 256, BF16, 600 elements (last block 88)")
    cases["normal_f32"] = (f32(rng.standard_normal((8, 64)) * 0.1), 64,
                           "plain N(0, 0.1) weights, 8 blocks")
    return cases


def mean_input(n: int, signed: bool) -> np.ndarray:
    """Inputs of the torch-mean cases, exact in any language: u = (i * 2654435761 + 12345) mod
    2^32 (u32 wrapping), x = (u >> 8) * 2^(-30 + (u & 7)), negated when signed and bit 3 of u set."""
    i = np.arange(n, dtype=np.uint64)
    u = (i * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(1 << 32)
    mant = (u >> np.uint64(8)).astype(np.float64)
    exp = (u & np.uint64(7)).astype(np.int64) - 30
    x = np.ldexp(mant, exp)
    if signed:
        x = np.where((u >> np.uint64(3)) & np.uint64(1), -x, x)
    out = x.astype(F32)
    assert np.array_equal(out.astype(np.float64), x)  # exactly representable
    return out


MEAN_SIZES = [1, 2, 7, 8, 9, 31, 32, 33, 127, 128, 129, 1000, 4099, 8192, 32767, 40000, 300000]
MEAN_THREADS = [2, 4]  # extra thread counts recorded for the largest size
DQ_SIZES = [1000, 4099]


def torch_mean_with_threads(x: np.ndarray, threads: int) -> F32:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return F32(torch.from_numpy(x).mean().item())
    finally:
        torch.set_num_threads(old)


def verify_against_bitsandbytes() -> dict:
    """Everything the README states about the algorithms, checked on this machine."""
    rng = np.random.default_rng(7)
    stats: dict = {}
    # Which kernels run: quantize_4bit has no CPU kernel (the torch "default" one runs);
    # quantize_blockwise / dequantize_blockwise / dequantize_4bit have C kernels on CPU.
    for op, cpu in [("quantize_4bit", False), ("quantize_blockwise", True),
                    ("dequantize_blockwise", True), ("dequantize_4bit", True)]:
        dump = torch._C._dispatch_dump(f"bitsandbytes::{op}")
        has_cpu = any(line.startswith("CPU:") for line in dump.splitlines())
        assert has_cpu == cpu, (op, dump)
    assert bitsandbytes.__version__ == "0.50.2", bitsandbytes.__version__
    assert np.array_equal(BF.get_4bit_type("nf4", device="cpu").numpy(), NF4)
    assert np.array_equal(NF4.astype(np.float64), np.array([float(repr(float(v))) for v in NF4]))
    code = BF.create_dynamic_map().numpy()
    assert code.size == 256 and np.all(np.diff(code) > 0), "dynamic map is sorted, distinct"

    # 1. Random tensors: all dtypes, all block sizes, many lengths, scales over 1e-9..1e9.
    n_rand = 0
    for it in range(150):
        n = int(rng.integers(1, 3000))
        blocksize = int(rng.choice([32, 64, 128, 256, 512, 1024, 2048, 4096]))
        x = rng.standard_normal(n) * np.exp(rng.uniform(-20, 20))
        if it % 3 == 1:
            x = x * np.exp(rng.uniform(-10, 10, n))
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            t = torch.from_numpy(x.astype(F32)).to(dt)
            if not torch.isfinite(t).all():
                continue
            check_case(t, blocksize, f"random #{it} {dt} n={n} bs={blocksize}")
            n_rand += 1
    stats["random_nf4_cases"] = n_rand
    # 2. The adversarial fixture inputs.
    for name, (t, blocksize, _) in adversarial_nf4_inputs().items():
        check_case(t, blocksize, name)

    # 3. torch's mean: the cascade model, serial and multi-threaded, lane width 8.
    n_mean = 0
    sizes = list(range(1, 140)) + [255, 256, 257, 1000, 4097, 8191, 20000, 32767]
    for n in sizes:
        for kind in range(2):
            x = (rng.standard_normal(n) * np.exp(rng.uniform(-8, 8, n))).astype(F32)
            if kind:
                x = np.abs(x)
            assert torch_mean_with_threads(x, 1) == torch_mean(x, 1), ("mean", n)
            n_mean += 1
    for n in [32768, 40000, 100003, 300000]:
        x = np.abs(rng.standard_normal(n)).astype(F32) * F32(0.05)
        for th in (1, 2, 3, 4):
            assert torch_mean_with_threads(x, th) == torch_mean(x, th), ("mean", n, th)
            n_mean += 1
    stats["mean_cases"] = n_mean

    # 4. The 8-bit blockwise kernel: random values, tiny values, the code's own values and
    # midpoints; and how often its answer is not the nearest code.
    mid = ((code[:-1] + code[1:]) * F32(0.5)).astype(F32)
    vals = np.concatenate([rng.uniform(-1, 1, 255 * 2000),
                           rng.standard_normal(255 * 400) * np.exp(rng.uniform(-30, 0, 255 * 400)),
                           np.resize(code, 255 * 4), np.resize(mid, 255 * 4)]).astype(F32)
    blocks = vals.reshape(-1, 255)
    x = np.concatenate([np.ones((blocks.shape[0], 1), F32), blocks], axis=1).reshape(-1)
    x = np.concatenate([x, rng.uniform(-3, 3, 200).astype(F32)])  # and a partial last block
    q, st = BF.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    mq, ma = blockwise8_quantize(x, code, 256)
    assert np.array_equal(q.numpy(), mq) and np.array_equal(bits(st.absmax.numpy()), bits(ma))
    stats["blockwise8_values"] = int(x.size)
    stats["blockwise8_not_nearest"] = int((np.searchsorted(mid, x, side="left") != mq).sum())
    lut = blockwise8_lut(code)
    assert blockwise8_grid_index(np.zeros(1, F32))[0] == 32768 and lut[32768] == 131  # 0 -> 2.125e-5
    assert sorted(set(range(256)) - set(lut.tolist())) == list(range(124, 131))  # never produced
    # The fused multiply-add never matters: around every grid boundary, a separate multiply
    # and add would give the same grid index.
    k = np.arange(1, LUT_SIZE)
    centre = ((k - 0.5) / 65535).astype(F32).view(np.int32)
    for d in range(-40, 41):
        h = (centre + d).view(F32)
        fused = (h.astype(np.float64) * 65535.0 + 0.5).astype(F32).astype(np.int64)
        separate = ((h * F32(65535)).astype(F32) + F32(0.5)).astype(F32).astype(np.int64)
        assert np.array_equal(fused, separate)

    # 5. Dequantisation: the flat-block formula equals bitsandbytes' CPU kernels when the row
    # length is a multiple of the block size (bitsandbytes' AVX-512 kernel indexes absmax per
    # row otherwise, and then disagrees with its own quantiser; see the README).
    for shape, blocksize, double in [((8, 64), 64, True), ((16, 128), 64, False),
                                     ((4, 256), 256, True), ((6, 64), 32, True)]:
        w = torch.from_numpy(rng.standard_normal(shape).astype(F32) * 0.1)
        packed, st = bnb_quantize(w, blocksize, double)
        got = BF.dequantize_4bit(packed, st).numpy().reshape(-1)
        if double:
            absmax = double_dequantize(st.absmax.numpy(), st.state2.absmax.numpy(),
                                       st.state2.code.numpy(), st.offset.item())
            assert np.array_equal(bits(BF.dequantize_blockwise(st.absmax, st.state2).add_(st.offset)
                                       .numpy()), bits(absmax))
        else:
            absmax = st.absmax.numpy()
        exp = nf4_dequantize(packed.numpy(), absmax, w.numel(), blocksize)
        assert np.array_equal(bits(got), bits(exp)), (shape, blocksize, double)
    w = torch.from_numpy(rng.standard_normal((3, 80)).astype(F32))
    packed, st = bnb_quantize(w, 64, False)
    got = BF.dequantize_4bit(packed, st).numpy().reshape(-1)
    exp = nf4_dequantize(packed.numpy(), st.absmax.numpy(), w.numel(), 64)
    stats["bnb_cpu_dequant_row_not_multiple_of_block_mismatches_3x80"] = int((got != exp).sum())
    return stats


# ----------------------------------------------------------------------------------------------
# quantize_cases.safetensors
# ----------------------------------------------------------------------------------------------

def t_f32(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, F32)))


def t_u8(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.uint8)))


def blockwise8_fixture_input(code: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(31)
    mid = ((code[:-1] + code[1:]) * F32(0.5)).astype(F32)
    b0 = np.concatenate([[1.0], code[np.linspace(0, 255, 255).astype(int)]])  # the code's values
    b1 = np.concatenate([[1.0], mid])  # exactly on the code's midpoints
    b2 = np.zeros(256)  # all zero: absmax 0, every code 0
    tiny = rng.standard_normal(231) * np.exp(rng.uniform(-25, -5, 231))
    b3 = np.concatenate([[0.5], tiny])  # partial last block of 232: values far below a grid step
    return np.concatenate([b0, b1, b2, b3]).astype(F32)


def make_quantize_cases(out: Path) -> dict:
    code = BF.create_dynamic_map().numpy()
    tensors: dict[str, torch.Tensor] = {
        "nf4_map": t_f32(NF4),
        "nf4_bounds": t_f32(NF4_BOUNDS),
        "dynamic_map": t_f32(code),
    }
    meta: dict[str, str] = {}
    summary = {}
    for name, (t, blocksize, what) in adversarial_nf4_inputs().items():
        r = check_case(t, blocksize, name)
        n = t.numel()
        codes = nf4_unpack(r["packed"], n)
        if name == "ties_f32":  # block 0: the value on bound k gets code k, one ulp above k + 1
            assert np.array_equal(codes[1:16], np.arange(15))
            assert np.array_equal(codes[16:31], np.arange(1, 16))
        if name == "recip_vs_div_f32":  # same values, different codes: full block vs last block
            assert np.all(codes[1:4] != codes[65:68]), codes
        tensors[f"{name}.input"] = t.contiguous()
        tensors[f"{name}.weight"] = r["p"].contiguous()
        tensors[f"{name}.absmax"] = t_f32(r["absmax"])
        tensors[f"{name}.dequant"] = t_f32(
            nf4_dequantize(r["packed"], r["absmax"], n, blocksize).reshape(t.shape))
        tensors[f"{name}.dq.absmax"] = t_u8(r["qabsmax"])
        tensors[f"{name}.dq.nested_absmax"] = t_f32(r["nested"])
        tensors[f"{name}.dq.offset"] = t_f32([r["offset"]])
        absmax_dq = double_dequantize(r["qabsmax"], r["nested"], code, r["offset"])
        tensors[f"{name}.dq.dequant"] = t_f32(
            nf4_dequantize(r["packed"], absmax_dq, n, blocksize).reshape(t.shape))
        meta[f"{name}.blocksize"] = str(blocksize)
        meta[f"{name}.about"] = what
        summary[name] = n

    for n in MEAN_SIZES:
        for signed in (False, True):
            x = mean_input(n, signed)
            key = f"mean.{'signed' if signed else 'pos'}.{n}"
            m = torch_mean_with_threads(x, 1)
            assert m == torch_mean(x, 1), key
            tensors[key] = t_f32([m])
    big = MEAN_SIZES[-1]
    for th in MEAN_THREADS:
        x = mean_input(big, False)
        m = torch_mean_with_threads(x, th)
        assert m == torch_mean(x, th), th
        tensors[f"mean.pos.{big}.threads{th}"] = t_f32([m])

    for n in DQ_SIZES:
        x = mean_input(n, False)
        # As compress_statistics does it: offset = mean, then the 8-bit kernel on absmax - offset.
        offset = F32(torch.from_numpy(x).mean().item())
        q, st = BF.quantize_blockwise(torch.from_numpy(x) - torch.tensor(offset), blocksize=256)
        ref_off, ref_q, ref_nested = double_quantize(x, code)
        assert offset == ref_off and np.array_equal(q.numpy(), ref_q)
        assert np.array_equal(bits(st.absmax.numpy()), bits(ref_nested))
        tensors[f"dq.pos.{n}.offset"] = t_f32([offset])
        tensors[f"dq.pos.{n}.absmax"] = t_u8(ref_q)
        tensors[f"dq.pos.{n}.nested_absmax"] = t_f32(ref_nested)

    x = blockwise8_fixture_input(code)
    q, st = BF.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    mq, ma = blockwise8_quantize(x, code, 256)
    assert np.array_equal(q.numpy(), mq) and np.array_equal(bits(st.absmax.numpy()), bits(ma))
    tensors["blockwise8.input"] = t_f32(x)
    tensors["blockwise8.codes"] = t_u8(mq)
    tensors["blockwise8.absmax"] = t_f32(ma)

    meta["generator"] = (f"scripts/make_nf4_fixtures.py (bitsandbytes {bitsandbytes.__version__}, "
                         f"torch {torch.__version__.split('+')[0]})")
    meta["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    meta["mean_input"] = ("u = (i*2654435761 + 12345) mod 2^32; x = (u >> 8) * 2^(-30 + (u & 7)); "
                          "signed: negated when (u >> 3) & 1")
    path = out / "quantize_cases.safetensors"
    save_safetensors(tensors, path, meta)
    check_reference_file(path, tensors, meta)
    return summary


# ----------------------------------------------------------------------------------------------
# tiny-llama-nf4, the adapter, reference.safetensors
# ----------------------------------------------------------------------------------------------

def bnb_config() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def cpu_reference_path(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights at the first inference call
    and computes in bf16; the reference is the portable path (dequantise, f32 linear)."""
    import bitsandbytes.nn as bnn

    for m in model.modules():
        if isinstance(m, bnn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def load_nf4(path: Path, **kw):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu",
                                             attn_implementation="eager", **kw)
    cpu_reference_path(m)
    return m.eval()


def load_float(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def read_reference(path: Path, key: str) -> list[int]:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key).tolist()


def quantized_modules(path: Path) -> dict[str, dict]:
    """Read an NF4 model.safetensors as the runtime will: per quantised module, its tensors and
    the quant_state JSON."""
    mods: dict[str, dict] = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        for k in keys:
            if k.endswith(".weight.quant_state.bitsandbytes__nf4"):
                base = k[: -len(".quant_state.bitsandbytes__nf4")]
                qs = json.loads(bytes(f.get_tensor(k).numpy()).decode("utf-8"))
                mods[base] = {"state": qs, **{s: f.get_tensor(base + s).numpy() for s in
                                              ("", ".absmax", ".quant_map", ".nested_absmax",
                                               ".nested_quant_map")}}
        assert not any(k.endswith("bitsandbytes__fp4") for k in keys)
    return mods


def dequantize_module(m: dict) -> np.ndarray:
    qs = m["state"]
    assert qs["quant_type"] == "nf4" and qs["nested_blocksize"] == 256
    assert qs["dtype"] == "float32" and qs["nested_dtype"] == "float32"
    offset = F32(qs["nested_offset"])  # JSON holds the f32 value printed as a double: exact
    assert float(offset) == qs["nested_offset"]
    absmax = double_dequantize(m[".absmax"], m[".nested_absmax"], m[".nested_quant_map"], offset)
    n = int(np.prod(qs["shape"]))
    return nf4_dequantize(m[""], absmax, n, qs["blocksize"]).reshape(qs["shape"])


def make_model_and_reference(out: Path) -> dict:
    src = FIXTURES / BASE
    nf4_dir = out / NF4_DIR
    summary: dict = {}

    # 1. transformers quantises tiny-llama while loading; check each Linear4bit against
    # quantize_4bit and the numpy reference on the original F32 weights.
    model = load_nf4(src, quantization_config=bnb_config())
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    import bitsandbytes.nn as bnn

    n_q = 0
    for name, mod in model.named_modules():
        if isinstance(mod, bnn.Linear4bit):
            w = original[name + ".weight"]
            r = check_case(w, 64, name)
            st = mod.weight.quant_state
            assert torch.equal(mod.weight.data.view(-1), r["p"].view(-1)), name
            assert torch.equal(st.absmax, torch.from_numpy(r["qabsmax"])), name
            assert bits(st.offset.numpy()) == bits(r["offset"]), name
            assert np.array_equal(bits(st.state2.absmax.numpy()), bits(r["nested"])), name
            n_q += 1
    assert n_q == 14, n_q  # 2 layers x q/k/v/o/gate/up/down; lm_head and embeddings stay float
    model.save_pretrained(nf4_dir, safe_serialization=True)
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / fname, nf4_dir / fname)
    cfg = json.loads((nf4_dir / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4", cfg

    # 2. The file, read without bitsandbytes, dequantises to exactly what bitsandbytes computes.
    mods = quantized_modules(nf4_dir)
    assert len(mods) == n_q
    deq = {}
    for name, mod in model.named_modules():
        if isinstance(mod, bnn.Linear4bit):
            m = mods[name + ".weight"]
            assert np.array_equal(m[".quant_map"], NF4)
            assert np.array_equal(m[".nested_quant_map"], BF.create_dynamic_map().numpy())
            w = dequantize_module(m)
            got = BF.dequantize_4bit(mod.weight.data, mod.weight.quant_state).numpy()
            assert np.array_equal(bits(got), bits(w)), name
            deq[name + ".weight"] = torch.from_numpy(w)

    # 3. Reload from disk (as a user would) and compute the reference logits.
    tokens_b = read_reference(src / "reference.safetensors", "tokens_b")
    tokens_a = read_reference(src / "reference.safetensors", "tokens_a")
    live = forward_logits(model, tokens_b)
    nf4 = load_nf4(nf4_dir)
    logits_b = forward_logits(nf4, tokens_b)
    assert torch.equal(logits_b, live)
    greedy_a, margin = greedy_manual(nf4, tokens_a, 16)
    assert margin >= 0.05, f"greedy continuation has a near-tie (top1 - top2 = {margin})"

    # 4. The same network in float with the dequantised weights gives the same logits.
    flt = load_float(src)
    with torch.no_grad():
        for k, v in deq.items():
            flt.get_parameter(k).copy_(v)
    logits_deq = forward_logits(flt, tokens_b)
    scale = float(logits_b.abs().max())
    err_deq = float((logits_deq - logits_b).abs().max())
    assert err_deq <= EQUIV_RTOL * scale, err_deq
    float_logits = read_reference(src / "reference.safetensors", "logits_b")
    delta_float = float((logits_b - torch.tensor(float_logits)).abs().max())
    assert delta_float > 1e-2 * scale, delta_float  # NF4 is visibly not the float model

    # 5. A LoRA adapter on the NF4 base, saved, reloaded by PEFT.
    lcfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **ADAPTER_CONFIG)
    pm = get_peft_model(load_nf4(nf4_dir), lcfg).eval()
    randomise(pm, ADAPTER_SEED)
    assert len(lora_layers(pm)) == 6
    live_lora = forward_logits(pm, tokens_b)
    save_adapter(pm, NF4_DIR, out / ADAPTER)
    reloaded = PeftModel.from_pretrained(load_nf4(nf4_dir), out / ADAPTER).eval()
    cpu_reference_path(reloaded)
    logits_lora = forward_logits(reloaded, tokens_b)
    assert torch.equal(logits_lora, live_lora)
    delta_lora = float((logits_lora - logits_b).abs().max())
    assert delta_lora > 1e-2 * scale, delta_lora
    # ...equal to the same adapter on the float network with the dequantised weights.
    flt_lora = PeftModel.from_pretrained(flt, out / ADAPTER).eval()
    err_lora = float((forward_logits(flt_lora, tokens_b) - logits_lora).abs().max())
    assert err_lora <= EQUIV_RTOL * float(logits_lora.abs().max()), err_lora

    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    tensors = {
        "tokens_a": i32(tokens_a),
        "greedy_a": i32(greedy_a),
        "tokens_b": i32(tokens_b),
        "logits_b": logits_b,
        "logits_b_lora": logits_lora,
    }
    meta = {
        "base": NF4_DIR,
        "adapter": ADAPTER,
        "description": "transformers on tiny-llama-nf4 (BitsAndBytesConfig nf4, double quant, "
                       "compute float32, CPU); logits_b_lora: PEFT with llama-nf4-qvd on it",
        "max_abs_err_vs_float_dequantised": f"{err_deq:.3g}",
        "max_abs_err_vs_float_dequantised_lora": f"{err_lora:.3g}",
        "max_abs_delta_vs_float_tiny_llama": f"{delta_float:.3g}",
        "max_abs_delta_lora_vs_base": f"{delta_lora:.3g}",
        "greedy_min_margin": f"{margin:.3g}",
        "generator": (f"scripts/make_nf4_fixtures.py (bitsandbytes {bitsandbytes.__version__}, "
                      f"peft {peft.__version__}, transformers {transformers.__version__}, "
                      f"torch {torch.__version__.split('+')[0]})"),
    }
    ref = out / "reference.safetensors"
    save_safetensors(tensors, ref, meta)
    check_reference_file(ref, tensors, meta)
    summary.update(err_vs_float_dequantised=err_deq, err_lora_vs_float_dequantised=err_lora,
                   delta_vs_float=delta_float, delta_lora=delta_lora, greedy_margin=margin,
                   max_abs_logit=scale, greedy_a=greedy_a)
    return summary


def check_readme(path: Path) -> None:
    """The tables of README.md (NF4 code and bounds, the dynamic code, the 1e-38 floor) are
    this machine's values."""
    import re

    text = path.read_text()
    rows = re.findall(r"^\| (\d+) \| (\S+) \| `0x([0-9a-f]{8})` \|(?: (\S+) \| `0x([0-9a-f]{8})` \|"
                      r"| \| \|)$", text, flags=re.M)
    assert len(rows) == 16, len(rows)
    for k, val, b, bval, bb in rows:
        k = int(k)
        assert F32(float(val)) == NF4[k] and int(b, 16) == int(bits(NF4[k])), (k, val)
        if k < 15:
            assert F32(float(bval)) == NF4_BOUNDS[k] and int(bb, 16) == int(bits(NF4_BOUNDS[k]))
    table = re.findall(r"^ *(\d+): ((?:[0-9a-f]{8} ){7}[0-9a-f]{8})$", text, flags=re.M)
    dyn = np.array([int(w, 16) for _, line in table for w in line.split()], U32)
    assert [int(i) for i, _ in table] == list(range(0, 256, 8))
    assert np.array_equal(dyn, bits(BF.create_dynamic_map().numpy())), "dynamic code table"
    assert f"`0x{int(bits(ABSMAX_FLOOR)):08x}`" in text


def make_all(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = {"verification": verify_against_bitsandbytes()}
    summary["quantize_cases"] = make_quantize_cases(out)
    summary["model"] = make_model_and_reference(out)
    root = str(REPO_ROOT)
    for f in all_files(out):  # nothing generated may name this machine's paths
        data = (out / f).read_bytes()
        assert root.encode() not in data and b"/tmp/" not in data, f
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temp dir and compare with --out byte-for-byte")
    args = ap.parse_args()

    check_readme(args.out / "README.md")
    if args.check:
        return check_regeneration("NF4 fixtures", args.out, make_all, stale=True, keep=["README.md"])

    for n in ["quantize_cases.safetensors", "reference.safetensors"]:
        (args.out / n).unlink(missing_ok=True)
    for n in [NF4_DIR, ADAPTER]:  # start clean so no stale files survive
        if (args.out / n).exists():
            shutil.rmtree(args.out / n)
    summary = make_all(args.out)
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
