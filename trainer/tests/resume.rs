//! Checkpoints and resumption: a run stopped after step k and resumed from its checkpoint ends
//! with the same adapter, bit for bit, as the uninterrupted run (CPU), with dropout and
//! shuffling and length grouping on and the stop falling inside an epoch. Issue #6,
//! "Checkpoints".

use peftrt::weights::WeightStore;
use peftrt_conformance::fixture;
use peftrt_trainer::train::{train, TrainOptions};
use peftrt_trainer::Error;
use std::path::Path;

fn options(out: &Path) -> TrainOptions {
    let mut o = TrainOptions::new(fixture("tiny-llama"), fixture("trainer/chat.jsonl"), out.to_path_buf());
    o.lora.target = "q_proj,v_proj,down_proj".into();
    o.lora.dropout = 0.1;
    o.batch_size = 2;
    o.max_steps = Some(5); // 3 batches per epoch: the stop at step 2 is inside the first epoch
    o.lr = 5e-3;
    o.warmup_steps = 1;
    o.seed = 7;
    o.group_by_length = true;
    o
}

fn tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    // SAFETY: test files, not modified while mapped.
    let s = unsafe { WeightStore::open_file(&dir.join("adapter_model.safetensors")).unwrap() };
    s.tensors().iter().map(|t| (t.name.clone(), t.to_f32_vec())).collect()
}

#[test]
fn interrupted_then_resumed_equals_uninterrupted() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let whole = train(&options(&d.path().join("whole"))).unwrap();

    let out = d.path().join("split");
    let mut first = options(&out);
    first.stop_after = Some(2);
    match train(&first) {
        Err(Error::Interrupted(msg)) => assert!(msg.contains("--resume") && msg.contains("after step 2"), "{msg}"),
        other => panic!("expected an interruption, got {:?}", other.map(|r| r.losses)),
    }
    assert!(!out.exists(), "an adapter was written by the interrupted run");
    let ckpt = first.checkpoint_path();
    assert!(ckpt.join("adapter_model.safetensors").is_file() && ckpt.join("optimizer.safetensors").is_file());

    let mut second = options(&out);
    second.resume = Some(ckpt.clone());
    let resumed = train(&second).unwrap();
    assert_eq!(resumed.losses, whole.losses, "loss history");
    assert_eq!(resumed.grad_norms, whole.grad_norms);
    let (a, b) = (tensors(&d.path().join("whole")), tensors(&out));
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits()), "{na} differs after resuming");
    }
    // The adapter did train.
    let init = train(&{
        let mut o = options(&d.path().join("one"));
        o.max_steps = Some(5);
        o.lr = 0.0;
        o
    })
    .unwrap();
    assert_eq!(init.losses.len(), 5);
    assert!(whole.losses[4] < init.losses[4], "{:?} vs {:?}", whole.losses, init.losses);
}

#[test]
fn resume_with_other_settings_is_refused() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("a");
    let mut first = options(&out);
    first.stop_after = Some(1);
    assert!(matches!(train(&first), Err(Error::Interrupted(_))));
    let mut other = options(&out);
    other.resume = Some(first.checkpoint_path());
    other.lr = 1e-3;
    let e = train(&other).expect_err("resumed with another lr").to_string();
    assert!(e.contains("other settings") && e.contains("hyperparameters"), "{e}");
    let mut missing = options(&out);
    missing.resume = Some(d.path().join("nowhere"));
    let e = train(&missing).err().unwrap().to_string();
    assert!(e.contains("nowhere"), "{e}");
}

/// `--grad-checkpoint` (blocks recomputed in the backward pass) trains the same adapter as
/// keeping the activations, dropout included.
#[test]
fn gradient_checkpointing_gives_the_same_training() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let run = |checkpoint: bool, name: &str| {
        let mut o = options(&d.path().join(name));
        o.lora.target = "all-linear".into();
        o.grad_accum = 2;
        o.max_steps = Some(3);
        o.grad_checkpoint = checkpoint;
        let r = train(&o).unwrap();
        (r, tensors(&d.path().join(name)))
    };
    let ((plain, a), (ckpt, b)) = (run(false, "plain"), run(true, "ckpt"));
    for (x, y) in plain.losses.iter().zip(&ckpt.losses) {
        assert!((x - y).abs() <= 1e-6 * x.abs(), "losses {:?} vs {:?}", plain.losses, ckpt.losses);
    }
    for ((name, va), (_, vb)) in a.iter().zip(&b) {
        let (dmax, m) = peftrt_conformance::max_abs_diff(vb, va);
        assert!(dmax <= 1e-5 * m, "{name}: max |Δ| {dmax} of {m}");
    }
}
