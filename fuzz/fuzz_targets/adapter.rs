//! A PEFT adapter directory: `adapter_config.json` + `adapter_model.safetensors` →
//! `AdapterFile::open`, then `Adapter::bind` against the tiny Llama fixture model.
//!
//! Input: two bytes (little-endian) give the length of the JSON part, which is followed by the
//! safetensors part (`peftrt_fuzz::split2`; `fuzz/seed.sh` writes the fixture adapters so).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peftrt::adapter::{AdapterFile, AdapterOptions};
use peftrt::Adapter;

fuzz_target!(|data: &[u8]| {
    let model = peftrt_fuzz::tiny_llama();
    let (json, tensors) = peftrt_fuzz::split2(data);
    let dir = peftrt_fuzz::scratch_subdir("adapter");
    peftrt_fuzz::write(&dir, "adapter_config.json", json);
    peftrt_fuzz::write(&dir, "adapter_model.safetensors", tensors);
    let Ok(file) = AdapterFile::open(&dir) else { return };
    let _ = file.n_params();
    for module in file.modules.keys() {
        let _ = file.scale_for(module);
    }
    for allow_base_mismatch in [false, true] {
        // Binding consumes the file: open it again for the second pass.
        let Ok(file) = AdapterFile::open(&dir) else { return };
        let opts = AdapterOptions { allow_base_mismatch, ..Default::default() };
        if let Ok(a) = Adapter::bind(file, model, &opts) {
            assert!(a.is_for(model));
            for lin in model.linears() {
                if let Some(lw) = a.for_layer(lin) {
                    let _ = lw.delta();
                }
            }
        }
    }
});
