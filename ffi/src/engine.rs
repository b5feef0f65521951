//! `peftrt_engine`: the batching engine (`rt::engine`) for C — many requests at once on one
//! model, each with its own adapters, sampling, constraint and callbacks.
//!
//! The engine sits behind a mutex that calls only `try_lock` (one thread at a time; another
//! gets `PEFTRT_ERR_BUSY`, as with sessions). Cancelling is the exception: any thread may ask,
//! at any time (a callback too); the ids to cancel wait in a list of their own, applied at the
//! start of the next step, and the ids in progress are tracked beside it so that an unknown id
//! is refused at once.

use crate::adapter::peftrt_adapter;
use crate::constraint::constraint_spec;
use crate::handle::{self, Handle, Kind};
use crate::model::peftrt_model;
use crate::session::{sampling, stop_reason, TextCallback};
use crate::text::{chat_messages, peftrt_chat_message};
use crate::{c_slice, count, guard, guard_status, non_null, read_params, token_ids, Fail, Result, Status};
use std::collections::{BTreeSet, HashMap};
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

/// The opaque `peftrt_engine`.
pub struct peftrt_engine {
    model: Arc<rt::Model>,
    state: Mutex<State>,
    /// Requests in progress (submitted, not yet reported done): what cancel may name.
    active: Mutex<BTreeSet<u64>>,
    /// Requests to cancel at the next step.
    cancels: Mutex<Vec<u64>>,
}

struct State {
    engine: rt::Engine,
    /// Each request's callbacks and user data, until it is done.
    callbacks: HashMap<u64, Callbacks>,
}

/// A request's C callbacks and their user data.
#[derive(Clone, Copy)]
struct Callbacks {
    on_text: TextCallback,
    on_done: DoneCallback,
    user_data: *mut c_void,
}

// SAFETY: the pointers are the caller's, passed back to the caller's callbacks on whichever
// thread steps the engine; the header tells the caller so.
unsafe impl Send for Callbacks {}

impl Handle for peftrt_engine {
    const KIND: Kind = Kind::Engine;
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct peftrt_engine_params {
    pub struct_size: usize,
    pub max_sequences: i32,
    pub n_ctx: i32,
    pub n_batch: i32,
    pub step_tokens: i32,
    pub n_threads: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct peftrt_request {
    pub struct_size: usize,
    pub prompt: *const i32,
    pub n_prompt: i32,
    pub messages: *const peftrt_chat_message,
    pub n_messages: usize,
    pub adapters: *const *mut peftrt_adapter,
    pub scales: *const f32,
    pub n_adapters: usize,
    pub sampling: *const crate::session::peftrt_sampling_params,
    /// `peftrt_constraint_kind`; -1 (PEFTRT_CONSTRAINT_NONE) = none
    pub constraint_kind: c_int,
    pub constraint: *const c_char,
    pub constraint_len: usize,
    pub on_text: TextCallback,
    pub on_done: DoneCallback,
    pub user_data: *mut c_void,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct peftrt_request_result {
    pub struct_size: usize,
    pub request: u64,
    pub status: Status,
    /// `peftrt_stop_reason`
    pub stop: i32,
    pub tokens: *const i32,
    pub n_tokens: i32,
    pub n_prompt_tokens: i32,
    pub first_token_ms: f64,
    pub decode_ms: f64,
    pub error: *const c_char,
}

/// `peftrt_request_done_callback`
pub type DoneCallback = Option<unsafe extern "C" fn(*const peftrt_request_result, *mut c_void)>;

#[no_mangle]
pub extern "C" fn peftrt_engine_default_params() -> peftrt_engine_params {
    peftrt_engine_params {
        struct_size: std::mem::size_of::<peftrt_engine_params>(),
        max_sequences: 0,
        n_ctx: 0,
        n_batch: 0,
        step_tokens: 0,
        n_threads: 0,
    }
}

#[no_mangle]
pub extern "C" fn peftrt_request_default() -> peftrt_request {
    peftrt_request {
        struct_size: std::mem::size_of::<peftrt_request>(),
        prompt: std::ptr::null(),
        n_prompt: 0,
        messages: std::ptr::null(),
        n_messages: 0,
        adapters: std::ptr::null(),
        scales: std::ptr::null(),
        n_adapters: 0,
        sampling: std::ptr::null(),
        constraint_kind: -1,
        constraint: std::ptr::null(),
        constraint_len: 0,
        on_text: None,
        on_done: None,
        user_data: std::ptr::null_mut(),
    }
}

/// # Safety
/// `params` is NULL or a valid `peftrt_engine_params`.
#[no_mangle]
pub unsafe extern "C" fn peftrt_engine_create(
    model: *const peftrt_model,
    params: *const peftrt_engine_params,
) -> *mut peftrt_engine {
    guard(
        |_| std::ptr::null_mut(),
        || {
            let m = handle::get(model, "model")?;
            let size = std::mem::size_of::<peftrt_engine_params>();
            // SAFETY: forwarded from our caller.
            let p = unsafe { read_params(params, peftrt_engine_default_params(), size, "peftrt_engine_params") }?;
            let n_ctx_train = m.model.config.max_position_embeddings;
            let n_ctx = count(p.n_ctx, "peftrt_engine_params.n_ctx")?;
            if n_ctx > n_ctx_train {
                return Err(Fail::arg(format!(
                    "peftrt_engine_params.n_ctx is {n_ctx}, beyond the {n_ctx_train} tokens this model was trained for"
                )));
            }
            let opts = rt::EngineOptions {
                max_sequences: count(p.max_sequences, "peftrt_engine_params.max_sequences")?,
                n_ctx,
                n_batch: count(p.n_batch, "peftrt_engine_params.n_batch")?,
                step_tokens: count(p.step_tokens, "peftrt_engine_params.step_tokens")?,
                n_threads: match count(p.n_threads, "peftrt_engine_params.n_threads")? {
                    0 => m.n_threads,
                    n => n,
                },
            };
            let engine = rt::Engine::new(m.model.clone(), &opts)?;
            let state = Mutex::new(State { engine, callbacks: HashMap::new() });
            let e = peftrt_engine {
                model: m.model.clone(),
                state,
                active: Mutex::new(BTreeSet::new()),
                cancels: Mutex::new(Vec::new()),
            };
            Ok(handle::register(e))
        },
    )
}

#[no_mangle]
pub extern "C" fn peftrt_engine_free(engine: *mut peftrt_engine) -> Status {
    guard_status(|| {
        let e = handle::take_unless_in_use(engine, "engine", || {
            Fail::new(
                Status::Busy,
                "the engine is in use by another call (another thread, or a callback of the step running \
                 on it); free it after that call returns",
            )
        })?;
        drop(e);
        Ok(())
    })
}

/// A lock that a poisoned mutex (a panic in a callback's thread) does not make unusable: the
/// sets it guards stay consistent (single inserts and removes).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on the live engine behind `p` and its state, unless another call is using it.
fn with_engine<R>(p: *mut peftrt_engine, f: impl FnOnce(&peftrt_engine, &mut State) -> Result<R>) -> Result<R> {
    let e = handle::get(p as *const peftrt_engine, "engine")?;
    let mut st = match e.state.try_lock() {
        Ok(g) => g,
        Err(TryLockError::WouldBlock) => {
            return Err(Fail::new(
                Status::Busy,
                "the engine is in use by another call (another thread, or a callback of this thread's step); \
                 an engine is used by one thread at a time (peftrt_engine_cancel excepted)",
            ))
        }
        Err(TryLockError::Poisoned(_)) => {
            return Err(Fail::new(
                Status::Internal,
                "the engine is unusable after an internal error in an earlier call; free it and create a new one",
            ))
        }
    };
    f(&e, &mut st)
}

/// # Safety
/// `request` is a valid `peftrt_request` whose pointers hold what their counts say;
/// `request_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn peftrt_engine_submit(
    engine: *mut peftrt_engine,
    request: *const peftrt_request,
    request_out: *mut u64,
) -> Status {
    guard_status(|| {
        non_null(request, "request")?;
        let size = std::mem::size_of::<peftrt_request>();
        // SAFETY: forwarded from our caller.
        let r = unsafe { read_params(request, peftrt_request_default(), size, "peftrt_request") }?;
        with_engine(engine, |e, st| {
            let model = &e.model;
            // SAFETY (this block): the pointers and counts are the caller's, as documented.
            let prompt = unsafe {
                match (r.prompt.is_null(), r.messages.is_null()) {
                    (false, true) => {
                        let n = count(r.n_prompt, "peftrt_request.n_prompt")?;
                        token_ids(c_slice(r.prompt, n, "peftrt_request.prompt")?, model.config.vocab_size)?
                    }
                    (true, false) => {
                        let msgs = chat_messages(r.messages, r.n_messages, "peftrt_request.messages")?;
                        let tok = model.tokenizer()?;
                        tok.encode(&tok.apply_chat_template(&msgs, true)?, false)?
                    }
                    _ => {
                        return Err(Fail::arg(
                            "peftrt_request: give the prompt as tokens (prompt, n_prompt) or as chat messages \
                             (messages, n_messages), one of the two",
                        ))
                    }
                }
            };
            // SAFETY: forwarded from our caller.
            let handles = unsafe { c_slice(r.adapters, r.n_adapters, "peftrt_request.adapters") }?;
            // SAFETY: forwarded from our caller (NULL = all 1).
            let scales = if r.scales.is_null() {
                vec![1.0; handles.len()]
            } else {
                unsafe { c_slice(r.scales, r.n_adapters, "peftrt_request.scales") }?.to_vec()
            };
            let mut adapters = Vec::with_capacity(handles.len());
            for (i, (&h, &s)) in handles.iter().zip(&scales).enumerate() {
                let a = handle::get(h as *const peftrt_adapter, &format!("peftrt_request.adapters[{i}]"))?;
                adapters.push((a.adapter.clone(), s));
            }
            let size = std::mem::size_of::<crate::session::peftrt_sampling_params>();
            let defaults = crate::session::peftrt_sampling_default_params();
            // SAFETY: forwarded from our caller.
            let p = unsafe { read_params(r.sampling, defaults, size, "peftrt_request.sampling") }?;
            // SAFETY: forwarded from our caller.
            let params = unsafe { sampling(&p, st.engine.n_ctx()) }?;
            let constraint = match r.constraint_kind {
                -1 => None,
                kind => {
                    // SAFETY: forwarded from our caller.
                    let spec = unsafe { constraint_spec(kind, r.constraint, r.constraint_len) }?;
                    Some(rt::constraint::Constraint::new(model, &spec)?)
                }
            };
            let id = st.engine.submit(rt::Request { prompt, adapters, params, constraint })?;
            st.callbacks.insert(id, Callbacks { on_text: r.on_text, on_done: r.on_done, user_data: r.user_data });
            lock(&e.active).insert(id);
            if !request_out.is_null() {
                // SAFETY: the caller's writable id.
                unsafe { *request_out = id };
            }
            Ok(())
        })
    })
}

/// # Safety
/// `active_out` is NULL or writable; the callbacks of the requests are callable.
#[no_mangle]
pub unsafe extern "C" fn peftrt_engine_step(engine: *mut peftrt_engine, active_out: *mut i32) -> Status {
    guard_status(|| {
        with_engine(engine, |e, st| {
            let n = step(e, st);
            if !active_out.is_null() {
                // SAFETY: the caller's writable count.
                unsafe { *active_out = n as i32 };
            }
            Ok(())
        })
    })
}

/// # Safety
/// The callbacks of the requests are callable.
#[no_mangle]
pub unsafe extern "C" fn peftrt_engine_run(engine: *mut peftrt_engine) -> Status {
    guard_status(|| {
        with_engine(engine, |e, st| {
            while step(e, st) > 0 {}
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn peftrt_engine_cancel(engine: *mut peftrt_engine, request: u64) -> Status {
    guard_status(|| {
        let e = handle::get(engine as *const peftrt_engine, "engine")?;
        if !lock(&e.active).contains(&request) {
            return Err(Fail::arg(format!(
                "request {request} is not in progress on this engine (finished already, or never submitted)"
            )));
        }
        lock(&e.cancels).push(request);
        Ok(())
    })
}

/// One engine step with the C callbacks; the number of requests still in progress.
fn step(e: &peftrt_engine, st: &mut State) -> usize {
    for id in std::mem::take(&mut *lock(&e.cancels)) {
        // A request may have ended since it was asked: nothing to do then.
        let _ = st.engine.cancel(id);
    }
    let State { engine, callbacks } = st;
    let mut piece: Vec<u8> = Vec::new();
    let mut tokens: Vec<i32> = Vec::new();
    engine.step(|ev| match ev {
        rt::engine::Event::Text { id, text } => match callbacks.get(&id) {
            Some(Callbacks { on_text: Some(cb), user_data, .. }) => {
                piece.clear();
                piece.extend_from_slice(text.as_bytes());
                piece.push(0);
                // SAFETY: the caller's callback with the caller's data; the text is
                // NUL-terminated and lives until the callback returns.
                unsafe { cb(piece.as_ptr().cast(), text.len(), *user_data) == 0 }
            }
            _ => true,
        },
        rt::engine::Event::Logits { .. } => true,
        rt::engine::Event::Done { id, result } => {
            lock(&e.active).remove(&id);
            let Some(cb) = callbacks.remove(&id) else { return true };
            let mut r = peftrt_request_result {
                struct_size: std::mem::size_of::<peftrt_request_result>(),
                request: id,
                status: Status::Ok,
                stop: 0,
                tokens: std::ptr::null(),
                n_tokens: 0,
                n_prompt_tokens: 0,
                first_token_ms: 0.0,
                decode_ms: 0.0,
                error: c"".as_ptr(),
            };
            let message;
            match result {
                Ok(g) => {
                    tokens.clear();
                    tokens.extend(g.tokens.iter().map(|&t| t as i32));
                    r.stop = stop_reason(g.stop);
                    r.tokens = tokens.as_ptr();
                    r.n_tokens = tokens.len() as i32;
                    r.n_prompt_tokens = g.prompt_tokens as i32;
                    r.first_token_ms = g.prefill_time.as_secs_f64() * 1e3;
                    r.decode_ms = g.decode_time.as_secs_f64() * 1e3;
                }
                Err(err) => {
                    let f = Fail::from(err);
                    r.status = f.status;
                    message = CString::new(f.msg.replace('\0', " ")).unwrap_or_default();
                    r.error = message.as_ptr();
                }
            }
            if let Some(done) = cb.on_done {
                // SAFETY: the caller's callback with the caller's data; `r` and what it points
                // to live until the callback returns.
                unsafe { done(&r, cb.user_data) };
            }
            true
        }
    })
}
