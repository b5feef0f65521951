//! Importing a GGUF model as a Hugging Face model directory.
//!
//! The output is what transformers' `save_pretrained` would write for the same model:
//! `model.safetensors` (HF tensor names, every tensor dequantised and converted to the chosen
//! dtype), `config.json`, `generation_config.json`, `tokenizer.json` and
//! `tokenizer_config.json`. Two things llama.cpp's `convert_hf_to_gguf.py` did are undone:
//! - tensor names: `blk.N.attn_q.weight` → `model.layers.N.self_attn.q_proj.weight`, ...;
//! - for `llama` (and `mistral`) the rows of Q and K were permuted so that each head's rotary
//!   pairs are interleaved (`LlamaModel.permute`: rows viewed as `[heads, 2, head_dim/2]`,
//!   axes 1 and 2 swapped; Q with `head_count`, K with `head_count_kv`). `qwen2` is not
//!   permuted.
//!
//! The directory is written atomically: into a temporary sibling, loaded back with
//! [`Model::load`] (so an import that reports success always loads), renamed into place at
//! the end, removed on any error. Weights that are not finite, or that overflow the output
//! dtype, are refused by name (or clamped, when [`ImportOptions::saturate`] asks for it).
//!
//! One file of about 600 lines: the steps of one conversion (hyperparameters, tensor plan with
//! the names and the unpermutation, safetensors, `config.json`) in the order [`import`] runs
//! them, sharing its private `Arch`, `Hparams` and `Planned` types. The tokenizer is
//! [`super::vocab`]; the tests are `import/tests.rs`.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value as Json};

use super::file::{GgufFile, TensorInfo};
use super::vocab::{SpecialTokens, Vocab};
use crate::error::{Error, Result};
use crate::model::{LoadOptions, Model};
use crate::output::{self, write_dir_atomically_with, write_json, Replace};
pub use crate::weights::DType;

/// How to import.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// The dtype of every weight in `model.safetensors` (norm weights included).
    pub dtype: DType,
    /// Replace `out_dir` if it exists and is not empty (otherwise that is an error). Never
    /// when the GGUF lies inside it.
    pub force: bool,
    /// Clamp values beyond the range of an f16/bf16 output to its largest finite value
    /// (otherwise such a value is an error naming the tensor).
    pub saturate: bool,
}

impl ImportOptions {
    /// Options with this dtype, `force` and `saturate` off.
    pub fn new(dtype: DType) -> Self {
        ImportOptions { dtype, force: false, saturate: false }
    }
}

/// What [`import`] wrote.
#[derive(Clone, Debug)]
pub struct ImportSummary {
    pub out_dir: PathBuf,
    /// `general.architecture`.
    pub architecture: String,
    pub n_tensors: usize,
    pub n_parameters: u64,
    /// True when the GGUF has no `output.weight` (the LM head is the embedding matrix).
    pub tied_embeddings: bool,
}

/// What a Hugging Face model directory would hold besides its weights, made from a GGUF's
/// metadata: `peftrt import` writes these files, and [`Model::gguf_files`] makes them for a GGUF
/// loaded natively.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    pub config: Json,
    pub generation: Json,
    pub tokenizer: Json,
    pub tokenizer_config: Json,
    /// True when the GGUF has no `output.weight` (the LM head is the embedding matrix).
    pub tied: bool,
}

/// One GGUF tensor under its Hugging Face name; `interleaved_heads` is set for the Q/K
/// weights whose rows convert_hf_to_gguf.py permuted (`llama`, `mistral`): their number of heads.
pub(crate) struct NativeTensor<'a> {
    pub hf_name: String,
    pub info: &'a TensorInfo,
    pub interleaved_heads: Option<usize>,
}

/// A GGUF model's metadata, checked, as far as loading it needs: `config.json` and
/// `generation_config.json`. The tokenizer files are made from the vocabulary only when asked
/// ([`Prepared::tokenizer_files`]): a model loaded without its tokenizer never copies the
/// vocabulary nor builds them.
pub(crate) struct Prepared {
    pub config: Json,
    pub generation: Json,
    /// True when the GGUF has no `output.weight` (the LM head is the embedding matrix).
    pub tied: bool,
    context: Option<u64>,
}

impl Prepared {
    /// `tokenizer.json` and `tokenizer_config.json`, made from the vocabulary of `g` (the file
    /// this was prepared from).
    pub(crate) fn tokenizer_files(&self, g: &GgufFile) -> Result<(Json, Json)> {
        let vocab = Vocab::from_gguf(g)?;
        let tokenizer = vocab.tokenizer_json(g.path())?;
        let chat_template = g.get_str("tokenizer.chat_template")?;
        Ok((tokenizer, vocab.tokenizer_config_json(chat_template, self.context)))
    }

    /// The tokenizer of `g` (the file this was prepared from), as [`Prepared::tokenizer_files`]
    /// describe it, built straight from the vocabulary ([`Vocab::tokenizer`]).
    pub(crate) fn tokenizer(&self, g: &GgufFile) -> Result<crate::tokenizer::Tokenizer> {
        let vocab = Vocab::from_gguf(g)?;
        let inner = vocab.tokenizer(g.path())?;
        let config = vocab.tokenizer_config_json(g.get_str("tokenizer.chat_template")?, self.context);
        Ok(crate::tokenizer::Tokenizer::from_hf(inner, &config, g.path()))
    }

    /// Every file, the tokenizer's made from `g` (the file this was prepared from).
    pub(crate) fn into_files(self, g: &GgufFile) -> Result<ModelFiles> {
        let (tokenizer, tokenizer_config) = self.tokenizer_files(g)?;
        Ok(ModelFiles {
            config: self.config,
            generation: self.generation,
            tokenizer,
            tokenizer_config,
            tied: self.tied,
        })
    }
}

/// Checks a GGUF model (architecture, hyper-parameters, every tensor's name, type and shape)
/// and reads what its [`ModelFiles`] are made from: the steps shared by [`import`] and native
/// loading.
fn prepare(g: &GgufFile, dtype: DType) -> Result<(&'static Arch, Vec<Planned<'_>>, Prepared)> {
    let arch_name = g.architecture()?;
    let arch = ARCHES.iter().find(|a| a.name == arch_name).ok_or_else(|| {
        Error::Unsupported(format!(
            "{}: architecture `{arch_name}` (supported: llama, mistral, qwen2)",
            g.path().display()
        ))
    })?;
    let hp = hparams(g, arch)?;
    let plan = plan_tensors(g, arch, &hp)?;
    let tied = g.tensor("output.weight").is_none();
    let special = SpecialTokens::from_gguf(g)?;
    let config = config_json(g, arch, &hp, &special, tied, dtype)?;
    let mut generation = Map::new();
    generation.insert("_from_model_config".into(), json!(true));
    for (k, t) in [("bos_token_id", &special.bos), ("eos_token_id", &special.eos), ("pad_token_id", &special.pad)] {
        if let Some((id, _)) = t {
            generation.insert(k.into(), json!(id));
        }
    }
    let prepared = Prepared { config, generation: Json::Object(generation), tied, context: hp.context };
    Ok((arch, plan, prepared))
}

/// The checked metadata and the tensors of a GGUF loaded natively: every tensor under its HF
/// name, in place (Q/K rows stay in the file's order, see [`NativeTensor`]). `torch_dtype` in
/// the config says `float32`: what `peftrt merge` writes from it by default.
pub(crate) fn prepare_native(g: &GgufFile) -> Result<(Prepared, Vec<NativeTensor<'_>>)> {
    let (_, plan, files) = prepare(g, DType::F32)?;
    let tensors = plan
        .into_iter()
        .map(|p| NativeTensor {
            hf_name: p.hf_name,
            info: p.info,
            interleaved_heads: p.unpermute_heads.map(|h| h as usize),
        })
        .collect();
    Ok((files, tensors))
}

/// Per-architecture facts.
struct Arch {
    /// The GGUF architecture name and key prefix (`llama`).
    name: &'static str,
    /// HF `model_type`.
    model_type: &'static str,
    /// HF `architectures[0]`.
    class: &'static str,
    /// Whether convert_hf_to_gguf.py permuted the Q/K rows.
    permuted_qk: bool,
}

const ARCHES: &[Arch] = &[
    Arch { name: "llama", model_type: "llama", class: "LlamaForCausalLM", permuted_qk: true },
    Arch { name: "mistral", model_type: "mistral", class: "MistralForCausalLM", permuted_qk: true },
    Arch { name: "qwen2", model_type: "qwen2", class: "Qwen2ForCausalLM", permuted_qk: false },
];

/// The model hyper-parameters read from the metadata.
struct Hparams {
    n_layer: u32,
    hidden: u32,
    intermediate: u32,
    n_head: u32,
    n_head_kv: u32,
    head_dim: u32,
    head_dim_given: bool,
    rms_eps: f64,
    rope_theta: f64,
    context: Option<u64>,
    vocab_size: u64,
}

/// One tensor to write: its HF name, its GGUF source and the number of heads whose rotary
/// permutation to undo.
struct Planned<'a> {
    hf_name: String,
    info: &'a TensorInfo,
    unpermute_heads: Option<u32>,
}

/// Imports the GGUF model at `gguf` as a Hugging Face model directory `out_dir`.
///
/// The GGUF file is memory-mapped: it must not be modified while the import runs. `out_dir`
/// must not exist or be empty, unless `opts.force`. On error nothing is left at `out_dir`
/// (an existing directory is untouched) and the temporary directory is removed.
pub fn import(gguf: &Path, out_dir: &Path, opts: &ImportOptions) -> Result<ImportSummary> {
    out_dir
        .file_name()
        .ok_or_else(|| Error::Input(format!("{}: the output directory needs a name", out_dir.display())))?;
    let exists_non_empty = match fs::read_dir(out_dir) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(out_dir, e)),
    };
    if exists_non_empty && !opts.force {
        return Err(Error::io(
            out_dir,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the output directory exists and is not empty; choose another or use --force",
            ),
        ));
    }
    if let (Ok(src), Ok(dst)) = (fs::canonicalize(gguf), fs::canonicalize(out_dir)) {
        if src.starts_with(&dst) {
            return Err(Error::Input(format!(
                "{} lies inside the output directory {}, which the import would replace; choose \
                 another output directory",
                gguf.display(),
                out_dir.display()
            )));
        }
    }
    let replace = match (exists_non_empty, crate::fsutil::is_present(out_dir)) {
        (true, _) => Replace::Existing,
        (false, true) => Replace::EmptyDir,
        (false, false) => Replace::Nothing,
    };

    // SAFETY: the file is only read, and the documented contract of `import` is that it is not
    // modified while the import runs.
    let g = unsafe { GgufFile::open(gguf) }?;
    let (arch, plan, files) = prepare(&g, opts.dtype)?;
    let files = files.into_files(&g)?;
    let tied = files.tied;
    let ModelFiles { config, generation, tokenizer, tokenizer_config, .. } = files;

    let n_parameters = write_dir_atomically_with(out_dir, replace, |tmp| {
        let n_params = write_safetensors(&g, &plan, opts, &tmp.join("model.safetensors"))?;
        write_json(&tmp.join("config.json"), &config)?;
        write_json(&tmp.join("generation_config.json"), &generation)?;
        write_json(&tmp.join("tokenizer.json"), &tokenizer)?;
        write_json(&tmp.join("tokenizer_config.json"), &tokenizer_config)?;
        // What is reported done must load: anything the checks above missed fails here.
        Model::load(tmp, &LoadOptions::default()).map_err(|e| {
            Error::Unsupported(format!(
                "{}: the imported model would not load ({e}); nothing was written",
                gguf.display()
            ))
        })?;
        Ok(n_params)
    })?;
    Ok(ImportSummary {
        out_dir: out_dir.to_path_buf(),
        architecture: arch.name.to_string(),
        n_tensors: plan.len(),
        n_parameters,
        tied_embeddings: tied,
    })
}

fn required_u32(g: &GgufFile, key: &str) -> Result<u32> {
    g.get_u32(key)?.ok_or_else(|| Error::config(g.path(), key, "missing; the GGUF lacks a required hyper-parameter"))
}

fn hparams(g: &GgufFile, arch: &Arch) -> Result<Hparams> {
    let a = arch.name;
    let key = |k: &str| format!("{a}.{k}");
    let n_layer = required_u32(g, &key("block_count"))?;
    let hidden = required_u32(g, &key("embedding_length"))?;
    let intermediate = required_u32(g, &key("feed_forward_length"))?;
    let n_head = required_u32(g, &key("attention.head_count"))?;
    let n_head_kv = g.get_u32(&key("attention.head_count_kv"))?.unwrap_or(n_head);
    if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
        return Err(Error::config(
            g.path(),
            key("attention.head_count_kv"),
            format!("{n_head_kv} key/value heads do not divide {n_head} attention heads"),
        ));
    }
    let key_length = g.get_u32(&key("attention.key_length"))?;
    let head_dim = key_length.unwrap_or(hidden / n_head);
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(Error::config(g.path(), key("attention.key_length"), format!("head size {head_dim} is not even")));
    }
    if let Some(v) = g.get_u32(&key("attention.value_length"))? {
        if v != head_dim {
            return Err(Error::Unsupported(format!(
                "{}: {}: value head size {v} differs from key head size {head_dim}",
                g.path().display(),
                key("attention.value_length")
            )));
        }
    }
    if let Some(rot) = g.get_u32(&key("rope.dimension_count"))? {
        if rot != head_dim {
            return Err(Error::Unsupported(format!(
                "{}: {}: partial rotary embeddings ({rot} of {head_dim} dimensions)",
                g.path().display(),
                key("rope.dimension_count")
            )));
        }
    }
    let rms_eps = g
        .get_f32(&key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| Error::config(g.path(), key("attention.layer_norm_rms_epsilon"), "missing"))?;
    if !(rms_eps.is_finite() && rms_eps > 0.0) {
        return Err(Error::config(
            g.path(),
            key("attention.layer_norm_rms_epsilon"),
            format!("{rms_eps} is not a positive number"),
        ));
    }
    let rope_theta = g.get_f32(&key("rope.freq_base"))?.unwrap_or(10000.0);
    if !(rope_theta.is_finite() && rope_theta > 0.0) {
        return Err(Error::config(g.path(), key("rope.freq_base"), format!("{rope_theta} is not a positive number")));
    }
    let context = g.get_u64(&key("context_length"))?;
    if context == Some(0) {
        return Err(Error::config(g.path(), key("context_length"), "is 0; a model needs a context of at least 1"));
    }
    // Per-layer work below is sized by block_count: check it against the tensors present
    // first, so a lying count fails here instead of allocating for 2^32 layers.
    let layers_present = g
        .tensors()
        .iter()
        .filter_map(|t| t.name.strip_prefix("blk.")?.split_once('.')?.0.parse::<u64>().ok())
        .max()
        .map_or(0, |l| l + 1);
    if u64::from(n_layer) != layers_present {
        return Err(Error::config(
            g.path(),
            key("block_count"),
            format!("{n_layer} layers, but the file has tensors for {layers_present}; the GGUF is corrupt"),
        ));
    }
    let n_tokens = g.get_str_array("tokenizer.ggml.tokens")?.map(|t| t.len() as u64);
    let embd_rows = g.tensor("token_embd.weight").and_then(|t| t.dims.get(1).copied());
    let vocab_size = match g.get_u32(&key("vocab_size"))? {
        Some(v) => u64::from(v),
        None => embd_rows.or(n_tokens).ok_or_else(|| {
            Error::config(g.path(), key("vocab_size"), "missing, and no token_embd.weight to infer it")
        })?,
    };
    Ok(Hparams {
        n_layer,
        hidden,
        intermediate,
        n_head,
        n_head_kv,
        head_dim,
        head_dim_given: key_length.is_some(),
        // f32 → decimal shortest representation, as transformers would print 1e-05.
        rms_eps: shortest_f64(rms_eps),
        rope_theta: shortest_f64(rope_theta),
        context,
        vocab_size,
    })
}

/// The f64 whose shortest decimal form is that of the f32 `x` (1e-5f32 → 1e-5, not
/// 9.999999747378752e-06), so config.json holds the value the model was converted from.
fn shortest_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// Maps every GGUF tensor to its HF name and checks the shapes.
fn plan_tensors<'a>(g: &'a GgufFile, arch: &Arch, hp: &Hparams) -> Result<Vec<Planned<'a>>> {
    let mut plan = Vec::new();
    for info in g.tensors() {
        let name = info.name.as_str();
        if name == "rope_freqs.weight" {
            return Err(Error::Unsupported(format!(
                "{}: tensor `rope_freqs.weight` (Llama-3.1-style rope scaling factors) cannot be \
                 turned back into config.json's rope_scaling; import the original HF model instead",
                g.path().display()
            )));
        }
        let mut unpermute_heads = None;
        let hf_name = match name {
            "token_embd.weight" => "model.embed_tokens.weight".to_string(),
            "output_norm.weight" => "model.norm.weight".to_string(),
            "output.weight" => "lm_head.weight".to_string(),
            _ => {
                let mapped = name.strip_prefix("blk.").and_then(|rest| {
                    let (layer, rest) = rest.split_once('.')?;
                    let layer: u32 = layer.parse().ok()?;
                    let (base, suffix) = rest.rsplit_once('.')?;
                    let hf = match base {
                        "attn_norm" => "input_layernorm",
                        "ffn_norm" => "post_attention_layernorm",
                        "attn_q" => "self_attn.q_proj",
                        "attn_k" => "self_attn.k_proj",
                        "attn_v" => "self_attn.v_proj",
                        "attn_output" => "self_attn.o_proj",
                        "ffn_gate" => "mlp.gate_proj",
                        "ffn_up" => "mlp.up_proj",
                        "ffn_down" => "mlp.down_proj",
                        _ => return None,
                    };
                    if layer >= hp.n_layer || !(suffix == "weight" || suffix == "bias") {
                        return None;
                    }
                    Some((layer, base, format!("model.layers.{layer}.{hf}.{suffix}")))
                });
                let Some((_, base, hf)) = mapped else {
                    return Err(Error::tensor(
                        name,
                        format!(
                            "in {}: no Hugging Face equivalent for this {} tensor; the GGUF may \
                             be of a variant peftrt does not import",
                            g.path().display(),
                            arch.name
                        ),
                    ));
                };
                if arch.permuted_qk {
                    unpermute_heads = match base {
                        "attn_q" => Some(hp.n_head),
                        "attn_k" => Some(hp.n_head_kv),
                        _ => None,
                    };
                }
                hf
            }
        };
        if !info.ggml_type.can_dequantize() {
            return Err(Error::tensor(
                name,
                format!(
                    "in {}: type {} cannot be dequantised by peftrt (supported: F32, F16, BF16, \
                     Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)",
                    g.path().display(),
                    info.ggml_type
                ),
            ));
        }
        let shape = info.torch_shape();
        if let Some(heads) = unpermute_heads {
            let rows = shape[0] as u64;
            if rows != u64::from(heads) * u64::from(hp.head_dim) {
                return Err(Error::tensor(
                    name,
                    format!(
                        "in {}: {rows} rows, expected {heads} heads × {} head size",
                        g.path().display(),
                        hp.head_dim
                    ),
                ));
            }
        }
        plan.push(Planned { hf_name, info, unpermute_heads });
    }
    // Every expected tensor is present and has the expected shape.
    let (h, i, v) = (hp.hidden as usize, hp.intermediate as usize, hp.vocab_size as usize);
    let (q, kv) = ((hp.n_head * hp.head_dim) as usize, (hp.n_head_kv * hp.head_dim) as usize);
    let mut expect: Vec<(String, Vec<usize>)> =
        vec![("token_embd.weight".into(), vec![v, h]), ("output_norm.weight".into(), vec![h])];
    for l in 0..hp.n_layer {
        for (base, shape) in [
            ("attn_norm", vec![h]),
            ("ffn_norm", vec![h]),
            ("attn_q", vec![q, h]),
            ("attn_k", vec![kv, h]),
            ("attn_v", vec![kv, h]),
            ("attn_output", vec![h, q]),
            ("ffn_gate", vec![i, h]),
            ("ffn_up", vec![i, h]),
            ("ffn_down", vec![h, i]),
        ] {
            expect.push((format!("blk.{l}.{base}.weight"), shape));
        }
    }
    if g.tensor("output.weight").is_some() {
        expect.push(("output.weight".into(), vec![v, h]));
    }
    for (name, shape) in expect {
        let info = g.tensor(&name).ok_or_else(|| {
            Error::tensor(&name, format!("missing in {}; the GGUF is incomplete", g.path().display()))
        })?;
        if info.torch_shape() != shape {
            return Err(Error::tensor(
                &name,
                format!(
                    "in {}: shape {:?}, expected {shape:?} from the metadata",
                    g.path().display(),
                    info.torch_shape()
                ),
            ));
        }
    }
    plan.sort_by(|a, b| a.hf_name.cmp(&b.hf_name));
    Ok(plan)
}

/// Undoes convert_hf_to_gguf.py's `permute` of Q/K rows: within each head of `head_dim`
/// rows, GGUF row `2*i + j` is HF row `j*head_dim/2 + i`.
pub fn unpermute_rows(values: &[f32], n_heads: usize, row_len: usize) -> Vec<f32> {
    reorder_rows(values, n_heads, row_len, false)
}

/// Does convert_hf_to_gguf.py's `permute` of Q/K rows (HF order → llama.cpp's rotary order):
/// the inverse of [`unpermute_rows`].
pub fn permute_rows(values: &[f32], n_heads: usize, row_len: usize) -> Vec<f32> {
    reorder_rows(values, n_heads, row_len, true)
}

/// Rows of `row_len` between the two orders: HF row `j*head_dim/2 + i` of a head is GGUF row
/// `2*i + j`; `to_gguf` says which way.
fn reorder_rows(values: &[f32], n_heads: usize, row_len: usize, to_gguf: bool) -> Vec<f32> {
    let rows = values.len() / row_len.max(1);
    let head_dim = rows / n_heads.max(1);
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf = (h * head_dim + 2 * i + j) * row_len;
                let hf = (h * head_dim + j * half + i) * row_len;
                let (src, dst) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                out[dst..dst + row_len].copy_from_slice(&values[src..src + row_len]);
            }
        }
    }
    out
}

/// Streams the tensors into a safetensors file (header first, then each tensor dequantised,
/// un-permuted and converted in turn, so memory holds one tensor at a time). Returns the
/// number of parameters.
fn write_safetensors(g: &GgufFile, plan: &[Planned<'_>], opts: &ImportOptions, path: &Path) -> Result<u64> {
    let tensors: Vec<(String, Vec<usize>)> = plan.iter().map(|p| (p.hf_name.clone(), p.info.torch_shape())).collect();
    output::write_safetensors(path, &tensors, opts.dtype, |i| {
        let p = &plan[i];
        let mut values = g.dequantize(p.info)?;
        check_range(g, p, &mut values, opts)?;
        Ok(match p.unpermute_heads {
            Some(heads) => {
                let row_len = p.info.dims[0] as usize;
                unpermute_rows(&values, heads as usize, if p.info.dims.len() == 1 { 1 } else { row_len })
            }
            None => values,
        })
    })
}

/// Refuses non-finite values, and values an f16/bf16 output cannot hold unless
/// `opts.saturate` (then they are clamped to the largest finite value of that dtype).
fn check_range(g: &GgufFile, p: &Planned<'_>, values: &mut [f32], opts: &ImportOptions) -> Result<()> {
    let name = &p.info.name;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::tensor(
            name,
            format!(
                "in {}: element {i} is {}; the GGUF holds non-finite weights (corrupt or badly \
                 converted) and peftrt does not import them",
                g.path().display(),
                values[i]
            ),
        ));
    }
    let max = match opts.dtype {
        DType::F16 => f32::from(half::f16::MAX),
        DType::BF16 => f32::from(half::bf16::MAX),
        _ => return Ok(()),
    };
    let overflows = |v: f32| opts.dtype.overflows(v);
    if let Some(i) = values.iter().position(|&v| overflows(v)) {
        if !opts.saturate {
            return Err(Error::tensor(
                name,
                format!(
                    "in {}: element {i} = {} overflows {} (largest {max}); import with --dtype f32, \
                     or pass --saturate to clamp such values",
                    g.path().display(),
                    values[i],
                    opts.dtype.name()
                ),
            ));
        }
        let mut n = 0usize;
        for v in values.iter_mut().filter(|v| overflows(**v)) {
            *v = v.signum() * max;
            n += 1;
        }
        log::warn!("tensor `{name}`: {n} values beyond the {} range clamped to ±{max} (--saturate)", opts.dtype.name());
    }
    Ok(())
}

/// `config.json` from the metadata.
fn config_json(
    g: &GgufFile,
    arch: &Arch,
    hp: &Hparams,
    special: &SpecialTokens,
    tied: bool,
    dtype: DType,
) -> Result<Json> {
    let mut c = Map::new();
    c.insert("architectures".into(), json!([arch.class]));
    c.insert("model_type".into(), json!(arch.model_type));
    c.insert("hidden_size".into(), json!(hp.hidden));
    c.insert("intermediate_size".into(), json!(hp.intermediate));
    c.insert("num_hidden_layers".into(), json!(hp.n_layer));
    c.insert("num_attention_heads".into(), json!(hp.n_head));
    c.insert("num_key_value_heads".into(), json!(hp.n_head_kv));
    if hp.head_dim_given {
        c.insert("head_dim".into(), json!(hp.head_dim));
    }
    c.insert("hidden_act".into(), json!("silu"));
    c.insert("rms_norm_eps".into(), json!(hp.rms_eps));
    c.insert("rope_theta".into(), json!(hp.rope_theta));
    if let Some(n) = hp.context {
        c.insert("max_position_embeddings".into(), json!(n));
    }
    c.insert("vocab_size".into(), json!(hp.vocab_size));
    for (k, t) in [("bos_token_id", &special.bos), ("eos_token_id", &special.eos), ("pad_token_id", &special.pad)] {
        if let Some((id, _)) = t {
            c.insert(k.into(), json!(id));
        }
    }
    c.insert("tie_word_embeddings".into(), json!(tied));
    c.insert("torch_dtype".into(), json!(dtype.torch_name()));
    c.insert("use_cache".into(), json!(true));
    c.insert("initializer_range".into(), json!(0.02));
    match arch.model_type {
        "llama" => {
            let bias = g.tensor("blk.0.attn_q.bias").is_some();
            c.insert("attention_bias".into(), json!(bias));
            c.insert("attention_dropout".into(), json!(0.0));
            c.insert("mlp_bias".into(), json!(false));
        }
        "mistral" => {
            c.insert("sliding_window".into(), json!(null));
        }
        _ => {
            c.insert("use_sliding_window".into(), json!(false));
        }
    }
    if let Some(rs) = rope_scaling(g, arch)? {
        c.insert("rope_scaling".into(), rs);
    }
    Ok(Json::Object(c))
}

/// `rope_scaling` from `{arch}.rope.scaling.*` (or the older `{arch}.rope.scale_linear`).
fn rope_scaling(g: &GgufFile, arch: &Arch) -> Result<Option<Json>> {
    let key = |k: &str| format!("{}.rope.{k}", arch.name);
    let factor = g.get_f32(&key("scaling.factor"))?.map(shortest_f64);
    let kind = g.get_str(&key("scaling.type"))?;
    let linear_old = g.get_f32(&key("scale_linear"))?.map(shortest_f64);
    for (k, f) in [("scaling.factor", factor), ("scale_linear", linear_old)] {
        if let Some(f) = f.filter(|f| !(f.is_finite() && *f > 0.0)) {
            return Err(Error::config(g.path(), key(k), format!("{f} is not a positive number")));
        }
    }
    Ok(match (kind, factor, linear_old) {
        (None | Some("none"), _, None) => None,
        (None, _, Some(f)) | (Some("linear"), None, Some(f)) if f != 1.0 => {
            Some(json!({"type": "linear", "rope_type": "linear", "factor": f}))
        }
        (None, _, Some(_)) => None,
        (Some("linear"), Some(f), _) => Some(json!({"type": "linear", "rope_type": "linear", "factor": f})),
        (Some(other), _, _) => {
            return Err(Error::Unsupported(format!(
                "{}: {} `{other}` (with factor {factor:?}): peftrt runs no such rope scaling \
                 (supported: linear; llama3 only from the original Hugging Face model)",
                g.path().display(),
                key("scaling.type")
            )))
        }
    })
}

#[cfg(test)]
mod tests;
