//! NF4 bases (tests/fixtures/nf4, made by scripts/make_nf4_fixtures.py with bitsandbytes):
//! a tiny llama quantised and saved by transformers + bitsandbytes, run without expanding it,
//! against transformers' logits; a PEFT adapter on it (QLoRA serving); merging onto it.

use peftrt::merge::MergeOptions;
use peftrt::{generate, Adapter, LoadOptions, Model, Sampler, SamplingParams, Session, SessionOptions};
use peftrt_conformance::{assert_logits_close, fixture, Reference};
use std::sync::Arc;

fn nf4_model() -> Arc<Model> {
    Arc::new(Model::load(&fixture("nf4/tiny-llama-nf4"), &LoadOptions::default()).unwrap())
}

fn reference() -> Reference {
    Reference::load(&fixture("nf4/reference.safetensors")).unwrap()
}

use peftrt_conformance::session_logits as logits;

#[test]
fn bitsandbytes_checkpoint_matches_transformers() {
    let m = nf4_model();
    assert_eq!(m.linears().filter(|l| l.nf4.is_some()).count(), 14, "every decoder linear is 4-bit");
    let r = reference();
    let tokens = r.tokens("tokens_b");
    for threads in [1, 2] {
        assert_logits_close(
            &format!("tiny-llama-nf4 ({threads} threads)"),
            &logits(&m, &[], &tokens, threads),
            r.logits("logits_b"),
        );
    }
    // One token at a time (the fused matvec kernel) equals the batched pass (dequantised tiles).
    let mut s = Session::new(m.clone(), &SessionOptions { n_ctx: 128, n_batch: 16, n_threads: 2 }).unwrap();
    let mut got = Vec::new();
    for &t in &tokens {
        s.eval_all(&[t], &mut got).unwrap();
    }
    assert_logits_close("tiny-llama-nf4 token by token", &got, r.logits("logits_b"));

    let expected = r.tokens("greedy_a");
    let mut s = Session::new(m.clone(), &SessionOptions::default()).unwrap();
    let params = SamplingParams { max_tokens: expected.len(), ignore_eos: true, ..Default::default() };
    let mut sampler = Sampler::new(params, m.config.vocab_size).unwrap();
    let g = generate(&mut s, &r.tokens("tokens_a"), &mut sampler, |_| true).unwrap();
    assert_eq!(g.tokens, expected, "greedy continuation on the NF4 base");
}

#[test]
fn qlora_adapter_on_the_nf4_base_matches_peft() {
    let m = nf4_model();
    let r = reference();
    let a = Arc::new(Adapter::load(&fixture("nf4/llama-nf4-qvd"), &m).unwrap());
    assert_logits_close("NF4 + LoRA", &logits(&m, &[(a, 1.0)], &r.tokens("tokens_b"), 2), r.logits("logits_b_lora"));
}

/// Merging onto an NF4 base merges into the dequantised weights and writes a float model.
#[test]
fn merge_onto_nf4_base_writes_the_dequantised_floats() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let s = peftrt::merge::merge(
        &fixture("nf4/tiny-llama-nf4"),
        &[(fixture("nf4/llama-nf4-qvd"), 1.0)],
        &out,
        &MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(s.merged_layers, 6);
    let merged = Arc::new(Model::load(&out, &LoadOptions::default()).unwrap());
    assert!(merged.linears().all(|l| l.nf4.is_none()), "the merged model is float");
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(!config.contains("quantization_config"), "{config}");
    assert_logits_close(
        "merged NF4 + LoRA",
        &logits(&merged, &[], &r.tokens("tokens_b"), 2),
        r.logits("logits_b_lora"),
    );
}

/// The runtime's quantiser against bitsandbytes' `quantize_4bit` (and its double quantisation,
/// torch's mean and the 8-bit blockwise kernel) on the adversarial cases of
/// tests/fixtures/nf4/quantize_cases.safetensors: byte for byte, bit for bit.
#[test]
fn quantiser_is_bitsandbytes_exact() {
    use peftrt::nf4::{self, Scales};
    let bytes = std::fs::read(fixture("nf4/quantize_cases.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |name: &str| -> Vec<f32> {
        let t = st.tensor(name).unwrap_or_else(|_| panic!("{name} missing"));
        let d = t.data();
        match t.dtype() {
            safetensors::Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            safetensors::Dtype::BF16 => {
                d.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            safetensors::Dtype::F16 => {
                d.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            other => panic!("{name}: {other:?}"),
        }
    };
    let u8s = |name: &str| st.tensor(name).unwrap().data().to_vec();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&f32s("nf4_map")), bits(&nf4::NF4_TABLE));
    assert_eq!(bits(&f32s("dynamic_map")), bits(&nf4::dynamic_map()));

    let cases: Vec<&str> = meta.keys().filter_map(|k| k.strip_suffix(".blocksize")).collect();
    assert!(cases.len() >= 12, "{cases:?}");
    for case in cases {
        let bs: usize = meta[&format!("{case}.blocksize")].parse().unwrap();
        let x = f32s(&format!("{case}.input"));
        let q = nf4::quantize(&x, bs, false);
        assert_eq!(q.packed, u8s(&format!("{case}.weight")), "{case}: packed codes");
        let Scales::F32(absmax) = &q.scales else { unreachable!() };
        assert_eq!(bits(absmax), bits(&f32s(&format!("{case}.absmax"))), "{case}: absmax");
        let dq = nf4::quantize(&x, bs, true);
        assert_eq!(dq.packed, q.packed, "{case}: double quantisation keeps the codes");
        let Scales::Double { codes, nested_absmax, offset } = &dq.scales else { unreachable!() };
        assert_eq!(offset.to_bits(), f32s(&format!("{case}.dq.offset"))[0].to_bits(), "{case}: offset (torch mean)");
        assert_eq!(*codes, u8s(&format!("{case}.dq.absmax")), "{case}: 8-bit absmax codes");
        assert_eq!(bits(nested_absmax), bits(&f32s(&format!("{case}.dq.nested_absmax"))), "{case}: nested absmax");
        // Dequantised with the loader's formula, the values equal bitsandbytes'.
        let scales = dq.absmax();
        let deq: Vec<f32> = (0..x.len())
            .map(|i| {
                let c = (dq.packed[i / 2] >> if i % 2 == 0 { 4 } else { 0 }) & 15;
                nf4::NF4_TABLE[c as usize] * scales[i / bs]
            })
            .collect();
        assert_eq!(bits(&deq), bits(&f32s(&format!("{case}.dq.dequant"))), "{case}: dequantised");
    }

    // torch's f32 mean, and double quantisation of long absmax vectors, on inputs regenerated here.
    let input = |n: usize, signed: bool| -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let u = (i.wrapping_mul(2654435761).wrapping_add(12345)) as u32;
                let x = (u >> 8) as f32 * 2f32.powi(-30 + (u & 7) as i32);
                if signed && u & 8 != 0 {
                    -x
                } else {
                    x
                }
            })
            .collect()
    };
    let mut n_means = 0;
    for key in st.names() {
        let Some(rest) = key.strip_prefix("mean.") else { continue };
        let Some((family, n)) = rest.split_once('.') else { continue };
        let Ok(n) = n.parse::<usize>() else { continue }; // …threads2/4: multi-threaded torch
        let got = nf4::torch_mean(&input(n, family == "signed"));
        assert_eq!(got.to_bits(), f32s(key)[0].to_bits(), "{key}");
        n_means += 1;
    }
    assert!(n_means >= 30, "{n_means} means checked");
    for n in [1000, 4099] {
        let a = input(n, false);
        let offset = nf4::torch_mean(&a);
        assert_eq!(offset.to_bits(), f32s(&format!("dq.pos.{n}.offset"))[0].to_bits());
        let centred: Vec<f32> = a.iter().map(|v| v - offset).collect();
        let (codes, nested) = nf4::quantize_blockwise_8bit(&centred);
        assert_eq!(codes, u8s(&format!("dq.pos.{n}.absmax")), "dq.pos.{n}");
        assert_eq!(bits(&nested), bits(&f32s(&format!("dq.pos.{n}.nested_absmax"))));
    }
    let (codes, absmax) = nf4::quantize_blockwise_8bit(&f32s("blockwise8.input"));
    assert_eq!(codes, u8s("blockwise8.codes"));
    assert_eq!(bits(&absmax), bits(&f32s("blockwise8.absmax")));
}

/// `peftrt quantize` of tiny-llama writes every tensor with the bytes transformers +
/// bitsandbytes wrote for tiny-llama-nf4 (codes, scales, maps, the quant_state JSON), and the
/// same quantization_config.
#[test]
fn quantize_model_equals_transformers_bitsandbytes_checkpoint() {
    use peftrt::quantize::{quantize_model, QuantizeOptions};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    let s = quantize_model(&fixture("tiny-llama"), &out, &QuantizeOptions::default()).unwrap();
    assert_eq!((s.quantized_layers, s.kept_layers), (14, 0));
    let ours = std::fs::read(out.join("model.safetensors")).unwrap();
    let theirs = std::fs::read(fixture("nf4/tiny-llama-nf4/model.safetensors")).unwrap();
    let (ours, theirs) = (
        safetensors::SafeTensors::deserialize(&ours).unwrap(),
        safetensors::SafeTensors::deserialize(&theirs).unwrap(),
    );
    let mut names = ours.names();
    names.sort();
    let mut their_names = theirs.names();
    their_names.sort();
    assert_eq!(names, their_names);
    for name in names {
        let (a, b) = (ours.tensor(name).unwrap(), theirs.tensor(name).unwrap());
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{name}");
        assert!(a.data() == b.data(), "{name}: bytes differ");
    }
    let config = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(config(&out)["quantization_config"], config(&fixture("nf4/tiny-llama-nf4"))["quantization_config"]);

    // It runs as the bitsandbytes checkpoint does.
    let m = Arc::new(Model::load(&out, &LoadOptions::default()).unwrap());
    let r = reference();
    assert_logits_close("peftrt quantize", &logits(&m, &[], &r.tokens("tokens_b"), 2), r.logits("logits_b"));

    // Options: f32 scales, another block size, layers kept in float.
    let out2 = dir.path().join("q2");
    let opts =
        QuantizeOptions { blocksize: 32, double_quant: false, keep: vec!["down_proj".into()], ..Default::default() };
    let s = quantize_model(&fixture("tiny-llama"), &out2, &opts).unwrap();
    assert_eq!((s.quantized_layers, s.kept_layers), (12, 2));
    let m2 = Model::load(&out2, &LoadOptions::default()).unwrap();
    let l0 = &m2.layers[0];
    assert!(l0.down_proj.nf4.is_none() && l0.q_proj.nf4.as_ref().is_some_and(|q| q.blocksize == 32 && !q.double_quant));
}

/// Re-quantising a model merged onto an NF4 base needs an explicit flag.
#[test]
fn requantising_a_merged_nf4_model_needs_a_flag() {
    use peftrt::quantize::{quantize_model, QuantizeOptions};
    let dir = tempfile::tempdir().unwrap();
    let merged = dir.path().join("merged");
    let adapters = [(fixture("nf4/llama-nf4-qvd"), 1.0)];
    peftrt::merge::merge(&fixture("nf4/tiny-llama-nf4"), &adapters, &merged, &MergeOptions::default()).unwrap();
    let e = quantize_model(&merged, &dir.path().join("q"), &QuantizeOptions::default()).unwrap_err().to_string();
    assert!(e.contains("merged onto a dequantised NF4 base") && e.contains("--requantize-merged"), "{e}");
    assert!(!dir.path().join("q").exists());
    let opts = QuantizeOptions { requantize_merged: true, ..Default::default() };
    quantize_model(&merged, &dir.path().join("q"), &opts).unwrap();
    let e = quantize_model(&fixture("nf4/tiny-llama-nf4"), &dir.path().join("q3"), &QuantizeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("already quantised"), "{e}");
}

/// A copy of tiny-llama-nf4 whose tensors `edit` may change (name, dtype, shape, bytes).
fn corrupted(edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>)) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let src = fixture("nf4/tiny-llama-nf4");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), d.path().join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut list: Vec<_> =
        st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    edit(&mut list);
    let views: Vec<_> = list
        .iter()
        .map(|(n, dt, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(d.path().join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    d
}

fn load_err(dir: &std::path::Path) -> String {
    match Model::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e.to_string(),
    }
}

const Q: &str = "model.layers.0.self_attn.q_proj.weight";

fn set_state(list: &mut [(String, safetensors::Dtype, Vec<usize>, Vec<u8>)], edit: impl Fn(&str) -> String) {
    let state = list.iter_mut().find(|t| t.0 == format!("{Q}.quant_state.bitsandbytes__nf4")).unwrap();
    let text = edit(std::str::from_utf8(&state.3).unwrap());
    state.2 = vec![text.len()];
    state.3 = text.into_bytes();
}

#[test]
fn bad_nf4_checkpoints_are_refused_clearly() {
    let d = corrupted(|l| l.retain(|t| t.0 != format!("{Q}.absmax")));
    let e = load_err(d.path());
    assert!(e.contains(&format!("{Q}.absmax")) && e.contains("missing"), "{e}");

    let d = corrupted(|l| l.retain(|t| !t.0.starts_with(&format!("{Q}.quant_state"))));
    let e = load_err(d.path());
    assert!(e.contains("quant_state.bitsandbytes__nf4") && e.contains("is missing"), "{e}");

    let d = corrupted(|l| set_state(l, |s| s.replace("\"shape\": [64, 64]", "\"shape\": [32, 128]")));
    let e = load_err(d.path());
    assert!(e.contains("says shape [32, 128]") && e.contains("[64, 64]"), "{e}");

    let d = corrupted(|l| set_state(l, |s| s.replace("\"blocksize\": 64", "\"blocksize\": 48")));
    let e = load_err(d.path());
    assert!(e.contains("blocksize") && e.contains("48") && e.contains("4096"), "{e}");

    // A valid block size that disagrees with the number of scales.
    let d = corrupted(|l| set_state(l, |s| s.replace("\"blocksize\": 64", "\"blocksize\": 128")));
    let e = load_err(d.path());
    assert!(e.contains(&format!("{Q}.absmax")) && e.contains("quant_state agree"), "{e}");

    let d = corrupted(|l| set_state(l, |_| "{not json".into()));
    let e = load_err(d.path());
    assert!(e.contains("quant_state") && e.contains("JSON"), "{e}");

    let d = corrupted(|l| {
        let w = l.iter_mut().find(|t| t.0 == Q).unwrap();
        w.3.truncate(w.3.len() - 2);
        w.2 = vec![w.3.len(), 1];
    });
    let e = load_err(d.path());
    assert!(e.contains(Q) && e.contains("4 bits"), "{e}");

    // FP4 is refused by name.
    let d = corrupted(|l| {
        for t in l.iter_mut().filter(|t| t.0.ends_with("bitsandbytes__nf4")) {
            t.0 = t.0.replace("bitsandbytes__nf4", "bitsandbytes__fp4");
            t.3 = String::from_utf8(t.3.clone()).unwrap().replace("nf4", "fp4").into_bytes();
        }
    });
    let e = load_err(d.path());
    assert!(e.contains("FP4") && e.contains("bitsandbytes__fp4"), "{e}");

    // Other quantisation methods in config.json.
    let d = corrupted(|_| {});
    let p = d.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["quantization_config"]["quant_method"] = "gptq".into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("quant_method") && e.contains("gptq"), "{e}");
}

/// transformers + bitsandbytes load what `peftrt quantize` writes, as a 4-bit model with the
/// logits of bitsandbytes' own checkpoint (scripts/check_nf4_loads.py, run with the Python of
/// `PEFTRT_PYTHON`; `make test` sets it, plain `cargo test` skips unless PEFTRT_REQUIRE_MODELS=1).
#[test]
fn transformers_loads_peftrt_quantize_output() {
    let python = match std::env::var_os("PEFTRT_PYTHON") {
        Some(p) => std::path::PathBuf::from(p),
        None if std::env::var_os("PEFTRT_REQUIRE_MODELS").is_some() => panic!("PEFTRT_PYTHON is not set"),
        None => return eprintln!("skipped: set PEFTRT_PYTHON to a Python with transformers and bitsandbytes"),
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    peftrt::quantize::quantize_model(&fixture("tiny-llama"), &out, &Default::default()).unwrap();
    let status = std::process::Command::new(python)
        .arg(peftrt_conformance::repo_root().join("scripts/check_nf4_loads.py"))
        .arg(&out)
        .arg(fixture("nf4/reference.safetensors"))
        .args(["tokens_b", "logits_b"])
        .status()
        .unwrap();
    assert!(status.success(), "transformers could not load peftrt's NF4 output with the same logits");
}

/// `--quantize-head`: a tied head becomes its own NF4 `lm_head` (the embeddings stay float),
/// peftrt runs it, and transformers + bitsandbytes load it to the same logits.
#[test]
fn quantized_head_runs_here_and_in_transformers() {
    use peftrt::quantize::{quantize_model, QuantizeOptions};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    let opts = QuantizeOptions { quantize_head: true, ..Default::default() };
    let s = quantize_model(&fixture("tiny-llama3-tied"), &out, &opts).unwrap();
    assert_eq!(s.kept_layers, 0);
    let m = Arc::new(Model::load(&out, &LoadOptions::default()).unwrap());
    assert!(
        !m.config.tie_word_embeddings && m.lm_head.nf4.is_some() && m.embed_tokens.dtype != peftrt::weights::DType::U8
    );
    let r = Reference::load(&fixture("tiny-llama3-tied/reference.safetensors")).unwrap();
    let tokens = r.tokens("tokens_b");
    let got = logits(&m, &[], &tokens, 2);
    // 4-bit weights move the logits, but not beyond recognition.
    let (d, scale) = peftrt_conformance::max_abs_diff(&got, r.logits("logits_b"));
    assert!(d < 0.5 * scale, "NF4 with an NF4 head: max |Δ| {d} vs max |logit| {scale}");

    let Some(python) = std::env::var_os("PEFTRT_PYTHON") else { return };
    let ids: Vec<u8> = tokens.iter().flat_map(|&t| (t as i32).to_le_bytes()).collect();
    let vals: Vec<u8> = got.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = [
        ("tokens", safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![tokens.len()], &ids).unwrap()),
        (
            "logits",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![tokens.len(), m.config.vocab_size],
                &vals,
            )
            .unwrap(),
        ),
    ];
    let ours = dir.path().join("ours.safetensors");
    std::fs::write(&ours, safetensors::serialize(views, None).unwrap()).unwrap();
    let status = std::process::Command::new(python)
        .arg(peftrt_conformance::repo_root().join("scripts/check_nf4_loads.py"))
        .args([out.as_os_str(), ours.as_os_str()])
        .args(["tokens", "logits"])
        .status()
        .unwrap();
    assert!(status.success(), "transformers disagrees with peftrt on the NF4-head model");
}
