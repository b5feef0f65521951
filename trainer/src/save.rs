//! Writing a trained adapter: a PEFT adapter directory (`adapter_config.json`,
//! `adapter_model.safetensors` with PEFT's keys, F32) plus provenance — the base-model
//! fingerprint the runtime checks ([`peftrt::adapter::BASE_FINGERPRINT_KEY`]), the dataset's
//! hash and version, the hyper-parameters and the trainer's version — both in the safetensors
//! header metadata and in a sidecar `peftrt_provenance.json`. The directory is written under
//! a temporary name and renamed into place (the runtime's `write_dir_atomically`), so a failed
//! save leaves nothing half-written.

use crate::error::{Error, Result};
use crate::lora::{to_f32_vec, LoraSet};
use peftrt::adapter::{BaseFingerprint, BASE_FINGERPRINT_KEY};
use peftrt::output::{
    write_dir_atomically_with, write_json, write_safetensors_bytes_with_metadata, Replace, TensorSpec,
};
use peftrt::weights::DType;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// The sidecar file with the provenance.
pub const PROVENANCE_FILE: &str = "peftrt_provenance.json";
/// Metadata keys besides the base fingerprint.
pub const DATASET_KEY: &str = "peftrt.dataset";
pub const HYPERPARAMETERS_KEY: &str = "peftrt.hyperparameters";
pub const TRAINER_KEY: &str = "peftrt.trainer";

/// Where an adapter came from.
#[derive(Clone, Debug)]
pub struct Provenance {
    pub base: BaseFingerprint,
    /// `{"sha256", "file", "version", "format", "examples"}`.
    pub dataset: Value,
    pub hyperparameters: Value,
}

impl Provenance {
    fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (BASE_FINGERPRINT_KEY.to_string(), self.base.to_json()),
            (DATASET_KEY.to_string(), self.dataset.to_string()),
            (HYPERPARAMETERS_KEY.to_string(), self.hyperparameters.to_string()),
            (TRAINER_KEY.to_string(), trainer_version()),
        ])
    }

    fn sidecar(&self) -> Value {
        json!({
            "base_model": serde_json::from_str::<Value>(&self.base.to_json()).unwrap_or(Value::Null),
            "dataset": self.dataset,
            "hyperparameters": self.hyperparameters,
            "trainer": trainer_version(),
        })
    }
}

/// `peftrt-trainer <version>`.
pub fn trainer_version() -> String {
    format!("peftrt-trainer {}", env!("CARGO_PKG_VERSION"))
}

/// Writes the adapter files into an existing directory `dir`.
pub fn write_adapter_files(dir: &Path, lora: &LoraSet, base_name: &str, prov: &Provenance) -> Result<()> {
    let params = lora.named_parameters();
    let specs: Vec<TensorSpec> = params
        .iter()
        .map(|(name, t)| TensorSpec {
            name: name.clone(),
            shape: t.size().iter().map(|&d| d as usize).collect(),
            dtype: DType::F32,
        })
        .collect();
    let mut failure = None;
    let path = dir.join("adapter_model.safetensors");
    let written = write_safetensors_bytes_with_metadata(&path, &specs, &prov.metadata(), |i, out| {
        match to_f32_vec(&params[i].1) {
            Ok(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            Err(e) => failure = Some(e),
        }
        Ok(())
    });
    if let Some(e) = failure {
        return Err(e);
    }
    written?;
    write_json(&dir.join("adapter_config.json"), &lora.peft_config(base_name))?;
    write_json(&dir.join(PROVENANCE_FILE), &prov.sidecar())?;
    Ok(())
}

/// Writes the adapter to `out_dir` atomically, replacing it only if `overwrite`, with copies of
/// `extra` files (name in the directory, source).
pub fn save_adapter(
    out_dir: &Path,
    lora: &LoraSet,
    base_name: &str,
    prov: &Provenance,
    overwrite: bool,
    extra: &[(&str, &Path)],
) -> Result<()> {
    check_output(out_dir, overwrite)?;
    // `--overwrite` replaces what was there when the run started; without it (checked above)
    // nothing is replaced, not even a directory that appears while the adapter is written.
    let replace = if overwrite { Replace::Existing } else { Replace::Nothing };
    write_dir_atomically_with(out_dir, replace, |tmp| {
        let fill = || -> Result<()> {
            write_adapter_files(tmp, lora, base_name, prov)?;
            for (name, from) in extra {
                std::fs::copy(from, tmp.join(name)).map_err(|e| Error::io(*from, e))?;
            }
            Ok(())
        };
        fill().map_err(|e| match e {
            Error::Runtime(e) => e,
            other => peftrt::Error::Input(other.to_string()),
        })
    })?;
    Ok(())
}

/// Refuses an existing output directory unless `overwrite`, and checks that one can be made
/// next to it (so a run does not train for an hour to fail at the end).
pub fn check_output(out_dir: &Path, overwrite: bool) -> Result<()> {
    if out_dir.exists() && !overwrite {
        return Err(Error::Input(format!(
            "{}: already exists; choose another --output or pass --overwrite to replace it",
            out_dir.display()
        )));
    }
    if out_dir.exists() && !out_dir.is_dir() {
        return Err(Error::Input(format!("{}: exists and is not a directory", out_dir.display())));
    }
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let probe = parent.join(format!(".peftrt-trainer-probe-{}", std::process::id()));
    std::fs::create_dir(&probe).map_err(|e| {
        Error::Input(format!("{}: cannot write the output here ({e}); choose a writable --output", out_dir.display()))
    })?;
    std::fs::remove_dir(&probe).map_err(|e| Error::io(&probe, e))?;
    Ok(())
}
