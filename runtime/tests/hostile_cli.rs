//! Hostile input to the `peftrt` command line never crashes, hangs, lies or destroys a file
//! (issue 18). Each test is a regression test for one row of that table.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn model() -> String {
    fixture("tiny-llama").display().to_string()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs peftrt, killing it if it takes longer than `limit` (a hang is a failure, not a stuck
/// test run).
fn run_within(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_peftrt"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run peftrt");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!("peftrt {args:?} ran over {limit:?} (hung); stderr: {}", text(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn run(args: &[&str]) -> Output {
    run_within(args, Duration::from_secs(60))
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// A copy of the tiny model (its small files; the weights linked) to corrupt.
fn model_copy(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir(&m).unwrap();
    for e in std::fs::read_dir(fixture("tiny-llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
    }
    m
}

/// Row 2: a chat template that never ends, from tokenizer_config.json.
#[test]
fn a_looping_chat_template_is_an_error_not_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_copy(tmp.path());
    let cfg_path = m.join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}{% endfor %}{% endfor %}{% endfor %}".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = run(&["generate", "--model", m.to_str().unwrap(), "--chat", "--prompt", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("chat template") && err.contains("tokenizer_config.json"), "{err}");
}

/// Row 10: a FIFO or /dev/zero where a file is expected.
#[cfg(unix)]
#[test]
fn fifos_and_devices_are_refused_not_waited_on() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let f = fifo.to_str().unwrap();
    let out_path = tmp.path().join("o.jsonl");
    let o = out_path.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["inspect", f],
        vec!["inspect", "/dev/zero"],
        vec!["import", f, "out"],
        vec!["batch", "--model", "MODEL", "--input", f, "--out", o],
        vec!["perplexity", "--model", "MODEL", "--text", "/dev/zero"],
    ];
    let m = model();
    for case in cases {
        let args: Vec<&str> = case.iter().map(|a| if *a == "MODEL" { m.as_str() } else { a }).collect();
        let out = run_within(&args, Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains("not a regular file") || err.contains("neither"), "{args:?}: {err}");
    }
    // config.json as a FIFO.
    let m2 = model_copy(tmp.path());
    std::fs::remove_file(m2.join("config.json")).unwrap();
    mkfifo(&m2.join("config.json"));
    let out = run_within(&["inspect", m2.to_str().unwrap()], Duration::from_secs(20));
    assert!(text(&out.stderr).contains("config.json: is a FIFO"), "{}", text(&out.stderr));
    // The weights as a FIFO.
    std::fs::remove_file(m2.join("config.json")).unwrap();
    std::fs::copy(fixture("tiny-llama").join("config.json"), m2.join("config.json")).unwrap();
    std::fs::remove_file(m2.join("model.safetensors")).unwrap();
    mkfifo(&m2.join("model.safetensors"));
    let out = run_within(&["inspect", m2.to_str().unwrap()], Duration::from_secs(20));
    assert!(text(&out.stderr).contains("model.safetensors: is a FIFO"), "{}", text(&out.stderr));
}

/// Row 11: `--out` beside an unrelated `X.tmp`, `--input X.tmp`, `--out` a directory or in a
/// missing directory.
#[test]
fn batch_output_never_touches_other_files_and_is_checked_first() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("x.tmp");
    std::fs::write(&input, "{\"prompt\": \"Hello\"}\n").unwrap();
    let out_path = tmp.path().join("x.jsonl");
    let (i, o, m) = (input.to_str().unwrap(), out_path.to_str().unwrap(), model());
    let out = run(&["batch", "--model", &m, "--input", i, "--out", o, "--max-tokens", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&input).unwrap(), "{\"prompt\": \"Hello\"}\n", "the input was changed");
    assert_eq!(names(tmp.path()), ["x.jsonl", "x.tmp"]);
    // Bad outputs fail before the model is even loaded (a missing model is not what is reported).
    let missing = tmp.path().join("no/such/dir/r.jsonl");
    let dir = tmp.path().display().to_string();
    for (bad, what) in
        [(dir.as_str(), "not a regular file"), (missing.to_str().unwrap(), "does not exist"), (i, "is also the input")]
    {
        let out = run(&["batch", "--model", "/nonexistent", "--input", i, "--out", bad]);
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains(what) && !err.contains("/nonexistent"), "{bad}: {err}");
    }
    let out = run(&["score", "--model", "/nonexistent", "--tokens", "1", "--out", &dir]);
    assert!(text(&out.stderr).contains("not a regular file"), "{}", text(&out.stderr));
    assert_eq!(names(tmp.path()), ["x.jsonl", "x.tmp"]);
}

/// Row 12: two imports into one new directory, and --force on the GGUF's own directory.
#[test]
fn import_never_deletes_its_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dir");
    std::fs::create_dir(&dir).unwrap();
    let gguf = dir.join("model.gguf");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf/tiny_llama.gguf");
    std::fs::copy(&src, &gguf).unwrap();
    let out = run(&["import", gguf.to_str().unwrap(), dir.to_str().unwrap(), "--force"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("lies inside the output directory"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&gguf).unwrap(), std::fs::read(&src).unwrap());
    assert_eq!(names(&dir), ["model.gguf"]);
}

/// Row 13: SIGTERM during a run exits non-zero and leaves no temporary behind; a stale
/// temporary of a dead process is removed by the next run into the same place.
#[cfg(unix)]
#[test]
fn a_signal_removes_the_temporary_output() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    std::fs::create_dir(tmp.path().join(format!(".out.peftrt-tmp-{dead}"))).unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf/tiny_llama.gguf");
    let out = run(&["import", src.to_str().unwrap(), tmp.path().join("out").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(names(tmp.path()), ["out"], "the stale temporary was not removed");

    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"prompt\": \"Hello\"}\n".repeat(2000)).unwrap();
    let res = tmp.path().join("r.jsonl");
    let child = Command::new(env!("CARGO_BIN_EXE_peftrt"))
        .args(["batch", "--model", &model(), "--input", input.to_str().unwrap(), "--out", res.to_str().unwrap()])
        .args(["--max-tokens", "64", "--ignore-eos"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: sending SIGTERM to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("interrupted"), "{}", text(&out.stderr));
    assert_eq!(names(tmp.path()), ["in.jsonl", "out"]);
}

/// Row 14: the token sum wrapped and passed the context check.
#[test]
fn bench_token_counts_do_not_wrap() {
    let out = run(&["bench", "--model", &model(), "--prompt-tokens", "1", "--gen-tokens", "18446744073709551615"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("exceed the context") && err.contains("18446744073709551615"), "{err}");
}

/// Row 15: `--stop ""` ended at once with empty output.
#[test]
fn an_empty_stop_string_is_refused() {
    let out = run(&["generate", "--model", &model(), "--prompt", "hi", "--stop", ""]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("empty stop string"), "{}", text(&out.stderr));
}

/// Row 16: an I/O error's cause was printed twice.
#[test]
fn an_io_error_prints_its_cause_once() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf/tiny_llama.gguf");
    let out = run(&["import", src.to_str().unwrap(), "/etc/passwd/x"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(err.matches("os error").count(), 1, "{err}");
}

/// Row 17: `peftrt … | head` panicked when the pipe closed.
#[cfg(unix)]
#[test]
fn a_closed_stdout_ends_quietly() {
    let child = Command::new(env!("CARGO_BIN_EXE_peftrt"))
        .args(["inspect", &model()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = child;
    drop(child.stdout.take()); // the reader goes away before peftrt writes
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
}

/// perplexity drew `\r` progress into a stderr that is not a terminal.
#[test]
fn perplexity_draws_no_progress_into_a_pipe() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("t.txt");
    std::fs::write(&t, "the quick brown fox jumps over the lazy dog. ".repeat(20)).unwrap();
    let out = run(&["perplexity", "--model", &model(), "--text", t.to_str().unwrap(), "--window", "32"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains('\r'), "{:?}", text(&out.stderr));
    assert!(text(&out.stdout).contains("perplexity"));
}
