//! Causal attention of a prefill chunk in bf16: `t` new queries over `s` keys, the last `t` of
//! which are the queries' own positions, each head on its own keys and values (MLA's expanded
//! form, DeepSeek-V2 §2.1.2: `k = [W_UK c; k_rope]`, `v = W_UV c`).
//!
//! It rounds where a bf16 model's eager attention rounds (`eager_attention_forward` in
//! transformers): the score `q·k` once from its f32 sum, then times the scale; the softmax in
//! f32 and its probabilities to bf16; the output once from its f32 sum. Both products are the
//! bf16 GEMM (`vdpbf16ps`), so this needs AVX-512 BF16.

use half::bf16;
use rayon::prelude::*;

use super::bf16_round;
use super::gemm::gemm_bf16;
use super::rows::softmax_in_place;

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
/// `v_t (H, d_v, S)`: query `i` sees keys `0..=s - t + i`. `None` without AVX-512 BF16.
pub fn prefill_attention_bf16(
    q: &[bf16],
    k: &[bf16],
    v_t: &[bf16],
    shape: PrefillShape,
    scale: f32,
) -> Option<Vec<bf16>> {
    let PrefillShape { heads, t, s, d_qk, d_v } = shape;
    assert!(
        q.len() == heads * t * d_qk && k.len() == heads * s * d_qk && v_t.len() == heads * d_v * s && t <= s,
        "prefill_attention_bf16: shapes disagree"
    );
    let past = s - t;
    let per_head: Option<Vec<Vec<f32>>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let q = &q[h * t * d_qk..(h + 1) * t * d_qk];
            let k = &k[h * s * d_qk..(h + 1) * s * d_qk];
            let mut scores = gemm_bf16(q, k, t, d_qk, s)?; // (T, S)
            let mut probs = vec![bf16::ZERO; t * s];
            for (i, (row, p)) in scores.chunks_mut(s).zip(probs.chunks_mut(s)).enumerate() {
                let seen = past + i + 1;
                for v in &mut row[..seen] {
                    *v = bf16_round(bf16_round(*v).to_f32() * scale).to_f32();
                }
                softmax_in_place(&mut row[..seen]);
                for (p, &v) in p.iter_mut().zip(&row[..seen]) {
                    *p = bf16_round(v);
                }
            }
            gemm_bf16(&probs, &v_t[h * d_v * s..(h + 1) * d_v * s], t, s, d_v) // (T, d_v)
        })
        .collect();
    let per_head = per_head?;
    let mut out = vec![bf16::ZERO; t * heads * d_v];
    for (h, o) in per_head.iter().enumerate() {
        for (i, row) in o.chunks(d_v).enumerate() {
            for (dst, &v) in out[(i * heads + h) * d_v..(i * heads + h + 1) * d_v].iter_mut().zip(row) {
                *dst = bf16_round(v);
            }
        }
    }
    Some(out)
}

/// Plain loops, the sums in f64 and rounded to bf16 where [`prefill_attention_bf16`] rounds:
/// the definition it must match.
pub fn prefill_attention_reference(q: &[bf16], k: &[bf16], v_t: &[bf16], shape: PrefillShape, scale: f32) -> Vec<bf16> {
    let PrefillShape { heads, t, s, d_qk, d_v } = shape;
    let past = s - t;
    let mut out = vec![bf16::ZERO; t * heads * d_v];
    for h in 0..heads {
        for i in 0..t {
            let seen = past + i + 1;
            let scores: Vec<f64> = (0..seen)
                .map(|j| {
                    let dot: f64 = (0..d_qk)
                        .map(|c| q[(h * t + i) * d_qk + c].to_f64() * k[(h * s + j) * d_qk + c].to_f64())
                        .sum();
                    bf16::from_f32(bf16::from_f64(dot).to_f32() * scale).to_f64()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|v| (v - max).exp()).collect();
            let total: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|v| bf16::from_f64(v / total).to_f64()).collect();
            for c in 0..d_v {
                let o: f64 = (0..seen).map(|j| p[j] * v_t[(h * d_v + c) * s + j].to_f64()).sum();
                out[(i * heads + h) * d_v + c] = bf16::from_f64(o);
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
            let bf = |v: Vec<f32>| -> Vec<bf16> { v.iter().map(|&x| bf16::from_f32(4.0 * x)).collect() };
            let (q, k, v_t) =
                (bf(random(heads * t * d_qk, 1)), bf(random(heads * s * d_qk, 2)), bf(random(heads * d_v * s, 3)));
            let scale = 1.0 / (d_qk as f32).sqrt();
            let Some(got) = prefill_attention_bf16(&q, &k, &v_t, shape, scale) else { return };
            let want = prefill_attention_reference(&q, &k, &v_t, shape, scale);
            // The f32 sums may land on the other side of a bf16 rounding from the f64 ones: one
            // step of bf16 on an input, or on the output.
            let mut off = 0;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let (g, w) = (g.to_f32(), w.to_f32());
                assert!((g - w).abs() <= 0.02 * w.abs() + 0.02, "{shape:?} [{i}]: {g} vs {w}");
                off += usize::from(g != w);
            }
            assert!(off * 20 <= got.len(), "{shape:?}: {off} of {} outputs differ from the reference", got.len());
            // A query must not see the keys after it: change the last key and value, and every
            // output but the last query's stays as it was.
            let (mut k2, mut v2) = (k.clone(), v_t.clone());
            for h in 0..heads {
                for c in 0..d_qk {
                    k2[(h * s + s - 1) * d_qk + c] = bf16::from_f32(3.0);
                }
                for c in 0..d_v {
                    v2[(h * d_v + c) * s + s - 1] = bf16::from_f32(-5.0);
                }
            }
            let moved = prefill_attention_bf16(&q, &k2, &v2, shape, scale).unwrap();
            let row = heads * d_v;
            assert_eq!(got[..(t - 1) * row], moved[..(t - 1) * row], "{shape:?}: a query saw a later key");
            assert_ne!(got[(t - 1) * row..], moved[(t - 1) * row..], "{shape:?}: the last query ignored its own key");
        }
    }
}
