//! The frozen-prefix cache (`trainer::prefix`): with LoRA on the upper block only, the lower
//! block's output is computed once per example, and training gives what it gives when every
//! step runs that block: the same losses, eval losses and adapter to rounding, with dropout,
//! length grouping, gradient accumulation, several epochs and gradient checkpointing.

use peftrt::weights::WeightStore;
use peftrt_conformance::{fixture, max_abs_diff};
use peftrt_trainer::base::Base;
use peftrt_trainer::data::{Batch, Dataset, Encoder};
use peftrt_trainer::lora::LoraOptions;
use peftrt_trainer::model::{BaseStorage, Pass};
use peftrt_trainer::prefix::PrefixCache;
use peftrt_trainer::train::{initial_lora, train, TrainOptions, TrainReport};
use std::path::Path;
use tch::Device;

fn options(out: &Path) -> TrainOptions {
    let mut o = TrainOptions::new(fixture("tiny-llama"), fixture("trainer/chat.jsonl"), out.to_path_buf());
    o.lora.target = "all-linear".into();
    o.lora.layers = Some(vec![1]); // block 0 of the two is frozen
    o.lora.dropout = 0.1;
    o.batch_size = 2;
    o.grad_accum = 2;
    o.max_steps = Some(5); // through several epochs of the few examples
    o.lr = 5e-3;
    o.warmup_steps = 1;
    o.seed = 11;
    o.group_by_length = true;
    o.eval_split = Some(0.3);
    o.eval_every = Some(1);
    o
}

fn tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    // SAFETY: test files, not modified while mapped.
    let s = unsafe { WeightStore::open_file(&dir.join("adapter_model.safetensors")).unwrap() };
    s.tensors().iter().map(|t| (t.name.clone(), t.to_f32_vec())).collect()
}

fn close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-3), "{what}: {a:?} vs {b:?}");
    }
}

fn run(dir: &Path, name: &str, cache: bool, checkpoint: bool) -> (TrainReport, Vec<(String, Vec<f32>)>) {
    let mut o = options(&dir.join(name));
    o.prefix_cache = cache;
    o.grad_checkpoint = checkpoint;
    let r = train(&o).unwrap();
    (r, tensors(&dir.join(name)))
}

// One test: both parts draw LoRA weights from libtorch's global generator, which runs in
// parallel test threads would interleave.
#[test]
fn prefix_cache() {
    tch::set_num_threads(1);
    cache_holds_each_examples_frozen_output();
    cached_prefix_trains_as_running_it_every_step();
}

fn cached_prefix_trains_as_running_it_every_step() {
    let d = tempfile::tempdir().unwrap();
    let (plain, a) = run(d.path(), "plain", false, false);
    for (name, checkpoint) in [("cached", false), ("cached-ckpt", true)] {
        let (cached, b) = run(d.path(), name, true, checkpoint);
        assert!(plain.losses.len() > 3, "several steps over the epochs");
        close(&plain.losses, &cached.losses, "losses");
        close(&plain.grad_norms, &cached.grad_norms, "gradient norms");
        let evals = |r: &TrainReport| r.eval_losses.iter().map(|&(_, l)| l).collect::<Vec<_>>();
        close(&evals(&plain), &evals(&cached), "eval losses");
        assert_eq!(a.len(), b.len());
        for ((n, va), (_, vb)) in a.iter().zip(&b) {
            let (dmax, m) = max_abs_diff(vb, va);
            // Rounding only: the lower block's products run on a batch in one run and on
            // single examples in the other (different blockings), and five steps at lr 5e-3
            // carry the difference into the adapter (~1e-5 of its largest value).
            assert!(dmax <= 3e-5 * m, "{name} {n}: max |Δ| {dmax} of {m}");
        }
    }
    // And the run with the cache is reproducible to the bit.
    let (again, c) = run(d.path(), "again", true, false);
    let (cached, b) = run(d.path(), "cached2", true, false);
    assert_eq!(again.losses, cached.losses);
    assert!(b.iter().zip(&c).all(|((_, x), (_, y))| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())));
}

/// The cache holds, per example, the lower block's output for that example alone, whatever
/// the batch it was computed in; with LoRA on block 0 there is nothing to cache.
fn cache_holds_each_examples_frozen_output() {
    let base = Base::load(&fixture("tiny-llama"), BaseStorage::Float, Device::Cpu).unwrap();
    let tokenizer = base.runtime.tokenizer().unwrap();
    let enc = Encoder { tokenizer, eos: base.eos(), max_seq_len: 256 };
    let data = Dataset::load(&fixture("trainer/chat.jsonl"), None, &enc).unwrap();
    let pad = base.eos().unwrap();
    let upper = LoraOptions { target: "all-linear".into(), layers: Some(vec![1]), ..LoraOptions::default() };
    let upper_lora = initial_lora(&base.model, &upper, 3).unwrap();
    let lora = &upper_lora;
    assert_eq!(base.model.first_adapted_block(lora), 1);
    let all: Vec<usize> = (0..data.examples.len()).collect();
    let cache = PrefixCache::build(&base.model, lora, &data.examples, &all, pad).unwrap().expect("block 0 is frozen");
    assert_eq!(cache.start(), 1);
    let m = &base.model;
    for (i, e) in data.examples.iter().enumerate() {
        let ids = Batch::new(&[e], pad).unwrap().ids;
        let alone = tch::no_grad(|| {
            m.block_at(
                0,
                &m.embed(&ids).unwrap(),
                &m.causal_layout(ids.size()[1]).unwrap(),
                Pass::new(Some(lora), false),
            )
        })
        .unwrap();
        let cached = cache.batch(&[i], Device::Cpu).unwrap();
        assert_eq!(cached.size(), alone.size(), "example {i}");
        let (x, y) =
            (Vec::<f32>::try_from(alone.flatten(0, -1)).unwrap(), Vec::<f32>::try_from(cached.flatten(0, -1)).unwrap());
        let (dmax, mag) = max_abs_diff(&y, &x);
        assert!(dmax <= 1e-5 * mag, "example {i}: max |Δ| {dmax} of {mag}");
    }
    // Two examples of different lengths: the shorter right-padded with zeros.
    let len = |i: &usize| data.examples[*i].ids.len();
    let short = (0..data.examples.len()).min_by_key(len).unwrap();
    let long = (0..data.examples.len()).max_by_key(len).unwrap();
    let both = cache.batch(&[short, long], Device::Cpu).unwrap();
    let n = data.examples[short].ids.len() as i64;
    assert!(data.examples[long].ids.len() as i64 > n);
    assert_eq!(both.get(0).narrow(0, n, both.size()[1] - n).abs().sum(tch::Kind::Float).double_value(&[]), 0.0);

    let every_block = LoraOptions { target: "all-linear".into(), ..LoraOptions::default() };
    let lora = initial_lora(&base.model, &every_block, 3).unwrap();
    assert!(PrefixCache::build(&base.model, &lora, &data.examples, &all, pad).unwrap().is_none());
    // Only the examples asked for are cached.
    let some = PrefixCache::build(&base.model, &upper_lora, &data.examples, &[short], pad).unwrap().unwrap();
    assert!(some.batch(&[short], Device::Cpu).is_ok());
    let e = some.batch(&[short, long], Device::Cpu).unwrap_err().to_string();
    assert!(e.contains(&format!("example {long}")), "{e}");
}
