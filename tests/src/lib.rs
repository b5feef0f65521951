//! Conformance tests: the runtime against reference outputs from Hugging Face transformers.
//!
//! The tests live in `tests/`; this library holds their shared helpers: reading reference
//! tensors, comparing logits within the project's tolerance, locating fixtures and models.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The project's tolerance: max |Δlogit| ≤ 1e-3 · max |logit| (docs/CORRECTNESS.md).
pub const REL_TOL: f32 = 1e-3;

/// Tensors of a reference safetensors file, converted to f32 / i32, plus header metadata.
pub struct Reference {
    pub f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub i32s: HashMap<String, Vec<i32>>,
    pub metadata: HashMap<String, String>,
    pub path: PathBuf,
}

impl Reference {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
        let mut r = Reference {
            f32s: HashMap::new(),
            i32s: HashMap::new(),
            metadata: meta.metadata().clone().unwrap_or_default(),
            path: path.to_path_buf(),
        };
        for (name, view) in st.tensors() {
            let data = view.data();
            match view.dtype() {
                safetensors::Dtype::F32 => {
                    let v = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                    r.f32s.insert(name, (view.shape().to_vec(), v));
                }
                safetensors::Dtype::I32 => {
                    let v = data.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                    r.i32s.insert(name, v);
                }
                safetensors::Dtype::I64 => {
                    let v = data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as i32).collect();
                    r.i32s.insert(name, v);
                }
                other => bail!("{}: tensor {name} has unexpected dtype {other:?}", path.display()),
            }
        }
        Ok(r)
    }

    pub fn tokens(&self, name: &str) -> Vec<u32> {
        self.i32s
            .get(name)
            .unwrap_or_else(|| panic!("{}: no tensor {name}", self.path.display()))
            .iter()
            .map(|&t| t as u32)
            .collect()
    }

    pub fn logits(&self, name: &str) -> &[f32] {
        &self.f32s.get(name).unwrap_or_else(|| panic!("{}: no tensor {name}", self.path.display())).1
    }

    pub fn has(&self, name: &str) -> bool {
        self.f32s.contains_key(name) || self.i32s.contains_key(name)
    }
}

/// Max |a − b| and max |b| over two equally long logit arrays.
pub fn max_abs_diff(actual: &[f32], expected: &[f32]) -> (f32, f32) {
    assert_eq!(actual.len(), expected.len(), "logit arrays differ in length");
    let mut d = 0.0f32;
    let mut m = 0.0f32;
    for (a, e) in actual.iter().zip(expected) {
        d = d.max((a - e).abs());
        m = m.max(e.abs());
    }
    (d, m)
}

/// Asserts max |Δlogit| ≤ `REL_TOL` · max |logit|, printing both.
pub fn assert_logits_close(what: &str, actual: &[f32], expected: &[f32]) {
    assert_logits_within(what, actual, expected, REL_TOL)
}

/// Asserts max |Δlogit| ≤ `tol` · max |logit|, printing both.
pub fn assert_logits_within(what: &str, actual: &[f32], expected: &[f32], tol: f32) {
    let (d, m) = max_abs_diff(actual, expected);
    eprintln!("{what}: max |Δ| = {d:.3e}, max |logit| = {m:.3}, ratio {:.2e}", d / m);
    assert!(d.is_finite() && d <= tol * m, "{what}: max |Δlogit| {d} exceeds {tol} × {m}");
}

/// BF16 weights on a host with AVX512-BF16 multiply with the activations rounded to bf16 (as
/// llama.cpp does; `PEFTRT_NO_BF16_DOT=1` keeps them in f32): each product moves by up to 2⁻⁸
/// relative, so logits against an f32 reference agree to this fraction of their largest
/// (measured ≤ 9.2e-3 on the BF16 tiny fixture); elsewhere [`REL_TOL`].
pub const BF16_DOT_TOL: f32 = 2e-2;

/// The tolerance for a model whose weights are BF16 (`bf16_weights`) on this host.
pub fn tol_for(bf16_weights: bool) -> f32 {
    if bf16_weights && peftrt::kernels::isa().bf16_dot() {
        BF16_DOT_TOL
    } else {
        REL_TOL
    }
}

/// The repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A committed tiny fixture model directory.
pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// Where a real-model asset is, from `env` or below `models/`; `None` (test skipped with a
/// notice) when absent, unless `PEFTRT_REQUIRE_MODELS=1` (as `make test` sets), then a panic.
pub fn real_model_path(env: &str, default: &str) -> Option<PathBuf> {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| repo_root().join("models").join(default));
    present_or_skip(path, &format!("set {env} or run `make models`"))
}

/// `Some(path)` when it exists; otherwise `None` with a notice naming `hint`, or a panic under
/// `PEFTRT_REQUIRE_MODELS=1` (the policy of [`real_model_path`], for files found inside one).
pub fn present_or_skip(path: PathBuf, hint: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    let msg = format!("{} not found ({hint})", path.display());
    if std::env::var("PEFTRT_REQUIRE_MODELS").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("skipping: {msg}");
    None
}

/// Logits at every position of `tokens` from a fresh session (context 128, batches of 16) with
/// `adapters` active.
pub fn session_logits(
    model: &std::sync::Arc<peftrt::Model>,
    adapters: &[(std::sync::Arc<peftrt::Adapter>, f32)],
    tokens: &[u32],
    threads: usize,
) -> Vec<f32> {
    let opts = peftrt::SessionOptions { n_ctx: 128, n_batch: 16, n_threads: threads };
    let mut s = peftrt::Session::new(model.clone(), &opts).unwrap();
    s.set_adapters(adapters).unwrap();
    let mut out = Vec::new();
    s.eval_all(tokens, &mut out).unwrap();
    out
}
