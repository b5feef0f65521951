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
    /// C `bool` (added after 0.1.0, in what was padding: the struct size is unchanged).
    pub strict_base: u8,
}

#[no_mangle]
pub extern "C" fn peftrt_adapter_default_params() -> peftrt_adapter_params {
    peftrt_adapter_params {
        struct_size: std::mem::size_of::<peftrt_adapter_params>(),
        allow_base_mismatch: 0,
        strict_base: 0,
    }
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
            let opts = rt::adapter::AdapterOptions {
                allow_base_mismatch: p.allow_base_mismatch != 0,
                strict_base: p.strict_base != 0,
            };
            // The runtime tells the cases apart: IO/FORMAT/UNSUPPORTED for the files
            // themselves, AdapterMismatch (another base, architecture or shapes) for a
            // well-formed adapter that does not fit this model.
            let adapter = rt::Adapter::load_with(dir, &m, &opts)?;
            Ok(handle::register(peftrt_adapter { adapter: Arc::new(adapter), model: m }))
        },
    )
}

#[no_mangle]
pub extern "C" fn peftrt_adapter_free(adapter: *mut peftrt_adapter) -> Status {
    guard_status(|| handle::take(adapter, "adapter").map(drop))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_base_fits_in_the_old_padding() {
        // The header's peftrt_adapter_params: size_t, two bools (+ padding). 0.1.0 callers
        // pass 16 too, so their struct_size stays accepted.
        assert_eq!(std::mem::size_of::<peftrt_adapter_params>(), 16);
        assert_eq!(std::mem::offset_of!(peftrt_adapter_params, strict_base), 9);
        let d = peftrt_adapter_default_params();
        assert_eq!((d.struct_size, d.allow_base_mismatch, d.strict_base), (16, 0, 0));
    }
}
