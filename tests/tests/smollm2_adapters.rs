//! LoRA adapters on the real SmolLM2-135M-Instruct (issue 3) against PEFT, from
//! scripts/smollm2_adapters.py, which also makes the adapters: q/k/v/o r=16, all-linear r=16 with
//! rsLoRA, and both at once with scales 1 and 0.5. Logits at every position of a plain and a
//! chat-templated prompt, and 16-token greedy continuations, all from one session whose adapters
//! are switched between runs. `make test` provides the model, the adapters and the reference;
//! plain `cargo test` skips without them.

use peftrt::{generate, Adapter, LoadOptions, Message, Model, Sampler, SamplingParams, Session, SessionOptions};
use peftrt_conformance::{assert_logits_close, present_or_skip, real_model_path, Reference};
use std::path::PathBuf;
use std::sync::Arc;

const CASES: [&str; 2] = ["text", "chat"];
const REFERENCE: &str = "smollm2_adapters.safetensors";

/// Active adapters with their scales, as `Session::set_adapters` takes them.
type AdapterSet = Vec<(Arc<Adapter>, f32)>;

struct Setup {
    model: Arc<Model>,
    r: Reference,
    /// The directory holding one PEFT adapter directory per adapter name.
    adapters: PathBuf,
}

fn setup() -> Option<Setup> {
    let dir = real_model_path("PEFTRT_SMOLLM2_DIR", "smollm2-135m-instruct")?;
    let refs = real_model_path("PEFTRT_SMOLLM2_REF_DIR", "reference")?;
    let hint = "run `make test`, which runs scripts/smollm2_adapters.py";
    let file = present_or_skip(refs.join(REFERENCE), hint)?;
    // Written beside the reference, unless PEFTRT_SMOLLM2_ADAPTERS_DIR says otherwise.
    let adapters =
        std::env::var_os("PEFTRT_SMOLLM2_ADAPTERS_DIR").map(PathBuf::from).unwrap_or_else(|| refs.join("adapters"));
    let adapters = present_or_skip(adapters, hint)?;
    let model = Model::load(&dir, &LoadOptions::default()).expect("load the imported SmolLM2");
    let r = Reference::load(&file).expect("PEFT reference logits");
    Some(Setup { model: Arc::new(model), r, adapters })
}

impl Setup {
    fn adapter(&self, name: &str) -> Arc<Adapter> {
        let dir = self.adapters.join(name);
        Arc::new(Adapter::load(&dir, &self.model).unwrap_or_else(|e| panic!("{}: {e}", dir.display())))
    }

    /// The reference's adapter sets: its key in tensor names, and the adapters with their scales.
    fn adapter_sets(&self) -> Vec<(String, AdapterSet)> {
        let meta = &self.r.metadata;
        let two: AdapterSet = meta["two_adapters"]
            .split(',')
            .zip(meta["two_scales"].split(','))
            .map(|(name, scale)| (self.adapter(name), scale.parse::<f32>().unwrap()))
            .collect();
        assert_eq!(two.len(), 2, "two_adapters / two_scales in {}", self.r.path.display());
        let mut sets: Vec<_> = ["qkvo-r16", "all-linear-r16"]
            .into_iter()
            .map(|name| (name.replace('-', "_"), vec![(self.adapter(name), 1.0)]))
            .collect();
        sets.push(("two".into(), two));
        sets
    }
}

#[test]
fn adapter_logits_and_greedy_match_peft() {
    let Some(t) = setup() else { return };
    let mut s = Session::new(t.model.clone(), &SessionOptions { n_ctx: 256, ..Default::default() }).unwrap();
    for (key, set) in t.adapter_sets() {
        s.set_adapters(&set).unwrap();
        for case in CASES {
            let tokens = t.r.tokens(&format!("tokens_{case}"));
            s.reset();
            let mut logits = Vec::new();
            s.eval_all(&tokens, &mut logits).unwrap();
            assert_logits_close(&format!("smollm2 {key} {case}"), &logits, t.r.logits(&format!("logits_{key}_{case}")));

            let expected = t.r.tokens(&format!("greedy_{key}_{case}"));
            s.reset();
            let params = SamplingParams { max_tokens: expected.len(), ignore_eos: true, ..Default::default() };
            let mut sampler = Sampler::new(params, t.model.config.vocab_size).unwrap();
            let g = generate(&mut s, &tokens, &mut sampler, |_| true).unwrap();
            assert_eq!(g.tokens, expected, "smollm2 {key} {case}: greedy continuation differs from PEFT");
        }
    }
}

#[test]
fn prompt_tokens_and_chat_template_match() {
    let Some(t) = setup() else { return };
    let tok = t.model.tokenizer().unwrap();
    let msgs: Vec<serde_json::Value> = serde_json::from_str(&t.r.metadata["chat_messages"]).unwrap();
    let msgs: Vec<Message> =
        msgs.iter().map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap())).collect();
    let rendered = tok.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(rendered, t.r.metadata["chat_prompt"], "chat template renders differently from transformers");
    assert_eq!(rendered, t.r.metadata["prompt_chat"]);
    for case in CASES {
        let text = &t.r.metadata[&format!("prompt_{case}")];
        assert_eq!(tok.encode(text, false).unwrap(), t.r.tokens(&format!("tokens_{case}")), "tokens of {case}");
    }
}
