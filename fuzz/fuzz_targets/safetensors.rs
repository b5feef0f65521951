//! The safetensors header and tensor-table checks of `peftrt::weights` (any bytes as
//! `model.safetensors`/`adapter_model.safetensors`): every input is `Ok` or `Err`, and every
//! tensor of an `Ok` store is readable as the loaders read it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peftrt::weights::{DType, WeightStore};

fuzz_target!(|data: &[u8]| {
    let path = peftrt_fuzz::write(peftrt_fuzz::scratch(), "fuzz.safetensors", data);
    // SAFETY: the file is ours and is not changed while the store lives.
    let Ok(store) = (unsafe { WeightStore::open_file(&path) }) else { return };
    let _ = store.metadata().len();
    for t in store.tensors() {
        let bytes = t.bytes();
        assert_eq!(bytes.len(), t.numel() * t.dtype.size(), "{}: byte length", t.name);
        match t.expect_float() {
            Ok(()) => {
                assert_ne!(t.dtype, DType::U8);
                // Elements through the typed view, as the kernels read them.
                let v = t.to_f32_vec();
                assert_eq!(v.len(), t.numel());
            }
            Err(_) => assert_eq!(t.dtype, DType::U8),
        }
        if t.shape.len() == 2 {
            let _ = t.matrix(t.shape[0], t.shape[1]);
        }
        let _ = store.get(&t.name).expect("a listed tensor is found by name");
    }
});
