//! The immutable, shareable model: configuration, memory-mapped weights, tokenizer.
//!
//! Weights only; all per-conversation state (KV cache, activations) lives in
//! [`crate::Session`], so any number of sessions can share one `Model` across threads.
//! Tensor names follow transformers' `LlamaForCausalLM` (also used by Mistral and Qwen2).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::MatRef;
use crate::nf4::Nf4Weight;
use crate::tokenizer::Tokenizer;
use crate::weights::{DType, Tensor, WeightStore};
use std::path::{Path, PathBuf};

/// Options for [`Model::load`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Do not load `tokenizer.json` (token ids only).
    pub no_tokenizer: bool,
}

/// A linear layer: weight `[out, in]` (memory-mapped; float, or NF4 codes) and an optional
/// bias `[out]`.
pub struct Linear {
    /// The float weight, or for an NF4 layer the packed codes.
    pub weight: Tensor,
    /// The 4-bit weight and its decoded scales, for an NF4 layer.
    pub nf4: Option<Nf4Weight>,
    pub bias: Option<Vec<f32>>,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// The module path, e.g. `model.layers.3.self_attn.q_proj` (adapters attach by this name).
    pub name: String,
    /// Index among the model's linear layers ([`Model::linears`] order): adapters keep their
    /// weights in a table indexed by it, so finding a layer's adapter costs nothing.
    pub id: usize,
}

impl Linear {
    fn load(ws: &WeightStore, name: &str, rows: usize, cols: usize, bias: bool) -> Result<Self> {
        let wname = format!("{name}.weight");
        let weight = ws.get(&wname)?.clone();
        let nf4 = if weight.dtype == DType::U8 {
            Some(Nf4Weight::load(ws, &wname, rows, cols)?)
        } else {
            weight.expect_shape(&[rows, cols])?;
            weight.expect_float()?;
            None
        };
        let bias = if bias {
            let b = ws.get(&format!("{name}.bias"))?;
            b.expect_shape(&[rows])?;
            b.expect_float()?;
            Some(b.to_f32_vec())
        } else {
            None
        };
        Ok(Linear { weight, nf4, bias, rows, cols, name: name.to_string(), id: usize::MAX })
    }

    pub fn mat(&self) -> MatRef<'_> {
        let w = match &self.nf4 {
            Some(q) => q.weights(),
            None => self.weight.weights(),
        };
        MatRef { w, rows: self.rows, cols: self.cols }
    }

    /// The weight in f32 (dequantised for NF4: bitsandbytes' values exactly).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        self.mat().w.to_f32(0, &mut out);
        out
    }
}

/// One decoder block.
pub struct Layer {
    /// `[hidden]`
    pub input_norm: Vec<f32>,
    /// `[n_heads * head_dim, hidden]`
    pub q_proj: Linear,
    /// `[n_kv_heads * head_dim, hidden]`
    pub k_proj: Linear,
    /// `[n_kv_heads * head_dim, hidden]`
    pub v_proj: Linear,
    /// `[hidden, n_heads * head_dim]`
    pub o_proj: Linear,
    /// `[hidden]`
    pub post_attention_norm: Vec<f32>,
    /// `[intermediate, hidden]`
    pub gate_proj: Linear,
    /// `[intermediate, hidden]`
    pub up_proj: Linear,
    /// `[hidden, intermediate]`
    pub down_proj: Linear,
}

impl Layer {
    /// The block's linear layers, in a fixed order.
    pub fn linears(&self) -> [&Linear; 7] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj, &self.gate_proj, &self.up_proj, &self.down_proj]
    }

    fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
}

/// A loaded model. Immutable after loading; `Sync`, shared by sessions.
pub struct Model {
    pub config: ModelConfig,
    /// `[vocab, hidden]`
    pub embed_tokens: Tensor,
    pub layers: Vec<Layer>,
    /// `[hidden]`
    pub norm: Vec<f32>,
    /// `[vocab, hidden]` (the embedding matrix itself when tied)
    pub lm_head: Linear,
    /// `[head_dim / 2]` rotary inverse frequencies (scaling applied).
    pub rope_inv_freq: Vec<f32>,
    pub tokenizer: Option<Tokenizer>,
    pub dir: PathBuf,
    store: WeightStore,
}

impl Model {
    /// Loads a Hugging Face model directory (`config.json`, safetensors weights, tokenizer).
    ///
    /// Weights are memory-mapped: the files must not be modified while the model is alive
    /// (replacing them by a rename, as downloaders and `peftrt import` do, is fine).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Model> {
        if !dir.is_dir() {
            return Err(Error::not_a_directory(
                dir,
                "not a directory; pass a Hugging Face model directory (GGUF files: `peftrt import` first)",
            ));
        }
        let mut config = ModelConfig::from_file(&dir.join("config.json"))?;
        config.add_generation_eos(&dir.join("generation_config.json"))?;
        // SAFETY: documented above: the caller keeps the files unmodified while the model lives.
        let store = unsafe { WeightStore::open(dir)? };
        let c = &config;
        let (h, q, kv, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let norm = |name: &str| -> Result<Vec<f32>> {
            let t = store.get(name)?;
            t.expect_shape(&[h])?;
            t.expect_float()?;
            Ok(t.to_f32_vec())
        };

        let embed_tokens = store.get("model.embed_tokens.weight")?.clone();
        embed_tokens.expect_shape(&[c.vocab_size, h])?;
        embed_tokens.expect_float()?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let lin = |name: &str, rows, cols, bias| Linear::load(&store, &format!("{p}.{name}"), rows, cols, bias);
            layers.push(Layer {
                input_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                q_proj: lin("self_attn.q_proj", q, h, c.qkv_bias)?,
                k_proj: lin("self_attn.k_proj", kv, h, c.qkv_bias)?,
                v_proj: lin("self_attn.v_proj", kv, h, c.qkv_bias)?,
                o_proj: lin("self_attn.o_proj", h, q, c.o_bias)?,
                post_attention_norm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                gate_proj: lin("mlp.gate_proj", inter, h, c.mlp_bias)?,
                up_proj: lin("mlp.up_proj", inter, h, c.mlp_bias)?,
                down_proj: lin("mlp.down_proj", h, inter, c.mlp_bias)?,
            });
        }
        let lm_head = if store.contains("lm_head.weight") && !c.tie_word_embeddings {
            Linear::load(&store, "lm_head", c.vocab_size, h, false)?
        } else if c.tie_word_embeddings {
            Linear {
                weight: embed_tokens.clone(),
                nf4: None,
                bias: None,
                rows: c.vocab_size,
                cols: h,
                name: "lm_head".into(),
                id: usize::MAX,
            }
        } else {
            return Err(Error::tensor(
                "lm_head.weight",
                format!("missing from {}, and config.json does not set tie_word_embeddings", dir.display()),
            ));
        };
        let mut lm_head = lm_head;
        for (i, lin) in layers.iter_mut().flat_map(Layer::linears_mut).chain([&mut lm_head]).enumerate() {
            lin.id = i;
        }
        let tokenizer = if opts.no_tokenizer { None } else { Some(Tokenizer::from_dir(dir)?) };
        Ok(Model {
            norm: norm("model.norm.weight")?,
            rope_inv_freq: config.rope_inv_freq(),
            config,
            embed_tokens,
            layers,
            lm_head,
            tokenizer,
            dir: dir.to_path_buf(),
            store,
        })
    }

    /// The tokenizer, or an error saying the model was loaded without one.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| Error::Tokenizer("the model was loaded without its tokenizer".into()))
    }

    /// Every linear layer, in `id` order: the decoder blocks' projections, then `lm_head`.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(Layer::linears).chain([&self.lm_head])
    }

    /// The weight store (all tensors by name).
    pub fn store(&self) -> &WeightStore {
        &self.store
    }

    /// Whether `token` ends generation (one of the config's EOS ids).
    pub fn is_eos(&self, token: u32) -> bool {
        self.config.eos_token_ids.contains(&token)
    }
}
