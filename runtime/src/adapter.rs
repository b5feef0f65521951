//! LoRA and DoRA adapters in the Hugging Face PEFT format, applied unmerged on top of a shared
//! model.
//!
//! Loading has two steps. [`AdapterFile::open`] reads `adapter_config.json` and memory-maps
//! `adapter_model.safetensors`, checking that the file is a complete, consistent LoRA adapter
//! on its own (this is all `peftrt inspect` needs). [`Adapter::load`] then binds it to one
//! [`Model`]: every tensor must map to one of the model's linear layers with matching shapes,
//! `target_modules` must agree with the tensors, and a recorded base-model fingerprint must
//! match. The weights stay memory-mapped in a table indexed by [`Linear::id`], so a projection
//! finds its adapter in O(1). Sessions choose which adapters are active, with a scale each
//! ([`crate::Session::set_adapters`]); nothing is copied when they switch.
//!
//! Semantics follow PEFT's `LoraConfig`/`LoraLayer` (peft/tuners/lora): scale `lora_alpha / r`
//! (`lora_alpha / sqrt(r)` with `use_rslora`), per-module `rank_pattern`/`alpha_pattern` keys
//! matched as `(.*\.)?(key)$`, `target_modules` as a list of name suffixes, a regex matched
//! against the whole module name, or `"all-linear"` (every linear layer but the output head),
//! `exclude_modules` likewise, and `layers_to_transform`.
//!
//! DoRA (`use_dora`) rescales each output row of the adapted weight to a learned magnitude `m`:
//! `y = m / ‖W + s·B·A‖_row ⊙ (W x + s·B A x) + b`, the norm taken per output row over the
//! input dimension and treated as a constant (PEFT detaches it). The norm depends on the scale
//! `s`, which a session may change; so loading stores, per row, `‖W‖²`, `⟨W, B·A⟩` and
//! `‖B·A‖²`, from which the norm for any scale is `sqrt(‖W‖² + 2s⟨W, BA⟩ + s²‖BA‖²)`.

use crate::error::{Error, MismatchOverride, Result};
use crate::kernels::{self, MatRef};
use crate::model::{Linear, Model};
use crate::weights::{Tensor, WeightStore};
use regex::Regex;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The safetensors metadata key under which an adapter records the base model it was trained
/// on (see [`BaseFingerprint`]).
pub const BASE_FINGERPRINT_KEY: &str = "peftrt.base_model";

/// One adapted linear layer: `ΔW·x = scale · B (A x)`, and for DoRA the row magnitudes.
pub struct LoraWeights {
    /// `[r, in_features]`
    pub a: Tensor,
    /// `[out_features, r]`
    pub b: Tensor,
    pub rank: usize,
    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub scale: f32,
    /// DoRA's magnitudes and the base's row norms; `None` for plain LoRA.
    pub dora: Option<Dora>,
}

/// DoRA's per-output-row state (see the module documentation).
pub struct Dora {
    /// `m`, the learned magnitude of each output row.
    pub magnitude: Vec<f32>,
    /// Per row: `‖W‖²`, `⟨W, B·A⟩`, `‖B·A‖²` (f64: the norm is a difference-free sum of them,
    /// but `‖W‖²` dominates and must not swallow the small terms).
    norms: Vec<[f64; 3]>,
}

impl Dora {
    /// `gain[o] = m[o] / ‖W + s·B·A‖_row o` for effective scale `s`.
    pub fn gains(&self, s: f32, gain: &mut [f32]) {
        let s = f64::from(s);
        for ((g, &m), [ww, wd, dd]) in gain.iter_mut().zip(&self.magnitude).zip(&self.norms) {
            let norm = (ww + 2.0 * s * wd + s * s * dd).max(0.0).sqrt();
            *g = (f64::from(m) / norm) as f32;
        }
    }
}

impl LoraWeights {
    pub fn a_mat(&self) -> MatRef<'_> {
        MatRef { w: self.a.weights(), rows: self.rank, cols: self.a.shape[1] }
    }
    pub fn b_mat(&self) -> MatRef<'_> {
        MatRef { w: self.b.weights(), rows: self.b.shape[0], cols: self.rank }
    }

    /// `ΔW = B·A` (unscaled), `[out, in]`, in f32.
    pub fn delta(&self) -> Vec<f32> {
        let (a, b) = (self.a.to_f32_vec(), self.b.to_f32_vec());
        let (r, cols) = (self.rank, self.a.shape[1]);
        let mut d = vec![0.0f32; self.b.shape[0] * cols];
        for (o, row) in d.chunks_exact_mut(cols).enumerate() {
            for k in 0..r {
                kernels::axpy(row, b[o * r + k], &a[k * cols..(k + 1) * cols]);
            }
        }
        d
    }
}

/// The largest adapter scale a session or merge accepts, in magnitude. Useful scales are
/// around 0–2; far beyond this the adapted activations overflow f32 in the norms, and the
/// model answers with constant logits (token 0 forever) rather than an error.
pub const MAX_SCALE: f32 = 1000.0;

/// An error unless `scale` is a finite number within ±[`MAX_SCALE`].
pub fn check_scale(adapter: &str, scale: f32) -> Result<()> {
    if !scale.is_finite() || scale.abs() > MAX_SCALE {
        return Err(Error::Input(format!(
            "adapter {adapter}: scale {scale} is out of range; use a finite number within ±{MAX_SCALE} (1 = as trained, 0 = off)"
        )));
    }
    Ok(())
}

/// Options for [`Adapter::load_with`].
#[derive(Clone, Debug, Default)]
pub struct AdapterOptions {
    /// Load even if the adapter records a different base model (its outputs will be wrong in
    /// ways no check can see; for experiments only).
    pub allow_base_mismatch: bool,
    /// Refuse an adapter without a base-model fingerprint whose `base_model_name_or_path`
    /// names another model than the one it is loaded on (see [`names_another_model`]);
    /// without it such an adapter loads with a warning. `allow_base_mismatch` overrides it.
    pub strict_base: bool,
}

/// The tensors of one adapted module, as found in the file.
pub struct ModuleTensors {
    pub a: Tensor,
    pub b: Tensor,
    /// DoRA's `lora_magnitude_vector`, `[out]`.
    pub magnitude: Option<Tensor>,
}

impl ModuleTensors {
    pub fn rank(&self) -> usize {
        self.a.shape[0]
    }
}

/// An adapter directory, read and checked on its own, not yet bound to a model.
pub struct AdapterFile {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    /// Adapted module name (e.g. `model.layers.0.self_attn.q_proj`) → its tensors.
    pub modules: BTreeMap<String, ModuleTensors>,
    /// The base model the adapter records it was trained on, if it records one.
    pub base_fingerprint: Option<BaseFingerprint>,
    /// Size of `adapter_model.safetensors` in bytes.
    pub file_bytes: u64,
    store: WeightStore,
}

impl AdapterFile {
    /// Reads `dir/adapter_config.json` and maps `dir/adapter_model.safetensors`, checking that
    /// every tensor is a LoRA tensor, A/B pairs are complete and ranks agree with the config.
    pub fn open(dir: &Path) -> Result<AdapterFile> {
        let cfg_path = dir.join("adapter_config.json");
        if !dir.is_dir() {
            return Err(Error::not_a_directory(
                dir,
                "not a directory; pass a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)",
            ));
        }
        let text = crate::fsutil::read_text_file(&cfg_path, crate::fsutil::MAX_JSON_BYTES)?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?;
        let config = AdapterConfig::parse(&v, &cfg_path)?;
        let path = dir.join("adapter_model.safetensors");
        if !path.is_file() {
            return Err(if dir.join("adapter_model.bin").is_file() {
                Error::Unsupported(format!(
                    "{}: only adapter_model.bin (a Python pickle, which can run code when loaded) is here; \
                     convert it to adapter_model.safetensors (PEFT: save_pretrained(..., safe_serialization=True))",
                    dir.display()
                ))
            } else {
                Error::missing(dir, "adapter_model.safetensors is missing")
            });
        }
        let file_bytes = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
        // SAFETY: the adapter file must not change while loaded; documented on `Model::load` too.
        let store = unsafe { WeightStore::open_file(&path)? };

        let mut parts: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
        for t in store.tensors() {
            let (module, part) = split_key(&t.name).ok_or_else(|| {
                if t.name.contains("lora_embedding_") {
                    let why = "is a LoRA on an embedding layer, which peftrt does not support (only linear layers)";
                    Error::unsupported_tensor(&t.name, format!("in {}: {why}", path.display()))
                } else {
                    let why =
                        "is not a LoRA tensor (expected …lora_A.weight, …lora_B.weight or …lora_magnitude_vector)";
                    Error::tensor(&t.name, format!("in {}: {why}", path.display()))
                }
            })?;
            parts.entry(module.to_string()).or_default()[part as usize] = Some(t.clone());
        }
        let mut modules = BTreeMap::new();
        for (module, [a, b, m]) in parts {
            let missing = |part: &str| {
                Error::tensor(
                    format!("{module}.{part}"),
                    format!("is missing from {}: the adapter file is incomplete", path.display()),
                )
            };
            let a = a.ok_or_else(|| missing("lora_A.weight"))?;
            let b = b.ok_or_else(|| missing("lora_B.weight"))?;
            // Adapters are small: every value is checked once here, so no command (generate,
            // merge, the C API) ever computes with raw bytes or a NaN read as weights.
            for t in [Some(&a), Some(&b), m.as_ref()].into_iter().flatten() {
                check_adapter_tensor(t)?;
            }
            let rank = config.rank_for(&module);
            if a.shape.len() != 2 || a.shape[0] != rank {
                return Err(Error::tensor(
                    &a.name,
                    format!("has shape {:?}, but adapter_config.json says rank {rank} for this module", a.shape),
                ));
            }
            if b.shape.len() != 2 || b.shape[1] != rank {
                return Err(Error::tensor(
                    &b.name,
                    format!("has shape {:?}, but adapter_config.json says rank {rank} for this module", b.shape),
                ));
            }
            match (&m, config.use_dora) {
                (Some(m), true) if m.shape != [b.shape[0]] => {
                    return Err(Error::tensor(
                        &m.name,
                        format!("has shape {:?}; DoRA needs one magnitude per output row: [{}]", m.shape, b.shape[0]),
                    ))
                }
                (None, true) => return Err(missing("lora_magnitude_vector")),
                (Some(m), false) => {
                    return Err(Error::tensor(
                        &m.name,
                        "is a DoRA magnitude, but adapter_config.json does not set use_dora: the config and weights disagree",
                    ))
                }
                _ => {}
            }
            modules.insert(module, ModuleTensors { a, b, magnitude: m });
        }
        if modules.is_empty() {
            return Err(Error::format(&path, "has no LoRA tensors"));
        }
        let base_fingerprint = match store.metadata().get(BASE_FINGERPRINT_KEY) {
            None => None,
            Some(s) => Some(BaseFingerprint::parse(s).map_err(|msg| {
                Error::format(&path, format!("metadata `{BASE_FINGERPRINT_KEY}` is malformed: {msg}"))
            })?),
        };
        Ok(AdapterFile { dir: dir.to_path_buf(), config, modules, base_fingerprint, file_bytes, store })
    }

    /// Number of adapter parameters.
    pub fn n_params(&self) -> usize {
        self.modules.values().map(|m| m.a.numel() + m.b.numel() + m.magnitude.as_ref().map_or(0, Tensor::numel)).sum()
    }

    /// The LoRA scale of a module: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale_for(&self, module: &str) -> f32 {
        let (rank, alpha) = (self.config.rank_for(module) as f32, self.config.alpha_for(module));
        if self.config.rslora {
            alpha / rank.sqrt()
        } else {
            alpha / rank
        }
    }
}

/// An adapter tensor must hold finite floats: U8/I8 (or any integer) values are not LoRA
/// weights, and one NaN or infinity would make every output non-finite.
fn check_adapter_tensor(t: &Tensor) -> Result<()> {
    t.expect_float()?;
    t.check_finite()
}

/// A loaded, validated adapter, bound to one model.
pub struct Adapter {
    pub name: String,
    pub dir: PathBuf,
    /// Indexed by [`Linear::id`] of the model it was loaded for.
    layers: Vec<Option<LoraWeights>>,
    /// Largest rank over all layers (for scratch sizing).
    pub max_rank: usize,
    /// Largest output width over the adapted layers (for scratch sizing).
    pub max_out: usize,
    /// Whether any layer is DoRA.
    pub dora: bool,
    /// Address of the model it was loaded for: sessions refuse it on any other.
    pub(crate) model_key: usize,
    _store: WeightStore,
}

impl Adapter {
    /// Loads the PEFT adapter in `dir` for `model`, checking every tensor against it.
    pub fn load(dir: &Path, model: &Model) -> Result<Adapter> {
        Self::load_with(dir, model, &AdapterOptions::default())
    }

    /// [`Adapter::load`] with options.
    pub fn load_with(dir: &Path, model: &Model, opts: &AdapterOptions) -> Result<Adapter> {
        Self::bind(AdapterFile::open(dir)?, model, opts)
    }

    /// Binds an adapter file, already read and checked on its own, to `model`. Every error
    /// from here on means the adapter does not fit this model (another base, architecture or
    /// shape), which the C API reports apart from unreadable or malformed files.
    pub fn bind(file: AdapterFile, model: &Model, opts: &AdapterOptions) -> Result<Adapter> {
        let dir = file.dir.clone();
        let cfg_path = dir.join("adapter_config.json");
        if let Some(fp) = &file.base_fingerprint {
            if let Err(why) = fp.check(&BaseFingerprint::of(model)) {
                let msg = format!(
                    "{}: this adapter was trained on a different base model than {} ({why})",
                    dir.display(),
                    model.dir.display()
                );
                if !opts.allow_base_mismatch {
                    return Err(Error::AdapterMismatch { msg, overridable: Some(MismatchOverride::AllowBaseMismatch) });
                }
                log::warn!("{msg}; loading anyway as asked");
            }
        } else if let Some(named) = names_another_model(&file.config, model) {
            let msg = format!(
                "{}: adapter_config.json's base_model_name_or_path is \"{named}\", but it is loaded on {}, \
                 and it records no base-model fingerprint to tell whether the weights are the same",
                dir.display(),
                model.dir.display()
            );
            if opts.strict_base && !opts.allow_base_mismatch {
                return Err(Error::AdapterMismatch { msg, overridable: Some(MismatchOverride::NotStrictBase) });
            }
            log::warn!("{msg}; its output is wrong unless it was trained on this model");
        }
        let mut layers: Vec<Option<LoraWeights>> = model.linears().map(|_| None).collect();
        let by_name: std::collections::HashMap<&str, &Linear> = model.linears().map(|l| (l.name.as_str(), l)).collect();
        for (module, t) in &file.modules {
            let lin = by_name.get(module.as_str()).ok_or_else(|| Error::AdapterMismatch {
                msg: format!(
                    "tensor `{}`: targets `{module}`, which this base model does not have (is the adapter for a different model?)",
                    t.a.name
                ),
                overridable: None,
            })?;
            let rank = t.rank();
            let expect = |t: &Tensor, shape: &[usize]| -> Result<()> {
                if t.shape != shape {
                    return Err(Error::AdapterMismatch {
                        msg: format!(
                            "tensor `{}`: does not match this base model: expected {:?}, found {:?}",
                            t.name, shape, t.shape
                        ),
                        overridable: None,
                    });
                }
                Ok(())
            };
            expect(&t.a, &[rank, lin.cols])?;
            expect(&t.b, &[lin.rows, rank])?;
            let mut lw =
                LoraWeights { a: t.a.clone(), b: t.b.clone(), rank, scale: file.scale_for(module), dora: None };
            if let Some(m) = &t.magnitude {
                lw.dora = Some(Dora { magnitude: m.to_f32_vec(), norms: dora_norms(lin, &lw) });
            }
            layers[lin.id] = Some(lw);
        }
        check_targets(&file, model, &cfg_path)?;
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
        let adapted = layers.iter().flatten();
        let max_rank = adapted.clone().map(|l| l.rank).max().unwrap_or(0);
        let max_out = adapted.clone().map(|l| l.b.shape[0]).max().unwrap_or(0);
        let dora = adapted.clone().any(|l| l.dora.is_some());
        let model_key = model as *const Model as usize;
        Ok(Adapter { name, dir: dir.to_path_buf(), layers, max_rank, max_out, dora, model_key, _store: file.store })
    }

    /// The adapter's weights for a linear layer, if it adapts it.
    #[inline]
    pub fn for_layer(&self, lin: &Linear) -> Option<&LoraWeights> {
        self.layers.get(lin.id).and_then(Option::as_ref)
    }

    /// Number of adapted linear layers.
    pub fn n_layers(&self) -> usize {
        self.layers.iter().filter(|l| l.is_some()).count()
    }

    /// Whether this adapter was loaded for `model` (the very instance).
    pub fn is_for(&self, model: &Model) -> bool {
        self.model_key == model as *const Model as usize
    }
}

/// Per-row `‖W‖²`, `⟨W, B·A⟩`, `‖B·A‖²` of a DoRA layer (f64 accumulation of f32 products).
fn dora_norms(lin: &Linear, lw: &LoraWeights) -> Vec<[f64; 3]> {
    let (a, b) = (lw.a.to_f32_vec(), lw.b.to_f32_vec());
    let (r, cols) = (lw.rank, lin.cols);
    // G = A·Aᵀ, so ‖(B·A)_o‖² = B_o G B_oᵀ.
    let mut g = vec![0.0f64; r * r];
    for k in 0..r {
        for l in 0..r {
            g[k * r + l] = dot64(&a[k * cols..(k + 1) * cols], &a[l * cols..(l + 1) * cols]);
        }
    }
    let w = lin.mat().w;
    let mut row = vec![0.0f32; cols];
    (0..lin.rows)
        .map(|o| {
            w.to_f32(o * cols, &mut row);
            let bo = &b[o * r..(o + 1) * r];
            let ww = dot64(&row, &row);
            let wd: f64 = (0..r).map(|k| f64::from(bo[k]) * dot64(&row, &a[k * cols..(k + 1) * cols])).sum();
            let dd: f64 =
                (0..r).map(|k| (0..r).map(|l| f64::from(bo[k]) * g[k * r + l] * f64::from(bo[l])).sum::<f64>()).sum();
            [ww, wd, dd]
        })
        .collect()
}

fn dot64(x: &[f32], y: &[f32]) -> f64 {
    x.iter().zip(y).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum()
}

/// The base model an adapter names, if it is another model than `model`; `None` if it names
/// none or names this one. The rule (issue #18): `base_model_name_or_path` (a hub id such as
/// `HuggingFaceTB/SmolLM2-135M-Instruct` or a local path) names this model when its last path
/// component equals, ignoring ASCII case, the last component of the model directory's path or
/// of `config.json`'s `_name_or_path`. A fingerprint, when the adapter records one, is the
/// stronger check and is used instead.
pub fn names_another_model(config: &AdapterConfig, model: &Model) -> Option<String> {
    let named = config.base_model.as_deref().filter(|s| !s.trim().is_empty())?;
    let last = |s: &str| s.trim().trim_end_matches(['/', '\\']).rsplit(['/', '\\']).next().unwrap_or("").to_string();
    let dir = model.dir.canonicalize().unwrap_or_else(|_| model.dir.clone());
    let own =
        [dir.file_name().map(|n| n.to_string_lossy().into_owned()), model.config.name_or_path.as_deref().map(last)];
    let want = last(named);
    let same = own.iter().flatten().any(|o| !o.is_empty() && o.eq_ignore_ascii_case(&want));
    (!same).then(|| named.to_string())
}

/// Checks `target_modules`, `exclude_modules` and `layers_to_transform` against the model and
/// the tensors: named targets must exist in the base, every selected layer must have weights,
/// and every weight must belong to a selected layer.
fn check_targets(file: &AdapterFile, model: &Model, cfg_path: &Path) -> Result<()> {
    let c = &file.config;
    if let Targets::List(names) = &c.target_modules {
        for t in names {
            if !model.linears().any(|l| suffix_match(&l.name, t)) {
                return Err(Error::AdapterMismatch {
                    msg: format!(
                        "{}: key `target_modules`: names `{t}`, which matches no linear layer of this base model (is the adapter for a different architecture?)",
                        cfg_path.display()
                    ),
                    overridable: None,
                });
            }
        }
    }
    if matches!(c.target_modules, Targets::Unspecified) {
        return Ok(()); // PEFT's per-architecture default: nothing to cross-check.
    }
    let is_output = |l: &Linear| l.name == "lm_head";
    for lin in model.linears() {
        let selected = c.selects(&lin.name, is_output(lin));
        match (selected, file.modules.get(&lin.name)) {
            (true, None) => {
                return Err(Error::format(
                    &file.dir,
                    format!(
                        "adapter_config.json selects `{}`, but adapter_model.safetensors has no weights for it: the file is incomplete",
                        lin.name
                    ),
                ))
            }
            (false, Some(t)) => {
                return Err(Error::tensor(
                    &t.a.name,
                    format!(
                        "adapts `{}`, which adapter_config.json's target_modules/layers_to_transform do not select: the config and weights disagree",
                        lin.name
                    ),
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// `lora_A`, `lora_B` or DoRA's magnitude: the index into a module's parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    A = 0,
    B = 1,
    Magnitude = 2,
}

/// `base_model.model.<module>.lora_A.weight` → (`<module>`, A).
fn split_key(name: &str) -> Option<(&str, Part)> {
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    for (suffix, part) in [
        (".lora_A.weight", Part::A),
        (".lora_B.weight", Part::B),
        (".lora_magnitude_vector", Part::Magnitude),
        (".lora_magnitude_vector.weight", Part::Magnitude), // PEFT < 0.12
    ] {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Some((module, part));
        }
    }
    None
}

/// Which modules an adapter applies to: PEFT's `target_modules` (and `exclude_modules`).
#[derive(Clone, Debug)]
pub enum Targets {
    /// Not given: PEFT chose its per-architecture default.
    Unspecified,
    /// Module names or name suffixes (`q_proj` matches `model.layers.0.self_attn.q_proj`).
    List(Vec<String>),
    /// A regular expression matched against the whole module name.
    Regex(Regex),
    /// Every linear layer but the output head.
    AllLinear,
}

impl Targets {
    fn parse(v: Option<&Value>, key: &str, path: &Path) -> Result<Targets> {
        Ok(match v {
            None | Some(Value::Null) => Targets::Unspecified,
            Some(Value::String(s)) if s == "all-linear" => Targets::AllLinear,
            Some(Value::String(s)) => Targets::Regex(
                Regex::new(&format!("^(?:{s})$"))
                    .map_err(|e| Error::config(path, key, format!("not a regular expression peftrt can use: {e}")))?,
            ),
            Some(Value::Array(a)) => Targets::List(
                a.iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| Error::config(path, key, "expected a list of module names"))?,
            ),
            Some(_) => return Err(Error::config(path, key, "expected a list of module names or a regex string")),
        })
    }

    /// Whether the module is selected (`None` when unspecified).
    fn matches(&self, module: &str, is_output: bool) -> Option<bool> {
        match self {
            Targets::Unspecified => None,
            Targets::List(names) => Some(names.iter().any(|t| suffix_match(module, t))),
            Targets::Regex(re) => Some(re.is_match(module)),
            Targets::AllLinear => Some(!is_output),
        }
    }
}

impl std::fmt::Display for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Targets::Unspecified => f.write_str("(PEFT default)"),
            Targets::List(names) => f.write_str(&names.join(",")),
            Targets::Regex(re) => {
                let s = re.as_str();
                f.write_str(s.strip_prefix("^(?:").and_then(|s| s.strip_suffix(")$")).unwrap_or(s))
            }
            Targets::AllLinear => f.write_str("all-linear"),
        }
    }
}

/// PEFT's list matching: the whole name, or a suffix after a dot.
pub(crate) fn suffix_match(module: &str, target: &str) -> bool {
    module == target || module.strip_suffix(target).is_some_and(|p| p.ends_with('.'))
}

/// The parts of `adapter_config.json` that inference uses.
#[derive(Clone, Debug)]
pub struct AdapterConfig {
    pub r: usize,
    pub alpha: f32,
    pub rslora: bool,
    pub use_dora: bool,
    pub target_modules: Targets,
    pub exclude_modules: Targets,
    /// `layers_to_transform`: only these decoder layers are adapted.
    pub layers: Option<Vec<usize>>,
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f32)>,
    /// `base_model_name_or_path`, as PEFT recorded it.
    pub base_model: Option<String>,
}

impl AdapterConfig {
    fn parse(v: &Value, path: &Path) -> Result<AdapterConfig> {
        if !v.is_object() {
            return Err(Error::format(path, "expected a JSON object (PEFT's adapter_config.json)"));
        }
        let peft_type = match v.get("peft_type") {
            None | Some(Value::Null) => "LORA",
            Some(Value::String(t)) => t.as_str(),
            Some(x) => {
                return Err(Error::config(path, "peft_type", format!("expected a string such as \"LORA\", found {x}")))
            }
        };
        if peft_type != "LORA" {
            return Err(Error::unsupported_key(
                path,
                "peft_type",
                format!("\"{peft_type}\" adapters are not supported; peftrt runs LORA (and DoRA) adapters"),
            ));
        }
        let truthy = |key: &str| v.get(key).and_then(Value::as_bool) == Some(true);
        if truthy("fan_in_fan_out") {
            // PEFT itself resets it to false for nn.Linear (with a warning): Llama-family layers
            // have no GPT-2-style Conv1D, so the weights are in the usual [out, in] layout.
            log::warn!(
                "{}: fan_in_fan_out is true, which PEFT ignores for Linear layers; ignoring it too",
                path.display()
            );
        }
        match v.get("bias").and_then(Value::as_str) {
            None | Some("none") => {}
            Some(other) => {
                return Err(Error::unsupported_key(
                    path,
                    "bias",
                    format!("\"{other}\" is not supported (only \"none\")"),
                ))
            }
        }
        if v.get("modules_to_save").is_some_and(|m| m.as_array().is_some_and(|a| !a.is_empty())) {
            return Err(Error::unsupported_key(
                path,
                "modules_to_save",
                "full replacement modules (e.g. a trained lm_head or embed_tokens) are not supported; \
                 merge the adapter into the base with PEFT's merge_and_unload instead",
            ));
        }
        // Newer PEFT options that change what the adapter computes: refused, never ignored.
        for key in ["lora_bias", "use_qalora", "use_bdlora"] {
            if truthy(key) {
                return Err(Error::unsupported_key(path, key, "is set; peftrt does not support this LoRA variant"));
            }
        }
        for key in ["alora_invocation_tokens", "layer_replication", "trainable_token_indices", "target_parameters"] {
            if v.get(key).is_some_and(|x| !x.is_null() && x.as_array().is_none_or(|a| !a.is_empty())) {
                return Err(Error::unsupported_key(path, key, "is set; peftrt does not support this LoRA variant"));
            }
        }
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| Error::config(path, "r", "missing or not a positive integer"))? as usize;
        let alpha = v
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .map(|a| a as f32)
            .filter(|a| a.is_finite())
            .ok_or_else(|| Error::config(path, "lora_alpha", "missing or not a finite number"))?;
        let pattern = |key: &str| -> Result<Vec<(String, f64)>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(vec![]),
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(k, x)| {
                        let entry = format!("{key}.{k}");
                        pattern_regex(k).map_err(|e| {
                            Error::config(
                                path,
                                &entry,
                                format!("the key is not a regular expression peftrt can use: {e}"),
                            )
                        })?;
                        x.as_f64()
                            .filter(|x| (*x as f32).is_finite())
                            .map(|x| (k.clone(), x))
                            .ok_or_else(|| Error::config(path, &entry, "not a finite number"))
                    })
                    .collect(),
                Some(_) => Err(Error::config(path, key, "expected an object")),
            }
        };
        let rank_pattern = pattern("rank_pattern")?
            .into_iter()
            .map(|(k, x)| {
                if x >= 1.0 && x.fract() == 0.0 {
                    Ok((k, x as usize))
                } else {
                    Err(Error::config(path, format!("rank_pattern.{k}"), "not a positive integer"))
                }
            })
            .collect::<Result<_>>()?;
        let layers = match v.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![n
                .as_u64()
                .ok_or_else(|| Error::config(path, "layers_to_transform", "not a layer index"))?
                as usize]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| x.as_u64().map(|i| i as usize))
                    .collect::<Option<_>>()
                    .ok_or_else(|| Error::config(path, "layers_to_transform", "expected layer indices"))?,
            ),
            Some(_) => return Err(Error::config(path, "layers_to_transform", "expected a layer index or a list")),
        };
        Ok(AdapterConfig {
            r,
            alpha,
            rslora: truthy("use_rslora"),
            use_dora: truthy("use_dora"),
            target_modules: Targets::parse(v.get("target_modules"), "target_modules", path)?,
            exclude_modules: Targets::parse(v.get("exclude_modules"), "exclude_modules", path)?,
            layers,
            rank_pattern,
            alpha_pattern: pattern("alpha_pattern")?.into_iter().map(|(k, x)| (k, x as f32)).collect(),
            base_model: v.get("base_model_name_or_path").and_then(Value::as_str).map(str::to_string),
        })
    }

    pub fn rank_for(&self, module: &str) -> usize {
        pattern_value(&self.rank_pattern, module).unwrap_or(self.r)
    }

    pub fn alpha_for(&self, module: &str) -> f32 {
        pattern_value(&self.alpha_pattern, module).unwrap_or(self.alpha)
    }

    /// Whether PEFT would have put a LoRA layer on `module` (false when `target_modules` is
    /// unspecified: the caller does not cross-check then).
    pub fn selects(&self, module: &str, is_output: bool) -> bool {
        let targeted = self.target_modules.matches(module, is_output).unwrap_or(false);
        let excluded = self.exclude_modules.matches(module, is_output).unwrap_or(false);
        let in_layers = match &self.layers {
            None => true,
            Some(ls) => layer_index(module).is_some_and(|i| ls.contains(&i)),
        };
        targeted && !excluded && in_layers
    }
}

/// The decoder-layer index in a module name (`model.layers.3.mlp.up_proj` → 3).
fn layer_index(module: &str) -> Option<usize> {
    let rest = &module[module.find("layers.")? + "layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// PEFT's `get_pattern_key` pattern for a `rank_pattern`/`alpha_pattern` key: `(.*\.)?(key)$`.
fn pattern_regex(key: &str) -> std::result::Result<Regex, regex::Error> {
    Regex::new(&format!(r"^(.*\.)?({key})$"))
}

/// PEFT's `get_pattern_key`: the first key that matches `(.*\.)?(key)$` against the module name
/// (keys were checked to compile when the config was parsed).
fn pattern_value<T: Copy>(patterns: &[(String, T)], module: &str) -> Option<T> {
    patterns.iter().find_map(|(k, v)| pattern_regex(k).ok()?.is_match(module).then_some(*v))
}

/// What identifies a base model well enough to refuse an adapter on the wrong one: a hash of
/// the architecture and every linear layer's name and shape, plus a few dozen weight values
/// (from the embeddings and norms, which quantisation keeps in float), compared with a
/// tolerance so that an F32, BF16 or NF4 copy of the same model still matches, and a
/// different fine-tune of the same architecture does not.
#[derive(Clone, Debug, PartialEq)]
pub struct BaseFingerprint {
    /// sha256 (hex) of the architecture and layer shapes.
    pub structure: String,
    pub samples: Vec<f32>,
}

impl BaseFingerprint {
    const VERSION: u64 = 1;
    const N_EMBED_SAMPLES: usize = 32;
    const N_NORM_SAMPLES: usize = 16;
    /// bf16 keeps 8 significant bits: a copy in any float dtype is within 2⁻⁸ of the original.
    const REL_TOL: f32 = 1.0 / 128.0;

    /// The fingerprint of a loaded model.
    pub fn of(model: &Model) -> BaseFingerprint {
        use sha2::{Digest, Sha256};
        let c = &model.config;
        let mut h = Sha256::new();
        h.update(format!(
            "{:?} vocab {} hidden {} layers {} heads {} kv {} head_dim {} inter {}\n",
            c.arch,
            c.vocab_size,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.intermediate_size
        ));
        for l in model.linears() {
            h.update(format!("{} {}x{}\n", l.name, l.rows, l.cols));
        }
        let structure = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let emb = model.embed_tokens.weights();
        // Fixed, spread-out positions (lengths are never 0: the model checked its shapes).
        let pick = |len: usize, i: usize| (i * 7919 + 13) % len;
        let mut samples = Vec::new();
        let mut one = [0.0f32];
        for i in 0..Self::N_EMBED_SAMPLES {
            emb.to_f32(pick(emb.len(), i), &mut one);
            samples.push(one[0]);
        }
        for norm in [&model.norm, &model.layers[0].input_norm] {
            samples.extend((0..Self::N_NORM_SAMPLES).map(|i| norm[pick(norm.len(), i)]));
        }
        BaseFingerprint { structure, samples }
    }

    /// The JSON string stored in the adapter's safetensors metadata.
    pub fn to_json(&self) -> String {
        serde_json::json!({"version": Self::VERSION, "structure": self.structure, "samples": self.samples}).to_string()
    }

    pub fn parse(s: &str) -> std::result::Result<BaseFingerprint, String> {
        let v: Value = serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))?;
        match v.get("version").and_then(Value::as_u64) {
            Some(Self::VERSION) => {}
            other => return Err(format!("version {other:?}; this peftrt reads version {}", Self::VERSION)),
        }
        let structure = v.get("structure").and_then(Value::as_str).ok_or("no `structure` string")?.to_string();
        let samples = v
            .get("samples")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect::<Option<Vec<_>>>())
            .ok_or("no `samples` list of numbers")?;
        Ok(BaseFingerprint { structure, samples })
    }

    /// `Ok` when `model` (this model's fingerprint) is the base this one records; otherwise why not.
    pub fn check(&self, model: &BaseFingerprint) -> std::result::Result<(), String> {
        if self.structure != model.structure {
            return Err("its architecture or layer shapes differ".into());
        }
        if self.samples.len() != model.samples.len() {
            return Err("its fingerprint has a different number of samples".into());
        }
        let differ = self
            .samples
            .iter()
            .zip(&model.samples)
            .filter(|(&a, &b)| (a - b).abs() > Self::REL_TOL * a.abs().max(b.abs()) + 1e-6 || a.is_nan() != b.is_nan())
            .count();
        if differ > 0 {
            return Err(format!("same shapes, but {differ} of {} sampled weights differ", self.samples.len()));
        }
        Ok(())
    }
}

/// Adapters loaded against one model, by name: the registry a server or the C API keeps.
/// An adapter can be unloaded only when no session holds it any more.
pub struct AdapterRegistry {
    model: Arc<Model>,
    adapters: BTreeMap<String, Arc<Adapter>>,
}

impl AdapterRegistry {
    pub fn new(model: Arc<Model>) -> Self {
        AdapterRegistry { model, adapters: BTreeMap::new() }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Loads the adapter in `dir` under `name` (which must be new).
    pub fn load(&mut self, name: &str, dir: &Path, opts: &AdapterOptions) -> Result<Arc<Adapter>> {
        if self.adapters.contains_key(name) {
            return Err(Error::Input(format!("an adapter named `{name}` is already loaded; unload it first")));
        }
        let mut a = Adapter::load_with(dir, &self.model, opts)?;
        a.name = name.to_string();
        let a = Arc::new(a);
        self.adapters.insert(name.to_string(), a.clone());
        Ok(a)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Adapter>> {
        self.adapters.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.adapters.keys().map(String::as_str)
    }

    /// Unloads `name`, releasing its memory map; refused while a session still uses it.
    pub fn unload(&mut self, name: &str) -> Result<()> {
        let a = self.adapters.get(name).ok_or_else(|| Error::Input(format!("no adapter named `{name}` is loaded")))?;
        let users = Arc::strong_count(a) - 1;
        if users > 0 {
            return Err(Error::Input(format!(
                "adapter `{name}` is still held by {users} session(s) or handle(s); deactivate it there first"
            )));
        }
        self.adapters.remove(name);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_module_and_part() {
        assert_eq!(
            split_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj", Part::A))
        );
        assert_eq!(
            split_key("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"),
            Some(("model.layers.0.mlp.up_proj", Part::Magnitude))
        );
        assert_eq!(split_key("base_model.model.lm_head.weight"), None);
        assert_eq!(split_key("base_model.model.model.embed_tokens.lora_embedding_A"), None);
    }

    #[test]
    fn patterns_match_like_peft() {
        let p = vec![("k_proj".to_string(), 2usize), ("layers.1.mlp.down_proj".to_string(), 4)];
        assert_eq!(pattern_value(&p, "model.layers.0.self_attn.k_proj"), Some(2));
        assert_eq!(pattern_value(&p, "model.layers.1.mlp.down_proj"), Some(4));
        assert_eq!(pattern_value(&p, "model.layers.0.mlp.down_proj"), None);
        assert_eq!(pattern_value(&p, "model.layers.0.self_attn.xk_proj"), None);
    }

    #[test]
    fn targets_select_like_peft() {
        let path = Path::new("adapter_config.json");
        let cfg = |v: Value| AdapterConfig::parse(&v, path).unwrap();
        let q = "model.layers.1.self_attn.q_proj";
        let list = cfg(serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "mlp.up_proj"]}));
        assert!(list.selects(q, false));
        assert!(list.selects("model.layers.0.mlp.up_proj", false));
        assert!(!list.selects("model.layers.0.self_attn.xq_proj", false));
        assert!(!list.selects("model.layers.0.mlp.gate_proj", false));
        let re = cfg(serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": ".*\\.(q|v)_proj"}));
        assert!(re.selects(q, false) && !re.selects("model.layers.1.self_attn.k_proj", false));
        // fullmatch: a regex matching only a prefix does not select.
        let pre = cfg(serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": "model\\.layers"}));
        assert!(!pre.selects(q, false));
        let all = cfg(serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
            "exclude_modules": ["k_proj"], "layers_to_transform": [1]}));
        assert!(all.selects(q, false));
        assert!(!all.selects("lm_head", true));
        assert!(!all.selects("model.layers.1.self_attn.k_proj", false));
        assert!(!all.selects("model.layers.0.self_attn.q_proj", false));
        assert_eq!(layer_index("model.layers.12.mlp.up_proj"), Some(12));
        assert_eq!(layer_index("lm_head"), None);
    }

    #[test]
    fn fan_in_fan_out_is_ignored_for_linear_layers_as_peft_does() {
        let v = serde_json::json!({"r": 4, "lora_alpha": 8, "fan_in_fan_out": true});
        assert!(AdapterConfig::parse(&v, Path::new("adapter_config.json")).is_ok());
    }

    #[test]
    fn variants_that_change_the_output_are_refused() {
        let path = Path::new("adapter_config.json");
        for (key, value) in [
            ("lora_bias", serde_json::json!(true)),
            ("use_qalora", serde_json::json!(true)),
            ("alora_invocation_tokens", serde_json::json!([1, 2])),
            ("layer_replication", serde_json::json!([[0, 1]])),
            ("trainable_token_indices", serde_json::json!([5])),
            ("modules_to_save", serde_json::json!(["lm_head"])),
            ("bias", serde_json::json!("all")),
        ] {
            let mut v = serde_json::json!({"r": 4, "lora_alpha": 8});
            v[key] = value;
            let e = AdapterConfig::parse(&v, path).err().unwrap_or_else(|| panic!("{key} accepted")).to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn fingerprints_tolerate_float_copies_only() {
        let fp = BaseFingerprint { structure: "ab".into(), samples: vec![0.5, -0.031, 1e-8, 0.0] };
        let back = BaseFingerprint::parse(&fp.to_json()).unwrap();
        assert_eq!(back, fp);
        let bf16 = BaseFingerprint {
            structure: "ab".into(),
            samples: fp.samples.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(),
        };
        assert_eq!(fp.check(&bf16), Ok(()));
        let tuned = BaseFingerprint { structure: "ab".into(), samples: vec![0.5, -0.0325, 1e-8, 0.0] };
        assert!(fp.check(&tuned).unwrap_err().contains("1 of 4"));
        let other = BaseFingerprint { structure: "cd".into(), samples: fp.samples.clone() };
        assert!(fp.check(&other).is_err());
        assert!(BaseFingerprint::parse(r#"{"version": 2}"#).unwrap_err().contains("version"));
    }
}
