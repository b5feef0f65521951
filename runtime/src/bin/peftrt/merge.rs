//! `peftrt merge`: LoRA adapters merged into a model, written as a new model directory.

use crate::common::{parse_adapter_spec, DTypeArg};
use anyhow::Result;
use peftrt::gguf::DType;
use peftrt::merge::MergeOptions;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The base model directory.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT adapter directory, optionally with a scale: DIR or DIR:0.5 (repeatable).
    #[arg(long = "adapter", value_name = "DIR[:SCALE]", required = true)]
    adapters: Vec<String>,
    /// The model directory to write (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Merge adapters even if they record a different base model.
    #[arg(long)]
    allow_base_mismatch: bool,
    /// Weight dtype of the output (default: the base's).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
}

pub fn run(a: Args) -> Result<()> {
    let adapters = a.adapters.iter().map(|s| parse_adapter_spec(s)).collect::<Result<Vec<_>>>()?;
    let t = Instant::now();
    let opts = MergeOptions { dtype: a.dtype.map(DType::from), allow_base_mismatch: a.allow_base_mismatch };
    let s = peftrt::merge::merge(&a.model, &adapters, &a.out, &opts)?;
    eprintln!(
        "merged {} adapter(s) into {} linear layers; wrote {} tensors ({}) to {} in {:.1} s",
        adapters.len(),
        s.merged_layers,
        s.n_tensors,
        s.dtype.name(),
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
