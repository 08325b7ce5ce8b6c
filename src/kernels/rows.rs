//! Row-wise kernels with their backward passes: softmax, RMS normalisation, and cross-entropy.
//! Each works on a row-major `(rows, cols)` f32 buffer, rows in parallel. They replace chains of
//! six to ten elementwise tensor ops (each a pass over memory and an allocation, forward and
//! backward) with one pass each way. `crate::model::ops` wraps them as autograd ops; the composed
//! tensor-op versions they replace are their reference twins (tests there).

use rayon::prelude::*;

/// Rows per parallel task: enough work to amortise scheduling.
fn rows_per_task(cols: usize) -> usize {
    (16384 / cols.max(1)).max(1)
}

/// `y = softmax(x)` per row.
pub fn softmax_rows(x: &[f32], cols: usize, y: &mut [f32]) {
    let chunk = rows_per_task(cols) * cols;
    y.copy_from_slice(x);
    y.par_chunks_mut(chunk).for_each(|y| y.chunks_mut(cols).for_each(softmax_in_place));
}

/// Softmax of one row, in place; a fully masked row (all -inf) becomes zeros.
pub fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    for v in row.iter_mut() {
        *v = exp(*v - max);
    }
    let sum = sum_lanes(row);
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// `e^x` for `x <= 0` or moderate `x` (within 2 ulp of `f32::exp` on [-87, 88]; 0 below, as
/// `f32::exp` underflows there): `2^n · p(r)` with `n = round(x / ln 2)` and a degree-6
/// polynomial on `|r| <= ln 2 / 2`, ln 2 split in two for an exact reduction. Written without
/// calls or branches so the compiler vectorizes loops over it: `f32::exp` is a library call per
/// value, which made the softmax of a 16-head decode step over 16K cached tokens cost a third of
/// the attention.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // exact in f32, leaves room for n * LN2_HI
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 88.0);
    // Round to nearest by adding and removing 1.5 · 2²³ (`round` is a library call on baseline
    // x86-64, which would stop the vectorizer).
    const ROUND: f32 = 12_582_912.0;
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    // `n` as an integer, read off `shifted`'s mantissa (`1.5 · 2²³ + n` is exact in f32): a
    // saturating `as i32` is not vectorized, and cost a scalar conversion per value.
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = xc - n * LN2_HI - n * LN2_LO;
    // Taylor coefficients 1/k!, nudged for the interval (minimax).
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let scaled = y * f32::from_bits(((n_int + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        scaled
    }
}

/// The sum of a row in 16 interleaved partial sums: the loop vectorizes and is limited by memory,
/// not by a chain of dependent adds.
pub fn sum_lanes(row: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in chunks.by_ref() {
        for l in 0..16 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `dx = y ⊙ (g − Σ g⊙y)` per row, from the softmax output `y` and the output gradient `g`.
pub fn softmax_rows_bwd(y: &[f32], g: &[f32], cols: usize, dx: &mut [f32]) {
    let chunk = rows_per_task(cols) * cols;
    dx.par_chunks_mut(chunk).zip(y.par_chunks(chunk).zip(g.par_chunks(chunk))).for_each(|(dx, (y, g))| {
        for ((dx, y), g) in dx.chunks_mut(cols).zip(y.chunks(cols)).zip(g.chunks(cols)) {
            let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
            for ((d, &yv), &gv) in dx.iter_mut().zip(y).zip(g) {
                *d = yv * (gv - dot);
            }
        }
    });
}

/// `y = x / sqrt(mean(x²) + eps)` per row.
pub fn rms_rows(x: &[f32], cols: usize, eps: f32, y: &mut [f32]) {
    let chunk = rows_per_task(cols) * cols;
    y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(y, x)| {
        for (y, x) in y.chunks_mut(cols).zip(x.chunks(cols)) {
            let r = inv_rms(x, eps);
            y.iter_mut().zip(x).for_each(|(o, &v)| *o = v * r);
        }
    });
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// Backward of [`rms_rows`]: with `r = 1/sqrt(mean(x²)+eps)` and `y = x r`,
/// `dx = r (g − y · mean(g⊙y))`.
pub fn rms_rows_bwd(x: &[f32], g: &[f32], cols: usize, eps: f32, dx: &mut [f32]) {
    let chunk = rows_per_task(cols) * cols;
    dx.par_chunks_mut(chunk).zip(x.par_chunks(chunk).zip(g.par_chunks(chunk))).for_each(|(dx, (x, g))| {
        for ((dx, x), g) in dx.chunks_mut(cols).zip(x.chunks(cols)).zip(g.chunks(cols)) {
            let r = inv_rms(x, eps);
            let mean_gy = x.iter().zip(g).map(|(&xv, &gv)| xv * r * gv).sum::<f32>() / cols as f32;
            for ((d, &xv), &gv) in dx.iter_mut().zip(x).zip(g) {
                *d = r * (gv - xv * r * mean_gy);
            }
        }
    });
}

/// Per row, `logsumexp(x) − x[target]`.
pub fn cross_entropy_rows(x: &[f32], cols: usize, targets: &[u32], loss: &mut [f32]) {
    loss.par_iter_mut().zip(x.par_chunks(cols)).zip(targets.par_iter()).for_each(|((l, x), &t)| {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = x.iter().map(|&v| (v - max).exp()).sum();
        *l = max + sum.ln() - x[t as usize];
    });
}

/// Backward of [`cross_entropy_rows`]: `dx = g_row (softmax(x) − onehot(target))`.
pub fn cross_entropy_rows_bwd(x: &[f32], cols: usize, targets: &[u32], g: &[f32], dx: &mut [f32]) {
    dx.par_chunks_mut(cols).zip(x.par_chunks(cols)).zip(targets.par_iter().zip(g.par_iter())).for_each(
        |((dx, x), (&t, &gr))| {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for (d, &v) in dx.iter_mut().zip(x) {
                *d = (v - max).exp();
                sum += *d;
            }
            let scale = gr / sum;
            dx.iter_mut().for_each(|d| *d *= scale);
            dx[t as usize] -= gr;
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_library_exp() {
        let mut worst = 0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_masked_rows_are_zero() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let want: Vec<f64> = {
            let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        softmax_in_place(&mut row);
        for (a, b) in row.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
        let mut masked = vec![f32::NEG_INFINITY; 5];
        softmax_in_place(&mut masked);
        assert!(masked.iter().all(|&v| v == 0.0));
    }
}
