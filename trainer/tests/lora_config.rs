//! LoRA configuration as PEFT: targets (names, all-linear, regex), layer selection,
//! initialisation (Kaiming-uniform or Gaussian A, zero B), and what the runtime then loads.

use peftrt::{Adapter, LoadOptions, Model};
use peftrt_conformance::fixture;
use peftrt_trainer::base::Base;
use peftrt_trainer::lora::{parse_targets, Init, LoraOptions, LoraSet, LoraSpec};
use peftrt_trainer::model::BaseStorage;
use peftrt_trainer::train::{train, TrainOptions};
use tch::Device;

fn modules(base: &Base, target: &str, layers: Option<Vec<usize>>, init: Init) -> LoraSet {
    let o =
        LoraOptions { r: 4, alpha: 8.0, dropout: 0.0, target: target.into(), layers, init, ..LoraOptions::default() };
    let spec = LoraSpec::from_options(&o).unwrap();
    tch::manual_seed(0);
    LoraSet::init(&base.model.linear_shapes(), base.model.device, spec).unwrap()
}

fn names(set: &LoraSet) -> Vec<String> {
    set.layers().map(|l| l.module.clone()).collect()
}

#[test]
fn targets_and_layers_select_like_peft() {
    let base = Base::load(&fixture("tiny-llama"), BaseStorage::Float, Device::Cpu).unwrap();
    let qv = names(&modules(&base, "v_proj,q_proj", None, Init::Kaiming));
    assert_eq!(
        qv,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj"
        ]
    );
    assert_eq!(names(&modules(&base, "all-linear", None, Init::Kaiming)).len(), 14, "all but lm_head");
    let re = names(&modules(&base, r".*\.1\.mlp\.(up|down)_proj", None, Init::Kaiming));
    assert_eq!(re, ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]);
    let l1 = names(&modules(&base, "q_proj,mlp.up_proj", Some(vec![1]), Init::Kaiming));
    assert_eq!(l1, ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]);
    let o = LoraOptions { r: 4, alpha: 8.0, dropout: 0.0, target: "qq_proj".into(), ..LoraOptions::default() };
    let spec = LoraSpec::from_options(&o).unwrap();
    let e = LoraSet::init(&base.model.linear_shapes(), base.model.device, spec)
        .err()
        .expect("unknown module accepted")
        .to_string();
    assert!(e.contains("qq_proj") && e.contains("matches no linear layer"), "{e}");
    assert!(parse_targets("q_proj,,v_proj").is_err());
    assert!(parse_targets("(unclosed").is_err());
}

#[test]
fn initialisation_follows_peft() {
    let base = Base::load(&fixture("tiny-llama"), BaseStorage::Float, Device::Cpu).unwrap();
    let vals = |t: &tch::Tensor| Vec::<f32>::try_from(&t.reshape([-1])).unwrap();
    let k = modules(&base, "all-linear", None, Init::Kaiming);
    for l in k.layers() {
        let a = vals(&l.a);
        let bound = 1.0 / (a.len() as f32 / 4.0).sqrt(); // in_features = numel / r
        assert!(a.iter().all(|x| x.abs() <= bound) && a.iter().any(|x| x.abs() > 0.5 * bound), "{}", l.module);
        assert!(vals(&l.b).iter().all(|&x| x == 0.0), "B starts at zero");
        assert_eq!(l.scale, 2.0);
    }
    let g = modules(&base, "all-linear", None, Init::Gaussian);
    let a: Vec<f32> = g.layers().flat_map(|l| vals(&l.a)).collect();
    let std = (a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32).sqrt();
    assert!((std - 0.25).abs() < 0.02, "std {std}, expected 1/r = 0.25");
}

#[test]
fn layer_selection_round_trips_through_the_runtime() {
    let d = tempfile::tempdir().unwrap();
    let mut o = TrainOptions::new(fixture("tiny-llama"), fixture("trainer/chat.jsonl"), d.path().join("a"));
    o.lora.target = "q_proj,up_proj".into();
    o.lora.layers = Some(vec![1]);
    o.lora.rslora = true;
    o.max_steps = Some(1);
    train(&o).unwrap();
    let model = Model::load(&fixture("tiny-llama"), &LoadOptions::default()).unwrap();
    let a = Adapter::load(&d.path().join("a"), &model).unwrap();
    assert_eq!(a.n_layers(), 2);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("a/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["layers_to_transform"], serde_json::json!([1]));
    assert_eq!(cfg["use_rslora"], true);
}
