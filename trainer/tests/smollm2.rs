//! The trainer's forward pass on the real SmolLM2-135M-Instruct (30 layers, 9 query / 3 kv
//! heads, tied head) against transformers, and with a PEFT adapter against PEFT. Needs the
//! model and references that `make test` makes (`make models`, scripts/smollm2_reference.py,
//! scripts/smollm2_adapters.py); skipped with a notice without them.

use peftrt_conformance::{max_abs_diff, real_model_path, Reference};
use peftrt_trainer::base::Base;
use peftrt_trainer::lora::{Init, LoraSet};
use peftrt_trainer::model::{BaseStorage, Pass};
use tch::{Device, Tensor};

fn logits(base: &Base, lora: Option<&LoraSet>, tokens: &[u32]) -> Vec<f32> {
    let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
    let out = tch::no_grad(|| base.model.forward(&Tensor::from_slice(&ids).reshape([1, -1]), Pass::new(lora, false)))
        .unwrap();
    Vec::<f32>::try_from(&out.reshape([-1])).unwrap()
}

fn check(what: &str, got: &[f32], want: &[f32]) {
    let (d, m) = max_abs_diff(got, want);
    eprintln!("{what}: max |Δ| = {d:.3e}, max |logit| = {m:.3}, ratio {:.2e}", d / m);
    assert!(d <= 1e-5 * m, "{what}: max |Δ| {d} vs max |logit| {m}");
}

#[test]
fn smollm2_logits_match_transformers_and_peft() {
    let Some(dir) = real_model_path("PEFTRT_SMOLLM2_DIR", "smollm2-135m-instruct") else { return };
    let Some(refs) = real_model_path("PEFTRT_SMOLLM2_REF_DIR", "reference") else { return };
    let base = Base::load(&dir, BaseStorage::Float, Device::Cpu).unwrap();
    let r = Reference::load(&refs.join("smollm2_reference.safetensors")).unwrap();
    for case in ["text", "chat"] {
        let got = logits(&base, None, &r.tokens(&format!("tokens_{case}")));
        check(&format!("smollm2 {case}"), &got, r.logits(&format!("logits_{case}")));
    }
    let Some(adapters) = real_model_path("PEFTRT_SMOLLM2_ADAPTERS_DIR", "reference/adapters") else { return };
    let r = Reference::load(&refs.join("smollm2_adapters.safetensors")).unwrap();
    for (name, key) in [("qkvo-r16", "qkvo_r16"), ("all-linear-r16", "all_linear_r16")] {
        let lora = LoraSet::from_adapter(
            &base.model.linear_shapes(),
            base.model.device,
            &adapters.join(name),
            0.0,
            Init::Kaiming,
        )
        .unwrap();
        let got = logits(&base, Some(&lora), &r.tokens("tokens_text"));
        check(&format!("smollm2 + {name}"), &got, r.logits(&format!("logits_{key}_text")));
    }
}
