//! Decoding a token allocates nothing: after the session is built and warmed up, `eval` of
//! one token (the forward pass, the thread pool, the kernels, an active adapter) and
//! greedy/top-p sampling make no heap allocation. Counted with a wrapping global allocator.
//! Run without the libtest harness so the count is deterministic (issue 18).

use peftrt::{LoadOptions, Model, Sampler, SamplingParams, Session, SessionOptions};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Run without libtest (`harness = false` in Cargo.toml): this process has no threads but
/// this one and the sessions' workers, so nothing else allocates while the steps are counted.
fn main() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    check_model(&fixtures.join("tiny-qwen2"), &fixtures.join("adapters/qwen2-qkvo"));
    // NF4 weights (fused 4-bit kernels) with a LoRA adapter on them.
    check_model(&fixtures.join("nf4/tiny-llama-nf4"), &fixtures.join("nf4/llama-nf4-qvd"));
    println!("no_alloc: decode steps allocate nothing (tiny-qwen2 + LoRA, tiny-llama NF4 + LoRA)");
}

fn check_model(dir: &std::path::Path, adapter: &std::path::Path) {
    let model = Arc::new(Model::load(dir, &LoadOptions { no_tokenizer: true }).unwrap());
    let adapter = Arc::new(peftrt::Adapter::load(adapter, &model).unwrap());
    for (threads, adapters) in [(1, vec![]), (2, vec![]), (2, vec![(adapter.clone(), 0.7)])] {
        let at_start = ALLOCS.load(Ordering::SeqCst);
        let mut s = Session::new(model.clone(), &SessionOptions { n_ctx: 64, n_batch: 8, n_threads: threads }).unwrap();
        let mut greedy = Sampler::new(SamplingParams::default(), model.config.vocab_size).unwrap();
        let p = SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            repetition_penalty: 1.1,
            ..Default::default()
        };
        let mut sampled = Sampler::new(p, model.config.vocab_size).unwrap();
        assert!(ALLOCS.load(Ordering::SeqCst) > at_start, "the counter sees the session's buffers");
        s.set_adapters(&adapters).unwrap();
        s.eval(&[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]).unwrap();
        let mut next = greedy.sample(s.logits(), s.tokens());
        // Warm-up: first use of every buffer and worker (and its thread-local kernel scratch).
        s.eval(&[next]).unwrap();
        s.eval(&[next]).unwrap();
        let before = ALLOCS.load(Ordering::SeqCst);
        for i in 0..20 {
            s.eval(&[next]).unwrap();
            next =
                if i % 2 == 0 { greedy.sample(s.logits(), s.tokens()) } else { sampled.sample(s.logits(), s.tokens()) };
        }
        let after = ALLOCS.load(Ordering::SeqCst);
        assert_eq!(
            after - before,
            0,
            "{}: {} allocations in 20 decode steps with {threads} threads, {} adapters",
            dir.display(),
            after - before,
            adapters.len()
        );
    }
}
