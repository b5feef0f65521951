//! The frozen base of a run or an evaluation: the runtime's loaded model (tokenizer, chat
//! template, generation), its copy in libtorch and its fingerprint.

use crate::error::{Error, Result};
use crate::model::{BaseModel, BaseStorage};
use peftrt::adapter::BaseFingerprint;
use std::sync::Arc;
use tch::Device;

/// A loaded base model with its tokenizer and fingerprint.
pub struct Base {
    /// The runtime's model (tokenizer, chat template; serves generation in `trainer eval`).
    pub runtime: Arc<peftrt::Model>,
    pub model: BaseModel,
    pub fingerprint: BaseFingerprint,
}

impl Base {
    /// Loads a Hugging Face model directory with the runtime's loader, then into libtorch.
    pub fn load(dir: &std::path::Path, storage: BaseStorage, device: Device) -> Result<Base> {
        if dir.is_file() {
            // The runtime runs a GGUF as it is (Q/K rows in llama.cpp's order); training needs
            // the Hugging Face layout, which `peftrt import` writes.
            return Err(Error::Input(format!(
                "{}: not a directory; the trainer takes a Hugging Face model directory (a GGUF: \
                 `peftrt import` it into one and train on that; the adapter then serves on the GGUF too)",
                dir.display()
            )));
        }
        if dir.is_dir() && !dir.join("config.json").is_file() {
            let hint = if dir.join("adapter_config.json").is_file() {
                "; it is a PEFT adapter: pass it with --init-adapter, and the model it was trained on with --base"
            } else {
                "; pass the base model's directory (config.json, *.safetensors, tokenizer.json)"
            };
            return Err(Error::Input(format!(
                "{}: not a Hugging Face model directory (no config.json){hint}",
                dir.display()
            )));
        }
        let runtime = Arc::new(peftrt::Model::load(dir, &peftrt::LoadOptions::default())?);
        let model = BaseModel::from_runtime(&runtime, storage, device)?;
        let fingerprint = BaseFingerprint::of(&runtime);
        Ok(Base { runtime, model, fingerprint })
    }

    /// The end-of-sequence id appended to plain-text examples, and the padding id.
    pub fn eos(&self) -> Option<i64> {
        self.runtime.config.eos_token_ids.first().map(|&t| i64::from(t))
    }
}
