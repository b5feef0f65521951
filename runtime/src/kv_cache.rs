//! The session's key/value cache ([`KvCache`]): every layer's keys and values for positions
//! `0..n_ctx`, written once per token and read by attention.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::session::zeroed;

/// Keys and values, each `[layers, n_kv_heads, n_ctx, head_dim]` f32.
pub(crate) struct KvCache {
    /// `[layers, n_kv_heads, n_ctx, head_dim]`
    pub(crate) k: Vec<f32>,
    /// `[layers, n_kv_heads, n_ctx, head_dim]`
    pub(crate) v: Vec<f32>,
    pub(crate) n_ctx: usize,
}

impl KvCache {
    /// A zeroed cache of `n_ctx` positions for the model `c` describes, or
    /// [`crate::Error::OutOfMemory`] naming the part that does not fit.
    pub(crate) fn new(c: &ModelConfig, n_ctx: usize) -> Result<KvCache> {
        let (layers, kv) = (c.num_hidden_layers, c.kv_dim());
        let k = zeroed("the KV cache's keys", &[layers, kv, n_ctx])?;
        let v = zeroed("the KV cache's values", &[layers, kv, n_ctx])?;
        Ok(KvCache { k, v, n_ctx })
    }

    /// Offset of `(layer, kv_head, pos)`.
    pub(crate) fn at(&self, c: &ModelConfig, layer: usize, kv_head: usize, pos: usize) -> usize {
        ((layer * c.num_key_value_heads + kv_head) * self.n_ctx + pos) * c.head_dim
    }

    /// Copies a batch's keys and values (`[n, kv_dim]`) to positions `pos0..pos0 + n`.
    pub(crate) fn store(&mut self, c: &ModelConfig, layer: usize, pos0: usize, n: usize, k: &[f32], v: &[f32]) {
        let (hd, kv_dim) = (c.head_dim, c.kv_dim());
        for t in 0..n {
            for kvh in 0..c.num_key_value_heads {
                let dst = self.at(c, layer, kvh, pos0 + t);
                let src = t * kv_dim + kvh * hd;
                self.k[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                self.v[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
    }
}
