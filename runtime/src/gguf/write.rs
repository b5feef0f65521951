//! Writing GGUF files (the layout [`super::file`] reads): metadata and tensors with their raw
//! bytes, each tensor's data aligned to `general.alignment`. peftrt serves and imports GGUF
//! files but does not produce them for users; this writer exists so tests and fuzz targets can
//! build valid (and deliberately hostile) files, and so the reader can be checked against it.

use std::collections::BTreeMap;

use super::file::{Value, ValueType, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use super::quants::GgmlType;

/// One tensor to write: GGUF name, dims in ggml order (innermost first), type, raw data.
pub struct TensorOut<'a> {
    pub name: &'a str,
    pub dims: &'a [u64],
    pub ggml_type: GgmlType,
    pub data: &'a [u8],
}

fn type_id(t: GgmlType) -> u32 {
    (0..64).find(|&i| GgmlType::from_u32(i) == Some(t)).unwrap_or(u32::MAX)
}

fn value_type_id(t: ValueType) -> u32 {
    use ValueType::*;
    match t {
        U8 => 0,
        I8 => 1,
        U16 => 2,
        I16 => 3,
        U32 => 4,
        I32 => 5,
        F32 => 6,
        Bool => 7,
        String => 8,
        Array => 9,
        U64 => 10,
        I64 => 11,
        F64 => 12,
    }
}

fn value_type(v: &Value) -> ValueType {
    match v {
        Value::U8(_) => ValueType::U8,
        Value::I8(_) => ValueType::I8,
        Value::U16(_) => ValueType::U16,
        Value::I16(_) => ValueType::I16,
        Value::U32(_) => ValueType::U32,
        Value::I32(_) => ValueType::I32,
        Value::F32(_) => ValueType::F32,
        Value::Bool(_) => ValueType::Bool,
        Value::String(_) => ValueType::String,
        Value::Array(..) => ValueType::Array,
        Value::U64(_) => ValueType::U64,
        Value::I64(_) => ValueType::I64,
        Value::F64(_) => ValueType::F64,
    }
}

/// Appends a GGUF string: its u64 length, then its bytes.
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends one metadata pair as GGUF lays it out: key, value type tag, value.
pub fn put_metadata(out: &mut Vec<u8>, key: &str, v: &Value) {
    put_str(out, key);
    out.extend_from_slice(&value_type_id(value_type(v)).to_le_bytes());
    put_value(out, v);
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(t, items) => {
            out.extend_from_slice(&value_type_id(*t).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| put_value(out, i));
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// The bytes of a GGUF v3 file holding `metadata` and `tensors` (in that order). The
/// alignment is `general.alignment` when the metadata sets it, else 32.
pub fn to_bytes(metadata: &BTreeMap<String, Value>, tensors: &[TensorOut<'_>]) -> Vec<u8> {
    let align = metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(DEFAULT_ALIGNMENT).max(1);
    let pad = |n: u64| n.div_ceil(align) * align;
    let mut out = GGUF_MAGIC.to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_metadata(&mut out, k, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut out, t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        t.dims.iter().for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
        out.extend_from_slice(&type_id(t.ggml_type).to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset = pad(offset + t.data.len() as u64);
    }
    out.resize(pad(out.len() as u64) as usize, 0);
    for t in tensors {
        out.extend_from_slice(t.data);
        out.resize(pad(out.len() as u64) as usize, 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    #[test]
    fn the_fixture_rewritten_reads_back_identically() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf/tiny_llama.gguf");
        let g = GgufFile::read(&path).unwrap();
        let tensors: Vec<TensorOut> = g
            .tensors()
            .iter()
            .map(|t| TensorOut {
                name: &t.name,
                dims: &t.dims,
                ggml_type: t.ggml_type,
                data: g.tensor_data(t).unwrap(),
            })
            .collect();
        let again = GgufFile::from_bytes("again.gguf", to_bytes(g.metadata(), &tensors)).unwrap();
        assert_eq!(again.metadata(), g.metadata());
        assert_eq!(again.tensors().len(), g.tensors().len());
        for (a, b) in again.tensors().iter().zip(g.tensors()) {
            assert_eq!((&a.name, &a.dims, a.ggml_type), (&b.name, &b.dims, b.ggml_type));
            assert_eq!(again.tensor_data(a).unwrap(), g.tensor_data(b).unwrap());
        }
    }
}
