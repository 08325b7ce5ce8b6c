//! Products with few rows over stored (bf16 or f32) matrices, reading each stored row once:
//!
//! - [`matvec`]: `y = x Wᵀ` for `t` rows of `x` (decode through a `(out, in)` weight; attention
//!   scores `q · c_kv[s]` over the latent cache).
//! - [`weighted_rows`]: `y = P R`, the `p`-weighted sum of the rows of `R` for each row of `P`
//!   (attention's `Σ_s p_s c_kv[s]`).
//!
//! Each is the memory-bound case, where a general GEMM that packs (and converts) the whole
//! stored matrix first costs several times the bytes that must be read.

use rayon::prelude::*;

use super::{dispatch, mul_add, Load16, Simd, Widen};

/// Rows of `x` that share one pass over a stored row (accumulators stay in registers).
const BLOCK: usize = 8;
const LANES: usize = 16;
/// Output rows per parallel task of the decode products.
pub(crate) const ROWS_PER_TASK: usize = 32;

/// Most rows of `x` for which `Linear` uses `matvec` rather than the tiled GEMM
/// (`super::gemm`), which reads each weight chunk once per 4 rows of `x` but keeps 16 products in
/// registers per chunk: past 8 rows the tiles win (prefill of 512 tokens on the V2-Lite-shaped
/// model in bf16, 2 threads: 82 tokens/s with the limit at 64, 126 at 8; most experts see 8 to 64
/// tokens of a 512-token prompt).
pub const MAX_ROWS: usize = 8;

/// The same for GGML blocks (`quant::matvec_quant` against `gemm::gemm_quant`), where the
/// integer product of the blocks is cheaper and the GEMM must dequantize its rows first.
pub const MAX_ROWS_QUANT: usize = 16;

/// `y (t, out) = x (t, in) · w (out, in)ᵀ`, f32 accumulation, split over threads by output rows.
pub fn matvec<W: Widen>(x: &[f32], w: &[W], t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
    assert!(x.len() == t * n_in && w.len() == n_out * n_in, "matvec: shapes disagree");
    let simd = Simd::detect();
    by_output_rows(ROWS_PER_TASK, t, n_out, |first, n, out| {
        dot_block(simd, x, &w[first * n_in..(first + n) * n_in], t, n_in, out)
    })
}

/// `y (t, n_out)` from tasks over runs of `rows_per_task` output rows: `f(first, n, out)` fills
/// the transposed `out (n, t)` of rows `first..first + n` (so a task's kernel writes one
/// contiguous run), which the task then writes into its columns of `y` while they are still in
/// its core's cache: no transposing pass over all of `y` on one thread after the products.
pub(crate) fn by_output_rows(
    rows_per_task: usize,
    t: usize,
    n_out: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut y = vec![0f32; t * n_out];
    if t == 1 {
        y.par_chunks_mut(rows_per_task).enumerate().for_each(|(task, out)| {
            f(task * rows_per_task, out.len(), out);
        });
        return y;
    }
    /// `y`'s elements, written by tasks that own disjoint columns.
    struct Columns(*mut f32);
    // SAFETY: every task writes only its own columns (below), so no element is shared.
    unsafe impl Sync for Columns {}
    let columns = Columns(y.as_mut_ptr());
    let columns = &columns;
    (0..n_out.div_ceil(rows_per_task)).into_par_iter().for_each_init(Vec::new, |buf: &mut Vec<f32>, task| {
        let first = task * rows_per_task;
        let n = rows_per_task.min(n_out - first);
        buf.clear();
        buf.resize(n * t, 0.0);
        f(first, n, buf);
        for ti in 0..t {
            for (o, &v) in buf[ti..].iter().step_by(t).enumerate() {
                // SAFETY: `ti < t` and `first + o < n_out`, so the index lies inside `y`
                // (`t * n_out` long); columns `first..first + n` belong to this task alone.
                unsafe { *columns.0.add(ti * n_out + first + o) = v };
            }
        }
    });
    y
}

dispatch!(
    /// `out (rows, t) = rows · x (t, in)ᵀ` for a run of stored rows.
    dot_block => dot_block_body(x: &[f32], rows: &[W], t: usize, n_in: usize, out: &mut [f32])
);

#[inline(always)]
fn dot_block_body<W: Widen, const FUSED: bool>(x: &[f32], rows: &[W], t: usize, n_in: usize, out: &mut [f32]) {
    for (row, y_row) in rows.chunks_exact(n_in).zip(out.chunks_mut(t)) {
        for (b, y_block) in y_row.chunks_mut(BLOCK).enumerate() {
            let x_block = &x[b * BLOCK * n_in..(b * BLOCK + y_block.len()) * n_in];
            dot_rows::<W, FUSED>(x_block, row, n_in, y_block);
        }
    }
}

/// `y[i] = x[i] · row` for the (at most `BLOCK`) rows of `x`, reading `row` once.
#[inline(always)]
fn dot_rows<W: Widen, const FUSED: bool>(x: &[f32], row: &[W], n_in: usize, y: &mut [f32]) {
    let t = y.len();
    let mut acc = [[0f32; LANES]; BLOCK];
    let full = n_in / LANES * LANES;
    for (c, chunk) in row[..full].chunks_exact(LANES).enumerate() {
        let mut wide = [0f32; LANES];
        for (d, s) in wide.iter_mut().zip(chunk) {
            *d = s.widen();
        }
        for (ti, a) in acc.iter_mut().enumerate().take(t) {
            let xs = &x[ti * n_in + c * LANES..ti * n_in + (c + 1) * LANES];
            for l in 0..LANES {
                a[l] = mul_add::<FUSED>(wide[l], xs[l], a[l]);
            }
        }
    }
    for (ti, out) in y.iter_mut().enumerate() {
        let mut sum = sum_tree(acc[ti]);
        for i in full..n_in {
            sum += row[i].widen() * x[ti * n_in + i];
        }
        *out = sum;
    }
}

/// `out (rows, t) = rows · x (t, in)ᵀ` where both the stored rows and the activations are bf16
/// (a bf16 model's activations are bf16 values): pairs of products by `vdpbf16ps`, 32
/// multiply-adds an instruction and half the activation bytes of [`dot_block`]. Each output sums
/// its row in the same order whatever `t` is, so a row of a batch gets what it gets alone.
/// Given `split`, `x` as [`super::push_bf16_halves`] lays it out (rows a multiple of 32 long),
/// it multiplies by FMAs instead ([`dot_block_bf16_fma`]): the same bits. Whether it ran (it
/// needs AVX-512 BF16).
pub fn dot_block_bf16(
    x: &[half::bf16],
    split: Option<&[f32]>,
    rows: &[half::bf16],
    t: usize,
    n_in: usize,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::gemm::has_avx512_bf16() {
        assert!(
            x.len() >= t * n_in && rows.len().is_multiple_of(n_in.max(1)) && out.len() >= rows.len() / n_in.max(1) * t,
            "dot_block_bf16: shapes disagree"
        );
        // SAFETY: AVX-512 BF16 was checked; the sizes were checked against the slices.
        unsafe {
            match split {
                Some(split) if n_in.is_multiple_of(32) && split.len() >= t * n_in => {
                    dot_block_bf16_fma(split, rows, t, n_in, out)
                }
                _ => dot_block_bf16_avx(x, rows, t, n_in, out),
            }
        };
        return true;
    }
    let _ = (x, split, rows, t, n_in, out);
    false
}

/// From how many activation rows the bf16 products are worth [`dot_block_bf16`]'s FMAs where
/// they are the faster way ([`super::gemm::bf16_by_fma`]): below it a product is bound by
/// reading its weight.
pub(crate) const FMA_ROWS: usize = 4;

/// [`dot_block_bf16`] by FMAs: 4 weight rows × up to 4 activation rows (`split`, see
/// [`super::push_bf16_halves`]) per register tile, each weight line turned into its two f32 halves (a
/// mask and a shift) for 4 rows' products. Each output adds the high product, then the low one,
/// line by line, as `vdpbf16ps` does: the same bits as [`dot_block_bf16_avx`].
///
/// # Safety
/// AVX-512 F/BW; `n_in` a multiple of 32, `split` holds `t` split rows of `n_in`, `out`
/// `rows.len() / n_in` rows of `t`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn dot_block_bf16_fma(split: &[f32], rows: &[half::bf16], t: usize, n_in: usize, out: &mut [f32]) {
    let n_rows = rows.len() / n_in.max(1);
    for r0 in (0..n_rows).step_by(4) {
        // The tile's weight rows, the last repeated past the end (its outputs unused).
        let w: [&[half::bf16]; 4] = std::array::from_fn(|r| {
            let r = (r0 + r).min(n_rows - 1);
            &rows[r * n_in..(r + 1) * n_in]
        });
        let nr = (n_rows - r0).min(4);
        for b0 in (0..t).step_by(4) {
            let xs = &split[b0 * n_in..];
            let y = |r: usize, b: usize| (r0 + r) * t + b0 + b;
            // SAFETY: the caller's contract; `xs` holds the tile's activation rows, split.
            unsafe {
                match (t - b0).min(4) {
                    1 => fma_tile::<1>(xs, w, nr, &mut |r, b, v| out[y(r, b)] = v),
                    2 => fma_tile::<2>(xs, w, nr, &mut |r, b, v| out[y(r, b)] = v),
                    3 => fma_tile::<3>(xs, w, nr, &mut |r, b, v| out[y(r, b)] = v),
                    _ => fma_tile::<4>(xs, w, nr, &mut |r, b, v| out[y(r, b)] = v),
                }
            }
        }
    }
}

/// One register tile of [`dot_block_bf16_fma`]: `N` split activation rows (`xs`) by 4 weight
/// rows, the first `nr` of which are stored.
///
/// # Safety
/// AVX-512 F/BW; the weight rows a multiple of 32 long, `xs` holding `N` split rows as long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn fma_tile<const N: usize>(
    xs: &[f32],
    w: [&[half::bf16]; 4],
    nr: usize,
    store: &mut dyn FnMut(usize, usize, f32),
) {
    use std::arch::x86_64::*;
    let n_in = w[0].len();
    debug_assert!(n_in.is_multiple_of(32) && xs.len() >= N * n_in);
    let mut acc = [[_mm512_setzero_ps(); N]; 4];
    for c in (0..n_in).step_by(32) {
        // SAFETY: `xs` holds `N` split rows of `n_in` and each weight row `n_in` values, a
        // multiple of 32; a prefetch never faults.
        unsafe {
            let x: [[__m512; 2]; N] = std::array::from_fn(|b| {
                let p = xs.as_ptr().add(b * n_in + c);
                [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))]
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                let p = w[r].as_ptr().add(c);
                _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(PREFETCH_BYTES));
                let [hi, lo] = super::bf16_halves(_mm512_loadu_si512(p.cast()));
                for (a, [xh, xl]) in acc.iter_mut().zip(&x) {
                    *a = _mm512_fmadd_ps(lo, *xl, _mm512_fmadd_ps(hi, *xh, *a));
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(nr) {
        for (b, &a) in acc.iter().enumerate() {
            store(r, b, _mm512_reduce_add_ps(a));
        }
    }
}

/// How far ahead of its loads the bf16 decode product asks for the weight's next lines: one
/// 4 KiB row of a 2048-wide weight. Measured on a Xeon family 6 model 207 (2 threads, a 0.42 GB
/// weight streamed from memory as `examples/stream.rs` streams it): 14.4 GB/s with masked loads
/// and no prefetch, 20.0 with plain loads, 22.1 with this prefetch (2 KiB: 21.4, 8 KiB: 22.1,
/// 16 KiB: 20.8). The hardware's own prefetcher stops at each 4 KiB page and ramps up again after it.
pub(crate) const PREFETCH_BYTES: usize = 4096;

/// # Safety
/// AVX-512 F/BW/BF16; `x` holds `t` rows of `n_in`, `out` `rows.len() / n_in` rows of `t`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dot_block_bf16_avx(x: &[half::bf16], rows: &[half::bf16], t: usize, n_in: usize, out: &mut [f32]) {
    for (r, row) in rows.chunks_exact(n_in).enumerate() {
        for b0 in (0..t).step_by(BLOCK) {
            let nb = (t - b0).min(BLOCK);
            let (xs, y) = (&x[b0 * n_in..(b0 + nb) * n_in], &mut out[r * t + b0..r * t + b0 + nb]);
            // SAFETY: the caller's contract; `xs` holds `nb` rows of `n_in`, `y` `nb` values.
            unsafe {
                match nb {
                    1 => row_bf16::<1>(xs, row, y),
                    2 => row_bf16::<2>(xs, row, y),
                    3 => row_bf16::<3>(xs, row, y),
                    4 => row_bf16::<4>(xs, row, y),
                    5 => row_bf16::<5>(xs, row, y),
                    6 => row_bf16::<6>(xs, row, y),
                    7 => row_bf16::<7>(xs, row, y),
                    _ => row_bf16::<BLOCK>(xs, row, y),
                }
            }
        }
    }
}

/// `y[i] = x[i] · row` for `N` rows of `x` (`row.len()` each), reading `row` once: whole
/// 64-byte lines by plain loads with a prefetch [`PREFETCH_BYTES`] ahead, then the row's last
/// partial line by a masked load. One accumulator per row of `x`, in the same order for every
/// `N`, so a row's output does not depend on which others share its pass.
///
/// # Safety
/// AVX-512 F/BW/BF16; `x` holds `N` rows of `row.len()` and `y` `N` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn row_bf16<const N: usize>(x: &[half::bf16], row: &[half::bf16], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let bh = |v: __m512i| -> __m512bh {
        // SAFETY: a bit-for-bit reinterpretation of 512 bits.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    };
    let n_in = row.len();
    debug_assert!(x.len() == N * n_in && y.len() == N);
    let (w, xp) = (row.as_ptr(), x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); N];
    let full = n_in / 32 * 32;
    let mut c = 0;
    // SAFETY (the loads): `c + 32 <= full <= n_in` inside the loop, and `x` holds `N` rows of
    // `n_in`; a prefetch is a hint that may point past the row (it never faults), and the pointer
    // is formed by wrapping arithmetic.
    while c < full {
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(w.add(c).cast::<i8>().wrapping_add(PREFETCH_BYTES));
            let wv = bh(_mm512_loadu_si512(w.add(c).cast()));
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm512_dpbf16_ps(*a, wv, bh(_mm512_loadu_si512(xp.add(i * n_in + c).cast())));
            }
        }
        c += 32;
    }
    if c < n_in {
        let mask: __mmask32 = (1u32 << (n_in - c)) - 1;
        // SAFETY: the masked-off elements past `n_in` are not read.
        unsafe {
            let wv = bh(_mm512_maskz_loadu_epi16(mask, w.add(c).cast()));
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm512_dpbf16_ps(*a, wv, bh(_mm512_maskz_loadu_epi16(mask, xp.add(i * n_in + c).cast())));
            }
        }
    }
    for (o, a) in y.iter_mut().zip(acc) {
        *o = _mm512_reduce_add_ps(a);
    }
}

/// The sum of 16 lanes as a tree (in order it is a chain of 16 dependent adds).
#[inline(always)]
pub(crate) fn sum_tree(mut v: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            v[l] += v[l + width];
        }
        width /= 2;
    }
    v[0]
}

/// `y (t, d) = p (t, n) · rows (n, d)`: for each row of `p`, the `p`-weighted sum of the stored
/// rows. Threads take runs of stored rows and their partial sums are added at the end. On
/// AVX-512, when `t` is a multiple of 4 and `d` of 64 (MLA decode: 16 heads over a 512-wide
/// latent), register tiles of 4 rows of `p` × 64 columns: per stored row, 4 loads and 4
/// broadcasts feed 16 multiply-adds into accumulators that stay in registers for 256 rows.
pub fn weighted_rows<W: Load16>(p: &[f32], rows: &[W], t: usize, n: usize, d: usize) -> Vec<f32> {
    assert!(p.len() == t * n && rows.len() == n * d, "weighted_rows: shapes disagree");
    let simd = Simd::detect();
    let per_task = (n / rayon::current_num_threads().max(1)).clamp(64, 4096);
    rows.par_chunks(per_task * d)
        .enumerate()
        .map(|(task, run)| {
            let mut partial = vec![0f32; t * d];
            let shape = Run { first: task * per_task, t, n, d };
            #[cfg(target_arch = "x86_64")]
            if matches!(simd, Simd::Avx512 | Simd::Avx512Vnni) && t.is_multiple_of(TILE) && d.is_multiple_of(TILE_COLS)
            {
                // SAFETY: the CPU has AVX-512 (`simd`), and the shapes are whole tiles.
                unsafe { axpy_tiles_avx512(p, run, shape, &mut partial) };
                return partial;
            }
            axpy_block(simd, p, run, shape, &mut partial);
            partial
        })
        .reduce(
            || vec![0f32; t * d],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// `y (b, n_out)`: row `k` of `x (b, n_in)` times the `k`-th of `b` stored `(n_out, n_in)`
/// matrices, transposed (MLA decode's per-head `W_UV`); the matrices in parallel, each on one thread.
pub fn batched_matvec<W: Widen>(x: &[f32], w: &[W], b: usize, n_in: usize, n_out: usize) -> Vec<f32> {
    let mut y = vec![0f32; b * n_out];
    batched_matvec_into(x, w, b, n_in, n_out, &mut y);
    y
}

/// [`batched_matvec`] into `y (b, n_out)`.
pub fn batched_matvec_into<W: Widen>(x: &[f32], w: &[W], b: usize, n_in: usize, n_out: usize, y: &mut [f32]) {
    assert!(
        x.len() == b * n_in && w.len() == b * n_out * n_in && y.len() == b * n_out,
        "batched_matvec: shapes disagree"
    );
    let simd = Simd::detect();
    y.par_chunks_mut(n_out).enumerate().for_each(|(k, yk)| {
        dot_block(simd, &x[k * n_in..(k + 1) * n_in], &w[k * n_out * n_in..(k + 1) * n_out * n_in], 1, n_in, yk)
    });
}

/// `y (b, d)`: row `k` of `p (b, n)` weighting the rows of the `k`-th of `b` stored `(n, d)`
/// matrices (MLA decode's per-head absorption of `W_UK` into the query).
pub fn batched_weighted_rows<W: Widen>(p: &[f32], rows: &[W], b: usize, n: usize, d: usize) -> Vec<f32> {
    let mut y = vec![0f32; b * d];
    batched_weighted_rows_into(p, rows, b, n, d, &mut y);
    y
}

/// [`batched_weighted_rows`] into `y (b, d)`.
pub fn batched_weighted_rows_into<W: Widen>(p: &[f32], rows: &[W], b: usize, n: usize, d: usize, y: &mut [f32]) {
    assert!(p.len() == b * n && rows.len() == b * n * d && y.len() == b * d, "batched_weighted_rows: shapes disagree");
    let simd = Simd::detect();
    y.par_chunks_mut(d).enumerate().for_each(|(k, yk)| {
        yk.fill(0.0);
        let (pk, rk) = (&p[k * n..(k + 1) * n], &rows[k * n * d..(k + 1) * n * d]);
        axpy_block(simd, pk, rk, Run { first: 0, t: 1, n, d }, yk)
    });
}

/// Where a run of stored rows sits: its first row, and the sizes of `p (t, n)` and the rows `(n, d)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    first: usize,
    t: usize,
    n: usize,
    d: usize,
}

/// Rows of `p` and columns of the stored rows per register tile of [`axpy_tiles_avx512`].
const TILE: usize = 4;
const TILE_COLS: usize = 64;
/// Stored rows per pass over the tiles: 256 rows of a 512-wide bf16 latent are 256 KiB, which
/// stay in L2 while every tile walks them.
const SUB_RUN: usize = 256;

/// [`axpy_block`] in AVX-512 register tiles (see [`weighted_rows`]).
///
/// # Safety
/// AVX-512 F must be present, `t` a multiple of 4 and `d` of 64.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn axpy_tiles_avx512<W: Load16>(p: &[f32], run: &[W], shape: Run, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let Run { first, t, n, d } = shape;
    assert!(t.is_multiple_of(TILE) && d.is_multiple_of(TILE_COLS) && out.len() == t * d && run.len().is_multiple_of(d));
    let rows = run.len() / d;
    assert!(first + rows <= n && p.len() == t * n);
    for s0 in (0..rows).step_by(SUB_RUN) {
        let s1 = (s0 + SUB_RUN).min(rows);
        for h0 in (0..t).step_by(TILE) {
            for c0 in (0..d).step_by(TILE_COLS) {
                // SAFETY: every index is inside `out` (h < t, c0 + 64 <= d), `run` (s < rows,
                // c0 + 64 <= d) or `p` ((h0 + i) * n + first + s < t * n), checked above.
                unsafe {
                    let base = out.as_mut_ptr();
                    let at = |i: usize, k: usize| base.add((h0 + i) * d + c0 + 16 * k);
                    let mut acc = [[_mm512_setzero_ps(); 4]; TILE];
                    for (i, a) in acc.iter_mut().enumerate() {
                        for (k, v) in a.iter_mut().enumerate() {
                            *v = _mm512_loadu_ps(at(i, k));
                        }
                    }
                    for s in s0..s1 {
                        let row = run.as_ptr().add(s * d + c0);
                        let c =
                            [W::load16(row), W::load16(row.add(16)), W::load16(row.add(32)), W::load16(row.add(48))];
                        for (i, a) in acc.iter_mut().enumerate() {
                            let w = _mm512_set1_ps(*p.get_unchecked((h0 + i) * n + first + s));
                            for k in 0..4 {
                                a[k] = _mm512_fmadd_ps(c[k], w, a[k]);
                            }
                        }
                    }
                    for (i, a) in acc.iter().enumerate() {
                        for (k, v) in a.iter().enumerate() {
                            _mm512_storeu_ps(at(i, k), *v);
                        }
                    }
                }
            }
        }
    }
}

dispatch!(
    /// Adds `p[i][first + r] * run[r]` to `out[i]` for every row `r` of the run.
    axpy_block => axpy_block_body(p: &[f32], run: &[W], shape: Run, out: &mut [f32])
);

#[inline(always)]
fn axpy_block_body<W: Widen, const FUSED: bool>(p: &[f32], run: &[W], shape: Run, out: &mut [f32]) {
    let Run { first, t, n, d } = shape;
    // Each stored row widened 64 values at a time, on the stack.
    let mut wide = [0f32; 64];
    for (r, row) in run.chunks_exact(d).enumerate() {
        for (c, chunk) in row.chunks(wide.len()).enumerate() {
            let wide = &mut wide[..chunk.len()];
            for (w, s) in wide.iter_mut().zip(chunk) {
                *w = s.widen();
            }
            for ti in 0..t {
                let weight = p[ti * n + first + r];
                let at = ti * d + c * 64;
                for (o, w) in out[at..at + chunk.len()].iter_mut().zip(wide.iter()) {
                    *o = mul_add::<FUSED>(weight, *w, *o);
                }
            }
        }
    }
}

/// Plain loops with f64 accumulation: the definition `matvec` must match.
pub fn matvec_reference<W: Widen>(x: &[f32], w: &[W], t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
    let mut y = vec![0f32; t * n_out];
    for ti in 0..t {
        for o in 0..n_out {
            let dot: f64 = (0..n_in).map(|i| w[o * n_in + i].widen() as f64 * x[ti * n_in + i] as f64).sum();
            y[ti * n_out + o] = dot as f32;
        }
    }
    y
}

/// Plain loops with f64 accumulation: the definition `weighted_rows` must match.
pub fn weighted_rows_reference<W: Widen>(p: &[f32], rows: &[W], t: usize, n: usize, d: usize) -> Vec<f32> {
    let mut y = vec![0f32; t * d];
    for ti in 0..t {
        for j in 0..d {
            let sum: f64 = (0..n).map(|r| p[ti * n + r] as f64 * rows[r * d + j].widen() as f64).sum();
            y[ti * d + j] = sum as f32;
        }
    }
    y
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use half::bf16;

    pub(crate) fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    pub(crate) fn assert_close(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= 1e-5 + 1e-5 * b.abs(), "{what}: [{i}] {a} vs {b}");
        }
    }

    const SHAPES: [(usize, usize, usize); 8] =
        [(1, 1, 1), (1, 15, 3), (1, 16, 33), (2, 17, 64), (3, 100, 65), (8, 2048, 70), (9, 64, 40), (16, 513, 31)];

    #[test]
    fn matvec_matches_its_reference_on_ragged_shapes_in_every_variant() {
        for (t, n_in, n_out) in SHAPES {
            let x = random(t * n_in, 1);
            let w32 = random(n_out * n_in, 2);
            let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let what = format!("matvec t {t} in {n_in} out {n_out}");
            assert_close(&what, &matvec(&x, &w32, t, n_in, n_out), &matvec_reference(&x, &w32, t, n_in, n_out));
            assert_close(&what, &matvec(&x, &wb, t, n_in, n_out), &matvec_reference(&x, &wb, t, n_in, n_out));
            for simd in Simd::available() {
                let mut out = vec![0f32; n_out * t];
                dot_block(simd, &x, &wb, t, n_in, &mut out);
                let y: Vec<f32> = (0..t * n_out).map(|k| out[(k % n_out) * t + k / n_out]).collect();
                assert_close(&format!("{what} {simd:?}"), &y, &matvec_reference(&x, &wb, t, n_in, n_out));
            }
        }
    }

    #[test]
    fn bf16_pair_products_match_the_reference_and_do_not_depend_on_the_batch() {
        let bf = |v: Vec<f32>| v.into_iter().map(half::bf16::from_f32).collect::<Vec<_>>();
        // Every count of activation rows per pass (1 to 8, and 8 + 1, 8 + 5, 8 + 8 + 1), with and
        // without a partial last line.
        let shapes = [(1, 7, 3), (2, 33, 3), (3, 32, 5), (4, 64, 2), (5, 96, 2), (6, 31, 2), (7, 65, 3)];
        let more = [(8, 40, 2), (9, 100, 4), (13, 2048, 2), (17, 2048, 2), (6, 64, 9), (16, 96, 7)];
        for (t, n_in, n_out) in shapes.into_iter().chain(more) {
            let (x, w) = (bf(random(t * n_in, 1)), bf(random(n_out * n_in, 2)));
            let mut out = vec![0f32; n_out * t];
            if !dot_block_bf16(&x, None, &w, t, n_in, &mut out) {
                return; // no AVX-512 BF16 here
            }
            let wide = |v: &[half::bf16]| v.iter().map(|b| b.to_f32()).collect::<Vec<_>>();
            let want = matvec_reference(&wide(&x), &wide(&w), t, n_in, n_out); // (t, out)
            for r in 0..n_out {
                for ti in 0..t {
                    let (g, e) = (out[r * t + ti], want[ti * n_out + r]);
                    assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()) * (n_in as f32).sqrt(), "{t}x{n_in}: {g} vs {e}");
                    // Alone, each activation row gets the same bits.
                    let mut one = vec![0f32; n_out];
                    dot_block_bf16(&x[ti * n_in..(ti + 1) * n_in], None, &w, 1, n_in, &mut one);
                    assert_eq!(one[r].to_bits(), g.to_bits(), "row {ti} alone");
                }
            }
            // By FMAs and by `vdpbf16ps`, whichever this CPU prefers: the same bits.
            let mut by = [vec![0f32; n_out * t], vec![0f32; n_out * t]];
            let mut split = Vec::new();
            crate::kernels::push_bf16_halves(&x, &mut split);
            let split = Some(&split[..]).filter(|_| n_in % 32 == 0);
            for (fma, out) in by.iter_mut().enumerate() {
                assert!(dot_block_bf16(&x, split.filter(|_| fma == 1), &w, t, n_in, out));
            }
            let same = by[0].iter().zip(&by[1]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{t}x{n_in}: FMAs differ from vdpbf16ps");
        }
    }

    #[test]
    fn batched_products_match_their_references_per_matrix() {
        let (b, n, d) = (5, 33, 70);
        let x = random(b * n, 11);
        let w: Vec<bf16> = random(b * n * d, 12).iter().map(|&v| bf16::from_f32(v)).collect();
        let (mv, wr) = (batched_matvec(&x, &w, b, n, d), batched_weighted_rows(&x, &w, b, n, d));
        for k in 0..b {
            let (xk, wk) = (&x[k * n..(k + 1) * n], &w[k * n * d..(k + 1) * n * d]);
            assert_close(&format!("batched_matvec {k}"), &mv[k * d..(k + 1) * d], &matvec_reference(xk, wk, 1, n, d));
            assert_close(
                &format!("batched_weighted_rows {k}"),
                &wr[k * d..(k + 1) * d],
                &weighted_rows_reference(xk, wk, 1, n, d),
            );
        }
    }

    #[test]
    fn weighted_rows_matches_its_reference_on_ragged_shapes_in_every_variant() {
        for (t, n, d) in SHAPES {
            let p = random(t * n, 3);
            let rows: Vec<bf16> = random(n * d, 4).iter().map(|&v| bf16::from_f32(v)).collect();
            let want = weighted_rows_reference(&p, &rows, t, n, d);
            assert_close(&format!("weighted_rows t {t} n {n} d {d}"), &weighted_rows(&p, &rows, t, n, d), &want);
            for simd in Simd::available() {
                let mut out = vec![0f32; t * d];
                axpy_block(simd, &p, &rows, Run { first: 0, t, n, d }, &mut out);
                assert_close(&format!("axpy t {t} n {n} d {d} {simd:?}"), &out, &want);
            }
        }
    }
}
