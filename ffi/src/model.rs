//! `peftrt_model`: loading, freeing and describing a model.

use crate::handle::{self, Handle, Kind};
use crate::{guard, guard_status, non_null, read_params, write_out, Fail, Result, Status};
use std::ffi::{c_char, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

/// The opaque `peftrt_model`.
pub struct peftrt_model {
    pub model: Arc<rt::Model>,
    /// Threads of sessions that ask for 0 (0 = every core).
    pub n_threads: usize,
}

impl Handle for peftrt_model {
    const KIND: Kind = Kind::Model;
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct peftrt_model_params {
    pub struct_size: usize,
    pub n_threads: i32,
    /// C `bool`, read as a byte so that any value is safe.
    pub populate: u8,
    pub no_tokenizer: u8,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct peftrt_model_info {
    pub struct_size: usize,
    pub architecture: *const c_char,
    pub vocab_size: i32,
    pub n_ctx_train: i32,
    pub n_layers: i32,
    pub hidden_size: i32,
    pub bos_token: i32,
    pub eos_token: i32,
    pub has_tokenizer: bool,
    pub has_chat_template: bool,
}

/// A path argument: any bytes (Unix paths need not be UTF-8).
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
pub(crate) unsafe fn c_path<'a>(p: *const c_char, what: &str) -> Result<&'a Path> {
    non_null(p, what)?;
    // SAFETY: non-null and NUL-terminated by contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.is_empty() {
        return Err(Fail::arg(format!("{what} is empty; pass a directory path")));
    }
    Ok(Path::new(OsStr::from_bytes(bytes)))
}

/// Reads every page of the model's memory-mapped tensors once.
fn populate(model: &rt::Model) {
    let mut sum = 0u8;
    for t in model.store().tensors() {
        for b in t.bytes().iter().step_by(4096) {
            sum = sum.wrapping_add(*b);
        }
    }
    std::hint::black_box(sum);
}

fn to_i32(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| Fail::new(Status::Unsupported, format!("{what} {n} does not fit in an int32_t")))
}

#[no_mangle]
pub extern "C" fn peftrt_model_default_params() -> peftrt_model_params {
    peftrt_model_params {
        struct_size: std::mem::size_of::<peftrt_model_params>(),
        n_threads: 0,
        populate: 0,
        no_tokenizer: 0,
    }
}

/// # Safety
/// `path` is NULL or a NUL-terminated string; `params` is NULL or a `peftrt_model_params`.
#[no_mangle]
pub unsafe extern "C" fn peftrt_model_load(
    path: *const c_char,
    params: *const peftrt_model_params,
) -> *mut peftrt_model {
    guard(
        |_| std::ptr::null_mut(),
        || {
            // SAFETY: forwarded from our caller.
            let dir = unsafe { c_path(path, "path") }?;
            // SAFETY: forwarded from our caller.
            let p = unsafe {
                read_params(
                    params,
                    peftrt_model_default_params(),
                    std::mem::size_of::<peftrt_model_params>(),
                    "peftrt_model_params",
                )
            }?;
            let n_threads = crate::count(p.n_threads, "peftrt_model_params.n_threads")?;
            if !dir.exists() {
                return Err(Fail::new(
                    Status::Io,
                    format!(
                        "{}: no such file or directory; pass a Hugging Face model directory or a GGUF file",
                        dir.display()
                    ),
                ));
            }
            let opts = rt::LoadOptions { no_tokenizer: p.no_tokenizer != 0 };
            let model = rt::Model::load(dir, &opts)?;
            if p.populate != 0 {
                populate(&model);
            }
            Ok(handle::register(peftrt_model { model: Arc::new(model), n_threads }))
        },
    )
}

#[no_mangle]
pub extern "C" fn peftrt_model_free(model: *mut peftrt_model) -> Status {
    guard_status(|| handle::take(model, "model").map(drop))
}

/// # Safety
/// `info` is NULL or a writable `peftrt_model_info` whose `struct_size` is set.
#[no_mangle]
pub unsafe extern "C" fn peftrt_model_get_info(model: *const peftrt_model, info: *mut peftrt_model_info) -> Status {
    guard_status(|| {
        let m = &handle::get(model, "model")?.model;
        let c = &m.config;
        let out = peftrt_model_info {
            struct_size: std::mem::size_of::<peftrt_model_info>(),
            architecture: match c.arch {
                rt::config::Arch::Llama => c"llama".as_ptr(),
                rt::config::Arch::Mistral => c"mistral".as_ptr(),
                rt::config::Arch::Qwen2 => c"qwen2".as_ptr(),
            },
            vocab_size: to_i32(c.vocab_size, "vocab_size")?,
            n_ctx_train: to_i32(c.max_position_embeddings, "max_position_embeddings")?,
            n_layers: to_i32(c.num_hidden_layers, "num_hidden_layers")?,
            hidden_size: to_i32(c.hidden_size, "hidden_size")?,
            bos_token: c.bos_token_id.map_or(-1, |t| t as i32),
            eos_token: c.eos_token_ids.first().map_or(-1, |&t| t as i32),
            has_tokenizer: m.tokenizer.is_some(),
            has_chat_template: m.tokenizer.as_ref().is_some_and(|t| t.has_chat_template()),
        };
        // SAFETY: forwarded from our caller.
        unsafe { write_out(info, &out, std::mem::size_of::<peftrt_model_info>(), "peftrt_model_info") }
    })
}

#[no_mangle]
pub extern "C" fn peftrt_model_is_eos(model: *const peftrt_model, token: i32) -> i32 {
    guard(
        |s| s as i32,
        || {
            let m = &handle::get(model, "model")?.model;
            let t = crate::token_ids(&[token], m.config.vocab_size)?[0];
            Ok(i32::from(m.is_eos(t)))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::c_str;

    #[test]
    fn info_layout_has_no_surprises() {
        // The header's peftrt_model_info: size_t, pointer, six int32_t, two bools (+ padding).
        assert_eq!(std::mem::size_of::<peftrt_model_info>(), 8 + 8 + 6 * 4 + 2 + 6);
        assert_eq!(std::mem::size_of::<peftrt_model_params>(), 16);
    }

    #[test]
    fn c_strings_are_checked() {
        // SAFETY: NULL and static strings.
        unsafe {
            assert!(c_str(std::ptr::null(), "x").is_err());
            assert!(c_str(c"\xff\xfe".as_ptr(), "x").is_err());
            assert_eq!(c_str(c"ok".as_ptr(), "x").unwrap(), "ok");
        }
    }
}
