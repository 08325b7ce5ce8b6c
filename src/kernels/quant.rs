//! Quantized weights in GGML's block layouts, and the decode product over them.
//!
//! A quantized `(out, in)` matrix is each row's values cut into blocks ([`QuantBlock`]): Q8_0 here,
//! the k-quants (Q4_K, Q6_K) in [`super::kquant`]. Every block format is byte for byte GGML's, so
//! a GGUF file's tensor data is used as it is.
//!
//! The product `y = x Wᵀ` ([`matvec_quant`]) first quantizes each row of `x` to 8 bits
//! ([`QuantizedRows`]): one f32 scale per 32 values for the 32-value formats (GGML's Q8_0
//! activations), one per 256 for the k-quants (GGML's Q8_K), and the sum of every 16 codes. A
//! block then contributes integer dot products of its codes with the activation codes; a
//! k-quant block sums its groups' products times their integer scales in 32-bit lanes and
//! converts once per 256 values, and per-group minimums and code offsets come from the code sums
//! instead of from the products. On AVX-512 VNNI the products are `vpdpbusd` (u8 × i8, four
//! products into one 32-bit lane) and `vpdpwssd`. The reference twin ([`matvec_quant_reference`])
//! dequantizes both sides and accumulates in f64; the two agree to float rounding.

use half::f16;
use rayon::prelude::*;

use super::matvec::{by_output_rows, sum_tree, ROWS_PER_TASK};
use super::tiles::{row_bf16, tile_rows, Tile, TileQ4K, TileQ5_0, TileQ6K, TileQ8_0, Tiles, TILE_ROWS};
use super::Simd;

/// Values per Q8_0 block, and per scale of the 32-value formats' activations.
pub const QK8_0: usize = 32;
/// Values per activation code sum.
pub const SUM_GROUP: usize = 16;

/// One block of a quantized row.
pub trait QuantBlock: Copy + Send + Sync + 'static {
    /// Values per block (32 or 256).
    const VALUES: usize;
    /// Activation values per scale: 32, or 256 for the k-quants (whose groups have integer scales).
    const ACT_GROUP: usize;
    /// GGML's name for the format.
    const NAME: &'static str;
    /// Writes the `VALUES` values the block stands for.
    fn dequantize(&self, out: &mut [f32]);
    /// Adds `Σ w·x` over the block to `lanes` (summed at the end of the row) and `extra`, `x`
    /// given as 8-bit codes `q` with one scale `d` per `ACT_GROUP` values and the sums of the codes
    /// per 16 (`sums`, for per-group minimums and code offsets). Products stay in 16 vector lanes:
    /// no horizontal sum per block.
    fn dot<const ISA: u8>(&self, q: &[i8], d: &[f32], sums: &[i16], lanes: &mut [f32; LANES], extra: &mut f32);
}

/// Accumulator lanes of the quantized dot products (one AVX-512 register of f32).
pub const LANES: usize = 16;
const ACCUMULATORS: usize = 4;

/// An f16's value, branch-free (finite values; a scale is never infinite or NaN). Unlike
/// `half`'s conversion it needs no run-time CPU check, which costs more than the block's products.
#[inline(always)]
pub(crate) fn f16_value(h: f16) -> f32 {
    let bits = h.to_bits() as u32;
    // Shift exponent and mantissa into f32 position, then rescale the exponent bias (2^112 =
    // 2^(127 - 15)); subnormals come out right because the multiply normalises them.
    let magnitude = f32::from_bits((bits & 0x7fff) << 13) * f32::from_bits(0x7780_0000);
    f32::from_bits(magnitude.to_bits() | ((bits & 0x8000) << 16))
}

/// [`f16_value`] in the kernels: one `vcvtph2ps` in the AVX-512 variants (compiled with F16C).
#[inline(always)]
pub(crate) fn f16_scale<const ISA: u8>(h: f16) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if ISA >= AVX512 {
        use std::arch::x86_64::*;
        // SAFETY: the AVX-512 variants are compiled with f16c, which `Simd::detect` checked.
        return unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32))) };
    }
    f16_value(h)
}

/// The instruction sets the quantized kernels are compiled for (a const parameter); the
/// AVX-512 code runs for `ISA >= AVX512`.
pub(crate) const PORTABLE: u8 = 0;
pub(crate) const AVX2: u8 = 1;
pub(crate) const AVX512: u8 = 2;
pub(crate) const AVX512_VNNI: u8 = 3;

/// `lanes[l] += s_l · (a[2l]·b[2l] + a[2l+1]·b[2l+1])` over 32 codes, with `s_l = s1` for the
/// lanes of the first 16 codes and `s2` for the rest: pairs of 16-bit products summed in 32 bits,
/// converted and scaled in 16 lanes. AVX-512 spells it out (sign-extend, multiply-add of word
/// pairs, convert, FMA: four instructions per 32 codes), AVX2 the same in two halves; the portable
/// variant is plain loops.
#[inline(always)]
pub(crate) fn dot32_scaled<const ISA: u8>(a: &[i8], b: &[i8], s1: f32, s2: f32, lanes: &mut [f32; LANES]) {
    let (a, b) = (&a[..32], &b[..32]);
    #[cfg(target_arch = "x86_64")]
    if ISA >= AVX512 {
        use std::arch::x86_64::*;
        // SAFETY: ISA >= AVX512 only inside the AVX-512 variants, which run only where
        // `Simd::detect` found avx512f and avx512bw; `a`, `b` hold 32 bytes and `lanes` 16 f32s
        // (unaligned loads and stores).
        unsafe {
            let va = _mm512_cvtepi8_epi16(_mm256_loadu_si256(a.as_ptr().cast()));
            let vb = _mm512_cvtepi8_epi16(_mm256_loadu_si256(b.as_ptr().cast()));
            let p = _mm512_cvtepi32_ps(_mm512_madd_epi16(va, vb));
            let scale = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(s1), _mm512_set1_ps(s2));
            let acc = _mm512_loadu_ps(lanes.as_ptr());
            _mm512_storeu_ps(lanes.as_mut_ptr(), _mm512_fmadd_ps(p, scale, acc));
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if ISA == AVX2 {
        use std::arch::x86_64::*;
        // SAFETY: the AVX2 variant only (avx2 and fma present); `a`, `b` hold 32 bytes (two
        // 16-byte loads each) and `lanes` 16 f32s. The same sums and FMAs as the loops below.
        unsafe {
            for (h, s) in [(0, s1), (1, s2)] {
                let va = _mm256_cvtepi8_epi16(_mm_loadu_si128(a[16 * h..].as_ptr().cast()));
                let vb = _mm256_cvtepi8_epi16(_mm_loadu_si128(b[16 * h..].as_ptr().cast()));
                let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(va, vb));
                let acc = _mm256_loadu_ps(lanes[8 * h..].as_ptr());
                _mm256_storeu_ps(lanes[8 * h..].as_mut_ptr(), _mm256_fmadd_ps(p, _mm256_set1_ps(s), acc));
            }
        }
        return;
    }
    let mut p = [0i32; LANES];
    for l in 0..LANES {
        p[l] = (a[2 * l] as i16 * b[2 * l] as i16) as i32 + (a[2 * l + 1] as i16 * b[2 * l + 1] as i16) as i32;
    }
    for l in 0..LANES {
        let s = if l < LANES / 2 { s1 } else { s2 };
        lanes[l] = if ISA == PORTABLE { p[l] as f32 * s + lanes[l] } else { (p[l] as f32).mul_add(s, lanes[l]) };
    }
}

/// [`dot32_scaled`] with one scale for all 32 codes.
#[inline(always)]
pub(crate) fn dot32_lanes<const ISA: u8>(a: &[i8], b: &[i8], s: f32, lanes: &mut [f32; LANES]) {
    dot32_scaled::<ISA>(a, b, s, s, lanes)
}

/// `lanes[0..8] += s · Σ (c − offset)·x` over 32 codes `c` in `0..=255` stored as `c ^ flip`
/// (`flip` 0x80 turns i8 codes into `c + 128`), `x` the activation codes with sum `sum`: one
/// `vpdpbusd` (u8 × i8 products, four into each 32-bit lane) whose lanes start at
/// `−offset·sum / 8`, so the offset costs no instruction of its own. AVX-512 VNNI only.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn dot32_vnni(
    codes: std::arch::x86_64::__m256i,
    x: &[i8],
    offset: i32,
    sum: i32,
    s: f32,
    lanes: &mut [f32; LANES],
) {
    use std::arch::x86_64::*;
    let x = &x[..32];
    // SAFETY: called only where ISA == AVX512_VNNI, inside a variant compiled for avx512vnni and
    // avx512vl that runs only where `Simd::detect` found them; `x` holds 32 bytes, `lanes` 16 f32s.
    unsafe {
        let start = _mm256_set1_epi32(-offset * sum / 8);
        let p = _mm256_dpbusd_epi32(start, codes, _mm256_loadu_si256(x.as_ptr().cast()));
        let acc = _mm256_loadu_ps(lanes.as_ptr());
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s), acc));
    }
}

/// One Q8_0 block, laid out as GGML's `block_q8_0`: 32 i8 codes and an f16 scale (8.5 bits per weight).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK8_0],
}

impl QuantBlock for BlockQ8_0 {
    const VALUES: usize = QK8_0;
    const ACT_GROUP: usize = QK8_0;
    const NAME: &'static str = "Q8_0";

    #[inline(always)]
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = q as f32 * d;
        }
    }

    #[inline(always)]
    fn dot<const ISA: u8>(&self, q: &[i8], d: &[f32], sums: &[i16], lanes: &mut [f32; LANES], _extra: &mut f32) {
        let s = f16_scale::<ISA>(self.d) * d[0];
        #[cfg(target_arch = "x86_64")]
        if ISA == AVX512_VNNI {
            use std::arch::x86_64::*;
            // SAFETY: AVX-512 VNNI variant only; `qs` and `q` are 32 bytes, `lanes` 16 floats.
            // `vpdpbusd` multiplies u8 by i8: |w| by x with w's sign moved onto x (`vpsignb`; -128
            // is 128 as u8, and activation codes are never -128).
            unsafe {
                let w = _mm256_loadu_si256(self.qs.as_ptr().cast());
                let x = _mm256_loadu_si256(q.as_ptr().cast());
                let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
                let acc = _mm256_loadu_ps(lanes.as_ptr());
                _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s), acc));
            }
            return;
        }
        let _ = sums;
        dot32_lanes::<ISA>(&self.qs, q, s, lanes);
    }
}

/// Quantizes a row-major matrix whose rows are a multiple of 32 long (GGML's `quantize_row_q8_0`:
/// `d = max|x| / 127`, codes `round(x / d)`).
pub fn quantize_q8_0(values: &[f32]) -> Vec<BlockQ8_0> {
    assert!(values.len().is_multiple_of(QK8_0), "quantize_q8_0: length is not a multiple of 32");
    values
        .par_chunks(QK8_0)
        .map(|block| {
            let mut qs = [0i8; QK8_0];
            let d = quantize_group(block, &mut qs);
            BlockQ8_0 { d: f16::from_f32(d), qs }
        })
        .collect()
}

/// One group of values as 8-bit codes (`round(x / d)`, `d = max|x| / 127`); returns `d`.
#[inline(always)]
fn quantize_group(group: &[f32], codes: &mut [i8]) -> f32 {
    let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in codes.iter_mut().zip(group) {
        *q = (v * id).round() as i8;
    }
    d
}

/// [`quantize_group`] for activations, rounding half to even by adding 1.5·2²³ (exact for
/// |x| < 2²², and the codes are at most 127): `f32::round` is a library call on baseline x86-64,
/// which made quantizing a 2048-wide activation cost a tenth of a small expert's product.
#[inline(always)]
fn quantize_activations(group: &[f32], codes: &mut [i8]) -> f32 {
    let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    const MAGIC: f32 = 12_582_912.0;
    for (q, &v) in codes.iter_mut().zip(group) {
        *q = ((v * id + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32) as i8;
    }
    d
}

/// The values of a run of blocks.
pub fn dequantize<B: QuantBlock>(blocks: &[B]) -> Vec<f32> {
    let mut out = vec![0f32; blocks.len() * B::VALUES];
    out.par_chunks_mut(B::VALUES).zip(blocks.par_iter()).for_each(|(o, b)| b.dequantize(o));
    out
}

/// Activations from which [`QuantizedRows::new`] quantizes in parallel.
const PARALLEL_VALUES: usize = 1 << 16;

/// Rows of activations as 8-bit codes: one f32 scale per `group` values (32 or 256) and one
/// code sum per 16.
pub struct QuantizedRows {
    pub group: usize,
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub sums: Vec<i16>,
}

impl QuantizedRows {
    /// Quantizes `x` (rows of a multiple of `group` values) with one scale per `group`.
    pub fn new(x: &[f32], group: usize) -> QuantizedRows {
        // (A prefill's rows in parallel; one decode row is too small to share out.)
        if x.len() < PARALLEL_VALUES {
            let mut rows = QuantizedRows::empty(group);
            rows.quantize(x, group);
            return rows;
        }
        let mut q = vec![0i8; x.len() / group * group];
        let sum = |c: &[i8]| c.iter().map(|&v| v as i16).sum();
        let d = x
            .par_chunks_exact(group)
            .zip(q.par_chunks_exact_mut(group))
            .map(|(g, c)| quantize_activations(g, c))
            .collect();
        let sums = q.par_chunks_exact(SUM_GROUP).map(sum).collect();
        QuantizedRows { group, q, d, sums }
    }

    /// No rows yet, in groups of `group`.
    pub fn empty(group: usize) -> QuantizedRows {
        QuantizedRows { group, q: Vec::new(), d: Vec::new(), sums: Vec::new() }
    }

    /// Quantizes `x` into `self`'s buffers, on the calling thread (a decode row): what
    /// [`QuantizedRows::new`] gives, allocating nothing once the buffers have held as many values.
    pub fn quantize(&mut self, x: &[f32], group: usize) {
        self.group = group;
        self.q.clear();
        self.q.resize(x.len() / group * group, 0);
        self.d.clear();
        self.d
            .extend(x.chunks_exact(group).zip(self.q.chunks_exact_mut(group)).map(|(g, c)| quantize_activations(g, c)));
        self.sums.clear();
        self.sums.extend(self.q.chunks_exact(SUM_GROUP).map(|c| c.iter().map(|&v| v as i16).sum::<i16>()));
    }

    /// The values the codes stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        self.q.iter().enumerate().map(|(i, &q)| q as f32 * self.d[i / self.group]).collect()
    }
}

/// `y (t, out) = x (t, in) · W (out, in)ᵀ` with `W` in blocks of `B` (`in` a multiple of `B::VALUES`).
pub fn matvec_quant<B: QuantBlock>(x: &[f32], w: &[B], t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
    assert!(n_in.is_multiple_of(B::VALUES), "matvec_quant: input size is not a multiple of the block");
    assert!(x.len() == t * n_in && w.len() * B::VALUES == n_out * n_in, "matvec_quant: shapes disagree");
    let xq = QuantizedRows::new(x, B::ACT_GROUP);
    let simd = Simd::detect();
    let per_row = n_in / B::VALUES;
    by_output_rows(ROWS_PER_TASK, t, n_out, |first, n, out| {
        quant_rows(simd, &xq, &w[first * per_row..(first + n) * per_row], t, n_in, out)
    })
}

/// `out (rows, t) = rows · x (t, in)ᵀ`, compiled for the chosen instruction set (`x` quantized
/// with `B::ACT_GROUP`).
pub(crate) fn quant_rows<B: QuantBlock>(
    simd: Simd,
    x: &QuantizedRows,
    rows: &[B],
    t: usize,
    n_in: usize,
    out: &mut [f32],
) {
    assert_eq!(x.group, B::ACT_GROUP, "quant_rows: activations quantized for another format");
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    unsafe fn avx512_vnni<B: QuantBlock>(x: &QuantizedRows, rows: &[B], t: usize, n_in: usize, out: &mut [f32]) {
        quant_rows_body::<B, AVX512_VNNI>(x, rows, t, n_in, out)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    unsafe fn avx512<B: QuantBlock>(x: &QuantizedRows, rows: &[B], t: usize, n_in: usize, out: &mut [f32]) {
        quant_rows_body::<B, AVX512>(x, rows, t, n_in, out)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<B: QuantBlock>(x: &QuantizedRows, rows: &[B], t: usize, n_in: usize, out: &mut [f32]) {
        quant_rows_body::<B, AVX2>(x, rows, t, n_in, out)
    }
    match simd {
        // SAFETY: `Simd::detect` and `Simd::available` only return a variant whose features the
        // running CPU has.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512Vnni => unsafe { avx512_vnni(x, rows, t, n_in, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { avx512(x, rows, t, n_in, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2(x, rows, t, n_in, out) },
        _ => quant_rows_body::<B, PORTABLE>(x, rows, t, n_in, out),
    }
}

#[inline(always)]
fn quant_rows_body<B: QuantBlock, const ISA: u8>(
    x: &QuantizedRows,
    rows: &[B],
    t: usize,
    n_in: usize,
    out: &mut [f32],
) {
    let per_row = n_in / B::VALUES;
    let (scales_per_block, sums_per_block) = (B::VALUES / B::ACT_GROUP, B::VALUES / SUM_GROUP);
    for (row, y_row) in rows.chunks_exact(per_row).zip(out.chunks_mut(t)) {
        for (ti, y) in y_row.iter_mut().enumerate() {
            let xq = &x.q[ti * n_in..(ti + 1) * n_in];
            let xd = &x.d[ti * n_in / B::ACT_GROUP..(ti + 1) * n_in / B::ACT_GROUP];
            let xs = &x.sums[ti * n_in / SUM_GROUP..(ti + 1) * n_in / SUM_GROUP];
            // Four accumulators, one per block in turn: consecutive blocks' multiply-adds do not
            // wait on each other's (latency-bound with one accumulator).
            let [mut a0, mut a1, mut a2, mut a3] = [[0f32; LANES]; ACCUMULATORS];
            let mut extra = 0f32;
            // (A macro, not a closure: a closure is compiled without the caller's target features.)
            macro_rules! dot {
                ($bi:expr, $block:expr, $acc:expr) => {{
                    let b = $bi;
                    $block.dot::<ISA>(
                        &xq[b * B::VALUES..(b + 1) * B::VALUES],
                        &xd[b * scales_per_block..(b + 1) * scales_per_block],
                        &xs[b * sums_per_block..(b + 1) * sums_per_block],
                        $acc,
                        &mut extra,
                    )
                }};
            }
            let mut quads = row.chunks_exact(ACCUMULATORS);
            for (k, quad) in quads.by_ref().enumerate() {
                let bi = k * ACCUMULATORS;
                dot!(bi, quad[0], &mut a0);
                dot!(bi + 1, quad[1], &mut a1);
                dot!(bi + 2, quad[2], &mut a2);
                dot!(bi + 3, quad[3], &mut a3);
            }
            let done = row.len() / ACCUMULATORS * ACCUMULATORS;
            for (k, block) in quads.remainder().iter().enumerate() {
                dot!(done + k, block, &mut a0);
            }
            *y = sum_lanes([a0, a1, a2, a3]) + extra;
        }
    }
}

/// The sum of the accumulators' lanes: lane-wise, then as a tree (summed in order they are a
/// chain of 64 dependent adds, which cost as much as the products of a 2048-wide Q4_K row).
#[inline(always)]
fn sum_lanes(acc: [[f32; LANES]; ACCUMULATORS]) -> f32 {
    sum_tree(std::array::from_fn(|l| (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l])))
}

/// Dequantizes the weight and the 8-bit activations, then plain loops with f64 accumulation: the
/// definition `matvec_quant` must match.
pub fn matvec_quant_reference<B: QuantBlock>(x: &[f32], w: &[B], t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
    let dense = dequantize(w);
    let xs = QuantizedRows::new(x, B::ACT_GROUP).dequantize();
    super::matvec::matvec_reference(&xs, &dense, t, n_in, n_out)
}

/// A quantized `(out, in)` matrix in one of the formats the kernels multiply directly: rows of
/// blocks as GGML stores them, or (where the CPU has AVX-512 VNNI) the same blocks in tiles of 16
/// rows ([`super::tiles`]).
#[derive(Debug, Clone)]
pub enum QuantMatrix {
    Q8_0(Vec<BlockQ8_0>),
    Q4_0(Vec<super::kquant::BlockQ4_0>),
    Q5_0(Vec<super::kquant::BlockQ5_0>),
    Q4K(Vec<super::kquant::BlockQ4K>),
    Q5K(Vec<super::kquant::BlockQ5K>),
    Q6K(Vec<super::kquant::BlockQ6K>),
    Q8_0Tiles(Tiles<TileQ8_0>),
    Q5_0Tiles(Tiles<TileQ5_0>),
    Q4KTiles(Tiles<TileQ4K>),
    Q6KTiles(Tiles<TileQ6K>),
}

/// Runs `$f` on the blocks of `$m`, whatever their format and layout.
macro_rules! with_layout {
    ($m:expr, $b:ident => $f:expr) => {
        match $m {
            QuantMatrix::Q8_0($b) => $f,
            QuantMatrix::Q4_0($b) => $f,
            QuantMatrix::Q5_0($b) => $f,
            QuantMatrix::Q4K($b) => $f,
            QuantMatrix::Q5K($b) => $f,
            QuantMatrix::Q6K($b) => $f,
            QuantMatrix::Q8_0Tiles($b) => $f,
            QuantMatrix::Q5_0Tiles($b) => $f,
            QuantMatrix::Q4KTiles($b) => $f,
            QuantMatrix::Q6KTiles($b) => $f,
        }
    };
}

/// What [`QuantMatrix`] needs of a layout of blocks: rows of blocks, or tiles of 16 rows.
trait Layout: Sync {
    type Block: QuantBlock;
    /// Blocks held.
    fn blocks(&self) -> usize;
    /// `f(i, b, block)` for block `b` of each row `first + i`, `i < n`.
    fn for_each_block(&self, first: usize, n: usize, per_row: usize, f: impl FnMut(usize, usize, &Self::Block));
    /// The values of rows `first..first + out.len() / n_in`, rounded to bf16. Plain loops, no
    /// closures: inlined into a caller compiled for AVX-512 (`ISA >= AVX512`), they vectorize
    /// with it.
    fn rows_bf16<const ISA: u8>(&self, first: usize, n_in: usize, out: &mut [half::bf16]);
    /// `y (t, out) = x (t, in) · Wᵀ` by the decode kernel.
    fn product(&self, x: &[f32], t: usize, n_in: usize, n_out: usize) -> Vec<f32>;
    /// `out (rows, t) = rows · x (t, in)ᵀ` for the run of rows `first..first + out.len() / t`.
    fn run(&self, simd: Simd, x: &QuantizedRows, first: usize, n_in: usize, t: usize, out: &mut [f32]);
}

impl<B: QuantBlock> Layout for Vec<B> {
    type Block = B;
    fn blocks(&self) -> usize {
        self.len()
    }
    #[inline(always)]
    fn rows_bf16<const ISA: u8>(&self, first: usize, n_in: usize, out: &mut [half::bf16]) {
        let per_row = n_in / B::VALUES;
        let blocks = &self[first * per_row..first * per_row + out.len() / B::VALUES];
        let mut values = [0f32; 256];
        for (o, b) in out.chunks_mut(B::VALUES).zip(blocks) {
            b.dequantize(&mut values[..B::VALUES]);
            for (d, &v) in o.iter_mut().zip(&values[..B::VALUES]) {
                *d = super::bf16_round(v);
            }
        }
    }
    #[inline(always)]
    fn for_each_block(&self, first: usize, n: usize, per_row: usize, mut f: impl FnMut(usize, usize, &B)) {
        for (i, row) in self[first * per_row..(first + n) * per_row].chunks_exact(per_row).enumerate() {
            for (b, block) in row.iter().enumerate() {
                f(i, b, block);
            }
        }
    }
    fn product(&self, x: &[f32], t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
        matvec_quant(x, self, t, n_in, n_out)
    }
    fn run(&self, simd: Simd, x: &QuantizedRows, first: usize, n_in: usize, t: usize, out: &mut [f32]) {
        let (per_row, n) = (n_in / B::VALUES, out.len() / t);
        quant_rows(simd, x, &self[first * per_row..(first + n) * per_row], t, n_in, out)
    }
}

impl<T: Tile> Layout for Tiles<T> {
    type Block = T::Block;
    fn blocks(&self) -> usize {
        self.0.len() * TILE_ROWS
    }
    #[inline(always)]
    fn rows_bf16<const ISA: u8>(&self, first: usize, n_in: usize, out: &mut [half::bf16]) {
        let (vals, n) = (T::Block::VALUES, out.len() / n_in);
        let per_row = n_in / vals;
        for tile_row in first / TILE_ROWS..(first + n).div_ceil(TILE_ROWS) {
            let (lo, hi) = ((tile_row * TILE_ROWS).max(first), ((tile_row + 1) * TILE_ROWS).min(first + n));
            for b in 0..per_row {
                let tile = &self.0[tile_row * per_row + b];
                for row in lo..hi {
                    let at = (row - first) * n_in + b * vals;
                    row_bf16(tile, row % TILE_ROWS, &mut out[at..at + vals]);
                }
            }
        }
    }
    #[inline(always)]
    fn for_each_block(&self, first: usize, n: usize, per_row: usize, mut f: impl FnMut(usize, usize, &T::Block)) {
        // Each tile is unpacked once for all of its rows in the range.
        for tile_row in first / TILE_ROWS..(first + n).div_ceil(TILE_ROWS) {
            let rows = (tile_row * TILE_ROWS).max(first)..((tile_row + 1) * TILE_ROWS).min(first + n);
            for b in 0..per_row {
                let blocks = self.0[tile_row * per_row + b].unpack_all();
                for row in rows.clone() {
                    f(row - first, b, &blocks[row % TILE_ROWS]);
                }
            }
        }
    }
    fn product(&self, x: &[f32], t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
        self.matvec(x, t, n_in, n_out)
    }
    fn run(&self, simd: Simd, x: &QuantizedRows, first: usize, n_in: usize, t: usize, out: &mut [f32]) {
        let n = out.len() / t;
        assert!(
            first.is_multiple_of(TILE_ROWS) && n.is_multiple_of(TILE_ROWS),
            "tiled rows: runs must cover whole tiles"
        );
        let per_row = n_in / T::Block::VALUES;
        let tiles = &self.0[first / TILE_ROWS * per_row..(first + n) / TILE_ROWS * per_row];
        tile_rows(simd, x, tiles, t, n_in, out)
    }
}

fn name_of<L: Layout>(_: &L) -> &'static str {
    L::Block::NAME
}

fn values_of<L: Layout>(_: &L) -> usize {
    L::Block::VALUES
}

fn act_group_of<L: Layout>(_: &L) -> usize {
    L::Block::ACT_GROUP
}

fn bytes_of<L: Layout>(l: &L) -> usize {
    l.blocks() * std::mem::size_of::<L::Block>()
}

/// The values of rows `first..first + out.len() / n_in`, each `n_in` long.
fn rows_into<L: Layout>(l: &L, first: usize, n_in: usize, out: &mut [f32]) {
    let vals = L::Block::VALUES;
    let per_row = n_in / vals;
    let mut values = [0f32; 256];
    l.for_each_block(first, out.len() / n_in, per_row, |i, b, block| {
        block.dequantize(&mut values[..vals]);
        out[i * n_in + b * vals..i * n_in + (b + 1) * vals].copy_from_slice(&values[..vals]);
    });
}

impl QuantMatrix {
    /// GGML's name for the format.
    pub fn name(&self) -> &'static str {
        with_layout!(self, b => name_of(b))
    }

    /// Bytes of the blocks (a tiled matrix holds the same bytes, rearranged).
    pub fn bytes(&self) -> usize {
        with_layout!(self, b => bytes_of(b))
    }

    /// Rows of `n_in` values.
    pub fn rows(&self, n_in: usize) -> usize {
        with_layout!(self, b => b.blocks()) * self.block_values() / n_in
    }

    /// Values per block.
    pub fn block_values(&self) -> usize {
        with_layout!(self, b => values_of(b))
    }

    /// Whether the rows are tiled for the AVX-512 VNNI kernels.
    pub fn is_tiled(&self) -> bool {
        matches!(
            self,
            QuantMatrix::Q8_0Tiles(_) | QuantMatrix::Q5_0Tiles(_) | QuantMatrix::Q4KTiles(_) | QuantMatrix::Q6KTiles(_)
        )
    }

    /// The matrix in the layout the decode kernel reads fastest on this CPU: tiles of 16 rows
    /// where it has AVX-512 VNNI, the row count (rows of `n_in` values) is a multiple of 16 and
    /// the format has a tiled kernel (Q8_0, Q5_0, Q4_K, Q6_K); otherwise unchanged.
    pub fn for_decode(self, n_in: usize) -> QuantMatrix {
        if Simd::detect() != Simd::Avx512Vnni {
            return self;
        }
        self.tiled(n_in)
    }

    /// The matrix in tiles of 16 rows where the format has a tiled kernel and the rows tile
    /// (see [`QuantMatrix::for_decode`]), whatever the CPU.
    pub fn tiled(self, n_in: usize) -> QuantMatrix {
        match self {
            QuantMatrix::Q8_0(b) => Tiles::pack(&b, n_in).map_or(QuantMatrix::Q8_0(b), QuantMatrix::Q8_0Tiles),
            QuantMatrix::Q5_0(b) => Tiles::pack(&b, n_in).map_or(QuantMatrix::Q5_0(b), QuantMatrix::Q5_0Tiles),
            QuantMatrix::Q4K(b) => Tiles::pack(&b, n_in).map_or(QuantMatrix::Q4K(b), QuantMatrix::Q4KTiles),
            QuantMatrix::Q6K(b) => Tiles::pack(&b, n_in).map_or(QuantMatrix::Q6K(b), QuantMatrix::Q6KTiles),
            other => other,
        }
    }

    /// `y (t, out) = x (t, in) · Wᵀ`.
    pub fn matvec(&self, x: &[f32], t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
        with_layout!(self, b => b.product(x, t, n_in, n_out))
    }

    /// `y[g] = W_g · x[g]` for `groups` equal runs of rows `W_g` (`n_out / groups` rows each) and
    /// as many rows of `x (groups, n_in)`: MLA decode's per-head products with `W_UK` and `W_UV`,
    /// in one parallel pass. A tiled matrix needs runs of whole tiles (`n_out / groups` a multiple
    /// of 16; [`QuantMatrix::groups_fit`]).
    pub fn grouped_matvec(&self, x: &[f32], groups: usize, n_in: usize, n_out: usize) -> Vec<f32> {
        let mut out = vec![0f32; n_out];
        self.grouped_matvec_into(x, groups, n_in, &mut Vec::new(), &mut out);
        out
    }

    /// [`QuantMatrix::grouped_matvec`] into `out (n_out)`, the groups' 8-bit activations kept in
    /// `xq` (reused from step to step).
    pub fn grouped_matvec_into(
        &self,
        x: &[f32],
        groups: usize,
        n_in: usize,
        xq: &mut Vec<QuantizedRows>,
        out: &mut [f32],
    ) {
        let n_out = out.len();
        assert!(
            x.len() == groups * n_in && self.rows(n_in) == n_out && n_out.is_multiple_of(groups),
            "grouped_matvec: shapes disagree"
        );
        assert!(self.groups_fit(n_out / groups), "grouped_matvec: runs of {} rows split tiles", n_out / groups);
        let act = with_layout!(self, b => act_group_of(b));
        while xq.len() < groups {
            xq.push(QuantizedRows::empty(act));
        }
        for (row, q) in x.chunks_exact(n_in).zip(xq.iter_mut()) {
            q.quantize(row, act);
        }
        let (simd, per_group, xq) = (Simd::detect(), n_out / groups, &xq[..groups]);
        out.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(task, out)| {
            let (first, n) = (task * ROWS_PER_TASK, out.len());
            let mut row = first;
            while row < first + n {
                let g = row / per_group;
                let end = ((g + 1) * per_group).min(first + n);
                with_layout!(self, b => b.run(simd, &xq[g], row, n_in, 1, &mut out[row - first..end - first]));
                row = end;
            }
        });
    }

    /// Values per activation scale the decode kernel reads its input in (32, or 256 for the
    /// k-quants).
    pub fn act_group(&self) -> usize {
        with_layout!(self, b => act_group_of(b))
    }

    /// `out (rows, t) = W[first..first + out.len() / t] · x (t, in)ᵀ` for `t` activation rows
    /// quantized with [`QuantMatrix::act_group`], on the calling thread (a tiled matrix takes
    /// whole tiles): each run of weight rows is read once for all `t`.
    pub fn run_rows(&self, simd: Simd, x: &QuantizedRows, first: usize, n_in: usize, t: usize, out: &mut [f32]) {
        with_layout!(self, b => b.run(simd, x, first, n_in, t, out))
    }

    /// Whether [`QuantMatrix::grouped_matvec`] can take runs of `rows_per_group` rows.
    pub fn groups_fit(&self, rows_per_group: usize) -> bool {
        !self.is_tiled() || rows_per_group.is_multiple_of(TILE_ROWS)
    }

    /// The values, row-major (rows of `n_in`).
    pub fn dequantize(&self, n_in: usize) -> Vec<f32> {
        let rows = self.rows(n_in);
        let mut out = vec![0f32; rows * n_in];
        out.par_chunks_mut(n_in).enumerate().for_each(|(row, o)| with_layout!(self, b => rows_into(b, row, n_in, o)));
        out
    }

    /// The values of rows `ids` (each `n_in` long), e.g. embedding lookups.
    pub fn dequantize_rows(&self, ids: &[usize], n_in: usize) -> Vec<f32> {
        let mut out = vec![0f32; ids.len() * n_in];
        for (o, &id) in out.chunks_mut(n_in).zip(ids) {
            self.dequantize_row(id, o);
        }
        out
    }

    /// The values of row `id` into `out` (`n_in` long).
    pub fn dequantize_row(&self, id: usize, out: &mut [f32]) {
        let n_in = out.len();
        with_layout!(self, b => rows_into(b, id, n_in, out))
    }

    /// The values of rows `first..first + n` (each `n_in` long), rounded to bf16, into `out`
    /// (resized): the prefill GEMM's operand, without an f32 copy.
    pub fn dequantize_rows_bf16(&self, first: usize, n: usize, n_in: usize, out: &mut Vec<half::bf16>) {
        #[inline(always)]
        fn body<L: Layout, const ISA: u8>(l: &L, first: usize, n_in: usize, out: &mut [half::bf16]) {
            l.rows_bf16::<ISA>(first, n_in, out)
        }
        fn rows_of<L: Layout>(l: &L, first: usize, n: usize, n_in: usize, out: &mut Vec<half::bf16>) {
            out.resize(n * n_in, half::bf16::ZERO);
            // The same loops compiled for AVX-512, where the compiler vectorizes them 16 wide.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            unsafe fn wide<L: Layout>(l: &L, first: usize, n_in: usize, out: &mut [half::bf16]) {
                body::<L, AVX512>(l, first, n_in, out)
            }
            #[cfg(target_arch = "x86_64")]
            if Simd::detect() != Simd::Avx2 && Simd::detect() != Simd::Portable {
                // SAFETY: `Simd::detect` found AVX-512.
                unsafe { wide(l, first, n_in, out) };
                return;
            }
            body::<L, PORTABLE>(l, first, n_in, out)
        }
        with_layout!(self, b => rows_of(b, first, n, n_in, out))
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
            let xq = QuantizedRows::new(&x, B::ACT_GROUP);
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
        let back = dequantize(&blocks);
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
    fn grouped_products_match_one_product_per_group() {
        // Four groups of 32 rows, as rows and as tiles, each against its own activation row.
        let (groups, n_in, per_group) = (4, 256, 32);
        let x = random(groups * n_in, 3);
        let blocks = super::super::kquant::quantize_q4_k(&random(groups * per_group * n_in, 4));
        let per_run = per_group * n_in / 256;
        let mut want = vec![];
        for g in 0..groups {
            let run = &blocks[g * per_run..(g + 1) * per_run];
            want.extend(matvec_quant_reference(&x[g * n_in..(g + 1) * n_in], run, 1, n_in, per_group));
        }
        let rows = QuantMatrix::Q4K(blocks);
        for m in [rows.clone(), rows.clone().tiled(n_in)] {
            let got = m.grouped_matvec(&x, groups, n_in, groups * per_group);
            assert_close_rel(&format!("grouped, tiled {}", m.is_tiled()), &got, &want);
        }
        assert!(QuantMatrix::Q8_0(vec![]).groups_fit(8) && !rows.clone().tiled(n_in).groups_fit(8));
    }

    #[test]
    fn long_activations_quantize_as_each_row_alone() {
        let (t, n_in) = (40, 2048);
        let x = random(t * n_in, 9);
        assert!(x.len() >= PARALLEL_VALUES, "the test must take the parallel path");
        for group in [QK8_0, 256] {
            let all = QuantizedRows::new(&x, group);
            for ti in 0..t {
                let one = QuantizedRows::new(&x[ti * n_in..(ti + 1) * n_in], group);
                assert_eq!(&all.q[ti * n_in..(ti + 1) * n_in], &one.q[..], "codes of row {ti}");
                assert_eq!(&all.d[ti * n_in / group..(ti + 1) * n_in / group], &one.d[..], "scales of row {ti}");
                let s = SUM_GROUP;
                assert_eq!(&all.sums[ti * n_in / s..(ti + 1) * n_in / s], &one.sums[..], "sums of row {ti}");
            }
        }
    }

    #[test]
    fn matvec_q8_0_matches_its_reference_in_every_variant() {
        check_kernel(quantize_q8_0);
    }

    #[test]
    fn f16_values_match_half() {
        for bits in (0..=u16::MAX).step_by(7).chain([0x0001, 0x03ff, 0x0400, 0x7bff, 0x8001, 0xfbff]) {
            let h = f16::from_bits(bits);
            if h.is_finite() {
                assert_eq!(f16_value(h), h.to_f32(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn quantized_activations_stay_close_to_the_float_product() {
        // The 8-bit activations cost little: the product stays within 1% of the f32-activation one.
        let (t, n_in, n_out) = (2, 512, 64);
        let x = random(t * n_in, 5);
        let w = quantize_q8_0(&random(n_out * n_in, 6));
        let exact = crate::kernels::matvec::matvec_reference(&x, &dequantize(&w), t, n_in, n_out);
        let got = matvec_quant(&x, &w, t, n_in, n_out);
        let err: f32 = got.iter().zip(&exact).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
        let norm: f32 = exact.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(err / norm < 0.01, "relative error {}", err / norm);
    }
}
