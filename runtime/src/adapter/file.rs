//! An adapter directory read and checked on its own, before any model is involved:
//! `adapter_config.json` parsed, `adapter_model.safetensors` mapped, every tensor a finite LoRA
//! tensor in complete A/B pairs with the configured ranks ([`AdapterFile`], what `peftrt inspect` shows).

use super::{AdapterConfig, BaseFingerprint, BASE_FINGERPRINT_KEY};
use crate::error::{Error, Result};
use crate::weights::{Tensor, WeightStore};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The tensors of one adapted module, as found in the file.
pub struct ModuleTensors {
    pub a: Tensor,
    pub b: Tensor,
    /// DoRA's `lora_magnitude_vector`, `[out]`.
    pub magnitude: Option<Tensor>,
}

impl ModuleTensors {
    pub fn rank(&self) -> usize {
        self.a.shape[0]
    }
}

/// An adapter directory, read and checked on its own, not yet bound to a model.
pub struct AdapterFile {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    /// Adapted module name (e.g. `model.layers.0.self_attn.q_proj`) → its tensors.
    pub modules: BTreeMap<String, ModuleTensors>,
    /// The base model the adapter records it was trained on, if it records one.
    pub base_fingerprint: Option<BaseFingerprint>,
    /// Size of `adapter_model.safetensors` in bytes.
    pub file_bytes: u64,
    pub(super) store: WeightStore,
}

impl AdapterFile {
    /// Reads `dir/adapter_config.json` and maps `dir/adapter_model.safetensors`, checking that
    /// every tensor is a LoRA tensor, A/B pairs are complete and ranks agree with the config.
    pub fn open(dir: &Path) -> Result<AdapterFile> {
        let cfg_path = dir.join("adapter_config.json");
        if !dir.is_dir() {
            return Err(Error::not_a_directory(
                dir,
                "not a directory; pass a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)",
            ));
        }
        let text = crate::fsutil::read_text_file(&cfg_path, crate::fsutil::MAX_JSON_BYTES)?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?;
        let config = AdapterConfig::parse(&v, &cfg_path)?;
        let path = dir.join("adapter_model.safetensors");
        if !path.is_file() {
            return Err(if dir.join("adapter_model.bin").is_file() {
                Error::Unsupported(format!(
                    "{}: only adapter_model.bin (a Python pickle, which can run code when loaded) is here; \
                     convert it to adapter_model.safetensors (PEFT: save_pretrained(..., safe_serialization=True))",
                    dir.display()
                ))
            } else {
                Error::missing(dir, "adapter_model.safetensors is missing")
            });
        }
        let file_bytes = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
        // SAFETY: the adapter file must not change while loaded; documented on `Model::load` too.
        let store = unsafe { WeightStore::open_file(&path)? };

        let mut parts: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
        for t in store.tensors() {
            let (module, part) = split_key(&t.name).ok_or_else(|| {
                if t.name.contains("lora_embedding_") {
                    let why = "is a LoRA on an embedding layer, which peftrt does not support (only linear layers)";
                    Error::unsupported_tensor(&t.name, format!("in {}: {why}", path.display()))
                } else {
                    let why =
                        "is not a LoRA tensor (expected …lora_A.weight, …lora_B.weight or …lora_magnitude_vector)";
                    Error::tensor(&t.name, format!("in {}: {why}", path.display()))
                }
            })?;
            parts.entry(module.to_string()).or_default()[part as usize] = Some(t.clone());
        }
        let mut modules = BTreeMap::new();
        for (module, [a, b, m]) in parts {
            let missing = |part: &str| {
                Error::tensor(
                    format!("{module}.{part}"),
                    format!("is missing from {}: the adapter file is incomplete", path.display()),
                )
            };
            let a = a.ok_or_else(|| missing("lora_A.weight"))?;
            let b = b.ok_or_else(|| missing("lora_B.weight"))?;
            // Adapters are small: every value is checked once here, so no command (generate,
            // merge, the C API) ever computes with raw bytes or a NaN read as weights.
            for t in [Some(&a), Some(&b), m.as_ref()].into_iter().flatten() {
                check_adapter_tensor(t)?;
            }
            let rank = config.rank_for(&module);
            if a.shape.len() != 2 || a.shape[0] != rank {
                return Err(Error::tensor(
                    &a.name,
                    format!("has shape {:?}, but adapter_config.json says rank {rank} for this module", a.shape),
                ));
            }
            if b.shape.len() != 2 || b.shape[1] != rank {
                return Err(Error::tensor(
                    &b.name,
                    format!("has shape {:?}, but adapter_config.json says rank {rank} for this module", b.shape),
                ));
            }
            match (&m, config.use_dora) {
                (Some(m), true) if m.shape != [b.shape[0]] => {
                    return Err(Error::tensor(
                        &m.name,
                        format!("has shape {:?}; DoRA needs one magnitude per output row: [{}]", m.shape, b.shape[0]),
                    ))
                }
                (None, true) => return Err(missing("lora_magnitude_vector")),
                (Some(m), false) => {
                    return Err(Error::tensor(
                        &m.name,
                        "is a DoRA magnitude, but adapter_config.json does not set use_dora: the config and weights disagree",
                    ))
                }
                _ => {}
            }
            modules.insert(module, ModuleTensors { a, b, magnitude: m });
        }
        if modules.is_empty() {
            return Err(Error::format(&path, "has no LoRA tensors"));
        }
        let base_fingerprint = match store.metadata().get(BASE_FINGERPRINT_KEY) {
            None => None,
            Some(s) => Some(BaseFingerprint::parse(s).map_err(|msg| {
                Error::format(&path, format!("metadata `{BASE_FINGERPRINT_KEY}` is malformed: {msg}"))
            })?),
        };
        Ok(AdapterFile { dir: dir.to_path_buf(), config, modules, base_fingerprint, file_bytes, store })
    }

    /// Number of adapter parameters.
    pub fn n_params(&self) -> usize {
        self.modules.values().map(|m| m.a.numel() + m.b.numel() + m.magnitude.as_ref().map_or(0, Tensor::numel)).sum()
    }

    /// The LoRA scale of a module: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale_for(&self, module: &str) -> f32 {
        let (rank, alpha) = (self.config.rank_for(module) as f32, self.config.alpha_for(module));
        if self.config.rslora {
            alpha / rank.sqrt()
        } else {
            alpha / rank
        }
    }
}

/// An adapter tensor must hold finite floats: U8/I8 (or any integer) values are not LoRA
/// weights, and one NaN or infinity would make every output non-finite.
fn check_adapter_tensor(t: &Tensor) -> Result<()> {
    t.expect_float()?;
    t.check_finite()
}

/// `lora_A`, `lora_B` or DoRA's magnitude: the index into a module's parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    A = 0,
    B = 1,
    Magnitude = 2,
}

/// `base_model.model.<module>.lora_A.weight` → (`<module>`, A).
fn split_key(name: &str) -> Option<(&str, Part)> {
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    for (suffix, part) in [
        (".lora_A.weight", Part::A),
        (".lora_B.weight", Part::B),
        (".lora_magnitude_vector", Part::Magnitude),
        (".lora_magnitude_vector.weight", Part::Magnitude), // PEFT < 0.12
    ] {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Some((module, part));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_module_and_part() {
        assert_eq!(
            split_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj", Part::A))
        );
        assert_eq!(
            split_key("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"),
            Some(("model.layers.0.mlp.up_proj", Part::Magnitude))
        );
        assert_eq!(split_key("base_model.model.lm_head.weight"), None);
        assert_eq!(split_key("base_model.model.model.embed_tokens.lora_embedding_A"), None);
    }
}
