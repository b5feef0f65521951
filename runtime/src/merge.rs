//! Merging adapters into a base model: `W' = W + Σ scale · ΔW`, computed in f32, written as a
//! complete Hugging Face model directory that any tool loads (PEFT's `merge_and_unload`).

use crate::adapter::Adapter;
use crate::error::{Error, Result};
use crate::kernels;
use crate::model::{LoadOptions, Model};
use crate::output::{write_dir_atomically, write_json, write_safetensors};
use crate::weights::DType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What [`merge`] wrote.
#[derive(Clone, Debug)]
pub struct MergeSummary {
    /// Linear layers that changed.
    pub merged_layers: usize,
    pub n_tensors: usize,
    pub dtype: DType,
}

/// Merges `adapters` (directory, scale) into the model in `model_dir` and writes the result to
/// `out_dir` in `dtype` (default: the base's embedding dtype). Atomic: on error nothing is left.
pub fn merge(
    model_dir: &Path,
    adapters: &[(PathBuf, f32)],
    out_dir: &Path,
    dtype: Option<DType>,
) -> Result<MergeSummary> {
    if out_dir.exists() {
        return Err(Error::Input(format!("{} already exists; choose a new output directory", out_dir.display())));
    }
    let model = Arc::new(Model::load(model_dir, &LoadOptions { no_tokenizer: true })?);
    let loaded: Vec<(Adapter, f32)> =
        adapters.iter().map(|(dir, s)| Ok((Adapter::load(dir, &model)?, *s))).collect::<Result<_>>()?;
    if model.config.tie_word_embeddings && loaded.iter().any(|(a, _)| a.for_layer(&model.lm_head).is_some()) {
        return Err(Error::Unsupported(
            "an adapter on lm_head cannot be merged into a model whose lm_head is tied to the embeddings".into(),
        ));
    }
    let dtype = dtype.unwrap_or(model.embed_tokens.dtype);
    let linears: HashMap<String, &crate::model::Linear> =
        model.linears().map(|l| (format!("{}.weight", l.name), l)).collect();
    let tensors = model.store().tensors();
    let list: Vec<(String, Vec<usize>)> = tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
    let mut merged_layers = 0;

    write_dir_atomically(out_dir, |tmp| {
        write_safetensors(&tmp.join("model.safetensors"), &list, dtype, |i| {
            let t = tensors[i];
            let mut w = t.to_f32_vec();
            // The tied lm_head shares the embedding tensor: never merged (refused above).
            let lin = linears.get(&t.name).filter(|l| !(model.config.tie_word_embeddings && l.name == "lm_head"));
            if let Some(lin) = lin {
                let mut changed = false;
                for (adapter, scale) in &loaded {
                    let Some(lw) = adapter.for_layer(lin).filter(|_| *scale != 0.0) else { continue };
                    let (a, b) = (lw.a.to_f32_vec(), lw.b.to_f32_vec());
                    let (r, cols) = (lw.rank, lin.cols);
                    // ΔW[o, :] = s · Σ_k B[o, k] · A[k, :]
                    for (o, row) in w.chunks_exact_mut(cols).enumerate() {
                        for k in 0..r {
                            kernels::axpy(row, scale * lw.scale * b[o * r + k], &a[k * cols..(k + 1) * cols]);
                        }
                    }
                    changed = true;
                }
                merged_layers += usize::from(changed);
            }
            Ok(w)
        })?;
        copy_model_files(model_dir, tmp, dtype)
    })?;
    Ok(MergeSummary { merged_layers, n_tensors: list.len(), dtype })
}

/// Copies config, tokenizer and generation files (everything but the weights), recording the
/// new dtype in `config.json`.
fn copy_model_files(from: &Path, to: &Path, dtype: DType) -> Result<()> {
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !path.is_file() || name.ends_with(".safetensors") || name == "model.safetensors.index.json" {
            continue;
        }
        if name == "config.json" {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let mut v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
            v["torch_dtype"] = dtype.torch_name().into();
            if v.get("dtype").is_some() {
                v["dtype"] = dtype.torch_name().into();
            }
            write_json(&to.join(&name), &v)?;
        } else {
            std::fs::copy(&path, to.join(&name)).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}
