//! The trainer against transformers + PEFT training (tests/fixtures/trainer, made by
//! scripts/make_trainer_fixtures.py): from the same initial adapter, on the same batches with the
//! same hyper-parameters (dropout 0, CPU, f32), the losses of the first 5 steps and the adapter
//! after them match to 1e-4 relative — plain LoRA on q/v (tiny-llama, chat data) and rsLoRA on
//! all linear layers (tiny-qwen2, alpaca data). Then the trained adapter loads in the runtime,
//! which reproduces the trainer's logits. Issue #6, "Conformance".

use peftrt::weights::WeightStore;
use peftrt::{Adapter, LoadOptions, Model};
use peftrt_conformance::{fixture, max_abs_diff, session_logits, Reference};
use peftrt_trainer::base::Base;
use peftrt_trainer::data::{Dataset, Encoder, Format};
use peftrt_trainer::lora::{Init, LoraSet};
use peftrt_trainer::model::{BaseStorage, Pass};
use peftrt_trainer::optim::{AdamWConfig, Schedule};
use peftrt_trainer::train::{train, TrainOptions};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Tensor};

const REL_TOL: f64 = 1e-4;

fn cases() -> Value {
    let text = std::fs::read_to_string(fixture("trainer/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The run of one case, as the fixture script ran it.
fn options(name: &str, case: &Value, t: &Value, out: &Path) -> TrainOptions {
    let base = fixture(case["base"].as_str().unwrap());
    let data = fixture(&format!("trainer/{}", case["data"].as_str().unwrap()));
    let mut o = TrainOptions::new(base, data, out.to_path_buf());
    o.lora.init_adapter = Some(fixture(&format!("trainer/{name}/init")));
    o.lora.dropout = 0.0;
    let u = |k: &str| t[k].as_u64().unwrap();
    let f = |k: &str| t[k].as_f64().unwrap();
    o.batch_size = u("batch_size") as usize;
    o.grad_accum = u("grad_accum") as usize;
    o.max_steps = Some(u("steps"));
    o.max_seq_len = u("max_seq_len") as usize;
    o.lr = f("lr");
    o.warmup_steps = u("warmup_steps");
    o.schedule = Schedule::parse(t["schedule"].as_str().unwrap()).unwrap();
    o.adamw = AdamWConfig {
        beta1: t["betas"][0].as_f64().unwrap(),
        beta2: t["betas"][1].as_f64().unwrap(),
        eps: f("eps"),
        weight_decay: f("weight_decay"),
    };
    o.max_grad_norm = Some(f("max_grad_norm"));
    o.shuffle = false;
    o.device = Device::Cpu;
    o
}

fn json_list(r: &Reference, key: &str) -> Vec<f64> {
    serde_json::from_str(&r.metadata[key]).unwrap()
}

/// The trainer tokenises the data file exactly as the fixture script did.
fn check_tokens(name: &str, opts: &TrainOptions, r: &Reference) {
    let base = Base::load(&opts.base, BaseStorage::Float, Device::Cpu).unwrap();
    let enc = Encoder { tokenizer: base.runtime.tokenizer().unwrap(), eos: base.eos(), max_seq_len: opts.max_seq_len };
    let data = Dataset::load(&opts.data, None, &enc).unwrap();
    assert!(matches!(data.format, Format::Chat | Format::Alpaca));
    assert!(data.n_truncated >= 1, "{name}: the fixture data has a truncated example");
    for (k, ex) in data.examples.iter().enumerate() {
        let ids: Vec<i64> = r.tokens(&format!("ids_{k}")).iter().map(|&t| i64::from(t)).collect();
        let trained: Vec<bool> = r.tokens(&format!("trained_{k}")).iter().map(|&t| t != 0).collect();
        assert_eq!(ex.ids, ids, "{name}: token ids of example {k}");
        assert_eq!(ex.trained, trained, "{name}: response mask of example {k}");
    }
    assert!(!r.has(&format!("ids_{}", data.examples.len())), "{name}: example count");
}

/// max |a − b| ≤ tol · max |b| for two adapter files, tensor by tensor; returns the worst ratio.
fn compare_adapters(name: &str, ours: &Path, peft: &Path) -> f64 {
    // SAFETY: test files, not modified while mapped.
    let (a, b) = unsafe { (WeightStore::open_file(ours).unwrap(), WeightStore::open_file(peft).unwrap()) };
    let names = |s: &WeightStore| s.tensors().iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b), "{name}: adapter tensor names");
    let mut worst = 0.0f64;
    for t in b.tensors() {
        let o = a.get(&t.name).unwrap();
        assert_eq!(o.shape, t.shape, "{name}: {}", t.name);
        let (d, m) = max_abs_diff(&o.to_f32_vec(), &t.to_f32_vec());
        let ratio = f64::from(d) / f64::from(m);
        assert!(ratio <= REL_TOL, "{name}: {}: max |Δ| {d} vs max |w| {m}", t.name);
        worst = worst.max(ratio);
    }
    worst
}

#[test]
fn five_steps_match_peft() {
    tch::set_num_threads(1);
    let spec = cases();
    for (name, case) in spec["cases"].as_object().unwrap() {
        let dir = fixture(&format!("trainer/{name}"));
        let r = Reference::load(&dir.join("reference.safetensors")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("adapter");
        let opts = options(name, case, &spec["train"], &out);
        check_tokens(name, &opts, &r);

        let report = train(&opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (want_loss, want_lr, want_norm) =
            (json_list(&r, "losses"), json_list(&r, "lrs"), json_list(&r, "grad_norms"));
        assert_eq!(report.losses.len(), want_loss.len());
        for (step, (got, want)) in report.losses.iter().zip(&want_loss).enumerate() {
            let rel = (got - want).abs() / want.abs();
            eprintln!("{name} step {}: loss {got:.7} vs PEFT {want:.7} (rel {rel:.2e})", step + 1);
            assert!(rel <= REL_TOL, "{name} step {}: loss {got} vs PEFT {want}", step + 1);
        }
        for (got, want) in report.lrs.iter().zip(&want_lr) {
            assert!((got - want).abs() <= 1e-12 * want.abs().max(1e-3), "lr {got} vs {want}");
        }
        for (got, want) in report.grad_norms.iter().zip(&want_norm) {
            assert!((got - want).abs() <= REL_TOL * want, "{name}: grad norm {got} vs PEFT {want}");
        }
        let worst = compare_adapters(
            name,
            &out.join("adapter_model.safetensors"),
            &dir.join("final/adapter_model.safetensors"),
        );
        eprintln!("{name}: final adapter max |Δ| / max |w| = {worst:.2e}");
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        let peft_cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("final/adapter_config.json")).unwrap()).unwrap();
        for key in ["r", "lora_alpha", "use_rslora", "target_modules", "peft_type", "task_type", "use_dora"] {
            assert_eq!(cfg[key], peft_cfg[key], "{name}: adapter_config.json {key}");
        }

        runtime_reproduces_trainer_logits(name, &opts, &out);
    }
}

/// The runtime loads the trained adapter (its fingerprint check passes on the right base) and
/// its logits equal the trainer's forward pass with the same adapter.
fn runtime_reproduces_trainer_logits(name: &str, opts: &TrainOptions, adapter_dir: &Path) {
    let model = Arc::new(Model::load(&opts.base, &LoadOptions::default()).unwrap());
    let adapter = Arc::new(Adapter::load(adapter_dir, &model).unwrap_or_else(|e| panic!("{name}: {e}")));
    let r = Reference::load(&opts.base.join("reference.safetensors")).unwrap();
    let tokens = r.tokens("tokens_b");
    let served = session_logits(&model, &[(adapter, 1.0)], &tokens, 1);

    let base = Base::load(&opts.base, BaseStorage::Float, Device::Cpu).unwrap();
    let lora =
        LoraSet::from_adapter(&base.model.linear_shapes(), base.model.device, adapter_dir, 0.0, Init::Kaiming).unwrap();
    let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
    let logits =
        tch::no_grad(|| base.model.forward(&Tensor::from_slice(&ids).reshape([1, -1]), Pass::new(Some(&lora), false)))
            .unwrap();
    let trained = Vec::<f32>::try_from(&logits.reshape([-1])).unwrap();
    let (d, m) = max_abs_diff(&served, &trained);
    eprintln!("{name}: runtime vs trainer logits: max |Δ| = {d:.3e}, max |logit| = {m:.3}");
    assert!(d <= 1e-4 * m, "{name}: runtime logits differ from the trainer's by {d} (max |logit| {m})");
    // And the base alone differs: the adapter is really applied.
    let plain = session_logits(&model, &[], &tokens, 1);
    assert!(max_abs_diff(&plain, &trained).0 > 1e-2 * m, "{name}: the adapter changes nothing");
}

/// The fingerprint in the trained adapter makes the runtime refuse another base with the same
/// module names and shapes; the provenance is in the header metadata and the sidecar.
#[test]
fn runtime_refuses_the_adapter_on_another_base() {
    let spec = cases();
    let (name, case) = spec["cases"].as_object().unwrap().iter().find(|(_, c)| c["base"] == "tiny-llama").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapter");
    let mut opts = options(name, case, &spec["train"], &out);
    opts.max_steps = Some(1);
    train(&opts).unwrap();
    // tiny-mistral has the same module names and shapes, but is another model.
    let other = Model::load(&fixture("tiny-mistral"), &LoadOptions::default()).unwrap();
    let e = Adapter::load(&out, &other).err().expect("loaded on the wrong base").to_string();
    assert!(e.contains("different base model"), "{e}");
    let meta = unsafe { WeightStore::open_file(&out.join("adapter_model.safetensors")).unwrap() }.metadata().clone();
    for key in ["peftrt.base_model", "peftrt.dataset", "peftrt.hyperparameters", "peftrt.trainer"] {
        assert!(meta.contains_key(key), "metadata {key} missing: {meta:?}");
    }
    let sidecar: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("peftrt_provenance.json")).unwrap()).unwrap();
    assert_eq!(sidecar["dataset"]["file"], case["data"]);
    assert_eq!(sidecar["dataset"]["sha256"].as_str().map(str::len), Some(64));
}

/// PEFT loads the trained adapter (`adapter_config.json`, keys, shapes) and computes the
/// trainer's logits (scripts/check_peft_loads.py, run with `PEFTRT_PYTHON`; `make test` sets it,
/// plain `cargo test` skips unless PEFTRT_REQUIRE_MODELS=1).
#[test]
fn peft_loads_the_trained_adapter() {
    let python = match std::env::var_os("PEFTRT_PYTHON") {
        Some(p) => std::path::PathBuf::from(p),
        None if std::env::var_os("PEFTRT_REQUIRE_MODELS").is_some() => panic!("PEFTRT_PYTHON is not set"),
        None => return eprintln!("skipped: set PEFTRT_PYTHON to a Python with transformers and peft"),
    };
    let spec = cases();
    for (name, case) in spec["cases"].as_object().unwrap() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("adapter");
        let mut opts = options(name, case, &spec["train"], &out);
        opts.max_steps = Some(2);
        train(&opts).unwrap();
        let tokens = Reference::load(&opts.base.join("reference.safetensors")).unwrap().tokens("tokens_b");
        let base = Base::load(&opts.base, BaseStorage::Float, Device::Cpu).unwrap();
        let lora =
            LoraSet::from_adapter(&base.model.linear_shapes(), base.model.device, &out, 0.0, Init::Kaiming).unwrap();
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let logits = tch::no_grad(|| {
            base.model.forward(&Tensor::from_slice(&ids).reshape([1, -1]), Pass::new(Some(&lora), false))
        })
        .unwrap();
        let vocab = logits.size()[2] as usize;
        let values = Vec::<f32>::try_from(&logits.reshape([-1])).unwrap();
        let ids32: Vec<u8> = tokens.iter().flat_map(|&t| (t as i32).to_le_bytes()).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = [
            (
                "tokens",
                safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![tokens.len()], &ids32).unwrap(),
            ),
            (
                "logits",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![tokens.len(), vocab], &bytes)
                    .unwrap(),
            ),
        ];
        let file = tmp.path().join("logits.safetensors");
        std::fs::write(&file, safetensors::serialize(views, None).unwrap()).unwrap();
        let status = std::process::Command::new(&python)
            .arg(peftrt_conformance::repo_root().join("scripts/check_peft_loads.py"))
            .args([opts.base.as_os_str(), out.as_os_str(), file.as_os_str()])
            .status()
            .unwrap();
        assert!(status.success(), "{name}: PEFT could not load the trained adapter with the trainer's logits");
    }
}
