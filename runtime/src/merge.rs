//! Merging adapters into a base model: `W' = W + Σ scale · ΔW`, computed in f32, written as a
//! complete Hugging Face model directory that any tool loads (PEFT's `merge_and_unload`).
//! DoRA layers are merged as PEFT does: each row of `W + s·ΔW` rescaled to its magnitude.

use crate::adapter::{Adapter, AdapterOptions};
use crate::error::{Error, Result};
use crate::kernels;
use crate::model::{LoadOptions, Model};
use crate::nf4::Nf4Weight;
use crate::output::{copy_model_files, write_dir_atomically, write_model_files, write_safetensors};
use crate::weights::DType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The `config.json` key marking a model merged onto a dequantised NF4 base.
pub const MERGED_FROM_NF4_KEY: &str = "peftrt_merged_from_nf4";

/// What [`merge`] wrote.
#[derive(Clone, Debug)]
pub struct MergeSummary {
    /// Linear layers that changed.
    pub merged_layers: usize,
    pub n_tensors: usize,
    pub dtype: DType,
}

/// Options for [`merge`].
#[derive(Clone, Debug, Default)]
pub struct MergeOptions {
    /// Weight dtype of the output (default: the base's embedding dtype).
    pub dtype: Option<DType>,
    /// Merge adapters that record a different base model (see [`AdapterOptions`]).
    pub allow_base_mismatch: bool,
}

/// Merges `adapters` (directory, scale) into the model in `model_dir` and writes the result to
/// `out_dir`. Atomic: on error nothing is left.
pub fn merge(
    model_dir: &Path,
    adapters: &[(PathBuf, f32)],
    out_dir: &Path,
    opts: &MergeOptions,
) -> Result<MergeSummary> {
    if out_dir.exists() {
        return Err(Error::Input(format!("{} already exists; choose a new output directory", out_dir.display())));
    }
    for (dir, scale) in adapters {
        crate::adapter::check_scale(&dir.display().to_string(), *scale)?;
    }
    let model = Arc::new(Model::load(model_dir, &LoadOptions { no_tokenizer: true })?);
    let aopts = AdapterOptions { allow_base_mismatch: opts.allow_base_mismatch, ..Default::default() };
    let loaded: Vec<(Adapter, f32)> =
        adapters.iter().map(|(dir, s)| Ok((Adapter::load_with(dir, &model, &aopts)?, *s))).collect::<Result<_>>()?;
    if model.config.tie_word_embeddings && loaded.iter().any(|(a, _)| a.for_layer(&model.lm_head).is_some()) {
        return Err(Error::Unsupported(
            "an adapter on lm_head cannot be merged into a model whose lm_head is tied to the embeddings".into(),
        ));
    }
    // A GGUF's block-quantised base is merged into its dequantised values and written as F32
    // (those values exactly, plus the adapters' deltas).
    let dtype = opts.dtype.unwrap_or(match model.embed_tokens.dtype {
        DType::Quant(_) => DType::F32,
        d => d,
    });
    let linears: HashMap<String, &crate::model::Linear> =
        model.linears().map(|l| (format!("{}.weight", l.name), l)).collect();
    // An NF4 base is merged into its dequantised values (what a QLoRA adapter was trained
    // against) and written as floats: the 4-bit codes' companions are dropped, and each
    // quantised weight is written with its logical shape.
    let aux: std::collections::HashSet<String> = model
        .linears()
        .filter(|l| l.nf4.is_some())
        .flat_map(|l| Nf4Weight::aux_names(&format!("{}.weight", l.name)))
        .collect();
    let tensors: Vec<_> = model.store().tensors().into_iter().filter(|t| !aux.contains(&t.name)).collect();
    let list: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|t| match linears.get(&t.name) {
            Some(l) if l.nf4.is_some() || matches!(t.dtype, DType::Quant(_)) => (t.name.clone(), vec![l.rows, l.cols]),
            _ => (t.name.clone(), t.shape.clone()),
        })
        .collect();
    let mut merged_layers = 0;

    write_dir_atomically(out_dir, |tmp| {
        write_safetensors(&tmp.join("model.safetensors"), &list, dtype, |i| {
            let t = tensors[i];
            let mut w = match linears.get(&t.name) {
                Some(l) if l.nf4.is_some() => l.to_f32_vec(),
                _ => t.to_f32_vec(),
            };
            // The tied lm_head shares the embedding tensor: never merged (refused above).
            let lin = linears.get(&t.name).filter(|l| !(model.config.tie_word_embeddings && l.name == "lm_head"));
            if let Some(lin) = lin {
                let mut changed = false;
                for (adapter, scale) in &loaded {
                    let Some(lw) = adapter.for_layer(lin).filter(|_| *scale != 0.0) else { continue };
                    let s = scale * lw.scale;
                    let delta = lw.delta();
                    for (row, d) in w.chunks_exact_mut(lin.cols).zip(delta.chunks_exact(lin.cols)) {
                        kernels::axpy(row, s, d);
                    }
                    // DoRA: each row rescaled to its magnitude, W' = m / ‖W + s·ΔW‖_row ⊙ (W + s·ΔW)
                    // (PEFT's merge; with several adapters each applies to the weights merged so far).
                    if let Some(dora) = &lw.dora {
                        for (row, &m) in w.chunks_exact_mut(lin.cols).zip(&dora.magnitude) {
                            let norm = row.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
                            let g = (f64::from(m) / norm) as f32;
                            row.iter_mut().for_each(|x| *x *= g);
                        }
                    }
                    changed = true;
                }
                merged_layers += usize::from(changed);
            }
            // A GGUF's Q/K rows go back to the Hugging Face order.
            if let Some(heads) = linears.get(&t.name).and_then(|l| l.interleaved_heads) {
                w = crate::gguf::import::unpermute_rows(&w, heads, t.shape[1]);
            }
            // A NaN in the base, or an adapter scaled past the dtype's range, is refused by name
            // rather than written into a model that can only produce NaN.
            dtype.check_encodable(&t.name, &w)?;
            Ok(w)
        })?;
        let from_nf4 = model.linears().any(|l| l.nf4.is_some());
        let edit = |v: &mut serde_json::Value| {
            v["torch_dtype"] = dtype.torch_name().into();
            if v.get("dtype").is_some() {
                v["dtype"] = dtype.torch_name().into();
            }
            if let Some(obj) = v.as_object_mut() {
                obj.remove("quantization_config"); // merged weights are floats
            }
            if from_nf4 {
                // `peftrt quantize` warns before rounding these merged weights to 4 bits again.
                v[MERGED_FROM_NF4_KEY] = true.into();
            }
        };
        match model.gguf_files()? {
            Some(files) => write_model_files(&files, tmp, edit),
            None => copy_model_files(model_dir, tmp, edit),
        }
    })?;
    Ok(MergeSummary { merged_layers, n_tensors: list.len(), dtype })
}
