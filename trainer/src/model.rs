//! The frozen base model in libtorch: Llama, Mistral and Qwen2 decoders, as transformers'
//! `modeling_llama.py` / `modeling_qwen2.py` compute them (RMSNorm in f32, rotary embeddings
//! with `rotate_half`, grouped-query attention, SiLU-gated MLP, q/k/v biases for qwen2, tied or
//! untied head).
//!
//! The weights come from the runtime's loader ([`peftrt::Model`]: `config.json` parsing,
//! safetensors memory maps, tensor names and shapes checked there), are copied once into
//! libtorch tensors that never require gradients, and never reach the optimiser: the only
//! trainable tensors are the LoRA weights in [`crate::lora::LoraSet`], applied at one place,
//! [`BaseModel::project`]. With `--qlora` the projections are kept as NF4 codes (the runtime's
//! quantiser, the bytes bitsandbytes would write) and dequantised one layer at a time.

use crate::dropout::DropoutStream;
use crate::error::{Error, Result};
use crate::fused;
use crate::lora::LoraSet;
use peftrt::config::ModelConfig;
use peftrt::weights::DType;
use tch::{Device, Kind, Tensor};

/// The longest sequence for which causal attention on a CPU runs as plain products
/// ([`BaseModel::causal_attention_products`]) instead of libtorch's flash kernel. Forward and
/// backward of SmolLM2's attention (9 query heads on 3 kv heads, batch 4, 2 threads): 7.9 vs
/// 12.3 ms at 128 tokens, even at 256, 188 vs 105 ms at 512.
const MATH_ATTENTION_MAX_SEQ: i64 = 128;

/// transformers' `LlamaRMSNorm` in libtorch's operators: normalise in f32, then scale by the
/// weight. The fused kernel's fallback and its reference in tests.
pub(crate) fn rms_norm_ops(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let kind = x.kind();
    let h = x.f_to_kind(Kind::Float)?;
    let variance = h.f_pow_tensor_scalar(2)?.f_mean_dim(-1, true, None::<Kind>)?;
    let h = h.f_mul(&variance.f_add_scalar(eps)?.f_rsqrt()?)?;
    Ok(weight.f_mul(&h.f_to_kind(kind)?)?)
}

/// The rotary embedding in libtorch's operators, for `x` `[batch, heads, seq, head_dim]`:
/// `x·cos + [x2, x1]·[-sin, sin]`. The fused kernel's fallback and its reference in tests.
pub(crate) fn rope_ops(x: &Tensor, cos: &Tensor, signed_sin: &Tensor) -> Result<Tensor> {
    let half = x.size()[3] / 2;
    let x1 = x.f_narrow(3, 0, half)?;
    let x2 = x.f_narrow(3, half, half)?;
    let swapped = Tensor::f_cat(&[x2, x1], 3)?;
    Ok(x.f_mul(cos)?.f_add(&swapped.f_mul(signed_sin)?)?)
}

/// How the frozen projections are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseStorage {
    /// f32 (upcast from the checkpoint's F32/F16/BF16).
    Float,
    /// NF4 codes and block scales, dequantised in the forward pass (QLoRA).
    Nf4,
}

/// A frozen linear layer's weight `[out, in]`.
enum Frozen {
    Float(Tensor),
    Nf4(Nf4Tensor),
}

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
    fn new(
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
    fn quantize(w: &[f32], rows: usize, cols: usize, device: Device) -> Result<Self> {
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
    fn from_runtime(q: &peftrt::nf4::Nf4Weight, rows: usize, cols: usize, device: Device) -> Result<Self> {
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
    fn dequantize(&self, kind: Kind) -> Result<Tensor> {
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

/// A frozen linear layer of the base.
pub struct BaseLinear {
    /// The module path, e.g. `model.layers.0.self_attn.q_proj` (LoRA layers attach by it).
    pub name: String,
    /// Index in the runtime's [`peftrt::Model::linears`] order.
    pub id: usize,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    weight: Frozen,
    /// `[out]`
    bias: Option<Tensor>,
}

/// One decoder block.
struct Block {
    /// `[hidden]`
    input_norm: Tensor,
    /// `[n_heads * head_dim, hidden]`
    q_proj: BaseLinear,
    /// `[n_kv_heads * head_dim, hidden]`
    k_proj: BaseLinear,
    /// `[n_kv_heads * head_dim, hidden]`
    v_proj: BaseLinear,
    /// `[hidden, n_heads * head_dim]`
    o_proj: BaseLinear,
    /// `[hidden]`
    post_attention_norm: Tensor,
    /// `[intermediate, hidden]`
    gate_proj: BaseLinear,
    /// `[intermediate, hidden]`
    up_proj: BaseLinear,
    /// `[hidden, intermediate]`
    down_proj: BaseLinear,
}

/// The frozen base model on one device.
pub struct BaseModel {
    pub config: ModelConfig,
    pub device: Device,
    /// The compute dtype of the frozen weights and activations: f32 on a CPU, bf16 on CUDA
    /// (norms, softmax, the LoRA path and the logits stay in f32, as under autocast).
    pub kind: Kind,
    pub storage: BaseStorage,
    /// `[vocab, hidden]`
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    /// `[hidden]`
    norm: Tensor,
    /// `[vocab, hidden]` (the embedding matrix itself when tied; never quantised)
    lm_head: BaseLinear,
    /// `[head_dim / 2]` rotary inverse frequencies, scaling applied (the runtime's values).
    inv_freq: Tensor,
    /// The keys of the LoRA dropout masks on a CPU (see [`crate::dropout`]).
    dropout: DropoutStream,
}

/// Where the tokens of a batch sit: their rotary tables and, for packed rows, which keys each
/// may attend to.
pub struct Layout {
    /// `[seq, head_dim]`, or `[batch, 1, seq, head_dim]` for per-token positions.
    cos: Tensor,
    /// The same shape: `[-sin, sin]` of the half-angles, the sign of `rotate_half` folded in.
    signed_sin: Tensor,
    /// `[batch, 1, seq, seq]` bool (true = may attend); `None`: plain causal attention.
    mask: Option<Tensor>,
}

/// A runtime tensor (F32, F16, BF16) as a libtorch tensor of `kind` on `device`.
fn float_tensor(t: &peftrt::weights::Tensor, kind: Kind, device: Device) -> Result<Tensor> {
    let stored = match t.dtype {
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        // expect_float's error names the tensor and file.
        DType::U8 => return Err(t.expect_float().map_or_else(Error::from, |()| Error::Input(t.name.clone()))),
    };
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(t.bytes(), &shape, stored)?.f_to_kind(kind)?.f_to(device)?)
}

fn vec_tensor(v: &[f32], kind: Kind, device: Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(v)?.f_to_kind(kind)?.f_to(device)?)
}

impl BaseLinear {
    fn load(lin: &peftrt::model::Linear, storage: BaseStorage, kind: Kind, device: Device) -> Result<Self> {
        let (rows, cols) = (lin.rows, lin.cols);
        let weight = match (storage, &lin.nf4) {
            (BaseStorage::Float, None) => Frozen::Float(float_tensor(&lin.weight, kind, device)?),
            // An NF4 checkpoint, trained on as stored.
            (BaseStorage::Nf4, Some(q)) => Frozen::Nf4(Nf4Tensor::from_runtime(q, rows, cols, device)?),
            // Quantised here, with the runtime's quantiser (the bytes `peftrt quantize` writes).
            (BaseStorage::Nf4, None) => Frozen::Nf4(Nf4Tensor::quantize(&lin.to_f32_vec(), rows, cols, device)?),
            // An NF4 checkpoint in float: bitsandbytes' dequantised values (the runtime's decoding).
            (BaseStorage::Float, Some(_)) => {
                Frozen::Float(vec_tensor(&lin.to_f32_vec(), kind, device)?.f_reshape([rows as i64, cols as i64])?)
            }
        };
        let bias = lin.bias.as_deref().map(|b| vec_tensor(b, kind, device)).transpose()?;
        Ok(BaseLinear { name: lin.name.clone(), id: lin.id, rows, cols, weight, bias })
    }

    /// The weight `[out, in]` in the compute dtype (dequantised for NF4).
    pub fn weight(&self, kind: Kind) -> Result<Tensor> {
        match &self.weight {
            Frozen::Float(w) => Ok(w.shallow_clone()),
            Frozen::Nf4(q) => q.dequantize(kind),
        }
    }
}

impl BaseModel {
    /// Copies the runtime's loaded model into libtorch tensors on `device` (f32 on a CPU,
    /// bf16 on CUDA).
    pub fn from_runtime(model: &peftrt::Model, storage: BaseStorage, device: Device) -> Result<Self> {
        if model.config.hidden_act != peftrt::config::Activation::Silu {
            // The runtime serves GeGLU models; training them needs the matching MLP here.
            return Err(peftrt::Error::Unsupported(format!(
                "{}: hidden_act {:?}: the trainer trains SiLU-gated (SwiGLU) models only",
                model.dir.display(),
                model.config.hidden_act
            ))
            .into());
        }
        let _guard = tch::no_grad_guard();
        let kind = if device.is_cuda() { Kind::BFloat16 } else { Kind::Float };
        let lin = |l: &peftrt::model::Linear| BaseLinear::load(l, storage, kind, device);
        let mut blocks = Vec::with_capacity(model.layers.len());
        for layer in &model.layers {
            blocks.push(Block {
                input_norm: vec_tensor(&layer.input_norm, kind, device)?,
                q_proj: lin(&layer.q_proj)?,
                k_proj: lin(&layer.k_proj)?,
                v_proj: lin(&layer.v_proj)?,
                o_proj: lin(&layer.o_proj)?,
                post_attention_norm: vec_tensor(&layer.post_attention_norm, kind, device)?,
                gate_proj: lin(&layer.gate_proj)?,
                up_proj: lin(&layer.up_proj)?,
                down_proj: lin(&layer.down_proj)?,
            });
        }
        let embed_tokens = float_tensor(&model.embed_tokens, kind, device)?;
        // The head stays in float even for QLoRA (as bitsandbytes leaves lm_head unquantised).
        let lm_head = if model.config.tie_word_embeddings {
            BaseLinear {
                name: "lm_head".into(),
                id: model.lm_head.id,
                rows: model.lm_head.rows,
                cols: model.lm_head.cols,
                weight: Frozen::Float(embed_tokens.shallow_clone()),
                bias: None,
            }
        } else {
            BaseLinear::load(&model.lm_head, BaseStorage::Float, kind, device)?
        };
        Ok(BaseModel {
            config: model.config.clone(),
            device,
            kind,
            storage,
            norm: vec_tensor(&model.norm, kind, device)?,
            inv_freq: vec_tensor(&model.rope_inv_freq, Kind::Float, device)?,
            embed_tokens,
            blocks,
            lm_head,
            dropout: DropoutStream::default(),
        })
    }

    /// Every linear layer, in the runtime's order: each block's q, k, v, o, gate, up, down,
    /// then `lm_head`.
    pub fn linears(&self) -> impl Iterator<Item = &BaseLinear> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.q_proj, &b.k_proj, &b.v_proj, &b.o_proj, &b.gate_proj, &b.up_proj, &b.down_proj])
            .chain([&self.lm_head])
    }

    /// `W·x + b`, plus `scale · B(A(dropout(x)))` when `lora` adapts this layer (PEFT's
    /// `lora.Linear.forward`). Every projection goes through here.
    pub fn project(&self, lin: &BaseLinear, x: &Tensor, lora: &LoraSet, train: bool) -> Result<Tensor> {
        let w = lin.weight(self.kind)?;
        let y = if fused::onednn_applies(x) {
            let y = fused::frozen_linear(x, &w)?;
            match &lin.bias {
                Some(b) => y.f_add(b)?,
                None => y,
            }
        } else {
            x.f_linear(&w, lin.bias.as_ref())?
        };
        match lora.for_layer(lin.id) {
            None => Ok(y),
            Some(l) => {
                // In f32 (the LoRA weights' dtype), the sum cast back, as PEFT does.
                let x = x.f_to_kind(Kind::Float)?;
                let xd = match (train && l.dropout > 0.0, self.device) {
                    (false, _) => x,
                    (true, Device::Cpu) => self.dropout.apply(&x, l.dropout)?,
                    (true, _) => x.f_dropout(l.dropout, true)?,
                };
                // The scale applied to the rank-r intermediate, not to the `[.., out]` product:
                // the same value up to rounding, at r/out of the cost.
                let delta = xd.f_linear::<Tensor>(&l.a, None)?.f_mul_scalar(l.scale)?.f_linear::<Tensor>(&l.b, None)?;
                Ok(y.f_add(&delta)?.f_to_kind(self.kind)?)
            }
        }
    }

    /// transformers' `LlamaRMSNorm` (one fused kernel for f32 on a CPU, else [`rms_norm_ops`]).
    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let eps = f64::from(self.config.rms_norm_eps);
        if fused::applies(x) {
            return fused::rms_norm(x, weight, eps);
        }
        rms_norm_ops(x, weight, eps)
    }

    /// `(x + r, rms_norm(x + r))`: the residual add and the norm after it (one fused kernel for
    /// f32 on a CPU).
    fn add_rms_norm(&self, x: &Tensor, r: &Tensor, weight: &Tensor) -> Result<(Tensor, Tensor)> {
        if fused::applies(x) {
            return fused::add_rms_norm(x, r, weight, f64::from(self.config.rms_norm_eps));
        }
        let sum = x.f_add(r)?;
        let normed = self.rms_norm(&sum, weight)?;
        Ok((sum, normed))
    }

    /// `cos` and signed `sin` of the rotary angles at `positions` (f32, any shape), with a
    /// last axis of `head_dim`: `[cos, cos]` and `[-sin, sin]` of the half-angles.
    fn rope_at(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let freqs = positions.f_unsqueeze(-1)?.f_mul(&self.inv_freq)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        let sin = freqs.f_sin()?;
        let signed_sin = Tensor::f_cat(&[sin.f_neg()?, sin], -1)?;
        Ok((emb.f_cos()?.f_to_kind(self.kind)?, signed_sin.f_to_kind(self.kind)?))
    }

    /// Every sequence of the batch at positions `0..seq`, causal attention.
    pub fn causal_layout(&self, seq: i64) -> Result<Layout> {
        let (cos, signed_sin) = self.rope_at(&Tensor::f_arange(seq, (Kind::Float, self.device))?)?;
        Ok(Layout { cos, signed_sin, mask: None })
    }

    /// Packed rows: `segments` `[batch, seq]` numbers the examples of each row (−1 for
    /// padding), `positions` `[batch, seq]` restart at 0 with each example. A token attends to
    /// the earlier tokens of its own example only (padding to earlier padding), so a packed
    /// example computes what it would alone.
    pub fn packed_layout(&self, positions: &Tensor, segments: &Tensor) -> Result<Layout> {
        let positions = positions.f_to(self.device)?.f_to_kind(Kind::Float)?;
        let segments = segments.f_to(self.device)?;
        let (cos, signed_sin) = self.rope_at(&positions)?;
        let same = segments.f_unsqueeze(2)?.f_eq_tensor(&segments.f_unsqueeze(1)?)?;
        Ok(Layout {
            cos: cos.f_unsqueeze(1)?,
            signed_sin: signed_sin.f_unsqueeze(1)?,
            mask: Some(same.f_unsqueeze(1)?),
        })
    }

    /// `x·cos + rotate_half(x)·sin` for `x` `[batch, heads, seq, head_dim]`, computed as
    /// `x·cos + [x2, x1]·[-sin, sin]` (the same products: negation is exact).
    fn apply_rope(x: &Tensor, cos: &Tensor, signed_sin: &Tensor) -> Result<Tensor> {
        if fused::applies(x) {
            // The fused kernel takes [batch, seq, heads, head_dim] (x is its transposed view)
            // and tables [1 or batch, seq, head_dim].
            let table = |t: &Tensor| if t.dim() == 2 { t.f_unsqueeze(0) } else { t.f_squeeze_dim(1) };
            let y = fused::rope(&x.f_transpose(1, 2)?, &table(cos)?, &table(signed_sin)?)?;
            return Ok(y.f_transpose(1, 2)?);
        }
        rope_ops(x, cos, signed_sin)
    }

    /// Causal attention as three batched products and a softmax, for `q` `[batch, heads, seq,
    /// head_dim]` and `k`, `v` `[batch, kv_heads, seq, head_dim]`: the query heads that share a
    /// kv head are stacked along the sequence axis (`[batch, kv_heads, group · seq, head_dim]`),
    /// so grouped-query attention multiplies each k and v once without copying them. It keeps
    /// the `[.., seq, seq]` probabilities for the backward, which the flash kernel recomputes:
    /// on a CPU that is faster at short sequences (see [`MATH_ATTENTION_MAX_SEQ`]).
    fn causal_attention_products(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let [batch, n_heads, seq, head_dim] = q.size()[..] else {
            return Err(Error::Input(format!("attention: queries of shape {:?}, not 4-d", q.size())));
        };
        let n_kv = k.size()[1];
        let group = n_heads / n_kv;
        let q = q.f_mul_scalar(scale)?.f_reshape([batch, n_kv, group * seq, head_dim])?;
        let scores = q.f_matmul(&k.f_transpose(-1, -2)?)?.f_view([batch, n_kv, group, seq, seq])?;
        let future = Tensor::f_full([seq, seq], f64::NEG_INFINITY, (q.kind(), q.device()))?.f_triu(1)?;
        let probs = scores.f_add(&future)?.f_softmax(-1, None::<Kind>)?.f_view([batch, n_kv, group * seq, seq])?;
        Ok(probs.f_matmul(v)?.f_view([batch, n_heads, seq, head_dim])?)
    }

    /// Causal self-attention of one block on `x` `[batch, seq, hidden]`.
    fn attention(&self, b: &Block, x: &Tensor, layout: &Layout, lora: &LoraSet, train: bool) -> Result<Tensor> {
        let c = &self.config;
        let (batch, seq) = (x.size()[0], x.size()[1]);
        let (n_heads, n_kv, head_dim) = (c.num_attention_heads as i64, c.num_key_value_heads as i64, c.head_dim as i64);
        let heads =
            |t: Tensor, n: i64| -> Result<Tensor> { Ok(t.f_view([batch, seq, n, head_dim])?.f_transpose(1, 2)?) };
        let q = heads(self.project(&b.q_proj, x, lora, train)?, n_heads)?;
        let k = heads(self.project(&b.k_proj, x, lora, train)?, n_kv)?;
        let v = heads(self.project(&b.v_proj, x, lora, train)?, n_kv)?;
        let q = Self::apply_rope(&q, &layout.cos, &layout.signed_sin)?;
        let k = Self::apply_rope(&k, &layout.cos, &layout.signed_sin)?;
        // Grouped-query attention: each kv head serves n_heads / n_kv query heads (transformers'
        // repeat_kv), done inside the attention kernel (`enable_gqa`) instead of copying k and v.
        let gqa = n_heads != n_kv;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let window = c.sliding_window.map(|w| w as i64).filter(|&w| w < seq);
        let out = match (window, &layout.mask) {
            (None, None) if self.device == Device::Cpu && seq <= MATH_ATTENTION_MAX_SEQ => {
                Self::causal_attention_products(&q, &k, &v, scale)?
            }
            (None, None) => Tensor::f_scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, scale, gqa)?,
            (window, mask) => {
                // Key j is visible from query i when j <= i (and i - j < window, mistral), and
                // in packed rows when both belong to the same example.
                let i = Tensor::f_arange(seq, (Kind::Int64, self.device))?.f_unsqueeze(1)?;
                let j = Tensor::f_arange(seq, (Kind::Int64, self.device))?.f_unsqueeze(0)?;
                let d = i.f_sub(&j)?;
                let mut allowed = d.f_ge(0)?;
                if let Some(w) = window {
                    allowed = allowed.f_logical_and(&d.f_lt(w)?)?;
                }
                if let Some(m) = mask {
                    allowed = allowed.f_logical_and(m)?;
                }
                Tensor::f_scaled_dot_product_attention(&q, &k, &v, Some(&allowed), 0.0, false, scale, gqa)?
            }
        };
        let out = out.f_transpose(1, 2)?.f_contiguous()?.f_view([batch, seq, n_heads * head_dim])?;
        self.project(&b.o_proj, &out, lora, train)
    }

    /// The SiLU-gated MLP: `down(silu(gate(x)) * up(x))`.
    fn mlp(&self, b: &Block, x: &Tensor, lora: &LoraSet, train: bool) -> Result<Tensor> {
        let gate = self.project(&b.gate_proj, x, lora, train)?;
        let up = self.project(&b.up_proj, x, lora, train)?;
        let gated = if fused::applies(&gate) { fused::swiglu(&gate, &up)? } else { gate.f_silu()?.f_mul(&up)? };
        self.project(&b.down_proj, &gated, lora, train)
    }

    /// One decoder block: norm → attention → residual → norm → MLP → residual.
    fn block(&self, b: &Block, h: &Tensor, layout: &Layout, lora: &LoraSet, train: bool) -> Result<Tensor> {
        let a = self.attention(b, &self.rms_norm(h, &b.input_norm)?, layout, lora, train)?;
        let (h, normed) = self.add_rms_norm(h, &a, &b.post_attention_norm)?;
        let m = self.mlp(b, &normed, lora, train)?;
        Ok(h.f_add(&m)?)
    }

    /// The token embeddings `[batch, seq, hidden]` of ids `[batch, seq]` (Int64).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(Tensor::f_embedding(&self.embed_tokens, ids, -1, false, false)?)
    }

    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The lowest decoder block with a LoRA layer in `lora` (the number of blocks when none
    /// has one): the blocks below it are frozen whole.
    pub fn first_adapted_block(&self, lora: &LoraSet) -> usize {
        self.blocks
            .iter()
            .position(|b| {
                [&b.q_proj, &b.k_proj, &b.v_proj, &b.o_proj, &b.gate_proj, &b.up_proj, &b.down_proj]
                    .iter()
                    .any(|l| lora.for_layer(l.id).is_some())
            })
            .unwrap_or(self.blocks.len())
    }

    /// Decoder block `i` on `h` `[batch, seq, hidden]`. With `dropout_seed`, the dropout masks
    /// are reseeded with `dropout_seed + i` first (the CPU's mask keys, libtorch's generator on
    /// CUDA), so that a recomputation of the block (gradient checkpointing) draws the same masks.
    pub fn block_at(
        &self,
        i: usize,
        h: &Tensor,
        layout: &Layout,
        lora: &LoraSet,
        train: bool,
        dropout_seed: Option<i64>,
    ) -> Result<Tensor> {
        if let (true, Some(seed)) = (train, dropout_seed) {
            let seed = seed.wrapping_add(i as i64);
            if self.device == Device::Cpu {
                self.dropout.reseed(seed as u64);
            } else {
                tch::manual_seed(seed);
            }
        }
        let b = self.blocks.get(i).ok_or_else(|| Error::Input(format!("block {i} of {}", self.blocks.len())))?;
        self.block(b, h, layout, lora, train)
    }

    /// The last norm and the output head: f32 logits `[.., vocab]` of the last block's output
    /// `[.., hidden]` (every position, or only those a loss needs).
    pub fn head(&self, h: &Tensor, lora: &LoraSet, train: bool) -> Result<Tensor> {
        let h = self.rms_norm(h, &self.norm)?;
        Ok(self.project(&self.lm_head, &h, lora, train)?.f_to_kind(Kind::Float)?)
    }

    /// The last block's output `[batch, seq, hidden]` for token ids `[batch, seq]` laid out as
    /// `layout` says; `dropout_seed` as in [`BaseModel::block_at`].
    pub fn hidden_seeded(
        &self,
        ids: &Tensor,
        layout: &Layout,
        lora: &LoraSet,
        train: bool,
        dropout_seed: Option<i64>,
    ) -> Result<Tensor> {
        self.hidden_from(0, self.embed(ids)?, layout, lora, train, dropout_seed)
    }

    /// The last block's output for `h`, the input `[batch, seq, hidden]` of block `start`
    /// (the embeddings for `start` 0); the rest as in [`BaseModel::hidden_seeded`].
    pub fn hidden_from(
        &self,
        start: usize,
        mut h: Tensor,
        layout: &Layout,
        lora: &LoraSet,
        train: bool,
        dropout_seed: Option<i64>,
    ) -> Result<Tensor> {
        for i in start..self.blocks.len() {
            h = self.block_at(i, &h, layout, lora, train, dropout_seed)?;
        }
        Ok(h)
    }

    /// Logits `[batch, seq, vocab]` (f32) of token ids `[batch, seq]` laid out as `layout`
    /// says; `dropout_seed` as in [`BaseModel::block_at`].
    pub fn forward_seeded(
        &self,
        ids: &Tensor,
        layout: &Layout,
        lora: &LoraSet,
        train: bool,
        dropout_seed: Option<i64>,
    ) -> Result<Tensor> {
        self.head(&self.hidden_seeded(ids, layout, lora, train, dropout_seed)?, lora, train)
    }

    /// Logits `[batch, seq, vocab]` (f32) of token ids `[batch, seq]` (Int64), every sequence
    /// starting at position 0.
    pub fn forward(&self, ids: &Tensor, lora: &LoraSet, train: bool) -> Result<Tensor> {
        self.forward_seeded(ids, &self.causal_layout(ids.size()[1])?, lora, train, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SplitMix64;

    /// The short-sequence attention path computes libtorch's causal attention with grouped
    /// kv heads (`scaled_dot_product_attention`, `enable_gqa`): outputs and the gradients of
    /// q, k and v, for one token, a few, and the longest sequence it takes.
    #[test]
    fn attention_products_match_scaled_dot_product_attention() {
        let (batch, n_heads, n_kv, head_dim) = (2, 9, 3, 16);
        let scale = 1.0 / (head_dim as f64).sqrt();
        for seq in [1, 7, MATH_ATTENTION_MAX_SEQ] {
            tch::manual_seed(seq);
            let opts = (Kind::Float, Device::Cpu);
            let q = Tensor::randn([batch, n_heads, seq, head_dim], opts);
            let k = Tensor::randn([batch, n_kv, seq, head_dim], opts);
            let v = Tensor::randn([batch, n_kv, seq, head_dim], opts);
            let dout = Tensor::randn([batch, n_heads, seq, head_dim], opts);
            let run = |math: bool| {
                let leaves: Vec<Tensor> = [&q, &k, &v].iter().map(|t| t.copy().set_requires_grad(true)).collect();
                let (q, k, v) = (&leaves[0], &leaves[1], &leaves[2]);
                let out = if math {
                    BaseModel::causal_attention_products(q, k, v, scale).unwrap()
                } else {
                    Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, true, scale, true)
                };
                (&out * &dout).sum(Kind::Float).backward();
                (out.detach(), leaves.iter().map(Tensor::grad).collect::<Vec<_>>())
            };
            let ((want, want_g), (got, got_g)) = (run(false), run(true));
            let close = |a: &Tensor, b: &Tensor| {
                (a - b).abs().max().double_value(&[]) <= 2e-6 * b.abs().max().double_value(&[]).max(1.0)
            };
            assert!(close(&got, &want), "seq {seq}: outputs");
            for (name, (g, w)) in ["q", "k", "v"].iter().zip(got_g.iter().zip(&want_g)) {
                assert!(close(g, w), "seq {seq}: gradient of {name}");
            }
        }
    }

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
