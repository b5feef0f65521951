//! `peftrt`: generate, score, benchmark, inspect and import models from the command line.
//!
//! One module per subcommand (as llama.cpp has `tools/<name>/`), each with its clap `Args` and a
//! `run(Args)`; options shared by several (model and adapter loading, sampling, dtypes) are in
//! `common.rs`. A new subcommand is one new file and one line in `subcommands!` below.

mod common;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Declares each subcommand's module, its variant of `Cmd` (the doc comment is its help text,
/// the variant's name in kebab-case its name) and the dispatch to `<module>::run`.
macro_rules! subcommands {
    ($($(#[$doc:meta])* $variant:ident => $module:ident,)*) => {
        $(mod $module;)*

        #[derive(Subcommand)]
        enum Cmd {
            $($(#[$doc])* $variant($module::Args),)*
        }

        impl Cmd {
            fn run(self) -> Result<()> {
                match self {
                    $(Cmd::$variant(a) => $module::run(a),)*
                }
            }
        }
    };
}

subcommands! {
    /// Generate text from a prompt, streaming it to stdout (timings go to stderr).
    Generate => generate,
    /// Write the logits of every position of a prompt to a safetensors file.
    Score => score,
    /// Measure prefill and decode speed and peak memory.
    Bench => bench,
    /// Show a model directory's or GGUF file's architecture, tensors, dtypes and sizes, or a
    /// PEFT adapter directory's targets, ranks, scales and size.
    Inspect => inspect,
    /// Convert a GGUF file into a Hugging Face model directory (tensors dequantised).
    Import => import,
    /// Merge LoRA adapters into a model: W + Σ scale·ΔW, written as a new model directory.
    Merge => merge,
    /// Quantise a model's decoder linear layers to NF4 (bitsandbytes' exact layout and bytes).
    Quantize => quantize,
    /// Perplexity of a model (with adapters) over a text file, in sliding windows.
    Perplexity => perplexity,
    /// Generate a reply to every request of a JSON Lines file, one after another in one session,
    /// recording tokens, latency and speed per request.
    Batch => batch,
    /// Judge replies (JSON Lines, e.g. `batch`'s results) by the project's rule for valid JSON,
    /// and against a JSON Schema: one verdict per line on stdout, totals on stderr.
    EvalJson => eval_json,
    /// Serve the model over the OpenAI HTTP API, each adapter as a model id (runs the
    /// peftrt-server program; `peftrt serve --help` lists its options).
    Serve => serve,
}

#[derive(Parser)]
#[command(name = "peftrt", version, about = "Fast CPU inference for Llama-family models with LoRA adapters")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // `peftrt ... | head`: a closed stdout ends the process quietly, as it does `cat`, instead
    // of a panic in println!.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to the default before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    install_signal_handler();
    let cli = Cli::parse();
    if let Err(e) = cli.cmd.run() {
        eprintln!("error: {}", error_text(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, each printed once: a library error's message often already ends
/// with its source (`path: No such file or directory (os error 2)`), which `{:#}` would repeat.
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

/// On SIGINT/SIGTERM, removes the temporary output being written (a partial model directory
/// or results file) and exits with status 130. Temporaries of runs killed harder (SIGKILL) are
/// removed by the next run into the same place.
fn install_signal_handler() {
    let set = ctrlc::set_handler(|| {
        for p in peftrt::output::remove_live_temporaries() {
            eprintln!("interrupted: removed the unfinished {}", p.display());
        }
        eprintln!("interrupted");
        std::process::exit(130);
    });
    if let Err(e) = set {
        log::warn!("cannot install a signal handler ({e}); an interrupted run may leave a temporary output");
    }
}
