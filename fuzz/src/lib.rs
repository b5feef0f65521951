//! Helpers shared by peftrt's fuzz targets (`fuzz_targets/*.rs`; docs/fuzzing.md).
//!
//! The loaders under test read files (safetensors files are memory-mapped), so a target writes
//! its input into a scratch directory of its own process and opens it from there. The scratch
//! directories live under `$PEFTRT_FUZZ_TMP` (default `/dev/shm` when present, else the system
//! temporary directory), one per process; those of processes that are gone are removed at start
//! (libFuzzer exits without running destructors, and its fork mode starts many processes).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The committed fixtures (`tests/fixtures`).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The tiny Llama fixture model directory.
pub fn tiny_llama_dir() -> PathBuf {
    fixtures().join("tiny-llama")
}

/// This process's scratch directory (created on first use).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::var_os("PEFTRT_FUZZ_TMP").map(PathBuf::from).unwrap_or_else(|| {
            let shm = Path::new("/dev/shm");
            if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            }
        });
        let base = base.join("peftrt-fuzz");
        std::fs::create_dir_all(&base).expect("create the fuzz scratch directory");
        // Remove the scratch directories of processes that no longer run.
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let name = e.file_name();
                let gone = name
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists());
                if gone {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = base.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the fuzz scratch directory");
        dir
    })
}

/// A fresh subdirectory `name` of the scratch directory.
pub fn scratch_subdir(name: &str) -> PathBuf {
    let dir = scratch().join(name);
    std::fs::create_dir_all(&dir).expect("create a fuzz scratch subdirectory");
    dir
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write a fuzz input file");
    path
}

/// The tiny Llama model (no tokenizer), loaded once per process.
pub fn tiny_llama() -> &'static peftrt::Model {
    static MODEL: OnceLock<peftrt::Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        peftrt::Model::load(&tiny_llama_dir(), &peftrt::LoadOptions { no_tokenizer: true, ..Default::default() })
            .expect("load the tiny-llama fixture")
    })
}

/// Splits `data` into two parts: the first two bytes (little-endian) give the first part's
/// length, clamped to what is there. Seeds are written this way by `fuzz/seed.sh`.
pub fn split2(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (data, &[]);
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    data[2..].split_at(n)
}
