//! Decoupled RoPE for the `d_r = qk_rope_head_dim` part of queries and the shared `k_rope`,
//! with YaRN (DeepSeek-V2 appendix B).
//!
//! Pair `i` of a vector is rotated by `pos * inv_freq[i]`. DeepSeek pairs interleaved elements
//! `(x[2i], x[2i+1])` (transformers `apply_rotary_emb` for V2, `apply_rotary_pos_emb_interleave`
//! for V3); with `rope_interleave: false` pairs are `(x[i], x[i + d_r/2])`. The rotated pairs stay
//! where they were: queries and keys share the layout, so their dot products are the reference's.
//!
//! YaRN (transformers 5.23 `_compute_yarn_parameters`): frequencies between the correction range
//! `[low, high]` blend interpolated (`/factor`) and original frequencies on a linear ramp; cos/sin
//! are multiplied by `attention_factor = mscale(factor, mscale) / mscale(factor, mscale_all_dim)`.

use std::f64::consts::PI;

use candle_core::{DType, Device, Tensor, D};

use crate::config::{yarn_mscale, RopeConfig, Yarn};
use crate::error::Result;

/// Rotation frequencies for one model.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    attention_factor: f32,
    interleaved: bool,
}

/// cos and sin of every pair's angle at a run of positions: each `(T, d_r/2)`, f32.
#[derive(Clone)]
pub struct Angles {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Frequencies for `dim = qk_rope_head_dim`.
    pub fn new(rope: &RopeConfig, dim: usize) -> Rope {
        let base = rope.rope_theta as f32;
        let pos_freqs: Vec<f32> = (0..dim / 2).map(|i| base.powf((2 * i) as f32 / dim as f32)).collect();
        let (inv_freq, attention_factor) = match &rope.yarn {
            None => (pos_freqs.iter().map(|p| 1.0 / p).collect(), 1.0),
            Some(y) => yarn_inv_freq(y, &pos_freqs, rope.rope_theta, dim),
        };
        Rope { inv_freq, attention_factor, interleaved: rope.rope_interleave }
    }

    /// Angles for positions `start..start + len`.
    pub fn angles(&self, start: usize, len: usize, device: &Device) -> Result<Angles> {
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(len * half), Vec::with_capacity(len * half));
        for pos in start..start + len {
            self.push_angles(pos, &mut cos, &mut sin);
        }
        Ok(Angles {
            cos: Tensor::from_vec(cos, (len, half), device)?,
            sin: Tensor::from_vec(sin, (len, half), device)?,
        })
    }

    /// Appends the cos and sin of every pair's angle at `pos` (`d_r / 2` each).
    fn push_angles(&self, pos: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        for &f in &self.inv_freq {
            let angle = pos as f32 * f; // f32 product, as the reference computes it
            cos.push(angle.cos() * self.attention_factor);
            sin.push(angle.sin() * self.attention_factor);
        }
    }

    /// The cos and sin of every pair's angle at `pos` into `cos` and `sin` (cleared, their
    /// buffers kept): one decode step's angles.
    pub(crate) fn angles_at(&self, pos: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        cos.clear();
        sin.clear();
        self.push_angles(pos, cos, sin);
    }

    /// Rotates one vector `x (d_r)` in place by the angles of [`Rope::angles_at`], as
    /// [`Rope::apply`] rotates each row (in f32).
    pub(crate) fn rotate(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = x.len() / 2;
        for (i, (&c, &s)) in cos.iter().zip(sin).enumerate().take(half) {
            let (a, b) = if self.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
            let (x0, x1) = (x[a], x[b]);
            x[a] = x0 * c - x1 * s;
            x[b] = x1 * c + x0 * s;
        }
    }

    /// Rotates `x: (.., T, d_r)` by `angles` (T rows); computes in f32, returns `x`'s dtype.
    pub fn apply(&self, x: &Tensor, angles: &Angles) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let dims = x.dims().to_vec();
        let d = dims[dims.len() - 1];
        let half = d / 2;
        let rotated = if self.interleaved {
            let mut pairs = dims.clone();
            pairs.pop();
            pairs.extend([half, 2]);
            let x = x.reshape(pairs)?; // (.., T, d/2, 2)
            let (x0, x1) =
                (x.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?, x.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?);
            let (r0, r1) = rotate_pair(&x0, &x1, angles)?;
            Tensor::stack(&[r0, r1], D::Minus1)?.reshape(dims)?
        } else {
            let (x0, x1) = (x.narrow(D::Minus1, 0, half)?, x.narrow(D::Minus1, half, half)?);
            let (r0, r1) = rotate_pair(&x0, &x1, angles)?;
            Tensor::cat(&[r0, r1], D::Minus1)?
        };
        Ok(rotated.to_dtype(dtype)?)
    }
}

/// `(x0 cos - x1 sin, x1 cos + x0 sin)` with cos/sin broadcast over leading dims.
fn rotate_pair(x0: &Tensor, x1: &Tensor, a: &Angles) -> Result<(Tensor, Tensor)> {
    let r0 = (x0.broadcast_mul(&a.cos)? - x1.broadcast_mul(&a.sin)?)?;
    let r1 = (x1.broadcast_mul(&a.cos)? + x0.broadcast_mul(&a.sin)?)?;
    Ok((r0, r1))
}

fn yarn_inv_freq(y: &Yarn, pos_freqs: &[f32], base: f64, dim: usize) -> (Vec<f32>, f32) {
    let attention_factor = match (y.mscale, y.mscale_all_dim) {
        (Some(m), Some(all)) if m != 0.0 && all != 0.0 => yarn_mscale(y.factor, m) / yarn_mscale(y.factor, all),
        _ => yarn_mscale(y.factor, 1.0),
    };
    let orig = y.original_max_position_embeddings as f64;
    let correction_dim = |rotations: f64| (dim as f64 * (orig / (rotations * 2.0 * PI)).ln()) / (2.0 * base.ln());
    let low = correction_dim(y.beta_fast).floor().max(0.0);
    let mut high = correction_dim(y.beta_slow).ceil().min(dim as f64 - 1.0);
    if low == high {
        high += 0.001;
    }
    let inv_freq = pos_freqs
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0) as f32;
            let extrapolation = 1.0 - ramp;
            let (extra, inter) = (1.0 / p, 1.0 / (y.factor as f32 * p));
            inter * (1.0 - extrapolation) + extra * extrapolation
        })
        .collect();
    (inv_freq, attention_factor as f32)
}
