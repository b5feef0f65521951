//! NF4 bases (tests/fixtures/nf4, made by scripts/make_nf4_fixtures.py with bitsandbytes):
//! a tiny llama quantised and saved by transformers + bitsandbytes, run without expanding it,
//! against transformers' logits; a PEFT adapter on it (QLoRA serving); merging onto it.

use peftrt::merge::MergeOptions;
use peftrt::{generate, Adapter, LoadOptions, Model, Sampler, SamplingParams, Session, SessionOptions};
use peftrt_conformance::{assert_logits_close, fixture, Reference};
use std::sync::Arc;

fn nf4_model() -> Arc<Model> {
    Arc::new(Model::load(&fixture("nf4/tiny-llama-nf4"), &LoadOptions::default()).unwrap())
}

fn reference() -> Reference {
    Reference::load(&fixture("nf4/reference.safetensors")).unwrap()
}

fn logits(model: &Arc<Model>, adapters: &[(Arc<Adapter>, f32)], tokens: &[u32], threads: usize) -> Vec<f32> {
    let mut s = Session::new(model.clone(), &SessionOptions { n_ctx: 128, n_batch: 16, n_threads: threads }).unwrap();
    s.set_adapters(adapters).unwrap();
    let mut out = Vec::new();
    s.eval_all(tokens, &mut out).unwrap();
    out
}

#[test]
fn bitsandbytes_checkpoint_matches_transformers() {
    let m = nf4_model();
    assert_eq!(m.linears().filter(|l| l.nf4.is_some()).count(), 14, "every decoder linear is 4-bit");
    let r = reference();
    let tokens = r.tokens("tokens_b");
    for threads in [1, 2] {
        assert_logits_close(
            &format!("tiny-llama-nf4 ({threads} threads)"),
            &logits(&m, &[], &tokens, threads),
            r.logits("logits_b"),
        );
    }
    // One token at a time (the fused matvec kernel) equals the batched pass (dequantised tiles).
    let mut s = Session::new(m.clone(), &SessionOptions { n_ctx: 128, n_batch: 16, n_threads: 2 }).unwrap();
    let mut got = Vec::new();
    for &t in &tokens {
        s.eval_all(&[t], &mut got).unwrap();
    }
    assert_logits_close("tiny-llama-nf4 token by token", &got, r.logits("logits_b"));

    let expected = r.tokens("greedy_a");
    let mut s = Session::new(m.clone(), &SessionOptions::default()).unwrap();
    let params = SamplingParams { max_tokens: expected.len(), ignore_eos: true, ..Default::default() };
    let mut sampler = Sampler::new(params, m.config.vocab_size).unwrap();
    let g = generate(&mut s, &r.tokens("tokens_a"), &mut sampler, |_| true).unwrap();
    assert_eq!(g.tokens, expected, "greedy continuation on the NF4 base");
}

#[test]
fn qlora_adapter_on_the_nf4_base_matches_peft() {
    let m = nf4_model();
    let r = reference();
    let a = Arc::new(Adapter::load(&fixture("nf4/llama-nf4-qvd"), &m).unwrap());
    assert_logits_close("NF4 + LoRA", &logits(&m, &[(a, 1.0)], &r.tokens("tokens_b"), 2), r.logits("logits_b_lora"));
}

/// Merging onto an NF4 base merges into the dequantised weights and writes a float model.
#[test]
fn merge_onto_nf4_base_writes_the_dequantised_floats() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let s = peftrt::merge::merge(
        &fixture("nf4/tiny-llama-nf4"),
        &[(fixture("nf4/llama-nf4-qvd"), 1.0)],
        &out,
        &MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(s.merged_layers, 6);
    let merged = Arc::new(Model::load(&out, &LoadOptions::default()).unwrap());
    assert!(merged.linears().all(|l| l.nf4.is_none()), "the merged model is float");
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(!config.contains("quantization_config"), "{config}");
    assert_logits_close(
        "merged NF4 + LoRA",
        &logits(&merged, &[], &r.tokens("tokens_b"), 2),
        r.logits("logits_b_lora"),
    );
}
