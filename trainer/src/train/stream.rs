//! The micro-batch stream of a run: epoch after epoch in a seeded order, rows packed or one
//! example each, batches grouped by length or cut in order.

use super::TrainOptions;
use crate::data::{group_by_length, pack_rows, EpochPlan, SplitMix64};

/// The micro-batches of a run, epoch after epoch: each a list of rows, each row the indices of
/// its examples (one per row unless packing). Epochs are laid out when first needed.
pub(super) struct Stream<'a> {
    plan: EpochPlan,
    lens: Vec<usize>,
    opts: &'a TrainOptions,
    epochs: Vec<Vec<Vec<Vec<usize>>>>,
}

impl<'a> Stream<'a> {
    /// The stream of examples whose token counts are `lens`, each epoch drawn as `plan` says.
    pub(super) fn new(plan: EpochPlan, lens: Vec<usize>, opts: &'a TrainOptions) -> Self {
        Stream { plan, lens, opts, epochs: Vec::new() }
    }

    pub(super) fn epoch(&mut self, e: usize) -> &Vec<Vec<Vec<usize>>> {
        let o = self.opts;
        while self.epochs.len() <= e {
            let order = self.plan.order(o.seed, self.epochs.len() as u64, o.shuffle);
            let rows = if o.pack {
                pack_rows(&order, &self.lens, o.max_seq_len)
            } else {
                order.iter().map(|&i| vec![i]).collect()
            };
            let epoch = self.epochs.len() as u64;
            self.epochs.push(if o.group_by_length {
                group_by_length(rows, &self.lens, o.batch_size, o.seed ^ epoch.wrapping_mul(SplitMix64::GAMMA))
            } else {
                rows.chunks(o.batch_size).map(<[_]>::to_vec).collect()
            });
        }
        &self.epochs[e]
    }

    /// Micro-batch `m` of the run (counting through the epochs).
    pub(super) fn micro_batch(&mut self, mut m: u64) -> Vec<Vec<usize>> {
        let mut e = 0;
        loop {
            let n = self.epoch(e).len() as u64;
            if m < n {
                return self.epochs[e][m as usize].clone();
            }
            m -= n;
            e += 1;
        }
    }

    /// The optimiser steps of the run: `--max-steps`, or enough for `--epochs` (at least one).
    pub(super) fn total_steps(&mut self) -> u64 {
        let o = self.opts;
        match o.max_steps {
            Some(s) => s,
            None => {
                let full = o.epochs.floor() as usize;
                let mut micro: f64 = (0..full).map(|e| self.epoch(e).len() as f64).sum();
                micro += o.epochs.fract() * self.epoch(full).len() as f64;
                (micro / o.grad_accum as f64).ceil().max(1.0) as u64
            }
        }
    }

    /// The examples that the first `steps` steps train on, in index order, each once.
    pub(super) fn examples_used(&mut self, steps: u64) -> Vec<usize> {
        let used: std::collections::BTreeSet<usize> =
            (0..steps * self.opts.grad_accum as u64).flat_map(|m| self.micro_batch(m).concat()).collect();
        used.into_iter().collect()
    }
}
