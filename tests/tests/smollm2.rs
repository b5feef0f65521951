//! SmolLM2-135M-Instruct, imported from its GGUF by `peftrt import`, against transformers
//! loading the same GGUF (scripts/smollm2_reference.py): logits on a plain, a code and a
//! chat-templated prompt, 32-token greedy continuations, chat rendering and tokenization.
//! `make test` provides the model and the reference; plain `cargo test` skips without them.

use peftrt::{generate, LoadOptions, Message, Model, Sampler, SamplingParams, Session, SessionOptions};
use peftrt_conformance::{assert_logits_close, real_model_path, Reference};
use std::sync::Arc;

const CASES: [&str; 3] = ["text", "code", "chat"];

fn setup() -> Option<(Arc<Model>, Reference)> {
    let dir = real_model_path("PEFTRT_SMOLLM2_DIR", "smollm2-135m-instruct")?;
    let refs = real_model_path("PEFTRT_SMOLLM2_REF_DIR", "reference")?;
    let model = Model::load(&dir, &LoadOptions::default()).expect("load the imported SmolLM2");
    let r = Reference::load(&refs.join("smollm2_reference.safetensors")).expect("reference logits");
    Some((Arc::new(model), r))
}

#[test]
fn logits_and_greedy_match_transformers() {
    let Some((model, r)) = setup() else { return };
    let mut s = Session::new(model.clone(), &SessionOptions { n_ctx: 256, ..Default::default() }).unwrap();
    for case in CASES {
        let tokens = r.tokens(&format!("tokens_{case}"));
        s.reset();
        let mut logits = Vec::new();
        s.eval_all(&tokens, &mut logits).unwrap();
        assert_logits_close(&format!("smollm2 {case}"), &logits, r.logits(&format!("logits_{case}")));

        let expected = r.tokens(&format!("greedy_{case}"));
        s.reset();
        let params = SamplingParams { max_tokens: expected.len(), ignore_eos: true, ..Default::default() };
        let mut sampler = Sampler::new(params, model.config.vocab_size).unwrap();
        let g = generate(&mut s, &tokens, &mut sampler, |_| true).unwrap();
        assert_eq!(g.tokens, expected, "smollm2 {case}: greedy continuation differs from transformers");
    }
}

#[test]
fn chat_template_and_prompt_tokens_match() {
    let Some((model, r)) = setup() else { return };
    let tok = model.tokenizer().unwrap();
    let msgs = [Message::new("user", "Explain what a neural network is in simple terms.")];
    let rendered = tok.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(rendered, r.metadata["chat_prompt"], "chat template renders differently from transformers");
    assert_eq!(tok.encode(&rendered, false).unwrap(), r.tokens("tokens_chat"));
    for case in ["text", "code"] {
        let text = &r.metadata[&format!("prompt_{case}")];
        assert_eq!(
            tok.encode(text, false).unwrap(),
            r.tokens(&format!("tokens_{case}")),
            "tokens of the {case} prompt"
        );
    }
}

/// Perplexity of data/public-domain.txt (windows of 512 every 256, transformers' ids) against
/// transformers' on the same file dequantised to float32 (`perplexity` in the reference, from
/// scripts/perplexity_transformers.py's recipe): the F32 import and the Q4_1 file run natively
/// agree with it to 1e-5 relative (prefill multiplies the exactly dequantised weights in f32).
#[test]
fn perplexity_matches_transformers_natively_and_imported() {
    let Some((imported, r)) = setup() else { return };
    let want: f64 = r.metadata["perplexity"].parse().unwrap();
    let tokens = r.tokens("tokens_ppl");
    let gguf = real_model_path("PEFTRT_SMOLLM2_GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf");
    let native = gguf.map(|g| Arc::new(Model::load(&g, &LoadOptions { no_tokenizer: true }).unwrap()));
    for (what, model) in [("F32 import", Some(imported)), ("Q4_1 native", native)] {
        let Some(model) = model else { continue };
        let mut s = Session::new(model, &SessionOptions { n_ctx: 512, n_batch: 64, n_threads: 2 }).unwrap();
        let got = peftrt::perplexity::perplexity(&mut s, &tokens, 512, 256, |_, _| {}).unwrap();
        assert_eq!(got.n_scored, tokens.len() - 1);
        let rel = (got.ppl() / want - 1.0).abs();
        eprintln!("{what}: perplexity {:.6} against transformers' {want:.6} ({rel:.1e} relative)", got.ppl());
        assert!(rel <= 1e-5, "{what}: perplexity {} against transformers' {want}", got.ppl());
    }
}
