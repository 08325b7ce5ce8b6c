//! Quantized weights in GGML's block layouts, and the decode product over them.
//!
//! A quantized `(out, in)` matrix is each row's values cut into blocks ([`QuantBlock`]): Q8_0 here,
//! the k-quants (Q4_K, Q6_K) in [`super::kquant`]. Every block format is byte for byte GGML's, so
//! a GGUF file's tensor data is used as it is.
//!
//! The product `y = x Wᵀ` ([`matvec_quant`]) first quantizes each row of `x` to 8 bits in groups
//! of 32 (one f32 scale per group, [`QuantizedRows`]); a block then contributes integer dot
//! products of its codes with the activation codes, scaled once per group. This is how GGML
//! multiplies quantized weights: the inner loop is i8 x i8 (or u4 x i8) multiply-adds in 16-bit
//! lanes, not a float conversion and FMA per weight. The reference twin ([`matvec_quant_reference`])
//! dequantizes both sides and accumulates in f64; the two agree to float rounding.

use half::f16;
use rayon::prelude::*;

use super::matvec::by_output_rows;
use super::Simd;

/// Values per Q8_0 block, and per group of quantized activations.
pub const QK8_0: usize = 32;

/// One block of a quantized row.
pub trait QuantBlock: Copy + Send + Sync + 'static {
    /// Values per block (32 or 256).
    const VALUES: usize;
    /// GGML's name for the format.
    const NAME: &'static str;
    /// Writes the `VALUES` values the block stands for.
    fn dequantize(&self, out: &mut [f32]);
    /// `Σ w·x` over the block, `x` given as 8-bit codes `q` with one scale `d` per 32 values and
    /// the sums of the codes per 32 (`sums`, for formats with a per-group minimum).
    fn dot(&self, q: &[i8], d: &[f32], sums: &[i32]) -> f32;
}

/// One Q8_0 block, laid out as GGML's `block_q8_0`: 32 i8 codes and an f16 scale (8.5 bits per weight).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK8_0],
}

/// `Σ a·b` over 32 codes, in 16-bit products (vectorizes to multiply-add of word pairs).
#[inline(always)]
pub(crate) fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    let mut s = 0i32;
    for (x, y) in a.iter().zip(b) {
        s += (*x as i16 * *y as i16) as i32;
    }
    s
}

impl QuantBlock for BlockQ8_0 {
    const VALUES: usize = QK8_0;
    const NAME: &'static str = "Q8_0";

    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = q as f32 * d;
        }
    }

    #[inline(always)]
    fn dot(&self, q: &[i8], d: &[f32], _sums: &[i32]) -> f32 {
        self.d.to_f32() * d[0] * dot_i8(&self.qs, &q[..QK8_0]) as f32
    }
}

/// Quantizes a row-major matrix whose rows are a multiple of 32 long (GGML's `quantize_row_q8_0`:
/// `d = max|x| / 127`, codes `round(x / d)`).
pub fn quantize_q8_0(values: &[f32]) -> Vec<BlockQ8_0> {
    assert!(values.len().is_multiple_of(QK8_0), "quantize_q8_0: length is not a multiple of 32");
    values
        .par_chunks(QK8_0)
        .map(|block| {
            let (d, qs) = quantize_group(block);
            BlockQ8_0 { d: f16::from_f32(d), qs }
        })
        .collect()
}

/// One group of 32 values as 8-bit codes and their scale.
#[inline(always)]
fn quantize_group(block: &[f32]) -> (f32, [i8; QK8_0]) {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK8_0];
    for (q, &v) in qs.iter_mut().zip(block) {
        *q = (v * id).round() as i8;
    }
    (d, qs)
}

/// The values of a run of blocks.
pub fn dequantize<B: QuantBlock>(blocks: &[B]) -> Vec<f32> {
    let mut out = vec![0f32; blocks.len() * B::VALUES];
    out.par_chunks_mut(B::VALUES).zip(blocks.par_iter()).for_each(|(o, b)| b.dequantize(o));
    out
}

/// The values of Q8_0 blocks.
pub fn dequantize_q8_0(blocks: &[BlockQ8_0]) -> Vec<f32> {
    dequantize(blocks)
}

/// Rows of activations as 8-bit codes, one f32 scale and one code sum per 32 values.
pub struct QuantizedRows {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub sums: Vec<i32>,
}

impl QuantizedRows {
    /// Quantizes `x` (rows of a multiple of 32 values).
    pub fn new(x: &[f32]) -> QuantizedRows {
        let groups = x.len() / QK8_0;
        let mut rows = QuantizedRows { q: vec![0; groups * QK8_0], d: vec![0.0; groups], sums: vec![0; groups] };
        for (g, chunk) in x.chunks_exact(QK8_0).enumerate() {
            let (d, qs) = quantize_group(chunk);
            rows.q[g * QK8_0..(g + 1) * QK8_0].copy_from_slice(&qs);
            rows.d[g] = d;
            rows.sums[g] = qs.iter().map(|&v| v as i32).sum();
        }
        rows
    }

    /// The values the codes stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        self.q.iter().enumerate().map(|(i, &q)| q as f32 * self.d[i / QK8_0]).collect()
    }
}

/// `y (t, out) = x (t, in) · W (out, in)ᵀ` with `W` in blocks of `B` (`in` a multiple of `B::VALUES`).
pub fn matvec_quant<B: QuantBlock>(x: &[f32], w: &[B], t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
    assert!(n_in.is_multiple_of(B::VALUES), "matvec_quant: input size is not a multiple of the block");
    assert!(x.len() == t * n_in && w.len() * B::VALUES == n_out * n_in, "matvec_quant: shapes disagree");
    let xq = QuantizedRows::new(x);
    let simd = Simd::detect();
    let per_row = n_in / B::VALUES;
    by_output_rows(t, n_out, |first, n, out| {
        quant_rows(simd, &xq, &w[first * per_row..(first + n) * per_row], t, n_in, out)
    })
}

/// The Q8_0 product.
pub fn matvec_q8_0(x: &[f32], w: &[BlockQ8_0], t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
    matvec_quant(x, w, t, n_in, n_out)
}

/// `out (rows, t) = rows · x (t, in)ᵀ`, compiled for the chosen instruction set.
pub(crate) fn quant_rows<B: QuantBlock>(
    simd: Simd,
    x: &QuantizedRows,
    rows: &[B],
    t: usize,
    n_in: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn avx512<B: QuantBlock>(x: &QuantizedRows, rows: &[B], t: usize, n_in: usize, out: &mut [f32]) {
        quant_rows_body(x, rows, t, n_in, out)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<B: QuantBlock>(x: &QuantizedRows, rows: &[B], t: usize, n_in: usize, out: &mut [f32]) {
        quant_rows_body(x, rows, t, n_in, out)
    }
    match simd {
        // SAFETY: `Simd::detect` and `Simd::available` only return a variant whose features the
        // running CPU has.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { avx512(x, rows, t, n_in, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2(x, rows, t, n_in, out) },
        _ => quant_rows_body(x, rows, t, n_in, out),
    }
}

#[inline(always)]
fn quant_rows_body<B: QuantBlock>(x: &QuantizedRows, rows: &[B], t: usize, n_in: usize, out: &mut [f32]) {
    let per_row = n_in / B::VALUES;
    let groups_per_block = B::VALUES / QK8_0;
    let groups_per_row = n_in / QK8_0;
    for (row, y_row) in rows.chunks_exact(per_row).zip(out.chunks_mut(t)) {
        for (ti, y) in y_row.iter_mut().enumerate() {
            let g0 = ti * groups_per_row;
            let mut acc = 0f32;
            for (bi, block) in row.iter().enumerate() {
                let g = g0 + bi * groups_per_block;
                acc += block.dot(
                    &x.q[g * QK8_0..(g + groups_per_block) * QK8_0],
                    &x.d[g..g + groups_per_block],
                    &x.sums[g..g + groups_per_block],
                );
            }
            *y = acc;
        }
    }
}

/// Dequantizes the weight and the 8-bit activations, then plain loops with f64 accumulation: the
/// definition `matvec_quant` must match.
pub fn matvec_quant_reference<B: QuantBlock>(x: &[f32], w: &[B], t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
    let dense = dequantize(w);
    let xs = QuantizedRows::new(x).dequantize();
    super::matvec::matvec_reference(&xs, &dense, t, n_in, n_out)
}

/// A quantized `(out, in)` matrix in one of the formats the kernels multiply directly.
#[derive(Debug, Clone)]
pub enum QuantMatrix {
    Q8_0(Vec<BlockQ8_0>),
    Q4K(Vec<super::kquant::BlockQ4K>),
    Q6K(Vec<super::kquant::BlockQ6K>),
}

impl QuantMatrix {
    /// GGML's name for the format.
    pub fn name(&self) -> &'static str {
        match self {
            QuantMatrix::Q8_0(_) => BlockQ8_0::NAME,
            QuantMatrix::Q4K(_) => super::kquant::BlockQ4K::NAME,
            QuantMatrix::Q6K(_) => super::kquant::BlockQ6K::NAME,
        }
    }

    /// Bytes of the blocks.
    pub fn bytes(&self) -> usize {
        match self {
            QuantMatrix::Q8_0(b) => std::mem::size_of_val(b.as_slice()),
            QuantMatrix::Q4K(b) => std::mem::size_of_val(b.as_slice()),
            QuantMatrix::Q6K(b) => std::mem::size_of_val(b.as_slice()),
        }
    }

    /// Rows of `n_in` values.
    pub fn rows(&self, n_in: usize) -> usize {
        let blocks = match self {
            QuantMatrix::Q8_0(b) => b.len(),
            QuantMatrix::Q4K(b) => b.len(),
            QuantMatrix::Q6K(b) => b.len(),
        };
        blocks * self.block_values() / n_in
    }

    /// Values per block.
    pub fn block_values(&self) -> usize {
        match self {
            QuantMatrix::Q8_0(_) => BlockQ8_0::VALUES,
            QuantMatrix::Q4K(_) => super::kquant::BlockQ4K::VALUES,
            QuantMatrix::Q6K(_) => super::kquant::BlockQ6K::VALUES,
        }
    }

    /// `y (t, out) = x (t, in) · Wᵀ`.
    pub fn matvec(&self, x: &[f32], t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
        match self {
            QuantMatrix::Q8_0(b) => matvec_quant(x, b, t, n_in, n_out),
            QuantMatrix::Q4K(b) => matvec_quant(x, b, t, n_in, n_out),
            QuantMatrix::Q6K(b) => matvec_quant(x, b, t, n_in, n_out),
        }
    }

    /// The values, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            QuantMatrix::Q8_0(b) => dequantize(b),
            QuantMatrix::Q4K(b) => dequantize(b),
            QuantMatrix::Q6K(b) => dequantize(b),
        }
    }

    /// The values of rows `rows` (each `n_in` long), e.g. embedding lookups.
    pub fn dequantize_rows(&self, ids: &[usize], n_in: usize) -> Vec<f32> {
        fn rows_of<B: QuantBlock>(blocks: &[B], ids: &[usize], n_in: usize) -> Vec<f32> {
            let per_row = n_in / B::VALUES;
            let mut out = vec![0f32; ids.len() * n_in];
            for (o, &id) in out.chunks_mut(n_in).zip(ids) {
                for (ob, b) in o.chunks_mut(B::VALUES).zip(&blocks[id * per_row..(id + 1) * per_row]) {
                    b.dequantize(ob);
                }
            }
            out
        }
        match self {
            QuantMatrix::Q8_0(b) => rows_of(b, ids, n_in),
            QuantMatrix::Q4K(b) => rows_of(b, ids, n_in),
            QuantMatrix::Q6K(b) => rows_of(b, ids, n_in),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::matvec::tests::random;

    /// Relative agreement to float rounding (the kernel sums in f32 in another order).
    pub(crate) fn assert_close_rel(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= 2e-5 * scale + 1e-5 * b.abs(), "{what}: [{i}] {a} vs {b}");
        }
    }

    /// Checks `matvec_quant` against its reference for every variant on ragged shapes.
    pub(crate) fn check_kernel<B: QuantBlock>(quantize: impl Fn(&[f32]) -> Vec<B>) {
        let k = B::VALUES;
        for (t, n_in, n_out) in [(1, k, 1), (1, 2 * k, 33), (3, 3 * k, 65), (8, 8 * k, 40), (9, k, 70), (17, 2 * k, 31)]
        {
            let x = random(t * n_in, 1);
            let w = quantize(&random(n_out * n_in, 2));
            let want = matvec_quant_reference(&x, &w, t, n_in, n_out);
            let what = format!("{} t {t} in {n_in} out {n_out}", B::NAME);
            assert_close_rel(&what, &matvec_quant(&x, &w, t, n_in, n_out), &want);
            let xq = QuantizedRows::new(&x);
            for simd in Simd::available() {
                let mut out = vec![0f32; n_out * t];
                quant_rows(simd, &xq, &w, t, n_in, &mut out);
                let y: Vec<f32> = (0..t * n_out).map(|i| out[(i % n_out) * t + i / n_out]).collect();
                assert_close_rel(&format!("{what} {simd:?}"), &y, &want);
            }
        }
    }

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
        check_kernel(quantize_q8_0);
    }

    #[test]
    fn quantized_activations_stay_close_to_the_float_product() {
        // The 8-bit activations cost little: the product stays within 1% of the f32-activation one.
        let (t, n_in, n_out) = (2, 512, 64);
        let x = random(t * n_in, 5);
        let w = quantize_q8_0(&random(n_out * n_in, 6));
        let exact = crate::kernels::matvec::matvec_reference(&x, &dequantize_q8_0(&w), t, n_in, n_out);
        let got = matvec_q8_0(&x, &w, t, n_in, n_out);
        let err: f32 = got.iter().zip(&exact).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
        let norm: f32 = exact.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(err / norm < 0.01, "relative error {}", err / norm);
    }
}
