//! The immutable, shareable model: configuration, memory-mapped weights, tokenizer.
//!
//! Weights only; all per-conversation state (KV cache, activations) lives in
//! [`crate::Session`], so any number of sessions can share one `Model` across threads.
//! Tensor names follow transformers' `LlamaForCausalLM` (also used by Mistral and Qwen2).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::import::ModelFiles;
use crate::kernels::MatRef;
use crate::nf4::Nf4Weight;
use crate::tokenizer::Tokenizer;
use crate::weights::{DType, Tensor, WeightStore};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
    /// For a GGUF's Q/K weights stored in llama.cpp's rotary order ([`ModelConfig::rope_interleaved`]):
    /// the number of heads. Row `h·d + 2i + j` of the weight is then row `h·d + j·d/2 + i` of
    /// the Hugging Face model's (`d` the head size); adapters' rows are reordered to match when
    /// they are bound, and `peftrt merge` writes the Hugging Face order back.
    pub interleaved_heads: Option<usize>,
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
            let values = b.to_f32_vec();
            b.check_values(&values)?;
            Some(values)
        } else {
            None
        };
        Ok(Linear { weight, nf4, bias, rows, cols, name: name.to_string(), id: usize::MAX, interleaved_heads: None })
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
    /// The model directory, or the GGUF file.
    pub dir: PathBuf,
    store: WeightStore,
    /// For a GGUF: its map, whose metadata [`Model::gguf_files`] reads again when asked (a
    /// directory has the files on disk). The tensors share the map.
    gguf: Option<Arc<memmap2::Mmap>>,
    /// Unique in the process: see [`Model::id`].
    id: u64,
    /// The vocabulary as constrained decoding sees it, built on first use.
    pub(crate) grammar_vocab: std::sync::OnceLock<crate::constraint::Vocabulary>,
}

/// The next [`Model::id`]; ids are never reused, unlike the address of a dropped model.
static NEXT_MODEL_ID: AtomicU64 = AtomicU64::new(0);

impl Model {
    /// Loads a Hugging Face model directory (`config.json`, safetensors weights, tokenizer).
    ///
    /// Or a GGUF file (`llama`, `mistral`, `qwen2`), used as it is: its tensors stay in the
    /// file's map in their own types (no dequantised copy; [`crate::kernels::Quant`]), the
    /// configuration and tokenizer come from its metadata, as `peftrt import` would write them.
    ///
    /// Weights are memory-mapped: the files must not be modified while the model is alive
    /// (replacing them by a rename, as downloaders and `peftrt import` do, is fine).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Model> {
        if dir.is_file() && is_gguf(dir) {
            return Self::load_gguf(dir, opts);
        }
        if !dir.is_dir() {
            return Err(Error::not_a_directory(
                dir,
                "not a directory (nor a GGUF file); pass a Hugging Face model directory or a .gguf file",
            ));
        }
        let mut config = ModelConfig::from_file(&dir.join("config.json"))?;
        config.add_generation_eos(&dir.join("generation_config.json"))?;
        // SAFETY: documented above: the caller keeps the files unmodified while the model lives.
        let store = unsafe { WeightStore::open(dir)? };
        let tokenizer = || if opts.no_tokenizer { Ok(None) } else { Tokenizer::from_dir(dir).map(Some) };
        Self::assemble(config, store, tokenizer, dir, None)
    }

    /// [`Model::load`] of a GGUF file.
    fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Model> {
        // SAFETY: documented on `load`: the file is not modified while the model lives (the map
        // is kept alive by the tensors).
        let g = unsafe { crate::gguf::GgufFile::open(path)? };
        let (prepared, tensors) = crate::gguf::import::prepare_native(&g)?;
        let mut config = ModelConfig::from_json(&prepared.config, path)?;
        config.add_generation_eos_json(&prepared.generation, path)?;
        config.rope_interleaved = tensors.iter().any(|t| t.interleaved_heads.is_some());
        let store = WeightStore::from_gguf(&g, &tensors)?;
        let map = g.map();
        drop(tensors);
        // The tokenizer is built from the vocabulary only when it is wanted (the tokenizer files
        // are not made: `gguf_files` makes them when asked).
        let tokenizer = if opts.no_tokenizer { None } else { Some(prepared.tokenizer(&g)?) };
        drop(g); // the tensors hold the map
        let tokenizer = move || Ok(tokenizer);
        Self::assemble(config, store, tokenizer, path, map)
    }

    /// The model from its configuration and weights (a directory's or a GGUF's).
    fn assemble(
        config: ModelConfig,
        store: WeightStore,
        tokenizer: impl FnOnce() -> Result<Option<Tokenizer>>,
        dir: &Path,
        gguf: Option<Arc<memmap2::Mmap>>,
    ) -> Result<Model> {
        let c = &config;
        check_layer_count(c, &store, dir)?;
        let (h, q, kv, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let norm = |name: &str| -> Result<Vec<f32>> {
            let t = store.get(name)?;
            t.expect_shape(&[h])?;
            t.expect_float()?;
            let values = t.to_f32_vec();
            t.check_values(&values)?;
            Ok(values)
        };

        let embed_tokens = store.get("model.embed_tokens.weight")?.clone();
        embed_tokens.expect_shape(&[c.vocab_size, h])?;
        embed_tokens.expect_float()?;
        let mut layers = Vec::new();
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
            if c.rope_interleaved {
                let l = layers.last_mut().expect("pushed above");
                l.q_proj.interleaved_heads = Some(c.num_attention_heads);
                l.k_proj.interleaved_heads = Some(c.num_key_value_heads);
            }
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
                interleaved_heads: None,
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
        let tokenizer = tokenizer()?;
        let final_norm = norm("model.norm.weight")?;
        warn_unused(&store, &layers, &lm_head, c, dir);
        Ok(Model {
            norm: final_norm,
            rope_inv_freq: config.rope_inv_freq(),
            config,
            embed_tokens,
            layers,
            lm_head,
            tokenizer,
            dir: dir.to_path_buf(),
            store,
            gguf,
            id: NEXT_MODEL_ID.fetch_add(1, Ordering::Relaxed),
            grammar_vocab: std::sync::OnceLock::new(),
        })
    }

    /// This model's identity, unique in the process (never reused, unlike the address of a
    /// dropped model): an adapter records the id of the model it was bound to.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The tokenizer, or an error saying the model was loaded without one.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| Error::Tokenizer("the model was loaded without its tokenizer".into()))
    }

    /// Every linear layer, in `id` order: the decoder blocks' projections, then `lm_head`.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(Layer::linears).chain([&self.lm_head])
    }

    /// Whether the model was loaded from a GGUF file (used in place).
    pub fn is_gguf(&self) -> bool {
        self.gguf.is_some()
    }

    /// For a model loaded from a GGUF file: the `config.json`, `tokenizer.json`… contents made
    /// from its metadata (what `peftrt import` writes), read again from the mapped file on each
    /// call (a model keeps none of it); `None` for a model directory.
    pub fn gguf_files(&self) -> Result<Option<ModelFiles>> {
        let Some(map) = &self.gguf else { return Ok(None) };
        let g = crate::gguf::GgufFile::from_map(&self.dir, map.clone())?;
        let (prepared, _) = crate::gguf::import::prepare_native(&g)?;
        prepared.into_files(&g).map(Some)
    }

    /// The contents of the model's `tokenizer.json` (made from the vocabulary for a GGUF).
    pub(crate) fn tokenizer_json(&self) -> Result<serde_json::Value> {
        if let Some(files) = self.gguf_files()? {
            return Ok(files.tokenizer);
        }
        let path = self.dir.join("tokenizer.json");
        let text = crate::fsutil::read_text_file(&path, crate::fsutil::MAX_TOKENIZER_BYTES)?;
        serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))
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

/// Whether the file starts with GGUF's magic.
fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

/// The decoder layers the weights hold (`model.layers.N.…`), checked against `num_hidden_layers`
/// before anything is allocated per layer: a config claiming 2^31 layers is an error, not a
/// multi-terabyte allocation.
fn check_layer_count(c: &ModelConfig, store: &WeightStore, dir: &Path) -> Result<()> {
    let present = store.tensors().iter().filter_map(|t| layer_of(&t.name)).max().map_or(0, |i| i + 1);
    if c.num_hidden_layers > present {
        return Err(Error::config(
            dir.join("config.json"),
            "num_hidden_layers",
            format!(
                "{} layers, but the weights hold {present} (model.layers.0 to model.layers.{}): \
                 the layer count must match the weights",
                c.num_hidden_layers,
                present.saturating_sub(1)
            ),
        ));
    }
    Ok(())
}

/// The layer index of a `model.layers.N.…` tensor name.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// Warns, naming them, about tensors that the model does not use (an extra tensor, layers beyond
/// `num_hidden_layers`, a bias the config does not enable): they are ignored, which is right for
/// leftovers but wrong if config.json disagrees with the weights.
fn warn_unused(store: &WeightStore, layers: &[Layer], lm_head: &Linear, c: &ModelConfig, dir: &Path) {
    let mut used: HashSet<String> =
        ["model.embed_tokens.weight", "model.norm.weight"].into_iter().map(String::from).collect();
    for (i, _) in layers.iter().enumerate() {
        used.insert(format!("model.layers.{i}.input_layernorm.weight"));
        used.insert(format!("model.layers.{i}.post_attention_layernorm.weight"));
    }
    let lm = if c.tie_word_embeddings { None } else { Some(lm_head) };
    for lin in layers.iter().flat_map(Layer::linears).chain(lm) {
        let w = format!("{}.weight", lin.name);
        used.extend(Nf4Weight::aux_names(&w));
        if lin.bias.is_some() {
            used.insert(format!("{}.bias", lin.name));
        }
        used.insert(w);
    }
    // Old Llama checkpoints store the rotary frequencies, which are recomputed from the config.
    let unused: Vec<&str> = store
        .tensors()
        .into_iter()
        .map(|t| t.name.as_str())
        .filter(|n| !used.contains(*n) && !n.ends_with("rotary_emb.inv_freq"))
        .collect();
    if unused.is_empty() {
        return;
    }
    const SHOWN: usize = 8;
    let more = if unused.len() > SHOWN { format!(" and {} more", unused.len() - SHOWN) } else { String::new() };
    log::warn!(
        "{}: {} tensor(s) are not used by this {} model and are ignored (does config.json match the weights?): {}{more}",
        dir.display(),
        unused.len(),
        c.arch.name(),
        unused[..unused.len().min(SHOWN)].join(", ")
    );
}
