//! Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p and
//! repetition penalty, in the order transformers' `generate` applies its logits processors.
//! Seeded and reproducible; the buffers are allocated once, so sampling allocates nothing.

use crate::constraint::Constraint;
use crate::error::{Error, Result};

/// How to pick tokens and when to stop.
#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// Softmax temperature; 0 = greedy (always the most likely token).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to `top_p`; 1 = off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one; 0 = off.
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of tokens already seen; 1 = off.
    pub repetition_penalty: f32,
    /// How many of the last tokens the repetition penalty looks at; 0 = all.
    pub repeat_last_n: usize,
    /// Seed of the random generator (same seed, same output).
    pub seed: u64,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Stop when the generated text contains one of these (the stop string is not output).
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
            max_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Checks that every parameter is in range.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Input(format!("invalid sampling parameter: {what}")));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature must be a finite number ≥ 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition_penalty must be > 0");
        }
        if self.stop.iter().any(String::is_empty) {
            // Every text contains "": generation would end before its first token.
            return Err(Error::Input(
                "invalid stop string: an empty stop string (--stop \"\") would end every generation at once; \
                 give a non-empty text"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// xoshiro256** (Blackman & Vigna), seeded through splitmix64.
#[derive(Clone, Debug)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }
}

/// Sampler state: parameters, random generator and preallocated candidate buffers.
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
    /// `(logit or probability, token)` candidates, capacity = vocabulary size.
    cand: Vec<(f32, u32)>,
    /// Penalised logits, `[vocab]`.
    penalised: Vec<f32>,
    /// Marks tokens already penalised in this step, `[vocab]`.
    seen: Vec<bool>,
    /// The grammar the output must follow, and the masked logits (`[vocab]`, sized when set).
    constraint: Option<Constraint>,
    masked: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, vocab: usize) -> Result<Self> {
        params.validate()?;
        Ok(Sampler {
            rng: Rng::new(params.seed),
            params,
            cand: Vec::with_capacity(vocab),
            penalised: vec![0.0; vocab],
            seen: vec![false; vocab],
            constraint: None,
            masked: Vec::new(),
        })
    }

    /// Constrains what follows to `constraint` (from its start), or lifts the constraint.
    pub fn set_constraint(&mut self, constraint: Option<Constraint>) -> Result<()> {
        self.constraint = constraint;
        if let Some(c) = &mut self.constraint {
            c.reset()?;
            self.masked = vec![0.0; self.seen.len()];
        }
        Ok(())
    }

    /// Takes the constraint out where it stands (to move it to another sampler with
    /// [`Sampler::continue_constraint`]).
    pub fn take_constraint(&mut self) -> Option<Constraint> {
        self.constraint.take()
    }

    /// Constrains what follows to `constraint` from where it stands (not from its start).
    pub fn continue_constraint(&mut self, constraint: Option<Constraint>) {
        if constraint.is_some() && self.masked.len() != self.seen.len() {
            self.masked = vec![0.0; self.seen.len()];
        }
        self.constraint = constraint;
    }

    /// Starts the constraint over, for a new reply.
    pub fn restart_constraint(&mut self) -> Result<()> {
        self.constraint.as_mut().map_or(Ok(()), Constraint::reset)
    }

    pub fn constraint(&self) -> Option<&Constraint> {
        self.constraint.as_ref()
    }

    /// The constraint's grammar has ended: generation must stop.
    pub fn constraint_complete(&self) -> bool {
        self.constraint.as_ref().is_some_and(Constraint::is_complete)
    }

    /// Picks the next token as [`Sampler::sample`] does, within the constraint if there is one
    /// (which then advances by the token). Greedy decoding takes the model's choice when the
    /// grammar allows it and masks only when it does not; sampling masks first, so that
    /// temperature, top-k, top-p and min-p see only the allowed tokens.
    pub fn next_token(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        let Some(mut c) = self.constraint.take() else {
            return Ok(self.sample(logits, history));
        };
        if c.is_complete() {
            // The grammar has ended: only the end of the sequence may follow.
            let eos = c.eos();
            self.constraint = Some(c);
            return Ok(eos);
        }
        let picked = self.pick_within(&mut c, logits, history);
        let picked = picked.and_then(|t| c.consume(t).map(|()| t));
        self.constraint = Some(c);
        picked
    }

    fn pick_within(&mut self, c: &mut Constraint, logits: &[f32], history: &[u32]) -> Result<u32> {
        let greedy = self.params.temperature == 0.0;
        if greedy {
            let t = self.sample(logits, history);
            if c.allows(t) {
                return Ok(t);
            }
        }
        // Text the grammar fixes is taken as the tokenizer spells it, without a mask. (Greedy
        // asks only after the model's own token was refused, so that a model which already
        // conforms keeps its exact tokens.)
        if let Some(t) = c.forced() {
            return Ok(t);
        }
        if greedy {
            // The argmax of the masked logits is the first allowed token in descending order
            // (ties by index, as `argmax`): asking the grammar about the next few best tokens
            // one by one is far cheaper than a mask of the whole vocabulary, which is computed
            // only when none of them is allowed.
            if let Some(t) = self.best_allowed(c, logits, history) {
                return Ok(t);
            }
        }
        let mut masked = std::mem::take(&mut self.masked);
        masked.copy_from_slice(logits);
        let r = c.mask_logits(&mut masked).map(|()| {
            let t = self.sample(&masked, history);
            // A sampled token of probability 0 (rounding at the end of the cumulative sum)
            // would be a masked one: take the best allowed instead.
            if masked[t as usize] == f32::NEG_INFINITY {
                argmax(&masked)
            } else {
                t
            }
        });
        self.masked = masked;
        r
    }

    /// The most likely token among the [`GREEDY_TRIES`] most likely ones (after the repetition
    /// penalty) that the grammar allows, or `None` if it allows none of them.
    fn best_allowed(&mut self, c: &mut Constraint, logits: &[f32], history: &[u32]) -> Option<u32> {
        let scores = penalise(&self.params, &mut self.penalised, &mut self.seen, logits, history);
        let desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let cand = &mut self.cand;
        cand.clear();
        cand.extend(scores.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        let tries = GREEDY_TRIES.min(cand.len());
        if tries == 0 {
            return None;
        }
        if tries < cand.len() {
            cand.select_nth_unstable_by(tries - 1, desc);
            cand.truncate(tries);
        }
        cand.sort_unstable_by(desc);
        cand.iter().map(|&(_, t)| t).find(|&t| c.allows(t))
    }

    /// Picks the next token from `logits` (`[vocab]`), given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let temperature = self.params.temperature;
        let logits = penalise(&self.params, &mut self.penalised, &mut self.seen, logits, history);
        if temperature == 0.0 {
            return argmax(logits);
        }

        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        self.cand.clear();
        self.cand.extend(logits.iter().enumerate().map(|(i, &l)| (l * inv_t, i as u32)));
        let desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if p.top_k > 0 && p.top_k < self.cand.len() {
            self.cand.select_nth_unstable_by(p.top_k - 1, desc);
            self.cand.truncate(p.top_k);
        }
        // Probabilities over the remaining candidates.
        let max = self.cand.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for c in self.cand.iter_mut() {
            c.0 = (c.0 - max).exp();
            sum += c.0;
        }
        self.cand.iter_mut().for_each(|c| c.0 /= sum);
        if p.top_p < 1.0 {
            self.cand.sort_unstable_by(desc);
            let mut cum = 0.0;
            let mut keep = self.cand.len();
            for (i, c) in self.cand.iter().enumerate() {
                cum += c.0;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.cand.truncate(keep);
        }
        if p.min_p > 0.0 {
            let top = self.cand.iter().map(|c| c.0).fold(0.0, f32::max);
            self.cand.retain(|c| c.0 >= p.min_p * top);
        }
        let total: f32 = self.cand.iter().map(|c| c.0).sum();
        let mut r = self.rng.uniform() * total;
        for c in &self.cand {
            if r < c.0 {
                return c.1;
            }
            r -= c.0;
        }
        self.cand.last().map_or(0, |c| c.1)
    }
}

/// `logits` with the repetition penalty applied (in the sampler's buffer), or `logits`
/// itself when there is none.
fn penalise<'a>(
    p: &SamplingParams,
    penalised: &'a mut [f32],
    seen: &mut [bool],
    logits: &'a [f32],
    history: &[u32],
) -> &'a [f32] {
    if p.repetition_penalty != 1.0 {
        let recent = match p.repeat_last_n {
            0 => history,
            n => &history[history.len().saturating_sub(n)..],
        };
        penalised.copy_from_slice(logits);
        for &t in recent {
            let t = t as usize;
            if t < seen.len() && !seen[t] {
                seen[t] = true;
                let l = &mut penalised[t];
                *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            }
        }
        for &t in recent {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = false;
            }
        }
        &penalised[..]
    } else {
        logits
    }
}

/// How many of the most likely tokens greedy constrained decoding asks the grammar about, one
/// by one, before it computes the full mask.
const GREEDY_TRIES: usize = 16;

/// Index of the largest value (the first one on ties, like `torch.argmax`).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 18 row 15): `--stop ""` ended every generation with empty output.
    #[test]
    fn an_empty_stop_string_is_refused() {
        let params = SamplingParams { stop: vec!["ok".into(), String::new()], ..Default::default() };
        let err = Sampler::new(params, 10).err().expect("refused").to_string();
        assert!(err.contains("empty stop string"), "{err}");
        assert!(Sampler::new(SamplingParams { stop: vec!["ok".into()], ..Default::default() }, 10).is_ok());
    }

    fn sampler(p: SamplingParams) -> Sampler {
        Sampler::new(p, 5).unwrap()
    }

    #[test]
    fn greedy_takes_first_max() {
        let mut s = sampler(SamplingParams::default());
        assert_eq!(s.sample(&[0.0, 3.0, 1.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        let p = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
        let mut s = sampler(p);
        // Token 1 (logit 3 → 1.5) loses to token 2 (2.0); token 0 negative gets more negative.
        assert_eq!(s.sample(&[-1.0, 3.0, 2.0, 0.0, 0.0], &[1, 1, 0]), 2);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let p = SamplingParams { temperature: 5.0, top_k: 1, seed: 7, ..Default::default() };
        let mut s = sampler(p);
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 0.5, 0.4, 0.1, 0.2], &[]), 1);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let logits = [5.0, 4.9, -10.0, -10.0, -10.0];
        for p in [
            SamplingParams { temperature: 1.0, top_p: 0.9, seed: 1, ..Default::default() },
            SamplingParams { temperature: 1.0, min_p: 0.5, seed: 1, ..Default::default() },
        ] {
            let mut s = sampler(p);
            for _ in 0..200 {
                assert!(s.sample(&logits, &[]) < 2);
            }
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits = [0.1, 0.2, 0.3, 0.2, 0.1];
        let p = SamplingParams { temperature: 1.0, seed: 42, ..Default::default() };
        let run = || {
            let mut s = sampler(p.clone());
            (0..50).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(a.iter().any(|&t| t != a[0]), "temperature 1 should vary");
    }

    #[test]
    fn invalid_params_are_refused() {
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { temperature: -1.0, ..Default::default() }.validate().is_err());
    }
}
