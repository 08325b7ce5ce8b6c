//! Absorbed MLA attention of one new token over the latent cache (DeepSeek-V2 §2.1, decode):
//!
//! `o_lat[h] = Σ_s softmax_s(scale (q_lat[h]·c_kv[s] + q_rope[h]·k_rope[s])) c_kv[s]`
//!
//! Every head shares the cache, so each cached row is read once per step for all heads (MQA over
//! the latent). Keys and values are never expanded per head; the caller applies `W_UV` to `o_lat`.
//!
//! With 16 heads each cached element takes part in 16 score and 16 output multiply-adds, so on a
//! CPU this step is bound by arithmetic, not by reading the cache. Over a bf16 cache on a CPU
//! with AVX-512 BF16 it is one fused pass (see `fused`): bf16 dot products for both products and
//! an online softmax, the cache read from memory once.

use rayon::prelude::*;

use super::gemm::gemm_pair;
use super::matvec::weighted_rows;
use super::paged::{Contiguous, DensePages, PAGE_ROWS};
use super::rows::softmax_in_place;
use super::Load16;

/// Sizes of one absorbed decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaShape {
    pub heads: usize,
    /// `kv_lora_rank`
    pub d_c: usize,
    /// `qk_rope_head_dim`
    pub d_r: usize,
    /// Cached tokens, the new one included.
    pub len: usize,
}

/// `o_lat (H, d_c)` for `q_lat (H, d_c)`, `q_rope (H, d_r)` over `c_kv (S, d_c)`, `k_rope (S, d_r)`.
pub fn mla_decode<W: Load16>(
    q_lat: &[f32],
    q_rope: &[f32],
    c_kv: &[W],
    k_rope: &[W],
    shape: MlaShape,
    scale: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; shape.heads * shape.d_c];
    mla_decode_into(q_lat, q_rope, c_kv, k_rope, shape, scale, &mut MlaScratch::default(), &mut out);
    out
}

/// What [`mla_decode_into`] keeps between steps: the queries in bf16 and each share's online
/// softmax state and run buffers. Sized by the first step, reused by the next ones.
#[derive(Default)]
pub struct MlaScratch {
    q_lat: Vec<half::bf16>,
    q_rope: Vec<half::bf16>,
    /// The queries as f32 pairs of vectors, for the FMA way ([`fused::split_queries`]).
    q_split: Vec<f32>,
    #[cfg(target_arch = "x86_64")]
    shares: Vec<fused::Share>,
    o: Vec<f32>,
}

/// [`mla_decode`] into `out (H, d_c)`. Over a bf16 cache with AVX-512 BF16 (the fused kernel) it
/// allocates nothing once `scratch` has seen a step of this size; elsewhere it computes into
/// temporaries.
#[allow(clippy::too_many_arguments)]
pub fn mla_decode_into<W: Load16>(
    q_lat: &[f32],
    q_rope: &[f32],
    c_kv: &[W],
    k_rope: &[W],
    shape: MlaShape,
    scale: f32,
    scratch: &mut MlaScratch,
    out: &mut [f32],
) {
    let MlaShape { d_c, d_r, len, .. } = shape;
    assert!(c_kv.len() == len * d_c && k_rope.len() == len * d_r, "mla_decode: cache size");
    let rows = Contiguous { c: c_kv, r: k_rope, d_c, d_r };
    mla_decode_paged_into(q_lat, q_rope, &rows, shape, scale, scratch, out)
}

/// [`mla_decode_into`] over rows that lie page by page ([`DensePages`]), read where they are:
/// `shape.len` must be `rows.len()`.
pub fn mla_decode_paged_into<W: Load16>(
    q_lat: &[f32],
    q_rope: &[f32],
    rows: &dyn DensePages<W>,
    shape: MlaShape,
    scale: f32,
    scratch: &mut MlaScratch,
    out: &mut [f32],
) {
    let fma = super::gemm::bf16_by_fma();
    paged_into_by(q_lat, q_rope, rows, shape, scale, scratch, out, fma)
}

/// [`mla_decode_paged_into`], the fused kernel multiplying bf16 pairs by FMAs (`fma`) or by
/// `vdpbf16ps`: the same bits either way.
#[allow(clippy::too_many_arguments)]
fn paged_into_by<W: Load16>(
    q_lat: &[f32],
    q_rope: &[f32],
    rows: &dyn DensePages<W>,
    shape: MlaShape,
    scale: f32,
    scratch: &mut MlaScratch,
    out: &mut [f32],
    fma: bool,
) {
    let MlaShape { heads, d_c, d_r, len } = shape;
    assert_eq!(out.len(), heads * d_c, "mla_decode: output size");
    assert_eq!(rows.len(), len, "mla_decode: the rows' length");
    #[cfg(target_arch = "x86_64")]
    if len > 0 && rounds_queries::<W>() {
        if let Some(rows) = AsBf16::new(rows) {
            to_bf16_into(q_lat, &mut scratch.q_lat);
            to_bf16_into(q_rope, &mut scratch.q_rope);
            if fma {
                fused::split_queries(&scratch.q_lat, &scratch.q_rope, shape, &mut scratch.q_split);
            }
            let q_split = fma.then_some(&scratch.q_split[..]);
            let step =
                fused::Step { q_lat: &scratch.q_lat, q_rope: &scratch.q_rope, q_split, rows: &rows, shape, scale };
            return fused::mla_decode_bf16(step, &mut scratch.shares, &mut scratch.o, out);
        }
    }
    // Elsewhere (an f32 cache, or no AVX-512 BF16): scores page by page by the tiled GEMM, 4
    // heads x 4 cached rows per register tile, the latent and RoPE parts of each score summed in
    // the same accumulators; then the softmax and the weighted sum, each a pass over the pages.
    let pages = len.div_ceil(PAGE_ROWS);
    let mut probs = vec![0f32; heads * len]; // (H, S)
    for i in 0..pages {
        let (c, r) = rows.page(i);
        let n = c.len() / d_c;
        let scores = gemm_pair((q_lat, c, d_c), (q_rope, r, d_r), heads, n); // (H, n)
        for (h, s) in scores.chunks_exact(n).enumerate() {
            probs[h * len + i * PAGE_ROWS..][..n].copy_from_slice(s);
        }
    }
    probs.par_chunks_mut(len.max(1)).for_each(|row| {
        row.iter_mut().for_each(|v| *v *= scale);
        softmax_in_place(row)
    });
    out.fill(0.0);
    let mut p = Vec::new();
    for i in 0..pages {
        let (c, _) = rows.page(i);
        let n = c.len() / d_c;
        p.clear();
        for h in 0..heads {
            p.extend_from_slice(&probs[h * len + i * PAGE_ROWS..][..n]);
        }
        for (o, y) in out.iter_mut().zip(weighted_rows(&p, c, heads, n, d_c)) {
            *o += y;
        }
    }
}

/// Pages of `W` seen as bf16 pages, where `W` is bf16.
#[cfg(target_arch = "x86_64")]
struct AsBf16<'a, W>(&'a dyn DensePages<W>);

#[cfg(target_arch = "x86_64")]
impl<'a, W: Load16> AsBf16<'a, W> {
    fn new(rows: &'a dyn DensePages<W>) -> Option<Self> {
        W::as_bf16(&[]).map(|_| AsBf16(rows))
    }
}

#[cfg(target_arch = "x86_64")]
impl<W: Load16> DensePages<half::bf16> for AsBf16<'_, W> {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn page(&self, i: usize) -> (&[half::bf16], &[half::bf16]) {
        let (c, r) = self.0.page(i);
        match (W::as_bf16(c), W::as_bf16(r)) {
            (Some(c), Some(r)) => (c, r),
            _ => unreachable!("AsBf16 is made only for bf16 rows"),
        }
    }
}

/// The fused decode attention over a bf16 cache (AVX-512 BF16): flash decoding on the CPU.
///
/// The cache is cut into runs of [`fused::RUN`] rows and each thread takes a contiguous share of
/// them, keeping per head a running maximum score `m`, the sum `l` of `e^(s − m)` and
/// `o = Σ e^(s − m) c` (an online softmax); the shares are merged at the end. Per run:
///
/// - scores for 4 heads × 4 rows per register tile by `vdpbf16ps` (latent and RoPE parts in the
///   same accumulators), the 16 sums folded into one register by a shuffle tree (about 3
///   instructions per sum instead of 8);
/// - the run's probabilities, rounded to bf16 in pairs of rows (as a bf16 model's attention rounds
///   them before multiplying the values);
/// - the weighted sum of latents by `vdpbf16ps` too: two rows' latents interleaved in registers,
///   so each 32-bit lane multiplies a latent of both rows by their two probabilities, 4 heads × 64
///   latents per tile.
///
/// The run's rows are still in cache for the weighted sum, so the cache is read from memory once
/// per step (the unfused path reads it twice), and both products do 32 multiply-adds per
/// instruction.
#[cfg(target_arch = "x86_64")]
mod fused {
    use std::arch::x86_64::*;

    use half::bf16;
    use rayon::prelude::*;

    use super::MlaShape;
    use crate::kernels::paged::{DensePages, PAGE_ROWS};
    use crate::kernels::rows::exp;
    use crate::kernels::{bf16_halves, reduce16, reserve_to, reset, Prefetch};

    /// Cached rows per step of the online softmax: their scores, probabilities and latents stay
    /// in the core's caches between the two products. A run is one page of the cache.
    pub const RUN: usize = PAGE_ROWS;
    /// Heads and rows per register tile.
    const TILE: usize = 4;
    /// Latents per register tile of the weighted sum.
    const COLS: usize = 64;

    /// One share's online softmax state, heads padded to a multiple of 4 and latents to one of
    /// 64; `o` in the weighted sum's register order ([`dim_of`]).
    struct Partial {
        m: Vec<f32>,
        l: Vec<f32>,
        o: Vec<f32>,
    }

    /// One step's queries (rounded to bf16), cached rows, sizes and score scale.
    #[derive(Clone, Copy)]
    pub struct Step<'a> {
        pub q_lat: &'a [bf16],
        pub q_rope: &'a [bf16],
        /// The queries split for the FMA way ([`split_queries`]); `None`: `vdpbf16ps`.
        pub q_split: Option<&'a [f32]>,
        pub rows: &'a dyn DensePages<bf16>,
        pub shape: MlaShape,
        pub scale: f32,
    }

    /// Scratch for one run: its scores (then probabilities), and the probabilities as bf16 pairs.
    struct Scratch {
        p: Vec<f32>,
        pairs: Vec<u32>,
        /// The FMA way's probabilities: rounded to bf16 as `pairs` holds them, as f32 (a zero
        /// after an odd run's last row).
        rounded: Vec<f32>,
    }

    /// The padded sizes: heads to a multiple of [`TILE`], latents to one of [`COLS`].
    fn padded(shape: MlaShape) -> (usize, usize) {
        (shape.heads.next_multiple_of(TILE), shape.d_c.next_multiple_of(COLS))
    }

    /// Latent `dim_of(i)` of a 64-latent chunk is accumulator element `i`: register `k = i / 16`
    /// of the tile holds, in 128-bit lane `L`, latents `8L..8L + 4` (`k` even) or `8L + 4..8L + 8`
    /// (`k` odd) of the chunk's first (`k < 2`) or second 32 (see the weighted sum in `absorb_run`).
    fn dim_of(i: usize) -> usize {
        let (chunk, k, lane, e) = (i / COLS * COLS, (i % COLS) / 16, (i % 16) / 4, i % 4);
        chunk + [0, 4, 32, 36][k] + 8 * lane + e
    }

    /// The FMA way's order: register `k` of a 64-latent chunk holds the even (`k` even) or odd
    /// latents of the chunk's first (`k < 2`) or second 32.
    fn dim_of_fma(i: usize) -> usize {
        let (chunk, k, e) = (i / COLS * COLS, (i % COLS) / 16, i % 16);
        chunk + [0, 1, 32, 33][k] + 2 * e
    }

    /// The bf16 queries as the FMA way reads them: per head, per 32 values of `q_lat` then of
    /// `q_rope` (zeros past the end), the 16 odd ones then the 16 even ones, as f32.
    pub fn split_queries(q_lat: &[bf16], q_rope: &[bf16], shape: MlaShape, out: &mut Vec<f32>) {
        let MlaShape { heads, d_c, d_r, .. } = shape;
        out.clear();
        for h in 0..heads {
            crate::kernels::push_bf16_halves(&q_lat[h * d_c..(h + 1) * d_c], out);
            crate::kernels::push_bf16_halves(&q_rope[h * d_r..(h + 1) * d_r], out);
        }
    }

    /// One share's state and run buffers, kept from step to step.
    pub struct Share {
        part: Partial,
        scratch: Scratch,
    }

    /// [`super::mla_decode`] over a bf16 cache, the queries already rounded to bf16, into `out`;
    /// `shares` and `o` are reused.
    pub fn mla_decode_bf16(step: Step<'_>, shares: &mut Vec<Share>, o: &mut Vec<f32>, out: &mut [f32]) {
        let Step { q_lat, q_rope, rows, shape, .. } = step;
        let MlaShape { heads, d_c, d_r, len } = shape;
        assert!(
            q_lat.len() == heads * d_c
                && q_rope.len() == heads * d_r
                && rows.len() == len
                && out.len() == heads * d_c
                && len > 0,
            "mla_decode: shapes disagree"
        );
        assert!(crate::kernels::gemm::has_avx512_bf16(), "mla_decode_bf16 needs AVX-512 BF16");
        let (hp, dp) = padded(shape);
        let runs = len.div_ceil(RUN);
        let most = 4 * rayon::current_num_threads();
        let n = runs.min(most).max(1);
        // Every share the sequence will use once it is long, sized now, so that a growing
        // sequence allocates nothing when it starts using another one.
        while shares.len() < most {
            let part = Partial { m: Vec::new(), l: Vec::new(), o: Vec::new() };
            shares.push(Share { part, scratch: Scratch { p: Vec::new(), pairs: Vec::new(), rounded: Vec::new() } });
        }
        for Share { part, scratch } in shares.iter_mut() {
            reserve_to(&mut part.m, hp);
            reserve_to(&mut part.l, hp);
            reserve_to(&mut part.o, hp * dp);
            reserve_to(&mut scratch.p, hp * RUN);
            reserve_to(&mut scratch.pairs, hp * RUN / 2);
            reserve_to(&mut scratch.rounded, hp * RUN);
        }
        shares[..n].par_iter_mut().enumerate().for_each(|(k, share)| {
            let Share { part, scratch } = share;
            reset(&mut part.m, hp, f32::NEG_INFINITY);
            reset(&mut part.l, hp, 0.0);
            reset(&mut part.o, hp * dp, 0.0);
            scratch.p.resize(hp * RUN, 0.0);
            scratch.pairs.resize(hp * RUN / 2, 0);
            scratch.rounded.resize(hp * RUN, 0.0);
            let mine = runs * k / n..runs * (k + 1) / n;
            for run in mine.clone() {
                // The share's next run (page), fetched while this one is summed.
                let next: (&[bf16], &[bf16]) = if run + 1 < mine.end { rows.page(run + 1) } else { (&[], &[]) };
                let (c, r) = rows.page(run);
                assert!(c.len() == r.len() / d_r * d_c && !c.is_empty() && c.len() <= RUN * d_c, "a page's rows");
                // SAFETY: `has_avx512_bf16` was checked above; the page's slices were checked
                // against each other and the run's length.
                unsafe { absorb_run(&step, (c, r), next, part, scratch) };
            }
        });
        let parts = &shares[..n];
        reset(o, dp, 0.0);
        for h in 0..heads {
            let m = parts.iter().map(|p| p.part.m[h]).fold(f32::NEG_INFINITY, f32::max);
            let mut l = 0f32;
            o.fill(0.0);
            for part in parts.iter().map(|p| &p.part).filter(|p| p.m[h] > f32::NEG_INFINITY) {
                let f = exp(part.m[h] - m);
                l += f * part.l[h];
                for (a, &b) in o.iter_mut().zip(&part.o[h * dp..(h + 1) * dp]) {
                    *a += f * b;
                }
            }
            let inv = 1.0 / l;
            let dim_of = if step.q_split.is_some() { dim_of_fma } else { dim_of };
            for (i, &v) in o.iter().enumerate() {
                let dim = dim_of(i);
                if dim < d_c {
                    out[h * d_c + dim] = v * inv;
                }
            }
        }
    }

    /// Loads `n` (at most 32) bf16 from `p`, zeros beyond.
    ///
    /// # Safety
    /// AVX-512 BW; `p..p + n` readable.
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16, n: usize) -> __m512i {
        let mask: __mmask32 = if n >= 32 { !0 } else { (1u32 << n) - 1 };
        // SAFETY: the caller's contract; masked-off elements are not read.
        unsafe { _mm512_maskz_loadu_epi16(mask, p.cast()) }
    }

    #[inline(always)]
    fn bh(v: __m512i) -> __m512bh {
        // SAFETY: a bit-for-bit reinterpretation of 512 bits.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// The `vdpbf16ps` way's scores of one page's rows, scaled, into `p` (head h's row at h · RUN):
    /// 4 heads × 4 rows per register tile, the latent and RoPE parts in the same accumulators.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16; the queries (rounded to bf16) and the page's slices as [`absorb_run`]
    /// takes them (1 to `RUN` rows); `p` holds `hp · RUN` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[inline(never)]
    unsafe fn scores_dp(
        (q_lat, q_rope): (&[bf16], &[bf16]),
        (c_kv, k_rope): (&[bf16], &[bf16]),
        shape: MlaShape,
        scale: f32,
        p: &mut [f32],
    ) {
        let MlaShape { heads, d_c, d_r, .. } = shape;
        let (hp, _) = padded(shape);
        let n = c_kv.len() / d_c;
        // SAFETY (whole body): row indices are clamped below `n`, head indices below `heads`, and
        // a partial line loads with a mask; `p` as the contract says.
        unsafe {
            for r0 in (0..n).step_by(TILE) {
                let rs: [usize; TILE] = std::array::from_fn(|r| (r0 + r).min(n - 1));
                for h0 in (0..hp).step_by(TILE) {
                    let mut acc = [_mm512_setzero_ps(); TILE * TILE];
                    for (q, c, d) in [(q_lat, c_kv, d_c), (q_rope, k_rope, d_r)] {
                        for x in (0..d).step_by(32) {
                            let w: [__m512bh; TILE] =
                                std::array::from_fn(|r| bh(load_bf16(c.as_ptr().add(rs[r] * d + x), d - x)));
                            if h0 == 0 {
                                // The next 4 rows, while these are multiplied.
                                for &r in &rs {
                                    _mm_prefetch::<_MM_HINT_T0>(c.as_ptr().wrapping_add((r + TILE) * d + x).cast());
                                }
                            }
                            for i in 0..TILE {
                                let h = (h0 + i).min(heads - 1);
                                let qv = bh(load_bf16(q.as_ptr().add(h * d + x), d - x));
                                for r in 0..TILE {
                                    acc[TILE * i + r] = _mm512_dpbf16_ps(acc[TILE * i + r], w[r], qv);
                                }
                            }
                        }
                    }
                    let mut sums = [0f32; TILE * TILE];
                    _mm512_storeu_ps(sums.as_mut_ptr(), _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale)));
                    for i in 0..TILE {
                        for r in 0..TILE.min(n - r0) {
                            p[(h0 + i) * RUN + r0 + r] = sums[TILE * i + r];
                        }
                    }
                }
            }
        }
    }

    /// The FMA way's scores of one page's rows, scaled, into `p` (head h's row at h · RUN): 4 heads ×
    /// 4 rows per register tile, each row's 32 values split into their odd and even halves once
    /// per tile and multiplied by each head's halves, the high product first (as `vdpbf16ps` adds
    /// them). A page whose rows are not a multiple of 4 ends with a tile that overlaps the one
    /// before it (those rows' scores are written twice, the same values), so that a tile's 4 rows
    /// lie at fixed distances and the loop keeps their addresses in registers.
    ///
    /// Its own function, with loops rather than closures around the intrinsics, so that the
    /// compiler allocates its registers for this loop alone (inlined into [`absorb_run`] beside
    /// the `vdpbf16ps` way it ran 10-16% slower, with row addresses reloaded from the stack).
    ///
    /// # Safety
    /// AVX-512 F/BW; `q` as [`split_queries`] lays it out for `shape`; the page's slices as
    /// [`absorb_run`] takes them (1 to `RUN` rows); `p` holds `hp · RUN` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline(never)]
    unsafe fn scores_fma(q: &[f32], (c_kv, k_rope): (&[bf16], &[bf16]), shape: MlaShape, scale: f32, p: &mut [f32]) {
        let MlaShape { heads, d_c, d_r, .. } = shape;
        let (hp, _) = padded(shape);
        let n = c_kv.len() / d_c;
        let per_head = (d_c.div_ceil(32) + d_r.div_ceil(32)) * 32;
        // A tile's row r at `r0 + off[r]` (fewer than 4 rows: the last one repeated); tiles start
        // every 4 rows, the last at `n - 4`.
        let off = [0, 1, 2, 3].map(|r: usize| r.min(n - 1));
        let starts = (0..n.saturating_sub(TILE - 1)).step_by(TILE).chain((n % TILE != 0 && n > TILE).then(|| n - TILE));
        // SAFETY (whole body): rows `r0 + off[r]` are below `n`, head indices are clamped below
        // `heads`, query offsets stay inside a head's `per_head` values; `p` as the contract says.
        unsafe {
            for r0 in starts.chain((n < TILE).then_some(0)) {
                for h0 in (0..hp).step_by(TILE) {
                    let mut qh = [q.as_ptr(); TILE];
                    for (i, qh) in qh.iter_mut().enumerate() {
                        *qh = q.as_ptr().add((h0 + i).min(heads - 1) * per_head);
                    }
                    let mut acc = [_mm512_setzero_ps(); TILE * TILE];
                    let mut at = 0;
                    for (c, d) in [(c_kv, d_c), (k_rope, d_r)] {
                        let mut rows = [c.as_ptr(); TILE];
                        for (row, off) in rows.iter_mut().zip(off) {
                            *row = c.as_ptr().add((r0 + off) * d);
                        }
                        for x in (0..d).step_by(32) {
                            let whole = d - x >= 32;
                            if h0 == 0 {
                                for row in rows {
                                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(TILE * d + x).cast());
                                }
                            }
                            let mut q = [[_mm512_setzero_ps(); 2]; TILE];
                            for (q, qh) in q.iter_mut().zip(qh) {
                                *q = [_mm512_loadu_ps(qh.add(at)), _mm512_loadu_ps(qh.add(at + 16))];
                            }
                            for r in 0..TILE {
                                let w = if whole {
                                    _mm512_loadu_si512(rows[r].add(x).cast())
                                } else {
                                    load_bf16(rows[r].add(x), d - x)
                                };
                                let [hi, lo] = bf16_halves(w);
                                for (i, [qh, ql]) in q.iter().enumerate() {
                                    let a = _mm512_fmadd_ps(hi, *qh, acc[TILE * i + r]);
                                    acc[TILE * i + r] = _mm512_fmadd_ps(lo, *ql, a);
                                }
                            }
                            at += 32;
                        }
                    }
                    let mut sums = [0f32; TILE * TILE];
                    _mm512_storeu_ps(sums.as_mut_ptr(), _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale)));
                    for i in 0..TILE {
                        for r in 0..TILE.min(n) {
                            p[(h0 + i) * RUN + r0 + r] = sums[TILE * i + r];
                        }
                    }
                }
            }
        }
    }

    /// The FMA way's weighted sum of one page's latents `c0..c0 + width` (at most 64, from `c`,
    /// rows `d_c` apart, `n` of them) for 4 heads (probabilities rounded to bf16 at `p`, rows
    /// `RUN` apart) added to their accumulators at `o` (`dp` apart, in [`dim_of_fma`]'s order):
    /// rows 2j and 2j + 1 as f32 halves, row 2j + 1's product first, as `vdpbf16ps` adds a pair
    /// (an odd page's last row paired with itself against a zero probability).
    ///
    /// # Safety
    /// AVX-512 F/BW; the rows, probabilities (`n` rounded up to even) and accumulators readable
    /// and writable as described.
    ///
    /// Its own function for the reason [`scores_fma`] is.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline(never)]
    unsafe fn wsum_fma(c: *const bf16, (d_c, width, n): (usize, usize, usize), p: *const f32, o: *mut f32, dp: usize) {
        // SAFETY (whole body): the contract's.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; TILE];
            for (i, acc) in acc.iter_mut().enumerate() {
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_loadu_ps(o.add(i * dp + 16 * k));
                }
            }
            // Even latents, then odd (`dim_of_fma`).
            #[inline(always)]
            unsafe fn halves(v: __m512i) -> [__m512; 2] {
                // SAFETY: the caller's (AVX-512 F).
                let [hi, lo] = unsafe { bf16_halves(v) };
                [lo, hi]
            }
            // A row's 64 latents as four registers of f32.
            #[inline(always)]
            unsafe fn load(row: *const bf16, width: usize) -> [__m512; 4] {
                // SAFETY: the caller's: `row..row + width` readable, AVX-512 F/BW.
                unsafe {
                    let (x, y) = if width == COLS {
                        (_mm512_loadu_si512(row.cast()), _mm512_loadu_si512(row.add(32).cast()))
                    } else {
                        (load_bf16(row, width), load_bf16(row.add(32.min(width)), width.saturating_sub(32)))
                    };
                    let ([a0, a1], [a2, a3]) = (halves(x), halves(y));
                    [a0, a1, a2, a3]
                }
            }
            for j in 0..n.div_ceil(2) {
                let a = c.add(2 * j * d_c);
                let b = if 2 * j + 1 < n { a.add(d_c) } else { a };
                let (av, bv) = (load(a, width), load(b, width));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let p = p.add(i * RUN + 2 * j);
                    let (pa, pb) = (_mm512_set1_ps(*p), _mm512_set1_ps(*p.add(1)));
                    for k in 0..4 {
                        acc[k] = _mm512_fmadd_ps(av[k], pa, _mm512_fmadd_ps(bv[k], pb, acc[k]));
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                for (k, &v) in acc.iter().enumerate() {
                    _mm512_storeu_ps(o.add(i * dp + 16 * k), v);
                }
            }
        }
    }

    /// Adds one page's rows, `c_kv (n, d_c)` and `k_rope (n, d_r)`, to `part`: scores, online
    /// softmax, weighted sum.
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16; the slices as [`mla_decode_bf16`] checked them, `1 ≤ n ≤ RUN`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn absorb_run(
        step: &Step<'_>,
        (c_kv, k_rope): (&[bf16], &[bf16]),
        next: (&[bf16], &[bf16]),
        part: &mut Partial,
        scratch: &mut Scratch,
    ) {
        let Step { q_lat, q_rope, q_split, shape, scale, .. } = *step;
        let d_c = shape.d_c;
        let (hp, dp) = padded(shape);
        let n = c_kv.len() / d_c;
        // The share's next run, fetched into L2 while this one's weighted sum computes from
        // cache: its scores would otherwise wait on memory, since a model reads each layer's
        // cache once per token (the prefetch one tile ahead below does not cover that latency).
        let mut ahead =
            Prefetch::new([Prefetch::span(next.0), Prefetch::span(next.1)], d_c.div_ceil(COLS) * (hp / TILE));
        // SAFETY (whole body): every row index is clamped into `rows` and every head index into
        // `0..heads`, so loads stay inside the slices (a partial step loads with a mask); stores
        // go to `part` and `scratch`, sized for `hp` heads, `dp` latents and `RUN` rows.
        unsafe {
            // Scores, scaled, into `scratch.p` (head h's row at h · RUN).
            if let Some(qs) = q_split {
                scores_fma(qs, (c_kv, k_rope), shape, scale, &mut scratch.p);
            } else {
                scores_dp((q_lat, q_rope), (c_kv, k_rope), shape, scale, &mut scratch.p);
            }
            // Online softmax: rescale what came before to the new maximum, then e^(s − m).
            let n16 = n.next_multiple_of(16);
            for h in 0..hp {
                // Whole registers: the rows past `n` are -inf for the maximum, then zeros.
                let p = &mut scratch.p[h * RUN..h * RUN + n16];
                p[n..].fill(f32::NEG_INFINITY);
                let mut top = _mm512_set1_ps(part.m[h]);
                for chunk in p.chunks_exact(16) {
                    top = _mm512_max_ps(top, _mm512_loadu_ps(chunk.as_ptr()));
                }
                let m_new = _mm512_reduce_max_ps(top);
                if m_new > part.m[h] && part.l[h] > 0.0 {
                    let alpha = exp(part.m[h] - m_new);
                    part.l[h] *= alpha;
                    part.o[h * dp..(h + 1) * dp].iter_mut().for_each(|v| *v *= alpha);
                }
                part.m[h] = m_new;
                for chunk in p.chunks_exact_mut(16) {
                    // Fixed-size, so that the exponentials vectorize.
                    let chunk: &mut [f32; 16] = chunk.try_into().unwrap_or_else(|_| unreachable!());
                    for v in chunk.iter_mut() {
                        *v = exp(*v - m_new);
                    }
                }
                p[n..].fill(0.0);
                let p = &p[..n];
                // Their sum, and their bf16 roundings in order: consecutive pairs are the u32
                // words of `pairs` (an odd run's last word gets a zero for its missing row).
                let (mut total, dst) = (_mm512_setzero_ps(), scratch.pairs.as_mut_ptr().add(h * RUN / 2).cast::<u16>());
                for k in (0..n).step_by(16) {
                    let (len, even) = ((n - k).min(16), (n.next_multiple_of(2) - k).min(16));
                    let v = _mm512_maskz_loadu_ps(((1u32 << len) - 1) as __mmask16, p.as_ptr().add(k));
                    total = _mm512_add_ps(total, v);
                    let rounded = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
                    _mm256_mask_storeu_epi16(dst.add(k).cast(), ((1u32 << even) - 1) as __mmask16, rounded);
                    if q_split.is_some() {
                        let wide = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(rounded)));
                        let at = scratch.rounded.as_mut_ptr().add(h * RUN + k);
                        _mm512_mask_storeu_ps(at, ((1u32 << even) - 1) as __mmask16, wide);
                    }
                }
                part.l[h] += _mm512_reduce_add_ps(total);
            }
            // Weighted sum: rows 2j and 2j + 1 interleaved latent by latent, so one `vdpbf16ps`
            // against the pair (p_2j, p_2j+1) of a head adds both rows' share to 16 latents.
            for c0 in (0..d_c).step_by(COLS) {
                let width = (d_c - c0).min(COLS);
                for h0 in (0..hp).step_by(TILE) {
                    ahead.tick();
                    let base = part.o.as_mut_ptr();
                    if q_split.is_some() {
                        let (c, p) = (c_kv.as_ptr().add(c0), scratch.rounded.as_ptr().add(h0 * RUN));
                        wsum_fma(c, (d_c, width, n), p, base.add(h0 * dp + c0), dp);
                        continue;
                    }
                    let at = |i: usize, k: usize| base.add((h0 + i) * dp + c0 + 16 * k);
                    let mut acc: [[__m512; 4]; TILE] =
                        std::array::from_fn(|i| std::array::from_fn(|k| _mm512_loadu_ps(at(i, k))));
                    for j in 0..n.div_ceil(2) {
                        let (a, b) = (2 * j, (2 * j + 1).min(n - 1));
                        let (a, b) = (c_kv.as_ptr().add(a * d_c + c0), c_kv.as_ptr().add(b * d_c + c0));
                        let (a0, b0) = (load_bf16(a, width), load_bf16(b, width));
                        let rest = width.saturating_sub(32);
                        let (a1, b1) = (load_bf16(a.add(32.min(width)), rest), load_bf16(b.add(32.min(width)), rest));
                        let pv = [
                            bh(_mm512_unpacklo_epi16(a0, b0)),
                            bh(_mm512_unpackhi_epi16(a0, b0)),
                            bh(_mm512_unpacklo_epi16(a1, b1)),
                            bh(_mm512_unpackhi_epi16(a1, b1)),
                        ];
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let w = bh(_mm512_set1_epi32(scratch.pairs[(h0 + i) * RUN / 2 + j] as i32));
                            for (a, &v) in acc.iter_mut().zip(&pv) {
                                *a = _mm512_dpbf16_ps(*a, v, w);
                            }
                        }
                    }
                    for (i, acc) in acc.iter().enumerate() {
                        for (k, &v) in acc.iter().enumerate() {
                            _mm512_storeu_ps(at(i, k), v);
                        }
                    }
                }
            }
        }
    }
}

/// Whether [`mla_decode`] rounds the queries to bf16 for this cache element: over a bf16 cache
/// on a CPU with AVX-512 BF16 the scores are bf16 products (exact, summed in f32), as a bf16
/// model's attention computes them. The reference twin does the same rounding.
pub fn rounds_queries<W: Load16>() -> bool {
    #[cfg(target_arch = "x86_64")]
    if W::as_bf16(&[]).is_some() {
        return super::gemm::has_avx512_bf16();
    }
    false
}

fn to_bf16(v: &[f32]) -> Vec<half::bf16> {
    v.iter().map(|&x| super::bf16_round(x)).collect()
}

/// `v` rounded to bf16 into `out` (resized, its buffer kept).
fn to_bf16_into(v: &[f32], out: &mut Vec<half::bf16>) {
    out.clear();
    out.extend(v.iter().map(|&x| super::bf16_round(x)));
}

/// Plain loops in f64: the definition `mla_decode` must match (queries rounded to bf16 where
/// [`rounds_queries`] says so).
pub fn mla_decode_reference<W: Load16>(
    q_lat: &[f32],
    q_rope: &[f32],
    c_kv: &[W],
    k_rope: &[W],
    shape: MlaShape,
    scale: f32,
) -> Vec<f32> {
    reference_with_spread(q_lat, q_rope, c_kv, k_rope, shape, scale).0
}

/// [`mla_decode_reference`], and per output `Σ_s p_s |c_s|`: the fused kernel rounds each
/// probability to bf16 (relative error at most 2⁻⁹), so it may differ by up to 2⁻⁹ of this.
fn reference_with_spread<W: Load16>(
    q_lat: &[f32],
    q_rope: &[f32],
    c_kv: &[W],
    k_rope: &[W],
    shape: MlaShape,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let MlaShape { heads, d_c, d_r, len } = shape;
    let round = |q: &[f32]| -> Vec<f32> {
        if rounds_queries::<W>() {
            to_bf16(q).iter().map(|v| v.to_f32()).collect()
        } else {
            q.to_vec()
        }
    };
    let (q_lat, q_rope) = (&round(q_lat)[..], &round(q_rope)[..]);
    let mut out = vec![0f32; heads * d_c];
    let mut spread = vec![0f32; heads * d_c];
    for h in 0..heads {
        let scores: Vec<f64> = (0..len)
            .map(|s| {
                let content: f64 = (0..d_c).map(|i| q_lat[h * d_c + i] as f64 * c_kv[s * d_c + i].widen() as f64).sum();
                let position: f64 =
                    (0..d_r).map(|i| q_rope[h * d_r + i] as f64 * k_rope[s * d_r + i].widen() as f64).sum();
                (content + position) * scale as f64
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|v| (v - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        for i in 0..d_c {
            let v: f64 = (0..len).map(|s| weights[s] / total * c_kv[s * d_c + i].widen() as f64).sum();
            let a: f64 = (0..len).map(|s| weights[s] / total * (c_kv[s * d_c + i].widen() as f64).abs()).sum();
            out[h * d_c + i] = v as f32;
            spread[h * d_c + i] = a as f32;
        }
    }
    (out, spread)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matvec::tests::{assert_close, random};
    use half::bf16;

    #[test]
    fn fast_mla_decode_matches_reference_on_ragged_lengths() {
        for len in [1, 2, 7, 63, 64, 65, 130, 1000] {
            for (heads, d_c, d_r) in [(4, 32, 8), (3, 80, 24), (16, 512, 64)] {
                let shape = MlaShape { heads, d_c, d_r, len };
                let q_lat = random(heads * d_c, 1);
                let q_rope = random(heads * d_r, 2);
                let (c32, r32) = (random(len * d_c, 3), random(len * d_r, 4));
                let c_kv: Vec<bf16> = c32.iter().map(|&v| bf16::from_f32(v)).collect();
                let k_rope: Vec<bf16> = r32.iter().map(|&v| bf16::from_f32(v)).collect();
                let scale = 1.0 / ((d_c / 4) as f32).sqrt();
                let what = format!("mla_decode len {len} heads {heads} d_c {d_c} d_r {d_r}");
                // An f32 cache: the unfused kernels, as exact as f32 sums.
                assert_close(
                    &format!("{what} f32"),
                    &mla_decode(&q_lat, &q_rope, &c32, &r32, shape, scale),
                    &mla_decode_reference(&q_lat, &q_rope, &c32, &r32, shape, scale),
                );
                // A bf16 cache: within the bf16 rounding of the probabilities where the fused
                // kernel runs, else as exact.
                let got = mla_decode(&q_lat, &q_rope, &c_kv, &k_rope, shape, scale);
                let (want, spread) = reference_with_spread(&q_lat, &q_rope, &c_kv, &k_rope, shape, scale);
                let slack = if rounds_queries::<bf16>() { 1.0 / 256.0 } else { 0.0 };
                for (i, ((&g, &w), &a)) in got.iter().zip(&want).zip(&spread).enumerate() {
                    let bound = slack * a + 1e-5 * w.abs() + 1e-5;
                    assert!((g - w).abs() <= bound, "{what} bf16: [{i}] {g} vs {w} (bound {bound})");
                }
                // Zero queries: every probability before normalization is exactly 1, which
                // bf16 holds exactly, so the output is the mean latent to f32 rounding: a row
                // missed or counted twice, a latent out of place or a share merged wrongly shows.
                // Both ways of multiplying bf16 pairs give the same bits.
                if rounds_queries::<bf16>() {
                    let rows = Contiguous { c: &c_kv[..], r: &k_rope[..], d_c, d_r };
                    let by = |fma: bool| {
                        let mut out = vec![0f32; heads * d_c];
                        paged_into_by(&q_lat, &q_rope, &rows, shape, scale, &mut MlaScratch::default(), &mut out, fma);
                        out
                    };
                    let (dp, fma) = (by(false), by(true));
                    assert!(dp.iter().zip(&fma).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: FMAs differ");
                }
                let zeros = (vec![0f32; heads * d_c], vec![0f32; heads * d_r]);
                let got = mla_decode(&zeros.0, &zeros.1, &c_kv, &k_rope, shape, scale);
                assert_close(
                    &format!("{what} bf16, uniform"),
                    &got,
                    &mla_decode_reference(&zeros.0, &zeros.1, &c_kv, &k_rope, shape, scale),
                );
            }
        }
    }
}
