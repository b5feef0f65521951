//! A GGUF file run as it is (`Model::load` on the `.gguf`: tensors in place, in their own ggml
//! types, Q/K rows in llama.cpp's rotary order) against the same file imported to F32 by
//! `peftrt import` (dequantised, un-permuted): the same model, summed in another order, so the
//! logits agree within a tolerance, and so do adapters (LoRA and DoRA, whose Q/K rows are
//! reordered for the native base), `peftrt merge` onto the GGUF, and the base fingerprint.
//!
//! Inputs: `runtime/tests/data/gguf/tiny_llama.gguf` (committed; Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
//! F16, BF16 and F32 tensors) and `tiny_llama_k.gguf` (Q2_K..Q6_K), written by
//! `scripts/gguf_fixtures.py`, and the real SmolLM2 Q4_1
//! GGUF with its F32 import from `make models` (skipped when absent unless
//! `PEFTRT_REQUIRE_MODELS=1`).

use peftrt::adapter::BaseFingerprint;
use peftrt::gguf::{import, DType, ImportOptions};
use peftrt::merge::{merge, MergeOptions};
use peftrt::output::write_safetensors;
use peftrt::{Adapter, LoadOptions, Model, Session, SessionOptions};
use peftrt_conformance::{max_abs_diff, real_model_path, repo_root};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Native quantised kernels sum in another order than the F32 path (and the attention scores
/// of a head in another order of its dimensions): logits agree to this fraction of their
/// largest magnitude.
const TOL: f32 = 2e-3;
/// The tiny fixture has BF16 tensors, which hosts with AVX512-BF16 multiply with the activations
/// rounded to bf16 (2⁻⁸ relative per product; `kernels::x86::bf16`).
const TOL_TINY: f32 = 1e-2;
/// The 8-bit decode path (see [`assert_distributions_close`]): mean KL divergence (nats) and
/// top-1 agreement. The random tiny models have flat distributions (near-ties: top-1 is loose
/// there); the K-quant one has large logits, so a sharper, more sensitive distribution.
const KL_TINY: f64 = 1e-3;
const KL_K: f64 = 2e-2;
const KL_SMOLLM2: f64 = 1e-2;

fn tiny_gguf() -> PathBuf {
    repo_root().join("runtime/tests/data/gguf/tiny_llama.gguf")
}

fn load(path: &Path) -> Arc<Model> {
    Arc::new(
        Model::load(path, &LoadOptions { no_tokenizer: true }).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
}

/// Logits at every position of `tokens`, evaluated `n_batch` tokens at a time (1: the decode
/// kernels; more: the prefill ones).
fn logits(model: &Arc<Model>, adapters: &[(Arc<Adapter>, f32)], tokens: &[u32], n_batch: usize) -> Vec<f32> {
    let opts = SessionOptions { n_ctx: 128, n_batch, n_threads: 2 };
    let mut s = Session::new(model.clone(), &opts).unwrap();
    s.set_adapters(adapters).unwrap();
    let mut out = Vec::new();
    s.eval_all(tokens, &mut out).unwrap();
    out
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let (d, m) = max_abs_diff(got, want);
    eprintln!("{what}: max |Δ| = {d:.3e}, max |logit| = {m:.3}, ratio {:.2e}", d / m);
    assert!(d.is_finite() && d <= tol * m, "{what}: max |Δlogit| {d} exceeds {tol} × {m}");
}

/// The decode kernels (one token at a time) take the activations quantised to 8 bits per
/// block of 32, as llama.cpp's do, so their logits differ from the dequantised F32 forward's by
/// more than summation order: compared as distributions, per position, the mean KL divergence
/// `KL(p_f32 ‖ p_native)` (nats) and the share of positions whose most likely token agrees.
fn assert_distributions_close(what: &str, got: &[f32], want: &[f32], vocab: usize, max_kl: f64, min_top1: f64) {
    let softmax = |l: &[f32]| {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = l.iter().map(|&v| (v as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect::<Vec<f64>>()
    };
    let argmax = |l: &[f32]| l.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
    let (mut kl, mut agree, mut n) = (0.0, 0usize, 0usize);
    for (g, w) in got.chunks_exact(vocab).zip(want.chunks_exact(vocab)) {
        let (p, q) = (softmax(w), softmax(g));
        kl += p.iter().zip(&q).map(|(p, q)| if *p > 0.0 { p * (p / q.max(1e-300)).ln() } else { 0.0 }).sum::<f64>();
        agree += usize::from(argmax(g) == argmax(w));
        n += 1;
    }
    let (kl, top1) = (kl / n as f64, agree as f64 / n as f64);
    let (d, m) = max_abs_diff(got, want);
    eprintln!("{what}: mean KL {kl:.2e} nats, top-1 agreement {top1:.3} over {n} positions, max |Δ| {d:.3e} of {m:.3}");
    assert!(
        kl <= max_kl && top1 >= min_top1,
        "{what}: mean KL {kl:.3e} (max {max_kl:e}), top-1 {top1:.3} (min {min_top1})"
    );
}

fn import_f32(gguf: &Path, dir: &Path) -> Arc<Model> {
    import(gguf, dir, &ImportOptions::new(DType::F32)).unwrap();
    load(dir)
}

/// Deterministic pseudo-random values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A PEFT adapter on every linear layer of the decoder blocks of `model` (rank 4, alpha 8),
/// with DoRA magnitudes when `dora`.
fn write_adapter(model: &Model, dir: &Path, dora: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let r = 4;
    let mut tensors: Vec<(String, Vec<usize>)> = Vec::new();
    for l in model.layers.iter().flat_map(|l| l.linears()) {
        let p = format!("base_model.model.{}", l.name);
        tensors.push((format!("{p}.lora_A.weight"), vec![r, l.cols]));
        tensors.push((format!("{p}.lora_B.weight"), vec![l.rows, r]));
        if dora {
            tensors.push((format!("{p}.lora_magnitude_vector"), vec![l.rows]));
        }
    }
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, DType::F32, |i| {
        let (name, shape) = &tensors[i];
        let n = shape.iter().product();
        Ok(if name.ends_with("lora_magnitude_vector") {
            values(n, i as u64, 0.5).iter().map(|v| 1.0 + v).collect()
        } else {
            values(n, i as u64, 0.3)
        })
    })
    .unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "use_dora": dora,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
}

const TOKENS: [u32; 37] = [
    1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 260, 3, 99, 200, 45, 12, 7, 250, 31, 64, 128, 5, 9,
    17, 33, 65, 129, 257, 2, 40, 80, 160, 240,
];

#[test]
fn tiny_gguf_runs_natively_with_its_import_s_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let native = load(&tiny_gguf());
    assert!(native.config.rope_interleaved, "a llama GGUF keeps llama.cpp's Q/K row order");
    let imported = import_f32(&tiny_gguf(), &tmp.path().join("f32"));
    let toks = &TOKENS[..];
    let v = native.config.vocab_size;
    let want = logits(&imported, &[], toks, 16);
    assert_close("batches of 16", &logits(&native, &[], toks, 16), &want, TOL_TINY);
    let want = logits(&imported, &[], toks, 1);
    assert_distributions_close("one at a time", &logits(&native, &[], toks, 1), &want, v, KL_TINY, 0.85);
    // One identity for adapters across the two copies.
    BaseFingerprint::of(&imported).check(&BaseFingerprint::of(&native)).unwrap();
}

/// Q2_K..Q6_K weights (`tiny_llama_k.gguf`, random valid blocks) natively against the import.
#[test]
fn k_quants_run_natively_with_their_import_s_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let path = repo_root().join("runtime/tests/data/gguf/tiny_llama_k.gguf");
    let native = load(&path);
    let imported = import_f32(&path, &tmp.path().join("f32"));
    let toks = &TOKENS[..];
    let v = native.config.vocab_size;
    let want = logits(&imported, &[], toks, 16);
    assert_close("K-quants, batches of 16", &logits(&native, &[], toks, 16), &want, TOL);
    let want = logits(&imported, &[], toks, 1);
    assert_distributions_close("K-quants, one at a time", &logits(&native, &[], toks, 1), &want, v, KL_K, 0.9);
}

#[test]
fn adapters_on_a_native_gguf_match_them_on_its_import_and_merge_onto_it() {
    let tmp = tempfile::tempdir().unwrap();
    let native = load(&tiny_gguf());
    let imported = import_f32(&tiny_gguf(), &tmp.path().join("f32"));
    for dora in [false, true] {
        let dir = tmp.path().join(if dora { "dora" } else { "lora" });
        write_adapter(&imported, &dir, dora);
        let on_native = Arc::new(Adapter::load(&dir, &native).unwrap());
        let on_imported = Arc::new(Adapter::load(&dir, &imported).unwrap());
        for n_batch in [1, 16] {
            let want = logits(&imported, &[(on_imported.clone(), 1.0)], &TOKENS, n_batch);
            let got = logits(&native, &[(on_native.clone(), 1.0)], &TOKENS, n_batch);
            let what = format!("dora {dora}, batches of {n_batch}");
            if n_batch == 1 {
                assert_distributions_close(&what, &got, &want, native.config.vocab_size, KL_TINY, 0.85);
            } else {
                assert_close(&what, &got, &want, TOL_TINY);
            }
            // The adapter changes the output (the comparison is not of two bases).
            let (d, _) = max_abs_diff(&got, &logits(&native, &[], &TOKENS, n_batch));
            assert!(d > 1e-2, "the adapter changed nothing ({d})");
        }
        // Merged onto the GGUF: a float model in Hugging Face order, equal to the adapter
        // applied unmerged.
        let merged_dir = tmp.path().join(if dora { "merged-dora" } else { "merged-lora" });
        let summary = merge(&tiny_gguf(), &[(dir.clone(), 1.0)], &merged_dir, &MergeOptions::default()).unwrap();
        assert_eq!(summary.dtype, DType::F32);
        assert_eq!(summary.merged_layers, 14);
        let merged = load(&merged_dir);
        assert!(!merged.config.rope_interleaved);
        let want = logits(&imported, &[(on_imported.clone(), 1.0)], &TOKENS, 16);
        assert_close(&format!("merged (dora {dora})"), &logits(&merged, &[], &TOKENS, 16), &want, TOL);
    }
}

#[test]
fn a_gguf_is_refused_by_quantize_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let e = peftrt::quantize::quantize_model(&tiny_gguf(), &tmp.path().join("q"), &Default::default()).unwrap_err();
    assert!(e.to_string().contains("peftrt import"), "{e}");
    assert!(!tmp.path().join("q").exists());
}

/// The real model: SmolLM2-135M-Instruct's Q4_1 GGUF (Q8_0 embeddings/head) natively, against
/// its F32 import from `make models`; greedy text from the chat prompt alike.
#[test]
fn smollm2_q4_1_gguf_runs_natively_like_its_f32_import() {
    let Some(gguf) = real_model_path("PEFTRT_SMOLLM2_GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let Some(dir) = real_model_path("PEFTRT_SMOLLM2_DIR", "smollm2-135m-instruct") else { return };
    let native = Arc::new(Model::load(&gguf, &LoadOptions::default()).unwrap());
    let imported = Arc::new(Model::load(&dir, &LoadOptions::default()).unwrap());
    // The native tokenizer is built from the vocabulary directly, the import's is read from the
    // tokenizer.json the import wrote: the same tokens, special ones included.
    let tok = native.tokenizer().unwrap();
    let chat = "<|im_start|>user\nWrite 12345 in words, then {\"a\": [1, 2]}.<|im_end|>\n<|im_start|>assistant\n";
    let ids = tok.encode(chat, true).unwrap();
    assert_eq!(ids, imported.tokenizer().unwrap().encode(chat, true).unwrap());
    assert_eq!(tok.decode(&ids, false).unwrap(), imported.tokenizer().unwrap().decode(&ids, false).unwrap());
    let text = "The quick brown fox jumps over the lazy dog. Rust is a systems programming language";
    let ids = tok.encode(text, true).unwrap();
    assert_eq!(ids, imported.tokenizer().unwrap().encode(text, true).unwrap());
    let want = logits(&imported, &[], &ids, 16);
    assert_close("SmolLM2 batches of 16", &logits(&native, &[], &ids, 16), &want, TOL);
    let want = logits(&imported, &[], &ids, 1);
    let v = native.config.vocab_size;
    assert_distributions_close("SmolLM2 one at a time", &logits(&native, &[], &ids, 1), &want, v, KL_SMOLLM2, 0.9);
    BaseFingerprint::of(&imported).check(&BaseFingerprint::of(&native)).unwrap();
}

/// A GGUF cut short anywhere (header, metadata, tensor infos, data) is an error naming the
/// file, never a panic or a read past the map.
#[test]
fn a_truncated_gguf_is_refused_natively_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(tiny_gguf()).unwrap();
    let path = tmp.path().join("cut.gguf");
    // (The last 31 bytes may be alignment padding after the last tensor.)
    for len in [4, 24, 100, 1000, bytes.len() / 2, bytes.len() - 100] {
        std::fs::write(&path, &bytes[..len]).unwrap();
        let e = match Model::load(&path, &LoadOptions::default()) {
            Ok(_) => panic!("{len} of {} bytes loaded", bytes.len()),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("cut.gguf"), "{len} bytes: {e}");
    }
}

/// How far apart peftrt's logits for its own greedy token and llama.cpp's may be where the two
/// first choose differently: the two programs quantise the activations alike (8 bits per block
/// of 32) but sum in other orders, which moves SmolLM2's logits by up to a few hundredths.
const NEAR_TIE: f32 = 0.1;

/// SmolLM2's Q4_1 file run natively, greedy, against llama.cpp's greedy tokens on the same file
/// (`tests/fixtures/gguf/llamacpp_greedy_smollm2_q4_1.json`, from `scripts/greedy_llamacpp.py`
/// with llama-cpp-python 0.3.36) for the three conformance prompts: the same 32 tokens, or a
/// first divergence at a near-tie (peftrt's logits for the two tokens within [`NEAR_TIE`]),
/// after which the texts are different continuations and are not compared.
#[test]
fn smollm2_q4_1_greedy_matches_llama_cpp_on_the_same_file() {
    let Some(gguf) = real_model_path("PEFTRT_SMOLLM2_GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let path = repo_root().join("tests/fixtures/gguf/llamacpp_greedy_smollm2_q4_1.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let model = load(&gguf);
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
    };
    for (case, c) in fixture["cases"].as_object().unwrap() {
        let (prompt, theirs) = (ids(&c["prompt"]), ids(&c["greedy"]));
        let mut s = Session::new(model.clone(), &SessionOptions { n_ctx: 256, n_batch: 64, n_threads: 2 }).unwrap();
        let mut logits = s.eval(&prompt).unwrap().to_vec();
        let mut same = 0;
        for (step, &want) in theirs.iter().enumerate() {
            let ours = logits.iter().enumerate().fold(0, |b, (i, &l)| if l > logits[b] { i } else { b }) as u32;
            if ours != want {
                let gap = logits[ours as usize] - logits[want as usize];
                let margin = c["margins"][step].as_f64().unwrap();
                eprintln!(
                    "{case}: first divergence at step {step}: peftrt {ours}, llama.cpp {want}; peftrt's logits \
                     {gap:.4} apart, llama.cpp's top two {margin:.4} apart"
                );
                assert!(gap <= NEAR_TIE, "{case}: step {step}: peftrt prefers {ours} to llama.cpp's {want} by {gap}");
                break;
            }
            same += 1;
            logits = s.eval(&[ours]).unwrap().to_vec();
        }
        eprintln!("{case}: {same} of {} greedy tokens as llama.cpp's", theirs.len());
    }
}
