//! Multi-head attention of one new token over per-head cached keys and values: what an engine
//! without MLA's absorption computes at decode time, over the expanded cache
//! ([`crate::cache::CacheKind::Expanded`], for study). Each cached row holds every head's key
//! (`d_k`) and value (`d_v`), so a step reads `n_h (d_k + d_v)` values per row where the
//! absorbed MLA step reads `d_c + d_r`.
//!
//! Heads run in parallel, each over the rows page by page with an online softmax. The dot
//! products are plain loops the compiler vectorizes (16 lanes of f32), not hand-written
//! kernels: the expanded cache is here to measure memory and bandwidth against the latent one.

use rayon::prelude::*;

use super::paged::{DensePages, PAGE_ROWS};
use super::rows::exp;
use super::Widen;

/// `out (H, d_v)` for the query `q (H, d_k)` over `rows`: keys `(S, H d_k)` and values `(S, H d_v)`.
pub fn mha_decode_paged<W: Widen>(
    q: &[f32],
    rows: &dyn DensePages<W>,
    heads: usize,
    d_k: usize,
    d_v: usize,
    scale: f32,
    out: &mut [f32],
) {
    assert!(q.len() == heads * d_k && out.len() == heads * d_v, "mha_decode: shapes disagree");
    let len = rows.len();
    out.par_chunks_mut(d_v).enumerate().for_each(|(h, out)| {
        let q = &q[h * d_k..(h + 1) * d_k];
        let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
        out.fill(0.0);
        for i in 0..len.div_ceil(PAGE_ROWS) {
            let (keys, values) = rows.page(i);
            for (k, v) in keys.chunks_exact(heads * d_k).zip(values.chunks_exact(heads * d_v)) {
                let s = dot(q, &k[h * d_k..(h + 1) * d_k]) * scale;
                if s > m {
                    let alpha = exp(m - s);
                    l *= alpha;
                    out.iter_mut().for_each(|o| *o *= alpha);
                    m = s;
                }
                let p = exp(s - m);
                l += p;
                for (o, &x) in out.iter_mut().zip(&v[h * d_v..(h + 1) * d_v]) {
                    *o += p * x.widen();
                }
            }
        }
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        out.iter_mut().for_each(|o| *o *= inv);
    });
}

/// `Σ a·b` in 16 interleaved sums, so that the loop vectorizes.
#[inline(always)]
fn dot<W: Widen>(a: &[f32], b: &[W]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(&x, &y)| x * y.widen()).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l].widen();
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matvec::tests::random;
    use crate::kernels::paged::Contiguous;

    #[test]
    fn mha_decode_matches_a_plain_softmax() {
        let (heads, d_k, d_v, n) = (3, 20, 12, 150);
        let (k, v, q) = (random(n * heads * d_k, 1), random(n * heads * d_v, 2), random(heads * d_k, 3));
        let q: Vec<f32> = q.iter().map(|x| 8.0 * x).collect();
        let mut out = vec![0f32; heads * d_v];
        let rows = Contiguous { c: &k[..], r: &v[..], d_c: heads * d_k, d_r: heads * d_v };
        mha_decode_paged(&q, &rows, heads, d_k, d_v, 0.3, &mut out);
        for h in 0..heads {
            let s: Vec<f64> = (0..n)
                .map(|r| (0..d_k).map(|i| (q[h * d_k + i] * k[(r * heads + h) * d_k + i]) as f64).sum::<f64>() * 0.3)
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = s.iter().map(|x| (x - max).exp()).sum();
            for j in 0..d_v {
                let want: f64 = (0..n).map(|r| (s[r] - max).exp() / total * v[(r * heads + h) * d_v + j] as f64).sum();
                assert!((out[h * d_v + j] as f64 - want).abs() < 1e-5, "head {h} value {j}");
            }
        }
    }
}
