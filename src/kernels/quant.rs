//! Q8_0 weights, in GGML's block layout: every 32 consecutive values of a row share one f16 scale
//! `d`, and each is stored as `round(x / d)` in an i8 (`d = max|x| / 127`). A block is 34 bytes, so
//! a decoded token reads 1.06 bytes per weight instead of bf16's 2.
//!
//! [`matvec_q8_0`] is the decode product `y = x Wᵀ` straight from the blocks; its reference twin
//! dequantizes and accumulates in f64.

use half::f16;
use rayon::prelude::*;

use super::matvec::by_output_rows;
use super::{dispatch, mul_add, Simd, Widen};

/// Values per block.
pub const QK8_0: usize = 32;

/// One Q8_0 block, laid out as GGML's `block_q8_0`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK8_0],
}

/// Quantizes a row-major matrix whose rows are a multiple of 32 long (GGML's `quantize_row_q8_0`).
pub fn quantize_q8_0(values: &[f32]) -> Vec<BlockQ8_0> {
    assert!(values.len().is_multiple_of(QK8_0), "quantize_q8_0: length is not a multiple of 32");
    values
        .par_chunks(QK8_0)
        .map(|block| {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; QK8_0];
            for (q, &v) in qs.iter_mut().zip(block) {
                *q = (v * id).round() as i8;
            }
            BlockQ8_0 { d: f16::from_f32(d), qs }
        })
        .collect()
}

/// The values the blocks stand for.
pub fn dequantize_q8_0(blocks: &[BlockQ8_0]) -> Vec<f32> {
    let mut out = Vec::with_capacity(blocks.len() * QK8_0);
    for b in blocks {
        let d = b.d.to_f32();
        out.extend(b.qs.iter().map(|&q| q as f32 * d));
    }
    out
}

const BLOCK_ROWS: usize = 8;

/// `y (t, out) = x (t, in) · W (out, in)ᵀ` with `W` in Q8_0 blocks (`in` a multiple of 32).
pub fn matvec_q8_0(x: &[f32], w: &[BlockQ8_0], t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
    assert!(n_in.is_multiple_of(QK8_0), "matvec_q8_0: input size is not a multiple of 32");
    assert!(x.len() == t * n_in && w.len() * QK8_0 == n_out * n_in, "matvec_q8_0: shapes disagree");
    let simd = Simd::detect();
    let per_row = n_in / QK8_0;
    by_output_rows(t, n_out, |first, n, out| {
        q8_block::<f32>(simd, x, &w[first * per_row..(first + n) * per_row], t, n_in, out)
    })
}

dispatch!(
    /// `out (rows, t) = rows · x (t, in)ᵀ` for a run of Q8_0 rows (`W` is unused).
    q8_block => q8_block_body(x: &[f32], rows: &[BlockQ8_0], t: usize, n_in: usize, out: &mut [f32])
);

// `dispatch!` instantiates every kernel body with an element type; Q8_0 rows carry their own.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
fn q8_block_body<W: Widen, const FUSED: bool>(x: &[f32], rows: &[BlockQ8_0], t: usize, n_in: usize, out: &mut [f32]) {
    let per_row = n_in / QK8_0;
    for (row, y_row) in rows.chunks_exact(per_row).zip(out.chunks_mut(t)) {
        for (b, y_block) in y_row.chunks_mut(BLOCK_ROWS).enumerate() {
            let x_block = &x[b * BLOCK_ROWS * n_in..(b * BLOCK_ROWS + y_block.len()) * n_in];
            q8_dot_rows::<FUSED>(x_block, row, n_in, y_block);
        }
    }
}

/// `y[i] = x[i] · row` for the (at most `BLOCK_ROWS`) rows of `x`, reading the row's blocks once.
#[inline(always)]
fn q8_dot_rows<const FUSED: bool>(x: &[f32], row: &[BlockQ8_0], n_in: usize, y: &mut [f32]) {
    let t = y.len();
    if t == 1 {
        // Decode: one accumulator of 32 lanes that stays in registers; each block's products are
        // scaled once by its `d`.
        let mut acc = [0f32; QK8_0];
        for (block, xs) in row.iter().zip(x.chunks_exact(QK8_0)) {
            let d = block.d.to_f32();
            let mut s = [0f32; QK8_0];
            for l in 0..QK8_0 {
                s[l] = block.qs[l] as f32 * xs[l];
            }
            for l in 0..QK8_0 {
                acc[l] = mul_add::<FUSED>(d, s[l], acc[l]);
            }
        }
        y[0] = acc.iter().sum();
        return;
    }
    let mut acc = [[0f32; QK8_0]; BLOCK_ROWS];
    for (bi, block) in row.iter().enumerate() {
        let d = block.d.to_f32();
        let mut w = [0f32; QK8_0];
        for (o, &q) in w.iter_mut().zip(&block.qs) {
            *o = q as f32 * d;
        }
        for (ti, a) in acc.iter_mut().enumerate().take(t) {
            let xs = &x[ti * n_in + bi * QK8_0..ti * n_in + (bi + 1) * QK8_0];
            for l in 0..QK8_0 {
                a[l] = mul_add::<FUSED>(w[l], xs[l], a[l]);
            }
        }
    }
    for (ti, out) in y.iter_mut().enumerate() {
        *out = acc[ti].iter().sum();
    }
}

/// Dequantize, then plain loops with f64 accumulation: the definition `matvec_q8_0` must match.
pub fn matvec_q8_0_reference(x: &[f32], w: &[BlockQ8_0], t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
    let dense = dequantize_q8_0(w);
    super::matvec::matvec_reference(x, &dense, t, n_in, n_out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matvec::tests::{assert_close, random};

    #[test]
    fn quantization_error_is_within_half_a_step() {
        let v = random(32 * 40, 9);
        let blocks = quantize_q8_0(&v);
        assert_eq!(std::mem::size_of::<BlockQ8_0>(), 34, "GGML's block_q8_0 is 34 bytes");
        let back = dequantize_q8_0(&blocks);
        for (b, (block, chunk)) in blocks.iter().zip(v.chunks(32)).enumerate() {
            let d = block.d.to_f32();
            for (i, &x) in chunk.iter().enumerate() {
                // Half a step, plus the rounding of d itself to f16.
                let err = (back[b * 32 + i] - x).abs();
                assert!(err <= 0.5 * d + 127.0 * d * 1e-3, "block {b}[{i}]: {x} -> {}", back[b * 32 + i]);
            }
        }
        assert!(quantize_q8_0(&[0.0; 32])[0].qs.iter().all(|&q| q == 0));
    }

    #[test]
    fn matvec_q8_0_matches_its_reference_in_every_variant() {
        for (t, n_in, n_out) in [(1, 32, 1), (1, 64, 33), (3, 96, 65), (8, 2048, 40), (9, 256, 70), (16, 512, 31)] {
            let x = random(t * n_in, 1);
            let w = quantize_q8_0(&random(n_out * n_in, 2));
            let want = matvec_q8_0_reference(&x, &w, t, n_in, n_out);
            let what = format!("q8_0 t {t} in {n_in} out {n_out}");
            assert_close(&what, &matvec_q8_0(&x, &w, t, n_in, n_out), &want);
            for simd in Simd::available() {
                let mut out = vec![0f32; n_out * t];
                q8_block::<f32>(simd, &x, &w, t, n_in, &mut out);
                let y: Vec<f32> = (0..t * n_out).map(|k| out[(k % n_out) * t + k / n_out]).collect();
                assert_close(&format!("{what} {simd:?}"), &y, &want);
            }
        }
    }
}
