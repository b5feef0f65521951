//! The frozen prefix of a run that adapts only the upper blocks (`--layers`).
//!
//! When the lowest block with a LoRA layer is `start`, blocks `0..start` hold no trainable
//! weight and draw no dropout mask: their output for an example is the same at every step of
//! every epoch. [`PrefixCache`] computes it once per example before training, in batches of
//! similar lengths of up to [`BATCH_TOKENS`] tokens, and each step then runs blocks `start..`
//! only, forward and backward. A step saves the prefix's forward pass (with `--layers 20-29` of
//! SmolLM2's 30 blocks, about half of it), and the one pass over the data dequantises each
//! NF4 block once per cache batch rather than once per micro-batch.
//!
//! The cached values are those the step would compute, up to the last bits of matrix products
//! whose row count differs (a cache batch is not the step's batch): a run with the cache is
//! bit-reproducible like any other, and agrees with one without it to rounding.

use crate::data::{Batch, Example};
use crate::error::{Error, Result};
use crate::lora::LoraSet;
use crate::model::{BaseModel, Pass};
use tch::{Device, Tensor};

/// Tokens (padding included) in one batch of the pass that fills the cache.
pub const BATCH_TOKENS: usize = 4096;

/// The output of the frozen blocks `0..start` for each example a run uses, kept on the CPU.
pub struct PrefixCache {
    start: usize,
    /// `[len, hidden]` per example (`None` for those the run never uses), in the model's
    /// compute dtype.
    states: Vec<Option<Tensor>>,
}

impl PrefixCache {
    /// The bytes the cache of `examples[i]` for each `i` in `used` would hold.
    pub fn bytes(model: &BaseModel, examples: &[Example], used: &[usize]) -> u64 {
        let tokens: usize = used.iter().map(|&i| examples[i].ids.len()).sum();
        (tokens * model.config.hidden_size) as u64 * model.kind.elt_size_in_bytes() as u64
    }

    /// Runs blocks `0..start` over the examples `used` (indices into `examples`, padded with
    /// `pad`), `start` being the lowest block `lora` adapts; `None` when that is block 0
    /// (nothing is frozen below it).
    pub fn build(
        model: &BaseModel,
        lora: &LoraSet,
        examples: &[Example],
        used: &[usize],
        pad: i64,
    ) -> Result<Option<PrefixCache>> {
        let start = model.first_adapted_block(lora);
        if start == 0 || used.is_empty() {
            return Ok(None);
        }
        let _guard = tch::no_grad_guard();
        let mut order = used.to_vec();
        order.sort_unstable();
        order.dedup();
        order.sort_by_key(|&i| std::cmp::Reverse(examples[i].ids.len()));
        let mut states: Vec<Option<Tensor>> = (0..examples.len()).map(|_| None).collect();
        let mut rest = &order[..];
        while !rest.is_empty() {
            // Longest first, so the first example of a chunk sets its padded length.
            let per = (BATCH_TOKENS / examples[rest[0]].ids.len().max(1)).clamp(1, rest.len());
            let (chunk, tail) = rest.split_at(per);
            rest = tail;
            let batch = Batch::new(&chunk.iter().map(|&i| &examples[i]).collect::<Vec<_>>(), pad)?;
            let ids = batch.ids.f_to(model.device)?;
            let layout = model.causal_layout(ids.size()[1])?;
            let mut h = model.embed(&ids)?;
            for b in 0..start {
                h = model.block_at(b, &h, &layout, Pass::new(Some(lora), false))?;
            }
            let h = h.f_to(Device::Cpu)?;
            for (row, &i) in chunk.iter().enumerate() {
                let len = examples[i].ids.len() as i64;
                states[i] = Some(h.f_get(row as i64)?.f_narrow(0, 0, len)?.f_contiguous()?);
            }
        }
        Ok(Some(PrefixCache { start, states }))
    }

    /// The first block a step runs.
    pub fn start(&self) -> usize {
        self.start
    }

    /// The input `[rows, seq, hidden]` of block `start` for the examples `rows` (indices into
    /// those the cache was built from, each one it was built for), right-padded with zeros to
    /// the longest, on `device`. Padding positions are never attended to by real tokens
    /// (causal attention, right padding) and carry no loss, so their values do not matter.
    pub fn batch(&self, rows: &[usize], device: Device) -> Result<Tensor> {
        let states = rows
            .iter()
            .map(|&i| {
                self.states.get(i).and_then(Option::as_ref).ok_or_else(|| {
                    Error::Input(format!("example {i}: not in the frozen-prefix cache (built for other examples)"))
                })
            })
            .collect::<Result<Vec<&Tensor>>>()?;
        Ok(Tensor::f_pad_sequence(&states, true, 0.0, "right")?.f_to(device)?)
    }
}
