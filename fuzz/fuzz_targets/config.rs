//! `config.json` → `ModelConfig::from_json`, then `Model::load` of the tiny Llama fixture's
//! weights under that config (no tokenizer): a config that parses must either fit the weights
//! or be refused, without allocating for layers, heads or positions the weights do not have.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peftrt::{LoadOptions, Model, ModelConfig};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A model directory of this process: the fixture's weights (linked) beside the fuzzed config.
fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = peftrt_fuzz::scratch_subdir("model");
        let weights = peftrt_fuzz::tiny_llama_dir().join("model.safetensors");
        let weights = weights.canonicalize().expect("the tiny-llama fixture");
        std::os::unix::fs::symlink(weights, dir.join("model.safetensors")).expect("link the fixture weights");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let Ok(cfg) = ModelConfig::from_json(&v, Path::new("config.json")) else { return };
    let _ = (cfg.q_dim(), cfg.kv_dim());
    let dir = model_dir();
    peftrt_fuzz::write(dir, "config.json", data);
    if let Ok(model) = Model::load(dir, &LoadOptions { no_tokenizer: true, ..Default::default() }) {
        assert_eq!(model.rope_inv_freq.len(), model.config.head_dim / 2);
    }
});
