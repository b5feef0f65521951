//! Counters for `GET /metrics`, in Prometheus' text format (version 0.0.4): requests by outcome,
//! tokens, queue depth, active sequences, batch size per step and time to first token.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// A histogram with fixed upper bounds (cumulative counts are computed when rendered).
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

const TTFT_BOUNDS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Shared by the HTTP handlers and the engine thread.
pub struct Metrics {
    pub requests_ok: AtomicU64,
    pub requests_failed: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub rejected_queue_full: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Requests waiting for a slot.
    pub queue_depth: AtomicU64,
    /// Sequences in the engine's slots.
    pub active: AtomicU64,
    pub max_sequences: AtomicU64,
    pub steps: AtomicU64,
    ttft: Mutex<Histogram>,
    batch: Mutex<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests_ok: AtomicU64::new(0),
            requests_failed: AtomicU64::new(0),
            requests_cancelled: AtomicU64::new(0),
            rejected_queue_full: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            active: AtomicU64::new(0),
            max_sequences: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            ttft: Mutex::new(Histogram::new(TTFT_BOUNDS)),
            batch: Mutex::new(Histogram::new(BATCH_BOUNDS)),
        }
    }
}

impl Metrics {
    /// Seconds from a request's arrival to its first sampled token.
    pub fn observe_ttft(&self, seconds: f64) {
        if let Ok(mut h) = self.ttft.lock() {
            h.observe(seconds)
        }
    }

    /// Sequences advanced by one engine step.
    pub fn observe_batch(&self, n: usize) {
        self.steps.fetch_add(1, Relaxed);
        if let Ok(mut h) = self.batch.lock() {
            h.observe(n as f64)
        }
    }

    /// The Prometheus text; `adapters` and `adapter_bytes` are the loaded adapters' count and size.
    pub fn render(&self, adapters: usize, adapter_bytes: u64) -> String {
        let mut out = String::new();
        let g = |v: &AtomicU64| v.load(Relaxed);
        let _ = writeln!(
            out,
            "# HELP peftrt_requests_total Completion requests handed to the engine that ended, by outcome (requests refused before, with 4xx, are not counted).\n\
             # TYPE peftrt_requests_total counter\n\
             peftrt_requests_total{{outcome=\"ok\"}} {}\n\
             peftrt_requests_total{{outcome=\"error\"}} {}\n\
             peftrt_requests_total{{outcome=\"cancelled\"}} {}",
            g(&self.requests_ok),
            g(&self.requests_failed),
            g(&self.requests_cancelled)
        );
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        one(
            "peftrt_requests_rejected_total",
            "counter",
            "Requests refused with 429 because the queue was full.",
            g(&self.rejected_queue_full),
        );
        one("peftrt_prompt_tokens_total", "counter", "Prompt tokens of requests that ended.", g(&self.prompt_tokens));
        one("peftrt_generation_tokens_total", "counter", "Tokens generated.", g(&self.generated_tokens));
        one("peftrt_queue_depth", "gauge", "Requests waiting for a free sequence slot.", g(&self.queue_depth));
        one("peftrt_active_sequences", "gauge", "Sequences in the engine now.", g(&self.active));
        one("peftrt_max_sequences", "gauge", "Sequence slots of the engine (--max-sequences).", g(&self.max_sequences));
        one("peftrt_engine_steps_total", "counter", "Forward passes of the engine.", g(&self.steps));
        one("peftrt_loaded_adapters", "gauge", "Adapters served as model ids.", adapters as u64);
        one("peftrt_adapter_bytes", "gauge", "Total size of the served adapters' weight files.", adapter_bytes);
        if let Ok(h) = self.batch.lock() {
            h.render(&mut out, "peftrt_batch_size", "Sequences advanced per engine step.");
        }
        if let Ok(h) = self.ttft.lock() {
            h.render(
                &mut out,
                "peftrt_time_to_first_token_seconds",
                "Seconds from a request's arrival to its first token.",
            );
        }
        out
    }
}
