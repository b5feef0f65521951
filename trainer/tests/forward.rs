//! The trainer's libtorch forward pass against transformers (+ PEFT) on the tiny fixtures
//! (tests/fixtures, made by scripts/make_fixtures.py and scripts/make_adapter_fixtures.py):
//! logits at every position, f32 on the CPU, within 1e-5 of the largest logit.

use peftrt_conformance::{fixture, max_abs_diff, Reference};
use peftrt_trainer::base::Base;
use peftrt_trainer::lora::{Init, LoraSet};
use peftrt_trainer::model::{BaseStorage, Pass};
use tch::{Device, Tensor};

/// Stricter than the runtime's 1e-3: the same float32 operations as transformers.
const REL_TOL: f32 = 1e-5;

fn logits(base: &Base, lora: Option<&LoraSet>, tokens: &[u32]) -> Vec<f32> {
    let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
    let ids = Tensor::from_slice(&ids).reshape([1, -1]);
    let out = tch::no_grad(|| base.model.forward(&ids, Pass::new(lora, false))).unwrap();
    Vec::<f32>::try_from(&out.reshape([-1])).unwrap()
}

fn check(what: &str, got: &[f32], want: &[f32]) {
    let (d, m) = max_abs_diff(got, want);
    eprintln!("{what}: max |Δ| = {d:.3e}, max |logit| = {m:.3}, ratio {:.2e}", d / m);
    assert!(d.is_finite() && d <= REL_TOL * m, "{what}: max |Δlogit| {d} exceeds {REL_TOL} × {m}");
}

#[test]
fn base_logits_match_transformers() {
    tch::set_num_threads(1);
    for name in ["tiny-llama", "tiny-llama-bf16", "tiny-llama-f16", "tiny-llama3-tied", "tiny-mistral", "tiny-qwen2"] {
        let dir = fixture(name);
        let base = Base::load(&dir, BaseStorage::Float, Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        let r = Reference::load(&dir.join("reference.safetensors")).unwrap();
        for case in ["a", "b", "chat"] {
            let got = logits(&base, None, &r.tokens(&format!("tokens_{case}")));
            check(&format!("{name} {case}"), &got, r.logits(&format!("logits_{case}")));
        }
    }
}

/// PEFT adapters loaded with --init-adapter give PEFT's logits: scaling (alpha/r, rsLoRA,
/// rank/alpha patterns), layer selection, biases kept under the LoRA sum.
#[test]
fn adapter_logits_match_peft() {
    tch::set_num_threads(1);
    let r = Reference::load(&fixture("adapters/reference.safetensors")).unwrap();
    for (adapter, base_name) in [
        ("llama-qv", "tiny-llama"),
        ("llama-all-rslora", "tiny-llama"),
        ("llama-patterns", "tiny-llama"),
        ("llama-layers", "tiny-llama"),
        ("qwen2-qkvo", "tiny-qwen2"),
    ] {
        let base = Base::load(&fixture(base_name), BaseStorage::Float, Device::Cpu).unwrap();
        let lora = LoraSet::from_adapter(
            &base.model.linear_shapes(),
            base.model.device,
            &fixture(&format!("adapters/{adapter}")),
            0.0,
            Init::Kaiming,
        )
        .unwrap_or_else(|e| panic!("{adapter}: {e}"));
        let tokens = r.tokens(&format!("tokens_b_{}", base_name.replace('-', "_")));
        let got = logits(&base, Some(&lora), &tokens);
        check(adapter, &got, r.logits(&format!("logits_{}", adapter.replace('-', "_"))));
    }
}

#[test]
fn dora_adapters_are_refused() {
    let base = Base::load(&fixture("tiny-llama"), BaseStorage::Float, Device::Cpu).unwrap();
    let e = LoraSet::from_adapter(
        &base.model.linear_shapes(),
        base.model.device,
        &fixture("adapters/llama-dora"),
        0.0,
        Init::Kaiming,
    )
    .err()
    .expect("DoRA accepted")
    .to_string();
    assert!(e.contains("DoRA"), "{e}");
}
