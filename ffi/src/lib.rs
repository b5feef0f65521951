//! # libpeftrt — the C ABI of peftrt
//!
//! Builds `libpeftrt.so` and `libpeftrt.a`, whose functions are declared in
//! `include/peftrt.h` (the contract: ownership, thread safety and errors are documented
//! there). Four opaque handles wrap the runtime's types:
//! - `peftrt_model` ([`model`]): an `Arc<peftrt::Model>` plus the default thread count;
//! - `peftrt_adapter` ([`adapter`]): an `Arc<peftrt::Adapter>` and the model it was loaded for;
//! - `peftrt_session` ([`session`]): a `peftrt::Session` and its sampler behind a mutex (one
//!   thread at a time; a second gets `PEFTRT_ERR_BUSY`), and the cancel flag the session
//!   checks between layers;
//! - `peftrt_engine` ([`engine`]): a `peftrt::Engine` and each request's callbacks behind a
//!   mutex (one thread at a time), and the cancel requests any thread may add.
//!
//! Every entry point runs inside [`guard`]: it catches panics (none may unwind into C),
//! turns errors into a status code or NULL, and records a thread-local message
//! (`peftrt_last_error`). Handles are checked against a registry of live handles
//! ([`handle`]), so NULL, a freed handle or a handle of the wrong kind is an error, not a
//! crash; the registry owns each object and every call holds its own reference while it
//! runs, so a free racing a call never frees memory under it. Text functions are in [`text`],
//! a session's output constraint in [`constraint`].

#![allow(non_camel_case_types)]

pub mod adapter;
pub mod constraint;
pub mod engine;
pub mod handle;
pub mod model;
pub mod session;
pub mod text;

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// `peftrt_status`: 0 is success, negative values are errors (see `include/peftrt.h`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    InvalidArgument = -1,
    InvalidHandle = -2,
    Io = -3,
    Format = -4,
    Unsupported = -5,
    AdapterMismatch = -6,
    Tokenizer = -7,
    ContextFull = -8,
    Cancelled = -9,
    Busy = -10,
    Internal = -11,
    OutOfMemory = -12,
    ConstraintInvalid = -13,
}

impl Status {
    const ALL: [Status; 14] = [
        Status::Ok,
        Status::InvalidArgument,
        Status::InvalidHandle,
        Status::Io,
        Status::Format,
        Status::Unsupported,
        Status::AdapterMismatch,
        Status::Tokenizer,
        Status::ContextFull,
        Status::Cancelled,
        Status::Busy,
        Status::Internal,
        Status::OutOfMemory,
        Status::ConstraintInvalid,
    ];

    /// The C name, NUL-terminated.
    fn c_name(self) -> &'static CStr {
        match self {
            Status::Ok => c"PEFTRT_OK",
            Status::InvalidArgument => c"PEFTRT_ERR_INVALID_ARGUMENT",
            Status::InvalidHandle => c"PEFTRT_ERR_INVALID_HANDLE",
            Status::Io => c"PEFTRT_ERR_IO",
            Status::Format => c"PEFTRT_ERR_FORMAT",
            Status::Unsupported => c"PEFTRT_ERR_UNSUPPORTED",
            Status::AdapterMismatch => c"PEFTRT_ERR_ADAPTER_MISMATCH",
            Status::Tokenizer => c"PEFTRT_ERR_TOKENIZER",
            Status::ContextFull => c"PEFTRT_ERR_CONTEXT_FULL",
            Status::Cancelled => c"PEFTRT_ERR_CANCELLED",
            Status::Busy => c"PEFTRT_ERR_BUSY",
            Status::Internal => c"PEFTRT_ERR_INTERNAL",
            Status::OutOfMemory => c"PEFTRT_ERR_OUT_OF_MEMORY",
            Status::ConstraintInvalid => c"PEFTRT_ERR_CONSTRAINT_INVALID",
        }
    }
}

/// A failed call: its status and a message naming what was wrong and what to do.
#[derive(Debug)]
pub struct Fail {
    pub status: Status,
    pub msg: String,
}

impl Fail {
    pub fn new(status: Status, msg: impl Into<String>) -> Self {
        Fail { status, msg: msg.into() }
    }
    pub fn arg(msg: impl Into<String>) -> Self {
        Fail::new(Status::InvalidArgument, msg)
    }
}

/// The runtime's errors as statuses, following the rule the header states (IO: the OS could
/// not open or read a file; FORMAT: malformed content; UNSUPPORTED: a feature peftrt does not
/// run). Where the runtime's message names a CLI flag or Rust option, the C spelling replaces
/// it: the error carries what is needed to say it.
impl From<rt::Error> for Fail {
    fn from(e: rt::Error) -> Self {
        let status = match &e {
            rt::Error::Io { .. } => Status::Io,
            rt::Error::Format { .. } | rt::Error::Config { .. } | rt::Error::Tensor { .. } => Status::Format,
            rt::Error::Unsupported(_) => Status::Unsupported,
            rt::Error::Tokenizer(_) => Status::Tokenizer,
            rt::Error::Input(_) => Status::InvalidArgument,
            rt::Error::Constraint(_) => Status::ConstraintInvalid,
            rt::Error::Cancelled => Status::Cancelled,
            rt::Error::NonFinite(_) => Status::Format,
            rt::Error::ContextFull { cached, new, n_ctx } => {
                return Fail::new(
                    Status::ContextFull,
                    format!(
                        "{cached} cached + {new} new tokens exceed the session's context of {n_ctx} tokens; \
                         reset the session or create one with a larger n_ctx"
                    ),
                )
            }
            rt::Error::OutOfMemory { what, bytes } => {
                return Fail::new(
                    Status::OutOfMemory,
                    format!(
                        "out of memory: cannot allocate {what} ({bytes} bytes); create the session with a \
                         smaller peftrt_session_params.n_ctx"
                    ),
                )
            }
            rt::Error::AdapterMismatch { msg, overridable } => {
                let hint = match overridable {
                    None => "",
                    Some(rt::error::MismatchOverride::AllowBaseMismatch) => {
                        "; load it on its own base, or set peftrt_adapter_params.allow_base_mismatch to load it \
                         anyway"
                    }
                    Some(rt::error::MismatchOverride::NotStrictBase) => {
                        "; load it on the model it names, or leave peftrt_adapter_params.strict_base false to \
                         load it with a warning"
                    }
                };
                return Fail::new(Status::AdapterMismatch, format!("{msg}{hint}"));
            }
        };
        Fail::new(status, e.to_string())
    }
}

pub type Result<T, E = Fail> = std::result::Result<T, E>;

struct LastError {
    status: Status,
    msg: CString,
}

thread_local! {
    static LAST: RefCell<LastError> = RefCell::new(LastError { status: Status::Ok, msg: CString::default() });
}

fn set_last(f: Fail) {
    // A message with an interior NUL (from a file name) is cut there rather than lost.
    let bytes: Vec<u8> = f.msg.into_bytes().into_iter().take_while(|&b| b != 0).collect();
    let msg = CString::new(bytes).unwrap_or_default();
    LAST.with(|l| *l.borrow_mut() = LastError { status: f.status, msg });
}

/// Runs the body of an entry point: a panic or an error becomes `fail` (NULL, a status or
/// `PEFTRT_BUFFER_ERROR`) with the thread's last status and message set.
pub fn guard<R>(fail: impl FnOnce(Status) -> R, body: impl FnOnce() -> Result<R>) -> R {
    let outcome = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(Fail::new(Status::Internal, format!("internal error (a bug in peftrt; please report it): {what}")))
    });
    match outcome {
        Ok(r) => r,
        Err(f) => {
            let status = f.status;
            set_last(f);
            fail(status)
        }
    }
}

/// [`guard`] for functions returning a status.
pub fn guard_status(body: impl FnOnce() -> Result<()>) -> Status {
    guard(|s| s, || body().map(|()| Status::Ok))
}

/// `PEFTRT_BUFFER_ERROR`: what buffer-filling functions return on errors other than a short
/// buffer.
pub const BUFFER_ERROR: i32 = i32::MIN;

/// [`guard`] for buffer-filling functions.
pub fn guard_buffer(body: impl FnOnce() -> Result<i32>) -> i32 {
    guard(|_| BUFFER_ERROR, body)
}

/// A required pointer argument, or an error naming it.
pub fn non_null<T>(p: *const T, what: &str) -> Result<*const T> {
    if p.is_null() {
        Err(Fail::arg(format!("{what} is NULL; pass a valid pointer")))
    } else {
        Ok(p)
    }
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a`.
pub unsafe fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    non_null(p, what)?;
    // SAFETY: non-null, and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|e| {
        Fail::arg(format!("{what} is not valid UTF-8 (bad byte at offset {}); pass UTF-8 text", e.valid_up_to()))
    })
}

/// A C array argument of `n` elements (`p` may be NULL when `n` is 0).
///
/// # Safety
/// `p` is NULL or points to `n` initialised elements that outlive `'a`.
pub unsafe fn c_slice<'a, T>(p: *const T, n: usize, what: &str) -> Result<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    non_null(p, what)?;
    // SAFETY: non-null, `n` elements by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// A count argument that must not be negative.
pub fn count(n: i32, what: &str) -> Result<usize> {
    usize::try_from(n).map_err(|_| Fail::arg(format!("{what} is {n}; it must be ≥ 0")))
}

/// A params struct from the caller: `struct_size` (its first field) says how much of it the
/// caller's header knew; fields beyond it keep their defaults. NULL gives the defaults.
///
/// # Safety
/// `p` is NULL or points to a struct of at least `struct_size` bytes whose first field is a
/// `size_t` giving that size.
pub unsafe fn read_params<T: Copy>(p: *const T, defaults: T, min_size: usize, what: &str) -> Result<T> {
    if p.is_null() {
        return Ok(defaults);
    }
    // SAFETY: the first field is a size_t by contract (read unaligned to be lenient).
    let size = unsafe { std::ptr::read_unaligned(p.cast::<usize>()) };
    let full = std::mem::size_of::<T>();
    if size < min_size || size > full {
        return Err(Fail::arg(format!(
            "{what}: struct_size is {size}, but this library (version {}) knows sizes {min_size}..={full}; \
             initialise the struct with its peftrt_*_default_params() function",
            env!("CARGO_PKG_VERSION")
        )));
    }
    let mut out = defaults;
    // SAFETY: `size` ≤ size_of::<T>() bytes are readable at `p` (contract) and writable in
    // `out`; every field type used in params structs is valid for any bit pattern it can hold
    // from C (numbers, pointers, and bools read as u8).
    unsafe { std::ptr::copy_nonoverlapping(p.cast::<u8>(), (&mut out as *mut T).cast::<u8>(), size) };
    Ok(out)
}

/// Writes an output struct (first field `size_t struct_size`, set by the caller) up to the
/// size the caller knows.
///
/// # Safety
/// `p` points to a writable struct of at least `struct_size` bytes.
pub unsafe fn write_out<T: Copy>(p: *mut T, value: &T, min_size: usize, what: &str) -> Result<()> {
    non_null(p, what)?;
    // SAFETY: as for `read_params`.
    let size = unsafe { std::ptr::read_unaligned(p.cast::<usize>()) };
    let full = std::mem::size_of::<T>();
    if size < min_size || size > full {
        return Err(Fail::arg(format!(
            "{what}: struct_size is {size}; set it to sizeof the struct ({full} in this library's header)"
        )));
    }
    // SAFETY: `size` bytes are writable at `p` (contract); the first field (the size) is
    // written back unchanged.
    unsafe { std::ptr::copy_nonoverlapping((value as *const T).cast::<u8>(), p.cast::<u8>(), size) };
    // SAFETY: as above.
    unsafe { std::ptr::write_unaligned(p.cast::<usize>(), size) };
    Ok(())
}

/// Copies `text` NUL-terminated into a caller's buffer, llama.h style: the length without the
/// NUL, or −(length + 1) when the buffer is short.
///
/// # Safety
/// `buf` is NULL or points to `buf_size` writable bytes.
pub unsafe fn fill_text(text: &str, buf: *mut c_char, buf_size: i32) -> Result<i32> {
    let cap = count(buf_size, "buf_size")?;
    let need = text.len() + 1;
    let need_i32 = i32::try_from(need).map_err(|_| Fail::arg(format!("the text is {need} bytes, over 2 GiB")))?;
    if cap < need {
        return Ok(-need_i32);
    }
    non_null(buf, "buf")?;
    // SAFETY: `buf` has `cap` ≥ `need` writable bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
        *buf.add(text.len()) = 0;
    }
    Ok(need_i32 - 1)
}

/// Copies values into a caller's array: the count, or −count when the array is short.
///
/// # Safety
/// `buf` is NULL or points to `cap` writable elements.
pub unsafe fn fill_array<T: Copy>(values: &[T], buf: *mut T, cap: i32, what: &str) -> Result<i32> {
    let cap = count(cap, what)?;
    let n = i32::try_from(values.len()).map_err(|_| Fail::arg(format!("{} values do not fit", values.len())))?;
    if cap < values.len() {
        return Ok(-n);
    }
    if !values.is_empty() {
        non_null(buf, "the output buffer")?;
        // SAFETY: `buf` has `cap` ≥ `values.len()` writable elements.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), buf, values.len()) };
    }
    Ok(n)
}

/// Token ids from C, checked against the vocabulary.
pub fn token_ids(tokens: &[i32], vocab: usize) -> Result<Vec<u32>> {
    tokens
        .iter()
        .map(|&t| {
            u32::try_from(t).ok().filter(|&u| (u as usize) < vocab).ok_or_else(|| {
                Fail::arg(format!("token id {t} is out of range: this model's ids are 0..{}", vocab - 1))
            })
        })
        .collect()
}

#[no_mangle]
pub extern "C" fn peftrt_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[no_mangle]
pub extern "C" fn peftrt_last_status() -> Status {
    LAST.try_with(|l| l.borrow().status).unwrap_or(Status::Internal)
}

#[no_mangle]
pub extern "C" fn peftrt_last_error() -> *const c_char {
    // The pointer stays valid until this thread's next failure replaces the message.
    LAST.try_with(|l| l.borrow().msg.as_ptr()).unwrap_or(c"".as_ptr())
}

#[no_mangle]
pub extern "C" fn peftrt_status_str(status: i32) -> *const c_char {
    Status::ALL.iter().find(|s| **s as i32 == status).map_or(c"unknown status".as_ptr(), |s| s.c_name().as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_error() {
        let r = guard(|s| s as i32, || -> Result<i32> { panic!("boom") });
        assert_eq!(r, Status::Internal as i32);
        assert_eq!(peftrt_last_status(), Status::Internal);
        // SAFETY: the library's own NUL-terminated message.
        let msg = unsafe { CStr::from_ptr(peftrt_last_error()) }.to_str().unwrap();
        assert!(msg.contains("boom") && msg.contains("bug in peftrt"), "{msg}");
    }

    #[test]
    fn errors_set_the_thread_local_message_only_on_their_thread() {
        assert_eq!(guard_status(|| Err(Fail::arg("x is bad"))), Status::InvalidArgument);
        std::thread::spawn(|| assert_eq!(peftrt_last_status(), Status::Ok)).join().unwrap();
        assert_eq!(peftrt_last_status(), Status::InvalidArgument);
    }

    #[test]
    fn short_buffers_report_the_size_needed() {
        let mut buf = [0 as c_char; 8];
        // SAFETY: `buf` has the capacity passed.
        unsafe {
            assert_eq!(fill_text("hello", buf.as_mut_ptr(), 8).unwrap(), 5);
            assert_eq!(fill_text("hello", buf.as_mut_ptr(), 5).unwrap(), -6);
            assert_eq!(fill_text("hello", std::ptr::null_mut(), 0).unwrap(), -6);
            let mut t = [0i32; 2];
            assert_eq!(fill_array(&[1, 2, 3], t.as_mut_ptr(), 2, "t").unwrap(), -3);
            assert_eq!(fill_array(&[1, 2], t.as_mut_ptr(), 2, "t").unwrap(), 2);
        }
    }

    #[test]
    fn status_names_cover_every_code() {
        for s in Status::ALL {
            // SAFETY: static NUL-terminated strings.
            let name = unsafe { CStr::from_ptr(peftrt_status_str(s as i32)) }.to_str().unwrap();
            assert!(name.starts_with("PEFTRT_"), "{name}");
        }
    }
}
