//! `peftrt inspect`: what a model directory, a GGUF file or a PEFT adapter directory holds.

use anyhow::{bail, Context, Result};
use peftrt::adapter::AdapterFile;
use peftrt::gguf::GgufFile;
use peftrt::{LoadOptions, Model};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    path: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let path = a.path.as_path();
    if path.join("adapter_config.json").is_file() {
        inspect_adapter(path)
    } else if path.is_dir() {
        let model = Model::load(path, &LoadOptions { no_tokenizer: false })
            .with_context(|| format!("cannot load the model in {}", path.display()))?;
        let c = &model.config;
        println!("architecture       {}", c.arch.name());
        println!("layers             {}", c.num_hidden_layers);
        println!("hidden / mlp       {} / {}", c.hidden_size, c.intermediate_size);
        println!("heads (kv) × dim   {} ({}) × {}", c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        println!("vocab              {}", c.vocab_size);
        println!("context            {}", c.max_position_embeddings);
        println!("rope               theta {} scaling {:?}", c.rope_theta, c.rope_scaling);
        println!("tied embeddings    {}", c.tie_word_embeddings);
        println!("chat template      {}", model.tokenizer.as_ref().is_some_and(|t| t.has_chat_template()));
        let tensors = model.store().tensors();
        let total: usize = tensors.iter().map(|t| t.numel() * t.dtype.size()).sum();
        println!("tensors            {} ({:.1} MiB)", tensors.len(), total as f64 / (1024.0 * 1024.0));
        for t in tensors {
            println!("  {:<56} {:<5} {:?}", t.name, t.dtype.name(), t.shape);
        }
        print_decode_bytes(&model);
        Ok(())
    } else if path.is_file() {
        // SAFETY: the file is only read while this command runs; nobody is expected to modify it.
        let gguf = unsafe { GgufFile::open(path)? };
        print!("{}", gguf.describe());
        let mut types: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
        for t in gguf.tensors() {
            let e = types.entry(t.ggml_type.name()).or_default();
            e.0 += 1;
            e.1 += t.n_bytes;
        }
        println!("types:");
        for (name, (n, bytes)) in types {
            println!("  {name:<6} {n:>4} tensors {:>9.1} MiB", bytes as f64 / (1024.0 * 1024.0));
        }
        match Model::load(path, &LoadOptions { no_tokenizer: true }) {
            Ok(model) => {
                println!("runs natively      yes (peftrt generate --model {})", path.display());
                print_decode_bytes(&model);
            }
            Err(e) => println!("runs natively      no: {e}"),
        }
        Ok(())
    } else {
        bail!("{} is neither a model directory nor a GGUF file", path.display())
    }
}

/// The weight bytes one decoded token reads: every linear layer (the head included) and one
/// embedding row.
fn print_decode_bytes(model: &Model) {
    let lin_bytes = |l: &peftrt::model::Linear| -> u64 {
        match l.mat().w {
            peftrt::kernels::Weights::Nf4(w) => (w.packed.len() + 4 * w.absmax.len()) as u64,
            _ => l.weight.bytes().len() as u64,
        }
    };
    let linears: u64 = model.linears().map(lin_bytes).sum();
    let emb = model.embed_tokens.bytes().len() as u64 / model.config.vocab_size.max(1) as u64;
    println!(
        "decode reads       {:.1} MiB of weights per token ({} linear layers, head included, and one embedding row)",
        (linears + emb) as f64 / (1024.0 * 1024.0),
        model.linears().count()
    );
}

fn inspect_adapter(dir: &Path) -> Result<()> {
    let f = AdapterFile::open(dir).with_context(|| format!("cannot read the adapter in {}", dir.display()))?;
    let c = &f.config;
    println!("adapter            {}", dir.display());
    println!("type               {}", if c.use_dora { "DoRA" } else { "LoRA" });
    println!("base model         {}", c.base_model.as_deref().unwrap_or("(not recorded)"));
    println!("base fingerprint   {}", if f.base_fingerprint.is_some() { "recorded (checked at load)" } else { "none" });
    let rs = if c.rslora { " (rsLoRA: scale alpha/√r)" } else { " (scale alpha/r)" };
    println!("r / alpha          {} / {}{rs}", c.r, c.alpha);
    for (k, v) in &c.rank_pattern {
        println!("  rank_pattern     {k} = {v}");
    }
    for (k, v) in &c.alpha_pattern {
        println!("  alpha_pattern    {k} = {v}");
    }
    println!("target_modules     {}", c.target_modules);
    if !matches!(c.exclude_modules, peftrt::adapter::Targets::Unspecified) {
        println!("exclude_modules    {}", c.exclude_modules);
    }
    if let Some(l) = &c.layers {
        println!("layers             {l:?}");
    }
    let n = f.n_params();
    println!(
        "adapted modules    {} ({} parameters, {:.2} MiB on disk)",
        f.modules.len(),
        n,
        f.file_bytes as f64 / (1024.0 * 1024.0)
    );
    for (name, t) in &f.modules {
        println!(
            "  {:<40} r {:<3} scale {:<8.4} [{} → {}] {}{}",
            name,
            t.rank(),
            f.scale_for(name),
            t.a.shape[1],
            t.b.shape[0],
            t.a.dtype.name(),
            if t.magnitude.is_some() { " +magnitude" } else { "" }
        );
    }
    Ok(())
}
