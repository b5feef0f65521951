//! The GGUF container: header, metadata key/values and tensor infos, read from a memory map.
//!
//! Layout (llama.cpp `ggml/include/gguf.h`, `docs/gguf.md`): magic `GGUF`, `u32` version,
//! `u64` tensor count, `u64` metadata count, the metadata (`string key`, `u32 type`, value),
//! the tensor infos (`string name`, `u32 n_dims`, `u64 dims[n_dims]`, `u32 type`, `u64 offset`),
//! padding to `general.alignment` (default 32), then the tensor data. Strings are a `u64`
//! length followed by UTF-8 bytes, all integers little-endian. Version 1 (32-bit counts) is
//! refused.
//!
//! Every read is bounds-checked against the file, and every count is checked against the bytes
//! that remain before anything is allocated, so a corrupt or hostile file yields an [`Error`]
//! naming the file and the key or tensor, never a panic or a huge allocation.
//!
//! The bounds-checked cursor is `file/reader.rs`. What remains is one file of about 550 lines:
//! the value and tensor-info types and the parse that reads them, front to back, as the
//! layout above lists them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::quants::GgmlType;
use crate::error::{Error, Result};

mod reader;
use reader::Reader;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Arrays nested deeper than this are refused (real files nest at most once).
const MAX_ARRAY_DEPTH: usize = 8;

/// The type tag of a metadata value (`gguf_type` in `gguf.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_u32(v: u32) -> Option<Self> {
        use ValueType::*;
        Some(match v {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The smallest number of bytes one value of this type occupies in the file; used to
    /// check an array's count against the remaining bytes before allocating.
    fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// An array: the element type and the elements (all of that type).
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is a float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, items) => Some(items),
            _ => None,
        }
    }

    /// A short human-readable rendering; arrays longer than a few items are elided.
    fn short(&self) -> String {
        match self {
            Value::String(s) => {
                let mut t: String = s.chars().take(60).collect();
                if t.len() < s.len() {
                    t.push('…');
                }
                format!("{t:?}")
            }
            Value::Array(ty, items) => {
                let head: Vec<String> = items.iter().take(4).map(Value::short).collect();
                let more = if items.len() > 4 { ", …" } else { "" };
                format!("[{ty:?}; {}] [{}{more}]", items.len(), head.join(", "))
            }
            Value::F32(v) => format!("{v}"),
            Value::F64(v) => format!("{v}"),
            Value::Bool(v) => format!("{v}"),
            other => other.as_i64().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

/// Where one tensor lives in the file and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The GGUF name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the innermost (contiguous) one, so a
    /// PyTorch `[rows, cols]` weight is stored as `[cols, rows]`.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Number of bytes of data (computed from dims and type, checked against the file).
    pub n_bytes: u64,
}

impl TensorInfo {
    /// The number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in PyTorch/Hugging Face order (outermost first).
    pub fn torch_shape(&self) -> Vec<usize> {
        // Sizes were checked to fit in memory (n_bytes <= file length), so they fit usize.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

enum Storage {
    /// Shared with the tensors of a natively loaded model ([`GgufFile::mapped_tensor`]).
    Mmap(std::sync::Arc<memmap2::Mmap>),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: metadata and tensor infos, with the tensor data mapped (or held) in
/// memory and handed out as byte slices.
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    version: u32,
    alignment: u64,
    metadata: BTreeMap<String, Value>,
    /// In file order.
    tensors: Vec<TensorInfo>,
    data_start: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses a GGUF file.
    ///
    /// # Safety
    /// The file is memory-mapped: it must not be modified or truncated (by this or another
    /// process) while the returned value or any slice borrowed from it is alive; doing so is
    /// undefined behaviour (see [`memmap2::Mmap::map`]).
    pub unsafe fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        // A FIFO would block the open, a device map endless bytes: only regular files.
        let (file, len) = crate::fsutil::open_regular_file(path)?;
        if len < 24 {
            return Err(Error::format(
                path,
                format!("file is {len} bytes, too short for a GGUF header (24 bytes); is it truncated?"),
            ));
        }
        // SAFETY: the caller guarantees the file is not modified while mapped (see `# Safety`).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path.to_path_buf(), Storage::Mmap(std::sync::Arc::new(mmap)))
    }

    /// Reads a whole GGUF file into memory and parses it. Safe, but costs a copy of the file.
    pub fn read(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let bytes = crate::fsutil::read_regular_file(path, u64::MAX)?;
        Self::parse(path.to_path_buf(), Storage::Owned(bytes))
    }

    /// Parses GGUF bytes already in memory; `path` is only used in error messages.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile> {
        Self::parse(path.into(), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<GgufFile> {
        let buf = storage.bytes();
        let mut r = Reader { buf, pos: 0, path: &path };
        let magic = r.take(4, "magic")?;
        if magic != GGUF_MAGIC {
            return Err(Error::format(&path, format!("not a GGUF file: magic is {magic:02x?}, expected \"GGUF\"")));
        }
        let version = r.u32("version")?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(Error::format(
                    &path,
                    "GGUF version 1 is not supported (32-bit counts, obsolete since 2023); \
                     re-convert the model with a current llama.cpp",
                ))
            }
            v => return Err(Error::format(&path, format!("GGUF version {v} is not supported (only 2 and 3)"))),
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each KV needs at least 8 (key len) + 4 (type) + 1 bytes; each tensor info at least
        // 8 + 4 + 4 + 8 bytes: a lying count fails here instead of looping or allocating.
        r.check_count(n_kv, 13, "metadata count")?;
        r.check_count(n_tensors, 24, "tensor count")?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("key of metadata entry {i}"))?;
            let ty = r.u32(&key)?;
            let ty = ValueType::from_u32(ty)
                .ok_or_else(|| Error::config(&path, &key, format!("unknown metadata value type {ty}")))?;
            let value = r.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(Error::config(&path, key, "duplicate metadata key"));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(Error::config(
                        &path,
                        "general.alignment",
                        format!("{} is not a power of two up to 1 MiB", v.short()),
                    ))
                }
            },
        };

        // Capacities are capped: a count that fits the file can still claim far more entries
        // than are worth reserving memory for up front.
        let mut tensors = Vec::with_capacity((n_tensors as usize).min(4096));
        let mut seen = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = r.string(&format!("name of tensor {i}"))?;
            let n_dims = r.u32(&name)? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.tensor_err(&name, format!("{n_dims} dimensions (ggml allows 1 to 4)")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(r.u64(&name)?);
            }
            let ty = r.u32(&name)?;
            let ggml_type =
                GgmlType::from_u32(ty).ok_or_else(|| r.tensor_err(&name, format!("unknown ggml tensor type {ty}")))?;
            let offset = r.u64(&name)?;
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| r.tensor_err(&name, format!("dimensions {dims:?} overflow")))?;
            let (block, type_size) = (ggml_type.block_size() as u64, ggml_type.type_size() as u64);
            if dims[0] % block != 0 {
                return Err(r.tensor_err(
                    &name,
                    format!(
                        "first dimension {} is not a multiple of the {} block size {block}",
                        dims[0],
                        ggml_type.name()
                    ),
                ));
            }
            let n_bytes = (n_elements / block)
                .checked_mul(type_size)
                .ok_or_else(|| r.tensor_err(&name, format!("dimensions {dims:?} overflow")))?;
            if offset % alignment != 0 {
                return Err(r.tensor_err(
                    &name,
                    format!("data offset {offset} is not a multiple of the alignment {alignment}"),
                ));
            }
            if !seen.insert(name.clone()) {
                return Err(r.tensor_err(&name, "duplicate tensor name".to_string()));
            }
            tensors.push(TensorInfo { name, dims, ggml_type, offset, n_bytes });
        }

        let data_start = r.pos.div_ceil(alignment as usize) as u64 * alignment;
        let file_len = buf.len() as u64;
        for t in &tensors {
            let end = data_start.checked_add(t.offset).and_then(|s| s.checked_add(t.n_bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(r.tensor_err(
                        &t.name,
                        format!(
                            "data ({} bytes at offset {}) extends past the end of the file \
                             ({file_len} bytes); the file is truncated or corrupt",
                            t.n_bytes,
                            data_start.saturating_add(t.offset)
                        ),
                    ))
                }
            }
        }

        Ok(GgufFile { path, storage, version, alignment, metadata, tensors, data_start })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// All metadata, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// The value of a metadata key, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn typed<'a, T>(&'a self, key: &str, what: &str, f: impl FnOnce(&'a Value) -> Option<T>) -> Result<Option<T>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => f(v)
                .map(Some)
                .ok_or_else(|| Error::config(&self.path, key, format!("expected {what}, found {}", v.short()))),
        }
    }

    /// An unsigned integer key that fits a `u32` (any integer width is accepted).
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>> {
        self.typed(key, "an integer in u32 range", |v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
    }

    /// An unsigned integer key of any width.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }

    /// A float key (f32 or f64; integers are accepted too).
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", Value::as_f64)
    }

    /// A float key as `f32` (as stored by llama.cpp).
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        self.typed(key, "a number", |v| match *v {
            Value::F32(x) => Some(x),
            _ => v.as_f64().map(|x| x as f32),
        })
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", Value::as_bool)
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", Value::as_str)
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.typed(key, "an array of strings", |v| v.as_array()?.iter().map(Value::as_str).collect())
    }

    /// An array of integers, as `i64`.
    pub fn get_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.typed(key, "an array of integers", |v| v.as_array()?.iter().map(Value::as_i64).collect())
    }

    /// An array of numbers, as `f64`.
    pub fn get_f64_array(&self, key: &str) -> Result<Option<Vec<f64>>> {
        self.typed(key, "an array of numbers", |v| v.as_array()?.iter().map(Value::as_f64).collect())
    }

    /// `general.architecture`, required by every GGUF model.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")?
            .ok_or_else(|| Error::config(&self.path, "general.architecture", "missing (is this a model file?)"))
    }

    /// The tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of the tensor with this GGUF name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (checked to lie within the file when parsing).
    pub fn tensor_data(&self, info: &TensorInfo) -> Result<&[u8]> {
        let start = self.data_start.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(info.n_bytes));
        let buf = self.storage.bytes();
        match (start, end) {
            (Some(s), Some(e)) if e <= buf.len() as u64 => Ok(&buf[s as usize..e as usize]),
            _ => Err(Error::format(&self.path, format!("tensor `{}`: data lies outside the file", info.name))),
        }
    }

    /// The file's map, for a mapped file: a natively loaded model keeps it (through its tensors)
    /// and re-reads the metadata from it ([`GgufFile::from_map`]).
    pub(crate) fn map(&self) -> Option<std::sync::Arc<memmap2::Mmap>> {
        match &self.storage {
            Storage::Mmap(m) => Some(m.clone()),
            Storage::Owned(_) => None,
        }
    }

    /// Parses a map [`GgufFile::map`] returned (`path`: the file it maps, for messages).
    pub(crate) fn from_map(path: impl Into<PathBuf>, map: std::sync::Arc<memmap2::Mmap>) -> Result<GgufFile> {
        Self::parse(path.into(), Storage::Mmap(map))
    }

    /// The map a tensor's bytes live in and their range in it, for a mapped file (`None` for
    /// one read into memory): a natively loaded model keeps the map alive through its tensors.
    pub(crate) fn mapped_tensor(
        &self,
        info: &TensorInfo,
    ) -> Result<Option<(std::sync::Arc<memmap2::Mmap>, usize, usize)>> {
        let data = self.tensor_data(info)?;
        Ok(match &self.storage {
            Storage::Mmap(m) => Some((m.clone(), data.as_ptr() as usize - m.as_ptr() as usize, data.len())),
            Storage::Owned(_) => None,
        })
    }

    /// The tensor dequantised to `f32`, in ggml element order (row-major over the torch shape).
    pub fn dequantize(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        let data = self.tensor_data(info)?;
        let mut out = vec![0f32; info.n_elements() as usize];
        super::quants::dequantize(info.ggml_type, data, &mut out)
            .map_err(|msg| Error::format(&self.path, format!("tensor `{}`: {msg}", info.name)))?;
        Ok(out)
    }

    /// A multi-line human-readable summary: version, architecture, metadata (long arrays
    /// elided), and each tensor's name, type, shape and size. Used by `peftrt inspect`.
    pub fn describe(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let arch = self.get("general.architecture").and_then(Value::as_str).unwrap_or("?");
        let total: u64 = self.tensors.iter().map(|t| t.n_bytes).sum();
        let params: u64 = self.tensors.iter().map(TensorInfo::n_elements).sum();
        writeln!(f, "{}", self.path.display())?;
        writeln!(
            f,
            "GGUF v{}, architecture {arch}, {} metadata keys, {} tensors, {params} parameters, \
             {total} bytes of tensor data, alignment {}",
            self.version,
            self.metadata.len(),
            self.tensors.len(),
            self.alignment
        )?;
        writeln!(f, "metadata:")?;
        for (k, v) in &self.metadata {
            writeln!(f, "  {k} = {}", v.short())?;
        }
        writeln!(f, "tensors (name, type, shape [torch order], bytes):")?;
        for t in &self.tensors {
            writeln!(f, "  {:<40} {:<6} {:?} {}", t.name, t.ggml_type.name(), t.torch_shape(), t.n_bytes)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
