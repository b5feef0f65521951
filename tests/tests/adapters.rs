//! Unmerged LoRA adapters against PEFT (tests/fixtures/adapters, made by
//! scripts/make_adapter_fixtures.py): q/v only, all-linear with rsLoRA, rank/alpha patterns,
//! layers_to_transform, qwen2 with biases, two adapters at once with different scales, and
//! PEFT's merge_and_unload result.

use peftrt::merge::MergeOptions;
use peftrt::{Adapter, LoadOptions, Model, Session, SessionOptions};
use peftrt_conformance::{assert_logits_close, fixture, Reference};
use std::sync::Arc;

fn model(name: &str) -> Arc<Model> {
    Arc::new(Model::load(&fixture(name), &LoadOptions { no_tokenizer: true }).unwrap())
}

fn reference() -> Reference {
    Reference::load(&fixture("adapters/reference.safetensors")).unwrap()
}

fn logits(model: &Arc<Model>, adapters: &[(Arc<Adapter>, f32)], tokens: &[u32]) -> Vec<f32> {
    peftrt_conformance::session_logits(model, adapters, tokens, 2)
}

#[test]
fn single_adapters_match_peft() {
    let r = reference();
    for (name, base) in [
        ("llama-qv", "tiny-llama"),
        ("llama-all-rslora", "tiny-llama"),
        ("llama-patterns", "tiny-llama"),
        ("llama-layers", "tiny-llama"),
        ("llama-dora", "tiny-llama"),
        ("qwen2-qkvo", "tiny-qwen2"),
    ] {
        let m = model(base);
        let tokens = r.tokens(&format!("tokens_b_{}", base.replace('-', "_")));
        let a = Arc::new(Adapter::load(&fixture(&format!("adapters/{name}")), &m).unwrap());
        let got = logits(&m, &[(a.clone(), 1.0)], &tokens);
        assert_logits_close(&format!("{name} unmerged"), &got, r.logits(&format!("logits_{}", name.replace('-', "_"))));
        // Scale 0 is exactly off.
        let off = logits(&m, &[(a, 0.0)], &tokens);
        assert_eq!(off, logits(&m, &[], &tokens), "{name}: scale 0 must equal the base model");
    }
}

/// DoRA's row norm `‖W + s·B·A‖` depends on the scale: a session's scale must reach it.
#[test]
fn dora_at_another_scale_matches_peft() {
    let r = reference();
    let m = model("tiny-llama");
    let tokens = r.tokens("tokens_b_tiny_llama");
    let a = Arc::new(Adapter::load(&fixture("adapters/llama-dora"), &m).unwrap());
    assert!(a.dora);
    assert_logits_close("llama-dora ×0.5", &logits(&m, &[(a, 0.5)], &tokens), r.logits("logits_llama_dora_half"));
}

#[test]
fn two_adapters_with_scales_match_peft() {
    let r = reference();
    let m = model("tiny-llama");
    let tokens = r.tokens("tokens_b_tiny_llama");
    let qv = Arc::new(Adapter::load(&fixture("adapters/llama-qv"), &m).unwrap());
    let all = Arc::new(Adapter::load(&fixture("adapters/llama-all-rslora"), &m).unwrap());
    let got = logits(&m, &[(qv, 1.0), (all, 0.5)], &tokens);
    assert_logits_close("llama-qv ×1 + llama-all-rslora ×0.5", &got, r.logits("logits_two_llama"));
}

#[test]
fn peft_merged_model_matches_unmerged() {
    let r = reference();
    let merged = model("adapters/merged-llama-qv");
    let tokens = r.tokens("tokens_b_tiny_llama");
    assert_logits_close("merged-llama-qv", &logits(&merged, &[], &tokens), r.logits("logits_merged_llama_qv"));
    let m = model("tiny-llama");
    let qv = Arc::new(Adapter::load(&fixture("adapters/llama-qv"), &m).unwrap());
    assert_logits_close(
        "unmerged vs PEFT merged",
        &logits(&m, &[(qv, 1.0)], &tokens),
        r.logits("logits_merged_llama_qv"),
    );
}

#[test]
fn wrong_base_and_unsupported_adapters_are_refused_clearly() {
    // tiny-llama3-tied has head_dim 32: its q_proj is [128, 64], the adapter's B is [64, 8].
    let wider = model("tiny-llama3-tied");
    let e =
        Adapter::load(&fixture("adapters/llama-qv"), &wider).err().expect("adapter on a different base").to_string();
    assert!(e.contains("does not match this base model") && e.contains("[128, 8]") && e.contains("[64, 8]"), "{e}");
    let llama = model("tiny-llama");
    let other = model("tiny-llama");
    let a = Arc::new(Adapter::load(&fixture("adapters/llama-qv"), &other).unwrap());
    let mut s = Session::new(llama, &SessionOptions::default()).unwrap();
    let e = s.set_adapters(&[(a, 1.0)]).unwrap_err().to_string();
    assert!(e.contains("different model"), "{e}");
}

/// A copy of the llama-qv adapter in a temporary directory, to corrupt.
fn scratch_adapter() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture("adapters/llama-qv").join(f), d.path().join(f)).unwrap();
    }
    d
}

fn load_err(dir: &std::path::Path) -> String {
    let m = model("tiny-llama");
    match Adapter::load(dir, &m) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

/// Rewrites adapter_model.safetensors keeping only the tensors `keep` accepts.
fn filter_tensors(dir: &std::path::Path, keep: impl Fn(&str) -> bool) {
    let p = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st.tensors().into_iter().filter(|(n, _)| keep(n)).collect();
    std::fs::write(&p, safetensors::serialize(kept, None).unwrap()).unwrap();
}

#[test]
fn bad_adapters_give_clear_errors() {
    let d = scratch_adapter();
    edit_config(d.path(), |v| v["r"] = 4.into());
    let e = load_err(d.path());
    assert!(e.contains("lora_A") && e.contains("rank 4") && e.contains("[8, 64]"), "{e}");

    let d = scratch_adapter();
    edit_config(d.path(), |v| v["peft_type"] = "IA3".into());
    let e = load_err(d.path());
    assert!(e.contains("IA3") && e.contains("peft_type"), "{e}");

    let d = scratch_adapter();
    std::fs::write(d.path().join("adapter_config.json"), "{ not json").unwrap();
    let e = load_err(d.path());
    assert!(e.contains("adapter_config.json") && e.contains("JSON"), "{e}");

    let d = scratch_adapter();
    filter_tensors(d.path(), |n| !(n.contains("layers.1.self_attn.v_proj") && n.contains("lora_B")));
    let e = load_err(d.path());
    assert!(e.contains("layers.1.self_attn.v_proj") && e.contains("incomplete"), "{e}");

    let d = scratch_adapter();
    filter_tensors(d.path(), |n| !(n.contains("layers.0.self_attn.q_proj") && n.contains("lora_A")));
    let e = load_err(d.path());
    assert!(e.contains("layers.0.self_attn.q_proj") && e.contains("lora_A"), "{e}");

    let d = scratch_adapter();
    let p = d.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 64]).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("adapter_model.safetensors"), "{e}");

    let d = scratch_adapter();
    std::fs::rename(d.path().join("adapter_model.safetensors"), d.path().join("adapter_model.bin")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("pickle") && e.contains("safetensors"), "{e}");
}

#[test]
fn unknown_target_module_is_named() {
    let d = scratch_adapter();
    let p = d.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qkv_proj"), v))
        .collect();
    std::fs::write(&p, safetensors::serialize(renamed, None).unwrap()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.layers.1.self_attn.qkv_proj") && e.contains("does not have"), "{e}");
}

#[test]
fn target_modules_must_agree_with_the_base_and_the_tensors() {
    // A target the base does not have (a GPT-2 name).
    let d = scratch_adapter();
    edit_config(d.path(), |v| v["target_modules"] = serde_json::json!(["q_proj", "v_proj", "c_attn"]));
    let e = load_err(d.path());
    assert!(e.contains("target_modules") && e.contains("`c_attn`") && e.contains("matches no linear layer"), "{e}");

    // Weights for a module the config does not select.
    let d = scratch_adapter();
    edit_config(d.path(), |v| v["target_modules"] = serde_json::json!(["q_proj"]));
    let e = load_err(d.path());
    assert!(e.contains("v_proj") && e.contains("do not select"), "{e}");

    // A selected module without weights (layers_to_transform widened).
    let d = scratch_adapter();
    edit_config(d.path(), |v| v["target_modules"] = serde_json::json!(".*\\.(q|v|o)_proj"));
    let e = load_err(d.path());
    assert!(e.contains("o_proj") && e.contains("no weights"), "{e}");

    // A DoRA magnitude in a plain LoRA adapter, and DoRA without its magnitudes.
    let d = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture("adapters/llama-dora").join(f), d.path().join(f)).unwrap();
    }
    edit_config(d.path(), |v| v["use_dora"] = false.into());
    let e = load_err(d.path());
    assert!(e.contains("lora_magnitude_vector") && e.contains("use_dora"), "{e}");
    edit_config(d.path(), |v| v["use_dora"] = true.into());
    filter_tensors(d.path(), |n| !(n.contains("layers.0.mlp.down_proj") && n.contains("magnitude")));
    let e = load_err(d.path());
    assert!(e.contains("layers.0.mlp.down_proj.lora_magnitude_vector") && e.contains("missing"), "{e}");

    // LoRA on embeddings.
    let d = scratch_adapter();
    let p = d.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let (_, v) = tensors[0].clone();
    tensors.push(("base_model.model.model.embed_tokens.lora_embedding_A".into(), v));
    std::fs::write(&p, safetensors::serialize(tensors, None).unwrap()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("lora_embedding_A") && e.contains("embedding layer"), "{e}");
}

/// Rewrites adapter_model.safetensors with `metadata` in its header.
fn set_metadata(dir: &std::path::Path, metadata: std::collections::HashMap<String, String>) {
    let p = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    std::fs::write(&p, safetensors::serialize(st.tensors(), Some(metadata)).unwrap()).unwrap();
}

#[test]
fn recorded_base_fingerprint_is_enforced() {
    use peftrt::adapter::{AdapterOptions, BaseFingerprint, BASE_FINGERPRINT_KEY};
    let llama = model("tiny-llama");
    // A "fine-tune" of tiny-llama: the same shapes, the embeddings moved by 3%.
    let tuned_dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-llama").join(f), tuned_dir.path().join(f)).unwrap();
    }
    let p = tuned_dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let emb: Vec<u8> = st
        .tensor("model.embed_tokens.weight")
        .unwrap()
        .data()
        .chunks_exact(4)
        .flat_map(|b| (f32::from_le_bytes(b.try_into().unwrap()) * 1.03).to_le_bytes())
        .collect();
    let mut tensors = st.tensors();
    let i = tensors.iter().position(|(n, _)| n == "model.embed_tokens.weight").unwrap();
    let shape = tensors[i].1.shape().to_vec();
    tensors[i].1 = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &emb).unwrap();
    std::fs::write(&p, safetensors::serialize(tensors, None).unwrap()).unwrap();
    let tuned = model_at(tuned_dir.path());
    let fl = BaseFingerprint::of(&llama);
    // The same model in bf16 still matches; the fine-tune and another architecture do not.
    assert_eq!(fl.check(&BaseFingerprint::of(&model("tiny-llama-bf16"))), Ok(()));
    assert!(fl.check(&BaseFingerprint::of(&tuned)).unwrap_err().contains("sampled weights differ"));
    assert!(fl.check(&BaseFingerprint::of(&model("tiny-mistral"))).unwrap_err().contains("architecture"));

    let d = scratch_adapter();
    set_metadata(d.path(), [(BASE_FINGERPRINT_KEY.to_string(), fl.to_json())].into());
    Adapter::load(d.path(), &llama).expect("the adapter's own base");
    let e = Adapter::load(d.path(), &tuned).err().expect("a different base").to_string();
    assert!(e.contains("different base model") && e.contains("sampled weights differ") && e.contains("allow"), "{e}");
    let opts = AdapterOptions { allow_base_mismatch: true, ..Default::default() };
    Adapter::load_with(d.path(), &tuned, &opts).expect("explicitly allowed");

    set_metadata(d.path(), [(BASE_FINGERPRINT_KEY.to_string(), "{\"version\": 1}".to_string())].into());
    let e = Adapter::load(d.path(), &llama).err().expect("malformed fingerprint").to_string();
    assert!(e.contains(BASE_FINGERPRINT_KEY) && e.contains("malformed"), "{e}");
}

#[test]
fn registry_unloads_only_unused_adapters() {
    use peftrt::adapter::{AdapterOptions, AdapterRegistry};
    let m = model("tiny-llama");
    let mut reg = AdapterRegistry::new(m.clone());
    let qv = reg.load("qv", &fixture("adapters/llama-qv"), &AdapterOptions::default()).unwrap();
    assert!(reg.load("qv", &fixture("adapters/llama-qv"), &AdapterOptions::default()).is_err(), "duplicate name");
    let mut s = Session::new(m, &SessionOptions { n_ctx: 32, n_batch: 8, n_threads: 1 }).unwrap();
    s.set_adapters(&[(qv, 1.0)]).unwrap();
    let e = reg.unload("qv").unwrap_err().to_string();
    assert!(e.contains("still held by 1"), "{e}");
    s.set_adapters(&[]).unwrap();
    reg.unload("qv").unwrap();
    assert_eq!(reg.names().count(), 0);
    assert!(reg.unload("qv").is_err());
}

/// A refused adapter leaves the model and its sessions as they were.
#[test]
fn refused_adapter_leaves_sessions_unaffected() {
    let r = reference();
    let m = model("tiny-llama");
    let tokens = r.tokens("tokens_b_tiny_llama");
    let qv = Arc::new(Adapter::load(&fixture("adapters/llama-qv"), &m).unwrap());
    let mut s = Session::new(m.clone(), &SessionOptions { n_ctx: 128, n_batch: 16, n_threads: 2 }).unwrap();
    s.set_adapters(&[(qv, 1.0)]).unwrap();
    let d = scratch_adapter();
    edit_config(d.path(), |v| v["r"] = 2.into());
    assert!(Adapter::load(d.path(), &m).is_err());
    let mut out = Vec::new();
    s.eval_all(&tokens, &mut out).unwrap();
    assert_logits_close("llama-qv after a refused load", &out, r.logits("logits_llama_qv"));
}

/// `peftrt merge` equals PEFT's `merge_and_unload`, and the merged directory runs as a model.
#[test]
fn merged_model_matches_peft_merge() {
    let r = reference();
    let tokens = r.tokens("tokens_b_tiny_llama");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let s = peftrt::merge::merge(
        &fixture("tiny-llama"),
        &[(fixture("adapters/llama-qv"), 1.0)],
        &out,
        &MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(s.merged_layers, 4, "q and v of two layers");
    let merged = Arc::new(Model::load(&out, &LoadOptions::default()).unwrap());
    assert_logits_close(
        "peftrt merge vs PEFT merge_and_unload",
        &logits(&merged, &[], &tokens),
        r.logits("logits_merged_llama_qv"),
    );

    // Two adapters with scales, merged, equal the same two applied unmerged.
    let out2 = dir.path().join("merged2");
    let specs = [(fixture("adapters/llama-qv"), 1.0), (fixture("adapters/llama-all-rslora"), 0.5)];
    peftrt::merge::merge(&fixture("tiny-llama"), &specs, &out2, &MergeOptions::default()).unwrap();
    let merged2 = model_at(&out2);
    assert_logits_close("merged two adapters", &logits(&merged2, &[], &tokens), r.logits("logits_two_llama"));

    // DoRA merged (each row rescaled to its magnitude) equals DoRA unmerged.
    let out_dora = dir.path().join("merged-dora");
    peftrt::merge::merge(
        &fixture("tiny-llama"),
        &[(fixture("adapters/llama-dora"), 1.0)],
        &out_dora,
        &MergeOptions::default(),
    )
    .unwrap();
    assert_logits_close("merged DoRA", &logits(&model_at(&out_dora), &[], &tokens), r.logits("logits_llama_dora"));

    // An existing output directory is refused; a refused adapter leaves nothing behind.
    assert!(peftrt::merge::merge(&fixture("tiny-llama"), &specs, &out2, &MergeOptions::default()).is_err());
    let out3 = dir.path().join("merged3");
    let broken = scratch_adapter();
    edit_config(broken.path(), |v| v["r"] = 2.into());
    assert!(peftrt::merge::merge(
        &fixture("tiny-llama"),
        &[(broken.path().to_path_buf(), 1.0)],
        &out3,
        &MergeOptions::default()
    )
    .is_err());
    assert!(!out3.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3, "no temporary directory left behind");
}

fn model_at(dir: &std::path::Path) -> Arc<Model> {
    Arc::new(Model::load(dir, &LoadOptions { no_tokenizer: true }).unwrap())
}

/// On a BF16 base the adapters run as that base does (in bf16, on hosts with bf16 dot
/// products): PEFT in f32 on the same BF16 weights still matches within the BF16 tolerance,
/// LoRA and DoRA alike, and a scale of 0 is still exactly the base.
#[test]
fn adapters_on_a_bf16_base_match_peft() {
    let r = reference();
    let m = model("tiny-llama-bf16");
    let tokens = r.tokens("tokens_b_tiny_llama_bf16");
    for name in ["llama-all-rslora", "llama-dora"] {
        let a = Arc::new(Adapter::load(&fixture(&format!("adapters/{name}")), &m).unwrap());
        let key = format!("logits_{}_on_bf16", name.replace('-', "_"));
        peftrt_conformance::assert_logits_within(
            &format!("{name} on tiny-llama-bf16"),
            &logits(&m, &[(a.clone(), 1.0)], &tokens),
            r.logits(&key),
            peftrt_conformance::tol_for(true),
        );
        assert_eq!(logits(&m, &[(a, 0.0)], &tokens), logits(&m, &[], &tokens), "{name}: scale 0 on bf16");
    }
}
