//! The C ABI's text and token entry points (`peftrt_tokenize`, `peftrt_detokenize`,
//! `peftrt_chat_apply_template`, `peftrt_session_generate`) with arbitrary bytes, on the tiny
//! Llama fixture loaded once through `peftrt_model_load`. The C ABI catches panics at its
//! boundary, but libFuzzer's panic hook aborts first, so a panic inside is still a finding.
//!
//! The first byte chooses the entry point; the rest is its input (see each arm).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peftrt_ffi::model::{peftrt_model, peftrt_model_default_params, peftrt_model_load};
use peftrt_ffi::session::{
    peftrt_generation, peftrt_sampling_default_params, peftrt_session, peftrt_session_create,
    peftrt_session_default_params, peftrt_session_generate, peftrt_session_reset,
};
use peftrt_ffi::text::{peftrt_chat_apply_template, peftrt_chat_message, peftrt_detokenize, peftrt_tokenize};
use peftrt_ffi::{Status, BUFFER_ERROR};
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::OnceLock;

/// A handle, shared by every run of this process (libFuzzer calls the target from one thread).
struct Ptr<T>(*mut T);
// SAFETY: the handles are only used from libFuzzer's one fuzzing thread; the C ABI checks them.
unsafe impl<T> Send for Ptr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Ptr<T> {}

fn handles() -> &'static (Ptr<peftrt_model>, Ptr<peftrt_session>) {
    static H: OnceLock<(Ptr<peftrt_model>, Ptr<peftrt_session>)> = OnceLock::new();
    H.get_or_init(|| {
        let dir = CString::new(peftrt_fuzz::tiny_llama_dir().to_str().expect("a UTF-8 path")).unwrap();
        let mut mp = peftrt_model_default_params();
        mp.n_threads = 1;
        // SAFETY: a NUL-terminated path and valid params.
        let model = unsafe { peftrt_model_load(dir.as_ptr(), &mp) };
        assert!(!model.is_null(), "load the tiny-llama fixture through the C ABI");
        let mut sp = peftrt_session_default_params();
        sp.n_ctx = 64;
        sp.n_threads = 1;
        // SAFETY: a live model and valid params.
        let session = unsafe { peftrt_session_create(model, &sp) };
        assert!(!session.is_null(), "create a session on the tiny-llama fixture");
        (Ptr(model), Ptr(session))
    })
}

/// A C string of `bytes` up to the first NUL (any bytes, valid UTF-8 or not).
fn c_string(bytes: &[u8]) -> CString {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    CString::new(&bytes[..end]).unwrap()
}

/// Token ids: 4 bytes each, little-endian (any i32: negative and out-of-vocabulary ones too).
fn ids(bytes: &[u8]) -> Vec<i32> {
    bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

unsafe extern "C" fn on_text(text: *const c_char, len: usize, user: *mut c_void) -> c_int {
    // SAFETY: the C ABI passes `len` bytes plus a NUL; `user` is our `usize` counter.
    unsafe {
        assert_eq!(*text.add(len), 0, "streamed text is NUL-terminated");
        *user.cast::<usize>() += len;
    }
    0
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (model, session) = handles();
    let (model, session) = (model.0 as *const peftrt_model, session.0);
    match mode % 4 {
        // Text → tokens; the second byte sets the buffer size (0: ask for the size).
        0 => {
            let Some((&cap, text)) = rest.split_first() else { return };
            let text = c_string(text);
            let mut buf = vec![0i32; cap as usize];
            let tokenize = |buf: &mut [i32]| unsafe {
                // SAFETY: a NUL-terminated text and a buffer of `buf.len()` ids.
                peftrt_tokenize(model, text.as_ptr(), cap & 1 == 1, buf.as_mut_ptr(), buf.len() as i32)
            };
            let n = tokenize(&mut buf);
            if n >= 0 {
                assert!(n as usize <= buf.len());
                // SAFETY: a live model handle.
                let vocab = unsafe { &(*model).model }.config.vocab_size;
                assert!(buf[..n as usize].iter().all(|&t| t >= 0 && (t as usize) < vocab), "ids in the vocabulary");
            } else if n != BUFFER_ERROR {
                // A short buffer: -n ids are needed, and fit a buffer of that size.
                let need = n.unsigned_abs() as usize;
                assert!(need > buf.len(), "tokenize asked for {need} ids with {} given", buf.len());
                assert_eq!(tokenize(&mut vec![0; need]), need as i32);
            }
        }
        // Tokens → text; the second byte sets the buffer size, the third skip_special.
        1 => {
            let [cap, skip, ref tokens @ ..] = *rest else { return };
            let tokens = ids(tokens);
            let mut buf = vec![0 as c_char; cap as usize];
            // SAFETY: `tokens.len()` ids and a buffer of `cap` bytes.
            let n = unsafe {
                peftrt_detokenize(
                    model,
                    tokens.as_ptr(),
                    tokens.len() as i32,
                    skip & 1 == 1,
                    buf.as_mut_ptr(),
                    cap as i32,
                )
            };
            if n >= 0 {
                assert!((n as usize) < buf.len());
                assert_eq!(buf[n as usize], 0, "detokenized text is NUL-terminated");
            } else if n != BUFFER_ERROR {
                assert!(n.unsigned_abs() as usize > buf.len(), "detokenize asked for {n} with {} given", buf.len());
            }
        }
        // Chat messages: NUL-separated strings, alternately role and content.
        2 => {
            let parts: Vec<CString> = rest.split(|&b| b == 0).map(c_string).collect();
            let msgs: Vec<peftrt_chat_message> = parts
                .chunks(2)
                .filter(|p| p.len() == 2)
                .map(|p| peftrt_chat_message { role: p[0].as_ptr(), content: p[1].as_ptr() })
                .collect();
            let mut buf = vec![0 as c_char; 4096];
            // SAFETY: `msgs` point into `parts`, alive here; a buffer of 4096 bytes.
            let _ =
                unsafe { peftrt_chat_apply_template(model, msgs.as_ptr(), msgs.len(), true, buf.as_mut_ptr(), 4096) };
        }
        // Generation: 24 bytes of sampling parameters, then stop strings (NUL-separated, up to a
        // 0xff byte), then prompt token ids.
        _ => {
            if rest.len() < 24 {
                return;
            }
            let (p, rest) = rest.split_at(24);
            let f = |i: usize| f32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
            let mut sp = peftrt_sampling_default_params();
            sp.temperature = f(0);
            sp.top_k = i32::from(p[4]) - 8;
            sp.top_p = f(8);
            sp.min_p = f(12);
            sp.repetition_penalty = f(16);
            sp.repeat_last_n = i32::from(p[5]) - 8;
            sp.seed = u64::from(p[6]);
            // Few tokens: generating is the slow part.
            sp.max_tokens = i32::from(p[7] % 8) - 1;
            sp.ignore_eos = p[20];
            let (stops, prompt) = match rest.iter().position(|&b| b == 0xff) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (&[][..], rest),
            };
            let stops: Vec<CString> =
                if stops.is_empty() { vec![] } else { stops.split(|&b| b == 0).map(c_string).collect() };
            let stop_ptrs: Vec<*const c_char> = stops.iter().map(|s| s.as_ptr()).collect();
            sp.stop = stop_ptrs.as_ptr();
            sp.n_stop = stop_ptrs.len();
            let prompt = ids(prompt);
            let mut out = vec![0i32; 16];
            let mut g = peftrt_generation {
                struct_size: std::mem::size_of::<peftrt_generation>(),
                tokens: out.as_mut_ptr(),
                n_tokens_max: 16,
                n_tokens: 0,
                n_prompt_tokens: 0,
                stop: 0,
                prefill_ms: 0.0,
                decode_ms: 0.0,
            };
            let mut streamed = 0usize;
            assert_eq!(peftrt_session_reset(session), Status::Ok);
            // SAFETY: `prompt.len()` ids, valid params and result, a callback with our counter.
            let status = unsafe {
                peftrt_session_generate(
                    session,
                    prompt.as_ptr(),
                    prompt.len() as i32,
                    &sp,
                    Some(on_text),
                    (&mut streamed as *mut usize).cast(),
                    &mut g,
                )
            };
            if status == Status::Ok {
                assert!(g.n_tokens >= 0 && g.n_prompt_tokens == prompt.len() as i32);
            }
        }
    }
});
