//! 4-bit NormalFloat (NF4) linear weights in the layout bitsandbytes serialises a `Linear4bit`.
//!
//! For a module `M`, a checkpoint holds:
//! - `M.weight`: U8 `[ceil(n / 2), 1]`, two codes per byte, the even element in the high nibble;
//! - `M.weight.absmax`: one scale per `blocksize` elements — F32, or with double quantisation
//!   U8 codes of the dynamic 8-bit map, decoded as
//!   `nested_quant_map[q] · nested_absmax[i / nested_blocksize] + nested_offset`;
//! - `M.weight.quant_map`: F32 `[16]`, the value of each code;
//! - `M.weight.nested_absmax`, `M.weight.nested_quant_map` (double quantisation only);
//! - `M.weight.quant_state.bitsandbytes__nf4`: U8, the bytes of a JSON object with
//!   `quant_type`, `blocksize`, `dtype`, `shape` and, nested, `nested_blocksize`,
//!   `nested_offset`, `nested_dtype`.
//!
//! Loading keeps the codes memory-mapped and decodes the per-block scales once into f32 (one
//! f32 per 64 weights); the kernels dequantise in registers ([`crate::kernels::Nf4`]).

use crate::error::{Error, Result};
use crate::kernels::{Nf4, Weights};
use crate::weights::{DType, Tensor, WeightStore};
use serde_json::Value;

/// The block sizes bitsandbytes accepts.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// A linear layer's NF4 weight, ready for the kernels.
pub struct Nf4Weight {
    /// The packed codes (memory-mapped).
    pub packed: Tensor,
    /// One f32 scale per block (double quantisation decoded).
    pub absmax: Vec<f32>,
    pub blocksize: usize,
    pub table: [f32; 16],
    /// Elements: `out × in`.
    pub len: usize,
    /// Whether the scales were double-quantised in the file.
    pub double_quant: bool,
    /// The dtype the weight had before quantisation (`quant_state.dtype`).
    pub orig_dtype: String,
}

impl Nf4Weight {
    /// Loads the NF4 weight `name` (e.g. `model.layers.0.mlp.up_proj.weight`) of shape
    /// `[rows, cols]`, checking every piece of its quantisation state against the others.
    pub fn load(store: &WeightStore, name: &str, rows: usize, cols: usize) -> Result<Nf4Weight> {
        let packed = store.get(name)?.clone();
        let state_name = format!("{name}.quant_state.bitsandbytes__nf4");
        if !store.contains(&state_name) {
            if store.contains(&format!("{name}.quant_state.bitsandbytes__fp4")) {
                return Err(Error::Unsupported(format!(
                    "{name} is FP4-quantised (bitsandbytes__fp4); peftrt runs NF4 4-bit weights. \
                     Re-quantise the float model with `peftrt quantize` (NF4)"
                )));
            }
            return Err(Error::tensor(
                &state_name,
                format!(
                    "is missing: {name} is stored as U8 (4-bit codes) but has no bitsandbytes quant_state; \
                     the checkpoint is incomplete or not a bitsandbytes NF4 model"
                ),
            ));
        }
        let state_t = store.get(&state_name)?;
        let bad = |msg: String| Error::tensor(&state_name, msg);
        let state: Value = std::str::from_utf8(state_t.bytes())
            .ok()
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("is not a JSON object in UTF-8 bytes".into()))?;
        match state.get("quant_type").and_then(Value::as_str) {
            Some("nf4") => {}
            other => return Err(bad(format!("quant_type {other:?}: peftrt runs \"nf4\" only"))),
        }
        let blocksize = state
            .get("blocksize")
            .and_then(Value::as_u64)
            .map(|b| b as usize)
            .filter(|b| BLOCKSIZES.contains(b))
            .ok_or_else(|| {
                bad(format!("blocksize {:?} is not one of bitsandbytes' {BLOCKSIZES:?}", state.get("blocksize")))
            })?;
        let shape: Vec<usize> = state
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| bad("has no `shape` list".into()))?;
        if shape != [rows, cols] {
            return Err(bad(format!(
                "says shape {shape:?}, but config.json makes this layer [{rows}, {cols}]: the checkpoint does not match its config"
            )));
        }
        let len = rows * cols;
        let expect_len = |t: &Tensor, dtype: DType, n: usize, what: &str| -> Result<()> {
            if t.dtype != dtype || t.numel() != n {
                return Err(Error::tensor(
                    &t.name,
                    format!(
                        "is {} with {} elements; {what} needs {} with {n} (does quant_state agree with the tensors?)",
                        t.dtype.name(),
                        t.numel(),
                        dtype.name()
                    ),
                ));
            }
            Ok(())
        };
        expect_len(&packed, DType::U8, len.div_ceil(2), &format!("a [{rows}, {cols}] weight in 4 bits"))?;
        let n_blocks = len.div_ceil(blocksize);
        let map = store.get(&format!("{name}.quant_map"))?;
        expect_len(map, DType::F32, 16, "the NF4 code table")?;
        let table: [f32; 16] = map.to_f32_vec().try_into().expect("16 elements checked");
        let absmax_t = store.get(&format!("{name}.absmax"))?;
        let nested = state.get("nested_blocksize").is_some_and(|v| !v.is_null());
        let absmax = if nested {
            let nested_bs = state
                .get("nested_blocksize")
                .and_then(Value::as_u64)
                .map(|b| b as usize)
                .filter(|b| BLOCKSIZES.contains(b))
                .ok_or_else(|| bad("nested_blocksize is not a bitsandbytes block size".into()))?;
            let offset = state
                .get("nested_offset")
                .and_then(Value::as_f64)
                .ok_or_else(|| bad("double quantisation without a numeric nested_offset".into()))?
                as f32;
            expect_len(absmax_t, DType::U8, n_blocks, "the double-quantised scales")?;
            let nmap = store.get(&format!("{name}.nested_quant_map"))?;
            expect_len(nmap, DType::F32, 256, "the 8-bit dynamic code table")?;
            let nabs = store.get(&format!("{name}.nested_absmax"))?;
            expect_len(nabs, DType::F32, n_blocks.div_ceil(nested_bs), "one scale per nested block")?;
            let (nmap, nabs) = (nmap.to_f32_vec(), nabs.to_f32_vec());
            absmax_t.bytes().iter().enumerate().map(|(i, &q)| nmap[q as usize] * nabs[i / nested_bs] + offset).collect()
        } else {
            expect_len(absmax_t, DType::F32, n_blocks, "one scale per block")?;
            absmax_t.to_f32_vec()
        };
        let orig_dtype = state.get("dtype").and_then(Value::as_str).unwrap_or("float32").to_string();
        Ok(Nf4Weight { packed, absmax, blocksize, table, len, double_quant: nested, orig_dtype })
    }

    /// The weight as the kernels take it.
    pub fn weights(&self) -> Weights<'_> {
        Weights::Nf4(Nf4 {
            packed: self.packed.bytes(),
            absmax: &self.absmax,
            blocksize: self.blocksize,
            table: &self.table,
            len: self.len,
        })
    }

    /// Names of the tensors that make up the quantised weight `name` (besides `name` itself).
    pub fn aux_names(name: &str) -> [String; 5] {
        [
            format!("{name}.absmax"),
            format!("{name}.quant_map"),
            format!("{name}.nested_absmax"),
            format!("{name}.nested_quant_map"),
            format!("{name}.quant_state.bitsandbytes__nf4"),
        ]
    }
}

/// bitsandbytes' NF4 code values (`quant_map`), in code order (= value order).
pub const NF4_TABLE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' dynamic 8-bit code (`create_dynamic_map(signed=True)`) as f32 bits: built
/// with `torch.linspace`, whose rounding a naive loop does not reproduce, so it is embedded
/// (tests/fixtures/nf4/README.md §2 lists it; a test compares it with bitsandbytes' own).
#[rustfmt::skip]
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The dynamic 8-bit code of double quantisation (`nested_quant_map`).
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP_BITS.map(f32::from_bits)
}

/// The nested block size of double quantisation (bitsandbytes accepts no other).
pub const NESTED_BLOCKSIZE: usize = 256;

/// `f32(1e-38)`: bitsandbytes clamps block scales to at least this before taking reciprocals.
const MIN_ABSMAX: f32 = f32::from_bits(0x006c_e3ee);

/// A weight quantised as bitsandbytes' `quantize_4bit(..., quant_type="nf4")` does on a CPU.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    /// `[(n + 1) / 2]` codes, the even element in the high nibble.
    pub packed: Vec<u8>,
    pub scales: Scales,
    pub blocksize: usize,
}

/// Per-block scales: plain, or double-quantised (`compress_statistics=True`).
#[derive(Clone, Debug, PartialEq)]
pub enum Scales {
    F32(Vec<f32>),
    Double {
        /// One 8-bit code per block.
        codes: Vec<u8>,
        /// One scale per 256 blocks.
        nested_absmax: Vec<f32>,
        /// The mean that was subtracted first.
        offset: f32,
    },
}

/// Quantises `x` (row-major, widened to f32) to NF4 exactly as bitsandbytes 0.50 does on a CPU
/// (tests/fixtures/nf4/README.md §1–2). `x` must be finite.
pub fn quantize(x: &[f32], blocksize: usize, double_quant: bool) -> Quantized {
    let absmax = block_absmax(x, blocksize);
    let packed = quantize_codes(x, blocksize, &absmax);
    Quantized { packed, scales: quantize_scales(absmax, double_quant), blocksize }
}

/// The packed 4-bit codes of [`quantize`], given the block scales from [`block_absmax`].
pub fn quantize_codes(x: &[f32], blocksize: usize, absmax: &[f32]) -> Vec<u8> {
    debug_assert!(BLOCKSIZES.contains(&blocksize) && x.iter().all(|v| v.is_finite()));
    let bounds: [f32; 15] = std::array::from_fn(|k| (NF4_TABLE[k] + NF4_TABLE[k + 1]) / 2.0);
    let code = |s: f32| bounds.partition_point(|&b| b < s) as u8;
    let n = x.len();
    let full = n / blocksize * blocksize;
    let mut scaled = Vec::with_capacity(n + 1);
    for (block, &a) in x[..full].chunks_exact(blocksize).zip(absmax) {
        let r = 1.0 / a.max(MIN_ABSMAX);
        scaled.extend(block.iter().map(|v| (v * r).clamp(-1.0, 1.0)));
    }
    if full < n {
        // The last, partial block: a true division (by the clamped scale).
        let a = absmax[absmax.len() - 1];
        scaled.extend(x[full..].iter().map(|v| (v / a).clamp(-1.0, 1.0)));
    }
    if n % 2 == 1 {
        scaled.push(0.0);
    }
    scaled.chunks_exact(2).map(|p| (code(p[0]) << 4) | code(p[1])).collect()
}

/// The stored form of the block scales: as they are, or double-quantised (the mean taken off,
/// then 8-bit codes in blocks of 256).
pub fn quantize_scales(absmax: Vec<f32>, double_quant: bool) -> Scales {
    if !double_quant {
        return Scales::F32(absmax);
    }
    let offset = torch_mean(&absmax);
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let (codes, nested_absmax) = quantize_blockwise_8bit(&centred);
    Scales::Double { codes, nested_absmax, offset }
}

/// The stored per-block scales of [`quantize`]: `max |x|` per block, the last, partial block's
/// clamped to at least `f32(1e-38)` (bitsandbytes stores it so; full blocks keep 0).
pub fn block_absmax(x: &[f32], blocksize: usize) -> Vec<f32> {
    let full = x.len() / blocksize * blocksize;
    let amax = |b: &[f32]| b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut absmax: Vec<f32> = x[..full].chunks_exact(blocksize).map(amax).collect();
    if full < x.len() {
        absmax.push(amax(&x[full..]).max(MIN_ABSMAX));
    }
    absmax
}

impl Quantized {
    /// The per-block scales as the loader decodes them.
    pub fn absmax(&self) -> Vec<f32> {
        match &self.scales {
            Scales::F32(a) => a.clone(),
            Scales::Double { codes, nested_absmax, offset } => {
                let d = dynamic_map();
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| d[q as usize] * nested_absmax[i / NESTED_BLOCKSIZE] + offset)
                    .collect()
            }
        }
    }
}

/// torch's `Tensor.mean()` of an f32 vector on a CPU, one thread, bit for bit: a cascade of f32
/// partial sums over 8-lane vectors (README §2), then one division.
pub fn torch_mean(x: &[f32]) -> f32 {
    (0.0 + torch_sum(x)) / x.len() as f32
}

fn torch_sum(x: &[f32]) -> f32 {
    const W: usize = 8;
    if x.len() < W {
        let e: Vec<[f32; 1]> = x.iter().map(|&v| [v]).collect();
        return rowsum(&e)[0];
    }
    let v = x.len() / W;
    let vectors: Vec<[f32; W]> = x[..v * W].chunks_exact(W).map(|c| c.try_into().expect("W lanes")).collect();
    let lanes = rowsum(&vectors);
    let mut t = 0.0f32;
    for &s in &x[v * W..] {
        t += s;
    }
    for l in lanes {
        t += l;
    }
    t
}

/// ATen's `row_sum` over scalars (`L = 1`) or `L`-lane vectors: four interleaved columns, each
/// summed by [`cascade`], the leftovers added to the first.
fn rowsum<const L: usize>(e: &[[f32; L]]) -> [f32; L] {
    let rows = e.len() / 4;
    let mut p: [[f32; L]; 4] = std::array::from_fn(|k| cascade((0..rows).map(|i| e[4 * i + k]), rows));
    for v in &e[4 * rows..] {
        for l in 0..L {
            p[0][l] += v[l];
        }
    }
    std::array::from_fn(|l| ((p[0][l] + p[1][l]) + p[2][l]) + p[3][l])
}

/// ATen's multi-level cascade sum of `r` values (lane-wise).
fn cascade<const L: usize>(mut rows: impl Iterator<Item = [f32; L]>, r: usize) -> [f32; L] {
    let c = if r <= 2 { 1 } else { usize::BITS - (r - 1).leading_zeros() } as usize;
    let p = (c / 4).max(4);
    let step = 1usize << p;
    let mut acc = [[0.0f32; L]; 4];
    let add = |acc: &mut [f32; L], v: [f32; L]| (0..L).for_each(|l| acc[l] += v[l]);
    let mut i = 0;
    while i + step <= r {
        for _ in 0..step {
            add(&mut acc[0], rows.next().expect("r rows"));
            i += 1;
        }
        for j in 1..4 {
            let prev = acc[j - 1];
            add(&mut acc[j], prev);
            acc[j - 1] = [0.0; L];
            if i & ((step - 1) << (j * p)) != 0 {
                break;
            }
        }
    }
    while i < r {
        add(&mut acc[0], rows.next().expect("r rows"));
        i += 1;
    }
    std::array::from_fn(|l| ((acc[0][l] + acc[1][l]) + acc[2][l]) + acc[3][l])
}

/// bitsandbytes' CPU `quantize_blockwise` (8-bit dynamic code, blocks of 256): the scaled value
/// is snapped to a 65536-point grid, then mapped to the code nearest the grid point
/// (README §2). Returns the codes and one absmax per block.
pub fn quantize_blockwise_8bit(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    static LUT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let lut = LUT.get_or_init(|| {
        let d = dynamic_map();
        let mid: [f32; 255] = std::array::from_fn(|k| (d[k] + d[k + 1]) * 0.5);
        (0..65536u32)
            .map(|j| {
                let g = (2 * j) as f32 / 65535.0 - 1.0;
                mid.partition_point(|&m| m < g) as u8
            })
            .collect()
    });
    let mut codes = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(NESTED_BLOCKSIZE));
    for block in x.chunks(NESTED_BLOCKSIZE) {
        let a = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        absmax.push(a);
        if a == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let r = 1.0 / a;
        codes.extend(block.iter().map(|v| {
            let c = (v * r).clamp(-1.0, 1.0);
            let h = (c + 1.0) * 0.5;
            lut[(h * 65535.0 + 0.5) as usize]
        }));
    }
    (codes, absmax)
}

/// `x` as Python's `repr(float)` writes it (what bitsandbytes' quant_state JSON holds).
pub fn python_float_repr(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Shortest round-trip digits and the decimal exponent, from Rust's `{:e}`.
    let sci = format!("{x:e}");
    let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let (sign, mant) = mant.strip_prefix('-').map_or(("", mant), |m| ("-", m));
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let s = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_reprs() {
        for (x, want) in [
            (0.38801538944244385, "0.38801538944244385"),
            (1e-05, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (0.0001, "0.0001"),
            (2.0, "2.0"),
            (-3.5e20, "-3.5e+20"),
            (1e16, "1e+16"),
            (123.25, "123.25"),
            (-0.0, "-0.0"),
        ] {
            assert_eq!(python_float_repr(x), want);
        }
    }

    #[test]
    fn tables_are_consistent() {
        let d = dynamic_map();
        assert!(d.windows(2).all(|w| w[0] < w[1]) && d[127] == 0.0 && d[255] == 1.0);
        assert!(NF4_TABLE.windows(2).all(|w| w[0] < w[1]));
        // README §1's first bound.
        assert_eq!(((NF4_TABLE[0] + NF4_TABLE[1]) / 2.0).to_bits(), 0xbf591cd8);
    }
}
