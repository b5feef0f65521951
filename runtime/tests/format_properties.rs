//! Property tests of the file formats (issue 18): what the safetensors writer writes, and what a
//! GGUF writer (a small one here: the runtime reads GGUF but writes none) writes, reads back
//! identically; truncating such a file anywhere is an error; changing any one byte of it is an
//! error or a file that still reads, never a panic.
//!
//! The fuzz targets in `fuzz/` search the same readers without a valid file to start from.

use peftrt::gguf::write::{put_metadata, put_str};
use peftrt::gguf::{GgmlType, GgufFile, Value, ValueType};
use peftrt::output::{write_safetensors_bytes_with_metadata, TensorSpec};
use peftrt::weights::{DType, WeightStore};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

fn config() -> ProptestConfig {
    ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() }
}

// ---------------------------------------------------------------------------------------------
// safetensors

#[derive(Clone, Debug)]
struct StTensor {
    shape: Vec<usize>,
    dtype: DType,
    bytes: Vec<u8>,
}

#[derive(Clone, Debug)]
struct StFile {
    /// In the order the data is written.
    tensors: Vec<(String, StTensor)>,
    metadata: BTreeMap<String, String>,
}

fn st_tensor() -> impl Strategy<Value = StTensor> {
    let dtype = prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16), Just(DType::U8)];
    (vec(0usize..5, 0..4), dtype).prop_flat_map(|(shape, dtype)| {
        let n = shape.iter().product::<usize>() * dtype.size();
        vec(any::<u8>(), n).prop_map(move |bytes| StTensor { shape: shape.clone(), dtype, bytes })
    })
}

fn st_file() -> impl Strategy<Value = StFile> {
    (btree_map("[a-z][a-z0-9_.]{0,15}", st_tensor(), 0..6), any::<bool>(), btree_map("[a-z_]{1,8}", ".{0,12}", 0..3))
        .prop_map(|(tensors, reverse, metadata)| {
            let mut tensors: Vec<_> = tensors.into_iter().collect();
            if reverse {
                tensors.reverse();
            }
            StFile { tensors, metadata }
        })
}

fn write_st(path: &Path, f: &StFile) {
    let specs: Vec<TensorSpec> = f
        .tensors
        .iter()
        .map(|(name, t)| TensorSpec { name: name.clone(), shape: t.shape.clone(), dtype: t.dtype })
        .collect();
    write_safetensors_bytes_with_metadata(path, &specs, &f.metadata, |i, out| {
        out.extend_from_slice(&f.tensors[i].1.bytes);
        Ok(())
    })
    .unwrap();
}

/// Opens a safetensors file and reads every tensor as the loaders do; `Err` as a message.
/// A read-back safetensors file: its tensors by name and its `__metadata__`.
type StRead = (BTreeMap<String, StTensor>, HashMap<String, String>);

fn read_st(path: &Path) -> Result<StRead, String> {
    // SAFETY: the test's own file, unchanged while the store lives.
    let store = unsafe { WeightStore::open_file(path) }.map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for t in store.tensors() {
        assert_eq!(t.bytes().len(), t.numel() * t.dtype.size(), "{}", t.name);
        if t.expect_float().is_ok() {
            assert_eq!(t.to_f32_vec().len(), t.numel());
        }
        out.insert(t.name.clone(), StTensor { shape: t.shape.clone(), dtype: t.dtype, bytes: t.bytes().to_vec() });
    }
    Ok((out, store.metadata().clone()))
}

fn same_st(a: &StTensor, b: &StTensor) -> bool {
    a.shape == b.shape && a.dtype == b.dtype && a.bytes == b.bytes
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn safetensors_round_trip(f in st_file()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        write_st(&path, &f);
        let (tensors, metadata) = read_st(&path).unwrap();
        prop_assert_eq!(tensors.len(), f.tensors.len());
        for (name, t) in &f.tensors {
            prop_assert!(tensors.get(name).is_some_and(|r| same_st(r, t)), "{name}: {:?}", tensors.get(name));
        }
        let mut expected: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        expected.extend(f.metadata.clone());
        prop_assert_eq!(metadata, expected);
    }

    #[test]
    fn truncated_safetensors_is_an_error(f in st_file(), cut in any::<Index>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        write_st(&path, &f);
        let bytes = std::fs::read(&path).unwrap();
        let cut = cut.index(bytes.len());
        std::fs::write(&path, &bytes[..cut]).unwrap();
        prop_assert!(read_st(&path).is_err(), "{cut} of {} bytes read as a valid file", bytes.len());
    }

    #[test]
    fn corrupted_safetensors_is_an_error_or_reads(f in st_file(), at in any::<Index>(), flip in 1u8..=255) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        write_st(&path, &f);
        let mut bytes = std::fs::read(&path).unwrap();
        let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let at = at.index(bytes.len());
        bytes[at] ^= flip;
        std::fs::write(&path, &bytes).unwrap();
        let read = read_st(&path);
        if at >= data_start {
            // A changed data byte: the same tensors, one byte different in all.
            let (tensors, _) = read.unwrap();
            let mut changed = 0;
            for (name, t) in &f.tensors {
                let r = &tensors[name];
                prop_assert!(r.shape == t.shape && r.dtype == t.dtype, "{name}");
                changed += r.bytes.iter().zip(&t.bytes).filter(|(a, b)| a != b).count();
            }
            prop_assert_eq!(changed, 1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF

/// The types the runtime dequantises (each with gguf-py fixtures in tests/data/gguf).
const GGML_TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// A scalar value of type `k` (0..12: every type but arrays); floats of any bit pattern.
fn scalar(k: u8) -> BoxedStrategy<Value> {
    match k {
        0 => any::<u8>().prop_map(Value::U8).boxed(),
        1 => any::<i8>().prop_map(Value::I8).boxed(),
        2 => any::<u16>().prop_map(Value::U16).boxed(),
        3 => any::<i16>().prop_map(Value::I16).boxed(),
        4 => any::<u32>().prop_map(Value::U32).boxed(),
        5 => any::<i32>().prop_map(Value::I32).boxed(),
        6 => any::<u32>().prop_map(|b| Value::F32(f32::from_bits(b))).boxed(),
        7 => any::<bool>().prop_map(Value::Bool).boxed(),
        8 => ".{0,16}".prop_map(Value::String).boxed(),
        9 => any::<u64>().prop_map(Value::U64).boxed(),
        10 => any::<i64>().prop_map(Value::I64).boxed(),
        _ => any::<u64>().prop_map(|b| Value::F64(f64::from_bits(b))).boxed(),
    }
}

/// The type of [`scalar`]`(k)`.
fn scalar_type(k: u8) -> ValueType {
    use ValueType::*;
    [U8, I8, U16, I16, U32, I32, F32, Bool, String, U64, I64, F64][k as usize]
}

/// A scalar, an array of scalars of one type, or an array of such arrays.
fn value() -> impl Strategy<Value = Value> {
    let array = |k: u8| vec(scalar(k), 0..5).prop_map(move |items| Value::Array(scalar_type(k), items));
    prop_oneof![
        3 => (0u8..12).prop_flat_map(scalar),
        2 => (0u8..12).prop_flat_map(array),
        1 => (0u8..12).prop_flat_map(move |k| vec(array(k), 0..3).prop_map(|a| Value::Array(ValueType::Array, a))),
    ]
}

/// Bit-exact equality (NaN payloads included).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::F32(x), Value::F32(y)) => x.to_bits() == y.to_bits(),
        (Value::F64(x), Value::F64(y)) => x.to_bits() == y.to_bits(),
        (Value::Array(s, x), Value::Array(t, y)) => {
            s == t && x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_value(a, b))
        }
        _ => a == b,
    }
}

#[derive(Clone, Debug)]
struct GgTensor {
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

fn gg_tensor() -> impl Strategy<Value = GgTensor> {
    (proptest::sample::select(&GGML_TYPES[..]), 1u64..3, vec(1u64..4, 0..4)).prop_flat_map(|(ty, blocks, rest)| {
        let mut dims = vec![blocks * ty.block_size() as u64];
        dims.extend(rest);
        let n = (dims.iter().product::<u64>() / ty.block_size() as u64) as usize * ty.type_size();
        vec(any::<u8>(), n).prop_map(move |data| GgTensor { dims: dims.clone(), ty, data })
    })
}

#[derive(Clone, Debug)]
struct GgFile {
    version: u32,
    /// `general.alignment`, when written.
    alignment: Option<u32>,
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, GgTensor)>,
}

fn gg_file() -> impl Strategy<Value = GgFile> {
    (
        prop_oneof![Just(2u32), Just(3u32)],
        proptest::option::of(proptest::sample::select(vec![1u32, 8, 16, 32, 64])),
        btree_map("[a-z][a-z0-9_.]{0,20}", value(), 0..6),
        btree_map("[a-z][a-z0-9_.]{0,15}", gg_tensor(), 0..4),
    )
        .prop_map(|(version, alignment, metadata, tensors)| GgFile {
            version,
            alignment,
            metadata: metadata.into_iter().filter(|(k, _)| k != "general.alignment").collect(),
            tensors: tensors.into_iter().collect(),
        })
}

/// A GGUF file as llama.cpp's `gguf_write_to_file` lays it out (header, metadata, tensor infos,
/// data aligned to `general.alignment`), ending where the last tensor's data ends; and where the
/// data section starts (the end, without tensors).
fn write_gguf(f: &GgFile) -> (Vec<u8>, usize) {
    let mut kv = f.metadata.clone();
    if let Some(a) = f.alignment {
        kv.push(("general.alignment".into(), Value::U32(a)));
    }
    let align = f.alignment.unwrap_or(32) as u64;
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&f.version.to_le_bytes());
    out.extend_from_slice(&(f.tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (k, v) in &kv {
        put_metadata(&mut out, k, v);
    }
    let mut offset = 0u64;
    let mut offsets = vec![];
    for (name, t) in &f.tensors {
        put_str(&mut out, name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        t.dims.iter().for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
        out.extend_from_slice(&t.ty.id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len() as u64).div_ceil(align) * align;
    }
    if f.tensors.is_empty() {
        let end = out.len();
        return (out, end);
    }
    let data_start = out.len().div_ceil(align as usize) * align as usize;
    for ((_, t), off) in f.tensors.iter().zip(offsets) {
        out.resize(data_start + off as usize, 0);
        out.extend_from_slice(&t.data);
    }
    (out, data_start)
}

/// Parses GGUF bytes and reads everything a loader reads (each tensor's data, dequantised).
fn read_gguf(bytes: &[u8]) -> peftrt::Result<GgufFile> {
    let g = GgufFile::from_bytes("t.gguf", bytes.to_vec())?;
    let _ = g.describe();
    for t in g.tensors() {
        let data = g.tensor_data(t)?;
        assert_eq!(data.len() as u64, t.n_bytes, "{}", t.name);
        if t.ggml_type.can_dequantize() {
            assert_eq!(g.dequantize(t)?.len() as u64, t.n_elements(), "{}", t.name);
        }
    }
    Ok(g)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn gguf_round_trip(f in gg_file()) {
        let g = read_gguf(&write_gguf(&f).0).unwrap();
        prop_assert_eq!(g.version(), f.version);
        prop_assert_eq!(g.alignment(), f.alignment.unwrap_or(32) as u64);
        prop_assert_eq!(g.metadata().len(), f.metadata.len() + usize::from(f.alignment.is_some()));
        for (k, v) in &f.metadata {
            prop_assert!(g.get(k).is_some_and(|r| same_value(r, v)), "{k}: wrote {v:?}, read {:?}", g.get(k));
        }
        prop_assert_eq!(g.tensors().len(), f.tensors.len());
        for ((name, t), r) in f.tensors.iter().zip(g.tensors()) {
            prop_assert_eq!(&r.name, name);
            prop_assert_eq!(&r.dims, &t.dims);
            prop_assert_eq!(r.ggml_type, t.ty);
            prop_assert_eq!(g.tensor_data(r).unwrap(), &t.data[..]);
        }
    }

    #[test]
    fn truncated_gguf_is_an_error(f in gg_file(), cut in any::<Index>()) {
        let (bytes, _) = write_gguf(&f);
        let cut = cut.index(bytes.len());
        prop_assert!(read_gguf(&bytes[..cut]).is_err(), "{cut} of {} bytes read as a valid file", bytes.len());
    }

    #[test]
    fn corrupted_gguf_is_an_error_or_reads(f in gg_file(), at in any::<Index>(), flip in 1u8..=255) {
        let (mut bytes, data_start) = write_gguf(&f);
        let at = at.index(bytes.len());
        bytes[at] ^= flip;
        let read = read_gguf(&bytes);
        if at >= data_start {
            // A changed data (or padding) byte: the same metadata and tensor infos.
            let g = read.unwrap();
            prop_assert_eq!(g.tensors().len(), f.tensors.len());
            for ((name, t), r) in f.tensors.iter().zip(g.tensors()) {
                prop_assert!(&r.name == name && r.dims == t.dims && r.ggml_type == t.ty, "{name}");
            }
        }
    }
}
