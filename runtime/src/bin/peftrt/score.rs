//! `peftrt score`: the logits of every position of a prompt, as a safetensors file.

use crate::common::{utf8, Loaded, ModelArgs};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, conflicts_with = "prompt", required_unless_present = "prompt")]
    tokens: Option<String>,
    /// Text to tokenize (special tokens such as BOS added as the tokenizer does).
    #[arg(long)]
    prompt: Option<std::ffi::OsString>,
    /// Output safetensors file: `logits` (f32 [n, vocab]) and `tokens` (i32 [n]).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    peftrt::output::check_output_file(&a.out, &[])?;
    let Loaded { model, mut session, .. } = a.m.load(a.prompt.is_some())?;
    let tokens: Vec<u32> = match (&a.tokens, a.prompt) {
        (Some(list), _) => list
            .split(',')
            .map(|s| s.trim().parse::<u32>().with_context(|| format!("--tokens: `{s}` is not a token id")))
            .collect::<Result<_>>()?,
        (None, Some(p)) => model.tokenizer()?.encode(&utf8(p, "--prompt")?, true)?,
        (None, None) => bail!("give --tokens or --prompt"),
    };
    let mut logits = Vec::new();
    session.eval_all(&tokens, &mut logits)?;
    let vocab = model.config.vocab_size;
    let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let logit_bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let id_bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    use safetensors::tensor::TensorView;
    let views = [
        ("logits", TensorView::new(safetensors::Dtype::F32, vec![tokens.len(), vocab], &logit_bytes)?),
        ("tokens", TensorView::new(safetensors::Dtype::I32, vec![tokens.len()], &id_bytes)?),
    ];
    peftrt::output::write_file_atomically(&a.out, &safetensors::serialize(views, None)?)?;
    eprintln!("wrote logits [{}, {}] to {}", tokens.len(), vocab, a.out.display());
    Ok(())
}
