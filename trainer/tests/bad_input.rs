//! Bad input gets a clear error (file, line, field, what to do) and leaves no adapter, complete
//! or partial, behind. Issue #6, "Bad input".

use peftrt_conformance::fixture;
use peftrt_trainer::train::{train, TrainOptions};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// A one-step run on tiny-llama with `data` written to `dir/data.jsonl`.
fn options(dir: &TempDir, data: &str) -> TrainOptions {
    let path = dir.path().join("data.jsonl");
    std::fs::write(&path, data).unwrap();
    let mut o = TrainOptions::new(fixture("tiny-llama"), path, dir.path().join("out"));
    o.max_steps = Some(1);
    o.batch_size = 2;
    o
}

const GOOD: &str = r#"{"instruction": "Say hi.", "output": "Hi."}"#;

/// The error of a run that must fail, after checking that it left nothing in the output's parent.
fn error_of(o: &TrainOptions) -> String {
    let e = train(o).expect_err("the run succeeded").to_string();
    assert_no_output(&o.output);
    e
}

fn assert_no_output(out: &Path) {
    assert!(!out.exists(), "{} was written", out.display());
    if let Some(parent) = out.parent().filter(|p| p.is_dir()) {
        let leftovers: Vec<PathBuf> = std::fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }
}

#[test]
fn malformed_line_is_named() {
    let d = tempfile::tempdir().unwrap();
    let e = error_of(&options(&d, &format!("{GOOD}\n{GOOD}\n{{\"instruction\": \"x\", \"output\": \n{GOOD}\n")));
    assert!(e.contains("data.jsonl:3") && e.contains("not a JSON object"), "{e}");
    let e = error_of(&options(&d, &format!("{GOOD}\n[1, 2]\n")));
    assert!(e.contains("data.jsonl:2") && e.contains("expected a JSON object"), "{e}");
}

#[test]
fn empty_dataset_is_refused() {
    let d = tempfile::tempdir().unwrap();
    for data in ["", "\n  \n"] {
        let e = error_of(&options(&d, data));
        assert!(e.contains("data.jsonl") && e.contains("no examples"), "{e}");
    }
}

#[test]
fn missing_field_is_named_with_the_format() {
    let d = tempfile::tempdir().unwrap();
    let e = error_of(&options(&d, &format!("{GOOD}\n{{\"instruction\": \"Say hi.\"}}\n")));
    assert!(e.contains("data.jsonl:2") && e.contains("missing field `output`") && e.contains("alpaca"), "{e}");
    assert!(e.contains("detected from line 1"), "{e}");
    // An explicit format that the records do not have.
    let mut o = options(&d, &format!("{GOOD}\n"));
    o.format = Some(peftrt_trainer::data::Format::Chat);
    let e = error_of(&o);
    assert!(e.contains("data.jsonl:1") && e.contains("missing field `messages`"), "{e}");
    let e = error_of(&options(&d, "{\"question\": \"x\", \"answer\": \"y\"}\n"));
    assert!(e.contains("cannot tell the format") && e.contains("--format"), "{e}");
    let e = error_of(&options(&d, "{\"instruction\": \"x\", \"output\": 3}\n"));
    assert!(e.contains("`output` must be a string, found a number"), "{e}");
}

#[test]
fn example_without_response_tokens_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let e = error_of(&options(&d, &format!("{GOOD}\n{{\"instruction\": \"Say hi.\", \"output\": \"\"}}\n")));
    assert!(e.contains("data.jsonl:2") && e.contains("no response tokens"), "{e}");
    let e = error_of(&options(&d, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n"));
    assert!(e.contains("data.jsonl:1") && e.contains("no assistant message"), "{e}");
    // Every response cut away by --max-seq-len.
    let mut o = options(&d, &format!("{GOOD}\n"));
    o.max_seq_len = 4;
    let e = error_of(&o);
    assert!(e.contains("--max-seq-len 4"), "{e}");
}

#[test]
fn base_of_the_wrong_kind_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut o = options(&d, &format!("{GOOD}\n"));
    o.base = fixture("adapters/llama-qv"); // an adapter, not a model
    let e = error_of(&o);
    assert!(e.contains("not a Hugging Face model directory") && e.contains("--init-adapter"), "{e}");
    o.base = d.path().join("data.jsonl"); // a file
    let e = error_of(&o);
    assert!(e.contains("not a directory"), "{e}");
}

#[test]
fn existing_output_needs_overwrite() {
    let d = tempfile::tempdir().unwrap();
    let mut o = options(&d, &format!("{GOOD}\n{GOOD}\n"));
    std::fs::create_dir(&o.output).unwrap();
    std::fs::write(o.output.join("keep.txt"), "mine").unwrap();
    let e = train(&o).expect_err("overwrote without --overwrite").to_string();
    assert!(e.contains("already exists") && e.contains("--overwrite"), "{e}");
    assert!(o.output.join("keep.txt").is_file());
    o.overwrite = true;
    train(&o).unwrap();
    assert!(o.output.join("adapter_model.safetensors").is_file() && !o.output.join("keep.txt").exists());
}

#[test]
fn unwritable_output_is_refused_before_training() {
    let d = tempfile::tempdir().unwrap();
    let mut o = options(&d, &format!("{GOOD}\n"));
    let file = d.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    o.output = file.join("adapter"); // its parent is a file
    let e = train(&o).expect_err("wrote under a file").to_string();
    assert!(e.contains("a-file"), "{e}");
    assert!(std::fs::read(&file).unwrap().is_empty());
}

#[test]
fn step_counts_of_zero_are_refused_before_training() {
    // `--checkpoint-every 0` divided by zero at the first step; `--stop-after 0` was ignored.
    let d = tempfile::tempdir().unwrap();
    for (every, after) in [(Some(0), None), (None, Some(0))] {
        let mut o = options(&d, &format!("{GOOD}\n{GOOD}\n"));
        o.checkpoint_every = every;
        o.stop_after = after;
        let e = error_of(&o);
        assert!(e.contains("--checkpoint-every and --stop-after") && e.contains("at least 1"), "{e}");
        assert_no_output(&o.output);
    }
}
