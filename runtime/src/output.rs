//! Writing model directories: safetensors files streamed tensor by tensor, JSON files, and the
//! whole directory made in a uniquely named temporary sibling and renamed into place, so a
//! failure never leaves a half-written model behind and nothing the run did not create is ever
//! replaced (except what [`Replace`] allows). Single files (`batch`, `score`) are written the same
//! way by [`write_file_atomically`]. Temporaries are listed while they live so the CLI's signal
//! handler can remove them, and those of killed runs are removed by the next run into the same
//! place. Used by `peftrt import`, `merge`, `quantize`, `batch` and `score`.

use crate::error::{Error, Result};
use crate::fsutil::is_present;
use crate::weights::DType;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What may stand at an output directory's path when the new directory is renamed there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replace {
    /// Nothing: a directory or file that appears there while the output is written is left
    /// untouched and the write fails (`merge`, `quantize`, and two runs racing for one path).
    Nothing,
    /// An empty directory that was there at the start (`import` into an empty directory).
    EmptyDir,
    /// Whatever was there at the start (`import --force`); something that appeared only
    /// during the run is still never replaced.
    Existing,
}

/// Runs `fill(tmp)` on a fresh, uniquely named temporary sibling of `out_dir`, then renames
/// it to `out_dir`, which must not exist (see [`Replace::Nothing`]). On any error, and on
/// SIGINT/SIGTERM in the `peftrt` CLI, the temporary directory is removed.
pub fn write_dir_atomically<T>(out_dir: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    write_dir_atomically_with(out_dir, Replace::Nothing, fill)
}

/// [`write_dir_atomically`], replacing what `replace` allows. Temporaries left by processes
/// that no longer run (killed before they could clean up) are removed first.
pub fn write_dir_atomically_with<T>(
    out_dir: &Path,
    replace: Replace,
    fill: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let (parent, name) = parent_and_name(out_dir)?;
    let existed = is_present(out_dir);
    if existed && replace == Replace::Nothing {
        return Err(exists_error(out_dir));
    }
    // Parents that did not exist are created, and removed again if the write fails: an error
    // leaves nothing behind that was not there before.
    let created = CreatedDirs::create(&parent)?;
    remove_stale_temporaries(&parent, &name);
    let tmp =
        tempfile::Builder::new().prefix(&temp_prefix(&name)).tempdir_in(&parent).map_err(|e| Error::io(&parent, e))?;
    let _live = register_temporary(tmp.path());
    // On an error `tmp` is dropped, which removes it.
    let v = fill(tmp.path())?;
    let tmp = tmp.keep();
    if let Err(e) = move_into_place(&tmp, out_dir, replace, existed) {
        if let Err(rm) = fs::remove_dir_all(&tmp) {
            log::warn!("could not remove {}: {rm}", tmp.display());
        }
        return Err(e);
    }
    created.keep();
    Ok(v)
}

/// The missing ancestors of a directory, created by [`CreatedDirs::create`] and removed again
/// (innermost first, each only while empty) when dropped without [`CreatedDirs::keep`].
struct CreatedDirs(Vec<PathBuf>);

impl CreatedDirs {
    fn create(dir: &Path) -> Result<CreatedDirs> {
        let missing: Vec<PathBuf> =
            dir.ancestors().take_while(|a| !a.as_os_str().is_empty() && !a.exists()).map(Path::to_path_buf).collect();
        let created = CreatedDirs(missing);
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(created)
    }

    fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for CreatedDirs {
    fn drop(&mut self) {
        // `remove_dir` refuses a non-empty directory: anything another process put there stays.
        for d in &self.0 {
            let _ = fs::remove_dir(d);
        }
    }
}

fn parent_and_name(out: &Path) -> Result<(PathBuf, String)> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out.file_name().ok_or_else(|| Error::format(out, "not a file or directory name"))?;
    Ok((parent, name.to_string_lossy().into_owned()))
}

/// `.NAME.peftrt-tmp-PID-`: the start of every temporary's name, so that the next run can
/// tell whose it is.
fn temp_prefix(name: &str) -> String {
    format!(".{name}.peftrt-tmp-{}-", std::process::id())
}

fn exists_error(out: &Path) -> Error {
    Error::io(
        out,
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "already exists (it may have appeared while the output was written); it was left untouched: \
             choose a new output path",
        ),
    )
}

fn is_empty_dir(path: &Path) -> bool {
    fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none())
}

/// Renames `tmp` to `out_dir`, replacing only what `replace` allows and what was there at the
/// start (`existed`). `rename` itself never replaces a non-empty directory, so a directory
/// filled by someone else at the last moment still makes this fail rather than vanish.
fn move_into_place(tmp: &Path, out_dir: &Path, replace: Replace, existed: bool) -> Result<()> {
    let present = is_present(out_dir);
    match (replace, existed && present) {
        (_, false) if present => Err(exists_error(out_dir)),
        (Replace::EmptyDir, true) if !is_empty_dir(out_dir) => Err(exists_error(out_dir)),
        (Replace::Existing, true) => {
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
        }
        _ => fs::rename(tmp, out_dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::DirectoryNotEmpty | std::io::ErrorKind::AlreadyExists => exists_error(out_dir),
            _ => Error::io(out_dir, e),
        }),
    }
}

/// Checks, before any work, that `out` can be written as a file: not a directory or device,
/// in an existing directory, and not one of `inputs`.
pub fn check_output_file(out: &Path, inputs: &[&Path]) -> Result<()> {
    let (parent, _) = parent_and_name(out)?;
    let bad = |msg: String| Err(Error::io(out, std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)));
    if !parent.is_dir() {
        return bad(format!("the directory {} does not exist; create it first", parent.display()));
    }
    if let Ok(meta) = fs::metadata(out) {
        if !meta.is_file() {
            return bad("exists and is not a regular file (a directory or device); give a file path".into());
        }
        for input in inputs {
            if fs::canonicalize(input).ok() == fs::canonicalize(out).ok() {
                return bad(format!("is also the input {}; choose another output file", input.display()));
            }
        }
    }
    Ok(())
}

/// Writes `bytes` to `out` through a uniquely named temporary file beside it and a rename, so
/// no half-written file is left and no other file is touched. Call [`check_output_file`]
/// before the work that produces `bytes`.
pub fn write_file_atomically(out: &Path, bytes: &[u8]) -> Result<()> {
    let (parent, name) = parent_and_name(out)?;
    remove_stale_temporaries(&parent, &name);
    let mut tmp =
        tempfile::Builder::new().prefix(&temp_prefix(&name)).tempfile_in(&parent).map_err(|e| Error::io(&parent, e))?;
    let _live = register_temporary(tmp.path());
    tmp.write_all(bytes).and_then(|_| tmp.as_file().sync_all()).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(out).map_err(|e| Error::io(out, e.error))?;
    Ok(())
}

/// Temporary outputs being written now, removed by [`remove_live_temporaries`].
static LIVE_TEMPORARIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Keeps a temporary path in the list of live temporaries while it lives.
pub struct LiveTemporary(PathBuf);

impl Drop for LiveTemporary {
    fn drop(&mut self) {
        let mut live = LIVE_TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = live.iter().position(|p| *p == self.0) {
            live.swap_remove(i);
        }
    }
}

/// Records `path` as a temporary output being written, until the guard is dropped.
pub fn register_temporary(path: &Path) -> LiveTemporary {
    LIVE_TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner()).push(path.to_path_buf());
    LiveTemporary(path.to_path_buf())
}

/// Removes every temporary output being written (called by the CLI's SIGINT/SIGTERM handler
/// just before it exits). Returns the paths removed.
pub fn remove_live_temporaries() -> Vec<PathBuf> {
    // A few tries: the writer may still be adding files while the directory is removed.
    live_temporaries().into_iter().filter(|p| (0..5).any(|_| remove_path(p))).collect()
}

/// The temporary outputs being written now.
pub fn live_temporaries() -> Vec<PathBuf> {
    LIVE_TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn remove_path(p: &Path) -> bool {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).is_ok(),
        Ok(_) => fs::remove_file(p).is_ok(),
        Err(_) => false,
    }
}

/// Whether process `pid` still runs (assumed so where this cannot be told).
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else { return true };
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        if unsafe { libc::kill(pid, 0) } == 0 {
            return true;
        }
        std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes temporaries of `name` in `parent` (`.NAME.peftrt-tmp-PID...`) whose process no
/// longer runs: what a killed run left behind.
pub fn remove_stale_temporaries(parent: &Path, name: &str) {
    let prefix = format!(".{name}.peftrt-tmp-");
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|f| f.strip_prefix(&prefix)) else { continue };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(pid) = digits.parse::<u32>() else { continue };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        if remove_path(&path) {
            log::warn!("removed {}, left by process {pid}, which no longer runs", path.display());
        }
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

/// [`copy_model_files`] for a model loaded from a GGUF file: writes the `config.json`,
/// `generation_config.json`, `tokenizer.json` and `tokenizer_config.json` made from its metadata
/// (what `peftrt import` writes), letting `edit` change `config.json`.
pub fn write_model_files(
    files: &crate::gguf::import::ModelFiles,
    to: &Path,
    edit: impl FnOnce(&mut Value),
) -> Result<()> {
    let mut config = files.config.clone();
    edit(&mut config);
    write_json(&to.join("config.json"), &config)?;
    write_json(&to.join("generation_config.json"), &files.generation)?;
    write_json(&to.join("tokenizer.json"), &files.tokenizer)?;
    write_json(&to.join("tokenizer_config.json"), &files.tokenizer_config)
}

#[cfg(test)]
mod tests;
