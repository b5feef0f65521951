//! NF4 frozen weights for QLoRA: the codes and block scales of bitsandbytes' 4-bit format (the
//! runtime's quantiser and loader), kept 4-bit and dequantised when a projection is used.

use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// An NF4 weight kept 4-bit: two codes per byte (high nibble = even element), one f32 scale per
/// block (double quantisation already decoded, as the runtime's loader decodes it).
pub struct Nf4Tensor {
    codes: Nf4Codes,
    rows: i64,
    cols: i64,
    blocksize: i64,
}

/// Where an NF4 weight's codes live, which decides how it is dequantised.
enum Nf4Codes {
    /// On a CPU: plain memory, decoded in one pass by [`decode_nf4`] (libtorch's shift, mask,
    /// stack, widen, gather and scale take seven passes and an 8-byte index per element: that
    /// was a sixth of a QLoRA step).
    Host { packed: Vec<u8>, absmax: Vec<f32>, table: [f32; 16] },
    /// On CUDA: device tensors decoded with libtorch ops. `packed` `[rows * cols / 2]` u8,
    /// `absmax` `[rows * cols / blocksize]` f32, `table` `[16]` f32.
    Tensors { packed: Tensor, absmax: Tensor, table: Tensor },
}

impl Nf4Tensor {
    /// An NF4 weight from its parts (sizes checked by the callers), kept as `device` needs.
    pub(super) fn new(
        packed: Vec<u8>,
        absmax: Vec<f32>,
        table: [f32; 16],
        (rows, cols, blocksize): (usize, usize, usize),
        device: Device,
    ) -> Result<Self> {
        let codes = match device {
            Device::Cpu => Nf4Codes::Host { packed, absmax, table },
            _ => Nf4Codes::Tensors {
                packed: Tensor::f_from_slice(&packed)?.f_to(device)?,
                absmax: Tensor::f_from_slice(&absmax)?.f_to(device)?,
                table: Tensor::f_from_slice(&table)?.f_to(device)?,
            },
        };
        Ok(Nf4Tensor { codes, rows: rows as i64, cols: cols as i64, blocksize: blocksize as i64 })
    }

    /// Quantises `w` (`[rows, cols]`, row-major f32) with the runtime's NF4 quantiser
    /// (bit-exact with bitsandbytes' `quantize_4bit`, blocksize 64, double-quantised scales).
    pub(super) fn quantize(w: &[f32], rows: usize, cols: usize, device: Device) -> Result<Self> {
        const BLOCKSIZE: usize = 64;
        if !(rows * cols).is_multiple_of(BLOCKSIZE) {
            return Err(Error::Input(format!(
                "--qlora: a {rows}×{cols} weight is not a whole number of {BLOCKSIZE}-value NF4 blocks"
            )));
        }
        let q = peftrt::nf4::quantize(w, BLOCKSIZE, true);
        let absmax = q.absmax();
        Self::new(q.packed, absmax, peftrt::nf4::NF4_TABLE, (rows, cols, BLOCKSIZE), device)
    }

    /// An NF4 weight as the runtime loaded it from an NF4 checkpoint: the same codes and
    /// decoded scales (re-quantising the dequantised values could round the scales again).
    pub(super) fn from_runtime(q: &peftrt::nf4::Nf4Weight, rows: usize, cols: usize, device: Device) -> Result<Self> {
        let n = rows * cols;
        let packed = q.packed.bytes();
        if q.len != n
            || packed.len() != n.div_ceil(2)
            || !n.is_multiple_of(q.blocksize)
            || !q.blocksize.is_multiple_of(2)
        {
            return Err(Error::Input(format!(
                "tensor {}: {} NF4 codes in blocks of {} do not make a {rows}×{cols} weight",
                q.packed.name, q.len, q.blocksize
            )));
        }
        Self::new(packed.to_vec(), q.absmax.clone(), q.table, (rows, cols, q.blocksize), device)
    }

    /// The weight `[rows, cols]`: `table[code] · absmax[block]` in f32, as bitsandbytes
    /// dequantises, then cast to `kind`.
    pub(super) fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        match &self.codes {
            Nf4Codes::Host { packed, absmax, table } => {
                let mut values = vec![0f32; (self.rows * self.cols) as usize];
                decode_nf4(packed, absmax, table, self.blocksize as usize, &mut values, tch::get_num_threads());
                Ok(Tensor::f_from_slice(&values)?.f_reshape([self.rows, self.cols])?.f_to_kind(kind)?)
            }
            Nf4Codes::Tensors { packed, absmax, table } => {
                let hi = packed.f_bitwise_right_shift_tensor_scalar(4)?;
                let lo = packed.f_bitwise_and(15)?;
                let codes = Tensor::f_stack(&[hi, lo], 1)?.f_reshape([-1])?.f_to_kind(Kind::Int64)?;
                let values = table.f_index_select(0, &codes)?.f_reshape([-1, self.blocksize])?;
                Ok(values.f_mul(&absmax.f_unsqueeze(1)?)?.f_reshape([self.rows, self.cols])?.f_to_kind(kind)?)
            }
        }
    }
}

/// `out[i] = table[code i] · absmax[i / blocksize]` in f32, code `2k` in the high nibble of
/// `packed[k]` and `2k + 1` in the low one; `blocksize` even, `out` a whole number of blocks.
/// Blocks are shared out among up to `threads` threads (results do not depend on it).
fn decode_nf4(packed: &[u8], absmax: &[f32], table: &[f32; 16], blocksize: usize, out: &mut [f32], threads: i32) {
    let pairs: [[f32; 2]; 256] = std::array::from_fn(|b| [table[b >> 4], table[b & 15]]);
    let decode = |out: &mut [f32], packed: &[u8], absmax: &[f32]| {
        for ((dst, src), &scale) in out.chunks_exact_mut(blocksize).zip(packed.chunks_exact(blocksize / 2)).zip(absmax)
        {
            for (d, &b) in dst.chunks_exact_mut(2).zip(src) {
                let [hi, lo] = pairs[b as usize];
                d[0] = hi * scale;
                d[1] = lo * scale;
            }
        }
    };
    let blocks = out.len() / blocksize;
    // Below ~256k values a thread costs more than it saves.
    let threads = (threads.max(1) as usize).min(out.len().div_ceil(1 << 18)).max(1);
    if threads == 1 {
        return decode(out, packed, absmax);
    }
    let per = blocks.div_ceil(threads);
    std::thread::scope(|s| {
        let parts = out.chunks_mut(per * blocksize).zip(packed.chunks(per * blocksize / 2)).zip(absmax.chunks(per));
        for ((o, p), a) in parts {
            s.spawn(move || decode(o, p, a));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SplitMix64;

    /// The one-pass CPU decoding gives exactly libtorch's gather-and-scale, for one thread and
    /// several, blocksizes from 32 to 4096, and blocks that do not share out evenly among threads.
    #[test]
    fn host_dequantisation_matches_libtorch_ops_bit_for_bit() {
        let mut rng = SplitMix64::new(5);
        for (rows, cols, blocksize) in
            [(3, 64, 32), (17, 576, 64), (1536, 576, 64), (1000, 1024, 2048), (64, 4096, 4096)]
        {
            let n: usize = rows * cols;
            let packed: Vec<u8> = (0..n / 2).map(|_| rng.next_u64() as u8).collect();
            let absmax: Vec<f32> = (0..n / blocksize).map(|_| (rng.next_u64() % 1000) as f32 / 97.0).collect();
            let shape = (rows, cols, blocksize);
            let host =
                Nf4Tensor::new(packed.clone(), absmax.clone(), peftrt::nf4::NF4_TABLE, shape, Device::Cpu).unwrap();
            let ops = Nf4Tensor {
                codes: Nf4Codes::Tensors {
                    packed: Tensor::from_slice(&packed),
                    absmax: Tensor::from_slice(&absmax),
                    table: Tensor::from_slice(&peftrt::nf4::NF4_TABLE),
                },
                ..Nf4Tensor::new(vec![], vec![], [0.0; 16], shape, Device::Cpu).unwrap()
            };
            let want = ops.dequantize(Kind::Float).unwrap();
            for threads in [1, 2, 3] {
                let mut got = vec![0f32; n];
                decode_nf4(&packed, &absmax, &peftrt::nf4::NF4_TABLE, blocksize, &mut got, threads);
                let got = Tensor::from_slice(&got).reshape([rows as i64, cols as i64]);
                assert!(got.equal(&want), "{rows}×{cols} blocks of {blocksize}, {threads} threads");
            }
            assert!(host.dequantize(Kind::Float).unwrap().equal(&want));
        }
    }
}
