//! Model configuration, read from a Hugging Face `config.json`.
//!
//! Follows transformers' `LlamaConfig`, `MistralConfig` and `Qwen2Config`, including the
//! newer `rope_parameters` form and llama3-style rope scaling (`_compute_llama3_parameters`
//! in transformers' `modeling_rope_utils.py`).

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// The architectures this runtime runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// How rotary position frequencies are scaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: f32 },
}

/// The MLP's gate activation (`hidden_act`), as transformers' `ACT2FN` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (also spelt `swish`): `x · σ(x)`.
    Silu,
    /// `gelu`: the exact `x · Φ(x)` (transformers' `GELUActivation`, erf-based).
    Gelu,
    /// `gelu_pytorch_tanh` and `gelu_new`: the tanh approximation
    /// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`.
    GeluTanh,
}

impl Activation {
    /// The activation a `hidden_act` string names, or `None` for one peftrt does not run.
    pub fn from_name(name: &str) -> Option<Activation> {
        match name {
            "silu" | "swish" => Some(Activation::Silu),
            "gelu" => Some(Activation::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" => Some(Activation::GeluTanh),
            _ => None,
        }
    }
}

/// Hyper-parameters of a decoder-only transformer.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Model width (`d_model`).
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one attention head (explicit in some configs, else hidden / heads).
    pub head_dim: usize,
    pub vocab_size: usize,
    /// The MLP's gate activation (`hidden_act`; SiLU for every Llama-family checkpoint we know).
    pub hidden_act: Activation,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// `lm_head` shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (always for qwen2; `attention_bias` for llama).
    pub qkv_bias: bool,
    /// o_proj carries a bias (llama `attention_bias`).
    pub o_bias: bool,
    /// MLP projections carry a bias (llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Attend only to the last `sliding_window` positions (mistral, qwen2 with `use_sliding_window`).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// `_name_or_path`: the hub id or path transformers saved the model from, if recorded
    /// (adapters naming another base are told apart by it, see `adapter::names_another_model`).
    pub name_or_path: Option<String>,
    /// The Q/K weights' rows pair each head's rotary dimensions as `2i, 2i + 1` (llama.cpp's
    /// order, as a `llama`/`mistral` GGUF stores them) rather than transformers' `i, i + d/2`:
    /// rotary embedding then rotates adjacent pairs. Never set by a `config.json`.
    pub rope_interleaved: bool,
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

/// A token id or a list of them (`eos_token_id` may be either); anything else is an error
/// naming `key`.
fn parse_token_ids(v: Option<&Value>, key: &str, path: &Path) -> Result<Vec<u32>> {
    let id = |x: &Value| {
        x.as_u64().filter(|&n| n < u64::from(u32::MAX)).map(|n| n as u32).ok_or_else(|| {
            Error::config(
                path,
                key,
                format!("expected a token id (a non-negative integer) or a list of them, found {x}"),
            )
        })
    };
    match v {
        None => Ok(vec![]),
        Some(Value::Array(a)) => a.iter().map(id).collect(),
        Some(x) => Ok(vec![id(x)?]),
    }
}

impl ModelConfig {
    /// Reads `config.json` from a model directory.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_text_file(path, crate::fsutil::MAX_JSON_BYTES)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        Self::from_json(&v, path)
    }

    /// Parses a config from JSON; `path` is only used in error messages.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        check_quantization(v, path)?;
        let usize_key = |key: &str| -> Result<Option<usize>> {
            match get(v, key) {
                None => Ok(None),
                Some(x) => x
                    .as_u64()
                    .filter(|&n| n > 0 && n < (1 << 32))
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| Error::config(path, key, format!("expected a positive integer, found {x}"))),
            }
        };
        let required = |key: &str| -> Result<usize> {
            usize_key(key)?.ok_or_else(|| Error::config(path, key, "missing (required for this architecture)"))
        };
        let f32_key = |obj: &Value, key: &str| -> Result<Option<f32>> {
            match get(obj, key) {
                None => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(|n| n as f32)
                    .filter(|n| n.is_finite())
                    .map(Some)
                    .ok_or_else(|| Error::config(path, key, format!("expected a finite number, found {x}"))),
            }
        };
        let bool_key = |key: &str, default: bool| -> Result<bool> {
            match get(v, key) {
                None => Ok(default),
                Some(x) => {
                    x.as_bool().ok_or_else(|| Error::config(path, key, format!("expected true or false, found {x}")))
                }
            }
        };

        let model_type = get(v, "model_type").and_then(Value::as_str).ok_or_else(|| {
            Error::config(path, "model_type", "missing; expected \"llama\", \"mistral\" or \"qwen2\"")
        })?;
        let arch = match model_type {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(Error::unsupported_key(
                    path,
                    "model_type",
                    format!("unknown model type \"{other}\"; peftrt runs \"llama\", \"mistral\" and \"qwen2\" models"),
                ))
            }
        };

        let hidden_size = required("hidden_size")?;
        let num_attention_heads = required("num_attention_heads")?;
        let num_key_value_heads = usize_key("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::config(
                path,
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        let head_dim = match usize_key("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(Error::config(
                    path,
                    "head_dim",
                    "missing, and hidden_size is not a multiple of num_attention_heads",
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(Error::config(
                path,
                "head_dim",
                format!("{head_dim} is odd; rotary embeddings need an even head size"),
            ));
        }

        // Rope: transformers >= 4.56 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
        let rope_params = get(v, "rope_parameters");
        let positive = |key: &str, x: f32| -> Result<f32> {
            if x > 0.0 {
                Ok(x)
            } else {
                Err(Error::config(path, key, format!("{x} must be positive")))
            }
        };
        let rope_theta = rope_params
            .map(|p| f32_key(p, "rope_theta"))
            .transpose()?
            .flatten()
            .or(f32_key(v, "rope_theta")?)
            .map_or(Ok(10000.0), |t| positive("rope_theta", t))?;
        let scaling = rope_params.or(get(v, "rope_scaling"));
        let rope_scaling = match scaling {
            None => RopeScaling::None,
            Some(s) => {
                let section = if rope_params.is_some() { "rope_parameters" } else { "rope_scaling" };
                if !s.is_object() {
                    return Err(Error::config(path, section, format!("expected an object, found {s}")));
                }
                let kind = match get(s, "rope_type").or(get(s, "type")) {
                    None => "default",
                    Some(Value::String(k)) => k.as_str(),
                    Some(other) => {
                        return Err(Error::config(
                            path,
                            format!("{section}.rope_type"),
                            format!("expected a string such as \"linear\" or \"llama3\", found {other}"),
                        ))
                    }
                };
                // Every factor divides or is divided by: zero, negative or non-finite is refused.
                let need = |key: &str| -> Result<f32> {
                    let x =
                        f32_key(s, key)?.ok_or_else(|| Error::config(path, format!("{section}.{key}"), "missing"))?;
                    if x <= 0.0 {
                        return Err(Error::config(path, format!("{section}.{key}"), format!("{x} must be positive")));
                    }
                    Ok(x)
                };
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear { factor: need("factor")? },
                    "llama3" => {
                        let (low, high) = (need("low_freq_factor")?, need("high_freq_factor")?);
                        if high <= low {
                            return Err(Error::config(
                                path,
                                format!("{section}.high_freq_factor"),
                                format!("{high} must be larger than low_freq_factor ({low})"),
                            ));
                        }
                        RopeScaling::Llama3 {
                            factor: need("factor")?,
                            low_freq_factor: low,
                            high_freq_factor: high,
                            original_max_position_embeddings: need("original_max_position_embeddings")?,
                        }
                    }
                    other => {
                        return Err(Error::unsupported_key(
                            path,
                            format!("{section}.rope_type"),
                            format!("\"{other}\" is not supported (supported: default, linear, llama3)"),
                        ))
                    }
                }
            }
        };

        let attention_bias = bool_key("attention_bias", false)?;
        let sliding_window = match arch {
            Arch::Mistral => usize_key("sliding_window")?,
            Arch::Qwen2 if bool_key("use_sliding_window", false)? => usize_key("sliding_window")?,
            _ => None,
        };
        let hidden_act = match get(v, "hidden_act") {
            None => Activation::Silu,
            Some(Value::String(name)) => Activation::from_name(name).ok_or_else(|| {
                Error::config(
                    path,
                    "hidden_act",
                    format!("\"{name}\" is not supported (supported: silu, gelu, gelu_pytorch_tanh, gelu_new)"),
                )
            })?,
            Some(x) => return Err(Error::config(path, "hidden_act", format!("expected a string, found {x}"))),
        };
        let vocab_size = required("vocab_size")?;
        let token_ids = |key: &str| -> Result<Vec<u32>> {
            let ids = parse_token_ids(get(v, key), key, path)?;
            check_in_vocab(&ids, vocab_size, key, path)?;
            Ok(ids)
        };

        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: required("intermediate_size")?,
            num_hidden_layers: required("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            hidden_act,
            rms_norm_eps: f32_key(v, "rms_norm_eps")?.map_or(Ok(1e-6), |e| positive("rms_norm_eps", e))?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: usize_key("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: bool_key("tie_word_embeddings", false)?,
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            mlp_bias: bool_key("mlp_bias", false)?,
            sliding_window,
            bos_token_id: token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: token_ids("eos_token_id")?,
            name_or_path: get(v, "_name_or_path").and_then(Value::as_str).map(str::to_string),
            rope_interleaved: false,
        };
        Ok(cfg)
    }

    /// Adds the end-of-sequence ids of a `generation_config.json` (when the file exists):
    /// chat models often end turns with a token that `config.json` does not list.
    pub fn add_generation_eos(&mut self, path: &Path) -> Result<()> {
        if !crate::fsutil::is_present(path) {
            return Ok(());
        }
        let text = crate::fsutil::read_text_file(path, crate::fsutil::MAX_JSON_BYTES)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        self.add_generation_eos_json(&v, path)
    }

    /// [`ModelConfig::add_generation_eos`] from a `generation_config.json` already parsed.
    pub fn add_generation_eos_json(&mut self, v: &Value, path: &Path) -> Result<()> {
        let ids = parse_token_ids(get(v, "eos_token_id"), "eos_token_id", path)?;
        check_in_vocab(&ids, self.vocab_size, "eos_token_id", path)?;
        for id in ids {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        Ok(())
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Inverse rotary frequencies, `[head_dim / 2]`, with scaling applied (as transformers computes them).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base = self.rope_theta as f64;
        (0..d / 2)
            .map(|i| {
                let inv = (1.0 / base.powf((2 * i) as f64 / d as f64)) as f32;
                match self.rope_scaling {
                    RopeScaling::None => inv,
                    RopeScaling::Linear { factor } => inv / factor,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    } => {
                        let old = original_max_position_embeddings;
                        let low_freq_wavelen = old / low_freq_factor;
                        let high_freq_wavelen = old / high_freq_factor;
                        let wavelen = 2.0 * std::f32::consts::PI / inv;
                        if wavelen < high_freq_wavelen {
                            inv
                        } else if wavelen > low_freq_wavelen {
                            inv / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * inv / factor + smooth * inv
                        }
                    }
                }
            })
            .collect()
    }
}

/// Token ids a config names must index the embedding matrix: an EOS id outside it could never
/// be generated (generation would run to the token limit), a BOS id would fail every prompt.
fn check_in_vocab(ids: &[u32], vocab_size: usize, key: &str, path: &Path) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab_size) {
        Some(id) => Err(Error::config(
            path,
            key,
            format!("token id {id} is outside the vocabulary of {vocab_size} tokens (vocab_size); the config is wrong"),
        )),
        None => Ok(()),
    }
}

/// Refuses quantisation schemes other than bitsandbytes 4-bit (whose NF4 tensors the loader
/// reads; FP4 is refused there, per tensor).
fn check_quantization(v: &Value, path: &Path) -> Result<()> {
    let Some(q) = v.get("quantization_config").filter(|q| !q.is_null()) else { return Ok(()) };
    let Some(method) = q.get("quant_method").and_then(Value::as_str) else {
        return Err(Error::config(path, "quantization_config.quant_method", "missing; expected \"bitsandbytes\""));
    };
    if method != "bitsandbytes" {
        return Err(Error::unsupported_key(
            path,
            "quantization_config.quant_method",
            format!("\"{method}\" checkpoints are not supported; peftrt runs float and bitsandbytes NF4 models"),
        ));
    }
    if q.get("load_in_8bit").and_then(Value::as_bool) == Some(true) {
        return Err(Error::unsupported_key(
            path,
            "quantization_config.load_in_8bit",
            "8-bit bitsandbytes (LLM.int8) checkpoints are not supported; use the float model or NF4",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_json(&v, Path::new("config.json"))
    }

    fn base() -> Value {
        json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100})
    }

    #[test]
    fn defaults_follow_transformers() {
        let c = parse(base()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10000.0);
        assert!(!c.tie_word_embeddings && !c.qkv_bias);
    }

    #[test]
    fn missing_key_is_named() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("hidden_size") && e.contains("missing"), "{e}");
    }

    #[test]
    fn unknown_model_type_is_refused() {
        let mut v = base();
        v["model_type"] = json!("gpt_neox");
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("gpt_neox") && e.contains("llama"), "{e}");
    }

    #[test]
    fn rope_parameters_form() {
        let mut v = base();
        v["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = parse(v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { .. }));
    }

    #[test]
    fn qwen2_has_qkv_bias() {
        let mut v = base();
        v["model_type"] = json!("qwen2");
        assert!(parse(v).unwrap().qkv_bias);
    }
}
