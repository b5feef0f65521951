//! QLoRA: the frozen base kept as NF4 codes (the runtime's quantiser, the bytes `peftrt
//! quantize` writes), LoRA in f32. A short run lowers the loss, and the runtime serving the
//! adapter on the NF4 base reproduces the trainer's logits. Issue #6, "Conformance".

use peftrt::quantize::quantize_model;
use peftrt::{Adapter, LoadOptions, Model};
use peftrt_conformance::{fixture, max_abs_diff, session_logits, Reference};
use peftrt_trainer::base::Base;
use peftrt_trainer::lora::{Init, LoraSet};
use peftrt_trainer::model::{BaseStorage, Pass};
use peftrt_trainer::train::{train, TrainOptions};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// The trainer's 4-bit weights are the runtime's, value for value: quantised here from the
/// float model, or read from `peftrt quantize`'s NF4 checkpoint.
#[test]
fn nf4_weights_equal_the_runtimes() {
    let d = tempfile::tempdir().unwrap();
    let nf4_dir = d.path().join("nf4");
    quantize_model(&fixture("tiny-llama"), &nf4_dir, &Default::default()).unwrap();
    let served = Model::load(&nf4_dir, &LoadOptions::default()).unwrap();
    for (what, dir) in [("quantised by the trainer", fixture("tiny-llama")), ("NF4 checkpoint", nf4_dir.clone())] {
        let base = Base::load(&dir, BaseStorage::Nf4, Device::Cpu).unwrap();
        let mut n = 0;
        for (ours, theirs) in base.model.linears().zip(served.linears()).filter(|(l, _)| l.name != "lm_head") {
            assert_eq!(ours.name, theirs.name);
            let w = ours.weight(Kind::Float).unwrap();
            let got = Vec::<f32>::try_from(&w.reshape([-1])).unwrap();
            let want = theirs.to_f32_vec();
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: {} differs", ours.name);
            n += 1;
        }
        assert_eq!(n, 14, "{what}");
    }
}

#[test]
fn qlora_lowers_the_loss_and_the_runtime_serves_it_on_the_nf4_base() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("qlora");
    let mut o = TrainOptions::new(fixture("tiny-llama"), fixture("trainer/chat.jsonl"), out.clone());
    o.qlora = true;
    o.lora.target = "all-linear".into();
    o.lora.dropout = 0.0;
    o.batch_size = 3;
    o.max_steps = Some(8);
    o.lr = 1e-2;
    o.warmup_steps = 1;
    o.schedule = peftrt_trainer::optim::Schedule::Constant;
    o.shuffle = false;
    let report = train(&o).unwrap();
    let l = &report.losses;
    eprintln!("QLoRA losses: {l:?}");
    // Steps 1 and 7 (and 2 and 8) see the same batches (two batches per epoch).
    assert!(l[6] < 0.8 * l[0] && l[7] < 0.8 * l[1], "{l:?}");

    let nf4_dir = d.path().join("nf4");
    quantize_model(&fixture("tiny-llama"), &nf4_dir, &Default::default()).unwrap();
    let model = Arc::new(Model::load(&nf4_dir, &LoadOptions::default()).unwrap());
    let adapter = Arc::new(Adapter::load(&out, &model).unwrap());
    let tokens = Reference::load(&fixture("tiny-llama/reference.safetensors")).unwrap().tokens("tokens_b");
    let served = session_logits(&model, &[(adapter, 1.0)], &tokens, 1);

    let base = Base::load(&fixture("tiny-llama"), BaseStorage::Nf4, Device::Cpu).unwrap();
    let lora = LoraSet::from_adapter(&base.model.linear_shapes(), base.model.device, &out, 0.0, Init::Kaiming).unwrap();
    let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
    let logits =
        tch::no_grad(|| base.model.forward(&Tensor::from_slice(&ids).reshape([1, -1]), Pass::new(Some(&lora), false)))
            .unwrap();
    let ours = Vec::<f32>::try_from(&logits.reshape([-1])).unwrap();
    let (diff, max) = max_abs_diff(&served, &ours);
    eprintln!("runtime (NF4 base + adapter) vs trainer: max |Δ| = {diff:.3e}, max |logit| = {max:.3}");
    assert!(diff <= 1e-4 * max, "max |Δ| {diff} vs max |logit| {max}");
    let plain = session_logits(&model, &[], &tokens, 1);
    assert!(max_abs_diff(&plain, &ours).0 > 1e-2 * max, "the adapter changes nothing");
}
