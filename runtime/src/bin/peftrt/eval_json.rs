//! `peftrt eval-json`: judge replies by the project's one rule for valid JSON (`peftrt::json`).

use anyhow::Result;
use peftrt::json::{judge_replies, Schema};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// JSON Lines of replies, such as `peftrt batch --out` writes (a line without the reply
    /// field, a failed request, counts as not JSON).
    pub replies: PathBuf,
    /// Also check every parsed reply against this JSON Schema.
    #[arg(long)]
    pub schema: Option<PathBuf>,
    /// The field of each line that holds the reply.
    #[arg(long, default_value = "text")]
    pub field: String,
}

/// One line per reply on stdout (`json`, `value`, and with a schema `schema_valid`,
/// `schema_error`), the totals on stderr.
pub fn run(a: Args) -> Result<()> {
    let schema = a.schema.as_deref().map(Schema::load).transpose()?;
    let verdicts = judge_replies(&a.replies, &a.field, schema.as_ref())?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for v in &verdicts {
        writeln!(out, "{}", v.to_json(schema.is_some()))?;
    }
    out.flush()?;
    let n = verdicts.len();
    let pct = |k: usize| if n == 0 { 0.0 } else { 100.0 * k as f64 / n as f64 };
    let json = verdicts.iter().filter(|v| v.is_json()).count();
    eprint!("{n} replies: {json} JSON ({:.1}%)", pct(json));
    if schema.is_some() {
        let valid = verdicts.iter().filter(|v| v.is_valid()).count();
        eprint!(", {valid} schema-valid ({:.1}%)", pct(valid));
    }
    eprintln!();
    Ok(())
}
