//! Text ↔ tokens and chat templates, on a model (read-only, any thread).

use crate::handle;
use crate::model::peftrt_model;
use crate::{c_slice, c_str, count, fill_array, fill_text, guard_buffer, token_ids, Result};
use std::ffi::c_char;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct peftrt_chat_message {
    pub role: *const c_char,
    pub content: *const c_char,
}

/// # Safety
/// `text` is NULL or NUL-terminated; `tokens` is NULL or has `n_tokens_max` writable ids.
#[no_mangle]
pub unsafe extern "C" fn peftrt_tokenize(
    model: *const peftrt_model,
    text: *const c_char,
    add_special: bool,
    tokens: *mut i32,
    n_tokens_max: i32,
) -> i32 {
    guard_buffer(|| {
        let m = &handle::get(model, "model")?.model;
        // SAFETY: forwarded from our caller.
        let text = unsafe { c_str(text, "text") }?;
        let ids = m.tokenizer()?.encode(text, add_special)?;
        let ids: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        // SAFETY: forwarded from our caller.
        unsafe { fill_array(&ids, tokens, n_tokens_max, "n_tokens_max") }
    })
}

/// # Safety
/// `tokens` is NULL or has `n_tokens` ids; `buf` is NULL or has `buf_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn peftrt_detokenize(
    model: *const peftrt_model,
    tokens: *const i32,
    n_tokens: i32,
    skip_special: bool,
    buf: *mut c_char,
    buf_size: i32,
) -> i32 {
    guard_buffer(|| {
        let m = &handle::get(model, "model")?.model;
        // SAFETY: forwarded from our caller.
        let tokens = unsafe { c_slice(tokens, count(n_tokens, "n_tokens")?, "tokens") }?;
        let ids = token_ids(tokens, m.config.vocab_size)?;
        let text = m.tokenizer()?.decode(&ids, skip_special)?;
        // SAFETY: forwarded from our caller.
        unsafe { fill_text(&text, buf, buf_size) }
    })
}

/// # Safety
/// `messages` is NULL or has `n_messages` entries of NUL-terminated strings; `buf` is NULL or
/// has `buf_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn peftrt_chat_apply_template(
    model: *const peftrt_model,
    messages: *const peftrt_chat_message,
    n_messages: usize,
    add_generation_prompt: bool,
    buf: *mut c_char,
    buf_size: i32,
) -> i32 {
    guard_buffer(|| {
        let m = &handle::get(model, "model")?.model;
        // SAFETY: forwarded from our caller.
        let msgs = unsafe { chat_messages(messages, n_messages, "messages") }?;
        let text = m.tokenizer()?.apply_chat_template(&msgs, add_generation_prompt)?;
        // SAFETY: forwarded from our caller.
        unsafe { fill_text(&text, buf, buf_size) }
    })
}

/// The runtime's messages from C's `n` messages at `messages` (`what` names them in errors).
///
/// # Safety
/// `messages` is NULL or has `n` messages whose strings are NUL-terminated.
pub(crate) unsafe fn chat_messages(
    messages: *const peftrt_chat_message,
    n: usize,
    what: &str,
) -> Result<Vec<rt::Message>> {
    // SAFETY: forwarded from our caller.
    let msgs = unsafe { c_slice(messages, n, what) }?;
    msgs.iter()
        .enumerate()
        .map(|(i, msg)| {
            // SAFETY: forwarded from our caller.
            let role = unsafe { c_str(msg.role, &format!("{what}[{i}].role")) }?;
            // SAFETY: forwarded from our caller.
            let content = unsafe { c_str(msg.content, &format!("{what}[{i}].content")) }?;
            Ok(rt::Message::new(role, content))
        })
        .collect()
}
