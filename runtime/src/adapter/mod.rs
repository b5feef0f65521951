//! LoRA and DoRA adapters in the Hugging Face PEFT format, applied unmerged on top of a shared
//! model.
//!
//! Loading has two steps. [`AdapterFile::open`] reads `adapter_config.json` and memory-maps
//! `adapter_model.safetensors`, checking that the file is a complete, consistent LoRA adapter
//! on its own (this is all `peftrt inspect` needs). [`Adapter::load`] then binds it to one
//! [`Model`](crate::Model): every tensor must map to one of the model's linear layers with matching shapes,
//! `target_modules` must agree with the tensors, and a recorded base-model fingerprint must
//! match. The weights stay memory-mapped in a table indexed by [`Linear::id`](crate::model::Linear::id), so a projection
//! finds its adapter in O(1). Sessions choose which adapters are active, with a scale each
//! ([`crate::Session::set_adapters`]); nothing is copied when they switch.
//!
//! Semantics follow PEFT's `LoraConfig`/`LoraLayer` (peft/tuners/lora): scale `lora_alpha / r`
//! (`lora_alpha / sqrt(r)` with `use_rslora`), per-module `rank_pattern`/`alpha_pattern` keys
//! matched as `(.*\.)?(key)$`, `target_modules` as a list of name suffixes, a regex matched
//! against the whole module name, or `"all-linear"` (every linear layer but the output head),
//! `exclude_modules` likewise, and `layers_to_transform`.
//!
//! DoRA (`use_dora`) rescales each output row of the adapted weight to a learned magnitude `m`:
//! `y = m / ‖W + s·B·A‖_row ⊙ (W x + s·B A x) + b`, the norm taken per output row over the
//! input dimension and treated as a constant (PEFT detaches it). The norm depends on the scale
//! `s`, which a session may change; so loading stores, per row, `‖W‖²`, `⟨W, B·A⟩` and
//! `‖B·A‖²`, from which the norm for any scale is `sqrt(‖W‖² + 2s⟨W, BA⟩ + s²‖BA‖²)`.
//!
//! The files follow PEFT's seams: `file.rs` (the directory on its own: [`AdapterFile`]),
//! `config.rs` ([`AdapterConfig`], [`Targets`]), `bind.rs` ([`Adapter`]: binding to a model,
//! DoRA norms), `fingerprint.rs` ([`BaseFingerprint`]), `registry.rs` ([`AdapterRegistry`]) and
//! `apply.rs` (the arithmetic `session::linear` calls for every projection, and the
//! range of scales).

mod apply;
mod bind;
mod config;
mod file;
mod fingerprint;
mod registry;

pub(crate) use apply::{apply_adapters, finish_adapters, on_layer, runs_on_caller, Lora, LoraScratch, MAX_GROUP};
pub use apply::{check_scale, MAX_SCALE};
pub use bind::{Adapter, AdapterOptions, Dora, LoraWeights};
pub(crate) use config::suffix_match;
pub use config::{AdapterConfig, Targets};
pub use file::{AdapterFile, ModuleTensors};
pub use fingerprint::{names_another_model, BaseFingerprint, BASE_FINGERPRINT_KEY};
pub use registry::AdapterRegistry;

/// Parses an adapter argument as the CLI and the server take it: `DIR` or `DIR:SCALE` (a
/// trailing `:number` is the scale, 1 without one; directories may contain colons). The error
/// says what is wrong with `spec` (the caller adds the flag or field it came from).
pub fn parse_spec(spec: &str) -> std::result::Result<(std::path::PathBuf, f32), String> {
    if let Some((dir, scale)) = spec.rsplit_once(':') {
        if let Ok(s) = scale.parse::<f32>() {
            if !s.is_finite() {
                return Err(format!("{spec}: the scale must be a finite number"));
            }
            return Ok((std::path::PathBuf::from(dir), s));
        }
    }
    Ok((std::path::PathBuf::from(spec), 1.0))
}
