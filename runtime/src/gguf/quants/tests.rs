use super::*;
use std::path::PathBuf;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf")
}

/// Each type's random blocks dequantise bit-identically to gguf-py's output
/// (fixtures written by `scripts/gguf_fixtures.py`).
#[test]
fn dequantize_matches_gguf_py_bit_exactly() {
    use GgmlType::*;
    for ty in [F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K] {
        let raw = std::fs::read(data_dir().join(format!("{ty}.bin"))).unwrap();
        let expected: Vec<f32> = std::fs::read(data_dir().join(format!("{ty}.f32")))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut out = vec![f32::NAN; expected.len()];
        dequantize(ty, &raw, &mut out).unwrap();
        let bad = out.iter().zip(&expected).position(|(a, b)| a.to_bits() != b.to_bits());
        if let Some(i) = bad {
            panic!("{ty}: element {i}: got {} expected {}", out[i], expected[i]);
        }
        // The fixtures must exercise the values, not be all zeros.
        assert!(expected.iter().filter(|v| **v != 0.0).count() > expected.len() / 2, "{ty}");
    }
}

#[test]
fn ids_round_trip_and_sizes_match_blocks() {
    for id in 0..64 {
        if let Some(t) = GgmlType::from_u32(id) {
            assert_eq!(t.id(), id);
        }
    }
    assert_eq!(GgmlType::Q4_K.type_size(), std::mem::size_of::<BlockQ4K>());
    assert_eq!(GgmlType::Q6_K.type_size(), std::mem::size_of::<BlockQ6K>());
    assert_eq!(GgmlType::Q3_K.type_size(), std::mem::size_of::<BlockQ3K>());
}

#[test]
fn rejects_length_mismatch_and_unsupported_types() {
    let mut out = [0f32; 32];
    let err = dequantize(GgmlType::Q4_0, &[0u8; 17], &mut out).unwrap_err();
    assert!(err.contains("Q4_0"), "{err}");
    let err = dequantize(GgmlType::IQ4_NL, &[0u8; 18], &mut out).unwrap_err();
    assert!(err.contains("IQ4_NL is not supported"), "{err}");
}
