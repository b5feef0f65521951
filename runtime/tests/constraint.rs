//! Constrained decoding (llguidance) on the tiny fixtures: what a constraint lets through
//! always parses and validates, a model that already conforms is not changed, a cut reply says
//! so, and a bad constraint is an error before any token.

use peftrt::constraint::{Constraint, ConstraintSpec};
use peftrt::json::{parse_reply, Schema};
use peftrt::{generate, Generation, LoadOptions, Model, Sampler, SamplingParams, Session, SessionOptions, StopReason};
use std::path::PathBuf;
use std::sync::Arc;

fn model(name: &str) -> Arc<Model> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name);
    Arc::new(Model::load(&dir, &LoadOptions::default()).unwrap())
}

fn run(m: &Arc<Model>, spec: Option<&ConstraintSpec>, params: SamplingParams, prompt: &str) -> Generation {
    let mut session = Session::new(m.clone(), &SessionOptions { n_ctx: 2048, ..Default::default() }).unwrap();
    let mut sampler = Sampler::new(params, m.config.vocab_size).unwrap();
    sampler.set_constraint(spec.map(|s| Constraint::new(m, s).unwrap())).unwrap();
    let tokens = m.tokenizer().unwrap().encode(prompt, true).unwrap();
    generate(&mut session, &tokens, &mut sampler, |_| true).unwrap()
}

fn params(temperature: f32, seed: u64, max_tokens: usize) -> SamplingParams {
    SamplingParams { temperature, seed, max_tokens, ..Default::default() }
}

const ORDER: &str = r#"{
  "type": "object",
  "additionalProperties": false,
  "required": ["name", "items", "express"],
  "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
      "type": "object", "additionalProperties": false, "required": ["sku", "qty"],
      "properties": {"sku": {"enum": ["tea", "coffee", "milk"]}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}}},
    "express": {"type": "boolean"},
    "note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]}
  }
}"#;

#[test]
fn every_reply_under_a_schema_parses_and_validates() {
    let schema = Schema::new(serde_json::from_str(ORDER).unwrap()).unwrap();
    let spec = ConstraintSpec::JsonSchema(ORDER.into());
    for name in ["tiny-llama", "tiny-qwen2"] {
        let m = model(name);
        let mut complete = 0;
        for (t, seed) in [(0.0, 0), (0.8, 1), (1.0, 2), (1.3, 3), (1.0, 4)] {
            let g = run(&m, Some(&spec), params(t, seed, 400), "order:");
            // A random model may not finish before the token limit or the end of its short
            // context: then the reply says it was cut, and is never presented as complete.
            if matches!(g.stop, StopReason::MaxTokens | StopReason::ContextFull) {
                assert!(g.stop == StopReason::ContextFull || g.tokens.len() == 400, "{:?}", g.stop);
                continue;
            }
            assert_eq!(g.stop, StopReason::Eos, "{name} T={t} seed {seed}: {:?}", g.text);
            complete += 1;
            let v = parse_reply(&g.text).unwrap_or_else(|| panic!("{name} T={t} seed {seed}: not JSON: {:?}", g.text));
            assert!(
                schema.is_valid(&v),
                "{name} T={t} seed {seed}: {v} breaks the schema: {:?}",
                schema.first_error(&v)
            );
        }
        assert!(complete >= 3, "{name}: only {complete} of 5 replies complete");
    }
}

#[test]
fn any_json_object_and_regex_hold_for_greedy_and_sampled() {
    let m = model("tiny-llama");
    let code = regex::Regex::new("^[0-9]{3}-[a-z]{2,5}$").unwrap();
    for (t, seed) in [(0.0, 0), (1.0, 5), (1.0, 6)] {
        let g = run(&m, Some(&ConstraintSpec::AnyJson), params(t, seed, 300), "hello");
        if g.stop == StopReason::Eos {
            assert!(parse_reply(&g.text).is_some_and(|v| v.is_object()), "{:?}", g.text);
        } else {
            assert_eq!(g.stop, StopReason::MaxTokens);
        }
        let g = run(&m, Some(&ConstraintSpec::Regex("[0-9]{3}-[a-z]{2,5}".into())), params(t, seed, 50), "hello");
        assert_eq!(g.stop, StopReason::Eos, "{:?}", g.text);
        assert!(code.is_match(&g.text), "{:?}", g.text);
    }
}

/// SmolLM2 from `make models` (`PEFTRT_SMOLLM2_DIR`); `None` (the test skips) without it,
/// unless `PEFTRT_REQUIRE_MODELS` is set, as `make test` does.
fn smollm2() -> Option<Arc<Model>> {
    let dir = PathBuf::from(std::env::var_os("PEFTRT_SMOLLM2_DIR").unwrap_or("../models/smollm2-135m-instruct".into()));
    if !dir.join("config.json").is_file() {
        assert!(std::env::var_os("PEFTRT_REQUIRE_MODELS").is_none(), "{} is missing: make models", dir.display());
        eprintln!("skipped: no SmolLM2 at {}", dir.display());
        return None;
    }
    Some(Arc::new(Model::load(&dir, &LoadOptions::default()).unwrap()))
}

#[test]
fn a_model_that_already_conforms_is_not_changed() {
    // Unconstrained output, then the same under a grammar its text satisfies: the mask must
    // never take away the path the model takes. (The tiny random models soon emit bytes that
    // are not UTF-8, which no text grammar matches: this needs a real model.)
    let Some(m) = smollm2() else { return };
    let tok = m.tokenizer().unwrap();
    let prompt = tok
        .apply_chat_template(&[peftrt::Message::new("user", "Give a JSON object with a name and an age.")], true)
        .unwrap();
    let ids = tok.encode(&prompt, false).unwrap();
    for p in [params(0.0, 0, 48), params(0.8, 7, 48)] {
        let gen = |spec: Option<&ConstraintSpec>| {
            let mut session = Session::new(m.clone(), &SessionOptions { n_ctx: 512, ..Default::default() }).unwrap();
            let mut sampler = Sampler::new(p.clone(), m.config.vocab_size).unwrap();
            sampler.set_constraint(spec.map(|s| Constraint::new(&m, s).unwrap())).unwrap();
            generate(&mut session, &ids, &mut sampler, |_| true).unwrap()
        };
        let free = gen(None);
        assert!(!free.text.contains('\u{fffd}'), "{:?}", free.text);
        let same = gen(Some(&ConstraintSpec::Regex(r"(.|\n)*".into())));
        assert_eq!(free.tokens, same.tokens, "T={}: {:?} vs {:?}", p.temperature, free.text, same.text);
        if p.temperature == 0.0 {
            // The tightest grammar the output satisfies: exactly its own text, every byte
            // forced. Greedy still takes the model's own tokens (the grammar ends with the
            // text, so no EOS token follows it).
            let exact = gen(Some(&ConstraintSpec::Regex(regex::escape(&free.text))));
            let eos = m.config.eos_token_ids[0];
            let text_tokens = free.tokens.strip_suffix(&[eos]).unwrap_or(&free.tokens);
            assert_eq!(text_tokens, &exact.tokens[..], "{:?} vs {:?}", free.text, exact.text);
            assert_eq!(exact.stop, StopReason::Eos);
        }
    }
}

#[test]
fn a_reply_cut_by_max_tokens_says_so() {
    let m = model("tiny-llama");
    let g = run(&m, Some(&ConstraintSpec::JsonSchema(ORDER.into())), params(0.0, 0, 4), "order:");
    assert_eq!(g.stop, StopReason::MaxTokens);
    assert_eq!(g.tokens.len(), 4);
    assert!(parse_reply(&g.text).is_none(), "{:?}", g.text);
}

#[test]
fn bad_constraints_are_errors_before_any_token() {
    let m = model("tiny-llama");
    for (spec, want) in [
        (ConstraintSpec::Regex("(".into()), "unclosed group"),
        (ConstraintSpec::JsonSchema("{\"type\": ".into()), "not JSON"),
        (ConstraintSpec::JsonSchema(r#"{"type": "object", "if": {}, "then": {}}"#.into()), "if"),
        (ConstraintSpec::Lark("start: nothing_defined".into()), "nothing_defined"),
    ] {
        let e = Constraint::new(&m, &spec).err().unwrap_or_else(|| panic!("{spec:?} compiled"));
        assert!(matches!(e, peftrt::Error::Constraint(_)), "{e:?}");
        assert!(e.to_string().contains(want), "{spec:?}: {e}");
    }
}

#[test]
fn forced_text_is_taken_without_a_mask() {
    // A literal regex fixes every byte: each token is the tokenizer's spelling of what must
    // follow (llguidance's fast-forward tokens), greedy or sampled, and no full mask is
    // computed; the text is the literal.
    let m = model("tiny-llama");
    let tok = m.tokenizer().unwrap();
    let prompt = tok.encode("hello", true).unwrap();
    for p in [params(0.0, 0, 50), params(1.0, 9, 50)] {
        let c = Constraint::new(&m, &ConstraintSpec::Regex("order 42: tea, milk".into())).unwrap();
        let mut session = Session::new(m.clone(), &SessionOptions { n_ctx: 256, ..Default::default() }).unwrap();
        let mut sampler = Sampler::new(p.clone(), m.config.vocab_size).unwrap();
        sampler.set_constraint(Some(c)).unwrap();
        let g = generate(&mut session, &prompt, &mut sampler, |_| true).unwrap();
        assert_eq!(g.stop, StopReason::Eos, "T={}: {:?}", p.temperature, g.text);
        assert_eq!(g.text, "order 42: tea, milk");
        assert_eq!(sampler.constraint().unwrap().masks_computed(), 0, "T={}", p.temperature);
        if p.temperature > 0.0 {
            // (Greedy takes the model's own token where the grammar allows it.)
            // (The grammar ends with its last byte when nothing else may follow: no EOS
            // token is needed then.)
            let text_tokens = g.tokens.strip_suffix(&[m.config.eos_token_ids[0]]).unwrap_or(&g.tokens);
            assert_eq!(text_tokens, &tok.encode(&g.text, false).unwrap()[..], "the tokenizer's own tokens");
        }
    }
}

#[test]
fn a_complete_grammar_is_followed_only_by_eos() {
    let m = model("tiny-llama");
    let mut session = Session::new(m.clone(), &SessionOptions { n_ctx: 256, ..Default::default() }).unwrap();
    let mut sampler = Sampler::new(params(1.0, 3, 50), m.config.vocab_size).unwrap();
    sampler.set_constraint(Some(Constraint::new(&m, &ConstraintSpec::Regex("ab".into())).unwrap())).unwrap();
    let logits = session.eval(&m.tokenizer().unwrap().encode("x", true).unwrap()).unwrap().to_vec();
    let mut out = Vec::new();
    while !sampler.constraint_complete() {
        assert!(out.len() < 10, "the grammar never completed: {out:?}");
        out.push(sampler.next_token(&logits, &[]).unwrap());
    }
    // The grammar may end with its last byte (nothing else can follow) or with an EOS token.
    let text = out.strip_suffix(&[m.config.eos_token_ids[0]]).unwrap_or(&out);
    assert_eq!(m.tokenizer().unwrap().decode(text, false).unwrap(), "ab");
    for _ in 0..3 {
        assert!(m.is_eos(sampler.next_token(&logits, &[]).unwrap()), "a token after the grammar ended");
    }
    // Restarted, it constrains from the start again.
    sampler.restart_constraint().unwrap();
    assert!(!sampler.constraint_complete());
}

/// Greedy decoding under a constraint picks the argmax of the fully masked logits at every step
/// (the sampler asks the grammar about its best few tokens before it computes a mask), with a
/// repetition penalty too, and with random logits where the model's own choice is rarely
/// allowed.
#[test]
fn greedy_within_a_constraint_is_the_argmax_of_the_masked_logits() {
    let m = model("tiny-llama");
    let vocab = m.config.vocab_size;
    let spec = ConstraintSpec::JsonSchema(ORDER.into());
    let mut seed = 99u64;
    let mut rand = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
    };
    for penalty in [1.0, 1.3] {
        let p = SamplingParams { repetition_penalty: penalty, ..Default::default() };
        let mut sampler = Sampler::new(p.clone(), vocab).unwrap();
        sampler.set_constraint(Some(Constraint::new(&m, &spec).unwrap())).unwrap();
        let mut shadow = Constraint::new(&m, &spec).unwrap();
        let mut plain = Sampler::new(p, vocab).unwrap();
        let mut history = Vec::new();
        let mut refused = 0;
        for step in 0..120 {
            if shadow.is_complete() {
                break;
            }
            // Ties on purpose: a few logits share the top value.
            let mut logits: Vec<f32> = (0..vocab).map(|_| rand()).collect();
            for i in [3, 17, 40] {
                logits[i] = 5.0;
            }
            let got = sampler.next_token(&logits, &history).unwrap();
            let want = match shadow.forced() {
                // The grammar's fixed text is taken as it is: the forced token is allowed.
                Some(t) if !shadow.allows(plain.sample(&logits, &history)) => t,
                _ => {
                    refused += usize::from(!shadow.allows(plain.sample(&logits, &history)));
                    let mut masked = logits.clone();
                    shadow.mask_logits(&mut masked).unwrap();
                    plain.sample(&masked, &history)
                }
            };
            assert_eq!(got, want, "penalty {penalty}, step {step}");
            shadow.consume(got).unwrap();
            history.push(got);
        }
        assert!(refused >= 10, "penalty {penalty}: the model's choice was refused only {refused} times");
        eprintln!("penalty {penalty}: {} steps, {refused} choices refused", history.len());
    }
}
