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
