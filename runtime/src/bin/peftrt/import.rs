//! `peftrt import`: a GGUF file converted into a Hugging Face model directory.

use crate::common::DTypeArg;
use anyhow::Result;
use peftrt::gguf::{import, DType, ImportOptions};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The GGUF file (v2 or v3).
    gguf: PathBuf,
    /// The model directory to write (must not exist or be empty, unless --force).
    out_dir: PathBuf,
    /// Weight dtype of the output.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    /// Replace a non-empty output directory (never one that holds the GGUF).
    #[arg(long)]
    force: bool,
    /// With --dtype f16/bf16: clamp weights beyond that dtype's range to its largest finite
    /// value, instead of refusing the import (f16 holds at most ±65504).
    #[arg(long)]
    saturate: bool,
}

pub fn run(a: Args) -> Result<()> {
    let dtype = DType::from(a.dtype);
    let t = Instant::now();
    let s = import(&a.gguf, &a.out_dir, &ImportOptions { dtype, force: a.force, saturate: a.saturate })?;
    eprintln!(
        "imported {} ({} tensors, {:.1} M parameters{}) into {} in {:.1} s",
        s.architecture,
        s.n_tensors,
        s.n_parameters as f64 / 1e6,
        if s.tied_embeddings { ", tied embeddings" } else { "" },
        s.out_dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
