//! The three data formats tokenise as documented (trainer/src/data.rs): checked against the
//! runtime's tokenizer and chat template directly.

use peftrt::{LoadOptions, Message, Model};
use peftrt_conformance::fixture;
use peftrt_trainer::data::{Dataset, Encoder, Format};
use std::path::Path;

fn load(model_dir: &Path, jsonl: &str, max_seq_len: usize) -> (Dataset, Model) {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("data.jsonl");
    std::fs::write(&path, jsonl).unwrap();
    let model = Model::load(model_dir, &LoadOptions::default()).unwrap();
    let enc = Encoder { tokenizer: model.tokenizer().unwrap(), eos: Some(2), max_seq_len };
    (Dataset::load(&path, None, &enc).unwrap(), model)
}

fn ids(v: Vec<u32>) -> Vec<i64> {
    v.into_iter().map(i64::from).collect()
}

#[test]
fn completion_and_text_records() {
    let (data, model) = load(
        &fixture("tiny-llama"),
        "{\"prompt\": \"The sun\", \"completion\": \" came out.\"}\n\n{\"text\": \"def add(a, b):\"}\n",
        1000,
    );
    let tok = model.tokenizer().unwrap();
    assert_eq!(data.format, Format::Completion);
    let (p, c) = (ids(tok.encode("The sun", true).unwrap()), ids(tok.encode(" came out.", false).unwrap()));
    let e = &data.examples[0];
    assert_eq!(e.ids, [p.clone(), c.clone(), vec![2]].concat());
    assert_eq!(e.trained, [vec![false; p.len()], vec![true; c.len() + 1]].concat());
    assert_eq!(e.line, 1);
    let t = ids(tok.encode("def add(a, b):", true).unwrap());
    assert_eq!(data.examples[1].ids, [t.clone(), vec![2]].concat());
    assert!(data.examples[1].trained.iter().all(|&x| x));
    assert_eq!(data.examples[1].line, 3, "blank lines are skipped but counted");
}

#[test]
fn alpaca_uses_the_chat_template_when_there_is_one() {
    let (data, model) =
        load(&fixture("tiny-llama"), "{\"instruction\": \"Sort.\", \"input\": \"3, 1\", \"output\": \"1, 3\"}\n", 1000);
    let tok = model.tokenizer().unwrap();
    let user = Message::new("user", "Sort.\n\n3, 1");
    let prompt = tok.apply_chat_template(std::slice::from_ref(&user), true).unwrap();
    let full = tok.apply_chat_template(&[user, Message::new("assistant", "1, 3")], false).unwrap();
    let p = ids(tok.encode(&prompt, false).unwrap());
    let r = ids(tok.encode(&full[prompt.len()..], false).unwrap());
    let e = &data.examples[0];
    assert_eq!(e.ids, [p.clone(), r.clone()].concat());
    assert_eq!(e.trained, [vec![false; p.len()], vec![true; r.len()]].concat());
    assert!(full[prompt.len()..].starts_with("1, 3<|im_end|>"));
}

#[test]
fn alpaca_without_a_chat_template_uses_the_alpaca_prompt() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("plain");
    std::fs::create_dir(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("tiny-llama").join(f), dir.join(f)).unwrap();
    }
    let (data, model) = load(&dir, "{\"instruction\": \"Say hi.\", \"output\": \"Hi.\"}\n", 1000);
    let tok = model.tokenizer().unwrap();
    let p = ids(tok.encode("### Instruction:\nSay hi.\n\n### Response:\n", true).unwrap());
    let r = ids(tok.encode("Hi.", false).unwrap());
    let e = &data.examples[0];
    assert_eq!(e.ids, [p.clone(), r.clone(), vec![2]].concat());
    assert_eq!(e.trained, [vec![false; p.len()], vec![true; r.len() + 1]].concat());
}

#[test]
fn truncation_is_counted_and_empty_responses_dropped() {
    let long = "x ".repeat(200);
    let jsonl = format!(
        "{{\"prompt\": \"a\", \"completion\": \"{long}\"}}\n{{\"prompt\": \"{long}\", \"completion\": \"b\"}}\n{{\"prompt\": \"a\", \"completion\": \"b\"}}\n"
    );
    let (data, _) = load(&fixture("tiny-llama"), &jsonl, 32);
    assert_eq!((data.n_truncated, data.n_dropped, data.examples.len()), (2, 1, 2));
    assert!(data.examples.iter().all(|e| e.ids.len() <= 32));
    assert_eq!(data.examples[0].ids.len(), 32);
}
