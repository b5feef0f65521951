//! The GGUF reader (`peftrt::gguf::GgufFile`: header, metadata, tensor infos, tensor data) and
//! each ggml type's block decoding (`peftrt::gguf::quants::dequantize`).
//!
//! The first byte chooses: even, the rest is a GGUF file, parsed, described, its typed keys and
//! vocabulary read and every tensor dequantised; odd, the second byte is a ggml type id and the
//! rest is blocks of that type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peftrt::gguf::quants::{dequantize, GgmlType};
use peftrt::gguf::GgufFile;

/// Keys the importer reads, with the typed accessors it reads them through.
const KEYS: [&str; 8] = [
    "general.architecture",
    "llama.block_count",
    "llama.context_length",
    "llama.embedding_length",
    "llama.attention.head_count",
    "llama.rope.freq_base",
    "tokenizer.ggml.tokens",
    "tokenizer.chat_template",
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 1 {
        blocks(rest);
    } else {
        file(rest);
    }
});

fn file(bytes: &[u8]) {
    let Ok(g) = GgufFile::from_bytes("fuzz.gguf", bytes.to_vec()) else { return };
    let _ = g.describe();
    let _ = g.architecture();
    for key in KEYS {
        let _ = g.get_u32(key);
        let _ = g.get_u64(key);
        let _ = g.get_f32(key);
        let _ = g.get_str(key);
        let _ = g.get_str_array(key);
        let _ = g.get_i64_array(key);
        let _ = g.get_f64_array(key);
    }
    let _ = peftrt::gguf::vocab::Vocab::from_gguf(&g);
    for t in g.tensors() {
        let data = g.tensor_data(t).expect("tensor data was checked to lie in the file when parsing");
        assert_eq!(data.len() as u64, t.n_bytes);
        let _ = t.torch_shape();
        // Dequantising allocates 4 bytes per element: only what the file can hold (a type's
        // blocks are at least 2 bits per element).
        if t.n_elements() <= 16 * bytes.len() as u64 {
            let _ = g.dequantize(t);
        }
    }
}

fn blocks(bytes: &[u8]) {
    let Some((&ty, data)) = bytes.split_first() else { return };
    let Some(ty) = GgmlType::from_u32(u32::from(ty)) else { return };
    let (bs, ts) = (ty.block_size(), ty.type_size());
    if ts == 0 || bs == 0 {
        return;
    }
    // Whole blocks, and one block fewer or more than the data holds (a length mismatch).
    let n_blocks = data.len() / ts;
    for n in [n_blocks, n_blocks + 1, n_blocks.saturating_sub(1)] {
        let mut out = vec![0f32; n * bs];
        let r = dequantize(ty, data, &mut out);
        if r.is_ok() {
            assert_eq!(data.len(), n * ts, "{ty}: accepted {} bytes for {n} blocks", data.len());
        }
    }
}
