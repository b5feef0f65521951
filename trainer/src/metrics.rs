//! What a run reports while it trains: a JSON Lines file with one record per step (`step`,
//! `epoch`, `loss`, `lr`, `grad_norm`, the step's speed — `tokens`, `response_tokens`, `step_s`,
//! `tokens_per_s` —, and `eval_loss` on evaluation steps), a progress bar (step, loss, learning
//! rate, tokens/s, ETA), and the overfitting warning.

use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One step's record.
#[derive(Clone, Debug, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// `None` for steps restored from a checkpoint, whose speed is unknown.
    pub speed: Option<StepSpeed>,
    pub eval_loss: Option<f64>,
}

/// How much one step processed, and in how long.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepSpeed {
    /// Input tokens of the step's micro-batches, padding excluded.
    pub tokens: i64,
    /// Tokens whose prediction is in the loss.
    pub response_tokens: i64,
    /// Wall time of the step: batching, forward, backward, clipping, optimiser update (not
    /// evaluation, checkpoints or the metrics write).
    pub seconds: f64,
}

impl StepSpeed {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

impl StepMetrics {
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "step": self.step, "epoch": self.epoch, "loss": self.loss, "lr": self.lr,
            "grad_norm": self.grad_norm, "tokens_per_s": self.speed.map(|s| s.tokens_per_s()),
        });
        if let Some(s) = self.speed {
            v["tokens"] = json!(s.tokens);
            v["response_tokens"] = json!(s.response_tokens);
            v["step_s"] = json!(s.seconds);
        }
        if let Some(e) = self.eval_loss {
            v["eval_loss"] = json!(e);
        }
        v
    }
}

/// The metrics file, appended to and flushed after every step (so it can be watched).
pub struct MetricsFile {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsFile {
    /// Creates (or truncates) `path` and writes `history` (the steps of a resumed run) first.
    pub fn create(path: &Path, history: &[StepMetrics]) -> Result<MetricsFile> {
        let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let mut m = MetricsFile { path: path.to_path_buf(), file };
        for s in history {
            m.write(s)?;
        }
        Ok(m)
    }

    pub fn write(&mut self, s: &StepMetrics) -> Result<()> {
        writeln!(self.file, "{}", s.to_json()).and_then(|()| self.file.flush()).map_err(|e| Error::io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Watches for overfitting: the training loss falling toward 0 while the evaluation loss rises.
#[derive(Default)]
pub struct OverfitWatch {
    evals: Vec<f64>,
    warned: bool,
}

impl OverfitWatch {
    /// Records an evaluation; returns a warning the first time eval loss has risen at two
    /// consecutive evaluations while the training loss is below half of it.
    pub fn observe(&mut self, train_loss: f64, eval_loss: f64) -> Option<String> {
        self.evals.push(eval_loss);
        let n = self.evals.len();
        if self.warned || n < 3 {
            return None;
        }
        let (a, b, c) = (self.evals[n - 3], self.evals[n - 2], self.evals[n - 1]);
        if a < b && b < c && train_loss < 0.5 * c {
            self.warned = true;
            return Some(format!(
                "overfitting: the training loss has fallen to {train_loss:.4} while the eval loss rose at the last \
                 two evaluations ({a:.4} → {b:.4} → {c:.4}); consider fewer epochs, a lower --lr or more data"
            ));
        }
        None
    }
}

/// The progress bar: `[elapsed] ███░░ step/total loss … lr … tok/s ETA …`. Hidden unless asked
/// for (and by indicatif when stderr is not a terminal).
pub fn progress_bar(total: u64, start: u64, visible: bool) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    let style =
        indicatif::ProgressStyle::with_template("[{elapsed_precise}] {wide_bar} step {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_position(start);
    bar.reset_eta();
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overfitting_is_reported_once() {
        let mut w = OverfitWatch::default();
        assert_eq!(w.observe(2.0, 2.5), None);
        assert_eq!(w.observe(1.0, 2.4), None);
        assert_eq!(w.observe(0.5, 2.6), None); // rose once
        let msg = w.observe(0.1, 2.9).expect("rose twice while training loss fell");
        assert!(msg.contains("overfitting") && msg.contains("2.4000 → 2.6000 → 2.9000"), "{msg}");
        assert_eq!(w.observe(0.05, 3.5), None);
        // A rising eval loss with a training loss that is not low is no collapse.
        let mut w = OverfitWatch::default();
        for (t, e) in [(3.0, 3.1), (3.0, 3.2), (3.0, 3.3)] {
            assert_eq!(w.observe(t, e), None);
        }
    }

    #[test]
    fn records_are_one_json_object_per_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.jsonl");
        let s =
            StepMetrics { step: 1, epoch: 0.5, loss: 2.0, lr: 1e-3, grad_norm: 0.7, speed: None, eval_loss: Some(2.5) };
        let mut m = MetricsFile::create(&p, std::slice::from_ref(&s)).unwrap();
        m.write(&StepMetrics { step: 2, eval_loss: None, ..s }).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["eval_loss"], json!(2.5));
        assert!(lines[1].get("eval_loss").is_none() && lines[1]["tokens_per_s"].is_null());
    }
}
