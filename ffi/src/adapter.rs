//! `peftrt_adapter`: a PEFT adapter loaded for one model.

use crate::handle::{self, Handle, Kind};
use crate::model::{c_path, peftrt_model};
use crate::{guard, guard_status, read_params, Fail, Status};
use std::ffi::c_char;
use std::sync::Arc;

/// The opaque `peftrt_adapter`.
pub struct peftrt_adapter {
    pub adapter: Arc<rt::Adapter>,
    /// The model it was loaded for (kept alive by it).
    pub model: Arc<rt::Model>,
}

impl Handle for peftrt_adapter {
    const KIND: Kind = Kind::Adapter;
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct peftrt_adapter_params {
    pub struct_size: usize,
    /// C `bool`, read as a byte.
    pub allow_base_mismatch: u8,
}

#[no_mangle]
pub extern "C" fn peftrt_adapter_default_params() -> peftrt_adapter_params {
    peftrt_adapter_params { struct_size: std::mem::size_of::<peftrt_adapter_params>(), allow_base_mismatch: 0 }
}

/// # Safety
/// `path` is NULL or NUL-terminated; `params` is NULL or a `peftrt_adapter_params`.
#[no_mangle]
pub unsafe extern "C" fn peftrt_adapter_load(
    model: *const peftrt_model,
    path: *const c_char,
    params: *const peftrt_adapter_params,
) -> *mut peftrt_adapter {
    guard(
        |_| std::ptr::null_mut(),
        || {
            let m = handle::get(model, "model")?.model.clone();
            // SAFETY: forwarded from our caller.
            let dir = unsafe { c_path(path, "path") }?;
            // SAFETY: forwarded from our caller.
            let p = unsafe {
                read_params(
                    params,
                    peftrt_adapter_default_params(),
                    std::mem::size_of::<peftrt_adapter_params>(),
                    "peftrt_adapter_params",
                )
            }?;
            if !dir.exists() {
                return Err(Fail::new(
                    Status::Io,
                    format!("{}: no such file or directory; pass a PEFT adapter directory", dir.display()),
                ));
            }
            // Reading the files on their own first tells a malformed adapter (their own status)
            // apart from one that does not fit this model.
            let file = rt::adapter::AdapterFile::open(dir)?;
            let opts = rt::adapter::AdapterOptions { allow_base_mismatch: p.allow_base_mismatch != 0 };
            let adapter = rt::Adapter::bind(file, &m, &opts).map_err(|e| match e {
                rt::Error::Io { .. } => Fail::from(e),
                e => Fail::new(Status::AdapterMismatch, format!("{e} (is the adapter for another base model?)")),
            })?;
            Ok(handle::register(peftrt_adapter { adapter: Arc::new(adapter), model: m }))
        },
    )
}

#[no_mangle]
pub extern "C" fn peftrt_adapter_free(adapter: *mut peftrt_adapter) -> Status {
    guard_status(|| handle::take(adapter, "adapter").map(drop))
}
