//! `peftrt_session`: evaluation, sampling, generation and cancelling.
//!
//! The session's mutable state sits behind a mutex that calls only ever `try_lock`: a session
//! is used by one thread at a time, and a second thread gets `PEFTRT_ERR_BUSY` instead of a
//! data race. The cancel flag lives outside it, so `peftrt_session_cancel` works while
//! another thread holds the session; the runtime checks the flag between layers.

use crate::adapter::peftrt_adapter;
use crate::handle::{self, Handle, Kind};
use crate::model::peftrt_model;
use crate::{
    c_slice, c_str, count, fill_array, guard, guard_buffer, guard_status, non_null, read_params, token_ids, write_out,
    Fail, Result, Status,
};
use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, TryLockError};

/// More threads than this per session is a mistake, not a configuration.
const MAX_THREADS: usize = 1024;

/// The opaque `peftrt_session`.
pub struct peftrt_session {
    pub(crate) model: Arc<rt::Model>,
    cancel: Arc<AtomicBool>,
    state: Mutex<State>,
}

pub(crate) struct State {
    pub(crate) session: rt::Session,
    /// The sampler of `peftrt_session_sample` (with its own copy of the constraint, advanced
    /// by every token it samples).
    pub(crate) sampler: rt::Sampler,
    /// The constraint as compiled, from its start: each `peftrt_session_generate` gets a copy.
    pub(crate) constraint: Option<rt::constraint::Constraint>,
    /// Whether `session.logits()` belongs to the last cached token.
    logits_valid: bool,
}

impl Handle for peftrt_session {
    const KIND: Kind = Kind::Session;
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct peftrt_session_params {
    pub struct_size: usize,
    pub n_ctx: i32,
    pub n_batch: i32,
    pub n_threads: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct peftrt_sampling_params {
    pub struct_size: usize,
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub repeat_last_n: i32,
    pub seed: u64,
    pub max_tokens: i32,
    pub stop: *const *const c_char,
    pub n_stop: usize,
    /// C `bool`, read as a byte.
    pub ignore_eos: u8,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct peftrt_generation {
    pub struct_size: usize,
    pub tokens: *mut i32,
    pub n_tokens_max: i32,
    pub n_tokens: i32,
    pub n_prompt_tokens: i32,
    /// `peftrt_stop_reason`
    pub stop: i32,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

/// `peftrt_text_callback`
pub type TextCallback = Option<unsafe extern "C" fn(*const c_char, usize, *mut c_void) -> c_int>;

/// Runs `f` on the live session behind `p` and its state, unless another call is using it.
///
/// The call holds a reference to the session (not a borrow) from the registry check to its
/// end, so a concurrent `peftrt_session_free` either sees it in use (BUSY) or lands before
/// the check (this call then gets INVALID_HANDLE): never a free under the call.
pub(crate) fn with_session<R>(
    p: *mut peftrt_session,
    f: impl FnOnce(&peftrt_session, &mut State) -> Result<R>,
) -> Result<R> {
    let s = handle::get(p as *const peftrt_session, "session")?;
    let mut st = match s.state.try_lock() {
        Ok(g) => g,
        Err(TryLockError::WouldBlock) => return Err(busy()),
        Err(TryLockError::Poisoned(_)) => {
            return Err(Fail::new(
                Status::Internal,
                "the session is unusable after an internal error in an earlier call; free it and create a new one",
            ))
        }
    };
    f(&s, &mut st)
}

fn busy() -> Fail {
    Fail::new(
        Status::Busy,
        "the session is in use by another call (another thread, or the text callback of this \
         thread's generation); a session is used by one thread at a time (create one per thread)",
    )
}

/// The runtime's sampling parameters from C's.
///
/// # Safety
/// `p.stop` is NULL or has `p.n_stop` NUL-terminated strings.
pub(crate) unsafe fn sampling(p: &peftrt_sampling_params, n_ctx: usize) -> Result<rt::SamplingParams> {
    // SAFETY: forwarded from our caller.
    let stops = unsafe { c_slice(p.stop, p.n_stop, "peftrt_sampling_params.stop") }?;
    let stop = stops
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            // SAFETY: forwarded from our caller.
            let s = unsafe { c_str(s, &format!("peftrt_sampling_params.stop[{i}]")) }?;
            if s.is_empty() {
                return Err(Fail::arg(format!("peftrt_sampling_params.stop[{i}] is empty; stop strings need text")));
            }
            Ok(s.to_string())
        })
        .collect::<Result<Vec<_>>>()?;
    let params = rt::SamplingParams {
        temperature: p.temperature,
        top_k: count(p.top_k, "peftrt_sampling_params.top_k")?,
        top_p: p.top_p,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty,
        repeat_last_n: count(p.repeat_last_n, "peftrt_sampling_params.repeat_last_n")?,
        seed: p.seed,
        max_tokens: match count(p.max_tokens, "peftrt_sampling_params.max_tokens")? {
            0 => n_ctx,
            n => n,
        },
        stop,
        ignore_eos: p.ignore_eos != 0,
    };
    params.validate()?;
    Ok(params)
}

/// Token ids from C, checked for range. Room in the context is the runtime's check
/// (`rt::Error::ContextFull`, mapped to `PEFTRT_ERR_CONTEXT_FULL`).
///
/// # Safety
/// `tokens` is NULL or has `n` ids.
unsafe fn input_tokens(st: &State, tokens: *const i32, n: i32, what: &str) -> Result<Vec<u32>> {
    let n = count(n, &format!("the number of {what}"))?;
    if n == 0 {
        return Err(Fail::arg(format!("no {what}: pass at least one token")));
    }
    // SAFETY: forwarded from our caller.
    token_ids(unsafe { c_slice(tokens, n, what) }?, st.session.model().config.vocab_size)
}

#[no_mangle]
pub extern "C" fn peftrt_session_default_params() -> peftrt_session_params {
    peftrt_session_params {
        struct_size: std::mem::size_of::<peftrt_session_params>(),
        n_ctx: 0,
        n_batch: 0,
        n_threads: 0,
    }
}

#[no_mangle]
pub extern "C" fn peftrt_sampling_default_params() -> peftrt_sampling_params {
    let d = rt::SamplingParams::default();
    peftrt_sampling_params {
        struct_size: std::mem::size_of::<peftrt_sampling_params>(),
        temperature: d.temperature,
        top_k: d.top_k as i32,
        top_p: d.top_p,
        min_p: d.min_p,
        repetition_penalty: d.repetition_penalty,
        repeat_last_n: d.repeat_last_n as i32,
        seed: d.seed,
        max_tokens: d.max_tokens as i32,
        stop: std::ptr::null(),
        n_stop: 0,
        ignore_eos: u8::from(d.ignore_eos),
    }
}

/// # Safety
/// `params` is NULL or a `peftrt_session_params`.
#[no_mangle]
pub unsafe extern "C" fn peftrt_session_create(
    model: *const peftrt_model,
    params: *const peftrt_session_params,
) -> *mut peftrt_session {
    guard(
        |_| std::ptr::null_mut(),
        || {
            let m = handle::get(model, "model")?;
            let size = std::mem::size_of::<peftrt_session_params>();
            // SAFETY: forwarded from our caller.
            let p = unsafe { read_params(params, peftrt_session_default_params(), size, "peftrt_session_params") }?;
            let n_ctx_train = m.model.config.max_position_embeddings;
            let n_ctx = count(p.n_ctx, "peftrt_session_params.n_ctx")?;
            if n_ctx > n_ctx_train {
                return Err(Fail::arg(format!(
                    "peftrt_session_params.n_ctx is {n_ctx}, beyond the {n_ctx_train} tokens this model was trained for"
                )));
            }
            let n_threads = match count(p.n_threads, "peftrt_session_params.n_threads")? {
                0 => m.n_threads,
                n => n,
            };
            if n_threads > MAX_THREADS {
                return Err(Fail::arg(format!("{n_threads} threads requested; at most {MAX_THREADS}")));
            }
            let opts =
                rt::SessionOptions { n_ctx, n_batch: count(p.n_batch, "peftrt_session_params.n_batch")?, n_threads };
            let mut session = rt::Session::new(m.model.clone(), &opts)?;
            let cancel = Arc::new(AtomicBool::new(false));
            session.set_cancel_flag(Some(cancel.clone()));
            let sampler = rt::Sampler::new(rt::SamplingParams::default(), m.model.config.vocab_size)?;
            let state = State { session, sampler, constraint: None, logits_valid: false };
            Ok(handle::register(peftrt_session { model: m.model.clone(), cancel, state: Mutex::new(state) }))
        },
    )
}

/// Frees the session unless a call holds it (then BUSY, nothing freed). A call that starts
/// after the free gets INVALID_HANDLE.
#[no_mangle]
pub extern "C" fn peftrt_session_free(session: *mut peftrt_session) -> Status {
    guard_status(|| {
        let s = handle::take_unless_in_use(session, "session", || {
            Fail::new(
                Status::Busy,
                "the session is in use by another call (another thread, or the text callback of the \
                 generation running on it); free it after that call returns",
            )
        })?;
        // The registry's reference, now the only one: the session, its cache and its threads
        // go here.
        drop(s);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn peftrt_session_reset(session: *mut peftrt_session) -> Status {
    guard_status(|| {
        with_session(session, |_, st| {
            st.session.reset();
            st.logits_valid = false;
            st.sampler.restart_constraint()?;
            Ok(())
        })
    })
}

/// # Safety
/// `adapters` is NULL or has `n` handles; `scales` is NULL or has `n` floats.
#[no_mangle]
pub unsafe extern "C" fn peftrt_session_set_adapters(
    session: *mut peftrt_session,
    adapters: *const *mut peftrt_adapter,
    scales: *const f32,
    n: usize,
) -> Status {
    guard_status(|| {
        with_session(session, |s, st| {
            // SAFETY: forwarded from our caller.
            let handles = unsafe { c_slice(adapters, n, "adapters") }?;
            let scales: Vec<f32> = if scales.is_null() {
                vec![1.0; n]
            } else {
                // SAFETY: forwarded from our caller.
                unsafe { c_slice(scales, n, "scales") }?.to_vec()
            };
            let mut active = Vec::with_capacity(n);
            for (i, (&h, &scale)) in handles.iter().zip(&scales).enumerate() {
                let a = handle::get(h as *const peftrt_adapter, &format!("adapters[{i}]"))?;
                if !Arc::ptr_eq(&a.model, &s.model) {
                    return Err(Fail::new(
                        Status::AdapterMismatch,
                        format!(
                            "adapters[{i}] ({}) was loaded for another model handle; load it with \
                             peftrt_adapter_load on this session's model",
                            a.adapter.name
                        ),
                    ));
                }
                if !scale.is_finite() {
                    return Err(Fail::arg(format!("scales[{i}] is {scale}; scales must be finite numbers")));
                }
                active.push((a.adapter.clone(), scale));
            }
            st.session.set_adapters(&active)?;
            Ok(())
        })
    })
}

/// # Safety
/// `tokens` is NULL or has `n_tokens` ids.
#[no_mangle]
pub unsafe extern "C" fn peftrt_session_eval(
    session: *mut peftrt_session,
    tokens: *const i32,
    n_tokens: i32,
) -> Status {
    guard_status(|| {
        with_session(session, |s, st| {
            s.cancel.store(false, Ordering::SeqCst);
            // SAFETY: forwarded from our caller.
            let ids = unsafe { input_tokens(st, tokens, n_tokens, "tokens") }?;
            st.logits_valid = false;
            st.session.eval(&ids)?;
            st.logits_valid = true;
            Ok(())
        })
    })
}

/// # Safety
/// `n_vocab` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn peftrt_session_logits(session: *mut peftrt_session, n_vocab: *mut i32) -> *const f32 {
    guard(
        |_| std::ptr::null(),
        || {
            with_session(session, |_, st| {
                if !st.logits_valid {
                    return Err(Fail::arg(
                        "no logits: nothing was evaluated since the session was created or reset, or the last \
                         evaluation failed or was cancelled; call peftrt_session_eval first",
                    ));
                }
                let logits = st.session.logits();
                if !n_vocab.is_null() {
                    // SAFETY: writable by contract.
                    unsafe { *n_vocab = logits.len() as i32 };
                }
                // The buffer belongs to the session and stays put until it is evaluated again
                // (or freed: the header makes the pointer invalid then).
                Ok(logits.as_ptr())
            })
        },
    )
}

/// # Safety
/// `tokens` is NULL or has `n_tokens_max` writable ids.
#[no_mangle]
pub unsafe extern "C" fn peftrt_session_tokens(
    session: *mut peftrt_session,
    tokens: *mut i32,
    n_tokens_max: i32,
) -> i32 {
    guard_buffer(|| {
        with_session(session, |_, st| {
            let ids: Vec<i32> = st.session.tokens().iter().map(|&t| t as i32).collect();
            // SAFETY: forwarded from our caller.
            unsafe { fill_array(&ids, tokens, n_tokens_max, "n_tokens_max") }
        })
    })
}

/// # Safety
/// `params` is NULL or a `peftrt_sampling_params` whose stop strings are valid.
#[no_mangle]
pub unsafe extern "C" fn peftrt_session_set_sampling(
    session: *mut peftrt_session,
    params: *const peftrt_sampling_params,
) -> Status {
    guard_status(|| {
        with_session(session, |s, st| {
            let size = std::mem::size_of::<peftrt_sampling_params>();
            // SAFETY: forwarded from our caller.
            let p = unsafe { read_params(params, peftrt_sampling_default_params(), size, "peftrt_sampling_params") }?;
            // SAFETY: forwarded from our caller.
            let p = unsafe { sampling(&p, st.session.n_ctx()) }?;
            let mut sampler = rt::Sampler::new(p, s.model.config.vocab_size)?;
            sampler.continue_constraint(st.sampler.take_constraint());
            st.sampler = sampler;
            Ok(())
        })
    })
}

/// # Safety
/// `token` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn peftrt_session_sample(session: *mut peftrt_session, token: *mut i32) -> Status {
    guard_status(|| {
        non_null(token, "token")?;
        with_session(session, |_, st| {
            if !st.logits_valid {
                return Err(Fail::arg("nothing to sample from: call peftrt_session_eval first"));
            }
            let State { session, sampler, .. } = st;
            let t = sampler.next_token(session.logits(), session.tokens())?;
            // SAFETY: non-null and writable by contract.
            unsafe { *token = t as i32 };
            Ok(())
        })
    })
}

/// # Safety
/// `prompt` has `n_prompt` ids; `params` is NULL or valid; `on_text` is NULL or a function
/// that may be called with `user_data`; `result` is NULL or a `peftrt_generation` whose
/// `tokens` has `n_tokens_max` writable ids.
#[no_mangle]
pub unsafe extern "C" fn peftrt_session_generate(
    session: *mut peftrt_session,
    prompt: *const i32,
    n_prompt: i32,
    params: *const peftrt_sampling_params,
    on_text: TextCallback,
    user_data: *mut c_void,
    result: *mut peftrt_generation,
) -> Status {
    guard_status(|| {
        with_session(session, |s, st| {
            s.cancel.store(false, Ordering::SeqCst);
            let gen_size = std::mem::size_of::<peftrt_generation>();
            let out = if result.is_null() {
                None
            } else {
                // SAFETY: forwarded from our caller (the in-fields are read).
                let r = unsafe { read_params(result, peftrt_generation::empty(), gen_size, "peftrt_generation") }?;
                count(r.n_tokens_max, "peftrt_generation.n_tokens_max")?;
                if r.n_tokens_max > 0 {
                    non_null(r.tokens, "peftrt_generation.tokens")?;
                }
                Some(r)
            };
            // SAFETY: forwarded from our caller.
            let ids = unsafe { input_tokens(st, prompt, n_prompt, "prompt tokens") }?;
            let size = std::mem::size_of::<peftrt_sampling_params>();
            // SAFETY: forwarded from our caller.
            let p = unsafe { read_params(params, peftrt_sampling_default_params(), size, "peftrt_sampling_params") }?;
            // SAFETY: forwarded from our caller.
            let p = unsafe { sampling(&p, st.session.n_ctx()) }?;
            let mut sampler = rt::Sampler::new(p, s.model.config.vocab_size)?;
            sampler.set_constraint(st.constraint.clone())?;
            let mut piece: Vec<u8> = Vec::new();
            st.logits_valid = false;
            let g = rt::generate(&mut st.session, &ids, &mut sampler, |text| match on_text {
                None => true,
                Some(cb) => {
                    piece.clear();
                    piece.extend_from_slice(text.as_bytes());
                    piece.push(0);
                    // SAFETY: the caller's callback with the caller's data; the text is
                    // NUL-terminated and lives until the callback returns.
                    unsafe { cb(piece.as_ptr().cast(), text.len(), user_data) == 0 }
                }
            })?;
            st.logits_valid = true;
            if let Some(mut r) = out {
                let written = g.tokens.len().min(r.n_tokens_max as usize);
                for (i, &t) in g.tokens[..written].iter().enumerate() {
                    // SAFETY: `tokens` has `n_tokens_max` ≥ `written` writable ids (checked non-null).
                    unsafe { *r.tokens.add(i) = t as i32 };
                }
                r.n_tokens = g.tokens.len() as i32;
                r.n_prompt_tokens = g.prompt_tokens as i32;
                r.stop = stop_reason(g.stop);
                r.prefill_ms = g.prefill_time.as_secs_f64() * 1e3;
                r.decode_ms = g.decode_time.as_secs_f64() * 1e3;
                // SAFETY: forwarded from our caller.
                unsafe { write_out(result, &r, gen_size, "peftrt_generation") }?;
            }
            Ok(())
        })
    })
}

/// `peftrt_stop_reason` of the runtime's reason.
pub(crate) fn stop_reason(stop: rt::StopReason) -> i32 {
    match stop {
        rt::StopReason::Eos => 0,
        rt::StopReason::MaxTokens => 1,
        rt::StopReason::StopString => 2,
        rt::StopReason::ContextFull => 3,
        rt::StopReason::Cancelled => 4,
    }
}

impl peftrt_generation {
    fn empty() -> Self {
        peftrt_generation {
            struct_size: std::mem::size_of::<Self>(),
            tokens: std::ptr::null_mut(),
            n_tokens_max: 0,
            n_tokens: 0,
            n_prompt_tokens: 0,
            stop: 0,
            prefill_ms: 0.0,
            decode_ms: 0.0,
        }
    }
}

/// Sets the cancel flag of a live session; works while another thread holds the session's
/// state (only the atomic flag is touched, through this call's own reference).
#[no_mangle]
pub extern "C" fn peftrt_session_cancel(session: *mut peftrt_session) -> Status {
    guard_status(|| {
        handle::get(session as *const peftrt_session, "session")?.cancel.store(true, Ordering::SeqCst);
        Ok(())
    })
}
