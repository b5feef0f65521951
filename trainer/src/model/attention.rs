//! Causal self-attention of a decoder block: rotary embeddings, grouped-query attention, the
//! sliding window (mistral) and the per-example masks of packed rows.

use super::{rope_ops, BaseModel, Block, Layout, Pass};
use crate::error::{Error, Result};
use crate::fused;
use tch::{Device, Kind, Tensor};

/// The longest sequence for which causal attention on a CPU runs as plain products
/// ([`BaseModel::causal_attention_products`]) instead of libtorch's flash kernel. Forward and
/// backward of SmolLM2's attention (9 query heads on 3 kv heads, batch 4, 2 threads): 7.9 vs
/// 12.3 ms at 128 tokens, even at 256, 188 vs 105 ms at 512.
const MATH_ATTENTION_MAX_SEQ: i64 = 128;

impl BaseModel {
    /// `x·cos + rotate_half(x)·sin` for `x` `[batch, heads, seq, head_dim]`, computed as
    /// `x·cos + [x2, x1]·[-sin, sin]` (the same products: negation is exact).
    fn apply_rope(x: &Tensor, cos: &Tensor, signed_sin: &Tensor) -> Result<Tensor> {
        if fused::applies(x) {
            // The fused kernel takes [batch, seq, heads, head_dim] (x is its transposed view)
            // and tables [1 or batch, seq, head_dim].
            let table = |t: &Tensor| if t.dim() == 2 { t.f_unsqueeze(0) } else { t.f_squeeze_dim(1) };
            let y = fused::rope(&x.f_transpose(1, 2)?, &table(cos)?, &table(signed_sin)?)?;
            return Ok(y.f_transpose(1, 2)?);
        }
        rope_ops(x, cos, signed_sin)
    }

    /// Causal attention as three batched products and a softmax, for `q` `[batch, heads, seq,
    /// head_dim]` and `k`, `v` `[batch, kv_heads, seq, head_dim]`: the query heads that share a
    /// kv head are stacked along the sequence axis (`[batch, kv_heads, group · seq, head_dim]`),
    /// so grouped-query attention multiplies each k and v once without copying them. It keeps
    /// the `[.., seq, seq]` probabilities for the backward, which the flash kernel recomputes:
    /// on a CPU that is faster at short sequences (see [`MATH_ATTENTION_MAX_SEQ`]).
    fn causal_attention_products(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let [batch, n_heads, seq, head_dim] = q.size()[..] else {
            return Err(Error::Input(format!("attention: queries of shape {:?}, not 4-d", q.size())));
        };
        let n_kv = k.size()[1];
        let group = n_heads / n_kv;
        let q = q.f_mul_scalar(scale)?.f_reshape([batch, n_kv, group * seq, head_dim])?;
        let scores = q.f_matmul(&k.f_transpose(-1, -2)?)?.f_view([batch, n_kv, group, seq, seq])?;
        let future = Tensor::f_full([seq, seq], f64::NEG_INFINITY, (q.kind(), q.device()))?.f_triu(1)?;
        let probs = scores.f_add(&future)?.f_softmax(-1, None::<Kind>)?.f_view([batch, n_kv, group * seq, seq])?;
        Ok(probs.f_matmul(v)?.f_view([batch, n_heads, seq, head_dim])?)
    }

    /// Causal self-attention of one block on `x` `[batch, seq, hidden]`.
    pub(super) fn attention(&self, b: &Block, x: &Tensor, layout: &Layout, pass: Pass) -> Result<Tensor> {
        let c = &self.config;
        let (batch, seq) = (x.size()[0], x.size()[1]);
        let (n_heads, n_kv, head_dim) = (c.num_attention_heads as i64, c.num_key_value_heads as i64, c.head_dim as i64);
        let heads =
            |t: Tensor, n: i64| -> Result<Tensor> { Ok(t.f_view([batch, seq, n, head_dim])?.f_transpose(1, 2)?) };
        let q = heads(self.project(&b.q_proj, x, pass)?, n_heads)?;
        let k = heads(self.project(&b.k_proj, x, pass)?, n_kv)?;
        let v = heads(self.project(&b.v_proj, x, pass)?, n_kv)?;
        let q = Self::apply_rope(&q, &layout.cos, &layout.signed_sin)?;
        let k = Self::apply_rope(&k, &layout.cos, &layout.signed_sin)?;
        // Grouped-query attention: each kv head serves n_heads / n_kv query heads (transformers'
        // repeat_kv), done inside the attention kernel (`enable_gqa`) instead of copying k and v.
        let gqa = n_heads != n_kv;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let window = c.sliding_window.map(|w| w as i64).filter(|&w| w < seq);
        let out = match (window, &layout.mask) {
            (None, None) if self.device == Device::Cpu && seq <= MATH_ATTENTION_MAX_SEQ => {
                Self::causal_attention_products(&q, &k, &v, scale)?
            }
            (None, None) => Tensor::f_scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, scale, gqa)?,
            (window, mask) => {
                // Key j is visible from query i when j <= i (and i - j < window, mistral), and
                // in packed rows when both belong to the same example.
                let i = Tensor::f_arange(seq, (Kind::Int64, self.device))?.f_unsqueeze(1)?;
                let j = Tensor::f_arange(seq, (Kind::Int64, self.device))?.f_unsqueeze(0)?;
                let d = i.f_sub(&j)?;
                let mut allowed = d.f_ge(0)?;
                if let Some(w) = window {
                    allowed = allowed.f_logical_and(&d.f_lt(w)?)?;
                }
                if let Some(m) = mask {
                    allowed = allowed.f_logical_and(m)?;
                }
                Tensor::f_scaled_dot_product_attention(&q, &k, &v, Some(&allowed), 0.0, false, scale, gqa)?
            }
        };
        let out = out.f_transpose(1, 2)?.f_contiguous()?.f_view([batch, seq, n_heads * head_dim])?;
        self.project(&b.o_proj, &out, pass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The short-sequence attention path computes libtorch's causal attention with grouped
    /// kv heads (`scaled_dot_product_attention`, `enable_gqa`): outputs and the gradients of
    /// q, k and v, for one token, a few, and the longest sequence it takes.
    #[test]
    fn attention_products_match_scaled_dot_product_attention() {
        let (batch, n_heads, n_kv, head_dim) = (2, 9, 3, 16);
        let scale = 1.0 / (head_dim as f64).sqrt();
        for seq in [1, 7, MATH_ATTENTION_MAX_SEQ] {
            tch::manual_seed(seq);
            let opts = (Kind::Float, Device::Cpu);
            let q = Tensor::randn([batch, n_heads, seq, head_dim], opts);
            let k = Tensor::randn([batch, n_kv, seq, head_dim], opts);
            let v = Tensor::randn([batch, n_kv, seq, head_dim], opts);
            let dout = Tensor::randn([batch, n_heads, seq, head_dim], opts);
            let run = |math: bool| {
                let leaves: Vec<Tensor> = [&q, &k, &v].iter().map(|t| t.copy().set_requires_grad(true)).collect();
                let (q, k, v) = (&leaves[0], &leaves[1], &leaves[2]);
                let out = if math {
                    BaseModel::causal_attention_products(q, k, v, scale).unwrap()
                } else {
                    Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, true, scale, true)
                };
                (&out * &dout).sum(Kind::Float).backward();
                (out.detach(), leaves.iter().map(Tensor::grad).collect::<Vec<_>>())
            };
            let ((want, want_g), (got, got_g)) = (run(false), run(true));
            let close = |a: &Tensor, b: &Tensor| {
                (a - b).abs().max().double_value(&[]) <= 2e-6 * b.abs().max().double_value(&[]).max(1.0)
            };
            assert!(close(&got, &want), "seq {seq}: outputs");
            for (name, (g, w)) in ["q", "k", "v"].iter().zip(got_g.iter().zip(&want_g)) {
                assert!(close(g, w), "seq {seq}: gradient of {name}");
            }
        }
    }
}
