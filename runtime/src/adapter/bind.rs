//! An adapter bound to one model ([`Adapter`]): every module checked against the model's
//! linear layers and `target_modules`, the base fingerprint compared, the weights indexed by
//! [`Linear::id`], and DoRA's per-row norms computed once.

use super::{names_another_model, suffix_match, AdapterFile, BaseFingerprint, Targets};
use crate::error::{Error, MismatchOverride, Result};
use crate::gguf::import::permute_rows;
use crate::kernels::{self, MatRef};
use crate::model::{Linear, Model};
use crate::weights::{Tensor, WeightStore};
use std::path::{Path, PathBuf};

/// One adapted linear layer: `ΔW·x = scale · B (A x)`, and for DoRA the row magnitudes.
pub struct LoraWeights {
    /// `[r, in_features]`
    pub a: Tensor,
    /// `[out_features, r]`
    pub b: Tensor,
    /// What a forward pass multiplies: `A`, and `B` transposed (`[r, out_features]`: the
    /// up-projection as `r` rows of outputs, [`kernels::lowrank_up`], summed the same for any
    /// batch). In f32 (the file's values), or in bf16 on a BF16 weight whose products take bf16
    /// dot products ([`kernels::Isa::bf16_dot`]): the adapter then rounds as its base does and
    /// reads half the bytes (vLLM likewise keeps LoRA weights in the model's dtype). Merging and
    /// DoRA's norms use the file's values.
    run_a: Tensor,
    run_bt: Tensor,
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
        MatRef { w: self.run_a.weights(), rows: self.rank, cols: self.a.shape[1] }
    }
    /// `B` transposed, `[rank, out]`, as the forward pass multiplies it.
    pub fn bt(&self) -> kernels::Weights<'_> {
        self.run_bt.weights()
    }
    /// Output features (rows of `B`).
    pub fn out(&self) -> usize {
        self.b.shape[0]
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
    /// [`Model::id`] of the model it was loaded for: sessions refuse it on any other.
    model_id: u64,
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
            let b = match lin.interleaved_heads {
                // A GGUF's Q/K rows are in llama.cpp's rotary order: B's rows (the adapter's
                // output rows) follow them.
                Some(heads) => {
                    let values = permute_rows(&t.b.to_f32_vec(), heads, rank);
                    Tensor::owned_f32(t.b.name.clone(), t.b.shape.clone(), t.b.file.clone(), &values)
                }
                None => t.b.clone(),
            };
            let bt = transpose(&b.to_f32_vec(), lin.rows, rank);
            let bt_name = format!("{} (transposed)", t.b.name);
            let (run_a, run_bt) = if kernels::isa().bf16_dot() && matches!(lin.mat().w, kernels::Weights::BF16(_)) {
                let to_bf16 = |v: &[f32]| v.iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>();
                (
                    Tensor::owned_bf16(
                        t.a.name.clone(),
                        t.a.shape.clone(),
                        t.a.file.clone(),
                        &to_bf16(&t.a.to_f32_vec()),
                    ),
                    Tensor::owned_bf16(bt_name, vec![rank, lin.rows], t.b.file.clone(), &to_bf16(&bt)),
                )
            } else {
                (t.a.clone(), Tensor::owned_f32(bt_name, vec![rank, lin.rows], t.b.file.clone(), &bt))
            };
            let mut lw =
                LoraWeights { a: t.a.clone(), b, run_a, run_bt, rank, scale: file.scale_for(module), dora: None };
            if let Some(m) = &t.magnitude {
                let magnitude = match lin.interleaved_heads {
                    Some(heads) => permute_rows(&m.to_f32_vec(), heads, 1),
                    None => m.to_f32_vec(),
                };
                lw.dora = Some(Dora { magnitude, norms: dora_norms(lin, &lw) });
            }
            layers[lin.id] = Some(lw);
        }
        check_targets(&file, model, &cfg_path)?;
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
        let adapted = layers.iter().flatten();
        let max_rank = adapted.clone().map(|l| l.rank).max().unwrap_or(0);
        let max_out = adapted.clone().map(|l| l.b.shape[0]).max().unwrap_or(0);
        let dora = adapted.clone().any(|l| l.dora.is_some());
        let model_id = model.id();
        Ok(Adapter { name, dir: dir.to_path_buf(), layers, max_rank, max_out, dora, model_id, _store: file.store })
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

    /// Whether this adapter was loaded for `model` (the very instance, by [`Model::id`]).
    pub fn is_for(&self, model: &Model) -> bool {
        self.model_id == model.id()
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

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; m.len()];
    for (r, row) in m.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            t[c * rows + r] = v;
        }
    }
    t
}

fn dot64(x: &[f32], y: &[f32]) -> f64 {
    x.iter().zip(y).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LoadOptions;
    use crate::session::{Session, SessionOptions};
    use std::sync::Arc;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
    }

    /// Permuting Q/K rows for a GGUF base is undone by the importer's unpermutation.
    #[test]
    fn permuted_rows_round_trip_through_the_importers_unpermutation() {
        let (heads, d, row_len) = (3, 8, 5);
        let values: Vec<f32> = (0..heads * d * row_len).map(|v| v as f32).collect();
        let inter = crate::gguf::import::permute_rows(&values, heads, row_len);
        assert_ne!(inter, values);
        // Head 1, pair 2: rows 2·2 and 2·2 + 1 come from rows 2 and 2 + d/2 of that head.
        assert_eq!(inter[(d + 4) * row_len], values[(d + 2) * row_len]);
        assert_eq!(inter[(d + 5) * row_len], values[(d + 2 + d / 2) * row_len]);
        assert_eq!(crate::gguf::import::unpermute_rows(&inter, heads, row_len), values);
    }

    /// An adapter belongs to the model instance it was bound to, not to whatever model later
    /// sits at that model's address: a second model put in the first one's place (the first
    /// dropped there) refuses it, in `is_for` and in a session.
    #[test]
    fn a_model_at_a_dropped_models_address_refuses_its_adapters() {
        let load = || Model::load(&fixture("tiny-llama"), &LoadOptions { no_tokenizer: true }).unwrap();
        let mut model = Arc::new(load());
        let adapter = Arc::new(Adapter::load(&fixture("adapters/llama-qv"), &model).unwrap());
        assert!(adapter.is_for(&model));
        let first = Arc::as_ptr(&model);
        *Arc::get_mut(&mut model).unwrap() = load();
        assert_eq!(Arc::as_ptr(&model), first, "the second model must reuse the first one's address");
        assert!(!adapter.is_for(&model));
        let opts = SessionOptions { n_ctx: 16, n_batch: 0, n_threads: 1 };
        let mut session = Session::new(model.clone(), &opts).unwrap();
        let e = session.set_adapters(&[(adapter, 1.0)]).unwrap_err();
        assert!(e.to_string().contains("was loaded for a different model instance"), "{e}");
        let rebound = Arc::new(Adapter::load(&fixture("adapters/llama-qv"), &model).unwrap());
        session.set_adapters(&[(rebound, 1.0)]).unwrap();
    }
}
