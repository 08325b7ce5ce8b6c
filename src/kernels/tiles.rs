//! Quantized weights repacked in tiles of 16 rows, for the AVX-512 VNNI decode product.
//!
//! The row-major kernels of [`super::quant`] and [`super::kquant`] spend most of a block's
//! instructions on work that does not scale with its codes: unpacking its scales, spreading them
//! over the products, folding 16 lanes of partial sums. A tile holds the same block column of 16
//! consecutive rows, byte for byte the same data (a tile is exactly 16 blocks in size), rearranged
//! so that one 512-bit register holds 4 codes of each of the 16 rows:
//!
//! - codes: the 4-byte words of the 16 rows' code arrays interleaved, word `j` of row `r` at
//!   word `16·j + r`. One `vpdpbusd` against 4 activation codes broadcast to every lane adds 4
//!   products to each row's 32-bit lane, so the tile's 16 rows come out in the 16 lanes of one
//!   accumulator and need no horizontal sum;
//! - per-group scales: byte `k` of the 16 rows side by side (a 16-byte plane per `k`), so a group's
//!   scales are one zero- or sign-extending load, and Q4_K's 6-bit packing is undone for 16 rows
//!   at once with a few byte-wise shifts and masks;
//! - block scales `d`: the 16 f16 side by side, one `vcvtph2ps`;
//! - Q5_0's fifth bits: regrouped into one 64-bit mask per register of codes, added with one
//!   masked byte add;
//! - Q8_0's codes are stored plus 128 (bits flipped), so they multiply as unsigned bytes; the
//!   offset comes back off through the activations' code sums, as Q6_K's 32 and Q5_0's 16 do.
//!
//! Per 16 rows of a 256-value block that is about 15 instructions per row instead of about 45,
//! and the product becomes bound by memory rather than by arithmetic. Matrices are tiled at load
//! only where the CPU has AVX-512 VNNI (and the row count is a multiple of 16); elsewhere the rows
//! stay as they are.
//!
//! Several activation rows (prefill's, or a batched decode step's tokens that chose one expert)
//! take the same kernel up to 4 at once ([`Tile::dot_vnni`] with `N = 1..=4`): each register of
//! codes is unpacked once and multiplied into every row's accumulators, so the product becomes
//! bound by `vpdpbusd` (64 multiply-adds each, twice `vdpbf16ps`) and by the unpacking. A row gets
//! the same bits whatever `N` (the sums are integers until each row's own scaling). Lookups and
//! the reference twins read tiles back as blocks ([`Tile::unpack`]).

use half::f16;

use super::kquant::{scales_mins, BlockQ4K, BlockQ5_0, BlockQ6K, K_SCALE_SIZE, QK_K};
use super::matvec::{by_output_rows, sum_tree, PREFETCH_BYTES, ROWS_PER_TASK};
#[cfg(target_arch = "x86_64")]
use super::quant::AVX512_VNNI;
use super::quant::{BlockQ8_0, QuantBlock, QuantizedRows, AVX2, AVX512, LANES, PORTABLE, QK8_0, SUM_GROUP};
use super::Simd;

/// Rows per tile: one per 32-bit lane of an AVX-512 register.
pub const TILE_ROWS: usize = 16;

/// One block column of 16 rows in a layout of the same size as the 16 blocks.
pub trait Tile: Copy + Send + Sync + 'static {
    /// The row format.
    type Block: QuantBlock;
    /// The tile of `rows[r]` for `r` in `0..16`.
    fn pack(rows: &[Self::Block; TILE_ROWS]) -> Self;
    /// Row `r`'s block, as it was packed.
    fn unpack(&self, r: usize) -> Self::Block;
    /// Row `r`'s values (`Self::Block::VALUES` of them), read from the tile in place.
    #[inline(always)]
    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        self.unpack(r).dequantize(out)
    }
    /// Every row's block.
    #[inline(always)]
    fn unpack_all(&self) -> [Self::Block; TILE_ROWS] {
        let mut all = [self.unpack(0); TILE_ROWS];
        for (r, block) in all.iter_mut().enumerate().skip(1) {
            *block = self.unpack(r);
        }
        all
    }
    /// `acc[n][r] += Σ w_r·x_n` over the tile's values for every row `r` and each of `N`
    /// activation rows `x_n` (as in [`QuantBlock::dot`]). The codes are unpacked once for all
    /// `N` rows, and each row's sums come out bit for bit as with `N = 1`. AVX-512 VNNI only:
    /// called from the variant compiled for it.
    #[cfg(target_arch = "x86_64")]
    fn dot_vnni<const N: usize>(&self, x: [Codes<'_>; N], acc: &mut [[f32; TILE_ROWS]; N]);
}

/// One activation row's codes for one block: the 8-bit codes, their scales and their sums per 16
/// (a block's share of [`QuantizedRows`]).
#[derive(Debug, Clone, Copy)]
pub struct Codes<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub sums: &'a [i16],
}

/// Row `r`'s values rounded to bf16 (the bf16 GEMM's operand, where it is given tiles).
#[inline(always)]
pub(crate) fn row_bf16<T: Tile>(tile: &T, r: usize, out: &mut [half::bf16]) {
    let mut values = [0f32; QK_K];
    let values = &mut values[..T::Block::VALUES];
    tile.dequantize_row(r, values);
    for (d, &v) in out.iter_mut().zip(values.iter()) {
        *d = super::bf16_round(v);
    }
}

/// `acc[r] += isum[r] · d[r] · dx` for a tile's 16 rows: the end of a single-scale block's
/// product. AVX-512 F with F16C only.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn add_scaled_sums(acc: &mut [f32; TILE_ROWS], isum: std::arch::x86_64::__m512i, d: &[f16; TILE_ROWS], dx: f32) {
    use std::arch::x86_64::*;
    // SAFETY: called only from the VNNI kernels (avx512f and f16c present); `d` holds 16 f16,
    // `acc` 16 floats.
    unsafe {
        let dv = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(d.as_ptr().cast())), _mm512_set1_ps(dx));
        _mm512_storeu_ps(
            acc.as_mut_ptr(),
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), dv, _mm512_loadu_ps(acc.as_ptr())),
        );
    }
}

/// `x[o..o + 4]` as one 32-bit word broadcast to all 16 lanes (the activation codes every row's
/// lane multiplies); a plain load, so the compiler folds it into `vpdpbusd`'s broadcast operand.
///
/// # Safety
/// AVX-512 F must be present and `o + 4 <= x.len()`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn broadcast4(x: &[i8], o: usize) -> std::arch::x86_64::__m512i {
    debug_assert!(o + 4 <= x.len());
    // SAFETY: the caller's contract.
    unsafe { std::arch::x86_64::_mm512_set1_epi32(x.as_ptr().add(o).cast::<i32>().read_unaligned()) }
}

/// Writes `src`'s 4-byte words into `dst` as row `r` of a tile: word `j` at word `16·j + r`.
#[inline(always)]
fn interleave_words(dst: &mut [u8], r: usize, src: &[u8]) {
    for (j, word) in src.chunks_exact(4).enumerate() {
        let at = (TILE_ROWS * j + r) * 4;
        dst[at..at + 4].copy_from_slice(word);
    }
}

/// Reads row `r`'s words back out of [`interleave_words`]'s layout.
#[inline(always)]
fn deinterleave_words(src: &[u8], r: usize, dst: &mut [u8]) {
    for (j, word) in dst.chunks_exact_mut(4).enumerate() {
        let at = (TILE_ROWS * j + r) * 4;
        word.copy_from_slice(&src[at..at + 4]);
    }
}

/// Q4_K tiles: the 12 packed scale bytes as planes, the `d` and `dmin` of every row, then the 16
/// rows' codes as interleaved words (2304 bytes, 16 × 144), in the order the kernel reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct TileQ4K {
    scales: [u8; TILE_ROWS * K_SCALE_SIZE],
    d: [f16; TILE_ROWS],
    dmin: [f16; TILE_ROWS],
    qs: [u8; TILE_ROWS * QK_K / 2],
}

impl Tile for TileQ4K {
    type Block = BlockQ4K;

    fn pack(rows: &[BlockQ4K; TILE_ROWS]) -> TileQ4K {
        let mut t = TileQ4K {
            qs: [0; TILE_ROWS * QK_K / 2],
            scales: [0; TILE_ROWS * K_SCALE_SIZE],
            d: [f16::ZERO; TILE_ROWS],
            dmin: [f16::ZERO; TILE_ROWS],
        };
        for (r, b) in rows.iter().enumerate() {
            interleave_words(&mut t.qs, r, &b.qs);
            for (k, &s) in b.scales.iter().enumerate() {
                t.scales[TILE_ROWS * k + r] = s;
            }
            (t.d[r], t.dmin[r]) = (b.d, b.dmin);
        }
        t
    }

    #[inline(always)]
    fn unpack(&self, r: usize) -> BlockQ4K {
        let mut b = BlockQ4K { d: self.d[r], dmin: self.dmin[r], scales: [0; K_SCALE_SIZE], qs: [0; QK_K / 2] };
        deinterleave_words(&self.qs, r, &mut b.qs);
        for (k, s) in b.scales.iter_mut().enumerate() {
            *s = self.scales[TILE_ROWS * k + r];
        }
        b
    }

    #[inline(always)]
    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let packed: [u8; K_SCALE_SIZE] = std::array::from_fn(|k| self.scales[TILE_ROWS * k + r]);
        let (sc, m) = scales_mins(&packed);
        let (d, dmin) = (self.d[r].to_f32(), self.dmin[r].to_f32());
        let out = &mut out[..QK_K];
        for p in 0..4 {
            let (d1, m1) = (d * sc[2 * p] as f32, dmin * m[2 * p] as f32);
            let (d2, m2) = (d * sc[2 * p + 1] as f32, dmin * m[2 * p + 1] as f32);
            for c in 0..8 {
                let at = ((8 * p + c) * TILE_ROWS + r) * 4;
                for (k, &byte) in self.qs[at..at + 4].iter().enumerate() {
                    out[64 * p + 4 * c + k] = d1 * (byte & 0xf) as f32 - m1;
                    out[64 * p + 32 + 4 * c + k] = d2 * (byte >> 4) as f32 - m2;
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn dot_vnni<const N: usize>(&self, x: [Codes<'_>; N], acc: &mut [[f32; TILE_ROWS]; N]) {
        use std::arch::x86_64::*;
        let q: [&[i8]; N] = x.map(|x| &x.q[..QK_K]);
        let sums: [&[i16]; N] = x.map(|x| &x.sums[..QK_K / SUM_GROUP]);
        // SAFETY: only the AVX-512 VNNI variant calls this (avx512f/bw/vl/vnni and f16c present).
        // Every load stays inside the tile's arrays (`qs` 2048 bytes read in 64-byte rows 0..32,
        // `scales` 192, `d`/`dmin` 32), `q` (256 codes each, 4 at a time), `sc`/`m` (128 bytes, 16
        // at a time); `acc` holds 16 floats per row.
        unsafe {
            let (low6, low4, top2) = (_mm512_set1_epi8(0x3f), _mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
            // Planes 0-3, 4-7 and 8-11 of the packed scales (`scale_min` for 16 rows at once).
            let z0 = _mm512_loadu_si512(self.scales.as_ptr().cast());
            let z1 = _mm512_loadu_si512(self.scales[64..].as_ptr().cast());
            let z2 = _mm512_loadu_si512(self.scales[128..].as_ptr().cast());
            let mut sc = [0u8; 128];
            let mut m = [0u8; 128];
            _mm512_storeu_si512(sc.as_mut_ptr().cast(), _mm512_and_si512(z0, low6));
            _mm512_storeu_si512(
                sc[64..].as_mut_ptr().cast(),
                _mm512_or_si512(_mm512_and_si512(z2, low4), _mm512_and_si512(_mm512_srli_epi16(z0, 2), top2)),
            );
            _mm512_storeu_si512(m.as_mut_ptr().cast(), _mm512_and_si512(z1, low6));
            _mm512_storeu_si512(
                m[64..].as_mut_ptr().cast(),
                _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16(z2, 4), low4),
                    _mm512_and_si512(_mm512_srli_epi16(z1, 2), top2),
                ),
            );
            // Group j's 16 scales (or minimums), one per 32-bit lane.
            let plane = |v: &[u8; 128], j: usize| _mm512_cvtepu8_epi32(_mm_loadu_si128(v[16 * j..].as_ptr().cast()));
            let mut isum = [_mm512_setzero_si512(); N];
            for p in 0..4 {
                // Groups 2p (low nibbles) and 2p + 1 (high nibbles).
                let mut lo = [[_mm512_setzero_si512(); 2]; N];
                let mut hi = [[_mm512_setzero_si512(); 2]; N];
                for c in 0..8 {
                    let w = _mm512_loadu_si512(self.qs[(8 * p + c) * 64..].as_ptr().cast());
                    let (w_lo, w_hi) = (_mm512_and_si512(w, low4), _mm512_and_si512(_mm512_srli_epi16(w, 4), low4));
                    // (Several rows give chains enough; one row takes two per group.)
                    let k = if N == 1 { c % 2 } else { 0 };
                    for n in 0..N {
                        lo[n][k] = _mm512_dpbusd_epi32(lo[n][k], w_lo, broadcast4(q[n], 64 * p + 4 * c));
                        hi[n][k] = _mm512_dpbusd_epi32(hi[n][k], w_hi, broadcast4(q[n], 64 * p + 32 + 4 * c));
                    }
                }
                let (s_lo, s_hi) = (plane(&sc, 2 * p), plane(&sc, 2 * p + 1));
                for n in 0..N {
                    let lo = _mm512_mullo_epi32(_mm512_add_epi32(lo[n][0], lo[n][1]), s_lo);
                    let hi = _mm512_mullo_epi32(_mm512_add_epi32(hi[n][0], hi[n][1]), s_hi);
                    isum[n] = _mm512_add_epi32(isum[n], _mm512_add_epi32(lo, hi));
                }
            }
            // Σ_j m_j · (code sum of group j): the sums fit 16 bits (32 codes of at most 127).
            let mut msum = [_mm512_setzero_si512(); N];
            for j in 0..8 {
                let mj = plane(&m, j);
                for n in 0..N {
                    let g = sums[n][2 * j] as i32 + sums[n][2 * j + 1] as i32;
                    msum[n] = _mm512_dpwssd_epi32(msum[n], mj, _mm512_set1_epi32(g & 0xffff));
                }
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(self.d.as_ptr().cast()));
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(self.dmin.as_ptr().cast()));
            for n in 0..N {
                let dx = _mm512_set1_ps(x[n].d[0]);
                let (dv, mv) = (_mm512_mul_ps(d, dx), _mm512_mul_ps(dmin, dx));
                let a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[n]), dv, _mm512_loadu_ps(acc[n].as_ptr()));
                _mm512_storeu_ps(acc[n].as_mut_ptr(), _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum[n]), mv, a));
            }
        }
    }
}

/// Q6_K tiles: the codes, then the scales as planes, then `d` (3360 bytes, 16 × 210). The codes
/// are in the order the kernel reads them, so the tile streams from memory front to back: for
/// each half `n` of the block and word `c` of it, the interleaved word `16n + c` of `ql` (values
/// `128n + 4c..` and `128n + 64 + 4c..`), word `16n + 8 + c` of `ql` (values `128n + 32 + 4c..`
/// and `128n + 96 + 4c..`), and word `8n + c` of `qh` (their top two bits), 64 bytes each.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct TileQ6K {
    codes: [u8; TILE_ROWS * (QK_K / 2 + QK_K / 4)],
    scales: [i8; TILE_ROWS * QK_K / 16],
    d: [f16; TILE_ROWS],
}

/// Where [`TileQ6K`] keeps 64-byte row `i` of the interleaved `ql` (`0..32`) and of `qh`
/// (`32..48`).
#[inline(always)]
fn q6k_row(i: usize) -> usize {
    let (n, c, part) = match i {
        0..32 => (i / 16, i % 8, (i % 16) / 8),
        _ => ((i - 32) / 8, (i - 32) % 8, 2),
    };
    ((8 * n + c) * 3 + part) * 64
}

impl TileQ6K {
    /// The interleaved `ql` then `qh` words, back in their own order.
    #[inline(always)]
    fn words(&self) -> [u8; TILE_ROWS * (QK_K / 2 + QK_K / 4)] {
        let mut words = [0u8; TILE_ROWS * (QK_K / 2 + QK_K / 4)];
        for (i, row) in words.chunks_exact_mut(64).enumerate() {
            row.copy_from_slice(&self.codes[q6k_row(i)..q6k_row(i) + 64]);
        }
        words
    }

    /// Row `r`'s block from [`TileQ6K::words`].
    #[inline(always)]
    fn row_of(&self, words: &[u8; TILE_ROWS * (QK_K / 2 + QK_K / 4)], r: usize) -> BlockQ6K {
        let mut b = BlockQ6K { ql: [0; QK_K / 2], qh: [0; QK_K / 4], scales: [0; QK_K / 16], d: self.d[r] };
        deinterleave_words(&words[..TILE_ROWS * QK_K / 2], r, &mut b.ql);
        deinterleave_words(&words[TILE_ROWS * QK_K / 2..], r, &mut b.qh);
        for (g, s) in b.scales.iter_mut().enumerate() {
            *s = self.scales[TILE_ROWS * g + r];
        }
        b
    }
}

impl Tile for TileQ6K {
    type Block = BlockQ6K;

    fn pack(rows: &[BlockQ6K; TILE_ROWS]) -> TileQ6K {
        let mut t = TileQ6K {
            codes: [0; TILE_ROWS * (QK_K / 2 + QK_K / 4)],
            scales: [0; TILE_ROWS * QK_K / 16],
            d: [f16::ZERO; TILE_ROWS],
        };
        let mut words = [0u8; TILE_ROWS * (QK_K / 2 + QK_K / 4)];
        for (r, b) in rows.iter().enumerate() {
            interleave_words(&mut words[..TILE_ROWS * QK_K / 2], r, &b.ql);
            interleave_words(&mut words[TILE_ROWS * QK_K / 2..], r, &b.qh);
            for (g, &s) in b.scales.iter().enumerate() {
                t.scales[TILE_ROWS * g + r] = s;
            }
            t.d[r] = b.d;
        }
        for (i, row) in words.chunks_exact(64).enumerate() {
            t.codes[q6k_row(i)..q6k_row(i) + 64].copy_from_slice(row);
        }
        t
    }

    #[inline(always)]
    fn unpack(&self, r: usize) -> BlockQ6K {
        self.row_of(&self.words(), r)
    }

    #[inline(always)]
    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let d = self.d[r].to_f32();
        let out = &mut out[..QK_K];
        for n in 0..2 {
            for c in 0..8 {
                let row = |i: usize| &self.codes[64 * (3 * (8 * n + c) + i) + 4 * r..][..4];
                let (lo, hi, top) = (row(0), row(1), row(2));
                for i in 0..4 {
                    let codes = [
                        (lo[i] & 0xf) | ((top[i] & 3) << 4),
                        (hi[i] & 0xf) | (((top[i] >> 2) & 3) << 4),
                        (lo[i] >> 4) | (((top[i] >> 4) & 3) << 4),
                        (hi[i] >> 4) | (((top[i] >> 6) & 3) << 4),
                    ];
                    for (k, &code) in codes.iter().enumerate() {
                        let v = 128 * n + 32 * k + 4 * c + i;
                        out[v] = d * self.scales[TILE_ROWS * (v / 16) + r] as f32 * (code as i32 - 32) as f32;
                    }
                }
            }
        }
    }

    #[inline(always)]
    fn unpack_all(&self) -> [BlockQ6K; TILE_ROWS] {
        let words = self.words();
        let mut all = [self.row_of(&words, 0); TILE_ROWS];
        for (r, block) in all.iter_mut().enumerate().skip(1) {
            *block = self.row_of(&words, r);
        }
        all
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn dot_vnni<const N: usize>(&self, x: [Codes<'_>; N], acc: &mut [[f32; TILE_ROWS]; N]) {
        use std::arch::x86_64::*;
        let q: [&[i8]; N] = x.map(|x| &x.q[..QK_K]);
        let sums: [&[i16]; N] = x.map(|x| &x.sums[..QK_K / SUM_GROUP]);
        // SAFETY: only the AVX-512 VNNI variant calls this (avx512f/bw/vl/vnni and f16c present).
        // Loads stay inside `codes` (64-byte rows 0..48), `scales` (16 bytes per group 0..16),
        // `d` (32 bytes) and `q` (256 codes each); `acc` holds 16 floats per row.
        unsafe {
            let row = |i: usize| _mm512_loadu_si512(self.codes[64 * i..].as_ptr().cast());
            let (low4, top2) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
            let mut isum = [_mm512_setzero_si512(); N];
            for half in 0..2 {
                for h in 0..2 {
                    // Code kind k of this half is values 128·half + 32k + 0..32; words 4h..4h + 4
                    // of it are scale group 8·half + 2k + h, one accumulator per row, started at
                    // −32·(code sum) for the offset.
                    let group = |k: usize| 8 * half + 2 * k + h;
                    let mut a: [[__m512i; 4]; N] = std::array::from_fn(|n| {
                        std::array::from_fn(|k| _mm512_set1_epi32(-32 * sums[n][group(k)] as i32))
                    });
                    for c in 4 * h..4 * h + 4 {
                        let i = 3 * (8 * half + c);
                        let (lo, hi, top) = (row(i), row(i + 1), row(i + 2));
                        let codes = [
                            _mm512_or_si512(
                                _mm512_and_si512(lo, low4),
                                _mm512_and_si512(_mm512_slli_epi16(top, 4), top2),
                            ),
                            _mm512_or_si512(
                                _mm512_and_si512(hi, low4),
                                _mm512_and_si512(_mm512_slli_epi16(top, 2), top2),
                            ),
                            _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi16(lo, 4), low4),
                                _mm512_and_si512(top, top2),
                            ),
                            _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi16(hi, 4), low4),
                                _mm512_and_si512(_mm512_srli_epi16(top, 2), top2),
                            ),
                        ];
                        for n in 0..N {
                            for (k, &code) in codes.iter().enumerate() {
                                a[n][k] =
                                    _mm512_dpbusd_epi32(a[n][k], code, broadcast4(q[n], 128 * half + 32 * k + 4 * c));
                            }
                        }
                    }
                    let scales: [__m512i; 4] = std::array::from_fn(|k| {
                        _mm512_cvtepi8_epi32(_mm_loadu_si128(self.scales[16 * group(k)..].as_ptr().cast()))
                    });
                    for (sum, parts) in isum.iter_mut().zip(&a) {
                        for (&part, &s) in parts.iter().zip(&scales) {
                            *sum = _mm512_add_epi32(*sum, _mm512_mullo_epi32(part, s));
                        }
                    }
                }
            }
            for n in 0..N {
                add_scaled_sums(&mut acc[n], isum[n], &self.d, x[n].d[0]);
            }
        }
    }
}

/// Q8_0 tiles: codes plus 128 as interleaved words, then `d` (544 bytes, 16 × 34).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct TileQ8_0 {
    qs: [u8; TILE_ROWS * QK8_0],
    d: [f16; TILE_ROWS],
}

impl Tile for TileQ8_0 {
    type Block = BlockQ8_0;

    fn pack(rows: &[BlockQ8_0; TILE_ROWS]) -> TileQ8_0 {
        let mut t = TileQ8_0 { qs: [0; TILE_ROWS * QK8_0], d: [f16::ZERO; TILE_ROWS] };
        for (r, b) in rows.iter().enumerate() {
            let flipped: [u8; QK8_0] = std::array::from_fn(|i| b.qs[i] as u8 ^ 0x80);
            interleave_words(&mut t.qs, r, &flipped);
            t.d[r] = b.d;
        }
        t
    }

    #[inline(always)]
    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let d = self.d[r].to_f32();
        for j in 0..QK8_0 / 4 {
            let at = (TILE_ROWS * j + r) * 4;
            for (k, &code) in self.qs[at..at + 4].iter().enumerate() {
                out[4 * j + k] = (code ^ 0x80) as i8 as f32 * d;
            }
        }
    }

    #[inline(always)]
    fn unpack(&self, r: usize) -> BlockQ8_0 {
        let mut flipped = [0u8; QK8_0];
        deinterleave_words(&self.qs, r, &mut flipped);
        BlockQ8_0 { d: self.d[r], qs: std::array::from_fn(|i| (flipped[i] ^ 0x80) as i8) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn dot_vnni<const N: usize>(&self, x: [Codes<'_>; N], acc: &mut [[f32; TILE_ROWS]; N]) {
        use std::arch::x86_64::*;
        let q: [&[i8]; N] = x.map(|x| &x.q[..QK8_0]);
        // SAFETY: only the AVX-512 VNNI variant calls this; loads stay inside `qs` (64-byte rows
        // 0..8), `d` (32 bytes) and `q` (32 codes each); `acc` holds 16 floats per row.
        unsafe {
            // (c + 128)·x summed, less 128 · (code sum): each row's accumulator starts there.
            let mut a: [[__m512i; 2]; N] = std::array::from_fn(|n| {
                let sums = &x[n].sums[..QK8_0 / SUM_GROUP];
                [_mm512_set1_epi32(-128 * (sums[0] as i32 + sums[1] as i32)), _mm512_setzero_si512()]
            });
            for j in 0..8 {
                let w = _mm512_loadu_si512(self.qs[j * 64..].as_ptr().cast());
                for n in 0..N {
                    a[n][j % 2] = _mm512_dpbusd_epi32(a[n][j % 2], w, broadcast4(q[n], 4 * j));
                }
            }
            for n in 0..N {
                add_scaled_sums(&mut acc[n], _mm512_add_epi32(a[n][0], a[n][1]), &self.d, x[n].d[0]);
            }
        }
    }
}

/// Q5_0 tiles: the low four code bits as interleaved words, the fifth bits as one 64-bit mask per
/// register of codes, then `d` (352 bytes, 16 × 22).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct TileQ5_0 {
    qs: [u8; TILE_ROWS * 16],
    /// Mask `m` (bytes `8m..8m + 8`, little-endian) has bit `4r + i` set when value `4m + i` of
    /// row `r` has its fifth bit: the bytes of code register `m` (`m < 4`: low nibbles of word
    /// `m`; `m ≥ 4`: high nibbles of word `m − 4`) in order.
    qh: [u8; TILE_ROWS * 4],
    d: [f16; TILE_ROWS],
}

impl Tile for TileQ5_0 {
    type Block = BlockQ5_0;

    fn pack(rows: &[BlockQ5_0; TILE_ROWS]) -> TileQ5_0 {
        let mut t = TileQ5_0 { qs: [0; TILE_ROWS * 16], qh: [0; TILE_ROWS * 4], d: [f16::ZERO; TILE_ROWS] };
        let mut masks = [0u64; 8];
        for (r, b) in rows.iter().enumerate() {
            interleave_words(&mut t.qs, r, &b.qs);
            let qh = u32::from_le_bytes(b.qh);
            for (m, mask) in masks.iter_mut().enumerate() {
                *mask |= (((qh >> (4 * m)) & 0xf) as u64) << (4 * r);
            }
            t.d[r] = b.d;
        }
        for (m, mask) in masks.iter().enumerate() {
            t.qh[8 * m..8 * m + 8].copy_from_slice(&mask.to_le_bytes());
        }
        t
    }

    #[inline(always)]
    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let d = self.d[r].to_f32();
        for c in 0..4 {
            let at = (TILE_ROWS * c + r) * 4;
            let fifth = |m: usize| (self.qh[8 * m + r / 2] >> (4 * (r % 2))) & 0xf;
            let (lo_bits, hi_bits) = (fifth(c), fifth(4 + c));
            for (k, &byte) in self.qs[at..at + 4].iter().enumerate() {
                let lo = (byte & 0xf) | (((lo_bits >> k) & 1) << 4);
                let hi = (byte >> 4) | (((hi_bits >> k) & 1) << 4);
                out[4 * c + k] = (lo as i32 - 16) as f32 * d;
                out[16 + 4 * c + k] = (hi as i32 - 16) as f32 * d;
            }
        }
    }

    #[inline(always)]
    fn unpack(&self, r: usize) -> BlockQ5_0 {
        let mut b = BlockQ5_0 { d: self.d[r], qh: [0; 4], qs: [0; 16] };
        deinterleave_words(&self.qs, r, &mut b.qs);
        let mut qh = 0u32;
        for m in 0..8 {
            let mask = u64::from_le_bytes(std::array::from_fn(|i| self.qh[8 * m + i]));
            qh |= (((mask >> (4 * r)) & 0xf) as u32) << (4 * m);
        }
        b.qh = qh.to_le_bytes();
        b
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn dot_vnni<const N: usize>(&self, x: [Codes<'_>; N], acc: &mut [[f32; TILE_ROWS]; N]) {
        use std::arch::x86_64::*;
        let q: [&[i8]; N] = x.map(|x| &x.q[..32]);
        // SAFETY: only the AVX-512 VNNI variant calls this; loads stay inside `qs` (64-byte rows
        // 0..4), `qh` (8-byte masks 0..8), `d` (32 bytes) and `q` (32 codes each); `acc` holds 16
        // floats per row.
        unsafe {
            let mask = |m: usize| self.qh.as_ptr().add(8 * m).cast::<u64>().read_unaligned();
            let (low4, fifth) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x10));
            // Codes 0..32 stand for code − 16: each row's accumulator starts at −16 · (code sum).
            let mut a: [[__m512i; 2]; N] = std::array::from_fn(|n| {
                let sums = &x[n].sums[..2];
                [_mm512_set1_epi32(-16 * (sums[0] as i32 + sums[1] as i32)), _mm512_setzero_si512()]
            });
            for c in 0..4 {
                let w = _mm512_loadu_si512(self.qs[c * 64..].as_ptr().cast());
                let lo = _mm512_and_si512(w, low4);
                let hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
                let lo = _mm512_mask_add_epi8(lo, mask(c), lo, fifth);
                let hi = _mm512_mask_add_epi8(hi, mask(4 + c), hi, fifth);
                for n in 0..N {
                    a[n][0] = _mm512_dpbusd_epi32(a[n][0], lo, broadcast4(q[n], 4 * c));
                    a[n][1] = _mm512_dpbusd_epi32(a[n][1], hi, broadcast4(q[n], 16 + 4 * c));
                }
            }
            for n in 0..N {
                add_scaled_sums(&mut acc[n], _mm512_add_epi32(a[n][0], a[n][1]), &self.d, x[n].d[0]);
            }
        }
    }
}

/// An `(out, in)` matrix as tiles: tile row `R` (rows `16R..16R + 16`) is tiles
/// `R·per_row..(R + 1)·per_row`, one per block column.
#[derive(Debug, Clone)]
pub struct Tiles<T: Tile>(pub Vec<T>);

impl<T: Tile> Tiles<T> {
    /// Tiles the row-major blocks of a matrix with rows of `n_in` values; `None` unless the row
    /// count is a multiple of 16.
    pub fn pack(blocks: &[T::Block], n_in: usize) -> Option<Tiles<T>> {
        let per_row = n_in / T::Block::VALUES;
        if per_row == 0 || blocks.len() % (per_row * TILE_ROWS) != 0 {
            return None;
        }
        let mut tiles = Vec::with_capacity(blocks.len() / TILE_ROWS);
        for rows in blocks.chunks_exact(per_row * TILE_ROWS) {
            for b in 0..per_row {
                tiles.push(T::pack(&std::array::from_fn(|r| rows[r * per_row + b])));
            }
        }
        Some(Tiles(tiles))
    }

    /// Block `b` of row `row` (rows of `per_row` blocks).
    #[inline(always)]
    pub fn block(&self, row: usize, b: usize, per_row: usize) -> T::Block {
        self.0[row / TILE_ROWS * per_row + b].unpack(row % TILE_ROWS)
    }

    /// `y (t, out) = x (t, in) · Wᵀ`, as [`super::quant::matvec_quant`] computes it.
    pub fn matvec(&self, x: &[f32], t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
        let vals = T::Block::VALUES;
        assert!(n_in.is_multiple_of(vals), "matvec: input size is not a multiple of the block");
        assert!(x.len() == t * n_in && self.0.len() * TILE_ROWS * vals == n_out * n_in, "matvec: shapes disagree");
        let xq = QuantizedRows::new(x, T::Block::ACT_GROUP);
        let simd = Simd::detect();
        let per_row = n_in / vals;
        by_output_rows(ROWS_PER_TASK, t, n_out, |first, n, out| {
            let tiles = &self.0[first / TILE_ROWS * per_row..(first + n) / TILE_ROWS * per_row];
            tile_rows(simd, &xq, tiles, t, n_in, out)
        })
    }
}

/// `out (rows, t) = rows · x (t, in)ᵀ` for whole tile rows, compiled for the chosen instruction set.
pub(crate) fn tile_rows<T: Tile>(simd: Simd, x: &QuantizedRows, tiles: &[T], t: usize, n_in: usize, out: &mut [f32]) {
    assert_eq!(x.group, T::Block::ACT_GROUP, "tile_rows: activations quantized for another format");
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    unsafe fn avx512_vnni<T: Tile>(x: &QuantizedRows, tiles: &[T], t: usize, n_in: usize, out: &mut [f32]) {
        tile_rows_body::<T, AVX512_VNNI>(x, tiles, t, n_in, out)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    unsafe fn avx512<T: Tile>(x: &QuantizedRows, tiles: &[T], t: usize, n_in: usize, out: &mut [f32]) {
        tile_rows_body::<T, AVX512>(x, tiles, t, n_in, out)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<T: Tile>(x: &QuantizedRows, tiles: &[T], t: usize, n_in: usize, out: &mut [f32]) {
        tile_rows_body::<T, AVX2>(x, tiles, t, n_in, out)
    }
    match simd {
        // SAFETY: `Simd::detect` and `Simd::available` only return a variant whose features the
        // running CPU has.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512Vnni => unsafe { avx512_vnni(x, tiles, t, n_in, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { avx512(x, tiles, t, n_in, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2(x, tiles, t, n_in, out) },
        _ => tile_rows_body::<T, PORTABLE>(x, tiles, t, n_in, out),
    }
}

#[inline(always)]
fn tile_rows_body<T: Tile, const ISA: u8>(x: &QuantizedRows, tiles: &[T], t: usize, n_in: usize, out: &mut [f32]) {
    let vals = T::Block::VALUES;
    let per_row = n_in / vals;
    let (scales_per_block, sums_per_block) = (vals / T::Block::ACT_GROUP, vals / SUM_GROUP);
    // Activation row `ti`'s codes for block column `b`.
    let codes = |ti: usize, b: usize| {
        let at = ti * n_in + b * vals;
        Codes {
            q: &x.q[at..at + vals],
            d: &x.d[at / T::Block::ACT_GROUP..at / T::Block::ACT_GROUP + scales_per_block],
            sums: &x.sums[at / SUM_GROUP..at / SUM_GROUP + sums_per_block],
        }
    };
    for (row_tiles, y) in tiles.chunks_exact(per_row).zip(out.chunks_mut(TILE_ROWS * t)) {
        // Up to ACT_ROWS activation rows per pass over the tile row, so that each tile's codes
        // are unpacked once for all of them: prefill's many rows in passes of 4, and a decode
        // step's 2 or 3 tokens of one expert in one pass rather than one pass each (the tile row
        // itself, 16 rows by `n_in`, stays in cache between passes). The first pass streams the
        // weights from memory, fetching ahead.
        #[cfg(target_arch = "x86_64")]
        if ISA == super::quant::AVX512_VNNI {
            let mut ti = 0;
            while ti < t {
                let (first, y) = (ti == 0, &mut *y);
                ti += match t - ti {
                    1 => vnni_pass::<T, 1>(row_tiles, &codes, ti, first, y, t),
                    2 => vnni_pass::<T, 2>(row_tiles, &codes, ti, first, y, t),
                    3 => vnni_pass::<T, 3>(row_tiles, &codes, ti, first, y, t),
                    _ => vnni_pass::<T, ACT_ROWS>(row_tiles, &codes, ti, first, y, t),
                };
            }
            continue;
        }
        for ti in 0..t {
            let mut acc = [0f32; TILE_ROWS];
            for (b, tile) in row_tiles.iter().enumerate() {
                let x = codes(ti, b);
                // Other variants (tested, not used: matrices are tiled only for VNNI) take the
                // row kernel on each unpacked block.
                for (r, a) in acc.iter_mut().enumerate() {
                    let (mut lanes, mut extra) = ([0f32; LANES], 0f32);
                    tile.unpack(r).dot::<ISA>(x.q, x.d, x.sums, &mut lanes, &mut extra);
                    *a += sum_tree(lanes) + extra;
                }
            }
            for (r, &a) in acc.iter().enumerate() {
                y[r * t + ti] = a;
            }
        }
    }
}

/// One pass of the VNNI kernel over a tile row for activation rows `ti..ti + N` into their
/// columns of `y (16, t)`; `first`: the pass that reads the tile row from memory. Returns `N`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn vnni_pass<'a, T: Tile, const N: usize>(
    row_tiles: &[T],
    codes: &impl Fn(usize, usize) -> Codes<'a>,
    ti: usize,
    first: bool,
    y: &mut [f32],
    t: usize,
) -> usize {
    let mut acc = [[0f32; TILE_ROWS]; N];
    for (b, tile) in row_tiles.iter().enumerate() {
        if first {
            prefetch_ahead(tile);
        }
        let mut x = [codes(ti, b); N];
        for (n, x) in x.iter_mut().enumerate().skip(1) {
            *x = codes(ti + n, b);
        }
        tile.dot_vnni(x, &mut acc);
    }
    for (n, acc) in acc.iter().enumerate() {
        for (r, &a) in acc.iter().enumerate() {
            y[r * t + ti + n] = a;
        }
    }
    N
}

/// Asks for the lines of the tile [`PREFETCH_BYTES`] past `tile` (the decode product's stream, as
/// in the bf16 product: the hardware's prefetcher stops at each 4 KiB page).
#[inline(always)]
fn prefetch_ahead<T>(tile: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = (tile as *const T).cast::<i8>().wrapping_add(PREFETCH_BYTES);
        for line in (0..std::mem::size_of::<T>()).step_by(64) {
            // SAFETY: a prefetch is a hint that never faults, wherever it points; the pointer is
            // formed by wrapping arithmetic.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = tile;
}

/// Activation rows that one pass over a tile row multiplies at once (prefill).
const ACT_ROWS: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::kquant::tests::random_blocks;
    use crate::kernels::matvec::tests::random;
    use crate::kernels::quant::matvec_quant_reference;
    use crate::kernels::quant::tests::assert_close_rel;

    fn check<T: Tile>()
    where
        T::Block: PartialEq,
    {
        assert_eq!(
            std::mem::size_of::<T>(),
            TILE_ROWS * std::mem::size_of::<T::Block>(),
            "{}: a tile is 16 blocks",
            T::Block::NAME
        );
        let k = T::Block::VALUES;
        let sizes =
            [(1, k, 16), (1, 3 * k, 48), (2, 2 * k, 16), (3, 2 * k, 32), (6, k, 32), (7, 2 * k, 16), (16, 5 * k, 64)];
        for (t, n_in, n_out) in sizes {
            let blocks: Vec<T::Block> = random_blocks(&random(n_out * n_in, 3));
            let tiles = Tiles::<T>::pack(&blocks, n_in).expect("16-row multiple");
            let per_row = n_in / k;
            for row in 0..n_out {
                for b in 0..per_row {
                    let (got, want) = (tiles.block(row, b, per_row), blocks[row * per_row + b]);
                    assert!(got == want, "{} row {row} block {b}: unpack(pack) changed the block", T::Block::NAME);
                    let (mut got_values, mut want_values) = (vec![0f32; k], vec![0f32; k]);
                    tiles.0[row / TILE_ROWS * per_row + b].dequantize_row(row % TILE_ROWS, &mut got_values);
                    want.dequantize(&mut want_values);
                    assert_eq!(got_values, want_values, "{} row {row} block {b}: dequantize_row", T::Block::NAME);
                    let tile = &tiles.0[row / TILE_ROWS * per_row + b];
                    let want_bf16: Vec<half::bf16> = want_values.iter().map(|&v| half::bf16::from_f32(v)).collect();
                    let mut got_bf16 = vec![half::bf16::ZERO; k];
                    row_bf16(tile, row % TILE_ROWS, &mut got_bf16);
                    assert_eq!(got_bf16, want_bf16, "{} row {row} block {b}: bf16", T::Block::NAME);
                    let all = tiles.0[row / TILE_ROWS * per_row + b].unpack_all();
                    assert!(all[row % TILE_ROWS] == want, "{} row {row} block {b}: unpack_all", T::Block::NAME);
                }
            }
            let x = random(t * n_in, 4);
            let want = matvec_quant_reference(&x, &blocks, t, n_in, n_out);
            let what = format!("{} tiles t {t} in {n_in} out {n_out}", T::Block::NAME);
            assert_close_rel(&what, &tiles.matvec(&x, t, n_in, n_out), &want);
            let xq = QuantizedRows::new(&x, T::Block::ACT_GROUP);
            for simd in Simd::available() {
                let mut out = vec![0f32; n_out * t];
                tile_rows(simd, &xq, &tiles.0, t, n_in, &mut out);
                let y: Vec<f32> = (0..t * n_out).map(|i| out[(i % n_out) * t + i / n_out]).collect();
                assert_close_rel(&format!("{what} {simd:?}"), &y, &want);
                // Several rows per pass give each row exactly what it gets alone.
                for ti in 0..t {
                    let mut alone = vec![0f32; n_out];
                    let xi = QuantizedRows::new(&x[ti * n_in..(ti + 1) * n_in], T::Block::ACT_GROUP);
                    tile_rows(simd, &xi, &tiles.0, 1, n_in, &mut alone);
                    assert_eq!(&y[ti * n_out..(ti + 1) * n_out], &alone[..], "{what} {simd:?}: row {ti} alone");
                }
            }
        }
        assert!(Tiles::<T>::pack(&random_blocks::<T::Block>(&random(8 * k, 1)), k).is_none(), "8 rows do not tile");
    }

    #[test]
    fn tiled_kernels_match_the_reference_in_every_variant() {
        check::<TileQ4K>();
        check::<TileQ6K>();
        check::<TileQ8_0>();
        check::<TileQ5_0>();
    }
}
