//! Memory-mapped safetensors weights: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`. F32, F16 and BF16 tensors are used in place, straight
//! from the page cache; nothing is copied unless a tensor is misaligned for its type.

use crate::error::{Error, Result};
use crate::gguf::{GgmlType, GgufFile};
use crate::kernels::{MatRef, Weights};
use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// Raw bytes: packed 4-bit codes and their quantisation state (never a float weight).
    U8,
    /// ggml blocks of a GGUF tensor used in place ([`Weights::Quant`]): weights, though not
    /// one value per element.
    Quant(GgmlType),
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
            // Bytes per element is not a whole number: whole blocks are counted instead.
            DType::Quant(_) => 1,
        }
    }
    /// The safetensors dtype name (the ggml type's name for a GGUF tensor).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::U8 => "U8",
            DType::Quant(t) => t.name(),
        }
    }

    pub(crate) fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::U8 | DType::Quant(_) => "uint8",
        }
    }

    /// Whether the finite `v` becomes infinite when rounded to this dtype (F16: from 65520 on).
    pub fn overflows(self, v: f32) -> bool {
        match self {
            DType::F32 | DType::U8 | DType::Quant(_) => false,
            DType::F16 => half::f16::from_f32(v).is_infinite(),
            DType::BF16 => half::bf16::from_f32(v).is_infinite(),
        }
    }

    /// An error naming `tensor` unless every value is finite and stays finite in this dtype (an
    /// f32 above 65504 becomes +inf in F16): writers call it so that no command ever writes a
    /// non-finite weight.
    pub fn check_encodable(self, tensor: &str, values: &[f32]) -> Result<()> {
        match values.iter().position(|&v| !v.is_finite() || self.overflows(v)) {
            None => Ok(()),
            Some(i) if values[i].is_finite() => Err(Error::tensor(
                tensor,
                format!(
                    "element {i} = {} does not fit in {} (it would become infinite); write F32 instead",
                    values[i],
                    self.name()
                ),
            )),
            Some(i) => Err(Error::tensor(
                tensor,
                format!("element {i} would be written as {}: refusing to write a non-finite weight", values[i]),
            )),
        }
    }

    /// Appends `values` converted to this dtype (round to nearest even) as little-endian bytes.
    pub(crate) fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size());
        match self {
            DType::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            DType::F16 => values.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            DType::BF16 => values.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
            DType::U8 => out.extend(values.iter().map(|&v| v as u8)),
            DType::Quant(t) => unreachable!("values are never encoded as {t}: writers pick a float dtype"),
        }
    }
}

/// A tensor's bytes, kept alive by the map (or owned copy) they live in.
#[derive(Clone)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// The file the tensor came from (for error messages).
    pub file: Arc<PathBuf>,
    storage: Storage,
}

#[derive(Clone)]
enum Storage {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    /// A misaligned tensor, copied; `u32` backing guarantees 4-byte alignment.
    Owned(Arc<[u32]>, usize),
}

impl Tensor {
    /// An F32 tensor holding `values` (a copy made at load time, e.g. an adapter's rows
    /// reordered for a GGUF base).
    pub(crate) fn owned_f32(name: String, shape: Vec<usize>, file: Arc<PathBuf>, values: &[f32]) -> Tensor {
        let words: Arc<[u32]> = values.iter().map(|v| v.to_bits()).collect();
        Tensor { name, dtype: DType::F32, shape, file, storage: Storage::Owned(words, values.len() * 4) }
    }

    /// A BF16 tensor holding `values` (an adapter's factor rounded to a BF16 base's dtype).
    pub(crate) fn owned_bf16(name: String, shape: Vec<usize>, file: Arc<PathBuf>, values: &[bf16]) -> Tensor {
        let words: Arc<[u32]> = values
            .chunks(2)
            .map(|p| u32::from(p[0].to_bits()) | p.get(1).map_or(0, |h| u32::from(h.to_bits()) << 16))
            .collect();
        Tensor { name, dtype: DType::BF16, shape, file, storage: Storage::Owned(words, values.len() * 2) }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mapped { map, start, len } => &map[*start..*start + *len],
            Storage::Owned(words, len) => {
                // SAFETY: a `[u32]` is readable as bytes; `len` ≤ its size in bytes.
                unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), *len) }
            }
        }
    }

    /// An error unless this is a float tensor (F32, F16, BF16): checked when loading every
    /// tensor that is used as float weights.
    pub fn expect_float(&self) -> Result<()> {
        if self.dtype == DType::U8 {
            return Err(Error::tensor(
                &self.name,
                format!("in {}: is U8, where float weights (F32, F16 or BF16) are expected", self.file.display()),
            ));
        }
        Ok(())
    }

    /// An error naming this tensor and its file if one of `values` (its elements, read as f32)
    /// is NaN or infinite.
    pub fn check_values(&self, values: &[f32]) -> Result<()> {
        match values.iter().position(|v| !v.is_finite()) {
            Some(i) => Err(Error::tensor(
                &self.name,
                format!(
                    "in {}: element {i} is {}; the file is corrupt (re-download, re-convert or retrain it)",
                    self.file.display(),
                    values[i]
                ),
            )),
            None => Ok(()),
        }
    }

    /// [`Tensor::check_values`] over the tensor's own elements (U8 bytes are always finite).
    pub fn check_finite(&self) -> Result<()> {
        if self.dtype == DType::U8 {
            return Ok(());
        }
        self.check_values(&self.to_f32_vec())
    }

    /// The elements, borrowed in their stored type.
    ///
    /// # Panics
    /// For a U8 tensor (callers check [`Tensor::expect_float`] when loading).
    pub fn weights(&self) -> Weights<'_> {
        let b = self.bytes();
        let n = self.numel();
        // SAFETY: alignment for the element type was checked (or the data copied) at load,
        // and the byte length was validated against `numel * dtype.size()`; f32, f16 and bf16
        // have no invalid bit patterns.
        unsafe {
            match self.dtype {
                DType::F32 => Weights::F32(std::slice::from_raw_parts(b.as_ptr().cast::<f32>(), n)),
                DType::F16 => Weights::F16(std::slice::from_raw_parts(b.as_ptr().cast::<f16>(), n)),
                DType::BF16 => Weights::BF16(std::slice::from_raw_parts(b.as_ptr().cast::<bf16>(), n)),
                DType::Quant(ty) => Weights::Quant(crate::kernels::Quant { ty, data: b, len: n }),
                DType::U8 => panic!("tensor {} is U8, not float weights (a loader missed expect_float)", self.name),
            }
        }
    }

    /// The tensor as a matrix `[rows, cols]` (a linear layer's weight), checking its shape.
    pub fn matrix(&self, rows: usize, cols: usize) -> Result<MatRef<'_>> {
        self.expect_shape(&[rows, cols])?;
        self.expect_float()?;
        Ok(MatRef { w: self.weights(), rows, cols })
    }

    /// A copy of the tensor in f32 (for small tensors: norms, biases). U8 bytes become their
    /// values.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        if self.dtype == DType::U8 {
            return self.bytes().iter().map(|&b| f32::from(b)).collect();
        }
        let mut out = vec![0.0; self.numel()];
        self.weights().to_f32(0, &mut out);
        out
    }

    pub fn expect_shape(&self, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(Error::tensor(
                &self.name,
                format!(
                    "in {}: expected shape {:?}, found {:?} (does config.json match these weights?)",
                    self.file.display(),
                    shape,
                    self.shape
                ),
            ));
        }
        Ok(())
    }
}

/// All tensors of a model directory, by name.
pub struct WeightStore {
    tensors: HashMap<String, Tensor>,
    dir: PathBuf,
    /// The safetensors header's `__metadata__` (of the first file, for sharded models).
    metadata: HashMap<String, String>,
}

impl WeightStore {
    /// Opens the weights of a Hugging Face model directory (single file or sharded).
    ///
    /// # Safety
    /// The files are memory-mapped: they must not be modified or truncated while the store
    /// (or any tensor borrowed from it) is alive.
    pub unsafe fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if crate::fsutil::is_present(&single) {
            vec![single]
        } else if index.is_file() {
            shard_files(&index)?
        } else {
            return Err(Error::missing(
                dir,
                "no model.safetensors or model.safetensors.index.json here; is this a Hugging Face model directory? \
                 (GGUF files are converted with `peftrt import`)",
            ));
        };
        let mut tensors = HashMap::new();
        let mut metadata = None;
        for file in files {
            // SAFETY: forwarded to our caller.
            let (list, meta) = unsafe { open_file(&file)? };
            metadata.get_or_insert(meta);
            for t in list {
                if tensors.contains_key(&t.name) {
                    return Err(Error::tensor(&t.name, format!("appears twice (again in {})", file.display())));
                }
                tensors.insert(t.name.clone(), t);
            }
        }
        Ok(WeightStore { tensors, dir: dir.to_path_buf(), metadata: metadata.unwrap_or_default() })
    }

    /// Opens one safetensors file (an adapter's `adapter_model.safetensors`).
    ///
    /// # Safety
    /// As [`WeightStore::open`]: the file must not change while the store lives.
    pub unsafe fn open_file(path: &Path) -> Result<Self> {
        // SAFETY: forwarded to our caller.
        let (list, metadata) = unsafe { open_file(path)? };
        let tensors = list.into_iter().map(|t| (t.name.clone(), t)).collect();
        Ok(WeightStore { tensors, dir: path.to_path_buf(), metadata })
    }

    /// The tensors of a GGUF model under their Hugging Face names, used in place from the file's
    /// map (a GGUF read into memory instead is copied tensor by tensor). F32/F16/BF16 tensors
    /// get those dtypes, block-quantised ones [`DType::Quant`]; each tensor's byte size was
    /// checked against its type and shape when the file was parsed, and rows must hold whole
    /// blocks.
    pub(crate) fn from_gguf(g: &GgufFile, tensors: &[crate::gguf::import::NativeTensor<'_>]) -> Result<Self> {
        let file = Arc::new(g.path().to_path_buf());
        let mut out = HashMap::new();
        for t in tensors {
            let info = t.info;
            let dtype = match info.ggml_type {
                GgmlType::F32 => DType::F32,
                GgmlType::F16 => DType::F16,
                GgmlType::BF16 => DType::BF16,
                ty if crate::kernels::Quant::supports(ty) => DType::Quant(ty),
                ty => {
                    return Err(Error::unsupported_tensor(
                        &info.name,
                        format!(
                            "in {}: type {ty} has no kernel in peftrt (supported: F32, F16, BF16, Q4_0, Q4_1, \
                             Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K); re-quantise it with llama-quantize",
                            g.path().display()
                        ),
                    ))
                }
            };
            let shape = info.torch_shape();
            let row = shape.last().copied().unwrap_or(1);
            let bs = info.ggml_type.block_size();
            if !row.is_multiple_of(bs) {
                return Err(Error::tensor(
                    &info.name,
                    format!(
                        "in {}: rows of {row} elements do not hold whole {} blocks of {bs}",
                        g.path().display(),
                        info.ggml_type
                    ),
                ));
            }
            let storage = match g.mapped_tensor(info)? {
                Some((map, start, len)) if (map.as_ptr() as usize + start).is_multiple_of(dtype.size().max(1)) => {
                    Storage::Mapped { map, start, len }
                }
                _ => {
                    let bytes = g.tensor_data(info)?;
                    let mut words = vec![0u32; bytes.len().div_ceil(4)];
                    // SAFETY: `words` holds at least `bytes.len()` bytes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(bytes.as_ptr(), words.as_mut_ptr().cast::<u8>(), bytes.len())
                    };
                    Storage::Owned(words.into(), bytes.len())
                }
            };
            let tensor = Tensor { name: t.hf_name.clone(), dtype, shape, file: file.clone(), storage };
            if out.insert(t.hf_name.clone(), tensor).is_some() {
                return Err(Error::tensor(&info.name, format!("in {}: appears twice", g.path().display())));
            }
        }
        Ok(WeightStore { tensors: out, dir: g.path().to_path_buf(), metadata: HashMap::new() })
    }

    /// The safetensors header's `__metadata__` strings.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::tensor(name, format!("missing from the weights in {}", self.dir.display())))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensors, sorted by name.
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut v: Vec<_> = self.tensors.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// The shard files named by an index, in order, each checked to exist.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = crate::fsutil::read_text_file(index, crate::fsutil::MAX_JSON_BYTES)?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(index, "no \"weight_map\" object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = BTreeMap::new();
    for (tensor, file) in map {
        let name = file
            .as_str()
            .filter(|f| !f.contains('/') && !f.contains('\\') && !f.is_empty())
            .ok_or_else(|| Error::format(index, format!("weight_map[\"{tensor}\"] is not a plain file name")))?;
        files.entry(name.to_string()).or_insert_with(|| tensor.clone());
    }
    files
        .into_iter()
        .map(|(name, tensor)| {
            let path = dir.join(&name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::missing(
                    index,
                    format!("shard {name} (holding {tensor}, among others) is missing; download the complete model"),
                ))
            }
        })
        .collect()
}

/// Why a header's data offsets do not tile the data, naming the tensors on both sides: the
/// safetensors crate names only the tensor after a gap, which for a tensor missing from the
/// header is the wrong one. `None` when the header cannot be read here either.
fn offset_gap(file: &[u8]) -> Option<String> {
    let len = u64::from_le_bytes(file.get(..8)?.try_into().ok()?);
    let header = file.get(8..8usize.checked_add(usize::try_from(len).ok()?)?)?;
    let v: serde_json::Value = serde_json::from_slice(header).ok()?;
    let mut spans: Vec<(u64, u64, &str)> = v
        .as_object()?
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(k, t)| {
            let o = t.get("data_offsets")?.as_array()?;
            Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?, k.as_str()))
        })
        .collect();
    spans.sort();
    let mut end = 0;
    let mut prev: Option<&str> = None;
    for &(a, b, name) in &spans {
        let after = prev.map_or("the start of the data".to_string(), |p| format!("tensor `{p}`"));
        if a > end {
            return Some(format!(
                "bytes {end}..{a} of the data (after {after}, before tensor `{name}`) belong to no tensor of the \
                 header: an entry is missing (an edited or damaged file; re-download or re-export it)"
            ));
        }
        if a < end {
            return Some(format!("tensor `{name}` overlaps {after} (data offsets {a}..{b}): the header is corrupt"));
        }
        end = b;
        prev = Some(name);
    }
    None
}

/// Maps one safetensors file and lists its tensors (and the header's metadata), validating the
/// header against the file.
///
/// # Safety
/// See [`WeightStore::open`].
unsafe fn open_file(path: &Path) -> Result<(Vec<Tensor>, HashMap<String, String>)> {
    let (file, _) = crate::fsutil::open_regular_file(path)?; // a FIFO would block, a device never end
                                                             // SAFETY: the caller promises the file is not modified while mapped.
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map[..]).map_err(|e| {
        let why = match e {
            safetensors::SafeTensorError::InvalidOffset(_) => offset_gap(&map[..]),
            _ => None,
        };
        Error::format(path, format!("invalid safetensors file: {}", why.unwrap_or_else(|| e.to_string())))
    })?;
    let data_start = 8 + header_len;
    let file_arc = Arc::new(path.to_path_buf());
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::U8 => DType::U8,
            other => {
                return Err(Error::unsupported_tensor(
                    &name,
                    format!(
                        "in {}: dtype {other:?} is not supported (F32, F16, BF16; U8 for 4-bit weights)",
                        path.display()
                    ),
                ))
            }
        };
        let (a, b) = info.data_offsets;
        let numel: usize = info.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).unwrap_or(usize::MAX);
        if b < a || numel.checked_mul(dtype.size()) != Some(b - a) {
            return Err(Error::tensor(
                &name,
                format!("in {}: header offsets disagree with its shape and dtype", path.display()),
            ));
        }
        let start = data_start + a;
        let len = b - a;
        if start + len > map.len() {
            return Err(Error::tensor(
                &name,
                format!("in {}: data runs past the end of the file (truncated download?)", path.display()),
            ));
        }
        let storage = if (map.as_ptr() as usize + start).is_multiple_of(dtype.size()) {
            Storage::Mapped { map: map.clone(), start, len }
        } else {
            // Expected after odd-sized U8 tensors (bitsandbytes' quant_state JSON); only a
            // large copy is worth a warning.
            if len > 1 << 20 {
                log::warn!("{}: tensor {name} ({len} bytes) is misaligned; copying it", path.display());
            } else {
                log::debug!("{}: tensor {name} is misaligned; copying it", path.display());
            }
            let mut words = vec![0u32; len.div_ceil(4)];
            // SAFETY: `words` holds at least `len` bytes; the source range was bounds-checked.
            unsafe { std::ptr::copy_nonoverlapping(map.as_ptr().add(start), words.as_mut_ptr().cast::<u8>(), len) };
            Storage::Owned(words.into(), len)
        };
        out.push(Tensor { name, dtype, shape: info.shape.clone(), file: file_arc.clone(), storage });
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}
