//! Checkpoints: everything a run needs to continue exactly where it stopped.
//!
//! A checkpoint is a directory, written atomically (temporary sibling, then rename):
//! - the adapter so far, in the PEFT format (usable on its own);
//! - `optimizer.safetensors`: AdamW's moments, `exp_avg.<key>` and `exp_avg_sq.<key>` (F32),
//!   under the PEFT key of their parameter;
//! - `trainer_state.json`: the steps done, AdamW's step count, the per-step history (loss,
//!   learning rate, gradient norm), tokens seen, and what the run must agree on to resume
//!   (the options that shape the batches and the update, the data set's hash, the base
//!   fingerprint).
//!
//! The data position and the random state are functions of (seed, step) (see [`crate::train`]),
//! so the step count restores both.

use crate::error::{Error, Result};
use crate::lora::{to_f32_vec, LoraSet};
use crate::optim::AdamW;
use crate::save::{write_adapter_files, Provenance};
use peftrt::output::{
    write_dir_atomically_with, write_json, write_safetensors_bytes_with_metadata, Replace, TensorSpec,
};
use peftrt::weights::{DType, WeightStore};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The state of a run after `step` steps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunState {
    /// Optimiser steps done.
    pub step: u64,
    pub losses: Vec<f64>,
    pub lrs: Vec<f64>,
    pub grad_norms: Vec<f64>,
    /// (step, eval loss) of each evaluation.
    pub eval_losses: Vec<(u64, f64)>,
    pub n_tokens: i64,
}

/// Writes a checkpoint of the run to `dir` (replacing an older one there).
pub fn save(
    dir: &Path,
    lora: &LoraSet,
    opt: &AdamW,
    state: &RunState,
    agreement: &Value,
    base_name: &str,
    prov: &Provenance,
) -> Result<()> {
    let params = lora.named_parameters();
    write_dir_atomically_with(dir, Replace::Existing, |tmp| {
        let inner = || -> Result<()> {
            write_adapter_files(tmp, lora, base_name, prov)?;
            let mut specs = Vec::new();
            let mut moments: Vec<&Tensor> = Vec::new();
            for (which, list) in [("exp_avg", &opt.exp_avg), ("exp_avg_sq", &opt.exp_avg_sq)] {
                for ((key, p), m) in params.iter().zip(list) {
                    let shape = p.size().iter().map(|&d| d as usize).collect();
                    specs.push(TensorSpec { name: format!("{which}.{key}"), shape, dtype: DType::F32 });
                    moments.push(m);
                }
            }
            let mut failure = None;
            write_safetensors_bytes_with_metadata(&tmp.join(OPTIMIZER_FILE), &specs, &BTreeMap::new(), |i, out| {
                match to_f32_vec(moments[i]) {
                    Ok(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
                    Err(e) => failure = Some(e),
                }
                Ok(())
            })?;
            if let Some(e) = failure {
                return Err(e);
            }
            let s = json!({
                "step": state.step,
                "adam_step": opt.step,
                "losses": state.losses,
                "lrs": state.lrs,
                "grad_norms": state.grad_norms,
                "eval_losses": state.eval_losses,
                "n_tokens": state.n_tokens,
                "run": agreement,
            });
            write_json(&tmp.join(STATE_FILE), &s)?;
            Ok(())
        };
        inner().map_err(|e| match e {
            Error::Runtime(e) => e,
            other => peftrt::Error::Input(other.to_string()),
        })
    })?;
    Ok(())
}

/// Reads a checkpoint's state and restores AdamW's moments into `opt` (whose parameters must be
/// `lora`'s, already loaded from the checkpoint's adapter). `agreement` must equal the one the
/// checkpoint was written with.
pub fn restore(dir: &Path, lora: &LoraSet, opt: &mut AdamW, agreement: &Value) -> Result<RunState> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| {
        Error::Input(format!(
            "--resume {}: no readable {STATE_FILE} ({e}); is this a trainer checkpoint?",
            dir.display()
        ))
    })?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Input(format!("{}: not valid JSON: {e}", state_path.display())))?;
    if &v["run"] != agreement {
        let differing: Vec<String> = agreement
            .as_object()
            .map(|o| o.iter().filter(|(k, x)| v["run"].get(k.as_str()) != Some(x)).map(|(k, _)| k.clone()).collect())
            .unwrap_or_default();
        return Err(Error::Input(format!(
            "--resume {}: the checkpoint was written by a run with other settings ({}); resume with the same options and data",
            dir.display(),
            differing.join(", ")
        )));
    }
    let list = |key: &str| -> Result<Vec<f64>> {
        v[key]
            .as_array()
            .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| Error::Input(format!("{}: `{key}` is not a list of numbers", state_path.display())))
    };
    let int = |key: &str| -> Result<u64> {
        v[key].as_u64().ok_or_else(|| Error::Input(format!("{}: `{key}` is not a count", state_path.display())))
    };
    let state = RunState {
        step: int("step")?,
        losses: list("losses")?,
        lrs: list("lrs")?,
        grad_norms: list("grad_norms")?,
        eval_losses: serde_json::from_value(v["eval_losses"].clone())
            .map_err(|e| Error::Input(format!("{}: `eval_losses`: {e}", state_path.display())))?,
        n_tokens: int("n_tokens")? as i64,
    };
    opt.step = int("adam_step")? as i64;
    let path = dir.join(OPTIMIZER_FILE);
    // SAFETY: the checkpoint is not modified while it is read (the copies below end the map's use).
    let store = unsafe { WeightStore::open_file(&path)? };
    let _guard = tch::no_grad_guard();
    for (which, list) in [("exp_avg", &mut opt.exp_avg), ("exp_avg_sq", &mut opt.exp_avg_sq)] {
        for ((key, p), m) in lora.named_parameters().iter().zip(list.iter_mut()) {
            let t = store.get(&format!("{which}.{key}"))?;
            let shape = p.size();
            if t.shape.iter().map(|&d| d as i64).collect::<Vec<_>>() != shape {
                return Err(Error::Input(format!(
                    "{}: {} has shape {:?}, expected {shape:?}",
                    path.display(),
                    t.name,
                    t.shape
                )));
            }
            let values = Tensor::f_from_slice(&t.to_f32_vec())?.f_reshape(&shape)?.f_to(m.device())?;
            m.f_copy_(&values)?;
        }
    }
    Ok(state)
}
