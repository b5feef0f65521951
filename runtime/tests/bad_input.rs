//! Bad input gives a clear error naming the file, tensor or key — never a panic.
//! Each test corrupts a small, valid, randomly initialised model written here.

use peftrt::{LoadOptions, Model, Session, SessionOptions};
use safetensors::tensor::TensorView;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;

const HIDDEN: usize = 16;
const INTER: usize = 32;
const VOCAB: usize = 40;
const LAYERS: usize = 1;

fn config() -> serde_json::Value {
    json!({"model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER,
           "num_hidden_layers": LAYERS, "num_attention_heads": 2, "num_key_value_heads": 1,
           "vocab_size": VOCAB, "max_position_embeddings": 32, "tie_word_embeddings": true,
           "rms_norm_eps": 1e-5})
}

fn tensors() -> Vec<(String, Vec<usize>)> {
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN]),
        ("model.norm.weight".into(), vec![HIDDEN]),
    ];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("input_layernorm.weight", vec![HIDDEN]),
            ("post_attention_layernorm.weight", vec![HIDDEN]),
            ("self_attn.q_proj.weight", vec![HIDDEN, HIDDEN]),
            ("self_attn.k_proj.weight", vec![HIDDEN / 2, HIDDEN]),
            ("self_attn.v_proj.weight", vec![HIDDEN / 2, HIDDEN]),
            ("self_attn.o_proj.weight", vec![HIDDEN, HIDDEN]),
            ("mlp.gate_proj.weight", vec![INTER, HIDDEN]),
            ("mlp.up_proj.weight", vec![INTER, HIDDEN]),
            ("mlp.down_proj.weight", vec![HIDDEN, INTER]),
        ] {
            t.push((format!("{p}.{n}"), s));
        }
    }
    t
}

/// Writes a valid tiny model (no tokenizer) into `dir`.
fn write_model(dir: &Path, skip: Option<&str>) {
    std::fs::write(dir.join("config.json"), config().to_string()).unwrap();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors()
        .into_iter()
        .filter(|(n, _)| Some(n.as_str()) != skip)
        .enumerate()
        .map(|(i, (n, s))| {
            let numel: usize = s.iter().product();
            let bytes = (0..numel).flat_map(|j| (((i * 31 + j * 7) % 13) as f32 * 0.05 - 0.3).to_le_bytes()).collect();
            (n, s, bytes)
        })
        .collect();
    let views: Vec<_> = data
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir, &LoadOptions { no_tokenizer: true }) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn valid() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write_model(d.path(), None);
    d
}

#[test]
fn valid_model_loads_and_runs() {
    let d = valid();
    let m = Arc::new(Model::load(d.path(), &LoadOptions { no_tokenizer: true }).unwrap());
    let mut s = Session::new(m, &SessionOptions::default()).unwrap();
    let logits = s.eval(&[1, 2, 3]).unwrap();
    assert_eq!(logits.len(), VOCAB);
    assert!(logits.iter().all(|v| v.is_finite()));
}

#[test]
fn missing_directory_and_files() {
    let d = tempfile::tempdir().unwrap();
    let e = load_err(&d.path().join("nope"));
    assert!(e.contains("not a directory"), "{e}");
    let e = load_err(d.path());
    assert!(e.contains("config.json"), "{e}");
    std::fs::write(d.path().join("config.json"), config().to_string()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn truncated_weights() {
    let d = valid();
    let f = d.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors") && (e.contains("truncated") || e.contains("invalid")), "{e}");
    std::fs::write(&f, &bytes[..4]).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn lying_header() {
    let d = valid();
    let f = d.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    // Claim a dtype of a different size, keeping the offsets: header and data disagree.
    let lying = header.replacen("\"F32\"", "\"F16\"", 1);
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(lying.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&f, &out).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors"), "{e}");
    // A header length pointing past the end of the file.
    let mut out = bytes.clone();
    out[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&f, &out).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let d = tempfile::tempdir().unwrap();
    write_model(d.path(), Some("model.layers.0.mlp.up_proj.weight"));
    let e = load_err(d.path());
    assert!(e.contains("model.layers.0.mlp.up_proj.weight") && e.contains("missing"), "{e}");
}

#[test]
fn wrong_shape_is_named() {
    let d = valid();
    let mut c = config();
    c["intermediate_size"] = json!(48);
    std::fs::write(d.path().join("config.json"), c.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("gate_proj") && e.contains("[48, 16]") && e.contains("[32, 16]"), "{e}");
}

#[test]
fn config_problems_name_the_key() {
    let d = valid();
    let mut c = config();
    c.as_object_mut().unwrap().remove("num_hidden_layers");
    std::fs::write(d.path().join("config.json"), c.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("config.json") && e.contains("num_hidden_layers"), "{e}");

    let mut c = config();
    c["model_type"] = json!("falcon");
    std::fs::write(d.path().join("config.json"), c.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("falcon") && e.contains("model_type"), "{e}");

    std::fs::write(d.path().join("config.json"), "{\"model_type\": ").unwrap();
    let e = load_err(d.path());
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
}

#[test]
fn shard_missing_from_index() {
    let d = valid();
    std::fs::rename(d.path().join("model.safetensors"), d.path().join("model-00001-of-00002.safetensors")).unwrap();
    let mut map = serde_json::Map::new();
    for (i, (n, _)) in tensors().into_iter().enumerate() {
        let shard = if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        map.insert(n, json!(shard));
    }
    std::fs::write(d.path().join("model.safetensors.index.json"), json!({"weight_map": map}).to_string()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model-00002-of-00002.safetensors") && e.contains("missing"), "{e}");
}

#[test]
fn prompt_longer_than_context() {
    let d = valid();
    let m = Arc::new(Model::load(d.path(), &LoadOptions { no_tokenizer: true }).unwrap());
    let mut s = Session::new(m, &SessionOptions { n_ctx: 8, ..Default::default() }).unwrap();
    let e = s.eval(&[1; 9]).unwrap_err().to_string();
    assert!(e.contains("context") && e.contains('8'), "{e}");
    let e = s.eval(&[]).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    let e = s.eval(&[VOCAB as u32]).unwrap_err().to_string();
    assert!(e.contains("out of range"), "{e}");
    // The session is still usable after refused input.
    assert!(s.eval(&[1, 2]).is_ok());
}
