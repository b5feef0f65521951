use super::*;
use std::collections::BTreeMap;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf")
}

fn fixture() -> PathBuf {
    data_dir().join("tiny_llama.gguf")
}

/// The reference values written by `scripts/gguf_fixtures.py`: name -> (shape, values).
fn expected() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let index: Json = serde_json::from_slice(&fs::read(data_dir().join("tiny_llama.expected.json")).unwrap()).unwrap();
    let raw = fs::read(data_dir().join("tiny_llama.expected.f32")).unwrap();
    let all: Vec<f32> = raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let mut out = BTreeMap::new();
    for (name, e) in index.as_object().unwrap() {
        let shape: Vec<usize> = serde_json::from_value(e["shape"].clone()).unwrap();
        let off = e["offset"].as_u64().unwrap() as usize;
        let n: usize = shape.iter().product();
        out.insert(name.clone(), (shape, all[off..off + n].to_vec()));
    }
    out
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

#[test]
fn imports_the_tiny_llama_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tiny-hf");
    let s = import(&fixture(), &out, &ImportOptions::new(DType::F32)).unwrap();
    assert_eq!((s.architecture.as_str(), s.n_tensors, s.tied_embeddings), ("llama", 21, false));

    let bytes = fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 21);
    for name in ["model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.down_proj.weight"] {
        assert!(st.tensor(name).is_ok(), "{name} missing");
    }
    let exp = expected();
    assert!(exp.contains_key("model.layers.0.self_attn.q_proj.weight"));
    for (name, (shape, values)) in &exp {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
        let got = f32s(t.data());
        let bad = got.iter().zip(values).position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(bad.is_none(), "{name}: first difference at {bad:?}");
    }

    let config: Json = serde_json::from_slice(&fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["num_key_value_heads"], 2);
    assert_eq!(config["rms_norm_eps"], 1e-5);
    assert_eq!(config["vocab_size"], 269);
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(config["torch_dtype"], "float32");
    assert_eq!(config["max_position_embeddings"], 256);
    let tc: Json = serde_json::from_slice(&fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["add_bos_token"], false);
    assert!(tc["chat_template"].as_str().unwrap().contains("<|im_start|>"));
    // Nothing but the output directory is left next to it.
    let names: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("tiny-hf")]);
}

#[test]
fn tokenizer_splits_digits_for_smollm_pre() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    import(&fixture(), &out, &ImportOptions::new(DType::BF16)).unwrap();
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let enc = tok.encode("<|im_start|>the 12 in", false).unwrap();
    // Digits are split before the GPT-2 regex, so the merge "1 2" never applies.
    assert_eq!(enc.get_tokens(), ["<|im_start|>", "t", "he", "Ġ", "1", "2", "Ġ", "in"]);
    assert_eq!(enc.get_ids()[0], 1);
    let dec = tok.decode(enc.get_ids(), false).unwrap();
    assert_eq!(dec, "<|im_start|>the 12 in");
    assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "the 12 in");
    // Without a special token in the way, " the" uses the merge chain "Ġ t", "Ġt he".
    assert_eq!(tok.encode(" the", false).unwrap().get_tokens(), ["Ġthe"]);
}

#[test]
fn bf16_and_f16_outputs_round_to_nearest() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = expected();
    let (_, norm) = &exp["model.norm.weight"];
    for (dtype, st_dtype) in [(DType::F16, safetensors::Dtype::F16), (DType::BF16, safetensors::Dtype::BF16)] {
        let out = tmp.path().join(format!("{dtype:?}"));
        import(&fixture(), &out, &ImportOptions::new(dtype)).unwrap();
        let bytes = fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("model.norm.weight").unwrap();
        assert_eq!(t.dtype(), st_dtype);
        let got: Vec<f32> = t
            .data()
            .chunks_exact(2)
            .map(|b| match dtype {
                DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                _ => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            })
            .collect();
        let want: Vec<f32> = norm
            .iter()
            .map(|&v| match dtype {
                DType::F16 => half::f16::from_f32(v).to_f32(),
                _ => half::bf16::from_f32(v).to_f32(),
            })
            .collect();
        assert_eq!(got, want);
    }
}

#[test]
fn truncated_gguf_leaves_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = fs::read(fixture()).unwrap();
    let bad = tmp.path().join("cut.gguf");
    fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let out = tmp.path().join("out");
    let err = import(&bad, &out, &ImportOptions::new(DType::F32)).unwrap_err().to_string();
    assert!(err.contains("cut.gguf") && err.contains("truncated"), "{err}");
    let names: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("cut.gguf")]);
}

#[test]
fn refuses_a_non_empty_output_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep.txt"), "x").unwrap();
    let err = import(&fixture(), &out, &ImportOptions::new(DType::F32)).unwrap_err().to_string();
    assert!(err.contains("not empty") && err.contains("--force"), "{err}");
    assert!(out.join("keep.txt").exists());
    let opts = ImportOptions { dtype: DType::F32, force: true, saturate: false };
    import(&fixture(), &out, &opts).unwrap();
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("model.safetensors").exists());
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    // An empty existing directory is fine without force.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    import(&fixture(), &empty, &ImportOptions::new(DType::F32)).unwrap();
}

/// The fixture with `edit` applied to its metadata and tensor data (GGUF name -> bytes),
/// written into `dir` as `name`.
fn hostile(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut BTreeMap<String, crate::gguf::Value>, &mut BTreeMap<String, Vec<u8>>),
) -> PathBuf {
    use crate::gguf::write::{to_bytes, TensorOut};
    let g = GgufFile::read(fixture()).unwrap();
    let mut meta = g.metadata().clone();
    let mut data: BTreeMap<String, Vec<u8>> =
        g.tensors().iter().map(|t| (t.name.clone(), g.tensor_data(t).unwrap().to_vec())).collect();
    edit(&mut meta, &mut data);
    let tensors: Vec<TensorOut> = g
        .tensors()
        .iter()
        .map(|t| TensorOut { name: &t.name, dims: &t.dims, ggml_type: t.ggml_type, data: &data[&t.name] })
        .collect();
    let path = dir.join(name);
    fs::write(&path, to_bytes(&meta, &tensors)).unwrap();
    path
}

/// Imports `gguf` into a fresh `out` beside it; on error checks that nothing was left.
fn import_err(gguf: &Path, opts: &ImportOptions) -> String {
    let dir = gguf.parent().unwrap();
    let before = fs::read_dir(dir).unwrap().count();
    let err = import(gguf, &dir.join("out"), opts).expect_err("the import must fail").to_string();
    assert_eq!(fs::read_dir(dir).unwrap().count(), before, "something was left behind: {err}");
    err
}

/// Regression (issue 18 row 3): a block count of 2^32-1 or 10^7 grew memory until abort.
#[test]
fn a_lying_block_count_is_refused_before_anything_per_layer() {
    use crate::gguf::Value;
    for n in [u32::MAX, 10_000_000, 1] {
        let tmp = tempfile::tempdir().unwrap();
        let g = hostile(tmp.path(), "m.gguf", |m, _| {
            m.insert("llama.block_count".into(), Value::U32(n));
        });
        let err = import_err(&g, &ImportOptions::new(DType::F32));
        assert!(err.contains("llama.block_count") && err.contains("tensors for 2"), "{n}: {err}");
    }
}

/// Regression (issue 18 row 9): these imported "successfully" into directories that peftrt
/// then refused to load.
#[test]
fn metadata_that_would_not_load_is_refused() {
    use crate::gguf::Value;
    let cases: [(&str, Value, &str); 5] = [
        ("llama.context_length", Value::U32(0), "llama.context_length"),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(f32::NAN), "layer_norm_rms_epsilon"),
        ("llama.rope.freq_base", Value::F32(-1.0), "llama.rope.freq_base"),
        ("llama.rope.scaling.type", Value::String("yarn".into()), "yarn"),
        ("llama.rope.scaling.factor", Value::F32(0.0), "llama.rope.scaling.factor"),
    ];
    for (key, value, expect) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let g = hostile(tmp.path(), "m.gguf", |m, _| {
            m.insert(key.into(), value.clone());
            if key == "llama.rope.scaling.type" {
                m.insert("llama.rope.scaling.factor".into(), Value::F32(4.0));
            }
        });
        let err = import_err(&g, &ImportOptions::new(DType::F32));
        assert!(err.contains(expect), "{key}: {err}");
    }
}

/// Regression (issue 18 row 9): merges naming tokens outside the vocabulary were written
/// into a tokenizer.json that does not load; the load-back catches what no check names.
#[test]
fn an_import_that_would_not_load_writes_nothing() {
    use crate::gguf::Value;
    let tmp = tempfile::tempdir().unwrap();
    let g = hostile(tmp.path(), "m.gguf", |m, _| {
        let merges = vec![Value::String("zzqx qqzy".into())];
        m.insert("tokenizer.ggml.merges".into(), Value::Array(crate::gguf::ValueType::String, merges));
    });
    let err = import_err(&g, &ImportOptions::new(DType::F32));
    assert!(err.contains("would not load") && err.contains("tokenizer"), "{err}");
}

/// Regression (issue 18 row 2): a GGUF's `tokenizer.chat_template` that never ends hung
/// `generate --chat` on the imported model; it is bounded like any other template.
#[test]
fn a_looping_gguf_chat_template_is_bounded_after_import() {
    let tmp = tempfile::tempdir().unwrap();
    let t = "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}{% endfor %}{% endfor %}{% endfor %}";
    let g = hostile(tmp.path(), "m.gguf", |m, _| {
        m.insert("tokenizer.chat_template".into(), crate::gguf::Value::String(t.into()));
    });
    let out = tmp.path().join("out");
    import(&g, &out, &ImportOptions::new(DType::F32)).unwrap();
    let tok = crate::Tokenizer::from_dir(&out).unwrap();
    let err = tok.apply_chat_template(&[crate::Message::new("user", "hi")], true).unwrap_err();
    assert!(matches!(err, Error::Tokenizer(_)) && err.to_string().contains("instructions"), "{err}");
}

fn set_first_f32(data: &mut BTreeMap<String, Vec<u8>>, name: &str, v: f32) {
    data.get_mut(name).unwrap()[..4].copy_from_slice(&v.to_le_bytes());
}

/// Regression (issue 18 row 6): NaN/Inf weights were copied through.
#[test]
fn non_finite_weights_are_refused_by_name() {
    for v in [f32::NAN, f32::INFINITY] {
        let tmp = tempfile::tempdir().unwrap();
        let g = hostile(tmp.path(), "m.gguf", |_, d| set_first_f32(d, "output_norm.weight", v));
        let err = import_err(&g, &ImportOptions::new(DType::F32));
        assert!(err.contains("output_norm.weight") && err.contains("non-finite"), "{err}");
    }
}

/// Regression (issue 18 row 6): a value beyond f16's range became +inf.
#[test]
fn f16_overflow_is_refused_unless_saturating() {
    let tmp = tempfile::tempdir().unwrap();
    let g = hostile(tmp.path(), "m.gguf", |_, d| set_first_f32(d, "output_norm.weight", -1e6));
    let err = import_err(&g, &ImportOptions::new(DType::F16));
    assert!(err.contains("output_norm.weight") && err.contains("--saturate"), "{err}");
    // bf16 and f32 hold it; --saturate clamps it for f16.
    import(&g, &tmp.path().join("bf16"), &ImportOptions::new(DType::BF16)).unwrap();
    let out = tmp.path().join("f16");
    import(&g, &out, &ImportOptions { dtype: DType::F16, force: false, saturate: true }).unwrap();
    let bytes = fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let d = st.tensor("model.norm.weight").unwrap().data()[..2].to_vec();
    assert_eq!(half::f16::from_le_bytes([d[0], d[1]]), -half::f16::MAX);
}

/// Regression (issue 18 row 12): `import dir/model.gguf dir --force` deleted the GGUF.
#[test]
fn force_never_deletes_the_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dir");
    fs::create_dir(&dir).unwrap();
    let g = dir.join("model.gguf");
    fs::copy(fixture(), &g).unwrap();
    let opts = ImportOptions { dtype: DType::F32, force: true, saturate: false };
    let err = import(&g, &dir, &opts).unwrap_err().to_string();
    assert!(err.contains("lies inside the output directory"), "{err}");
    assert_eq!(fs::read(&g).unwrap(), fs::read(fixture()).unwrap());
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn unpermute_inverts_the_gguf_interleaving() {
    // One head of 4 rows of width 1: GGUF order [r0, r2, r1, r3] of HF rows.
    assert_eq!(unpermute_rows(&[0., 2., 1., 3.], 1, 1), vec![0., 1., 2., 3.]);
    // Two heads of 4 rows of width 2.
    let gguf: Vec<f32> = [0, 2, 1, 3, 4, 6, 5, 7].iter().flat_map(|&r| [r as f32, r as f32 + 0.5]).collect();
    let hf: Vec<f32> = (0..8).flat_map(|r| [r as f32, r as f32 + 0.5]).collect();
    assert_eq!(unpermute_rows(&gguf, 2, 2), hf);
}
