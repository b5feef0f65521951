//! The registry of live handles: every handle given to C is recorded here with its kind, and
//! every call checks the pointer it gets against it before touching it. So NULL, a freed
//! handle (until its address is reused by a new handle) or a handle of another kind is an
//! error, never a read of freed memory.

use crate::{Fail, Result, Status};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Model,
    Adapter,
    Session,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Model => "peftrt_model",
            Kind::Adapter => "peftrt_adapter",
            Kind::Session => "peftrt_session",
        }
    }
}

/// A type handed to C as an opaque handle.
pub trait Handle: Sized {
    const KIND: Kind;
}

/// Address → kind of every live handle.
static LIVE: Mutex<BTreeMap<usize, Kind>> = Mutex::new(BTreeMap::new());

/// The registry; a panic while it was held cannot leave it inconsistent (single inserts and
/// removes), so a poisoned lock is used as is.
pub fn registry() -> MutexGuard<'static, BTreeMap<usize, Kind>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Gives `value` to C as a handle.
pub fn register<T: Handle>(value: T) -> *mut T {
    let p = Box::into_raw(Box::new(value));
    registry().insert(p as usize, T::KIND);
    p
}

/// Checks that `p` is a live handle of kind `T` under an already-held registry lock.
pub fn check<T: Handle>(live: &BTreeMap<usize, Kind>, p: *const T, what: &str) -> Result<()> {
    if p.is_null() {
        return Err(Fail::arg(format!("{what} is NULL; pass a {} from peftrt", T::KIND.name())));
    }
    match live.get(&(p as usize)) {
        Some(&k) if k == T::KIND => Ok(()),
        Some(&k) => {
            Err(Fail::new(Status::InvalidHandle, format!("{what} is a {}, not a {}", k.name(), T::KIND.name())))
        }
        None => Err(Fail::new(
            Status::InvalidHandle,
            format!("{what} is not a live {} (already freed, or never created by peftrt)", T::KIND.name()),
        )),
    }
}

/// The handle behind `p`, if it is a live one of kind `T`.
///
/// The reference is valid until the handle is freed; the header makes freeing a handle while
/// another call uses it the caller's error.
pub(crate) fn get<'a, T: Handle>(p: *const T, what: &str) -> Result<&'a T> {
    check(&registry(), p, what)?;
    // SAFETY: registered handles are live boxes of `T`, freed only through `take`.
    Ok(unsafe { &*p })
}

/// Removes a live handle from the registry and returns ownership of it. NULL gives `None`.
pub(crate) fn take<T: Handle>(p: *mut T, what: &str) -> Result<Option<Box<T>>> {
    if p.is_null() {
        return Ok(None);
    }
    let mut live = registry();
    check(&live, p, what)?;
    live.remove(&(p as usize));
    // SAFETY: it was registered by `register` from `Box::into_raw`, and is now unregistered,
    // so no other `take` can free it again.
    Ok(Some(unsafe { Box::from_raw(p) }))
}
