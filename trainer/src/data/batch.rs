//! Batches of tokenised examples: right-padded rows of one example each, or packed rows of
//! several (each with its own positions and labels), and the packing of examples into rows.

use super::Example;
use crate::error::Result;

/// A padded batch of examples.
pub struct Batch {
    /// `[batch, seq]` Int64, right-padded.
    pub ids: tch::Tensor,
    /// `[batch, seq]` Int64: the token each position should predict, or −100 (prompt, padding,
    /// last position).
    pub labels: tch::Tensor,
    /// Positions counted in the loss.
    pub n_targets: i64,
    /// Real (unpadded) tokens.
    pub n_tokens: i64,
    /// For packed rows: `[batch, seq]` positions restarting at 0 with each example, and the
    /// example number of each token within its row (−1 for padding).
    pub packing: Option<(tch::Tensor, tch::Tensor)>,
}

/// The label ignored by the loss (PyTorch's `ignore_index` default).
pub const IGNORE: i64 = -100;

impl Batch {
    /// Right-pads `examples` with `pad` to the longest; labels are shifted so position `t`
    /// predicts token `t + 1` when that token is trained.
    pub fn new(examples: &[&Example], pad: i64) -> Result<Batch> {
        let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(examples.len() * len);
        let mut labels = Vec::with_capacity(examples.len() * len);
        let (mut n_targets, mut n_tokens) = (0, 0);
        for e in examples {
            let n = e.ids.len();
            ids.extend_from_slice(&e.ids);
            ids.extend(std::iter::repeat_n(pad, len - n));
            for t in 0..len {
                let label = if t + 1 < n && e.trained[t + 1] { e.ids[t + 1] } else { IGNORE };
                n_targets += i64::from(label != IGNORE);
                labels.push(label);
            }
            n_tokens += n as i64;
        }
        let shape = [examples.len() as i64, len as i64];
        Ok(Batch {
            ids: tch::Tensor::f_from_slice(&ids)?.f_reshape(shape)?,
            labels: tch::Tensor::f_from_slice(&labels)?.f_reshape(shape)?,
            n_targets,
            n_tokens,
            packing: None,
        })
    }

    /// Rows of several examples each, concatenated and right-padded to the longest row; each
    /// example keeps its own positions and labels (no prediction across examples).
    pub fn packed(rows: &[Vec<&Example>], pad: i64) -> Result<Batch> {
        let len = rows.iter().map(|r| r.iter().map(|e| e.ids.len()).sum::<usize>()).max().unwrap_or(0);
        let cap = rows.len() * len;
        let (mut ids, mut labels, mut positions, mut segments) =
            (Vec::with_capacity(cap), Vec::with_capacity(cap), Vec::with_capacity(cap), Vec::with_capacity(cap));
        let (mut n_targets, mut n_tokens) = (0, 0);
        for row in rows {
            for (k, e) in row.iter().enumerate() {
                let n = e.ids.len();
                ids.extend_from_slice(&e.ids);
                for t in 0..n {
                    let label = if t + 1 < n && e.trained[t + 1] { e.ids[t + 1] } else { IGNORE };
                    n_targets += i64::from(label != IGNORE);
                    labels.push(label);
                    positions.push(t as i64);
                    segments.push(k as i64);
                }
                n_tokens += n as i64;
            }
            let used = row.iter().map(|e| e.ids.len()).sum::<usize>();
            ids.extend(std::iter::repeat_n(pad, len - used));
            labels.extend(std::iter::repeat_n(IGNORE, len - used));
            positions.extend(0..(len - used) as i64);
            segments.extend(std::iter::repeat_n(-1, len - used));
        }
        let shape = [rows.len() as i64, len as i64];
        let t = |v: &[i64]| -> Result<tch::Tensor> { Ok(tch::Tensor::f_from_slice(v)?.f_reshape(shape)?) };
        Ok(Batch {
            ids: t(&ids)?,
            labels: t(&labels)?,
            n_targets,
            n_tokens,
            packing: Some((t(&positions)?, t(&segments)?)),
        })
    }
}

/// Packs examples, in the given order, into rows of at most `max_len` tokens: each row takes
/// examples while they fit (an example longer than `max_len` was already cut to it).
pub fn pack_rows(order: &[usize], lens: &[usize], max_len: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut used = 0;
    for &i in order {
        match rows.last_mut() {
            Some(row) if used + lens[i] <= max_len => {
                row.push(i);
                used += lens[i];
            }
            _ => {
                rows.push(vec![i]);
                used = lens[i];
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_fills_rows_in_order() {
        assert_eq!(pack_rows(&[0, 1, 2, 3], &[3, 4, 2, 6], 8), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(pack_rows(&[2, 0], &[3, 4, 8], 8), vec![vec![2], vec![0]]);
        let e = Example { ids: vec![10, 11, 12], trained: vec![false, true, true], line: 1 };
        let f = Example { ids: vec![20, 21], trained: vec![false, true], line: 2 };
        let b = Batch::packed(&[vec![&e, &f], vec![&f]], 0).unwrap();
        let v = |t: &tch::Tensor| Vec::<i64>::try_from(&t.reshape([-1])).unwrap();
        assert_eq!(v(&b.ids), [10, 11, 12, 20, 21, 20, 21, 0, 0, 0]);
        assert_eq!(v(&b.labels), [11, 12, IGNORE, 21, IGNORE, 21, IGNORE, IGNORE, IGNORE, IGNORE]);
        let (pos, seg) = b.packing.as_ref().unwrap();
        assert_eq!(v(pos), [0, 1, 2, 0, 1, 0, 1, 0, 1, 2]);
        assert_eq!(v(seg), [0, 0, 0, 1, 1, 0, 0, -1, -1, -1]);
        assert_eq!((b.n_targets, b.n_tokens), (4, 7));
    }

    #[test]
    fn labels_predict_the_next_trained_token() {
        let e = Example { ids: vec![10, 11, 12, 13], trained: vec![false, false, true, true], line: 1 };
        let f = Example { ids: vec![20, 21], trained: vec![false, true], line: 2 };
        let b = Batch::new(&[&e, &f], 0).unwrap();
        assert_eq!(Vec::<i64>::try_from(&b.ids.reshape([-1])).unwrap(), vec![10, 11, 12, 13, 20, 21, 0, 0]);
        assert_eq!(
            Vec::<i64>::try_from(&b.labels.reshape([-1])).unwrap(),
            vec![IGNORE, 12, 13, IGNORE, 21, IGNORE, IGNORE, IGNORE]
        );
        assert_eq!((b.n_targets, b.n_tokens), (3, 6));
        assert_eq!(e.n_targets() + f.n_targets(), 3);
    }
}
