//! The adapters the server serves, each under a model id: those given at start (`--adapter
//! NAME=DIR[:SCALE]`) and those loaded over the network (`POST /v1/load_lora_adapter`), only
//! from under `--adapter-dir`, within limits on their number and total size.
//!
//! Requests hold an `Arc` of each adapter they use: unloading removes the name, and a request
//! already running keeps computing with the adapter it started with.

use crate::error::ApiError;
use axum::http::StatusCode;
use peftrt::adapter::{AdapterFile, AdapterOptions};
use peftrt::{Adapter, Model};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// One served adapter.
pub struct Served {
    pub adapter: Arc<Adapter>,
    /// The scale a request gets when it does not give one.
    pub scale: f32,
    /// Size of its `adapter_model.safetensors`.
    pub bytes: u64,
}

/// Limits and where network loads may come from.
#[derive(Clone, Debug)]
pub struct AdapterLimits {
    /// Most adapters loaded at once.
    pub max_count: usize,
    /// Most bytes of adapter weight files loaded at once.
    pub max_bytes: u64,
    /// The only directory `load_lora_adapter` may load from (canonical); `None`: loading over the
    /// network is off.
    pub root: Option<PathBuf>,
}

pub struct Adapters {
    map: RwLock<BTreeMap<String, Arc<Served>>>,
    pub limits: AdapterLimits,
    pub options: AdapterOptions,
}

/// Longest model id an adapter may have.
const MAX_NAME: usize = 128;

/// Checks an adapter's name: it becomes a model id in URLs, logs and metrics.
pub fn check_name(name: &str, base: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(
            ApiError::bad_request(format!("an adapter name must have 1 to {MAX_NAME} bytes")).param("lora_name")
        );
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::bad_request(format!(
            "adapter name {name:?} holds whitespace or control characters; use letters, digits and -_.:/"
        ))
        .param("lora_name"));
    }
    if name == base {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{name:?} is the base model's id; choose another name"),
        )
        .param("lora_name"));
    }
    Ok(())
}

impl Adapters {
    pub fn new(limits: AdapterLimits, options: AdapterOptions) -> Adapters {
        Adapters { map: RwLock::new(BTreeMap::new()), limits, options }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Served>>> {
        // A panic while holding the lock cannot leave the map half-changed (each change is one
        // insert or remove), so a poisoned lock is still good.
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, name: &str) -> Option<Arc<Served>> {
        self.read().get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// Count and total bytes.
    pub fn usage(&self) -> (usize, u64) {
        let m = self.read();
        (m.len(), m.values().map(|s| s.bytes).sum())
    }

    /// Whether `name` may be added now, with `bytes` more.
    fn check_room(&self, map: &BTreeMap<String, Arc<Served>>, name: &str, bytes: u64) -> Result<(), ApiError> {
        if map.contains_key(name) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("an adapter named {name:?} is already loaded; unload it first or choose another name"),
            )
            .param("lora_name"));
        }
        if map.len() >= self.limits.max_count {
            return Err(ApiError::bad_request(format!(
                "{} adapters are loaded, the most this server allows (--max-adapters); unload one first",
                map.len()
            ))
            .code("adapter_limit"));
        }
        let total: u64 = map.values().map(|s| s.bytes).sum();
        if total + bytes > self.limits.max_bytes {
            return Err(ApiError::bad_request(format!(
                "loading {bytes} more bytes of adapter weights would pass the server's limit of {} bytes \
                 ({total} loaded; --max-adapter-bytes); unload an adapter first",
                self.limits.max_bytes
            ))
            .code("adapter_limit"));
        }
        Ok(())
    }

    /// Loads the adapter in `dir` for `model` as `name` (model work: call it off the async
    /// executor). `shown` is how `dir` is named in error messages.
    pub fn load(&self, model: &Model, name: &str, dir: &Path, scale: f32, shown: &str) -> Result<(), ApiError> {
        peftrt::adapter::check_scale(name, scale).map_err(|e| ApiError::bad_request(e.to_string()))?;
        self.check_room(&self.read(), name, 0)?;
        let hide = |e: peftrt::Error| {
            let msg = e.to_string().replace(&dir.display().to_string(), shown);
            let status = match e {
                peftrt::Error::Io { .. } => StatusCode::NOT_FOUND,
                _ => StatusCode::BAD_REQUEST,
            };
            ApiError::new(status, format!("cannot load the adapter {shown}: {msg}")).param("lora_path")
        };
        let file = AdapterFile::open(dir).map_err(hide)?;
        let bytes = file.file_bytes;
        self.check_room(&self.read(), name, bytes)?;
        let adapter = Adapter::bind(file, model, &self.options).map_err(hide)?;
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        // Checked again under the write lock: another load may have finished meanwhile.
        self.check_room(&map, name, bytes)?;
        map.insert(name.to_string(), Arc::new(Served { adapter: Arc::new(adapter), scale, bytes }));
        Ok(())
    }

    pub fn unload(&self, name: &str) -> Result<(), ApiError> {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        match map.remove(name) {
            Some(_) => Ok(()),
            None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no adapter named {name:?} is loaded"))
                .param("lora_name")
                .code("model_not_found")),
        }
    }

    /// The directory a network request names, if it lies under `--adapter-dir` once every
    /// symbolic link and `..` is resolved (its two files too: a link inside the directory must
    /// not lead out of it). Relative paths are taken from `--adapter-dir`.
    pub fn confine(&self, path: &str) -> Result<PathBuf, ApiError> {
        let Some(root) = &self.limits.root else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "this server does not load adapters over the network; start it with --adapter-dir DIR to allow \
                 loading adapters from under DIR",
            ));
        };
        if path.is_empty() || path.contains('\0') {
            return Err(ApiError::bad_request("\"lora_path\" must be a non-empty path").param("lora_path"));
        }
        let outside = || {
            ApiError::new(
                StatusCode::FORBIDDEN,
                format!("\"lora_path\" {path:?} is not under the server's adapter directory (--adapter-dir)"),
            )
            .param("lora_path")
        };
        let joined = root.join(path);
        let dir = match joined.canonicalize() {
            Ok(d) => d,
            Err(_) if !joined.starts_with(root) => return Err(outside()),
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("no adapter directory {path:?} under the server's adapter directory"),
                )
                .param("lora_path"))
            }
        };
        if !dir.starts_with(root) || dir == *root {
            return Err(outside());
        }
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            if let Ok(p) = dir.join(f).canonicalize() {
                if !p.starts_with(root) {
                    return Err(outside());
                }
            }
        }
        Ok(dir)
    }
}
