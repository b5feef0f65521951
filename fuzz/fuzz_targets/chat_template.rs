//! `tokenizer_config.json` (special tokens, chat template) → `Tokenizer::from_dir`, then chat
//! template rendering (`Tokenizer::apply_chat_template`), beside the tiny Llama fixture's
//! `tokenizer.json`. A template that loops or grows without bound must end in an error (the
//! runtime's minijinja fuel and rendered-size cap), which libFuzzer's -timeout and -rss_limit_mb
//! report otherwise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peftrt::{Message, Tokenizer};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn tokenizer_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = peftrt_fuzz::scratch_subdir("tokenizer");
        std::fs::copy(peftrt_fuzz::tiny_llama_dir().join("tokenizer.json"), dir.join("tokenizer.json"))
            .expect("copy the fixture tokenizer");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = tokenizer_dir();
    peftrt_fuzz::write(dir, "tokenizer_config.json", data);
    let Ok(tok) = Tokenizer::from_dir(dir) else { return };
    let messages = [
        Message::new("system", "Answer in JSON."),
        Message::new("user", "Hi {{ there }} <|im_end|> ünïcödé"),
        Message::new("assistant", "{\"a\": 1}"),
        Message::new("user", ""),
    ];
    for add_generation_prompt in [false, true] {
        if let Ok(text) = tok.apply_chat_template(&messages, add_generation_prompt) {
            let _ = tok.encode(&text, false);
        }
    }
});
