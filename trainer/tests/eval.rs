//! `trainer eval`: the loss is the training loss (checked against PEFT's first-step loss), and
//! generation reports JSON / schema validity (checked on an adapter taught to answer in JSON).

use peftrt_conformance::fixture;
use peftrt_trainer::eval::{evaluate, EvalOptions};
use peftrt_trainer::train::{train, TrainOptions};
use serde_json::{json, Value};

/// The first optimiser step of the `llama-qv` fixture saw examples 0–3 of chat.jsonl with the
/// initial adapter: evaluating that adapter on those examples gives PEFT's step-1 loss.
#[test]
fn eval_loss_is_pefts_training_loss() {
    let d = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture("trainer/chat.jsonl")).unwrap();
    let first4: String = text.lines().take(4).map(|l| format!("{l}\n")).collect();
    let data = d.path().join("first4.jsonl");
    std::fs::write(&data, first4).unwrap();
    let mut o = EvalOptions::new(fixture("tiny-llama"), data);
    o.adapter = Some(fixture("trainer/llama-qv/init"));
    o.max_seq_len = 100;
    let r = evaluate(&o).unwrap();
    let reference = peftrt_conformance::Reference::load(&fixture("trainer/llama-qv/reference.safetensors")).unwrap();
    let losses: Vec<f64> = serde_json::from_str(&reference.metadata["losses"]).unwrap();
    eprintln!("eval loss {} vs PEFT step-1 loss {}", r.loss, losses[0]);
    assert!((r.loss - losses[0]).abs() <= 1e-5 * losses[0], "{} vs {}", r.loss, losses[0]);
    assert_eq!(r.examples, 4);
    assert!((r.perplexity - r.loss.exp()).abs() < 1e-9 * r.perplexity);
    assert_eq!((r.generated, r.schema_valid), (0, None));
}

#[test]
fn generation_reports_json_and_schema_validity() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("json.jsonl");
    let records = [("Give the record.", "{\"a\": 1}"), ("Another record.", "{\"a\": 2}")];
    let lines: String = records.iter().map(|(p, c)| format!("{}\n", json!({"prompt": p, "completion": c}))).collect();
    std::fs::write(&data, lines).unwrap();
    let adapter = d.path().join("adapter");
    let mut t = TrainOptions::new(fixture("tiny-llama"), data.clone(), adapter.clone());
    t.lora.target = "all-linear".into();
    t.lora.dropout = 0.0;
    t.lr = 1e-2;
    t.max_steps = Some(40);
    t.schedule = peftrt_trainer::optim::Schedule::Constant;
    let trained = train(&t).unwrap();
    assert!(trained.losses[39] < 0.05, "not learnt: {:?}", &trained.losses[30..]);

    let schema = |name: &str, v: Value| {
        let p = d.path().join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p
    };
    let mut o = EvalOptions::new(fixture("tiny-llama"), data);
    o.adapter = Some(adapter);
    o.max_new_tokens = 16;
    o.json_schema =
        Some(schema("a.json", json!({"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}})));
    let r = evaluate(&o).unwrap();
    assert_eq!((r.generated, r.json_valid, r.schema_valid), (2, 2, Some(2)), "{r:?}");
    o.json_schema = Some(schema("b.json", json!({"type": "object", "required": ["b"]})));
    let r = evaluate(&o).unwrap();
    assert_eq!((r.json_valid, r.schema_valid), (2, Some(0)), "{r:?}");
    assert_eq!(r.to_json()["schema_valid_rate"], json!(0.0));
    // The base alone does not answer in JSON.
    o.adapter = None;
    let r = evaluate(&o).unwrap();
    assert_eq!((r.generated, r.json_valid), (2, 0), "{r:?}");
    // An unsupported schema keyword is refused, naming it.
    o.json_schema = Some(schema("c.json", json!({"type": "string", "pattern": "^a"})));
    let e = evaluate(&o).unwrap_err().to_string();
    assert!(e.contains("c.json") && e.contains("pattern"), "{e}");
}
