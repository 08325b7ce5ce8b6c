//! Products with many rows (prefill): `y = x Wᵀ` for `t` activation rows over a stored or
//! quantized `(out, in)` weight, in register tiles of 4 weight rows × 4 activation rows.
//!
//! Each tile keeps 16 dot products in 16 vector accumulators and walks the shared input dimension
//! once: per 16 inputs it loads 4 weight chunks (widened from bf16 where stored so) and 4
//! activation chunks for 16 multiply-adds, so the FMA units, not the loads, set the pace. Threads
//! take runs of 64 weight rows and every activation row; a quantized run is dequantized to f32
//! once per call into a buffer of its own (never the whole matrix). This replaces a general GEMM
//! that converted (bf16) or dequantized (GGML blocks) the whole weight into a fresh f32 copy on
//! every call, whose page faults and copies cost more than the products.

use rayon::prelude::*;

use super::matvec::by_output_rows;
use super::quant::QuantMatrix;
use super::{mul_add, Load16, Simd, Widen};

const TILE: usize = 4;
const LANES: usize = 16;
/// Weight rows per parallel task: every task reads all of `x`, so fewer, larger tasks read it less.
const ROWS_PER_TASK: usize = 64;

/// `y (t, out) = x (t, in) · w (out, in)ᵀ`, f32 accumulation.
pub fn gemm<W: Load16>(x: &[f32], w: &[W], t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
    assert!(x.len() == t * n_in && w.len() == n_out * n_in, "gemm: shapes disagree");
    let simd = Simd::detect();
    by_weight_runs(t, n_out, |first, n, out| tiles(simd, x, &w[first * n_in..(first + n) * n_in], t, n_in, out))
}

/// [`gemm`] over GGML blocks: each task dequantizes its run of rows, then multiplies. With
/// AVX-512 BF16 the dequantized rows and the activations are rounded to bf16 and multiplied by
/// `vdpbf16ps` (relative rounding 2⁻⁹ per value: finer than the 8-bit activations of the decode
/// product, and for Q8_0 about half its own quantization step); elsewhere in f32.
pub fn gemm_quant(x: &[f32], w: &QuantMatrix, t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
    assert!(x.len() == t * n_in && w.rows(n_in) == n_out, "gemm_quant: shapes disagree");
    let rows_of = |first: usize, n: usize| w.dequantize_rows(&(first..first + n).collect::<Vec<_>>(), n_in);
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        let xb: Vec<half::bf16> = x.par_iter().map(|&v| super::bf16_round(v)).collect();
        thread_local! {
            /// Each worker's dequantized run of rows, kept between calls (no allocation, no page
            /// faults per call).
            static ROWS: std::cell::RefCell<Vec<half::bf16>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        return by_weight_runs(t, n_out, |first, n, out| {
            ROWS.with_borrow_mut(|rows| {
                w.dequantize_rows_bf16(first, n, n_in, rows);
                // SAFETY: `has_avx512_bf16` checked the CPU.
                unsafe { bf16_tiles(&xb, rows, t, n_in, out) }
            })
        });
    }
    let simd = Simd::detect();
    by_weight_runs(t, n_out, |first, n, out| tiles(simd, x, &rows_of(first, n), t, n_in, out))
}

/// `y (t, n_out)` from tasks over runs of 64 weight rows (see `matvec::by_output_rows`).
fn by_weight_runs(t: usize, n_out: usize, f: impl Fn(usize, usize, &mut [f32]) + Sync) -> Vec<f32> {
    by_output_rows(ROWS_PER_TASK, t, n_out, f)
}

/// `out (rows, t) = rows · x (t, in)ᵀ` for a run of weight rows, tile by tile: AVX-512 written
/// out with intrinsics (the generic loops spilled their 16 accumulators), else plain loops.
pub(crate) fn tiles<W: Load16>(simd: Simd, x: &[f32], rows: &[W], t: usize, n_in: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn avx512<W: Load16>(x: &[f32], rows: &[W], t: usize, n_in: usize, out: &mut [f32]) {
        // SAFETY: this variant runs only where the CPU has AVX-512 (the caller's `simd`).
        tiles_body(t, rows.len() / n_in, 4 * n_in, out, |xi, wi| unsafe {
            tile_avx512(rows4(x, xi, n_in), rows4(rows, wi, n_in), n_in)
        })
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<W: Load16>(x: &[f32], rows: &[W], t: usize, n_in: usize, out: &mut [f32]) {
        // SAFETY: this variant runs only where the CPU has AVX2 and FMA (the caller's `simd`).
        tiles_body(t, rows.len() / n_in, 4 * n_in, out, |xi, wi| unsafe {
            tile_avx2(rows4(x, xi, n_in), rows4(rows, wi, n_in), n_in)
        })
    }
    match simd {
        // SAFETY: `Simd::detect` and `Simd::available` only return a variant whose features the
        // running CPU has.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 | Simd::Avx512Vnni => unsafe { avx512(x, rows, t, n_in, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2(x, rows, t, n_in, out) },
        _ => tiles_body(t, rows.len() / n_in, 4 * n_in, out, |xi, wi| {
            tile::<W, false>(rows4(x, xi, n_in), rows4(rows, wi, n_in), n_in)
        }),
    }
}

/// Runs `tile(x_rows, w_rows)` over every 4 × 4 tile of `t` activation rows and `n` weight rows
/// (row indices; a ragged tile repeats its last row and drops the repeated results) into the
/// transposed `out (n, t)`.
///
/// The activations go in blocks of about [`X_BLOCK_BYTES`] (`x_row_bytes` each row), each
/// multiplied by all `n` weight rows before the next: the block stays in the core's L2 while the
/// weight rows pass, where walking all of a long prompt's rows for every 4 weight rows streamed
/// them from L3 each time.
#[inline(always)]
fn tiles_body(
    t: usize,
    n: usize,
    x_row_bytes: usize,
    out: &mut [f32],
    tile: impl Fn([usize; TILE], [usize; TILE]) -> [[f32; TILE]; TILE],
) {
    let block = (X_BLOCK_BYTES / x_row_bytes.max(1)).next_multiple_of(TILE).max(TILE);
    for b0 in (0..t).step_by(block) {
        for r0 in (0..n).step_by(TILE) {
            let w_rows: [usize; TILE] = std::array::from_fn(|k| (r0 + k).min(n - 1));
            for t0 in (b0..(b0 + block).min(t)).step_by(TILE) {
                let x_rows: [usize; TILE] = std::array::from_fn(|k| (t0 + k).min(t - 1));
                let sums = tile(x_rows, w_rows);
                let take = TILE.min(t - t0);
                for (r, s) in sums.iter().enumerate().take(n - r0) {
                    out[(r0 + r) * t + t0..(r0 + r) * t + t0 + take].copy_from_slice(&s[..take]);
                }
            }
        }
    }
}

/// Activation bytes per block of [`tiles_body`]: with a task's 64 weight rows, well inside a
/// 1 MiB L2.
const X_BLOCK_BYTES: usize = 128 << 10;

/// Rows `idx` of a row-major buffer of `width`-long rows.
#[inline(always)]
fn rows4<T>(data: &[T], idx: [usize; TILE], width: usize) -> [&[T]; TILE] {
    idx.map(|i| &data[i * width..(i + 1) * width])
}

/// [`tile`] in AVX-512 registers: 16 accumulators, 4 weight chunks, one activation chunk.
///
/// # Safety
/// AVX-512 (avx512f, fma) must be present; the rows must be `n_in` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn tile_avx512<W: Load16>(x: [&[f32]; TILE], w: [&[W]; TILE], n_in: usize) -> [[f32; TILE]; TILE] {
    let mut acc = [[std::arch::x86_64::_mm512_setzero_ps(); TILE]; TILE];
    // SAFETY: the caller's contract.
    let tails = unsafe { accumulate_avx512(&mut acc, x, w, n_in) };
    // SAFETY: AVX-512 is present.
    unsafe { reduce_avx512(&acc, tails) }
}

/// [`tile_avx512`] for AVX2: 16 registers of 8 lanes hold half the tile's sums at a time (4
/// weight rows by 2 activation rows), so the weight chunks are loaded twice, from L1, and nothing
/// spills (the generic loops' 16 × 16 lanes did).
///
/// # Safety
/// AVX2 and FMA must be present; the rows must be `n_in` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<W: Load16>(x: [&[f32]; TILE], w: [&[W]; TILE], n_in: usize) -> [[f32; TILE]; TILE] {
    use std::arch::x86_64::*;
    for r in x.iter().map(|r| r.len()).chain(w.iter().map(|r| r.len())) {
        assert_eq!(r, n_in, "tile_avx2: row length");
    }
    let full = n_in / 8 * 8;
    let mut sums = [[0f32; TILE]; TILE];
    for half in 0..TILE / 2 {
        let mut acc = [[_mm256_setzero_ps(); 2]; TILE];
        for c in (0..full).step_by(8) {
            // SAFETY: c + 8 <= full <= n_in, the length of every row (checked above).
            unsafe {
                let wv: [__m256; TILE] = std::array::from_fn(|r| W::load8(w[r].as_ptr().add(c)));
                for i in 0..2 {
                    let xv = _mm256_loadu_ps(x[2 * half + i].as_ptr().add(c));
                    for r in 0..TILE {
                        acc[r][i] = _mm256_fmadd_ps(wv[r], xv, acc[r][i]);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (i, &v) in acc.iter().enumerate() {
                let mut lanes = [0f32; 8];
                // SAFETY: 8 floats into an 8-float array.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
                let row = 2 * half + i;
                let tail: f32 = (full..n_in).map(|k| w[r][k].widen() * x[row][k]).sum();
                sums[r][row] = lanes.iter().sum::<f32>() + tail;
            }
        }
    }
    sums
}

/// Two products summed in one tile: `x·wᵀ + x2·w2ᵀ`, with one reduction (MLA scores: the latent
/// part and the RoPE part of each cached row).
///
/// # Safety
/// AVX-512 (avx512f, fma) must be present; the rows must be `n_in` and `n_in2` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn tile_pair_avx512<W: Load16>(
    (x, w, n_in): ([&[f32]; TILE], [&[W]; TILE], usize),
    (x2, w2, n_in2): ([&[f32]; TILE], [&[W]; TILE], usize),
) -> [[f32; TILE]; TILE] {
    let mut acc = [[std::arch::x86_64::_mm512_setzero_ps(); TILE]; TILE];
    // SAFETY: the caller's contract.
    unsafe {
        let a = accumulate_avx512(&mut acc, x, w, n_in);
        let b = accumulate_avx512(&mut acc, x2, w2, n_in2);
        let tails = std::array::from_fn(|r| std::array::from_fn(|i| a[r][i] + b[r][i]));
        reduce_avx512(&acc, tails)
    }
}

/// Adds the 16-wide chunks of the 4 × 4 dot products to `acc`; returns the products of the
/// last `n_in % 16` elements.
///
/// # Safety
/// AVX-512 (avx512f, fma) must be present; the rows must be `n_in` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
#[inline]
unsafe fn accumulate_avx512<W: Load16>(
    acc: &mut [[std::arch::x86_64::__m512; TILE]; TILE],
    x: [&[f32]; TILE],
    w: [&[W]; TILE],
    n_in: usize,
) -> [[f32; TILE]; TILE] {
    use std::arch::x86_64::*;
    for r in x.iter().map(|r| r.len()).chain(w.iter().map(|r| r.len())) {
        assert_eq!(r, n_in, "tile_avx512: row length");
    }
    let full = n_in / LANES * LANES;
    let mut c = 0;
    while c < full {
        // SAFETY: c + 16 <= full <= n_in, the length of every row.
        unsafe {
            let wv = [
                W::load16(w[0].as_ptr().add(c)),
                W::load16(w[1].as_ptr().add(c)),
                W::load16(w[2].as_ptr().add(c)),
                W::load16(w[3].as_ptr().add(c)),
            ];
            for i in 0..TILE {
                let xv = _mm512_loadu_ps(x[i].as_ptr().add(c));
                for r in 0..TILE {
                    acc[r][i] = _mm512_fmadd_ps(wv[r], xv, acc[r][i]);
                }
            }
        }
        c += LANES;
    }
    std::array::from_fn(|r| std::array::from_fn(|i| (full..n_in).map(|k| w[r][k].widen() * x[i][k]).sum()))
}

/// The 16 accumulators' sums plus the tails.
///
/// # Safety
/// AVX-512 F must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn reduce_avx512(
    acc: &[[std::arch::x86_64::__m512; TILE]; TILE],
    tails: [[f32; TILE]; TILE],
) -> [[f32; TILE]; TILE] {
    std::array::from_fn(|r| std::array::from_fn(|i| std::arch::x86_64::_mm512_reduce_add_ps(acc[r][i]) + tails[r][i]))
}

/// `y (t, out) = x (t, in) · w (out, in)ᵀ + x2 (t, in2) · w2 (out, in2)ᵀ`: two products over the
/// same rows summed in one pass (MLA decode scores: `q_lat · c_kv[s] + q_rope · k_rope[s]`).
pub fn gemm_pair<W: Load16>(first: Part<'_, W>, second: Part<'_, W>, t: usize, n_out: usize) -> Vec<f32> {
    let ((x, w, n_in), (x2, w2, n_in2)) = (first, second);
    assert!(x.len() == t * n_in && w.len() == n_out * n_in, "gemm_pair: shapes disagree");
    assert!(x2.len() == t * n_in2 && w2.len() == n_out * n_in2, "gemm_pair: shapes disagree");
    #[cfg(target_arch = "x86_64")]
    if matches!(Simd::detect(), Simd::Avx512 | Simd::Avx512Vnni) {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
        unsafe fn run<W: Load16>(first: Part<'_, W>, second: Part<'_, W>, t: usize, out: &mut [f32]) {
            let ((x, w, n_in), (x2, w2, n_in2)) = (first, second);
            tiles_body(t, w.len() / n_in, 4 * (n_in + n_in2), out, |xi, wi| {
                let a = (rows4(x, xi, n_in), rows4(w, wi, n_in), n_in);
                let b = (rows4(x2, xi, n_in2), rows4(w2, wi, n_in2), n_in2);
                // SAFETY: AVX-512 is present (checked by the caller); rows are sliced to length.
                unsafe { tile_pair_avx512(a, b) }
            })
        }
        return by_weight_runs(t, n_out, |first, n, out| {
            let (w, w2) = (&w[first * n_in..(first + n) * n_in], &w2[first * n_in2..(first + n) * n_in2]);
            // SAFETY: `Simd::detect` found AVX-512.
            unsafe { run((x, w, n_in), (x2, w2, n_in2), t, out) }
        });
    }
    let mut y = gemm(x, w, t, n_in, n_out);
    y.iter_mut().zip(gemm(x2, w2, t, n_in2, n_out)).for_each(|(a, b)| *a += b);
    y
}

/// One product of [`gemm_pair`]: activations `(t, in)`, weight `(out, in)`, and `in`.
pub type Part<'a, W> = (&'a [f32], &'a [W], usize);

/// `y (t, out) = x (t, in) · w (out, in)ᵀ` with both sides in bf16 (a bf16 model's prefill), if
/// the CPU has AVX-512 BF16: `vdpbf16ps` multiplies 32 pairs of bf16 into 16 f32 sums per
/// instruction, twice the multiply-adds of widening to f32. Products of two bf16 are exact in
/// f32, so this is the widened product up to the order of the f32 sums. `None` elsewhere.
pub fn gemm_bf16(x: &[half::bf16], w: &[half::bf16], t: usize, n_in: usize, n_out: usize) -> Option<Vec<f32>> {
    assert!(x.len() == t * n_in && w.len() == n_out * n_in, "gemm_bf16: shapes disagree");
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        return Some(by_weight_runs(t, n_out, |first, n, out| {
            // SAFETY: `has_avx512_bf16` checked the CPU.
            unsafe { bf16_tiles(x, &w[first * n_in..(first + n) * n_in], t, n_in, out) }
        }));
    }
    None
}

/// [`gemm_bf16`] of one run of weight rows on the calling thread, into `out (rows, t)`: `false`
/// (nothing written) without AVX-512 BF16.
pub(crate) fn bf16_rows_into(x: &[half::bf16], rows: &[half::bf16], t: usize, n_in: usize, out: &mut [f32]) -> bool {
    assert!(x.len() == t * n_in && out.len() * n_in == rows.len() * t, "bf16_rows_into: shapes disagree");
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: `has_avx512_bf16` checked the CPU.
        unsafe { bf16_tiles(x, rows, t, n_in, out) };
        return true;
    }
    false
}

/// Whether the CPU has AVX-512 with the BF16 dot product (checked once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512_bf16() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        matches!(Simd::detect(), Simd::Avx512 | Simd::Avx512Vnni) && is_x86_feature_detected!("avx512bf16")
    })
}

/// Whether the bf16 kernels that multiply one operand by many (the fused decode attention, the
/// GEMM, the decode products of several rows) multiply bf16 pairs by two `vfmadd231ps` instead of
/// one `vdpbf16ps`, on a CPU with AVX-512 BF16.
///
/// A 32-bit lane holding two bf16 values is two f32 values at no cost but one instruction each
/// (the high one masked, the low one shifted up), and `vdpbf16ps` adds the high product, then
/// the low one, each rounded: two FMAs in that order give the same bits (bf16 products are
/// exact in f32; only `vdpbf16ps`'s flush of subnormals differs). Where `vdpbf16ps` is slow
/// (Intel's Sapphire and Emerald Rapids: one every two cycles, against two FMAs per cycle, so
/// half the FMAs' multiply-adds) the FMAs win once the conversion is shared by several products.
/// Chosen once by a 15 ms measurement ([`super::peak::bf16_against_fma`]): FMAs when they do 1.25
/// times `vdpbf16ps`'s multiply-adds or more (the halves cost about one instruction in five).
/// `LATENT_BF16_DOT=fma` or `=vdpbf16ps` forces a way, for measurement.
#[cfg(target_arch = "x86_64")]
pub fn bf16_by_fma() -> bool {
    static FMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FMA.get_or_init(|| {
        if !has_avx512_bf16() {
            return false;
        }
        match std::env::var("LATENT_BF16_DOT").as_deref().map(str::trim) {
            Ok("fma") => return true,
            Ok("vdpbf16ps") => return false,
            Ok(other) => eprintln!("latent: LATENT_BF16_DOT={other} is neither fma nor vdpbf16ps; measuring"),
            Err(_) => {}
        }
        super::peak::bf16_against_fma().is_some_and(|(bf16, f32)| f32 >= 1.25 * bf16)
    })
}

/// No AVX-512 BF16 kernels off x86.
#[cfg(not(target_arch = "x86_64"))]
pub fn bf16_by_fma() -> bool {
    false
}

/// `out (rows, t) = rows · x (t, in)ᵀ` for a run of bf16 weight rows, tile by tile
/// ([`tile_bf16`]).
///
/// # Safety
/// AVX-512 F/BW and BF16 must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn bf16_tiles(x: &[half::bf16], rows: &[half::bf16], t: usize, n_in: usize, out: &mut [f32]) {
    // SAFETY: the caller's contract.
    unsafe { bf16_tiles_by(x, rows, t, n_in, out, bf16_by_fma()) }
}

/// [`bf16_tiles`], multiplying bf16 pairs by FMAs or by `vdpbf16ps` (the same bits).
///
/// # Safety
/// AVX-512 F/BW and BF16 must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn bf16_tiles_by(x: &[half::bf16], rows: &[half::bf16], t: usize, n_in: usize, out: &mut [f32], fma: bool) {
    // SAFETY: the caller's contract.
    tiles_body(t, rows.len() / n_in, 2 * n_in, out, |xi, wi| unsafe {
        let (x, w) = (rows4(x, xi, n_in), rows4(rows, wi, n_in));
        if fma {
            tile_bf16::<true>(x, w, n_in)
        } else {
            tile_bf16::<false>(x, w, n_in)
        }
    })
}

/// [`tile_avx512`] over bf16 activations and weights with `vdpbf16ps` (or, with `FMA`, each
/// line turned into its f32 halves and multiplied by two FMAs, high product first: the same
/// bits, see [`bf16_by_fma`]), 32 inputs per step (the last partial step loads with a mask:
/// zeros beyond the row).
///
/// # Safety
/// AVX-512 F/BW and BF16 must be present; the rows must be `n_in` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn tile_bf16<const FMA: bool>(
    x: [&[half::bf16]; TILE],
    w: [&[half::bf16]; TILE],
    n_in: usize,
) -> [[f32; TILE]; TILE] {
    use std::arch::x86_64::*;
    for r in x.iter().map(|r| r.len()).chain(w.iter().map(|r| r.len())) {
        assert_eq!(r, n_in, "tile_bf16: row length");
    }
    let mut acc = [[_mm512_setzero_ps(); TILE]; TILE];
    // Whole steps by plain loads, the last partial one by masked loads (a mask built and applied at
    // every step cost the decode product of the same shape a third of its speed).
    let step = |acc: &mut [[__m512; TILE]; TILE], c: usize, mask: Option<__mmask32>| {
        // SAFETY: `c + 32 <= n_in` where there is no mask; the mask covers only elements
        // `c..n_in` of each row, and masked-off lanes are not read.
        unsafe {
            let load = |row: &[half::bf16]| -> __m512i {
                let p = row.as_ptr().add(c);
                match mask {
                    None => _mm512_loadu_si512(p.cast()),
                    Some(m) => _mm512_maskz_loadu_epi16(m, p.cast()),
                }
            };
            if FMA {
                let halves = |v: __m512i| super::bf16_halves(v);
                let wv = w.map(|w| halves(load(w)));
                for i in 0..TILE {
                    let [xh, xl] = halves(load(x[i]));
                    for r in 0..TILE {
                        acc[r][i] = _mm512_fmadd_ps(wv[r][1], xl, _mm512_fmadd_ps(wv[r][0], xh, acc[r][i]));
                    }
                }
            } else {
                let bh = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
                let wv = [bh(load(w[0])), bh(load(w[1])), bh(load(w[2])), bh(load(w[3]))];
                for i in 0..TILE {
                    let xv = bh(load(x[i]));
                    for r in 0..TILE {
                        acc[r][i] = _mm512_dpbf16_ps(acc[r][i], wv[r], xv);
                    }
                }
            }
        }
    };
    let full = n_in / 32 * 32;
    for c in (0..full).step_by(32) {
        step(&mut acc, c, None);
    }
    if full < n_in {
        step(&mut acc, full, Some((1u32 << (n_in - full)) - 1));
    }
    let mut sums = [[0f32; TILE]; TILE];
    // SAFETY: AVX-512 F is present; `sums` holds the 16 lanes.
    unsafe {
        let all = super::reduce16(std::array::from_fn(|k| acc[k / TILE][k % TILE]));
        _mm512_storeu_ps(sums.as_mut_ptr().cast(), all);
    }
    sums
}

/// The 4 × 4 dot products of weight rows `w` with activation rows `x` (each `n_in` long):
/// `[r][i] = w[r] · x[i]`, in plain loops.
#[inline(always)]
fn tile<W: Widen, const FUSED: bool>(x: [&[f32]; TILE], w: [&[W]; TILE], n_in: usize) -> [[f32; TILE]; TILE] {
    let mut acc = [[[0f32; LANES]; TILE]; TILE];
    let full = n_in / LANES * LANES;
    for c in (0..full).step_by(LANES) {
        for r in 0..TILE {
            let wide: [f32; LANES] = std::array::from_fn(|l| w[r][c + l].widen());
            for i in 0..TILE {
                for l in 0..LANES {
                    acc[r][i][l] = mul_add::<FUSED>(wide[l], x[i][c + l], acc[r][i][l]);
                }
            }
        }
    }
    let mut sums = [[0f32; TILE]; TILE];
    for r in 0..TILE {
        for i in 0..TILE {
            let tail: f32 = (full..n_in).map(|k| w[r][k].widen() * x[i][k]).sum();
            sums[r][i] = acc[r][i].iter().sum::<f32>() + tail;
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matvec::matvec_reference;
    use crate::kernels::matvec::tests::{assert_close, random};
    use crate::kernels::quant::{dequantize, quantize_q8_0};
    use half::bf16;

    #[test]
    fn gemm_matches_its_reference_on_ragged_shapes_in_every_variant() {
        for (t, n_in, n_out) in [(1, 1, 1), (4, 16, 4), (5, 17, 3), (65, 100, 70), (70, 256, 131), (8, 2048, 9)] {
            let x = random(t * n_in, 1);
            let w: Vec<bf16> = random(n_out * n_in, 2).iter().map(|&v| bf16::from_f32(v)).collect();
            let want = matvec_reference(&x, &w, t, n_in, n_out);
            let what = format!("gemm t {t} in {n_in} out {n_out}");
            assert_close(&what, &gemm(&x, &w, t, n_in, n_out), &want);
            for simd in Simd::available() {
                let mut out = vec![0f32; n_out * t];
                tiles(simd, &x, &w, t, n_in, &mut out);
                let y: Vec<f32> = (0..t * n_out).map(|k| out[(k % n_out) * t + k / n_out]).collect();
                assert_close(&format!("{what} {simd:?}"), &y, &want);
            }
        }
    }

    #[test]
    fn gemm_pair_is_the_sum_of_two_products() {
        for (t, n_in, n_in2, n_out) in [(16, 512, 64, 70), (5, 17, 3, 9), (1, 32, 16, 1)] {
            let (x, x2) = (random(t * n_in, 7), random(t * n_in2, 8));
            let w: Vec<bf16> = random(n_out * n_in, 9).iter().map(|&v| bf16::from_f32(v)).collect();
            let w2: Vec<bf16> = random(n_out * n_in2, 10).iter().map(|&v| bf16::from_f32(v)).collect();
            let mut want = matvec_reference(&x, &w, t, n_in, n_out);
            want.iter_mut().zip(matvec_reference(&x2, &w2, t, n_in2, n_out)).for_each(|(a, b)| *a += b);
            assert_close(&format!("gemm_pair t {t}"), &gemm_pair((&x, &w, n_in), (&x2, &w2, n_in2), t, n_out), &want);
        }
    }

    #[test]
    fn bf16_gemm_matches_the_widened_product() {
        for (t, n_in, n_out) in [(1, 1, 1), (5, 33, 3), (9, 64, 70), (70, 2048, 9), (13, 100, 131)] {
            let x: Vec<bf16> = random(t * n_in, 5).iter().map(|&v| bf16::from_f32(v)).collect();
            let w: Vec<bf16> = random(n_out * n_in, 6).iter().map(|&v| bf16::from_f32(v)).collect();
            let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            let want = matvec_reference(&xf, &w, t, n_in, n_out);
            if let Some(got) = gemm_bf16(&x, &w, t, n_in, n_out) {
                assert_close(&format!("gemm_bf16 t {t} in {n_in} out {n_out}"), &got, &want);
                // By FMAs and by `vdpbf16ps`, whichever this CPU prefers: the same bits.
                let mut by = [vec![0f32; t * n_out], vec![0f32; t * n_out]];
                for (fma, out) in by.iter_mut().enumerate() {
                    // SAFETY: `gemm_bf16` ran, so the CPU has AVX-512 BF16; the shapes are the test's.
                    unsafe { bf16_tiles_by(&x, &w, t, n_in, out, fma == 1) };
                }
                assert!(by[0].iter().zip(&by[1]).all(|(a, b)| a.to_bits() == b.to_bits()), "t {t}: FMAs differ");
            }
        }
    }

    #[test]
    fn gemm_over_blocks_matches_the_dequantized_product() {
        let (t, n_in, n_out) = (67, 96, 130);
        let x = random(t * n_in, 3);
        let blocks = quantize_q8_0(&random(n_out * n_in, 4));
        let dense = dequantize(&blocks);
        let got = gemm_quant(&x, &QuantMatrix::Q8_0(blocks), t, n_in, n_out);
        #[cfg(target_arch = "x86_64")]
        if has_avx512_bf16() {
            // Both sides rounded to bf16, then the exact product of those.
            let round = |v: &[f32]| -> Vec<bf16> { v.iter().map(|&a| bf16::from_f32(a)).collect() };
            let xr: Vec<f32> = round(&x).iter().map(|v| v.to_f32()).collect();
            assert_close("gemm_quant (bf16)", &got, &matvec_reference(&xr, &round(&dense), t, n_in, n_out));
            return;
        }
        assert_close("gemm_quant", &got, &matvec_reference(&x, &dense, t, n_in, n_out));
    }
}
