//! The batching engine on the real SmolLM2-135M-Instruct (issue 21): 16 chat requests over 4
//! adapters (q/k/v/o r=16, all-linear r=16 rsLoRA, and two variants of them with another
//! alpha or without rsLoRA), the base and a 0.5/0.5 mix, greedy and sampled, in shuffled
//! arrival orders, against `generate` in a lone session: every token and stop reason equal, and
//! every logit bit for bit. `make test` provides the model and adapters; plain `cargo test`
//! skips without them.

use peftrt::engine::{Engine, EngineOptions, Event, Request, RequestId};
use peftrt::session::ActiveAdapters;
use peftrt::{generate, Adapter, LoadOptions, Message, Model, Sampler, SamplingParams, Session, SessionOptions};
use peftrt_conformance::real_model_path;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A copy of the adapter in `src` whose adapter_config.json has `key` set to `value`.
fn variant(src: &Path, dst: &Path, key: &str, value: serde_json::Value) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("adapter_model.safetensors"), dst.join("adapter_model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    cfg[key] = value;
    std::fs::write(dst.join("adapter_config.json"), cfg.to_string()).unwrap();
    dst.to_path_buf()
}

const N_CTX: usize = 512;
const N_BATCH: usize = 32;

struct Case {
    prompt: Vec<u32>,
    adapters: ActiveAdapters,
    params: SamplingParams,
}

type Reply = (Vec<u32>, peftrt::StopReason, Vec<Vec<f32>>);

fn alone(m: &Arc<Model>, c: &Case) -> Reply {
    let opts = SessionOptions { n_ctx: N_CTX, n_batch: N_BATCH, n_threads: 2 };
    let mut s = Session::new(m.clone(), &opts).unwrap();
    s.set_adapters(&c.adapters).unwrap();
    let mut sampler = Sampler::new(c.params.clone(), m.config.vocab_size).unwrap();
    let g = generate(&mut s, &c.prompt, &mut sampler, |_| true).unwrap();
    s.reset();
    let mut logits = vec![s.eval(&c.prompt).unwrap().to_vec()];
    for &t in &g.tokens[..g.tokens.len().saturating_sub(1)] {
        logits.push(s.eval(&[t]).unwrap().to_vec());
    }
    (g.tokens, g.stop, logits)
}

#[test]
fn batched_smollm2_equals_lone_sessions_bit_for_bit() {
    let Some(dir) = real_model_path("PEFTRT_SMOLLM2_DIR", "smollm2-135m-instruct") else { return };
    let Some(refs) = real_model_path("PEFTRT_SMOLLM2_REF_DIR", "reference") else { return };
    let adapters_dir =
        std::env::var_os("PEFTRT_SMOLLM2_ADAPTERS_DIR").map(PathBuf::from).unwrap_or_else(|| refs.join("adapters"));
    let m = Arc::new(Model::load(&dir, &LoadOptions::default()).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let (qkvo, all) = (adapters_dir.join("qkvo-r16"), adapters_dir.join("all-linear-r16"));
    let dirs = [
        qkvo.clone(),
        all.clone(),
        variant(&qkvo, &tmp.path().join("qkvo-alpha8"), "lora_alpha", 8.into()),
        variant(&all, &tmp.path().join("all-plain"), "use_rslora", false.into()),
    ];
    let a: Vec<Arc<Adapter>> = dirs.iter().map(|d| Arc::new(Adapter::load(d, &m).unwrap())).collect();
    let sets: Vec<ActiveAdapters> = vec![
        vec![(a[0].clone(), 1.0)],
        vec![(a[1].clone(), 1.0)],
        vec![],
        vec![(a[2].clone(), 1.0)],
        vec![(a[3].clone(), 1.0)],
        vec![(a[0].clone(), 0.5), (a[1].clone(), 0.5)],
    ];
    let tok = m.tokenizer().unwrap();
    let questions = [
        "Name three colours.",
        "Write a haiku about a lighthouse by the sea at night, with fog.",
        "What is 2+2?",
        "Give me a JSON object with a name and an age.",
    ];
    let cases: Vec<Case> = (0..16)
        .map(|i| {
            let q = questions[i % questions.len()].repeat(1 + i % 3);
            let text = tok.apply_chat_template(&[Message::new("user", &q)], true).unwrap();
            let prompt = tok.encode(&text, false).unwrap();
            let params = SamplingParams {
                temperature: if i % 4 == 1 { 0.8 } else { 0.0 },
                seed: i as u64,
                max_tokens: 6 + i % 7,
                ..Default::default()
            };
            Case { prompt, adapters: sets[i % sets.len()].clone(), params }
        })
        .collect();
    let want: Vec<Reply> = cases.iter().map(|c| alone(&m, c)).collect();
    for (seed, max_sequences, step_tokens) in [(11u64, 8, 48), (5, 16, 20)] {
        let mut order: Vec<usize> = (0..cases.len()).collect();
        let mut s = seed;
        for i in (1..order.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            order.swap(i, (s >> 33) as usize % (i + 1));
        }
        let opts = EngineOptions { max_sequences, n_ctx: N_CTX, n_batch: N_BATCH, step_tokens, n_threads: 2 };
        let mut e = Engine::new(m.clone(), &opts).unwrap();
        let mut ids: HashMap<RequestId, usize> = HashMap::new();
        let mut got: Vec<Option<Reply>> = (0..cases.len()).map(|_| None).collect();
        let mut logits: Vec<Vec<Vec<f32>>> = vec![Vec::new(); cases.len()];
        let mut next = 0;
        while next < order.len() || e.active() > 0 {
            if next < order.len() && e.active() < e.max_sequences() {
                let c = &cases[order[next]];
                let req = Request {
                    prompt: c.prompt.clone(),
                    adapters: c.adapters.clone(),
                    params: c.params.clone(),
                    constraint: None,
                };
                ids.insert(e.submit(req).unwrap(), order[next]);
                next += 1;
            }
            e.step(|ev| {
                match ev {
                    Event::Logits { id, logits: l } => logits[ids[&id]].push(l.to_vec()),
                    Event::Done { id, result } => {
                        let g = result.unwrap();
                        got[ids[&id]] = Some((g.tokens, g.stop, Vec::new()));
                    }
                    Event::Text { .. } => {}
                }
                true
            });
        }
        for (i, (g, w)) in got.into_iter().zip(&want).enumerate() {
            let (tokens, stop, _) = g.unwrap();
            assert_eq!((&tokens, stop), (&w.0, w.1), "request {i}, {max_sequences} sequences, order {order:?}");
            let same = logits[i].len() == w.2.len()
                && logits[i].iter().zip(&w.2).all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
            assert!(same, "request {i}: logits differ from the lone session's ({max_sequences} sequences)");
        }
    }
}
