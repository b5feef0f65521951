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
    write_model_with(dir, skip, &[], |_, _| {})
}

/// [`write_model`] with `extra` tensors added and `edit(name, values)` applied to each tensor.
fn write_model_with(dir: &Path, skip: Option<&str>, extra: &[(&str, Vec<usize>)], edit: impl Fn(&str, &mut [f32])) {
    std::fs::write(dir.join("config.json"), config().to_string()).unwrap();
    let all = tensors().into_iter().chain(extra.iter().map(|(n, s)| (n.to_string(), s.clone())));
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = all
        .filter(|(n, _)| Some(n.as_str()) != skip)
        .enumerate()
        .map(|(i, (n, s))| {
            let numel: usize = s.iter().product();
            let mut values: Vec<f32> = (0..numel).map(|j| ((i * 31 + j * 7) % 13) as f32 * 0.05 - 0.3).collect();
            edit(&n, &mut values);
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
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

fn load(dir: &Path) -> Arc<Model> {
    Arc::new(Model::load(dir, &LoadOptions { no_tokenizer: true }).unwrap())
}

fn set_config(dir: &Path, key: &str, value: serde_json::Value) {
    let mut c = config();
    c[key] = value;
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
}

/// Writes a PEFT adapter on layer 0's q_proj whose lora_A is stored as `a_dtype` (bytes as given).
fn write_adapter(dir: &Path, cfg: serde_json::Value, a_dtype: safetensors::Dtype, a_bytes: Vec<u8>, b_value: f32) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let b: Vec<u8> = (0..HIDDEN * 2).flat_map(|_| b_value.to_le_bytes()).collect();
    let a_shape = vec![2, HIDDEN];
    let views = vec![
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string(),
            TensorView::new(a_dtype, a_shape, &a_bytes).unwrap(),
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".to_string(),
            TensorView::new(safetensors::Dtype::F32, vec![HIDDEN, 2], &b).unwrap(),
        ),
    ];
    std::fs::write(dir.join("adapter_model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
}

fn lora_config() -> serde_json::Value {
    json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "layers_to_transform": [0]})
}

fn f32_bytes(n: usize, v: f32) -> Vec<u8> {
    (0..n).flat_map(|_| v.to_le_bytes()).collect()
}

/// Issue 18, row 1: a non-float adapter tensor is refused by name and dtype when the file is
/// opened, so no command (generate, merge, the C API) computes with raw bytes.
#[test]
fn adapter_tensor_of_integer_dtype_is_refused_by_name() {
    let d = valid();
    let model = load(d.path());
    for dtype in [safetensors::Dtype::U8, safetensors::Dtype::I8] {
        let a = tempfile::tempdir().unwrap();
        write_adapter(a.path(), lora_config(), dtype, vec![3u8; 2 * HIDDEN], 0.1);
        let e = peftrt::adapter::AdapterFile::open(a.path()).err().expect("a U8/I8 lora_A must be refused").to_string();
        assert!(
            e.contains("q_proj.lora_A.weight") && e.contains(if dtype == safetensors::Dtype::U8 { "U8" } else { "I8" }),
            "{e}"
        );
        assert!(peftrt::Adapter::load(a.path(), &model).is_err());
        let out = a.path().join("merged");
        let merged = peftrt::merge::merge(d.path(), &[(a.path().to_path_buf(), 1.0)], &out, &Default::default());
        assert!(merged.is_err() && !out.exists(), "merge must refuse the adapter and write nothing");
    }
}

/// Issue 18, row 6: NaN adapter weights, an infinite lora_alpha and invalid pattern keys.
#[test]
fn adapter_values_and_keys_are_checked() {
    let a = tempfile::tempdir().unwrap();
    let mut nan = f32_bytes(2 * HIDDEN, 0.5);
    nan[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    write_adapter(a.path(), lora_config(), safetensors::Dtype::F32, nan, 0.1);
    let e = peftrt::adapter::AdapterFile::open(a.path()).err().expect("NaN weights").to_string();
    assert!(e.contains("lora_A.weight") && e.contains("NaN"), "{e}");

    let cases = [
        ("lora_alpha", json!(1e39), "lora_alpha"),
        ("peft_type", json!(3), "peft_type"),
        ("rank_pattern", json!({"q_proj(": 2}), "rank_pattern.q_proj("),
        ("alpha_pattern", json!({"[": 2.0}), "alpha_pattern.["),
        ("alpha_pattern", json!({"q_proj": 1e300}), "alpha_pattern.q_proj"),
    ];
    for (key, value, named) in cases {
        let mut cfg = lora_config();
        cfg[key] = value;
        write_adapter(a.path(), cfg, safetensors::Dtype::F32, f32_bytes(2 * HIDDEN, 0.5), 0.1);
        let e =
            peftrt::adapter::AdapterFile::open(a.path()).err().unwrap_or_else(|| panic!("{key} accepted")).to_string();
        assert!(e.contains(named) && e.contains("adapter_config.json"), "{key}: {e}");
    }
}

/// Issue 18, row 4: a layer count the weights do not have is an error before anything is
/// allocated per layer (2^31 layers used to abort on a 6 TB allocation).
#[test]
fn layer_count_must_match_the_weights() {
    let d = valid();
    for n in [json!(2147483648u64), json!(4294967295u64), json!(2)] {
        set_config(d.path(), "num_hidden_layers", n.clone());
        let e = load_err(d.path());
        assert!(e.contains("num_hidden_layers") && e.contains("hold 1"), "{n}: {e}");
    }
}

/// Issue 18, rows 6 and 8: config values that cannot be right are refused by key.
#[test]
fn config_values_are_validated() {
    let d = valid();
    let cases = [
        ("rms_norm_eps", json!(0.0), "rms_norm_eps"),
        ("rms_norm_eps", json!(-1e-5), "rms_norm_eps"),
        ("rope_theta", json!(0), "rope_theta"),
        ("rope_theta", json!(-10000.0), "rope_theta"),
        ("rope_theta", json!(1e39), "rope_theta"),
        ("rope_scaling", json!({"rope_type": "linear", "factor": 0.0}), "rope_scaling.factor"),
        ("rope_scaling", json!("linear"), "rope_scaling"),
        ("rope_scaling", json!([1, 2]), "rope_scaling"),
        ("rope_scaling", json!({"rope_type": 5, "factor": 2.0}), "rope_scaling.rope_type"),
        ("rope_scaling", json!({"rope_type": "yarn", "factor": 2.0}), "rope_scaling.rope_type"),
        (
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32}),
            "rope_scaling.high_freq_factor",
        ),
        ("eos_token_id", json!("two"), "eos_token_id"),
        ("eos_token_id", json!([1, "two"]), "eos_token_id"),
        ("eos_token_id", json!(VOCAB), "eos_token_id"),
        ("bos_token_id", json!(-1), "bos_token_id"),
        ("hidden_act", json!("relu"), "hidden_act"),
        ("hidden_act", json!(1), "hidden_act"),
    ];
    for (key, value, named) in cases {
        set_config(d.path(), key, value.clone());
        let e = load_err(d.path());
        assert!(e.contains("config.json") && e.contains(named), "{key} = {value}: {e}");
    }
    for act in ["silu", "gelu", "gelu_pytorch_tanh"] {
        set_config(d.path(), "hidden_act", json!(act));
        assert!(Model::load(d.path(), &LoadOptions { no_tokenizer: true }).is_ok(), "{act}");
    }
}

/// Issue 18, row 6: a NaN in a small tensor (norm, bias) is named at load; one in a large
/// weight makes the logits non-finite, which evaluation reports instead of sampling token 0.
#[test]
fn non_finite_weights_are_reported() {
    let d = tempfile::tempdir().unwrap();
    write_model_with(d.path(), None, &[], |n, v| {
        if n == "model.norm.weight" {
            v[3] = f32::NAN
        }
    });
    let e = load_err(d.path());
    assert!(e.contains("model.norm.weight") && e.contains("NaN"), "{e}");

    write_model_with(d.path(), None, &[], |n, v| {
        if n == "model.layers.0.mlp.down_proj.weight" {
            v[5] = f32::INFINITY
        }
    });
    let m = load(d.path());
    let mut s = Session::new(m.clone(), &SessionOptions { n_ctx: 16, ..Default::default() }).unwrap();
    let e = s.eval(&[1, 2, 3]).unwrap_err();
    assert!(matches!(e, peftrt::Error::NonFinite(_)), "{e}");
    assert!(e.to_string().contains("NaN or infinite"), "{e}");
    assert!(s.tokens().is_empty(), "a failed evaluation leaves the session as it was");
    let mut all = Vec::new();
    assert!(matches!(s.eval_all(&[1, 2], &mut all), Err(peftrt::Error::NonFinite(_))));
    assert!(all.is_empty());
    let out = tempfile::tempdir().unwrap();
    let q = out.path().join("q");
    let e = peftrt::quantize::quantize_model(d.path(), &q, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("down_proj") && !q.exists(), "{e}");
}

/// Issue 18, row 6: an adapter scale far out of range (-1e38 used to give constant logits,
/// token 0 forever) is refused by sessions and merge; a merge whose values overflow the output
/// dtype is refused by tensor name, and nothing is written.
#[test]
fn extreme_adapter_scale_is_refused() {
    let d = valid();
    let model = load(d.path());
    let a = tempfile::tempdir().unwrap();
    write_adapter(a.path(), lora_config(), safetensors::Dtype::F32, f32_bytes(2 * HIDDEN, 0.5), 0.5);
    let adapter = Arc::new(peftrt::Adapter::load(a.path(), &model).unwrap());
    let mut s = Session::new(model.clone(), &SessionOptions { n_ctx: 16, ..Default::default() }).unwrap();
    for scale in [-1e38, 1e4, f32::NAN, f32::INFINITY] {
        let e = s.set_adapters(&[(adapter.clone(), scale)]).unwrap_err().to_string();
        assert!(e.contains("scale") && e.contains("out of range"), "{e}");
    }
    s.set_adapters(&[(adapter, 1.0)]).unwrap();
    assert!(s.eval(&[1, 2, 3]).is_ok(), "a sane scale works");

    let out = a.path().join("merged");
    let e = peftrt::merge::merge(d.path(), &[(a.path().to_path_buf(), -1e38)], &out, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("scale"), "{e}");
    assert!(!out.exists());
    // B = 5e4 fits f32 but the merged q_proj does not fit F16.
    write_adapter(a.path(), lora_config(), safetensors::Dtype::F32, f32_bytes(2 * HIDDEN, 0.5), 5e4);
    let opts = peftrt::merge::MergeOptions { dtype: Some(peftrt::gguf::DType::F16), ..Default::default() };
    let e = peftrt::merge::merge(d.path(), &[(a.path().to_path_buf(), 1.0)], &out, &opts).unwrap_err().to_string();
    assert!(e.contains("q_proj.weight") && e.contains("F16"), "{e}");
    assert!(!out.exists());
}

/// Issue 18, row 5: absurd context, thread and token counts are clamped or refused, never an
/// abort.
#[test]
fn absurd_sizes_are_clamped_or_refused() {
    let d = valid();
    let m = load(d.path());
    let s = Session::new(m.clone(), &SessionOptions { n_ctx: 1 << 31, ..Default::default() }).unwrap();
    assert_eq!(s.n_ctx(), 32, "clamped to max_position_embeddings");
    for threads in [1usize << 40, usize::MAX] {
        let e = Session::new(m.clone(), &SessionOptions { n_threads: threads, ..Default::default() }).err().unwrap();
        assert!(e.to_string().contains("threads"), "{e}");
    }
    // max_tokens far beyond the context (it was a `with_capacity(max_tokens)`): generation
    // stops when the context is full.
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama");
    let m = Arc::new(Model::load(&tiny, &LoadOptions::default()).unwrap());
    let mut s = Session::new(m.clone(), &SessionOptions { n_ctx: 16, ..Default::default() }).unwrap();
    for max_tokens in [usize::MAX, 1_000_000_000_000] {
        s.reset();
        let params = peftrt::SamplingParams { max_tokens, ignore_eos: true, ..Default::default() };
        let mut sampler = peftrt::Sampler::new(params, m.config.vocab_size).unwrap();
        let g = peftrt::generate(&mut s, &[1, 2], &mut sampler, |_| true).unwrap();
        assert_eq!(g.stop, peftrt::StopReason::ContextFull);
        assert_eq!(g.tokens.len(), 15);
    }
}

/// Issue 18: a tensor removed from the header while its bytes remain was reported under the
/// name of the next tensor; the error now names both neighbours of the unclaimed bytes.
#[test]
fn tensor_missing_from_header_is_placed_between_its_neighbours() {
    let d = valid();
    let path = d.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let entries = header.as_object().unwrap();
    let mut spans: Vec<(u64, String)> = entries
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (v["data_offsets"][0].as_u64().unwrap(), k.clone()))
        .collect();
    spans.sort();
    let (before, gone, after) = (spans[2].1.clone(), spans[3].1.clone(), spans[4].1.clone());
    header.as_object_mut().unwrap().remove(&gone);
    let mut text = header.to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    let e = load_err(d.path());
    assert!(e.contains(&format!("`{before}`")) && e.contains(&format!("`{after}`")) && e.contains("missing"), "{e}");
}
