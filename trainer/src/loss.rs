//! The loss of a batch: the summed cross-entropy of its response tokens (prompt and padding
//! positions carry the label −100 and no loss), and one training micro-batch's forward and
//! backward, with gradient checkpointing or without.

use crate::data::{Batch, IGNORE};
use crate::error::Result;
use crate::lora::LoraSet;
use crate::model::{BaseModel, Layout, Pass};
use tch::{Reduction, Tensor};

/// The positions of a batch that carry a loss: `rows` indexes the flattened `[batch * seq]`
/// positions whose label is not −100, `labels` holds their labels (both on the model's device).
struct LossPositions {
    rows: Tensor,
    labels: Tensor,
}

impl LossPositions {
    fn of(model: &BaseModel, labels: &Tensor) -> Result<LossPositions> {
        // On the CPU, where the batch is built: no device synchronisation for `nonzero`.
        let labels = labels.f_reshape([-1])?;
        let rows = labels.f_ne(IGNORE)?.f_nonzero()?.f_reshape([-1])?;
        Ok(LossPositions {
            labels: labels.f_index_select(0, &rows)?.f_to(model.device)?,
            rows: rows.f_to(model.device)?,
        })
    }
}

/// The summed cross-entropy of the labelled positions of the last block's output `h`
/// `[batch, seq, hidden]`. The final norm and the head run at those positions only: with a
/// vocabulary of 49152 the head is a fifth of a small model's multiply-adds, and the f32
/// logits of prompt and padding positions would only be thrown away.
fn loss_sum(model: &BaseModel, h: &Tensor, positions: &LossPositions, pass: Pass) -> Result<Tensor> {
    let hidden = h.size()[2];
    let h = h.f_reshape([-1, hidden])?.f_index_select(0, &positions.rows)?;
    let logits = model.head(&h, pass)?;
    Ok(logits.f_cross_entropy_loss::<Tensor>(&positions.labels, None, Reduction::Sum, IGNORE, 0.0)?)
}

/// The layout of a batch: packed rows, or plain sequences from position 0.
fn layout_of(model: &BaseModel, b: &Batch) -> Result<Layout> {
    match &b.packing {
        Some((positions, segments)) => model.packed_layout(positions, segments),
        None => model.causal_layout(b.ids.size()[1]),
    }
}

/// The output of the frozen blocks for a batch, cached: the first block to run and its input.
pub type Cached = Option<(usize, Tensor)>;

/// The first block to run for `b` and its input: `cached`, or block 0 and the embeddings.
fn block_input(model: &BaseModel, b: &Batch, cached: Cached) -> Result<(usize, Tensor)> {
    match cached {
        Some(c) => Ok(c),
        None => Ok((0, model.embed(&b.ids.f_to(model.device)?)?)),
    }
}

/// The summed cross-entropy of `batch`'s labelled positions (f32 logits), from `cached` on.
/// The pass's dropout masks are not reseeded.
pub fn loss_from(model: &BaseModel, batch: &Batch, cached: Cached, pass: Pass) -> Result<Tensor> {
    let (start, h0) = block_input(model, batch, cached)?;
    let h = model.hidden_from(start, h0, &layout_of(model, batch)?, pass)?;
    loss_sum(model, &h, &LossPositions::of(model, &batch.labels)?, pass)
}

/// The summed cross-entropy of `batch`'s labelled positions (f32 logits).
pub fn batch_loss_sum(model: &BaseModel, batch: &Batch, pass: Pass) -> Result<Tensor> {
    loss_from(model, batch, None, pass)
}

/// Forward and backward of one micro-batch, its loss scaled by `1 / n_targets` (the step's
/// response tokens); gradients accumulate into the LoRA weights. Returns the scaled loss.
/// With `cached`, the frozen blocks below the cache's start are not run: their output for the
/// batch is the given tensor.
///
/// With `checkpoint`, only the blocks' inputs are kept from a gradient-free forward pass; the
/// backward pass then recomputes one block at a time with gradients, from the last to the
/// first, feeding each the gradient of its output (activation memory of one block instead of
/// all). Both ways draw the same dropout masks (seeded per block) and give the same gradients.
pub fn micro_batch(
    model: &BaseModel,
    lora: &LoraSet,
    b: &Batch,
    n_targets: i64,
    dropout_seed: i64,
    checkpoint: bool,
    cached: Cached,
) -> Result<f64> {
    let positions = LossPositions::of(model, &b.labels)?;
    let pass = Pass::new(Some(lora), true).with_dropout_seed(dropout_seed);
    let layout = layout_of(model, b)?;
    let (start, h0) = block_input(model, b, cached)?;
    if !checkpoint {
        let h = model.hidden_from(start, h0, &layout, pass)?;
        let loss = loss_sum(model, &h, &positions, pass)?.f_div_scalar(n_targets as f64)?;
        loss.f_backward()?;
        return Ok(loss.f_double_value(&[])?);
    }
    let mut inputs = Vec::with_capacity(model.n_blocks() - start);
    let last = tch::no_grad(|| -> Result<Tensor> {
        let mut h = h0;
        for i in start..model.n_blocks() {
            let next = model.block_at(i, &h, &layout, pass)?;
            inputs.push(h);
            h = next;
        }
        Ok(h)
    })?;
    let last = last.f_detach()?.set_requires_grad(true);
    let loss = loss_sum(model, &last, &positions, pass)?.f_div_scalar(n_targets as f64)?;
    loss.f_backward()?;
    let mut grad = last.grad();
    for (i, input) in inputs.iter().enumerate().map(|(k, x)| (start + k, x)).rev() {
        let x = input.f_detach()?.set_requires_grad(true);
        let y = model.block_at(i, &x, &layout, pass)?;
        y.f_mul(&grad)?.f_sum(y.kind())?.f_backward()?;
        grad = x.grad();
    }
    Ok(loss.f_double_value(&[])?)
}
