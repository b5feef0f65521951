//! Writing model directories: safetensors files streamed tensor by tensor, JSON files, and the
//! whole directory made in a temporary sibling and renamed into place, so a failure never
//! leaves a half-written model behind. Used by `peftrt import` and `peftrt merge`.

use crate::error::{Error, Result};
use crate::weights::DType;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Runs `fill(tmp)` on a fresh temporary sibling of `out_dir`, then renames it to `out_dir`
/// (replacing an existing one). On any error the temporary directory is removed.
pub fn write_dir_atomically<T>(out_dir: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out_dir.file_name().ok_or_else(|| Error::format(out_dir, "not a directory name"))?;
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = parent.join(format!(".{}.peftrt-tmp-{}", name.to_string_lossy(), std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = fill(&tmp).and_then(|v| move_into_place(&tmp, out_dir).map(|_| v));
    if result.is_err() {
        if let Err(rm) = fs::remove_dir_all(&tmp) {
            log::warn!("could not remove {}: {rm}", tmp.display());
        }
    }
    result
}

/// Renames `tmp` to `out_dir`, replacing an existing `out_dir` (moved aside first, removed
/// after the rename succeeded).
fn move_into_place(tmp: &Path, out_dir: &Path) -> Result<()> {
    if out_dir.exists() {
        let mut old = tmp.as_os_str().to_owned();
        old.push(".old");
        let old = PathBuf::from(old);
        fs::rename(out_dir, &old).map_err(|e| Error::io(out_dir, e))?;
        if let Err(e) = fs::rename(tmp, out_dir) {
            // Put the previous directory back before reporting.
            let _ = fs::rename(&old, out_dir);
            return Err(Error::io(out_dir, e));
        }
        fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        Ok(())
    } else {
        fs::rename(tmp, out_dir).map_err(|e| Error::io(out_dir, e))
    }
}

/// Writes pretty JSON with a final newline.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|e| Error::format(path, format!("cannot serialise JSON: {e}")))?;
    text.push('\n');
    fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Writes a safetensors file of `tensors` (name, shape) in `dtype`, asking `values(i)` for the
/// f32 values of tensor `i` one at a time (so only one tensor is in memory). Returns the
/// number of parameters written.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    dtype: DType,
    mut values: impl FnMut(usize) -> Result<Vec<f32>>,
) -> Result<u64> {
    let specs: Vec<TensorSpec> =
        tensors.iter().map(|(name, shape)| TensorSpec { name: name.clone(), shape: shape.clone(), dtype }).collect();
    let mut f32s = Vec::new();
    write_safetensors_bytes(path, &specs, |i, out| {
        f32s = values(i)?;
        if f32s.len() != tensors[i].1.iter().product::<usize>() {
            return Err(Error::tensor(&tensors[i].0, format!("{} values for shape {:?}", f32s.len(), tensors[i].1)));
        }
        dtype.encode(&f32s, out);
        Ok(())
    })
}

/// A tensor to write: name, shape and stored dtype.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

/// Writes a safetensors file of `tensors`, in the given order, asking `bytes(i, out)` to
/// append the little-endian bytes of tensor `i` (checked against its shape and dtype).
/// Returns the number of elements written.
pub fn write_safetensors_bytes(
    path: &Path,
    tensors: &[TensorSpec],
    bytes: impl FnMut(usize, &mut Vec<u8>) -> Result<()>,
) -> Result<u64> {
    write_safetensors_bytes_with_metadata(path, tensors, &BTreeMap::new(), bytes)
}

/// [`write_safetensors_bytes`] with extra header `__metadata__` strings besides
/// `"format": "pt"` (an adapter's provenance, e.g. [`crate::adapter::BASE_FINGERPRINT_KEY`]).
pub fn write_safetensors_bytes_with_metadata(
    path: &Path,
    tensors: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
    mut bytes: impl FnMut(usize, &mut Vec<u8>) -> Result<()>,
) -> Result<u64> {
    let mut header = BTreeMap::new();
    let mut offset = 0u64;
    for t in tensors {
        let n_bytes = t.shape.iter().product::<usize>() as u64 * t.dtype.size() as u64;
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, offset + n_bytes]}),
        );
        offset += n_bytes;
    }
    let mut header = serde_json::to_value(header).map_err(|e| Error::format(path, e.to_string()))?;
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), json!("pt"));
    for (k, v) in metadata {
        meta.insert(k.clone(), json!(v));
    }
    header["__metadata__"] = Value::Object(meta);
    let mut text = serde_json::to_string(&header).map_err(|e| Error::format(path, e.to_string()))?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let file = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::new(file);
    let io = |e| Error::io(path, e);
    w.write_all(&(text.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(text.as_bytes()).map_err(io)?;
    let mut buf = Vec::new();
    let mut n_elems = 0;
    for (i, t) in tensors.iter().enumerate() {
        buf.clear();
        bytes(i, &mut buf)?;
        let n = t.shape.iter().product::<usize>();
        if buf.len() != n * t.dtype.size() {
            return Err(Error::tensor(
                &t.name,
                format!("{} bytes for shape {:?} in {}", buf.len(), t.shape, t.dtype.name()),
            ));
        }
        w.write_all(&buf).map_err(io)?;
        n_elems += n as u64;
    }
    let file = w.into_inner().map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(n_elems)
}

/// Copies a model directory's files other than its weights (config, tokenizer, generation
/// config, chat template) from `from` to `to`, letting `edit` change `config.json` on the way.
pub fn copy_model_files(from: &Path, to: &Path, edit: impl FnOnce(&mut Value)) -> Result<()> {
    let mut edit = Some(edit);
    for entry in fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !path.is_file() || name.ends_with(".safetensors") || name == "model.safetensors.index.json" {
            continue;
        }
        if name == "config.json" {
            let text = crate::fsutil::read_text_file(&path, crate::fsutil::MAX_JSON_BYTES)?;
            let mut v: Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
            if let Some(edit) = edit.take() {
                edit(&mut v);
            }
            write_json(&to.join(&name), &v)?;
        } else {
            fs::copy(&path, to.join(&name)).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}
