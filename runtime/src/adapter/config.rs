//! `adapter_config.json` as PEFT's `LoraConfig` means it: rank and alpha (with
//! `rank_pattern`/`alpha_pattern`), rsLoRA, DoRA, and which modules are selected
//! (`target_modules`, `exclude_modules`, `layers_to_transform`). The trainer chooses its modules with the same types.

use crate::error::{Error, Result};
use regex::Regex;
use serde_json::Value;
use std::path::Path;

/// Which modules an adapter applies to: PEFT's `target_modules` (and `exclude_modules`).
#[derive(Clone, Debug)]
pub enum Targets {
    /// Not given: PEFT chose its per-architecture default.
    Unspecified,
    /// Module names or name suffixes (`q_proj` matches `model.layers.0.self_attn.q_proj`).
    List(Vec<String>),
    /// A regular expression matched against the whole module name.
    Regex(Regex),
    /// Every linear layer but the output head.
    AllLinear,
}

impl Targets {
    fn parse(v: Option<&Value>, key: &str, path: &Path) -> Result<Targets> {
        Ok(match v {
            None | Some(Value::Null) => Targets::Unspecified,
            Some(Value::String(s)) if s == "all-linear" => Targets::AllLinear,
            Some(Value::String(s)) => Targets::Regex(
                Regex::new(&format!("^(?:{s})$"))
                    .map_err(|e| Error::config(path, key, format!("not a regular expression peftrt can use: {e}")))?,
            ),
            Some(Value::Array(a)) => Targets::List(
                a.iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| Error::config(path, key, "expected a list of module names"))?,
            ),
            Some(_) => return Err(Error::config(path, key, "expected a list of module names or a regex string")),
        })
    }

    /// Whether the module is selected (`None` when unspecified).
    fn matches(&self, module: &str, is_output: bool) -> Option<bool> {
        match self {
            Targets::Unspecified => None,
            Targets::List(names) => Some(names.iter().any(|t| suffix_match(module, t))),
            Targets::Regex(re) => Some(re.is_match(module)),
            Targets::AllLinear => Some(!is_output),
        }
    }
}

impl std::fmt::Display for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Targets::Unspecified => f.write_str("(PEFT default)"),
            Targets::List(names) => f.write_str(&names.join(",")),
            Targets::Regex(re) => {
                let s = re.as_str();
                f.write_str(s.strip_prefix("^(?:").and_then(|s| s.strip_suffix(")$")).unwrap_or(s))
            }
            Targets::AllLinear => f.write_str("all-linear"),
        }
    }
}

/// PEFT's list matching: the whole name, or a suffix after a dot.
pub(crate) fn suffix_match(module: &str, target: &str) -> bool {
    module == target || module.strip_suffix(target).is_some_and(|p| p.ends_with('.'))
}

/// The parts of `adapter_config.json` that inference uses.
#[derive(Clone, Debug)]
pub struct AdapterConfig {
    pub r: usize,
    pub alpha: f32,
    pub rslora: bool,
    pub use_dora: bool,
    pub target_modules: Targets,
    pub exclude_modules: Targets,
    /// `layers_to_transform`: only these decoder layers are adapted.
    pub layers: Option<Vec<usize>>,
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f32)>,
    /// `base_model_name_or_path`, as PEFT recorded it.
    pub base_model: Option<String>,
}

impl AdapterConfig {
    pub(super) fn parse(v: &Value, path: &Path) -> Result<AdapterConfig> {
        if !v.is_object() {
            return Err(Error::format(path, "expected a JSON object (PEFT's adapter_config.json)"));
        }
        let peft_type = match v.get("peft_type") {
            None | Some(Value::Null) => "LORA",
            Some(Value::String(t)) => t.as_str(),
            Some(x) => {
                return Err(Error::config(path, "peft_type", format!("expected a string such as \"LORA\", found {x}")))
            }
        };
        if peft_type != "LORA" {
            return Err(Error::unsupported_key(
                path,
                "peft_type",
                format!("\"{peft_type}\" adapters are not supported; peftrt runs LORA (and DoRA) adapters"),
            ));
        }
        let truthy = |key: &str| v.get(key).and_then(Value::as_bool) == Some(true);
        if truthy("fan_in_fan_out") {
            // PEFT itself resets it to false for nn.Linear (with a warning): Llama-family layers
            // have no GPT-2-style Conv1D, so the weights are in the usual [out, in] layout.
            log::warn!(
                "{}: fan_in_fan_out is true, which PEFT ignores for Linear layers; ignoring it too",
                path.display()
            );
        }
        match v.get("bias").and_then(Value::as_str) {
            None | Some("none") => {}
            Some(other) => {
                return Err(Error::unsupported_key(
                    path,
                    "bias",
                    format!("\"{other}\" is not supported (only \"none\")"),
                ))
            }
        }
        if v.get("modules_to_save").is_some_and(|m| m.as_array().is_some_and(|a| !a.is_empty())) {
            return Err(Error::unsupported_key(
                path,
                "modules_to_save",
                "full replacement modules (e.g. a trained lm_head or embed_tokens) are not supported; \
                 merge the adapter into the base with PEFT's merge_and_unload instead",
            ));
        }
        // Newer PEFT options that change what the adapter computes: refused, never ignored.
        for key in ["lora_bias", "use_qalora", "use_bdlora"] {
            if truthy(key) {
                return Err(Error::unsupported_key(path, key, "is set; peftrt does not support this LoRA variant"));
            }
        }
        for key in ["alora_invocation_tokens", "layer_replication", "trainable_token_indices", "target_parameters"] {
            if v.get(key).is_some_and(|x| !x.is_null() && x.as_array().is_none_or(|a| !a.is_empty())) {
                return Err(Error::unsupported_key(path, key, "is set; peftrt does not support this LoRA variant"));
            }
        }
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| Error::config(path, "r", "missing or not a positive integer"))? as usize;
        let alpha = v
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .map(|a| a as f32)
            .filter(|a| a.is_finite())
            .ok_or_else(|| Error::config(path, "lora_alpha", "missing or not a finite number"))?;
        let pattern = |key: &str| -> Result<Vec<(String, f64)>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(vec![]),
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(k, x)| {
                        let entry = format!("{key}.{k}");
                        pattern_regex(k).map_err(|e| {
                            Error::config(
                                path,
                                &entry,
                                format!("the key is not a regular expression peftrt can use: {e}"),
                            )
                        })?;
                        x.as_f64()
                            .filter(|x| (*x as f32).is_finite())
                            .map(|x| (k.clone(), x))
                            .ok_or_else(|| Error::config(path, &entry, "not a finite number"))
                    })
                    .collect(),
                Some(_) => Err(Error::config(path, key, "expected an object")),
            }
        };
        let rank_pattern = pattern("rank_pattern")?
            .into_iter()
            .map(|(k, x)| {
                if x >= 1.0 && x.fract() == 0.0 {
                    Ok((k, x as usize))
                } else {
                    Err(Error::config(path, format!("rank_pattern.{k}"), "not a positive integer"))
                }
            })
            .collect::<Result<_>>()?;
        let layers = match v.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![n
                .as_u64()
                .ok_or_else(|| Error::config(path, "layers_to_transform", "not a layer index"))?
                as usize]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| x.as_u64().map(|i| i as usize))
                    .collect::<Option<_>>()
                    .ok_or_else(|| Error::config(path, "layers_to_transform", "expected layer indices"))?,
            ),
            Some(_) => return Err(Error::config(path, "layers_to_transform", "expected a layer index or a list")),
        };
        Ok(AdapterConfig {
            r,
            alpha,
            rslora: truthy("use_rslora"),
            use_dora: truthy("use_dora"),
            target_modules: Targets::parse(v.get("target_modules"), "target_modules", path)?,
            exclude_modules: Targets::parse(v.get("exclude_modules"), "exclude_modules", path)?,
            layers,
            rank_pattern,
            alpha_pattern: pattern("alpha_pattern")?.into_iter().map(|(k, x)| (k, x as f32)).collect(),
            base_model: v.get("base_model_name_or_path").and_then(Value::as_str).map(str::to_string),
        })
    }

    pub fn rank_for(&self, module: &str) -> usize {
        pattern_value(&self.rank_pattern, module).unwrap_or(self.r)
    }

    pub fn alpha_for(&self, module: &str) -> f32 {
        pattern_value(&self.alpha_pattern, module).unwrap_or(self.alpha)
    }

    /// Whether PEFT would have put a LoRA layer on `module` (false when `target_modules` is
    /// unspecified: the caller does not cross-check then).
    pub fn selects(&self, module: &str, is_output: bool) -> bool {
        let targeted = self.target_modules.matches(module, is_output).unwrap_or(false);
        let excluded = self.exclude_modules.matches(module, is_output).unwrap_or(false);
        let in_layers = match &self.layers {
            None => true,
            Some(ls) => layer_index(module).is_some_and(|i| ls.contains(&i)),
        };
        targeted && !excluded && in_layers
    }
}

/// The decoder-layer index in a module name (`model.layers.3.mlp.up_proj` → 3).
fn layer_index(module: &str) -> Option<usize> {
    let rest = &module[module.find("layers.")? + "layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// PEFT's `get_pattern_key` pattern for a `rank_pattern`/`alpha_pattern` key: `(.*\.)?(key)$`.
fn pattern_regex(key: &str) -> std::result::Result<Regex, regex::Error> {
    Regex::new(&format!(r"^(.*\.)?({key})$"))
}

/// PEFT's `get_pattern_key`: the first key that matches `(.*\.)?(key)$` against the module name
/// (keys were checked to compile when the config was parsed).
fn pattern_value<T: Copy>(patterns: &[(String, T)], module: &str) -> Option<T> {
    patterns.iter().find_map(|(k, v)| pattern_regex(k).ok()?.is_match(module).then_some(*v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_peft() {
        let p = vec![("k_proj".to_string(), 2usize), ("layers.1.mlp.down_proj".to_string(), 4)];
        assert_eq!(pattern_value(&p, "model.layers.0.self_attn.k_proj"), Some(2));
        assert_eq!(pattern_value(&p, "model.layers.1.mlp.down_proj"), Some(4));
        assert_eq!(pattern_value(&p, "model.layers.0.mlp.down_proj"), None);
        assert_eq!(pattern_value(&p, "model.layers.0.self_attn.xk_proj"), None);
    }
    #[test]
    fn targets_select_like_peft() {
        let path = Path::new("adapter_config.json");
        let cfg = |v: Value| AdapterConfig::parse(&v, path).unwrap();
        let q = "model.layers.1.self_attn.q_proj";
        let list = cfg(serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "mlp.up_proj"]}));
        assert!(list.selects(q, false));
        assert!(list.selects("model.layers.0.mlp.up_proj", false));
        assert!(!list.selects("model.layers.0.self_attn.xq_proj", false));
        assert!(!list.selects("model.layers.0.mlp.gate_proj", false));
        let re = cfg(serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": ".*\\.(q|v)_proj"}));
        assert!(re.selects(q, false) && !re.selects("model.layers.1.self_attn.k_proj", false));
        // fullmatch: a regex matching only a prefix does not select.
        let pre = cfg(serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": "model\\.layers"}));
        assert!(!pre.selects(q, false));
        let all = cfg(serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
            "exclude_modules": ["k_proj"], "layers_to_transform": [1]}));
        assert!(all.selects(q, false));
        assert!(!all.selects("lm_head", true));
        assert!(!all.selects("model.layers.1.self_attn.k_proj", false));
        assert!(!all.selects("model.layers.0.self_attn.q_proj", false));
        assert_eq!(layer_index("model.layers.12.mlp.up_proj"), Some(12));
        assert_eq!(layer_index("lm_head"), None);
    }
    #[test]
    fn fan_in_fan_out_is_ignored_for_linear_layers_as_peft_does() {
        let v = serde_json::json!({"r": 4, "lora_alpha": 8, "fan_in_fan_out": true});
        assert!(AdapterConfig::parse(&v, Path::new("adapter_config.json")).is_ok());
    }
    #[test]
    fn variants_that_change_the_output_are_refused() {
        let path = Path::new("adapter_config.json");
        for (key, value) in [
            ("lora_bias", serde_json::json!(true)),
            ("use_qalora", serde_json::json!(true)),
            ("alora_invocation_tokens", serde_json::json!([1, 2])),
            ("layer_replication", serde_json::json!([[0, 1]])),
            ("trainable_token_indices", serde_json::json!([5])),
            ("modules_to_save", serde_json::json!(["lm_head"])),
            ("bias", serde_json::json!("all")),
        ] {
            let mut v = serde_json::json!({"r": 4, "lora_alpha": 8});
            v[key] = value;
            let e = AdapterConfig::parse(&v, path).err().unwrap_or_else(|| panic!("{key} accepted")).to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }
}
