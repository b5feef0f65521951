//! The runtime against transformers on tiny random models (tests/fixtures, made by
//! scripts/make_fixtures.py): logits at every position, KV-cache decoding, greedy
//! continuations, chat template rendering and tokenization.

use peftrt::{generate, LoadOptions, Message, Model, Sampler, SamplingParams, Session, SessionOptions};
use peftrt_conformance::{assert_logits_close, fixture, Reference};
use std::sync::Arc;

const FIXTURES: [&str; 6] =
    ["tiny-llama", "tiny-llama-bf16", "tiny-llama-f16", "tiny-llama3-tied", "tiny-mistral", "tiny-qwen2"];

fn load(name: &str) -> (Arc<Model>, Reference) {
    let dir = fixture(name);
    let model = Model::load(&dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let reference = Reference::load(&dir.join("reference.safetensors")).unwrap();
    (Arc::new(model), reference)
}

fn session(model: &Arc<Model>, n_batch: usize, n_threads: usize) -> Session {
    Session::new(model.clone(), &SessionOptions { n_ctx: 128, n_batch, n_threads }).unwrap()
}

fn all_logits(s: &mut Session, tokens: &[u32]) -> Vec<f32> {
    let mut out = Vec::new();
    s.eval_all(tokens, &mut out).unwrap();
    out
}

#[test]
fn logits_match_transformers() {
    for name in FIXTURES {
        let (model, r) = load(name);
        for case in ["a", "b", "chat"] {
            let tokens = r.tokens(&format!("tokens_{case}"));
            let expected = r.logits(&format!("logits_{case}"));
            for threads in [1, 2] {
                let mut s = session(&model, 0, threads);
                assert_logits_close(
                    &format!("{name} {case} ({threads} threads)"),
                    &all_logits(&mut s, &tokens),
                    expected,
                );
            }
        }
    }
}

/// Prefill in uneven batches, then one token at a time: the KV cache must give the same
/// logits as one pass over everything.
#[test]
fn kv_cache_decoding_matches() {
    for name in FIXTURES {
        let (model, r) = load(name);
        let tokens = r.tokens("tokens_b");
        let prefix: usize = r.metadata["incremental_prefix"].parse().unwrap();
        let mut s = session(&model, 7, 2);
        let mut got = all_logits(&mut s, &tokens[..prefix]);
        for &t in &tokens[prefix..] {
            s.eval_all(&[t], &mut got).unwrap();
        }
        assert_logits_close(&format!("{name} incremental"), &got, r.logits("logits_incremental"));
        assert_logits_close(&format!("{name} incremental vs one pass"), &got, r.logits("logits_b"));
    }
}

#[test]
fn greedy_continuations_are_identical() {
    for name in FIXTURES {
        let (model, r) = load(name);
        let prompt = r.tokens("tokens_a");
        let expected = r.tokens("greedy_a");
        let mut s = session(&model, 0, 2);
        let params = SamplingParams { max_tokens: expected.len(), ignore_eos: true, ..Default::default() };
        let mut sampler = Sampler::new(params, model.config.vocab_size).unwrap();
        let g = generate(&mut s, &prompt, &mut sampler, |_| true).unwrap();
        assert_eq!(g.tokens, expected, "{name}: greedy continuation differs from transformers");
    }
}

#[test]
fn chat_template_and_tokenizer_match() {
    for name in FIXTURES {
        let (model, r) = load(name);
        let tok = model.tokenizer().unwrap();
        let msgs = [
            Message::new("system", "You are a helpful assistant."),
            Message::new("user", "What is the capital of France?"),
        ];
        let rendered = tok.apply_chat_template(&msgs, true).unwrap();
        assert_eq!(rendered, r.metadata["chat_prompt"], "{name}: chat template renders differently");
        assert_eq!(tok.encode(&rendered, false).unwrap(), r.tokens("tokens_chat"), "{name}: chat tokens");
        assert_eq!(tok.encode(&r.metadata["text_a"], false).unwrap(), r.tokens("tokens_a"), "{name}: text_a tokens");
        assert_eq!(tok.encode(&r.metadata["text_b"], false).unwrap(), r.tokens("tokens_b"), "{name}: text_b tokens");
    }
}
