//! ggml tensor types, the quantised block layouts, and their dequantisation to `f32`.
//!
//! Each block struct mirrors the C struct of `ggml/src/ggml-common.h` (`#[repr(C)]`, checked
//! size) and each `to_float` follows the matching `dequantize_row_*` of
//! `ggml/src/ggml-quants.c`, operation for operation, so results are bit-identical to ggml's
//! reference dequantisers (and to gguf-py's `gguf.quants.dequantize`, against which the unit
//! tests compare). Rust never fuses `a * b + c` into an FMA, so the rounding is that of the
//! written expression.
//!
//! One file of about 640 lines on purpose: the type table ([`GgmlType`]), then one block
//! struct and one dequantiser per quantised type, kept together so the table reads as one and
//! can be checked side by side with `ggml-common.h` and `ggml-quants.c`. The tests are
//! `quants/tests.rs`.

use half::{bf16, f16};

/// The ggml tensor types a GGUF file may declare (`enum ggml_type` in `ggml.h`).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

impl GgmlType {
    /// The type with this numeric id, `None` for ids this version does not know.
    pub fn from_u32(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            _ => return None,
        })
    }

    /// The numeric id stored in files.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
        }
    }

    /// The name llama.cpp uses (`Q4_K`, `BF16`...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
        }
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | I8 | I16 | I32 | I64 | F64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL | MXFP4 => 32,
            _ => QK_K,
        }
    }

    /// Bytes per block (`type_size` of ggml's type traits).
    pub fn type_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | I32 => 4,
            F16 | BF16 | I16 => 2,
            I8 => 1,
            I64 | F64 => 8,
            Q4_0 | IQ4_NL => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q8_1 => 36,
            Q2_K => 84,
            Q3_K => 110,
            Q4_K => 144,
            Q5_K => 176,
            Q6_K => 210,
            Q8_K => 292,
            IQ2_XXS => 66,
            IQ2_XS => 74,
            IQ3_XXS => 98,
            IQ1_S => 50,
            IQ3_S => 110,
            IQ2_S => 82,
            IQ4_XS => 136,
            IQ1_M => 56,
            TQ1_0 => 54,
            TQ2_0 => 66,
            MXFP4 => 17,
        }
    }

    /// Whether [`dequantize`] supports this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Elements in a k-quant super-block.
pub const QK_K: usize = 256;
/// The largest block of any type (`QK_K`): a stack buffer of this size holds any one block.
pub const MAX_BLOCK: usize = QK_K;
/// Elements in a legacy quant block.
pub const QK: usize = 32;

/// One quantised block of a ggml type.
///
/// # Safety
/// Implementors must be `#[repr(C)]` plain data without padding, valid for every bit pattern
/// (only integer, byte-array and `f16` fields), so that a block can be read from any
/// `size_of::<Self>()` bytes of a file.
pub unsafe trait GgmlBlock: Copy {
    /// The ggml type these blocks make up.
    const TYPE: GgmlType;
    /// Elements per block.
    const BLOCK_SIZE: usize;
    /// Writes the block's `BLOCK_SIZE` values to `out` (which has exactly that length).
    fn to_float(&self, out: &mut [f32]);
}

/// `block_q4_0`: 32 4-bit values `(q - 8) * d`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);

/// `block_q4_1`: 32 4-bit values `q * d + m`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

/// `block_q5_0`: 32 5-bit values `(q - 16) * d`, fifth bits in `qh`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);

/// `block_q5_1`: 32 5-bit values `q * d + m`, fifth bits in `qh`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);

/// `block_q8_0`: 32 signed bytes `q * d`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// `block_q2_K`: 256 2-bit values in 16 groups with 4-bit scales and mins.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: f16,
    pub dmin: f16,
}
const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);

/// `block_q3_K`: 256 3-bit values (high bit in `hmask`) in 16 groups with 6-bit scales.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);

/// `block_q4_K`: 256 4-bit values in 8 groups with 6-bit scales and mins.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);

/// `block_q5_K`: 256 5-bit values (high bit in `qh`) in 8 groups with 6-bit scales and mins.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);

/// `block_q6_K`: 256 6-bit values (low 4 bits in `ql`, high 2 in `qh`) with 8-bit scales.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

// SAFETY (all impls below): repr(C) structs of u8/i8 arrays and f16 (a u16), sizes asserted
// equal to the sum of the fields, so no padding and every bit pattern is valid.

// SAFETY: see above.
unsafe impl GgmlBlock for BlockQ4_0 {
    const TYPE: GgmlType = GgmlType::Q4_0;
    const BLOCK_SIZE: usize = QK;
    // ggml-quants.c: dequantize_row_q4_0
    fn to_float(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for j in 0..QK / 2 {
            let x0 = (self.qs[j] & 0x0F) as i32 - 8;
            let x1 = (self.qs[j] >> 4) as i32 - 8;
            y[j] = x0 as f32 * d;
            y[j + QK / 2] = x1 as f32 * d;
        }
    }
}

// SAFETY: see above.
unsafe impl GgmlBlock for BlockQ4_1 {
    const TYPE: GgmlType = GgmlType::Q4_1;
    const BLOCK_SIZE: usize = QK;
    // ggml-quants.c: dequantize_row_q4_1
    fn to_float(&self, y: &mut [f32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        for j in 0..QK / 2 {
            let x0 = (self.qs[j] & 0x0F) as i32;
            let x1 = (self.qs[j] >> 4) as i32;
            y[j] = x0 as f32 * d + m;
            y[j + QK / 2] = x1 as f32 * d + m;
        }
    }
}

// SAFETY: see above.
unsafe impl GgmlBlock for BlockQ5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;
    const BLOCK_SIZE: usize = QK;
    // ggml-quants.c: dequantize_row_q5_0
    fn to_float(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        let qh = u32::from_le_bytes(self.qh);
        for j in 0..QK / 2 {
            let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
            let x0 = ((self.qs[j] & 0x0F) | xh_0) as i32 - 16;
            let x1 = ((self.qs[j] >> 4) | xh_1) as i32 - 16;
            y[j] = x0 as f32 * d;
            y[j + QK / 2] = x1 as f32 * d;
        }
    }
}

// SAFETY: see above.
unsafe impl GgmlBlock for BlockQ5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;
    const BLOCK_SIZE: usize = QK;
    // ggml-quants.c: dequantize_row_q5_1
    fn to_float(&self, y: &mut [f32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        let qh = u32::from_le_bytes(self.qh);
        for j in 0..QK / 2 {
            let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
            let x0 = ((self.qs[j] & 0x0F) | xh_0) as i32;
            let x1 = ((self.qs[j] >> 4) | xh_1) as i32;
            y[j] = x0 as f32 * d + m;
            y[j + QK / 2] = x1 as f32 * d + m;
        }
    }
}

// SAFETY: see above.
unsafe impl GgmlBlock for BlockQ8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    const BLOCK_SIZE: usize = QK;
    // ggml-quants.c: dequantize_row_q8_0
    fn to_float(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (y, &q) in y.iter_mut().zip(&self.qs) {
            *y = q as f32 * d;
        }
    }
}

// SAFETY: see above.
unsafe impl GgmlBlock for BlockQ2K {
    const TYPE: GgmlType = GgmlType::Q2_K;
    const BLOCK_SIZE: usize = QK_K;
    // ggml-quants.c: dequantize_row_q2_K
    fn to_float(&self, y: &mut [f32]) {
        let (d, min) = (self.d.to_f32(), self.dmin.to_f32());
        let mut out = 0;
        let mut is = 0;
        for q in self.qs.chunks_exact(32) {
            for shift in [0, 2, 4, 6] {
                for half in [&q[..16], &q[16..]] {
                    let sc = self.scales[is];
                    is += 1;
                    let dl = d * (sc & 0xF) as f32;
                    let ml = min * (sc >> 4) as f32;
                    for &b in half {
                        y[out] = dl * ((b >> shift) & 3) as f32 - ml;
                        out += 1;
                    }
                }
            }
        }
    }
}

// SAFETY: see above.
unsafe impl GgmlBlock for BlockQ3K {
    const TYPE: GgmlType = GgmlType::Q3_K;
    const BLOCK_SIZE: usize = QK_K;
    // ggml-quants.c: dequantize_row_q3_K
    fn to_float(&self, y: &mut [f32]) {
        let d_all = self.d.to_f32();
        // The 16 6-bit scales: low 4 bits from bytes 0..8 (low then high nibbles), high
        // 2 bits from bytes 8..12 (the kmask1/kmask2 unpacking of the reference).
        let mut scales = [0i32; 16];
        for (j, s) in scales.iter_mut().enumerate() {
            let lo = if j < 8 { self.scales[j] & 0xF } else { self.scales[j - 8] >> 4 };
            let hi = (self.scales[8 + j % 4] >> (2 * (j / 4))) & 3;
            *s = (lo | (hi << 4)) as i32 - 32;
        }
        let mut out = 0;
        let mut is = 0;
        let mut m: u8 = 1;
        for q in self.qs.chunks_exact(32) {
            for shift in [0, 2, 4, 6] {
                for off in [0, 16] {
                    let dl = d_all * scales[is] as f32;
                    is += 1;
                    let (q, hm) = (&q[off..off + 16], &self.hmask[off..off + 16]);
                    for (&ql, &h) in q.iter().zip(hm) {
                        let hbit = if h & m != 0 { 0 } else { 4 };
                        let v = ((ql >> shift) & 3) as i32 - hbit;
                        y[out] = dl * v as f32;
                        out += 1;
                    }
                }
                m <<= 1;
            }
        }
    }
}

/// The `j`-th 6-bit scale and min of a Q4_K/Q5_K block (ggml-quants.c: get_scale_min_k4).
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

// SAFETY: see above.
unsafe impl GgmlBlock for BlockQ4K {
    const TYPE: GgmlType = GgmlType::Q4_K;
    const BLOCK_SIZE: usize = QK_K;
    // ggml-quants.c: dequantize_row_q4_K
    fn to_float(&self, y: &mut [f32]) {
        let (d, min) = (self.d.to_f32(), self.dmin.to_f32());
        for (g, (q, y)) in self.qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
            let (sc, m) = scale_min_k4(2 * g, &self.scales);
            let (d1, m1) = (d * sc as f32, min * m as f32);
            let (sc, m) = scale_min_k4(2 * g + 1, &self.scales);
            let (d2, m2) = (d * sc as f32, min * m as f32);
            for l in 0..32 {
                y[l] = d1 * (q[l] & 0xF) as f32 - m1;
                y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

// SAFETY: see above.
unsafe impl GgmlBlock for BlockQ5K {
    const TYPE: GgmlType = GgmlType::Q5_K;
    const BLOCK_SIZE: usize = QK_K;
    // ggml-quants.c: dequantize_row_q5_K
    fn to_float(&self, y: &mut [f32]) {
        let (d, min) = (self.d.to_f32(), self.dmin.to_f32());
        for (g, (ql, y)) in self.qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
            let (u1, u2) = (1u8 << (2 * g), 2u8 << (2 * g));
            let (sc, m) = scale_min_k4(2 * g, &self.scales);
            let (d1, m1) = (d * sc as f32, min * m as f32);
            let (sc, m) = scale_min_k4(2 * g + 1, &self.scales);
            let (d2, m2) = (d * sc as f32, min * m as f32);
            for l in 0..32 {
                let h1 = if self.qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if self.qh[l] & u2 != 0 { 16 } else { 0 };
                y[l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
                y[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
            }
        }
    }
}

// SAFETY: see above.
unsafe impl GgmlBlock for BlockQ6K {
    const TYPE: GgmlType = GgmlType::Q6_K;
    const BLOCK_SIZE: usize = QK_K;
    // ggml-quants.c: dequantize_row_q6_K
    fn to_float(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for n in 0..2 {
            let (ql, qh) = (&self.ql[64 * n..64 * n + 64], &self.qh[32 * n..32 * n + 32]);
            let sc = &self.scales[8 * n..8 * n + 8];
            let y = &mut y[128 * n..128 * n + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * sc[is] as f32 * q1 as f32;
                y[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
                y[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
                y[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
            }
        }
    }
}

/// Dequantises whole blocks of type `B` from `data` into `out`.
fn dequantize_blocks<B: GgmlBlock>(data: &[u8], out: &mut [f32]) {
    let size = std::mem::size_of::<B>();
    for (chunk, y) in data.chunks_exact(size).zip(out.chunks_exact_mut(B::BLOCK_SIZE)) {
        // SAFETY: `chunk` has exactly size_of::<B>() bytes and `B` is valid for any bit
        // pattern (the `GgmlBlock` contract); read_unaligned needs no alignment.
        let block: B = unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<B>()) };
        block.to_float(y);
    }
}

/// Dequantises `data` (whole blocks of `ty`) into `out`, whose length is the element count.
///
/// Errors (as a message, for the caller to wrap with the tensor name) when the type is not
/// supported or the lengths do not match.
#[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; the MSRV is 1.80
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), String> {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    if out.len() % bs != 0 || data.len() != out.len() / bs * ts {
        return Err(format!(
            "{} bytes of {ty} do not hold {} elements (blocks of {bs} elements in {ts} bytes)",
            data.len(),
            out.len()
        ));
    }
    match ty {
        GgmlType::F32 => {
            for (y, b) in out.iter_mut().zip(data.chunks_exact(4)) {
                *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (y, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *y = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (y, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *y = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => dequantize_blocks::<BlockQ4_0>(data, out),
        GgmlType::Q4_1 => dequantize_blocks::<BlockQ4_1>(data, out),
        GgmlType::Q5_0 => dequantize_blocks::<BlockQ5_0>(data, out),
        GgmlType::Q5_1 => dequantize_blocks::<BlockQ5_1>(data, out),
        GgmlType::Q8_0 => dequantize_blocks::<BlockQ8_0>(data, out),
        GgmlType::Q2_K => dequantize_blocks::<BlockQ2K>(data, out),
        GgmlType::Q3_K => dequantize_blocks::<BlockQ3K>(data, out),
        GgmlType::Q4_K => dequantize_blocks::<BlockQ4K>(data, out),
        GgmlType::Q5_K => dequantize_blocks::<BlockQ5K>(data, out),
        GgmlType::Q6_K => dequantize_blocks::<BlockQ6K>(data, out),
        other => {
            return Err(format!(
                "dequantising {other} is not supported (supported: F32, F16, BF16, Q4_0, Q4_1, \
                 Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K); re-quantise the model with \
                 llama.cpp's llama-quantize to one of these"
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
