//! [`AdapterRegistry`]: adapters loaded against one model, by name, as a server or the C API
//! keeps them.

use super::{Adapter, AdapterOptions};
use crate::error::{Error, Result};
use crate::model::Model;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Adapters loaded against one model, by name: the registry a server or the C API keeps.
/// An adapter can be unloaded only when no session holds it any more.
pub struct AdapterRegistry {
    model: Arc<Model>,
    adapters: BTreeMap<String, Arc<Adapter>>,
}

impl AdapterRegistry {
    pub fn new(model: Arc<Model>) -> Self {
        AdapterRegistry { model, adapters: BTreeMap::new() }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Loads the adapter in `dir` under `name` (which must be new).
    pub fn load(&mut self, name: &str, dir: &Path, opts: &AdapterOptions) -> Result<Arc<Adapter>> {
        if self.adapters.contains_key(name) {
            return Err(Error::Input(format!("an adapter named `{name}` is already loaded; unload it first")));
        }
        let mut a = Adapter::load_with(dir, &self.model, opts)?;
        a.name = name.to_string();
        let a = Arc::new(a);
        self.adapters.insert(name.to_string(), a.clone());
        Ok(a)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Adapter>> {
        self.adapters.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.adapters.keys().map(String::as_str)
    }

    /// Unloads `name`, releasing its memory map; refused while a session still uses it.
    pub fn unload(&mut self, name: &str) -> Result<()> {
        let a = self.adapters.get(name).ok_or_else(|| Error::Input(format!("no adapter named `{name}` is loaded")))?;
        let users = Arc::strong_count(a) - 1;
        if users > 0 {
            return Err(Error::Input(format!(
                "adapter `{name}` is still held by {users} session(s) or handle(s); deactivate it there first"
            )));
        }
        self.adapters.remove(name);
        Ok(())
    }
}
