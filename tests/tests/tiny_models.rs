//! The runtime against transformers on tiny random models (tests/fixtures, made by
//! scripts/make_fixtures.py): logits at every position, KV-cache decoding, greedy
//! continuations, chat template rendering and tokenization.

use peftrt::{generate, LoadOptions, Message, Model, Sampler, SamplingParams, Session, SessionOptions};
use peftrt_conformance::{assert_logits_within, fixture, tol_for, Reference};
use std::sync::Arc;

const FIXTURES: [&str; 8] = [
    "tiny-llama",
    "tiny-llama-bf16",
    "tiny-llama-f16",
    "tiny-llama3-tied",
    "tiny-mistral",
    "tiny-qwen2",
    // GeGLU MLPs (hidden_act gelu / gelu_pytorch_tanh): issue 18, row 7.
    "tiny-llama-gelu",
    "tiny-llama-gelu-tanh",
];

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
                assert_logits_within(
                    &format!("{name} {case} ({threads} threads)"),
                    &all_logits(&mut s, &tokens),
                    expected,
                    tol_for(name.contains("bf16")),
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
        let tol = tol_for(name.contains("bf16"));
        assert_logits_within(&format!("{name} incremental"), &got, r.logits("logits_incremental"), tol);
        assert_logits_within(&format!("{name} incremental vs one pass"), &got, r.logits("logits_b"), tol);
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

/// Perplexity with one window equals the one computed from transformers' logits; sliding
/// windows score every token once.
#[test]
fn perplexity_matches_transformers_logits() {
    let (model, r) = load("tiny-llama");
    let tokens = r.tokens("tokens_b");
    let logits = r.logits("logits_b");
    let vocab = model.config.vocab_size;
    let nll: f64 = (1..tokens.len())
        .map(|t| {
            let row = &logits[(t - 1) * vocab..t * vocab];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
            lse - row[tokens[t] as usize] as f64
        })
        .sum();
    let want = (nll / (tokens.len() - 1) as f64).exp();
    let mut s = session(&model, 0, 2);
    let p = peftrt::perplexity::perplexity(&mut s, &tokens, 128, 64, |_, _| {}).unwrap();
    assert_eq!((p.n_scored, p.windows), (tokens.len() - 1, 1));
    assert!((p.ppl() - want).abs() <= 1e-4 * want, "perplexity {} vs {want} from transformers' logits", p.ppl());
    // Windows of 16 every 8 tokens: each window re-reads its tokens and scores those the
    // previous window did not, recomputed here window by window.
    let mut calls = 0;
    let w = peftrt::perplexity::perplexity(&mut s, &tokens, 16, 8, |_, _| calls += 1).unwrap();
    assert_eq!(w.n_scored, tokens.len() - 1);
    assert_eq!((w.windows, calls), (tokens.len().div_ceil(8) - 1, w.windows));
    let mut nll = 0.0;
    let (mut begin, mut prev_end) = (0, 1);
    loop {
        let end = (begin + 16).min(tokens.len());
        s.reset();
        let l = all_logits(&mut s, &tokens[begin..end]);
        for t in prev_end..end {
            let row = &l[(t - 1 - begin) * vocab..(t - begin) * vocab];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            nll += max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() - row[tokens[t] as usize] as f64;
        }
        if end == tokens.len() {
            break;
        }
        (begin, prev_end) = (begin + 8, end);
    }
    assert!((w.nll - nll).abs() <= 1e-9 * nll, "{} vs {nll}", w.nll);
}

/// A set cancel flag stops `eval` and `eval_all` before the next layer with
/// `Error::Cancelled` and leaves the session as before the call; once cleared, the session
/// continues as if the cancelled call never happened (issue #5: cancel from another thread).
#[test]
fn cancel_flag_stops_eval_and_keeps_the_session() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (m, r) = load("tiny-llama");
    let tokens = r.tokens("tokens_b");
    let (head, tail) = tokens.split_at(tokens.len() / 2);
    let mut plain = session(&m, 4, 1);
    let mut want = all_logits(&mut plain, head);
    plain.eval_all(tail, &mut want).unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let mut s = session(&m, 4, 1);
    s.set_cancel_flag(Some(flag.clone()));
    let mut got = Vec::new();
    s.eval_all(head, &mut got).unwrap();
    flag.store(true, Ordering::Relaxed);
    assert!(matches!(s.eval(tail), Err(peftrt::Error::Cancelled)));
    let mut out = got.clone();
    assert!(matches!(s.eval_all(tail, &mut out), Err(peftrt::Error::Cancelled)));
    assert_eq!(out, got, "a cancelled eval_all leaves its output as it was");
    assert_eq!(s.tokens(), head, "a cancelled eval leaves the cached tokens as they were");
    flag.store(false, Ordering::Relaxed);
    s.eval_all(tail, &mut got).unwrap();
    assert_eq!(got, want, "after a cancel the session continues exactly");
}
