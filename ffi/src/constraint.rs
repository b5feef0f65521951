//! `peftrt_session_set_constraint` / `peftrt_session_clear_constraint`: output constrained to a
//! JSON Schema, any JSON object, a regex or a Lark grammar (`rt::constraint`). The session keeps
//! the compiled constraint from its start (each generate gets a copy) and its sampler a copy
//! that advances with every sampled token.

use crate::session::{peftrt_session, with_session};
use crate::{c_slice, guard_status, Fail, Result, Status};
use rt::constraint::ConstraintSpec;
use std::ffi::{c_char, c_int};

/// `peftrt_constraint_kind`
const CONSTRAINT_KINDS: [&str; 4] = ["JSON_SCHEMA", "JSON_OBJECT", "REGEX", "LARK"];

/// # Safety
/// `text` is NULL or has `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn peftrt_session_set_constraint(
    session: *mut peftrt_session,
    kind: c_int,
    text: *const c_char,
    len: usize,
) -> Status {
    guard_status(|| {
        with_session(session, |s, st| {
            // SAFETY: forwarded from our caller.
            let spec = unsafe { constraint_spec(kind, text, len) }?;
            let c = rt::constraint::Constraint::new(&s.model, &spec)?;
            st.sampler.set_constraint(Some(c.clone()))?;
            st.constraint = Some(c);
            Ok(())
        })
    })
}

/// The constraint a C caller describes: `kind` (`peftrt_constraint_kind`) and its `len` bytes
/// of UTF-8 text.
///
/// # Safety
/// `text` is NULL or has `len` readable bytes.
pub(crate) unsafe fn constraint_spec(kind: c_int, text: *const c_char, len: usize) -> Result<ConstraintSpec> {
    if len as u64 > rt::fsutil::MAX_JSON_BYTES {
        return Err(Fail::arg(format!(
            "the constraint text is {len} bytes; at most {} are accepted",
            rt::fsutil::MAX_JSON_BYTES
        )));
    }
    // SAFETY: forwarded from our caller.
    let bytes = unsafe { c_slice(text.cast::<u8>(), len, "text") }?;
    let text = || {
        std::str::from_utf8(bytes)
            .map(str::to_string)
            .map_err(|e| Fail::arg(format!("the constraint text is not UTF-8: {e}")))
    };
    Ok(match kind {
        0 => ConstraintSpec::JsonSchema(text()?),
        1 => ConstraintSpec::AnyJson,
        2 => ConstraintSpec::Regex(text()?),
        3 => ConstraintSpec::Lark(text()?),
        k => {
            return Err(Fail::arg(format!(
                "constraint kind {k} is not one of PEFTRT_CONSTRAINT_{{{}}} (0 to {})",
                CONSTRAINT_KINDS.join(", "),
                CONSTRAINT_KINDS.len() - 1
            )))
        }
    })
}

#[no_mangle]
pub extern "C" fn peftrt_session_clear_constraint(session: *mut peftrt_session) -> Status {
    guard_status(|| {
        with_session(session, |_, st| {
            st.sampler.set_constraint(None)?;
            st.constraint = None;
            Ok(())
        })
    })
}
