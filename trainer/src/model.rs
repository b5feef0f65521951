//! The frozen base model in libtorch: Llama, Mistral and Qwen2 decoders, as transformers'
//! `modeling_llama.py` / `modeling_qwen2.py` compute them (RMSNorm in f32, rotary embeddings
//! with `rotate_half`, grouped-query attention, SiLU-gated MLP, q/k/v biases for qwen2, tied or
//! untied head).
//!
//! The weights come from the runtime's loader ([`peftrt::Model`]: `config.json` parsing,
//! safetensors memory maps, tensor names and shapes checked there), are copied once into
//! libtorch tensors that never require gradients, and never reach the optimiser: the only
//! trainable tensors are the LoRA weights in [`crate::lora::LoraSet`], applied at one place,
//! [`BaseModel::project`], from the [`Pass`] a forward runs with (`None` there: the base
//! alone). With `--qlora` the projections are kept as NF4 codes (the runtime's quantiser, the
//! bytes bitsandbytes would write; `model/nf4.rs`) and dequantised one layer at a time. The
//! attention of a block is in `model/attention.rs`.

use crate::dropout::DropoutStream;
use crate::error::{Error, Result};
use crate::fused;
use crate::lora::{LinearShape, LoraSet};
use nf4::Nf4Tensor;
use peftrt::config::ModelConfig;
use peftrt::weights::DType;
use tch::{Device, Kind, Tensor};

mod attention;
mod nf4;

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

/// How a forward pass runs, beside its input: with which adapter, whether training (LoRA
/// dropout on), and how dropout masks are seeded.
#[derive(Clone, Copy)]
pub struct Pass<'a> {
    /// The LoRA layers added to the projections (`None`: the base alone).
    pub lora: Option<&'a LoraSet>,
    /// Training: LoRA dropout applies.
    pub train: bool,
    /// When training, each block `i` reseeds the dropout masks with `dropout_seed + i` first
    /// (see [`BaseModel::block_at`]); `None`: the generator runs on.
    pub dropout_seed: Option<i64>,
}

impl<'a> Pass<'a> {
    /// A pass with `lora` (or the base alone), training or not, dropout masks not reseeded.
    pub fn new(lora: Option<&'a LoraSet>, train: bool) -> Self {
        Pass { lora, train, dropout_seed: None }
    }

    /// The same pass with dropout masks reseeded per block from `seed`.
    pub fn with_dropout_seed(self, seed: i64) -> Self {
        Pass { dropout_seed: Some(seed), ..self }
    }
}

/// A runtime tensor (F32, F16, BF16) as a libtorch tensor of `kind` on `device`.
fn float_tensor(t: &peftrt::weights::Tensor, kind: Kind, device: Device) -> Result<Tensor> {
    let stored = match t.dtype {
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        // expect_float's error names the tensor and file.
        DType::U8 => return Err(t.expect_float().map_or_else(Error::from, |()| Error::Input(t.name.clone()))),
        // A GGUF base (its Q/K rows in llama.cpp's order, too): trained on as a directory.
        DType::Quant(ty) => {
            return Err(Error::Input(format!(
                "tensor {} of {} is {ty}: the trainer takes a Hugging Face model directory; \
                 `peftrt import` the GGUF first (adapters trained on the import serve on the GGUF)",
                t.name,
                t.file.display()
            )))
        }
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

    /// The name, index and shape of this layer, as LoRA sees it.
    pub fn shape(&self) -> LinearShape {
        LinearShape { name: self.name.clone(), id: self.id, rows: self.rows, cols: self.cols }
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

    /// The name, index and shape of every linear layer, in [`BaseModel::linears`]' order (what
    /// [`LoraSet::init`] and [`LoraSet::from_adapter`] attach LoRA layers to).
    pub fn linear_shapes(&self) -> Vec<LinearShape> {
        self.linears().map(BaseLinear::shape).collect()
    }

    /// `W·x + b`, plus `scale · B(A(dropout(x)))` when the pass's LoRA adapts this layer
    /// (PEFT's `lora.Linear.forward`). Every projection goes through here.
    pub fn project(&self, lin: &BaseLinear, x: &Tensor, pass: Pass) -> Result<Tensor> {
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
        match pass.lora.and_then(|lora| lora.for_layer(lin.id)) {
            None => Ok(y),
            Some(l) => {
                // In f32 (the LoRA weights' dtype), the sum cast back, as PEFT does.
                let x = x.f_to_kind(Kind::Float)?;
                let xd = match (pass.train && l.dropout > 0.0, self.device) {
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

    /// The SiLU-gated MLP: `down(silu(gate(x)) * up(x))`.
    fn mlp(&self, b: &Block, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let gate = self.project(&b.gate_proj, x, pass)?;
        let up = self.project(&b.up_proj, x, pass)?;
        let gated = if fused::applies(&gate) { fused::swiglu(&gate, &up)? } else { gate.f_silu()?.f_mul(&up)? };
        self.project(&b.down_proj, &gated, pass)
    }

    /// One decoder block: norm → attention → residual → norm → MLP → residual.
    fn block(&self, b: &Block, h: &Tensor, layout: &Layout, pass: Pass) -> Result<Tensor> {
        let a = self.attention(b, &self.rms_norm(h, &b.input_norm)?, layout, pass)?;
        let (h, normed) = self.add_rms_norm(h, &a, &b.post_attention_norm)?;
        let m = self.mlp(b, &normed, pass)?;
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

    /// Decoder block `i` on `h` `[batch, seq, hidden]`. When the pass trains with a
    /// `dropout_seed`, the dropout masks are reseeded with `dropout_seed + i` first (the CPU's
    /// mask keys, libtorch's generator on CUDA), so that a recomputation of the block (gradient
    /// checkpointing) draws the same masks.
    pub fn block_at(&self, i: usize, h: &Tensor, layout: &Layout, pass: Pass) -> Result<Tensor> {
        if let (true, Some(seed)) = (pass.train, pass.dropout_seed) {
            let seed = seed.wrapping_add(i as i64);
            if self.device == Device::Cpu {
                self.dropout.reseed(seed as u64);
            } else {
                tch::manual_seed(seed);
            }
        }
        let b = self.blocks.get(i).ok_or_else(|| Error::Input(format!("block {i} of {}", self.blocks.len())))?;
        self.block(b, h, layout, pass)
    }

    /// The last norm and the output head: f32 logits `[.., vocab]` of the last block's output
    /// `[.., hidden]` (every position, or only those a loss needs).
    pub fn head(&self, h: &Tensor, pass: Pass) -> Result<Tensor> {
        let h = self.rms_norm(h, &self.norm)?;
        Ok(self.project(&self.lm_head, &h, pass)?.f_to_kind(Kind::Float)?)
    }

    /// The last block's output `[batch, seq, hidden]` for `h`, the input of block `start` (the
    /// embeddings for `start` 0), its tokens laid out as `layout` says.
    pub fn hidden_from(&self, start: usize, mut h: Tensor, layout: &Layout, pass: Pass) -> Result<Tensor> {
        for i in start..self.blocks.len() {
            h = self.block_at(i, &h, layout, pass)?;
        }
        Ok(h)
    }

    /// Logits `[batch, seq, vocab]` (f32) of token ids `[batch, seq]` (Int64), every sequence
    /// starting at position 0.
    pub fn forward(&self, ids: &Tensor, pass: Pass) -> Result<Tensor> {
        let layout = self.causal_layout(ids.size()[1])?;
        let h = self.hidden_from(0, self.embed(ids)?, &layout, pass)?;
        self.head(&h, pass)
    }
}
