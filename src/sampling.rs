//! Choosing the next token: repetition penalty, temperature, top-k, top-p, seeded.
//!
//! Order (as llama.cpp and transformers apply them): penalty on the raw logits of the last
//! `repeat_last_n` tokens (positive logits divided, negative multiplied), then temperature, top-k,
//! softmax, top-p (the smallest set whose mass reaches `top_p`). Temperature 0 is greedy argmax
//! (lowest id on a tie, like `torch.argmax`). The generator is xoshiro256** seeded through
//! SplitMix64, so a seed gives the same tokens on every machine.

/// Parameters of one request's sampling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    /// 1 means no penalty.
    pub repeat_penalty: f32,
    /// How many of the latest tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.95, repeat_penalty: 1.0, repeat_last_n: 64, seed: 0 }
    }
}

/// A sampling parameter out of range; the message names the parameter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidParams {
    #[error("`temperature` must be a number >= 0, got {0}")]
    Temperature(f32),
    #[error("`top_p` must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("`repeat_penalty` must be a number > 0, got {0}")]
    RepeatPenalty(f32),
}

impl SamplingParams {
    /// The parameters, if every one is in range.
    pub fn validate(self) -> Result<Self, InvalidParams> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(InvalidParams::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(InvalidParams::TopP(self.top_p));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(InvalidParams::RepeatPenalty(self.repeat_penalty));
        }
        Ok(self)
    }
}

/// A seeded sampler for one sequence. Its buffers are kept from token to token.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Xoshiro,
    logits: Vec<f32>,
    seen: Vec<u32>,
    order: Vec<usize>,
    probs: Vec<f64>,
}

impl Sampler {
    /// A sampler with validated `params`.
    pub fn new(params: SamplingParams) -> Result<Sampler, InvalidParams> {
        let params = params.validate()?;
        let (logits, seen, order, probs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        Ok(Sampler { params, rng: Xoshiro::new(params.seed), logits, seen, order, probs })
    }

    /// The next token given `logits` (one per vocabulary id) and the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        self.sample_given_draft(logits, history, None)
    }

    /// [`Sampler::sample`] where a draft (speculative decoding) proposed `draft` for this
    /// position: the token returned is distributed exactly as [`Sampler::sample`]'s, and is the
    /// draft whenever the draft is accepted. A draft chosen deterministically (the drafting
    /// head's argmax) is accepted with the probability `p(draft)` the sampling distribution
    /// gives it; otherwise the token is drawn from that distribution without the draft,
    /// renormalized (the speculative-sampling rule of Leviathan et al. and Chen et al., 2023,
    /// for a draft distribution that is a point mass). Greedy sampling returns the argmax.
    pub fn sample_given_draft(&mut self, logits: &[f32], history: &[u32], draft: Option<u32>) -> u32 {
        let p = self.params;
        let Sampler { logits: l, seen, order, probs, .. } = self;
        l.clear();
        l.extend_from_slice(logits);
        let logits = l;
        if p.repeat_penalty != 1.0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            seen.clear();
            seen.extend_from_slice(&history[start..]);
            seen.sort_unstable();
            seen.dedup();
            for &id in seen.iter() {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / p.repeat_penalty } else { *l * p.repeat_penalty };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let best_first = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        order.clear();
        order.extend(0..logits.len());
        if p.top_k > 0 && p.top_k < order.len() {
            order.select_nth_unstable_by(p.top_k - 1, best_first); // the k best, in any order
            order.truncate(p.top_k);
        }
        order.sort_unstable_by(best_first);
        let max = logits[order[0]];
        probs.clear();
        probs.extend(order.iter().map(|&i| (((logits[i] - max) / p.temperature) as f64).exp()));
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .position(|q| {
                    mass += q;
                    mass >= p.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut skip = None;
        let mut rest = total;
        if let Some(d) = draft {
            let at = order.iter().position(|&i| i == d as usize);
            let p_d = at.map_or(0.0, |j| probs[j]);
            if self.rng.next_f64() * total < p_d {
                return d;
            }
            skip = at;
            rest = total - p_d;
            if rest <= 0.0 {
                return d;
            }
        }
        let mut target = self.rng.next_f64() * rest;
        let mut last = None;
        for (j, (&id, q)) in order.iter().zip(probs.iter()).enumerate() {
            if Some(j) == skip {
                continue;
            }
            last = Some(id);
            target -= q;
            if target <= 0.0 {
                return id as u32;
            }
        }
        last.unwrap_or(order[order.len() - 1]) as u32
    }
}

/// Index of the largest value; the lowest index on a tie.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// xoshiro256** (Blackman and Vigna), seeded through SplitMix64.
#[derive(Debug, Clone)]
struct Xoshiro([u64; 4]);

impl Xoshiro {
    fn new(seed: u64) -> Xoshiro {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Xoshiro([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
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

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, ..SamplingParams::default() }
    }

    #[test]
    fn temperature_zero_is_argmax_with_lowest_id_on_ties() {
        let mut s = Sampler::new(params(0.0, 0, 1.0)).unwrap();
        assert_eq!(s.sample(&[0.1, 2.0, 2.0, -1.0], &[]), 1);
    }

    #[test]
    fn top_k_one_always_picks_the_best() {
        let mut s = Sampler::new(params(5.0, 1, 1.0)).unwrap();
        for _ in 0..100 {
            assert_eq!(s.sample(&[0.0, 0.5, 0.4], &[]), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ~ [0.665, 0.245, 0.090]: top_p 0.6 keeps only id 0, 0.8 keeps ids 0 and 1.
        let logits = [2.0, 1.0, 0.0];
        let mut s = Sampler::new(params(1.0, 0, 0.6)).unwrap();
        assert!((0..200).all(|_| s.sample(&logits, &[]) == 0));
        let mut s = Sampler::new(params(1.0, 0, 0.8)).unwrap();
        let picks: Vec<u32> = (0..400).map(|_| s.sample(&logits, &[])).collect();
        assert!(picks.contains(&1) && !picks.contains(&2));
    }

    #[test]
    fn same_seed_gives_the_same_tokens_and_another_seed_does_not() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s =
                Sampler::new(SamplingParams { seed, top_k: 0, top_p: 1.0, temperature: 1.0, ..Default::default() })
                    .unwrap();
            (0..64).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn repeat_penalty_turns_a_repeated_best_token_into_the_runner_up() {
        let mut s =
            Sampler::new(SamplingParams { temperature: 0.0, repeat_penalty: 2.0, ..Default::default() }).unwrap();
        assert_eq!(s.sample(&[1.5, 1.0, -3.0], &[0]), 1);
        assert_eq!(s.sample(&[1.5, 1.0, -3.0], &[2]), 0);
    }

    #[test]
    fn invalid_parameters_are_named() {
        let bad = |p: SamplingParams| p.validate().unwrap_err().to_string();
        assert!(bad(params(-1.0, 0, 1.0)).contains("`temperature`"));
        assert!(bad(params(f32::NAN, 0, 1.0)).contains("`temperature`"));
        assert!(bad(params(1.0, 0, 0.0)).contains("`top_p`"));
        assert!(bad(params(1.0, 0, 1.5)).contains("`top_p`"));
        let p = SamplingParams { repeat_penalty: 0.0, ..Default::default() };
        assert!(bad(p).contains("`repeat_penalty`"));
    }
}
