//! The batching engine gives every request the tokens a lone session gives it
//! (`generate` with the same n_batch, adapters and sampling), whatever shares its steps: other
//! adapters (LoRA, rsLoRA, DoRA, a 0.5/0.5 mix, none), other lengths, prompts split over steps,
//! requests joining and leaving in any order. And bad requests are refused without harming the
//! others.

use peftrt::engine::{Engine, EngineOptions, Event, Request, RequestId};
use peftrt::session::ActiveAdapters;
use peftrt::{generate, Adapter, LoadOptions, Model, Sampler, SamplingParams, Session, SessionOptions, StopReason};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn model(name: &str) -> Arc<Model> {
    Arc::new(Model::load(&fixtures().join(name), &LoadOptions::default()).unwrap())
}

fn adapter(m: &Model, name: &str) -> Arc<Adapter> {
    Arc::new(Adapter::load(&fixtures().join("adapters").join(name), m).unwrap())
}

/// A deterministic shuffle (Fisher–Yates over an LCG).
fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        v.swap(i, (seed >> 33) as usize % (i + 1));
    }
}

struct Case {
    prompt: Vec<u32>,
    adapters: ActiveAdapters,
    params: SamplingParams,
}

/// 16 requests over the given adapter sets, prompts of 1 to ~200 tokens (crossing the session's
/// 64-token batches, and one-token batches), greedy and sampled.
fn cases(m: &Model, sets: &[ActiveAdapters]) -> Vec<Case> {
    let vocab = m.config.vocab_size as u32;
    (0..16)
        .map(|i| {
            let len = [1, 5, 65, 17, 130, 2, 64, 33, 200, 9, 129, 16, 48, 3, 100, 15][i];
            let prompt = (0..len).map(|j| 1 + (i as u32 * 31 + j as u32 * 7) % (vocab - 1)).collect();
            let params = SamplingParams {
                temperature: if i % 3 == 0 { 0.9 } else { 0.0 },
                seed: i as u64,
                max_tokens: 3 + (i * 5) % 20,
                ..Default::default()
            };
            Case { prompt, adapters: sets[i % sets.len()].clone(), params }
        })
        .collect()
}

const N_CTX: usize = 256;
const N_BATCH: usize = 64;

fn alone(m: &Arc<Model>, c: &Case) -> (Vec<u32>, StopReason) {
    let (tokens, stop, _) = alone_with_logits(m, c);
    (tokens, stop)
}

/// `generate`'s tokens and stop reason, and the logits each token was sampled from (the
/// session evaluated again token by token, as `generate` does).
fn alone_with_logits(m: &Arc<Model>, c: &Case) -> (Vec<u32>, StopReason, Vec<Vec<f32>>) {
    let opts = SessionOptions { n_ctx: N_CTX, n_batch: N_BATCH, n_threads: 2 };
    let mut s = Session::new(m.clone(), &opts).unwrap();
    s.set_adapters(&c.adapters).unwrap();
    let mut sampler = Sampler::new(c.params.clone(), m.config.vocab_size).unwrap();
    let g = generate(&mut s, &c.prompt, &mut sampler, |_| true).unwrap();
    let mut s = Session::new(m.clone(), &opts).unwrap();
    s.set_adapters(&c.adapters).unwrap();
    let mut logits = vec![s.eval(&c.prompt).unwrap().to_vec()];
    for &t in g.tokens.iter().take(g.tokens.len().saturating_sub(1)) {
        logits.push(s.eval(&[t]).unwrap().to_vec());
    }
    (g.tokens, g.stop, logits)
}

/// Runs the cases through an engine, submitting in `order` as slots free up; returns each
/// case's tokens, stop reason and streamed text.
type Batched = (Vec<u32>, StopReason, Vec<Vec<f32>>);

fn batched(m: &Arc<Model>, cases: &[Case], order: &[usize], opts: &EngineOptions) -> Vec<Batched> {
    let mut e = Engine::new(m.clone(), opts).unwrap();
    let mut ids: HashMap<RequestId, usize> = HashMap::new();
    let mut out: Vec<Option<(Vec<u32>, StopReason, String)>> = (0..cases.len()).map(|_| None).collect();
    let mut streamed: Vec<String> = vec![String::new(); cases.len()];
    let mut logits: Vec<Vec<Vec<f32>>> = vec![Vec::new(); cases.len()];
    let mut next = 0;
    while next < order.len() || e.active() > 0 {
        // Join as many as fit; sometimes only one per step, so that requests join mid-stream.
        while next < order.len() && e.active() < e.max_sequences() {
            let c = &cases[order[next]];
            let req = Request {
                prompt: c.prompt.clone(),
                adapters: c.adapters.clone(),
                params: c.params.clone(),
                constraint: None,
            };
            ids.insert(e.submit(req).unwrap(), order[next]);
            next += 1;
            if next % 3 == 0 {
                break;
            }
        }
        e.step(|ev| {
            match ev {
                Event::Text { id, text } => streamed[ids[&id]].push_str(text),
                Event::Logits { id, logits: l } => logits[ids[&id]].push(l.to_vec()),
                Event::Done { id, result } => {
                    let g = result.unwrap();
                    out[ids[&id]] = Some((g.tokens, g.stop, g.text));
                }
            }
            true
        });
    }
    out.into_iter()
        .zip(streamed)
        .zip(logits)
        .map(|((o, s), l)| {
            let (tokens, stop, text) = o.expect("every request ends");
            assert_eq!(text, s, "the streamed text is the reply's text");
            (tokens, stop, l)
        })
        .collect()
}

fn check(m: &Arc<Model>, sets: &[ActiveAdapters]) {
    let cases = cases(m, sets);
    let want: Vec<_> = cases.iter().map(|c| alone_with_logits(m, c)).collect();
    for (seed, max_sequences, step_tokens) in [(1, 6, 40), (2, 16, 7), (3, 4, 128), (4, 1, 64)] {
        let mut order: Vec<usize> = (0..cases.len()).collect();
        shuffle(&mut order, seed);
        let opts = EngineOptions { max_sequences, n_ctx: N_CTX, n_batch: N_BATCH, step_tokens, n_threads: 2 };
        let got = batched(m, &cases, &order, &opts);
        for (i, ((tokens, stop, logits), (want_tokens, want_stop, want_logits))) in got.iter().zip(&want).enumerate() {
            // Bit for bit: the same sums in the same order, not merely the same argmax.
            let same = logits.len() == want_logits.len()
                && logits
                    .iter()
                    .zip(want_logits)
                    .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
            assert!(
                same && (tokens, stop) == (want_tokens, want_stop),
                "request {i} (prompt {} tokens, {} adapters, T={}) with {max_sequences} sequences, {step_tokens} \
                 prompt tokens a step, arrival order {order:?}",
                cases[i].prompt.len(),
                cases[i].adapters.len(),
                cases[i].params.temperature
            );
        }
    }
}

#[test]
fn batched_tokens_equal_a_lone_sessions_llama_with_four_adapters_none_and_a_mix() {
    let m = model("tiny-llama");
    let (qv, dora, rs, layers) = (
        adapter(&m, "llama-qv"),
        adapter(&m, "llama-dora"),
        adapter(&m, "llama-all-rslora"),
        adapter(&m, "llama-layers"),
    );
    let sets = vec![
        vec![(qv.clone(), 1.0)],
        vec![(dora, 1.0)],
        vec![],
        vec![(rs.clone(), 1.0)],
        vec![(qv, 0.5), (rs, 0.5)],
        vec![(layers, 1.0)],
    ];
    check(&m, &sets);
}

#[test]
fn batched_tokens_equal_a_lone_sessions_qwen2_with_biases() {
    let m = model("tiny-qwen2");
    let a = adapter(&m, "qwen2-qkvo");
    check(&m, &[vec![(a.clone(), 1.0)], vec![], vec![(a, 0.3)]]);
}

#[test]
fn bad_requests_are_refused_and_the_others_go_on() {
    let m = model("tiny-llama");
    let other = model("tiny-llama");
    let foreign = adapter(&other, "llama-qv");
    let opts = EngineOptions { max_sequences: 2, n_ctx: 64, n_batch: 16, ..Default::default() };
    let mut e = Engine::new(m.clone(), &opts).unwrap();
    let params = SamplingParams { max_tokens: 8, ..Default::default() };
    let good = e.submit(Request::new(vec![5, 6, 7], params.clone())).unwrap();
    let err = |r: peftrt::Result<RequestId>| r.expect_err("refused").to_string();
    assert!(err(e.submit(Request::new(vec![], params.clone()))).contains("empty"));
    assert!(err(e.submit(Request::new(vec![400], params.clone()))).contains("out of range"));
    assert!(err(e.submit(Request::new(vec![1; 65], params.clone()))).contains("context"));
    let mut r = Request::new(vec![1, 2], params.clone());
    r.adapters = vec![(foreign, 1.0)];
    assert!(err(e.submit(r)).contains("different model"));
    let mut r = Request::new(vec![1, 2], params.clone());
    r.params.top_p = 0.0;
    assert!(err(e.submit(r)).contains("top_p"));
    let cancelled = e.submit(Request::new(vec![9, 9, 9], params.clone())).unwrap();
    assert!(err(e.submit(Request::new(vec![1], params.clone()))).contains("too many sequences"));
    assert!(e.cancel(12345).is_err());
    e.cancel(cancelled).unwrap();
    let mut done = HashMap::new();
    e.run(|ev| {
        if let Event::Done { id, result } = ev {
            done.insert(id, result.unwrap());
        }
        true
    });
    assert_eq!(done[&cancelled].stop, StopReason::Cancelled);
    assert!(done[&cancelled].tokens.is_empty());
    let want = alone(&m, &Case { prompt: vec![5, 6, 7], adapters: vec![], params: params.clone() });
    // The lone session here has another n_batch and context, which a 3-token prompt never reaches.
    assert_eq!((done[&good].tokens.clone(), done[&good].stop), want);
    // A callback that says stop ends only its own request.
    let a = e.submit(Request::new(vec![5, 6, 7], params.clone())).unwrap();
    let b = e.submit(Request::new(vec![5, 6, 7], params)).unwrap();
    let mut ends = HashMap::new();
    e.run(|ev| match ev {
        Event::Text { id, .. } => id != a,
        Event::Done { id, result } => {
            ends.insert(id, result.unwrap().stop);
            true
        }
        Event::Logits { .. } => true,
    });
    assert_eq!(ends[&a], StopReason::Cancelled);
    assert_eq!(ends[&b], want.1);
    assert_eq!(e.active(), 0);
}

/// QLoRA serving: an NF4 base with its adapter, the base alone and a half-scale mix.
#[test]
fn batched_tokens_equal_a_lone_sessions_on_an_nf4_base() {
    let dir = fixtures().join("nf4");
    let m = Arc::new(Model::load(&dir.join("tiny-llama-nf4"), &LoadOptions::default()).unwrap());
    let a = Arc::new(Adapter::load(&dir.join("llama-nf4-qvd"), &m).unwrap());
    check(&m, &[vec![(a.clone(), 1.0)], vec![], vec![(a, 0.5)]]);
}

/// Prefix reuse: requests sharing a prompt start (and adapters) keep the earlier request's keys
/// and values for whole n_batch batches instead of evaluating them, and every logit stays the
/// lone session's; another adapter set, or a prompt that is all prefix, is handled too.
#[test]
fn a_shared_prompt_start_is_reused_with_the_same_answers() {
    let m = model("tiny-llama");
    let qv = adapter(&m, "llama-qv");
    let prefix: Vec<u32> = (0..150).map(|j| 1 + (j * 13) % 399).collect();
    let with_tail = |tail: u32, len: usize| {
        let mut p = prefix.clone();
        p.extend((0..len as u32).map(|j| 1 + (tail + j * 5) % 399));
        p
    };
    let greedy = |max_tokens| SamplingParams { max_tokens, ..Default::default() };
    let cases = [
        Case { prompt: with_tail(3, 10), adapters: vec![], params: greedy(8) },
        Case { prompt: with_tail(7, 40), adapters: vec![], params: greedy(5) },
        Case { prompt: with_tail(9, 1), adapters: vec![(qv.clone(), 1.0)], params: greedy(6) },
        Case { prompt: with_tail(11, 20), adapters: vec![(qv.clone(), 1.0)], params: greedy(6) },
        Case { prompt: with_tail(11, 20), adapters: vec![(qv, 0.5)], params: greedy(6) },
        Case { prompt: prefix[..128].to_vec(), adapters: vec![], params: greedy(4) },
        Case { prompt: with_tail(3, 10), adapters: vec![], params: greedy(8) },
        Case { prompt: prefix[..128].to_vec(), adapters: vec![], params: greedy(4) },
    ];
    let opts = EngineOptions { max_sequences: 2, n_ctx: N_CTX, n_batch: N_BATCH, step_tokens: 64, n_threads: 2 };
    let mut e = Engine::new(m.clone(), &opts).unwrap();
    for (i, c) in cases.iter().enumerate() {
        let before = e.reused_tokens();
        let req = Request {
            prompt: c.prompt.clone(),
            adapters: c.adapters.clone(),
            params: c.params.clone(),
            constraint: None,
        };
        e.submit(req).unwrap();
        let (mut logits, mut tokens) = (Vec::new(), Vec::new());
        e.run(|ev| {
            match ev {
                Event::Logits { logits: l, .. } => logits.push(l.to_vec()),
                Event::Done { result, .. } => tokens = result.unwrap().tokens,
                Event::Text { .. } => {}
            }
            true
        });
        let (want_tokens, _, want_logits) = alone_with_logits(&m, c);
        assert_eq!(tokens, want_tokens, "request {i}");
        assert!(
            logits.len() == want_logits.len()
                && logits
                    .iter()
                    .zip(&want_logits)
                    .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())),
            "request {i}: logits differ from the lone session's"
        );
        let reused = e.reused_tokens() - before;
        // What each request can keep: two whole 64-token batches of the shared start, when a
        // free slot holds them with the same adapters and scales. Two slots, least recently used
        // taken first: request 4 (scale 0.5) takes the slot of requests 0-1, so request 5 finds
        // no base prefix; request 6 keeps request 5's; the 128-token prompt of request 7 keeps
        // one batch, so that its last one is evaluated for the logits.
        let want = [0, 128, 0, 128, 0, 0, 128, 64][i];
        assert_eq!(reused, want, "request {i}: {reused} prompt tokens reused");
    }
}
