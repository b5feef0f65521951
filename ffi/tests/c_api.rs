//! Results through the C API equal the Rust API's (issue #5): a C program
//! (`ffi/tests/c/dump.c`, compiled here against the built libpeftrt.so) and the runtime crate
//! run the same requests; prompt tokens, logits (bit for bit) and greedy generations (tokens
//! and streamed text) must be identical. Tiny fixtures always, SmolLM2 with its PEFT adapters
//! when `models/` is present (required under `PEFTRT_REQUIRE_MODELS=1`).
//!
//! The library must be built first, so the test is ignored by plain `cargo test`;
//! `make test-ffi` builds it and runs this with `PEFTRT_FFI_LIB_DIR` and `--include-ignored`.

use peftrt_conformance::{fixture, real_model_path, repo_root};
use rt::{Adapter, LoadOptions, Message, Model, Sampler, SamplingParams, Session, SessionOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const MAX_TOKENS: usize = 16;

/// What `dump.c` wrote.
struct Dump {
    prompt: Vec<u32>,
    logits: Vec<f32>,
    generated: Vec<u32>,
    text: String,
}

fn read_dump(path: &Path) -> Dump {
    let bytes = std::fs::read(path).unwrap();
    let mut at = 0;
    let mut word = || {
        let w = <[u8; 4]>::try_from(&bytes[at..at + 4]).unwrap();
        at += 4;
        w
    };
    let mut ints = |n: usize| (0..n).map(|_| i32::from_ne_bytes(word()) as u32).collect::<Vec<_>>();
    let n = ints(1)[0] as usize;
    let prompt = ints(n);
    let n_vocab = ints(1)[0] as usize;
    let logits = ints(n_vocab).into_iter().map(f32::from_bits).collect();
    let n_gen = ints(1)[0] as usize;
    let generated = ints(n_gen);
    let n_text = ints(1)[0] as usize;
    let start = at;
    let text = String::from_utf8(bytes[start..start + n_text].to_vec()).unwrap();
    assert_eq!(start + n_text, bytes.len(), "{}: trailing bytes", path.display());
    Dump { prompt, logits, generated, text }
}

/// `dump.c`, compiled once (the tests run in parallel) against the library under test.
fn dump_program() -> PathBuf {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(compile_dump).clone()
}

fn compile_dump() -> PathBuf {
    let lib = PathBuf::from(std::env::var("PEFTRT_FFI_LIB_DIR").expect(
        "set PEFTRT_FFI_LIB_DIR to the absolute path of a freshly built libpeftrt.so's directory (make test-ffi does)",
    ));
    let lib = lib.canonicalize().unwrap_or_else(|e| panic!("{}: {e}", lib.display()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("peftrt_ffi_dump");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-I"])
        .arg(root.join("include"))
        .arg(root.join("ffi/tests/c/dump.c"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lpeftrt", "-o"])
        .arg(&exe)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(status.success(), "compiling dump.c failed");
    exe
}

/// The same request through the Rust API.
fn rust_side(model_dir: &Path, prompt: &str, adapters: &[(PathBuf, f32)]) -> Dump {
    let model = Arc::new(Model::load(model_dir, &LoadOptions::default()).unwrap());
    let tok = model.tokenizer().unwrap();
    let tokens = if tok.has_chat_template() {
        tok.encode(&tok.apply_chat_template(&[Message::new("user", prompt)], true).unwrap(), false).unwrap()
    } else {
        tok.encode(prompt, true).unwrap()
    };
    let active: Vec<_> = adapters.iter().map(|(dir, s)| (Arc::new(Adapter::load(dir, &model).unwrap()), *s)).collect();
    let opts = SessionOptions { n_ctx: tokens.len() + MAX_TOKENS, n_batch: 16, n_threads: 2 };
    let mut session = Session::new(model.clone(), &opts).unwrap();
    session.set_adapters(&active).unwrap();
    let logits = session.eval(&tokens).unwrap().to_vec();
    session.reset();
    let params = SamplingParams { max_tokens: MAX_TOKENS, ..Default::default() };
    let mut sampler = Sampler::new(params, model.config.vocab_size).unwrap();
    let g = rt::generate(&mut session, &tokens, &mut sampler, |_| true).unwrap();
    Dump { prompt: tokens, logits, generated: g.tokens, text: g.text }
}

fn check(exe: &Path, model_dir: &Path, prompt: &str, adapters: &[(PathBuf, f32)]) {
    let name = format!(
        "{} {:?}",
        model_dir.file_name().unwrap().to_string_lossy(),
        adapters.iter().map(|(d, s)| format!("{}×{s}", d.file_name().unwrap().to_string_lossy())).collect::<Vec<_>>()
    );
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dump-{}.bin", name.replace(['/', ' ', '"'], "_")));
    let mut cmd = Command::new(exe);
    cmd.arg(model_dir).arg(prompt).arg(&out).arg(MAX_TOKENS.to_string());
    for (dir, scale) in adapters {
        cmd.arg(dir).arg(scale.to_string());
    }
    let result = cmd.output().unwrap();
    assert!(result.status.success(), "{name}: dump failed: {}", String::from_utf8_lossy(&result.stderr));
    let c = read_dump(&out);
    let r = rust_side(model_dir, prompt, adapters);
    assert_eq!(c.prompt, r.prompt, "{name}: prompt tokens");
    assert_eq!(c.logits.len(), r.logits.len(), "{name}: vocabulary");
    let same_bits = c.logits.iter().zip(&r.logits).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same_bits, "{name}: logits differ between the C and Rust APIs");
    assert_eq!(c.generated, r.generated, "{name}: generated tokens");
    assert_eq!(c.text, r.text, "{name}: streamed text");
    assert!(!c.generated.is_empty());
    eprintln!("{name}: {} prompt tokens, logits and {} generated tokens identical", c.prompt.len(), c.generated.len());
}

#[test]
#[ignore = "needs libpeftrt.so built first: make test-ffi runs it"]
fn c_api_matches_rust_api_on_tiny_fixtures() {
    let exe = dump_program();
    let prompt = "The lighthouse keeper";
    check(&exe, &fixture("tiny-llama"), prompt, &[]);
    check(&exe, &fixture("tiny-llama"), prompt, &[(fixture("adapters/llama-qv"), 1.0)]);
    check(
        &exe,
        &fixture("tiny-llama"),
        prompt,
        &[(fixture("adapters/llama-dora"), 0.5), (fixture("adapters/llama-all-rslora"), 0.7)],
    );
    check(&exe, &fixture("tiny-qwen2"), prompt, &[(fixture("adapters/qwen2-qkvo"), 1.0)]);
    check(&exe, &fixture("nf4/tiny-llama-nf4"), prompt, &[(fixture("nf4/llama-nf4-qvd"), 1.0)]);
    // A GGUF file, run as it is (its quantised tensors in place).
    let gguf = repo_root().join("runtime/tests/data/gguf/tiny_llama.gguf");
    check(&exe, &gguf, prompt, &[]);
}

#[test]
#[ignore = "needs libpeftrt.so built first: make test-ffi runs it"]
fn c_api_matches_rust_api_on_smollm2() {
    let Some(dir) = real_model_path("PEFTRT_SMOLLM2_DIR", "smollm2-135m-instruct") else { return };
    let Some(adapters) = real_model_path("PEFTRT_SMOLLM2_ADAPTERS_DIR", "reference/adapters") else { return };
    let exe = dump_program();
    let prompt = "Write a haiku about a lighthouse.";
    check(&exe, &dir, prompt, &[]);
    check(&exe, &dir, prompt, &[(adapters.join("qkvo-r16"), 1.0), (adapters.join("all-linear-r16"), 0.5)]);
    // The GGUF the directory was imported from, run natively, with the same adapters.
    let Some(gguf) = real_model_path("PEFTRT_SMOLLM2_GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    check(&exe, &gguf, prompt, &[(adapters.join("qkvo-r16"), 1.0), (adapters.join("all-linear-r16"), 0.5)]);
}
