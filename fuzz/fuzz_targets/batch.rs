//! The batch JSONL reader: one line of `peftrt batch --input` → `peftrt::batch::parse_request`,
//! with the tiny Llama fixture's tokenizer (and its chat template for `messages` requests).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peftrt::Tokenizer;
use std::sync::OnceLock;

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::from_dir(&peftrt_fuzz::tiny_llama_dir()).expect("the fixture tokenizer"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else { return };
    let _ = peftrt::batch::parse_request(line, tokenizer());
});
