//! The registry of live handles: every handle given to C is recorded here with its kind and
//! the registry's reference to it (an `Arc`), and every call checks the pointer it gets
//! against it before touching it. So NULL, a freed handle (until its address is reused by a
//! new handle) or a handle of another kind is an error, never a read of freed memory.
//!
//! A call does not borrow the object: [`get`] clones the registry's `Arc` under the registry
//! lock, and the call holds that reference until it returns. Freeing a handle removes the
//! registry's reference; the object dies when the last call using it ends (issue #18: a free
//! landing between a call's check and its use of the object used to free it under the call).
//! `peftrt_session_free` goes further and refuses (BUSY) while any call holds its session
//! ([`take_unless_in_use`]).

use crate::{Fail, Result, Status};
use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Model,
    Adapter,
    Session,
    Engine,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Model => "peftrt_model",
            Kind::Adapter => "peftrt_adapter",
            Kind::Session => "peftrt_session",
            Kind::Engine => "peftrt_engine",
        }
    }
}

/// A type handed to C as an opaque handle.
pub trait Handle: Any + Send + Sync + Sized {
    const KIND: Kind;
}

/// A live handle: its kind and the registry's reference to the object.
struct Entry {
    kind: Kind,
    object: Arc<dyn Any + Send + Sync>,
}

/// Address → entry of every live handle.
static LIVE: Mutex<BTreeMap<usize, Entry>> = Mutex::new(BTreeMap::new());

/// The registry; a panic while it was held cannot leave it inconsistent (single inserts and
/// removes), so a poisoned lock is used as is.
fn registry() -> MutexGuard<'static, BTreeMap<usize, Entry>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Gives `value` to C as a handle: the pointer is the address of the `Arc`'s object.
pub fn register<T: Handle>(value: T) -> *mut T {
    let object = Arc::new(value);
    let p = Arc::as_ptr(&object) as *mut T;
    registry().insert(p as usize, Entry { kind: T::KIND, object });
    p
}

/// The entry of `p` if it is a live handle of kind `T`, under the held registry lock.
fn check<'r, T: Handle>(live: &'r BTreeMap<usize, Entry>, p: *const T, what: &str) -> Result<&'r Entry> {
    if p.is_null() {
        return Err(Fail::arg(format!("{what} is NULL; pass a {} from peftrt", T::KIND.name())));
    }
    match live.get(&(p as usize)) {
        Some(e) if e.kind == T::KIND => Ok(e),
        Some(e) => {
            Err(Fail::new(Status::InvalidHandle, format!("{what} is a {}, not a {}", e.kind.name(), T::KIND.name())))
        }
        None => Err(Fail::new(
            Status::InvalidHandle,
            format!("{what} is not a live {} (already freed, or never created by peftrt)", T::KIND.name()),
        )),
    }
}

/// The registry's object as a `T` (the kind was checked, so the downcast cannot fail).
fn object<T: Handle>(e: &Entry) -> Result<Arc<T>> {
    e.object.clone().downcast::<T>().map_err(|_| {
        Fail::new(Status::Internal, format!("internal error: a {} handle holds another type", T::KIND.name()))
    })
}

/// A reference to the live handle behind `p`, if it is one of kind `T`. The object stays
/// alive while the reference is held, even if the handle is freed meanwhile.
pub(crate) fn get<T: Handle>(p: *const T, what: &str) -> Result<Arc<T>> {
    object(check(&registry(), p, what)?)
}

/// Removes a live handle from the registry and returns the registry's reference (calls in
/// flight keep the object alive until they return). NULL gives `None`.
pub(crate) fn take<T: Handle>(p: *mut T, what: &str) -> Result<Option<Arc<T>>> {
    if p.is_null() {
        return Ok(None);
    }
    let mut live = registry();
    let obj = object::<T>(check(&live, p, what)?)?;
    live.remove(&(p as usize));
    Ok(Some(obj))
}

/// [`take`], unless a call holds the object: then `busy` and nothing is removed. Every call
/// takes its reference through [`get`] under the registry lock, so the count of references
/// seen here under that lock is exact: the registry's, ours, and one per call in flight.
pub(crate) fn take_unless_in_use<T: Handle>(
    p: *mut T,
    what: &str,
    busy: impl FnOnce() -> Fail,
) -> Result<Option<Arc<T>>> {
    if p.is_null() {
        return Ok(None);
    }
    let mut live = registry();
    let obj = object::<T>(check(&live, p, what)?)?;
    if Arc::strong_count(&obj) > 2 {
        return Err(busy());
    }
    live.remove(&(p as usize));
    Ok(Some(obj))
}
