//! The seeded orders of a run: each epoch's examples (with the mixed-in ones taking turns),
//! the held-out evaluation split, length-grouped batches, and the small generator behind them.

use super::Example;
use crate::error::{Error, Result};

/// Rows of similar length batched together (transformers' `group_by_length`): the rows, in
/// their (shuffled) order, are cut into windows of `GROUP_WINDOW` batches; each window is
/// sorted by length, longest first, and cut into batches of `batch_size`; then the batches of
/// the epoch are shuffled with `seed`. Every row is kept exactly once, and a batch pads to a
/// length close to each of its rows' instead of to the longest of a random draw.
pub fn group_by_length(rows: Vec<Vec<usize>>, lens: &[usize], batch_size: usize, seed: u64) -> Vec<Vec<Vec<usize>>> {
    let row_len = |r: &Vec<usize>| r.iter().map(|&i| lens[i]).sum::<usize>();
    let mut batches: Vec<Vec<Vec<usize>>> = Vec::new();
    for window in rows.chunks(batch_size * GROUP_WINDOW) {
        let mut window = window.to_vec();
        // Stable: rows of equal length keep their shuffled order.
        window.sort_by_key(|r| std::cmp::Reverse(row_len(r)));
        batches.extend(window.chunks(batch_size).map(<[_]>::to_vec));
    }
    SplitMix64::new(seed ^ 0x6c65_6e67_7468).shuffle(&mut batches);
    batches
}

/// Batches per sorting window of [`group_by_length`].
pub const GROUP_WINDOW: usize = 32;

/// A small, fixed pseudo-random generator (SplitMix64) for shuffling: the order depends only
/// on the seed, on every platform and in every version.
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// The state's increment (2⁶⁴ / φ).
    pub const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The output function: a bijective 64-bit mix of the state.
    pub fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::GAMMA);
        Self::mix(self.0)
    }

    /// Uniform in `0..n` (n > 0), by rejection (no modulo bias).
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Holds out `fraction` of `examples` (at least one, at least one left to train on) for
/// evaluation, chosen by a permutation seeded with `seed`; both parts keep file order.
pub fn split_eval(examples: Vec<Example>, fraction: f64, seed: u64) -> Result<(Vec<Example>, Vec<Example>)> {
    let n = examples.len();
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(Error::Input(format!("--eval-split {fraction}: expected a fraction between 0 and 1")));
    }
    let k = ((n as f64 * fraction).round() as usize).max(1);
    if k >= n {
        return Err(Error::Input(format!(
            "--eval-split {fraction}: the data has {n} example(s), too few to hold out {k} and train on the rest"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed ^ 0x5eed_e7a1).shuffle(&mut order);
    let mut held = vec![false; n];
    for &i in &order[..k] {
        held[i] = true;
    }
    let (eval, train): (Vec<_>, Vec<_>) = examples.into_iter().zip(held).partition(|(_, h)| *h);
    Ok((train.into_iter().map(|(e, _)| e).collect(), eval.into_iter().map(|(e, _)| e).collect()))
}

/// Which examples each epoch trains on: all `n_main` training examples, plus `per_epoch_mix`
/// of the `n_mix` general-instruction examples of `--mix-data` (indices `n_main..`), taken in
/// turn from a seeded permutation so that successive epochs see different ones.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochPlan {
    pub n_main: usize,
    pub n_mix: usize,
    pub per_epoch_mix: usize,
}

impl EpochPlan {
    /// Without mixed-in data.
    pub fn plain(n_main: usize) -> Self {
        EpochPlan { n_main, n_mix: 0, per_epoch_mix: 0 }
    }

    /// `ratio` of every epoch's examples drawn from the `n_mix` mixed-in ones.
    pub fn mixed(n_main: usize, n_mix: usize, ratio: f64) -> Result<Self> {
        if !(ratio > 0.0 && ratio < 1.0) {
            return Err(Error::Input(format!("--mix-ratio {ratio}: expected a fraction between 0 and 1")));
        }
        let per_epoch_mix = ((n_main as f64 * ratio / (1.0 - ratio)).round() as usize).max(1);
        Ok(EpochPlan { n_main, n_mix, per_epoch_mix })
    }

    /// Examples per epoch.
    pub fn len(&self) -> usize {
        self.n_main + self.per_epoch_mix
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The examples of `epoch`, in training order: shuffled together (seeded), or without
    /// shuffling the training examples in file order followed by the mixed-in ones.
    pub fn order(&self, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.n_main).collect();
        if self.per_epoch_mix > 0 {
            let mut mix: Vec<usize> = (0..self.n_mix).collect();
            SplitMix64::new(seed ^ 0x0417_a11c).shuffle(&mut mix);
            let start = epoch as usize * self.per_epoch_mix;
            order.extend((0..self.per_epoch_mix).map(|j| self.n_main + mix[(start + j) % self.n_mix]));
        }
        if shuffle {
            SplitMix64::new(seed ^ epoch.wrapping_mul(0xa076_1d64_78bd_642f)).shuffle(&mut order);
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffles_are_seeded_permutations() {
        let p = EpochPlan::plain(50);
        let a = p.order(7, 0, true);
        assert_eq!(a, p.order(7, 0, true));
        assert_ne!(a, p.order(7, 1, true));
        assert_ne!(a, p.order(8, 0, true));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(EpochPlan::plain(5).order(7, 0, false), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn length_groups_keep_every_row_once_and_pad_less() {
        let mut rng = SplitMix64::new(5);
        let lens: Vec<usize> = (0..1000).map(|_| 20 + rng.below(400) as usize).collect();
        let rows: Vec<Vec<usize>> = (0..1000).map(|i| vec![i]).collect();
        let padded = |batches: &[Vec<Vec<usize>>]| -> usize {
            batches.iter().map(|b| b.len() * b.iter().map(|r| lens[r[0]]).max().unwrap()).sum()
        };
        let plain: Vec<Vec<Vec<usize>>> = rows.chunks(4).map(<[_]>::to_vec).collect();
        let grouped = group_by_length(rows.clone(), &lens, 4, 9);
        let mut seen: Vec<usize> = grouped.iter().flatten().map(|r| r[0]).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        assert!(grouped.iter().all(|b| b.len() == 4));
        let real: usize = lens.iter().sum();
        assert!(padded(&grouped) - real < (padded(&plain) - real) / 5, "grouping must cut padding");
        // A function of the seed; the batch order changes with it.
        assert_eq!(grouped, group_by_length(rows.clone(), &lens, 4, 9));
        assert_ne!(grouped, group_by_length(rows, &lens, 4, 10));
    }

    #[test]
    fn mixed_epochs_take_turns_through_the_mix_data() {
        // 10 examples, ratio 1/6: 2 mixed-in examples per epoch out of 5.
        let p = EpochPlan::mixed(10, 5, 1.0 / 6.0).unwrap();
        assert_eq!((p.per_epoch_mix, p.len()), (2, 12));
        let e0 = p.order(1, 0, false);
        assert_eq!(&e0[..10], &(0..10).collect::<Vec<_>>()[..]);
        let mut seen: Vec<usize> = (0..3).flat_map(|e| p.order(1, e, false)[10..].to_vec()).collect();
        assert!(seen.iter().all(|&i| (10..15).contains(&i)));
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 5, "three epochs of two cover all five mixed-in examples");
        let mut shuffled = p.order(1, 0, true);
        shuffled.sort();
        let mut plain = e0.clone();
        plain.sort();
        assert_eq!(shuffled, plain, "shuffling permutes the same epoch");
        assert!(EpochPlan::mixed(10, 5, 1.0).is_err());
    }

    #[test]
    fn eval_split_is_seeded_and_disjoint() {
        let ex = |i: usize| Example { ids: vec![i as i64, 1], trained: vec![false, true], line: i + 1 };
        let all: Vec<Example> = (0..20).map(ex).collect();
        let (train, eval) = split_eval(all.clone(), 0.25, 3).unwrap();
        assert_eq!((train.len(), eval.len()), (15, 5));
        let (_, again) = split_eval(all.clone(), 0.25, 3).unwrap();
        assert_eq!(eval, again);
        assert!(eval.iter().all(|e| !train.contains(e)));
        assert!(train.windows(2).all(|w| w[0].line < w[1].line), "file order kept");
        assert!(split_eval(all[..1].to_vec(), 0.5, 3).is_err());
        assert!(split_eval(all, 1.5, 3).is_err());
    }
}
