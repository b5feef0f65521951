//! `peftrt serve`'s request parser: one body of `POST /v1/chat/completions` (first byte even)
//! or `POST /v1/completions` (odd) → `peftrt_server::openai::parse`, against a server whose base
//! is "base" and which serves no adapter (a request naming one must get a 404-kind error).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peftrt::adapter::AdapterOptions;
use peftrt_server::adapters::{AdapterLimits, Adapters};
use peftrt_server::openai::{parse, Kind};
use std::sync::OnceLock;

fn adapters() -> &'static Adapters {
    static A: OnceLock<Adapters> = OnceLock::new();
    A.get_or_init(|| {
        let limits = AdapterLimits { max_count: 4, max_bytes: 1 << 30, root: None };
        Adapters::new(limits, AdapterOptions { allow_base_mismatch: false, strict_base: false })
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(body) else { return };
    let kind = if mode % 2 == 0 { Kind::Chat } else { Kind::Completion };
    let _ = parse(kind, body, "base", adapters());
});
