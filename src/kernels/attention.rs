//! Causal attention of a prefill chunk: `t` new queries over `s` keys, the last `t` of which are
//! the queries' own positions, each head on its own keys and values (MLA's expanded form,
//! DeepSeek-V2 §2.1.2: `k = [W_UK c; k_rope]`, `v = W_UV c`), in bf16 or f32.
//!
//! In bf16 it rounds where a bf16 model's eager attention rounds (`eager_attention_forward` in
//! transformers): the score `q·k` once from its f32 sum, then times the scale; the softmax in
//! f32 and its probabilities to bf16; the output once from its f32 sum. Both products are the
//! bf16 GEMM (`vdpbf16ps`), so bf16 needs AVX-512 BF16. In f32 nothing is rounded and the products
//! are the f32 GEMM, on any CPU.

use half::bf16;
use rayon::prelude::*;

use super::bf16_round;
use super::gemm::{gemm, gemm_bf16};
use super::rows::softmax_in_place;

/// An element type the attention computes in.
pub trait AttnElem: Copy + Send + Sync + 'static {
    const ZERO: Self;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// `y (t, n_out) = x (t, n_in) · w (n_out, n_in)ᵀ` summed in f32, if this CPU has the kernel.
    fn gemm(x: &[Self], w: &[Self], t: usize, n_in: usize, n_out: usize) -> Option<Vec<f32>>;
    /// `x` rounded to this type and back.
    fn round(x: f32) -> f32 {
        Self::from_f32(x).to_f32()
    }
}

impl AttnElem for bf16 {
    const ZERO: bf16 = bf16::ZERO;
    fn from_f32(x: f32) -> bf16 {
        bf16_round(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn gemm(x: &[bf16], w: &[bf16], t: usize, n_in: usize, n_out: usize) -> Option<Vec<f32>> {
        gemm_bf16(x, w, t, n_in, n_out)
    }
}

impl AttnElem for f32 {
    const ZERO: f32 = 0.0;
    fn from_f32(x: f32) -> f32 {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn gemm(x: &[f32], w: &[f32], t: usize, n_in: usize, n_out: usize) -> Option<Vec<f32>> {
        Some(gemm(x, w, t, n_in, n_out))
    }
}

/// Sizes of one chunk's attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillShape {
    pub heads: usize,
    /// New tokens (queries).
    pub t: usize,
    /// Keys: the cached tokens and the new ones (`s >= t`).
    pub s: usize,
    /// Query and key width (`qk_nope_head_dim + qk_rope_head_dim`).
    pub d_qk: usize,
    /// Value width.
    pub d_v: usize,
}

/// `out (T, H d_v)` for `q (H, T, d_qk)`, `k (H, S, d_qk)` and the values transposed,
/// `v_t (H, d_v, S)`: query `i` sees keys `0..=s - t + i`. `None` in bf16 without AVX-512 BF16.
pub fn prefill_attention<E: AttnElem>(q: &[E], k: &[E], v_t: &[E], shape: PrefillShape, scale: f32) -> Option<Vec<E>> {
    let PrefillShape { heads, t, s, d_qk, d_v } = shape;
    assert!(
        q.len() == heads * t * d_qk && k.len() == heads * s * d_qk && v_t.len() == heads * d_v * s && t <= s,
        "prefill_attention: shapes disagree"
    );
    let past = s - t;
    let per_head: Option<Vec<Vec<f32>>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let q = &q[h * t * d_qk..(h + 1) * t * d_qk];
            let k = &k[h * s * d_qk..(h + 1) * s * d_qk];
            let mut scores = E::gemm(q, k, t, d_qk, s)?; // (T, S)
            let mut probs = vec![E::ZERO; t * s];
            for (i, (row, p)) in scores.chunks_mut(s).zip(probs.chunks_mut(s)).enumerate() {
                let seen = past + i + 1;
                for v in &mut row[..seen] {
                    *v = E::round(E::round(*v) * scale);
                }
                softmax_in_place(&mut row[..seen]);
                for (p, &v) in p.iter_mut().zip(&row[..seen]) {
                    *p = E::from_f32(v);
                }
            }
            E::gemm(&probs, &v_t[h * d_v * s..(h + 1) * d_v * s], t, s, d_v) // (T, d_v)
        })
        .collect();
    let per_head = per_head?;
    let mut out = vec![E::ZERO; t * heads * d_v];
    for (h, o) in per_head.iter().enumerate() {
        for (i, row) in o.chunks(d_v).enumerate() {
            for (dst, &v) in out[(i * heads + h) * d_v..(i * heads + h + 1) * d_v].iter_mut().zip(row) {
                *dst = E::from_f32(v);
            }
        }
    }
    Some(out)
}

/// Plain loops, the sums in f64 and rounded to `E` where [`prefill_attention`] rounds: the
/// definition it must match.
pub fn prefill_attention_reference<E: AttnElem>(
    q: &[E],
    k: &[E],
    v_t: &[E],
    shape: PrefillShape,
    scale: f32,
) -> Vec<E> {
    let PrefillShape { heads, t, s, d_qk, d_v } = shape;
    let past = s - t;
    let mut out = vec![E::ZERO; t * heads * d_v];
    let wide = |x: E| x.to_f32() as f64;
    for h in 0..heads {
        for i in 0..t {
            let seen = past + i + 1;
            let scores: Vec<f64> = (0..seen)
                .map(|j| {
                    let dot: f64 =
                        (0..d_qk).map(|c| wide(q[(h * t + i) * d_qk + c]) * wide(k[(h * s + j) * d_qk + c])).sum();
                    E::round(E::round(dot as f32) * scale) as f64
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|v| (v - max).exp()).collect();
            let total: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|v| E::round((v / total) as f32) as f64).collect();
            for c in 0..d_v {
                let o: f64 = (0..seen).map(|j| p[j] * wide(v_t[(h * d_v + c) * s + j])).sum();
                out[(i * heads + h) * d_v + c] = E::from_f32(o as f32);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matvec::tests::random;

    #[test]
    fn prefill_attention_matches_its_reference_with_and_without_cached_keys() {
        for (heads, t, s, d_qk, d_v) in
            [(2, 5, 5, 24, 16), (3, 7, 20, 40, 8), (16, 64, 64, 192, 128), (1, 1, 9, 64, 32)]
        {
            let shape = PrefillShape { heads, t, s, d_qk, d_v };
            let scale = 1.0 / (d_qk as f32).sqrt();
            let (q, k, v_t) = (random(heads * t * d_qk, 1), random(heads * s * d_qk, 2), random(heads * d_v * s, 3));
            // f32: as exact as f32 sums.
            let scaled = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| 4.0 * x).collect() };
            let (q, k, v_t) = (scaled(&q), scaled(&k), scaled(&v_t));
            let got = prefill_attention(&q, &k, &v_t, shape, scale).unwrap();
            let want = prefill_attention_reference(&q, &k, &v_t, shape, scale);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-4 * w.abs() + 1e-5, "{shape:?} f32 [{i}]: {g} vs {w}");
            }
            check_causal(&q, &k, &v_t, shape, scale);
            // bf16, where the CPU has the kernel.
            let bf = |v: &[f32]| -> Vec<bf16> { v.iter().map(|&x| bf16::from_f32(x)).collect() };
            let (q, k, v_t) = (bf(&q), bf(&k), bf(&v_t));
            let Some(got) = prefill_attention(&q, &k, &v_t, shape, scale) else { continue };
            let want = prefill_attention_reference(&q, &k, &v_t, shape, scale);
            // The f32 sums may land on the other side of a bf16 rounding from the f64 ones: one
            // step of bf16 on an input, or on the output.
            let mut off = 0;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let (g, w) = (g.to_f32(), w.to_f32());
                assert!((g - w).abs() <= 0.02 * w.abs() + 0.02, "{shape:?} bf16 [{i}]: {g} vs {w}");
                off += usize::from(g != w);
            }
            assert!(off * 20 <= got.len(), "{shape:?}: {off} of {} outputs differ from the reference", got.len());
            check_causal(&q, &k, &v_t, shape, scale);
        }
    }

    /// A query must not see the keys after it: change the last key and value, and every output
    /// but the last query's stays as it was.
    fn check_causal<E: AttnElem + PartialEq + std::fmt::Debug>(
        q: &[E],
        k: &[E],
        v_t: &[E],
        shape: PrefillShape,
        scale: f32,
    ) {
        let PrefillShape { heads, t, s, d_qk, d_v } = shape;
        let got = prefill_attention(q, k, v_t, shape, scale).unwrap();
        let (mut k2, mut v2) = (k.to_vec(), v_t.to_vec());
        for h in 0..heads {
            for c in 0..d_qk {
                k2[(h * s + s - 1) * d_qk + c] = E::from_f32(3.0);
            }
            for c in 0..d_v {
                v2[(h * d_v + c) * s + s - 1] = E::from_f32(-5.0);
            }
        }
        let moved = prefill_attention(q, &k2, &v2, shape, scale).unwrap();
        let row = heads * d_v;
        assert_eq!(got[..(t - 1) * row], moved[..(t - 1) * row], "{shape:?}: a query saw a later key");
        assert_ne!(got[(t - 1) * row..], moved[(t - 1) * row..], "{shape:?}: the last query ignored its own key");
    }
}
