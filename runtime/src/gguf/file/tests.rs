use super::*;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf/tiny_llama.gguf")
}

fn fixture_bytes() -> Vec<u8> {
    std::fs::read(fixture()).unwrap()
}

/// Writes `bytes` to a temporary file, maps it, and returns the error message.
fn open_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    // SAFETY: the temporary file is not modified while mapped.
    let err = unsafe { GgufFile::open(&path) }.unwrap_err().to_string();
    assert!(err.contains("bad.gguf"), "error does not name the file: {err}");
    err
}

/// The byte position just after the GGUF string `s` (its u64 length + bytes).
fn after_string(bytes: &[u8], s: &str) -> usize {
    let mut needle = (s.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(s.as_bytes());
    let at = bytes.windows(needle.len()).position(|w| w == needle.as_slice()).unwrap();
    at + needle.len()
}

#[test]
fn parses_the_tiny_llama_fixture() {
    // SAFETY: the fixture is not modified while mapped.
    let g = unsafe { GgufFile::open(fixture()) }.unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.get_u32("llama.block_count").unwrap(), Some(2));
    assert_eq!(g.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(), Some(1e-5));
    assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), Some("smollm"));
    let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap();
    assert_eq!(tokens[1], "<|im_start|>");
    let types = g.get_i64_array("tokenizer.ggml.token_type").unwrap().unwrap();
    assert_eq!(types.len(), tokens.len());
    assert_eq!(g.tensors().len(), 21);
    let q = g.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.ggml_type, GgmlType::Q4_0);
    assert_eq!(q.dims, vec![64, 64]);
    assert_eq!(g.tensor_data(q).unwrap().len(), 64 * 64 / 32 * 18);
    let emb = g.tensor("token_embd.weight").unwrap();
    assert_eq!(emb.torch_shape(), vec![tokens.len(), 64]);
    // A typed getter on the wrong type names the key.
    let err = g.get_str("llama.block_count").unwrap_err().to_string();
    assert!(err.contains("llama.block_count") && err.contains("expected a string"), "{err}");
    let text = g.describe();
    assert!(text.contains("architecture llama") && text.contains("blk.1.ffn_up.weight"), "{text}");
    assert!(text.contains("BF16"), "{text}");
    // The in-memory reader agrees with the mapped one.
    let r = GgufFile::read(fixture()).unwrap();
    assert_eq!(r.tensors(), g.tensors());
    assert_eq!(r.metadata(), g.metadata());
}

#[test]
fn truncated_header_is_an_error() {
    let bytes = fixture_bytes();
    for cut in [0, 10, 23, 100, 3000] {
        let err = open_err(&bytes[..cut]);
        assert!(err.contains("truncated"), "cut at {cut}: {err}");
    }
}

#[test]
fn truncated_tensor_data_names_the_tensor() {
    let bytes = fixture_bytes();
    let err = open_err(&bytes[..bytes.len() - 100]); // past the final padding
    assert!(err.contains("tensor `output.weight`") && err.contains("past the end"), "{err}");
}

#[test]
fn lying_string_length_is_an_error_not_an_allocation() {
    let mut bytes = fixture_bytes();
    let at = after_string(&bytes, "general.architecture") + 4; // skip the value type
    bytes[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let err = open_err(&bytes);
    assert!(err.contains("general.architecture") && err.contains("string length"), "{err}");
}

#[test]
fn lying_array_count_is_an_error() {
    let mut bytes = fixture_bytes();
    let at = after_string(&bytes, "tokenizer.ggml.tokens") + 8; // type, element type
    bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = open_err(&bytes);
    assert!(err.contains("tokenizer.ggml.tokens") && err.contains("cannot fit"), "{err}");
}

#[test]
fn unknown_tensor_type_names_the_tensor() {
    let mut bytes = fixture_bytes();
    let at = after_string(&bytes, "output_norm.weight") + 4 + 8; // n_dims, one dim
    assert_eq!(bytes[at..at + 4], 0u32.to_le_bytes()); // F32
    bytes[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let err = open_err(&bytes);
    assert!(err.contains("output_norm.weight") && err.contains("unknown ggml tensor type 99"), "{err}");
}

#[test]
fn overflowing_dims_are_an_error() {
    let mut bytes = fixture_bytes();
    let at = after_string(&bytes, "blk.0.attn_q.weight") + 4;
    bytes[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    bytes[at + 8..at + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let err = open_err(&bytes);
    assert!(err.contains("blk.0.attn_q.weight") && err.contains("overflow"), "{err}");
}

/// Regression (issue 18 row 10): a FIFO as the GGUF hung, /dev/zero was mapped.
#[cfg(unix)]
#[test]
fn non_regular_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.gguf");
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // SAFETY: nothing is mapped: the open is refused.
    let err = unsafe { GgufFile::open(&p) }.unwrap_err().to_string();
    assert!(err.contains("model.gguf") && err.contains("FIFO"), "{err}");
    let err = GgufFile::read(&p).unwrap_err().to_string();
    assert!(err.contains("FIFO"), "{err}");
    // SAFETY: as above.
    let err = unsafe { GgufFile::open("/dev/zero") }.unwrap_err().to_string();
    assert!(err.contains("character device"), "{err}");
}

#[test]
fn unsupported_versions_are_refused() {
    let mut bytes = fixture_bytes();
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    let err = open_err(&bytes);
    assert!(err.contains("version 1 is not supported"), "{err}");
    bytes[4..8].copy_from_slice(&4u32.to_le_bytes());
    assert!(open_err(&bytes).contains("version 4 is not supported"));
    bytes[0] = b'X';
    assert!(open_err(&bytes).contains("not a GGUF file"));
}
