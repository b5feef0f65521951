//! SmolLM2-135M-Instruct GGUF → Hugging Face import, checked against references written by
//! `scripts/smollm2_tokens.py`: the rebuilt tokenizer.json gives SmolLM2's token ids, and a
//! few imported tensors equal gguf-py's dequantised, un-permuted values bit for bit.
//!
//! Inputs: the GGUF from `PEFTRT_SMOLLM2_GGUF` (default `models/SmolLM2-135M-Instruct.Q4_1.gguf`;
//! `make models` fetches it), and `PEFTRT_SMOLLM2_REF_DIR/smollm2_tokens.json` (default `models/reference`) (+ `smollm2_tokens.weights.f32`) from
//! `python scripts/smollm2_tokens.py GGUF REF_DIR/smollm2_tokens.json`.

use std::path::{Path, PathBuf};

use peftrt::gguf::{import, DType, ImportOptions};
use peftrt_conformance::real_model_path;
use serde_json::Value;

/// The GGUF and the reference directory, or `None` (skipped) when absent outside `make test`.
fn inputs() -> Option<(PathBuf, PathBuf)> {
    let gguf = real_model_path("PEFTRT_SMOLLM2_GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf")?;
    let refs = real_model_path("PEFTRT_SMOLLM2_REF_DIR", "reference")?;
    Some((gguf, refs))
}

fn reference(dir: &Path) -> (Value, Vec<f32>) {
    let json_path = dir.join("smollm2_tokens.json");
    let text = std::fs::read_to_string(&json_path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run scripts/smollm2_tokens.py to create it",
            json_path.display()
        )
    });
    let reference: Value = serde_json::from_str(&text).expect("reference JSON");
    let weights_path = dir.join(reference["weights_file"].as_str().expect("weights_file"));
    let raw =
        std::fs::read(&weights_path).unwrap_or_else(|e| panic!("{}: {e}", weights_path.display()));
    let weights = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (reference, weights)
}

#[test]
fn smollm2_gguf_imports_with_the_true_tokenizer_and_exact_weights() {
    let Some((gguf, refs)) = inputs() else { return };
    let (reference, ref_weights) = reference(&refs);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2");
    let summary = import(&gguf, &out, &ImportOptions::new(DType::F32)).expect("import");
    assert!(summary.tied_embeddings, "SmolLM2 ties its embeddings");

    // Tokenizer: the ids of SmolLM2's own tokenizer (digits split first, as llama.cpp's
    // `smollm` pre-type). transformers' GGUF tokenizer drops the digit split; where it
    // disagrees we must follow the reference, not transformers.
    let tok =
        tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).expect("tokenizer.json loads");
    let cases = reference["cases"].as_array().expect("cases");
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let got = tok.encode(text, false).expect("encode").get_ids().to_vec();
        if got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
        // Byte-level BPE round-trips any text exactly.
        let decoded = tok.decode(&got, false).expect("decode");
        if decoded != text {
            failures.push(format!("{text:?}: decodes to {decoded:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "tokenizer mismatches:\n{}",
        failures.join("\n")
    );
    // The reference does contain texts where transformers' GGUF tokenizer is wrong.
    assert!(cases.iter().any(|c| c["transformers_agrees"] == false));

    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["num_key_value_heads"], 3);
    assert_eq!(config["rope_theta"], 100000.0);
    let tc: Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));

    // Weights: bit-identical to gguf-py's dequantisation, Q/K un-permuted.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    assert!(
        st.tensor("lm_head.weight").is_err(),
        "tied: no lm_head.weight"
    );
    for (name, e) in reference["weights"].as_object().unwrap() {
        let t = st.tensor(name).unwrap_or_else(|_| panic!("{name} missing"));
        let shape: Vec<usize> = serde_json::from_value(e["shape"].clone()).unwrap();
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
        let (rows, offset) = (
            e["rows"].as_u64().unwrap() as usize,
            e["offset"].as_u64().unwrap() as usize,
        );
        let n = rows * shape[1..].iter().product::<usize>();
        let want = &ref_weights[offset..offset + n];
        let got: Vec<f32> = t.data()[..n * 4]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let bad = got
            .iter()
            .zip(want)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(bad.is_none(), "{name}: first difference at element {bad:?}");
    }
}
