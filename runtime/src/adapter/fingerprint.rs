//! Which base model an adapter was trained on: the [`BaseFingerprint`] it records in its
//! safetensors metadata, and, for adapters without one, what `base_model_name_or_path` names.

use super::AdapterConfig;
use crate::model::Model;
use serde_json::Value;

/// The safetensors metadata key under which an adapter records the base model it was trained
/// on (see [`BaseFingerprint`]).
pub const BASE_FINGERPRINT_KEY: &str = "peftrt.base_model";

/// What identifies a base model well enough to refuse an adapter on the wrong one: a hash of
/// the architecture and every linear layer's name and shape, plus a few dozen weight values
/// (from the embeddings and norms, which quantisation keeps in float), compared with a
/// tolerance so that an F32, BF16 or NF4 copy of the same model still matches, and a
/// different fine-tune of the same architecture does not.
#[derive(Clone, Debug, PartialEq)]
pub struct BaseFingerprint {
    /// sha256 (hex) of the architecture and layer shapes.
    pub structure: String,
    pub samples: Vec<f32>,
}

impl BaseFingerprint {
    const VERSION: u64 = 1;
    const N_EMBED_SAMPLES: usize = 32;
    const N_NORM_SAMPLES: usize = 16;
    /// bf16 keeps 8 significant bits: a copy in any float dtype is within 2⁻⁸ of the original.
    const REL_TOL: f32 = 1.0 / 128.0;

    /// The fingerprint of a loaded model.
    pub fn of(model: &Model) -> BaseFingerprint {
        use sha2::{Digest, Sha256};
        let c = &model.config;
        let mut h = Sha256::new();
        h.update(format!(
            "{:?} vocab {} hidden {} layers {} heads {} kv {} head_dim {} inter {}\n",
            c.arch,
            c.vocab_size,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.intermediate_size
        ));
        for l in model.linears() {
            h.update(format!("{} {}x{}\n", l.name, l.rows, l.cols));
        }
        let structure = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let emb = model.embed_tokens.weights();
        // Fixed, spread-out positions (lengths are never 0: the model checked its shapes).
        let pick = |len: usize, i: usize| (i * 7919 + 13) % len;
        let mut samples = Vec::new();
        let mut one = [0.0f32];
        for i in 0..Self::N_EMBED_SAMPLES {
            emb.to_f32(pick(emb.len(), i), &mut one);
            samples.push(one[0]);
        }
        for norm in [&model.norm, &model.layers[0].input_norm] {
            samples.extend((0..Self::N_NORM_SAMPLES).map(|i| norm[pick(norm.len(), i)]));
        }
        BaseFingerprint { structure, samples }
    }

    /// The JSON string stored in the adapter's safetensors metadata.
    pub fn to_json(&self) -> String {
        serde_json::json!({"version": Self::VERSION, "structure": self.structure, "samples": self.samples}).to_string()
    }

    pub fn parse(s: &str) -> std::result::Result<BaseFingerprint, String> {
        let v: Value = serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))?;
        match v.get("version").and_then(Value::as_u64) {
            Some(Self::VERSION) => {}
            other => return Err(format!("version {other:?}; this peftrt reads version {}", Self::VERSION)),
        }
        let structure = v.get("structure").and_then(Value::as_str).ok_or("no `structure` string")?.to_string();
        let samples = v
            .get("samples")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect::<Option<Vec<_>>>())
            .ok_or("no `samples` list of numbers")?;
        Ok(BaseFingerprint { structure, samples })
    }

    /// `Ok` when `model` (this model's fingerprint) is the base this one records; otherwise why not.
    pub fn check(&self, model: &BaseFingerprint) -> std::result::Result<(), String> {
        if self.structure != model.structure {
            return Err("its architecture or layer shapes differ".into());
        }
        if self.samples.len() != model.samples.len() {
            return Err("its fingerprint has a different number of samples".into());
        }
        let differ = self
            .samples
            .iter()
            .zip(&model.samples)
            .filter(|(&a, &b)| (a - b).abs() > Self::REL_TOL * a.abs().max(b.abs()) + 1e-6 || a.is_nan() != b.is_nan())
            .count();
        if differ > 0 {
            return Err(format!("same shapes, but {differ} of {} sampled weights differ", self.samples.len()));
        }
        Ok(())
    }
}

/// The base model an adapter names, if it is another model than `model`; `None` if it names
/// none or names this one. The rule (issue #18): `base_model_name_or_path` (a hub id such as
/// `HuggingFaceTB/SmolLM2-135M-Instruct` or a local path) names this model when its last path
/// component equals, ignoring ASCII case, the last component of the model directory's path or
/// of `config.json`'s `_name_or_path`. A fingerprint, when the adapter records one, is the
/// stronger check and is used instead.
pub fn names_another_model(config: &AdapterConfig, model: &Model) -> Option<String> {
    let named = config.base_model.as_deref().filter(|s| !s.trim().is_empty())?;
    let last = |s: &str| s.trim().trim_end_matches(['/', '\\']).rsplit(['/', '\\']).next().unwrap_or("").to_string();
    let dir = model.dir.canonicalize().unwrap_or_else(|_| model.dir.clone());
    let own =
        [dir.file_name().map(|n| n.to_string_lossy().into_owned()), model.config.name_or_path.as_deref().map(last)];
    let want = last(named);
    let same = own.iter().flatten().any(|o| !o.is_empty() && o.eq_ignore_ascii_case(&want));
    (!same).then(|| named.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_tolerate_float_copies_only() {
        let fp = BaseFingerprint { structure: "ab".into(), samples: vec![0.5, -0.031, 1e-8, 0.0] };
        let back = BaseFingerprint::parse(&fp.to_json()).unwrap();
        assert_eq!(back, fp);
        let bf16 = BaseFingerprint {
            structure: "ab".into(),
            samples: fp.samples.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(),
        };
        assert_eq!(fp.check(&bf16), Ok(()));
        let tuned = BaseFingerprint { structure: "ab".into(), samples: vec![0.5, -0.0325, 1e-8, 0.0] };
        assert!(fp.check(&tuned).unwrap_err().contains("1 of 4"));
        let other = BaseFingerprint { structure: "cd".into(), samples: fp.samples.clone() };
        assert!(fp.check(&other).is_err());
        assert!(BaseFingerprint::parse(r#"{"version": 2}"#).unwrap_err().contains("version"));
    }
}
