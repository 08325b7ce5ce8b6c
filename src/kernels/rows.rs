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
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
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
