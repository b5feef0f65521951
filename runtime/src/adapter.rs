//! LoRA adapters in the Hugging Face PEFT format, applied unmerged on top of a shared model.
//!
//! An [`Adapter`] is loaded against one [`Model`] and validated there: every tensor must map to
//! one of the model's linear layers with matching shapes. Its weights stay memory-mapped and
//! are kept in a table indexed by [`Linear::id`], so a projection finds its adapter in O(1).
//! Sessions choose which adapters are active, with a scale each
//! ([`crate::Session::set_adapters`]); nothing is copied when they switch.
//!
//! Semantics follow PEFT's `LoraConfig`/`LoraLayer` (peft/tuners/lora): scale `lora_alpha / r`
//! (`lora_alpha / sqrt(r)` with `use_rslora`), per-module `rank_pattern`/`alpha_pattern` keys
//! matched as `(.*\.)?(key)$`, `target_modules` as a list of name suffixes, a regex matched
//! against the whole module name, or `"all-linear"` (every linear layer but the output head).

use crate::error::{Error, Result};
use crate::kernels::MatRef;
use crate::model::{Linear, Model};
use crate::weights::{Tensor, WeightStore};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One adapted linear layer: `ΔW·x = scale · B (A x)`.
pub struct LoraWeights {
    /// `[r, in_features]`
    pub a: Tensor,
    /// `[out_features, r]`
    pub b: Tensor,
    pub rank: usize,
    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub scale: f32,
}

impl LoraWeights {
    pub fn a_mat(&self) -> MatRef<'_> {
        MatRef { w: self.a.weights(), rows: self.rank, cols: self.a.shape[1] }
    }
    pub fn b_mat(&self) -> MatRef<'_> {
        MatRef { w: self.b.weights(), rows: self.b.shape[0], cols: self.rank }
    }
}

/// A loaded, validated LoRA adapter.
pub struct Adapter {
    pub name: String,
    pub dir: PathBuf,
    /// Indexed by [`Linear::id`] of the model it was loaded for.
    layers: Vec<Option<LoraWeights>>,
    /// Largest rank over all layers (for scratch sizing).
    pub max_rank: usize,
    /// Largest output width over the adapted layers (for scratch sizing).
    pub max_out: usize,
    /// Address of the model it was loaded for: sessions refuse it on any other.
    pub(crate) model_key: usize,
    _store: WeightStore,
}

/// The parts of `adapter_config.json` that inference uses.
#[derive(Debug, Clone)]
struct Config {
    r: usize,
    alpha: f32,
    rslora: bool,
    rank_pattern: Vec<(String, usize)>,
    alpha_pattern: Vec<(String, f32)>,
}

impl Adapter {
    /// Loads the PEFT adapter in `dir` for `model`, checking every tensor against it.
    pub fn load(dir: &Path, model: &Model) -> Result<Adapter> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?;
        let cfg = parse_config(&v, &cfg_path)?;
        let weights = dir.join("adapter_model.safetensors");
        if !weights.is_file() {
            let msg = if dir.join("adapter_model.bin").is_file() {
                "only adapter_model.bin (a Python pickle, which can run code when loaded) is here; \
                 convert it to adapter_model.safetensors (PEFT: save_pretrained(..., safe_serialization=True))"
            } else {
                "adapter_model.safetensors is missing"
            };
            return Err(Error::format(dir, msg));
        }
        // SAFETY: the adapter file must not change while loaded; documented on `Model::load` too.
        let store = unsafe { WeightStore::open_file(&weights)? };

        let mut layers: Vec<Option<LoraWeights>> = model.linears().map(|_| None).collect();
        let by_name: std::collections::HashMap<&str, &Linear> = model.linears().map(|l| (l.name.as_str(), l)).collect();
        let mut max_rank = 0;
        for t in store.tensors() {
            let (module, part) = split_key(&t.name).ok_or_else(|| {
                Error::tensor(
                    &t.name,
                    format!(
                        "in {}: not a LoRA tensor name (expected …lora_A.weight / …lora_B.weight)",
                        weights.display()
                    ),
                )
            })?;
            let lin = by_name.get(module).ok_or_else(|| {
                Error::tensor(&t.name, format!("targets `{module}`, which this base model does not have (is the adapter for a different model?)"))
            })?;
            if part != "lora_A" {
                continue; // B is checked together with its A below.
            }
            let b_name = t.name.replacen("lora_A", "lora_B", 1);
            let b = store.get(&b_name).map_err(|_| {
                Error::tensor(&t.name, format!("has no matching {b_name}: the adapter file is incomplete"))
            })?;
            let rank = cfg.rank_for(module);
            let expect = |t: &Tensor, shape: [usize; 2]| -> Result<()> {
                if t.shape != shape {
                    return Err(Error::tensor(&t.name, format!(
                        "does not match this base model and adapter_config.json (r = {rank}): expected {:?}, found {:?}",
                        shape, t.shape
                    )));
                }
                Ok(())
            };
            expect(t, [rank, lin.cols])?;
            expect(b, [lin.rows, rank])?;
            let alpha = cfg.alpha_for(module);
            let scale = if cfg.rslora { alpha / (rank as f32).sqrt() } else { alpha / rank as f32 };
            max_rank = max_rank.max(rank);
            layers[lin.id] = Some(LoraWeights { a: t.clone(), b: b.clone(), rank, scale });
        }
        // Every B needs its A.
        for t in store.tensors() {
            if let Some((module, "lora_B")) = split_key(&t.name) {
                if by_name.get(module).is_some_and(|l| layers[l.id].is_none()) {
                    return Err(Error::tensor(
                        &t.name,
                        "has no matching lora_A tensor: the adapter file is incomplete",
                    ));
                }
            }
        }
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
        let max_out = layers.iter().flatten().map(|l| l.b.shape[0]).max().unwrap_or(0);
        let model_key = model as *const Model as usize;
        Ok(Adapter { name, dir: dir.to_path_buf(), layers, max_rank, max_out, model_key, _store: store })
    }

    /// The adapter's weights for a linear layer, if it adapts it.
    #[inline]
    pub fn for_layer(&self, lin: &Linear) -> Option<&LoraWeights> {
        self.layers.get(lin.id).and_then(Option::as_ref)
    }

    /// Number of adapted linear layers.
    pub fn n_layers(&self) -> usize {
        self.layers.iter().filter(|l| l.is_some()).count()
    }
}

/// `base_model.model.<module>.lora_A.weight` → (`<module>`, `lora_A`).
fn split_key(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    let rest = rest.strip_suffix(".weight")?;
    let (module, part) = rest.rsplit_once('.')?;
    matches!(part, "lora_A" | "lora_B").then_some((module, part))
}

fn parse_config(v: &Value, path: &Path) -> Result<Config> {
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(Error::config(
            path,
            "peft_type",
            format!("\"{peft_type}\" adapters are not supported; peftrt runs LORA adapters"),
        ));
    }
    if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(Error::Unsupported(format!("{}: DoRA adapters (use_dora) are not supported yet", path.display())));
    }
    if v.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err(Error::config(
            path,
            "fan_in_fan_out",
            "true is for GPT-2-style Conv1D layers, which Llama-family models do not have",
        ));
    }
    match v.get("bias").and_then(Value::as_str) {
        None | Some("none") => {}
        Some(other) => {
            return Err(Error::config(path, "bias", format!("\"{other}\" is not supported (only \"none\")")))
        }
    }
    if v.get("modules_to_save").is_some_and(|m| m.as_array().is_some_and(|a| !a.is_empty())) {
        return Err(Error::config(
            path,
            "modules_to_save",
            "full replacement modules are not supported yet; merge them into the base model instead",
        ));
    }
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| Error::config(path, "r", "missing or not a positive integer"))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| Error::config(path, "lora_alpha", "missing or not a number"))? as f32;
    let pattern = |key: &str| -> Result<Vec<(String, f64)>> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, x)| {
                    x.as_f64()
                        .map(|x| (k.clone(), x))
                        .ok_or_else(|| Error::config(path, format!("{key}.{k}"), "not a number"))
                })
                .collect(),
            Some(_) => Err(Error::config(path, key, "expected an object")),
        }
    };
    Ok(Config {
        r,
        alpha,
        rslora: v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        rank_pattern: pattern("rank_pattern")?.into_iter().map(|(k, x)| (k, x as usize)).collect(),
        alpha_pattern: pattern("alpha_pattern")?.into_iter().map(|(k, x)| (k, x as f32)).collect(),
    })
}

/// PEFT's `get_pattern_key`: the first key that matches `(.*\.)?(key)$` against the module name.
fn pattern_value<T: Copy>(patterns: &[(String, T)], module: &str) -> Option<T> {
    patterns.iter().find_map(|(k, v)| {
        let re = regex::Regex::new(&format!(r"^(.*\.)?({k})$")).ok()?;
        re.is_match(module).then_some(*v)
    })
}

impl Config {
    fn rank_for(&self, module: &str) -> usize {
        pattern_value(&self.rank_pattern, module).unwrap_or(self.r)
    }
    fn alpha_for(&self, module: &str) -> f32 {
        pattern_value(&self.alpha_pattern, module).unwrap_or(self.alpha)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_module_and_part() {
        assert_eq!(
            split_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj", "lora_A"))
        );
        assert_eq!(split_key("base_model.model.lm_head.weight"), None);
    }

    #[test]
    fn patterns_match_like_peft() {
        let p = vec![("k_proj".to_string(), 2usize), ("layers.1.mlp.down_proj".to_string(), 4)];
        assert_eq!(pattern_value(&p, "model.layers.0.self_attn.k_proj"), Some(2));
        assert_eq!(pattern_value(&p, "model.layers.1.mlp.down_proj"), Some(4));
        assert_eq!(pattern_value(&p, "model.layers.0.mlp.down_proj"), None);
        assert_eq!(pattern_value(&p, "model.layers.0.self_attn.xk_proj"), None);
    }
}
