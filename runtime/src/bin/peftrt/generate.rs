//! `peftrt generate`: one prompt, the reply streamed to stdout.

use crate::common::{utf8, ConstraintArgs, Loaded, ModelArgs, SamplingArgs};
use anyhow::{bail, Result};
use peftrt::{generate, Message, Sampler, StopReason};
use std::io::Write;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    /// The prompt (UTF-8).
    #[arg(long)]
    prompt: std::ffi::OsString,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    s: SamplingArgs,
    #[command(flatten)]
    c: ConstraintArgs,
}

pub fn run(a: Args) -> Result<()> {
    let Loaded { model, mut session, load_ms, .. } = a.m.load(true)?;
    let tok = model.tokenizer()?;
    let prompt = utf8(a.prompt, "--prompt")?;
    if prompt.is_empty() {
        bail!("--prompt is empty; give some text");
    }
    let tokens = if a.chat {
        let mut msgs = Vec::new();
        if let Some(sys) = &a.system {
            msgs.push(Message::new("system", sys));
        }
        msgs.push(Message::new("user", &prompt));
        let text = tok.apply_chat_template(&msgs, true)?;
        tok.encode(&text, false)?
    } else {
        tok.encode(&prompt, true)?
    };
    let params = a.s.params();
    let mut sampler = Sampler::new(params, model.config.vocab_size)?;
    sampler.set_constraint(a.c.compile(&model)?)?;
    let constrained = sampler.constraint().is_some();
    let mut out = std::io::stdout().lock();
    let g = generate(&mut session, &tokens, &mut sampler, |text| {
        out.write_all(text.as_bytes()).and_then(|_| out.flush()).is_ok()
    })?;
    writeln!(out)?;
    eprintln!(
        "load {:.0} ms | prompt {} tokens, {:.1} tok/s | generated {} tokens, {:.1} tok/s | stop: {:?} | {} threads",
        load_ms,
        g.prompt_tokens,
        g.prefill_tok_s(),
        g.tokens.len(),
        g.decode_tok_s(),
        g.stop,
        session.n_threads()
    );
    if constrained && g.stop != StopReason::Eos {
        // The grammar did not complete: the output is not a valid document. Say so in the
        // exit status too, so that a script never takes it for one.
        drop(out);
        eprintln!("warning: the reply was cut ({:?}) before the constraint completed; raise --max-tokens", g.stop);
        std::process::exit(3);
    }
    Ok(())
}
