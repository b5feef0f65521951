//! Reading input files defensively: only regular files (a FIFO would block forever, `/dev/zero`
//! never ends), and never more than a stated number of bytes (a multi-gigabyte "config.json"
//! fails with a clear error instead of exhausting memory). Every file peftrt reads whole goes
//! through [`read_regular_file`] or [`read_text_file`].

use crate::error::{Error, Result};
use std::fs;
use std::io::Read;
use std::path::Path;

/// Most bytes of a small JSON file (`config.json`, `adapter_config.json`,
/// `tokenizer_config.json`, `generation_config.json`, an index): real ones are kilobytes.
pub const MAX_JSON_BYTES: u64 = 64 << 20;
/// Most bytes of a `tokenizer.json` (the largest real ones are a few tens of MiB).
pub const MAX_TOKENIZER_BYTES: u64 = 512 << 20;
/// Most bytes of a chat template file (`chat_template.jinja`).
pub const MAX_TEMPLATE_BYTES: u64 = 16 << 20;
/// Most bytes of a text input (`batch --input`, `perplexity --text`).
pub const MAX_TEXT_BYTES: u64 = 1 << 30;

/// What a non-regular file is, for messages.
fn kind(meta: &fs::Metadata) -> &'static str {
    let ft = meta.file_type();
    if ft.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

fn not_regular(path: &Path, meta: &fs::Metadata) -> Error {
    Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("is {}, not a regular file; give the path of a file", kind(meta)),
        ),
    )
}

/// Whether something (anything, even a broken link) is at `path`.
pub fn is_present(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Opens `path` for reading if it is a regular file (checked before opening, since opening a
/// FIFO blocks, and again on the open file). Returns the file and its length.
pub fn open_regular_file(path: &Path) -> Result<(fs::File, u64)> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta));
    }
    let file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta));
    }
    Ok((file, meta.len()))
}

fn too_large(path: &Path, max_bytes: u64) -> Error {
    Error::format(
        path,
        format!(
            "is larger than {} MiB, more than a file of this kind can sensibly be; is it the right file?",
            max_bytes >> 20
        ),
    )
}

/// The bytes of the regular file `path`, refusing anything that is not a regular file or is
/// longer than `max_bytes` (also when it grows while being read).
pub fn read_regular_file(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let (file, len) = open_regular_file(path)?;
    if len > max_bytes {
        return Err(too_large(path, max_bytes));
    }
    let mut buf = Vec::with_capacity(len as usize);
    file.take(max_bytes.saturating_add(1)).read_to_end(&mut buf).map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 > max_bytes {
        return Err(too_large(path, max_bytes));
    }
    Ok(buf)
}

/// [`read_regular_file`] as UTF-8 text.
pub fn read_text_file(path: &Path, max_bytes: u64) -> Result<String> {
    String::from_utf8(read_regular_file(path, max_bytes)?)
        .map_err(|e| Error::format(path, format!("is not UTF-8 text ({e}); give a UTF-8 file")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_regular_file_and_refuses_a_long_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        fs::write(&p, "{}").unwrap();
        assert_eq!(read_text_file(&p, 2).unwrap(), "{}");
        let err = read_text_file(&p, 1).unwrap_err().to_string();
        assert!(err.contains("a.json") && err.contains("larger than"), "{err}");
    }

    #[test]
    fn refuses_a_directory_and_dev_zero() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_regular_file(dir.path(), MAX_JSON_BYTES).unwrap_err().to_string();
        assert!(err.contains("is a directory, not a regular file"), "{err}");
        #[cfg(unix)]
        {
            let err = read_regular_file(Path::new("/dev/zero"), MAX_JSON_BYTES).unwrap_err().to_string();
            assert!(err.contains("/dev/zero") && err.contains("character device"), "{err}");
        }
    }

    /// Regression (issue 18 row 10): a FIFO used to block forever when opened.
    #[cfg(unix)]
    #[test]
    fn refuses_a_fifo_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read_text_file(&p, MAX_JSON_BYTES).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("FIFO"), "{err}");
        assert!(is_present(&p));
    }
}
