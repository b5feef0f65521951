//! `peftrt quantize`: a model's decoder linear layers quantised to NF4.

use anyhow::Result;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The float model directory.
    #[arg(long)]
    model: PathBuf,
    /// The model directory to write (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Elements per scale (bitsandbytes: 32, 64, ..., 4096).
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// Keep the per-block scales in f32 instead of quantising them to 8 bits.
    #[arg(long)]
    no_double_quant: bool,
    /// Decoder linear layers to keep in float, by name or suffix (e.g. down_proj,layers.0.mlp.up_proj).
    #[arg(long, value_delimiter = ',')]
    keep: Vec<String>,
    /// Quantise a model that `peftrt merge` made from an NF4 base (rounds its weights again).
    #[arg(long)]
    requantize_merged: bool,
    /// Quantise the output head too (a tied head gets its own NF4 copy): fewer bytes per
    /// decoded token, some accuracy lost.
    #[arg(long)]
    quantize_head: bool,
}

pub fn run(a: Args) -> Result<()> {
    let opts = peftrt::quantize::QuantizeOptions {
        blocksize: a.blocksize,
        double_quant: !a.no_double_quant,
        keep: a.keep,
        requantize_merged: a.requantize_merged,
        quantize_head: a.quantize_head,
    };
    let t = Instant::now();
    let s = peftrt::quantize::quantize_model(&a.model, &a.out, &opts)?;
    eprintln!(
        "quantised {} linear layers to NF4 (blocksize {}{}; {} kept in float); wrote {:.1} MiB to {} in {:.1} s",
        s.quantized_layers,
        opts.blocksize,
        if opts.double_quant { ", double-quantised scales" } else { "" },
        s.kept_layers,
        s.bytes as f64 / (1024.0 * 1024.0),
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
