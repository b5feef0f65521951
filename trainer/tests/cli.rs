//! The `trainer` binary end to end, and what a run reports: metrics JSONL with evaluation
//! losses, a held-out split, the clean stop on a non-finite loss (last good checkpoint kept).

use peftrt_conformance::fixture;
use peftrt_trainer::train::{train, TrainOptions};
use peftrt_trainer::Error;
use serde_json::Value;
use std::process::Command;

fn trainer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
}

#[test]
fn train_command_writes_adapter_and_metrics() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("adapter");
    let run = trainer()
        .arg("train")
        .args(["--base".as_ref(), fixture("tiny-llama").as_os_str()])
        .args(["--data".as_ref(), fixture("trainer/chat.jsonl").as_os_str()])
        .args(["--output".as_ref(), out.as_os_str()])
        .args(["--max-steps", "4", "--batch-size", "2", "--eval-split", "0.34", "--eval-every", "2"])
        .args(["--target", "all-linear", "--rslora", "--r", "4", "--dropout", "0", "--device", "cpu", "--quiet"])
        .args(["--dataset-version", "v1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("eval loss") && stderr.contains("4 steps"), "{stderr}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "peftrt_provenance.json",
        "training_metrics.jsonl",
        "loss_curve.png",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let text = std::fs::read_to_string(out.join("training_metrics.jsonl")).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    let evals: Vec<u64> =
        lines.iter().filter(|l| l.get("eval_loss").is_some()).map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(evals, [2, 4]);
    for l in &lines {
        for k in ["loss", "lr", "grad_norm", "tokens_per_s", "tokens", "response_tokens", "step_s", "epoch"] {
            assert!(l[k].is_number(), "{k} in {l}");
        }
    }
    let prov: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("peftrt_provenance.json")).unwrap()).unwrap();
    assert_eq!(prov["dataset"]["version"], "v1");
    assert_eq!(prov["hyperparameters"]["eval_split"], 0.34);
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["use_rslora"], true);
    assert_eq!(cfg["target_modules"].as_array().map(Vec::len), Some(14));
}

#[test]
fn conflicting_options_are_refused() {
    let run = trainer()
        .args(["train", "--base", "b", "--data", "d", "--output", "o", "--init-adapter", "a", "--r", "4"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && stderr.contains("--init-adapter") && stderr.contains("--r"), "{stderr}");
    let run =
        trainer().args(["train", "--base", "b", "--data", "d", "--output", "o", "--device", "tpu"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && stderr.contains("--device tpu"), "{stderr}");
}

/// A loss that becomes NaN/inf stops the run with a clear error: no adapter, the last good
/// checkpoint kept.
#[test]
fn non_finite_loss_stops_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("adapter");
    let mut o = TrainOptions::new(fixture("tiny-llama"), fixture("trainer/chat.jsonl"), out.clone());
    o.lr = 1e30; // AdamW moves every weight by ~lr: the second step overflows
    o.max_steps = Some(4);
    o.batch_size = 2;
    o.checkpoint_every = Some(1);
    o.max_grad_norm = None;
    let e = match train(&o) {
        Err(Error::NonFinite(msg)) => msg,
        other => panic!("expected a non-finite stop, got {:?}", other.map(|r| r.losses)),
    };
    assert!(e.contains("not finite") && e.contains("last good checkpoint") && e.contains("--lr"), "{e}");
    assert!(!out.exists());
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(o.checkpoint_path().join("trainer_state.json")).unwrap())
            .unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!(step >= 1 && state["losses"].as_array().unwrap().iter().all(|l| l.as_f64().is_some_and(f64::is_finite)));
    assert!(e.contains(&format!("step {}", step + 1)), "{e}");
}

/// `--mix-data`: general instruction data (here in another format) joins each epoch at the
/// asked ratio, changing what is trained on.
#[test]
fn mix_data_joins_the_training_stream() {
    let d = tempfile::tempdir().unwrap();
    let run = |mix: bool, name: &str| {
        let mut o = TrainOptions::new(fixture("tiny-llama"), fixture("trainer/chat.jsonl"), d.path().join(name));
        o.max_steps = Some(4);
        o.batch_size = 4;
        o.lora.dropout = 0.0;
        if mix {
            o.mix_data = Some(fixture("trainer/alpaca.jsonl"));
            o.mix_ratio = 0.25; // 6 chat examples + 2 alpaca ones per epoch
        }
        train(&o).unwrap()
    };
    let (plain, mixed) = (run(false, "plain"), run(true, "mixed"));
    assert_eq!((plain.n_examples, mixed.n_examples), (6, 8));
    assert_ne!(plain.losses, mixed.losses);
    let prov: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("mixed/peftrt_provenance.json")).unwrap()).unwrap();
    assert_eq!(prov["hyperparameters"]["mix_data"], "alpaca.jsonl");
    assert_eq!(prov["hyperparameters"]["mix_ratio"], 0.25);
}

/// Ctrl-C (SIGINT) stops the binary after the current step with a checkpoint, and `--resume`
/// finishes the run.
#[test]
fn ctrl_c_writes_a_checkpoint_and_resume_finishes() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("adapter");
    let args = |extra: &[&str]| {
        let mut c = trainer();
        c.arg("train")
            .args(["--base".as_ref(), fixture("tiny-llama").as_os_str()])
            .args(["--data".as_ref(), fixture("trainer/chat.jsonl").as_os_str()])
            .args(["--output".as_ref(), out.as_os_str()])
            .args(["--max-steps", "150", "--batch-size", "1", "--device", "cpu", "--quiet"])
            .args(extra)
            .stderr(std::process::Stdio::piped());
        c
    };
    let child = args(&[]).spawn().unwrap();
    let metrics = d.path().join("adapter-metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 2 {
        assert!(started.elapsed().as_secs() < 120, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let run = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && stderr.contains("interrupted after step"), "{stderr}");
    assert!(!out.exists(), "adapter written by an interrupted run");
    let ckpt = d.path().join("adapter-checkpoint");
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap()).unwrap();
    let stopped = state["step"].as_u64().unwrap();
    assert!((2..150).contains(&stopped), "stopped at {stopped}");

    let run = args(&["--resume", ckpt.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(out.join("adapter_model.safetensors").is_file());
    let text = std::fs::read_to_string(out.join("training_metrics.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 150, "the metrics cover the whole run");
}
