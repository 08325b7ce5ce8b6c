//! GGML's k-quants and the older 32-value formats, byte for byte as `ggml-common.h` lays them out.
//!
//! - Q4_K: 256 values in 8 groups of 32; 4-bit codes; each group has a 6-bit scale and a 6-bit
//!   minimum, themselves scaled by the block's f16 `d` and `dmin` (4.5 bits per weight):
//!   `w = d·sc_j·q − dmin·m_j`.
//! - Q6_K: 256 values in 16 groups of 16; 6-bit codes (low 4 bits in `ql`, high 2 in `qh`), an i8
//!   scale per group and one f16 `d` (6.56 bits per weight): `w = d·sc_j·(q − 32)`.
//! - Q5_K: Q4_K with a fifth bit per code in `qh` (5.5 bits per weight).
//! - Q4_0, Q5_0: 32 values, one f16 scale, codes offset by 8 or 16; GGUF quantizers fall back to
//!   them for rows whose length is not a multiple of 256 (V2-Lite's experts' `down_proj`).
//!
//! Every format implements [`QuantBlock`], so the decode product reads them all directly.

use half::f16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::quant::dot32_vnni;
use super::quant::{dot32_lanes, f16_scale, QuantBlock, AVX2, AVX512, AVX512_VNNI, LANES, SUM_GROUP};

/// Values per k-quant super-block.
pub const QK_K: usize = 256;
/// Bytes of the packed 6-bit scales and minimums of Q4_K / Q5_K.
pub const K_SCALE_SIZE: usize = 12;

/// GGML's `block_q4_K` (144 bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qs: [u8; QK_K / 2],
}

/// GGML's `block_q6_K` (210 bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

/// GGML's `block_q5_K` (176 bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// GGML's `block_q4_0` (18 bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; 16],
}

/// GGML's `block_q5_0` (22 bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

/// The 6-bit scale and minimum of group `j` (GGML's `get_scale_min_k4`).
#[inline(always)]
fn scale_min(j: usize, q: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// All eight 6-bit scales and minimums at once, [`scale_min`] for `j` in `0..8` on three 32-bit
/// words: scales 0-3 and minimums 0-3 are the low 6 bits of bytes 0-3 and 4-7; scales and
/// minimums 4-7 take their low 4 bits from the nibbles of bytes 8-11 and their top 2 bits from
/// the top bits of bytes 0-3 and 4-7.
#[inline(always)]
pub(crate) fn scales_mins(q: &[u8; K_SCALE_SIZE]) -> ([u8; 8], [u8; 8]) {
    let word = |i: usize| u32::from_le_bytes([q[i], q[i + 1], q[i + 2], q[i + 3]]);
    let (w0, w1, w2) = (word(0), word(4), word(8));
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    let sc_hi = (w2 & LOW4) | (((w0 >> 6) & TOP2) << 4);
    let m_hi = ((w2 >> 4) & LOW4) | (((w1 >> 6) & TOP2) << 4);
    let bytes = |lo: u32, hi: u32| {
        let (a, b) = (lo.to_le_bytes(), hi.to_le_bytes());
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
    };
    (bytes(w0 & LOW6, sc_hi), bytes(w1 & LOW6, m_hi))
}

/// Packs eight 6-bit scales and minimums the way [`scale_min`] reads them.
fn pack_scales(sc: &[u8; 8], m: &[u8; 8]) -> [u8; K_SCALE_SIZE] {
    let mut q = [0u8; K_SCALE_SIZE];
    for j in 0..4 {
        q[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 0xf) | ((m[j + 4] & 0xf) << 4);
    }
    q
}

impl QuantBlock for BlockQ4K {
    const VALUES: usize = QK_K;
    const ACT_GROUP: usize = QK_K;
    const NAME: &'static str = "Q4_K";

    #[inline(always)]
    fn dequantize(&self, out: &mut [f32]) {
        let (d, dmin) = (self.d.to_f32(), self.dmin.to_f32());
        for p in 0..4 {
            let codes = &self.qs[32 * p..32 * p + 32];
            let (sc1, m1) = scale_min(2 * p, &self.scales);
            let (sc2, m2) = scale_min(2 * p + 1, &self.scales);
            let (d1, mm1, d2, mm2) = (d * sc1 as f32, dmin * m1 as f32, d * sc2 as f32, dmin * m2 as f32);
            for l in 0..32 {
                out[64 * p + l] = d1 * (codes[l] & 0xf) as f32 - mm1;
                out[64 * p + 32 + l] = d2 * (codes[l] >> 4) as f32 - mm2;
            }
        }
    }

    #[inline(always)]
    fn dot<const ISA: u8>(&self, q: &[i8], d: &[f32], sums: &[i16], lanes: &mut [f32; LANES], extra: &mut f32) {
        let (dd, dmin) = (f16_scale::<ISA>(self.d) * d[0], f16_scale::<ISA>(self.dmin) * d[0]);
        let (sc, m) = scales_mins(&self.scales);
        let (q, sums) = (&q[..QK_K], &sums[..QK_K / SUM_GROUP]);
        #[cfg(target_arch = "x86_64")]
        if ISA >= AVX512 {
            use std::arch::x86_64::*;
            // SAFETY: AVX-512 variants only (avx512f/bw/vl present, and avx512vnni where ISA ==
            // AVX512_VNNI); every load stays inside `qs` (128 bytes), `q` (256), `sums` (16
            // i16), `sc`/`m` (8 bytes) or `PAIR_SCALES`, and `lanes` holds 16 floats.
            unsafe {
                let scales = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_loadl_epi64(sc.as_ptr().cast())));
                let low4 = _mm256_set1_epi8(0x0f);
                let mut isum = [_mm512_setzero_si512(); 2];
                for p in 0..4 {
                    // 64 values: group 2p in the low nibbles, 2p + 1 in the high ones.
                    let c = _mm256_loadu_si256(self.qs[32 * p..].as_ptr().cast());
                    let lo = _mm256_and_si256(c, low4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low4);
                    let w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                    let pairs = _mm512_maddubs_epi16(w, _mm512_loadu_si512(q[64 * p..].as_ptr().cast()));
                    let s = _mm512_permutexvar_epi16(_mm512_loadu_si512(PAIR_SCALES[p].as_ptr().cast()), scales);
                    isum[p % 2] = scaled_pairs::<ISA>(isum[p % 2], pairs, s);
                }
                finish_with_minimums(isum, sums, &m, dd, dmin, lanes);
            }
            let _ = extra;
            return;
        }
        #[cfg(target_arch = "x86_64")]
        let wide = (ISA == AVX2).then(|| self.isum_avx2(&sc, q));
        #[cfg(not(target_arch = "x86_64"))]
        let wide: Option<i32> = None;
        let isum = wide.unwrap_or_else(|| {
            let mut isum = 0i32;
            for p in 0..4 {
                let codes = &self.qs[32 * p..32 * p + 32];
                let (x_lo, x_hi) = (&q[64 * p..64 * p + 32], &q[64 * p + 32..64 * p + 64]);
                let (mut lo, mut hi) = (0i32, 0i32);
                for l in 0..32 {
                    lo += (codes[l] & 0xf) as i32 * x_lo[l] as i32;
                    hi += (codes[l] >> 4) as i32 * x_hi[l] as i32;
                }
                isum += sc[2 * p] as i32 * lo + sc[2 * p + 1] as i32 * hi;
            }
            isum
        });
        let msum: i32 = (0..8).map(|j| m[j] as i32 * (sums[2 * j] as i32 + sums[2 * j + 1] as i32)).sum();
        *extra += dd * isum as f32 - dmin * msum as f32;
    }
}

/// `vpermw` indices spreading a k-quant block's eight group scales (16-bit words) over the 32
/// pair sums of its `p`-th run of 64 values: groups `2p` and `2p + 1`, 16 words each.
static PAIR_SCALES: [[i16; 32]; 4] = {
    let mut idx = [[0i16; 32]; 4];
    let mut p = 0;
    while p < 4 {
        let mut w = 0;
        while w < 32 {
            idx[p][w] = (2 * p + w / 16) as i16;
            w += 1;
        }
        p += 1;
    }
    idx
};

/// The same for Q6_K's sixteen scales of 16 values: run `c` of 64 values takes scales `4c..4c+4`,
/// 8 words each.
static QUAD_SCALES: [[i16; 32]; 4] = {
    let mut idx = [[0i16; 32]; 4];
    let mut c = 0;
    while c < 4 {
        let mut w = 0;
        while w < 32 {
            idx[c][w] = (4 * c + w / 8) as i16;
            w += 1;
        }
        c += 1;
    }
    idx
};

/// The end of a Q4_K / Q5_K block: `lanes += dd · Σ isum − dmin · Σ_j m_j · (code sum of group
/// j)`, the two chains of scaled products added first and the group sums made from the sums of 16.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn finish_with_minimums(
    isum: [std::arch::x86_64::__m512i; 2],
    sums: &[i16],
    m: &[u8; 8],
    dd: f32,
    dmin: f32,
    lanes: &mut [f32; LANES],
) {
    use std::arch::x86_64::*;
    let sums = &sums[..16];
    // SAFETY: called only from the AVX-512 variants' k-quant code; `sums` holds 16 i16, `m` 8
    // bytes, `lanes` 16 floats.
    unsafe {
        // (Two chains of sums: the second run's products need not wait for the first's.)
        let isum = _mm512_add_epi32(isum[0], isum[1]);
        let s16 = _mm256_loadu_si256(sums.as_ptr().cast());
        let group_sums = _mm_hadd_epi16(_mm256_castsi256_si128(s16), _mm256_extracti128_si256(s16, 1));
        let mins = _mm_madd_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64(m.as_ptr().cast())), group_sums);
        let acc = _mm512_loadu_ps(lanes.as_ptr());
        let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(dd), acc);
        let acc = _mm512_fnmadd_ps(_mm512_zextps128_ps512(_mm_cvtepi32_ps(mins)), _mm512_set1_ps(dmin), acc);
        _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
    }
}

/// `acc + Σ pairs·scales` by word pairs into 32-bit lanes: one `vpdpwssd` with VNNI, else a
/// multiply-add and an add.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn scaled_pairs<const ISA: u8>(
    acc: std::arch::x86_64::__m512i,
    pairs: std::arch::x86_64::__m512i,
    scales: std::arch::x86_64::__m512i,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // SAFETY: called only from AVX-512 code (ISA >= AVX512), and `vpdpwssd` only where ISA ==
    // AVX512_VNNI, in the variant compiled for avx512vnni.
    unsafe {
        if ISA == AVX512_VNNI {
            _mm512_dpwssd_epi32(acc, pairs, scales)
        } else {
            _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, scales))
        }
    }
}

impl BlockQ4K {
    /// `Σ_g sc_g · Σ code·x` over the block, exactly the plain loops' integer, in AVX2:
    /// `vpmaddubsw` sums two products of a 4-bit code and an activation code (at most
    /// 2 · 15 · 127), `vpmaddwd` two of those times a 6-bit scale; nothing overflows.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn isum_avx2(&self, sc: &[u8; 8], q: &[i8]) -> i32 {
        use std::arch::x86_64::*;
        let q = &q[..QK_K];
        // SAFETY: called only from the AVX2 variant (avx2 present); loads read 32 bytes inside
        // `qs` (128) and `q` (256).
        unsafe {
            let low4 = _mm256_set1_epi8(0x0f);
            let mut acc = _mm256_setzero_si256();
            for p in 0..4 {
                let c = _mm256_loadu_si256(self.qs[32 * p..].as_ptr().cast());
                let (lo, hi) = (_mm256_and_si256(c, low4), _mm256_and_si256(_mm256_srli_epi16(c, 4), low4));
                let x_lo = _mm256_loadu_si256(q[64 * p..].as_ptr().cast());
                let x_hi = _mm256_loadu_si256(q[64 * p + 32..].as_ptr().cast());
                let lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x_lo), _mm256_set1_epi16(sc[2 * p] as i16));
                let hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x_hi), _mm256_set1_epi16(sc[2 * p + 1] as i16));
                acc = _mm256_add_epi32(acc, _mm256_add_epi32(lo, hi));
            }
            let mut words = [0i32; 8];
            _mm256_storeu_si256(words.as_mut_ptr().cast(), acc);
            words.iter().sum()
        }
    }
}

impl BlockQ6K {
    /// The four runs of 32 codes (0..64, stored plus 32) of half `n` of the block, values
    /// `128n + 32j..` in run `j`, as [`BlockQ6K::codes`] spells them. Only in code compiled for
    /// AVX2 (the AVX2 and AVX-512 variants).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn runs_avx2(&self, n: usize) -> [std::arch::x86_64::__m256i; 4] {
        use std::arch::x86_64::*;
        // SAFETY: the callers run only in variants compiled for avx2; the loads read 32 bytes
        // inside `ql` (128) and `qh` (64).
        unsafe {
            let (low4, top2) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30));
            let a = _mm256_loadu_si256(self.ql[64 * n..].as_ptr().cast());
            let b = _mm256_loadu_si256(self.ql[64 * n + 32..].as_ptr().cast());
            let h = _mm256_loadu_si256(self.qh[32 * n..].as_ptr().cast());
            [
                _mm256_or_si256(_mm256_and_si256(a, low4), _mm256_and_si256(_mm256_slli_epi16(h, 4), top2)),
                _mm256_or_si256(_mm256_and_si256(b, low4), _mm256_and_si256(_mm256_slli_epi16(h, 2), top2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low4), _mm256_and_si256(h, top2)),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(b, 4), low4),
                    _mm256_and_si256(_mm256_srli_epi16(h, 2), top2),
                ),
            ]
        }
    }

    /// The 6-bit codes (0..64, offset by 32) in value order.
    #[inline(always)]
    fn codes(&self) -> [i8; QK_K] {
        let mut out = [0i8; QK_K];
        for n in 0..2 {
            let (ql, qh) = (&self.ql[64 * n..64 * n + 64], &self.qh[32 * n..32 * n + 32]);
            let y = &mut out[128 * n..128 * n + 128];
            for l in 0..32 {
                y[l] = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i8 - 32;
                y[l + 32] = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                y[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                y[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            }
        }
        out
    }
}

impl BlockQ6K {
    /// `Σ_g scale_g · Σ code·x` over the block, exactly the plain loops' integer, in AVX2: each
    /// run of 32 codes (stored plus 32) against its activations by `vpmaddubsw` (pairs of at most
    /// 2 · 63 · 127), then `vpmaddwd` by the two groups' scales; the offset comes back off through
    /// the activation sums per 16.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn isum_avx2(&self, q: &[i8], sums: &[i16]) -> i32 {
        use std::arch::x86_64::*;
        let (q, sums) = (&q[..QK_K], &sums[..QK_K / 16]);
        // SAFETY: called only from the AVX2 variant (avx2 present); loads read 32 bytes inside
        // `ql` (128), `qh` (64) and `q` (256).
        unsafe {
            let mut acc = _mm256_setzero_si256();
            for n in 0..2 {
                for (j, &run) in self.runs_avx2(n).iter().enumerate() {
                    // Values 32r..32r + 32: groups 2r (low 128 bits) and 2r + 1.
                    let r = 4 * n + j;
                    let pairs = _mm256_maddubs_epi16(run, _mm256_loadu_si256(q[32 * r..].as_ptr().cast()));
                    let scales = _mm256_set_m128i(
                        _mm_set1_epi16(self.scales[2 * r + 1] as i16),
                        _mm_set1_epi16(self.scales[2 * r] as i16),
                    );
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, scales));
                }
            }
            let mut words = [0i32; 8];
            _mm256_storeu_si256(words.as_mut_ptr().cast(), acc);
            let offset: i32 = (0..QK_K / 16).map(|g| self.scales[g] as i32 * sums[g] as i32).sum();
            words.iter().sum::<i32>() - 32 * offset
        }
    }
}

impl QuantBlock for BlockQ6K {
    const VALUES: usize = QK_K;
    const ACT_GROUP: usize = QK_K;
    const NAME: &'static str = "Q6_K";

    #[inline(always)]
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (i, (o, q)) in out.iter_mut().zip(self.codes()).enumerate() {
            *o = d * self.scales[i / 16] as f32 * q as f32;
        }
    }

    #[inline(always)]
    fn dot<const ISA: u8>(&self, q: &[i8], d: &[f32], sums: &[i16], lanes: &mut [f32; LANES], extra: &mut f32) {
        let dd = f16_scale::<ISA>(self.d) * d[0];
        let (q, sums) = (&q[..QK_K], &sums[..QK_K / SUM_GROUP]);
        #[cfg(target_arch = "x86_64")]
        if ISA >= AVX512 {
            use std::arch::x86_64::*;
            // SAFETY: AVX-512 variants only (avx512f/bw/vl present, avx512vnni where ISA ==
            // AVX512_VNNI); every load reads inside `ql` (128 bytes), `qh` (64), `scales` (16),
            // `q` (256), `sums` (16 i16) or `QUAD_SCALES`, and `lanes` holds 16 floats.
            unsafe {
                let scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(self.scales.as_ptr().cast()));
                let scales512 = _mm512_castsi256_si512(scales);
                let mut isum = [_mm512_setzero_si512(); 2];
                for n in 0..2 {
                    let runs = self.runs_avx2(n);
                    for k in 0..2 {
                        let c = 2 * n + k;
                        let w = _mm512_inserti64x4(_mm512_castsi256_si512(runs[2 * k]), runs[2 * k + 1], 1);
                        let pairs = _mm512_maddubs_epi16(w, _mm512_loadu_si512(q[64 * c..].as_ptr().cast()));
                        let s = _mm512_permutexvar_epi16(_mm512_loadu_si512(QUAD_SCALES[c].as_ptr().cast()), scales512);
                        isum[k] = scaled_pairs::<ISA>(isum[k], pairs, s);
                    }
                }
                // The codes are stored plus 32: take 32 · Σ_g sc_g · (code sum of group g) back off.
                let offset = _mm256_madd_epi16(scales, _mm256_loadu_si256(sums.as_ptr().cast()));
                let isum = _mm512_add_epi32(isum[0], isum[1]);
                let isum = _mm512_sub_epi32(isum, _mm512_zextsi256_si512(_mm256_slli_epi32(offset, 5)));
                let acc = _mm512_loadu_ps(lanes.as_ptr());
                _mm512_storeu_ps(
                    lanes.as_mut_ptr(),
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(dd), acc),
                );
            }
            let _ = extra;
            return;
        }
        let _ = lanes;
        #[cfg(target_arch = "x86_64")]
        if ISA == AVX2 {
            *extra += dd * self.isum_avx2(q, sums) as f32;
            return;
        }
        let codes = self.codes();
        let mut isum = 0i32;
        for g in 0..QK_K / 16 {
            let (w, x) = (&codes[16 * g..16 * g + 16], &q[16 * g..16 * g + 16]);
            let s: i32 = w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum();
            isum += self.scales[g] as i32 * s;
        }
        let _ = sums;
        *extra += dd * isum as f32;
    }
}

impl QuantBlock for BlockQ5K {
    const VALUES: usize = QK_K;
    const ACT_GROUP: usize = QK_K;
    const NAME: &'static str = "Q5_K";

    #[inline(always)]
    fn dequantize(&self, out: &mut [f32]) {
        let (d, dmin) = (self.d.to_f32(), self.dmin.to_f32());
        for p in 0..4 {
            let codes = &self.qs[32 * p..32 * p + 32];
            let (u1, u2) = (1u8 << (2 * p), 2u8 << (2 * p));
            let (sc1, m1) = scale_min(2 * p, &self.scales);
            let (sc2, m2) = scale_min(2 * p + 1, &self.scales);
            for l in 0..32 {
                let hi1 = if self.qh[l] & u1 != 0 { 16.0 } else { 0.0 };
                let hi2 = if self.qh[l] & u2 != 0 { 16.0 } else { 0.0 };
                out[64 * p + l] = d * sc1 as f32 * ((codes[l] & 0xf) as f32 + hi1) - dmin * m1 as f32;
                out[64 * p + 32 + l] = d * sc2 as f32 * ((codes[l] >> 4) as f32 + hi2) - dmin * m2 as f32;
            }
        }
    }

    #[inline(always)]
    fn dot<const ISA: u8>(&self, q: &[i8], d: &[f32], sums: &[i16], lanes: &mut [f32; LANES], extra: &mut f32) {
        let (dd, dmin) = (f16_scale::<ISA>(self.d) * d[0], f16_scale::<ISA>(self.dmin) * d[0]);
        let (sc, m) = scales_mins(&self.scales);
        let (q, sums) = (&q[..QK_K], &sums[..QK_K / SUM_GROUP]);
        #[cfg(target_arch = "x86_64")]
        if ISA >= AVX512 {
            use std::arch::x86_64::*;
            // SAFETY: as in `BlockQ4K::dot`, plus one 32-byte load of `qh`.
            unsafe {
                let scales = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_loadl_epi64(sc.as_ptr().cast())));
                let low4 = _mm256_set1_epi8(0x0f);
                let fifth = _mm256_set1_epi8(0x10);
                let mut h = _mm256_loadu_si256(self.qh.as_ptr().cast());
                let mut isum = [_mm512_setzero_si512(); 2];
                for p in 0..4 {
                    // Bits 2p and 2p + 1 of `qh[l]` are the fifth bits of value l of groups 2p
                    // and 2p + 1; `h` is shifted down by two per run.
                    let c = _mm256_loadu_si256(self.qs[32 * p..].as_ptr().cast());
                    let lo =
                        _mm256_or_si256(_mm256_and_si256(c, low4), _mm256_and_si256(_mm256_slli_epi16(h, 4), fifth));
                    let hi = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(c, 4), low4),
                        _mm256_and_si256(_mm256_slli_epi16(h, 3), fifth),
                    );
                    h = _mm256_srli_epi16(h, 2);
                    let w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                    let pairs = _mm512_maddubs_epi16(w, _mm512_loadu_si512(q[64 * p..].as_ptr().cast()));
                    let s = _mm512_permutexvar_epi16(_mm512_loadu_si512(PAIR_SCALES[p].as_ptr().cast()), scales);
                    isum[p % 2] = scaled_pairs::<ISA>(isum[p % 2], pairs, s);
                }
                finish_with_minimums(isum, sums, &m, dd, dmin, lanes);
            }
            let _ = extra;
            return;
        }
        let mut isum = 0i32;
        for p in 0..4 {
            let codes = &self.qs[32 * p..32 * p + 32];
            let (u1, u2) = (1u8 << (2 * p), 2u8 << (2 * p));
            let (x_lo, x_hi) = (&q[64 * p..64 * p + 32], &q[64 * p + 32..64 * p + 64]);
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                let c_lo = (codes[l] & 0xf) | if self.qh[l] & u1 != 0 { 16 } else { 0 };
                let c_hi = (codes[l] >> 4) | if self.qh[l] & u2 != 0 { 16 } else { 0 };
                lo += c_lo as i32 * x_lo[l] as i32;
                hi += c_hi as i32 * x_hi[l] as i32;
            }
            isum += sc[2 * p] as i32 * lo + sc[2 * p + 1] as i32 * hi;
        }
        let msum: i32 = (0..8).map(|j| m[j] as i32 * (sums[2 * j] as i32 + sums[2 * j + 1] as i32)).sum();
        let _ = lanes;
        *extra += dd * isum as f32 - dmin * msum as f32;
    }
}

impl QuantBlock for BlockQ4_0 {
    const VALUES: usize = 32;
    const ACT_GROUP: usize = 32;
    const NAME: &'static str = "Q4_0";

    #[inline(always)]
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for j in 0..16 {
            out[j] = ((self.qs[j] & 0xf) as i32 - 8) as f32 * d;
            out[j + 16] = ((self.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }

    #[inline(always)]
    fn dot<const ISA: u8>(&self, q: &[i8], d: &[f32], sums: &[i16], lanes: &mut [f32; LANES], _extra: &mut f32) {
        let s = f16_scale::<ISA>(self.d) * d[0];
        #[cfg(target_arch = "x86_64")]
        if ISA == AVX512_VNNI {
            use std::arch::x86_64::*;
            // SAFETY: AVX-512 VNNI variant only; `qs` is 16 bytes. Codes 0..16 as u8, in value order.
            let codes = unsafe {
                let packed = _mm_loadu_si128(self.qs.as_ptr().cast());
                let mask = _mm_set1_epi8(0x0f);
                _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask), _mm_and_si128(packed, mask))
            };
            dot32_vnni(codes, q, 8, sums[0] as i32 + sums[1] as i32, s, lanes);
            return;
        }
        let _ = sums;
        let mut c = [0i8; 32];
        for j in 0..16 {
            c[j] = (self.qs[j] & 0xf) as i8 - 8;
            c[j + 16] = (self.qs[j] >> 4) as i8 - 8;
        }
        dot32_lanes::<ISA>(&c, q, s, lanes);
    }
}

impl QuantBlock for BlockQ5_0 {
    const VALUES: usize = 32;
    const ACT_GROUP: usize = 32;
    const NAME: &'static str = "Q5_0";

    #[inline(always)]
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        let qh = u32::from_le_bytes(self.qh);
        for j in 0..16 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            out[j] = (((self.qs[j] & 0xf) as u32 | h0) as i32 - 16) as f32 * d;
            out[j + 16] = (((self.qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
        }
    }

    #[inline(always)]
    fn dot<const ISA: u8>(&self, q: &[i8], d: &[f32], sums: &[i16], lanes: &mut [f32; LANES], _extra: &mut f32) {
        let qh = u32::from_le_bytes(self.qh);
        let s = f16_scale::<ISA>(self.d) * d[0];
        #[cfg(target_arch = "x86_64")]
        if ISA >= AVX512 {
            use std::arch::x86_64::*;
            // SAFETY: AVX-512 variants only (avx512f/bw/vl present, avx512vnni where ISA ==
            // AVX512_VNNI); `qs` is 16 bytes, `q` 32 codes, `lanes` 16 floats. Bit i of `qh` is
            // the fifth bit of value i.
            unsafe {
                let packed = _mm_loadu_si128(self.qs.as_ptr().cast());
                let mask = _mm_set1_epi8(0x0f);
                let lo = _mm_and_si128(packed, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
                let nibbles = _mm256_set_m128i(hi, lo);
                let fifth = _mm256_maskz_mov_epi8(qh, _mm256_set1_epi8(0x10));
                let codes = _mm256_or_si256(nibbles, fifth);
                if ISA == AVX512_VNNI {
                    dot32_vnni(codes, q, 16, sums[0] as i32 + sums[1] as i32, s, lanes);
                    return;
                }
                let w = _mm512_cvtepi8_epi16(_mm256_sub_epi8(codes, _mm256_set1_epi8(16)));
                let x = _mm512_cvtepi8_epi16(_mm256_loadu_si256(q.as_ptr().cast()));
                let p = _mm512_cvtepi32_ps(_mm512_madd_epi16(w, x));
                let acc = _mm512_loadu_ps(lanes.as_ptr());
                _mm512_storeu_ps(lanes.as_mut_ptr(), _mm512_fmadd_ps(p, _mm512_set1_ps(s), acc));
            }
            return;
        }
        let _ = sums;
        let mut c = [0i8; 32];
        #[cfg(target_arch = "x86_64")]
        if ISA == AVX2 {
            use std::arch::x86_64::*;
            // SAFETY: the AVX2 variant only (avx2 present); `qs` is 16 bytes, `c` 32. Byte j of
            // `bits` is 0xff where bit j of `qh` is set: the word `qh` in every lane, each byte
            // spread over 8 bytes, and all bits but bit j % 8 of byte j set before the compare.
            unsafe {
                let packed = _mm_loadu_si128(self.qs.as_ptr().cast());
                let nibbles = _mm256_set_m128i(
                    _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0f)),
                    _mm_and_si128(packed, _mm_set1_epi8(0x0f)),
                );
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(qh as i32),
                    _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303),
                );
                let bits = _mm256_cmpeq_epi8(
                    _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe)),
                    _mm256_set1_epi64x(-1),
                );
                let codes = _mm256_or_si256(nibbles, _mm256_and_si256(bits, _mm256_set1_epi8(0x10)));
                _mm256_storeu_si256(c.as_mut_ptr().cast(), _mm256_sub_epi8(codes, _mm256_set1_epi8(16)));
            }
            dot32_lanes::<ISA>(&c, q, s, lanes);
            return;
        }
        for j in 0..16 {
            let h0 = (((qh >> j) << 4) & 0x10) as u8;
            let h1 = ((qh >> (j + 12)) & 0x10) as u8;
            c[j] = ((self.qs[j] & 0xf) | h0) as i8 - 16;
            c[j + 16] = ((self.qs[j] >> 4) | h1) as i8 - 16;
        }
        dot32_lanes::<ISA>(&c, q, s, lanes);
    }
}

/// Quantizes rows whose length is a multiple of 256 to Q4_K.
///
/// Each group of 32 gets the scale and minimum of the least-squares fit `x ≈ s·q − m` to its
/// codes (two rounds from the min/max start), clamped so `m ≥ 0`; the eight scales and minimums
/// are then quantized to 6 bits against the block's `d` and `dmin`, and the codes recomputed with
/// them. The layout is GGML's; GGML's own quantizer searches the scales harder
/// (`make_qkx2_quants`), so its files can be a little more accurate than this on-load path.
pub fn quantize_q4_k(values: &[f32]) -> Vec<BlockQ4K> {
    assert!(values.len().is_multiple_of(QK_K), "quantize_q4_k: length is not a multiple of 256");
    values.par_chunks(QK_K).map(quantize_block_q4_k).collect()
}

fn quantize_block_q4_k(x: &[f32]) -> BlockQ4K {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for (j, group) in x.chunks_exact(32).enumerate() {
        let (s, m) = fit_group(group);
        scales[j] = s;
        mins[j] = m;
    }
    let max_scale = scales.iter().fold(0f32, |a, &b| a.max(b));
    let max_min = mins.iter().fold(0f32, |a, &b| a.max(b));
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    let (df, dminf) = (d.to_f32(), dmin.to_f32());
    let q6 = |v: f32, unit: f32| if unit > 0.0 { (v / unit).round().clamp(0.0, 63.0) as u8 } else { 0 };
    let sc: [u8; 8] = std::array::from_fn(|j| q6(scales[j], df));
    let m: [u8; 8] = std::array::from_fn(|j| q6(mins[j], dminf));
    let mut qs = [0u8; QK_K / 2];
    for p in 0..4 {
        for half in 0..2 {
            let j = 2 * p + half;
            let (step, offset) = (df * sc[j] as f32, dminf * m[j] as f32);
            for l in 0..32 {
                let v = x[32 * j + l];
                let code = if step > 0.0 { ((v + offset) / step).round().clamp(0.0, 15.0) as u8 } else { 0 };
                qs[32 * p + l] |= code << (4 * half);
            }
        }
    }
    BlockQ4K { d, dmin, scales: pack_scales(&sc, &m), qs }
}

/// `(s, m)` with `x ≈ s·q − m`, `q` in 0..=15, `m ≥ 0`.
fn fit_group(x: &[f32]) -> (f32, f32) {
    let lo = x.iter().fold(0f32, |a, &b| a.min(b)); // the minimum, never above 0
    let hi = x.iter().fold(f32::MIN, |a, &b| a.max(b));
    if hi <= lo {
        return (0.0, -lo);
    }
    let (mut s, mut m) = ((hi - lo) / 15.0, -lo);
    for _ in 0..2 {
        // Codes for the current fit, then the least-squares s and m for those codes.
        let n = x.len() as f32;
        let (mut sq, mut sqq, mut sx, mut sqx) = (0f32, 0f32, 0f32, 0f32);
        for &v in x {
            let q = ((v + m) / s).round().clamp(0.0, 15.0);
            sq += q;
            sqq += q * q;
            sx += v;
            sqx += q * v;
        }
        let det = n * sqq - sq * sq;
        if det <= 0.0 {
            break;
        }
        let s_new = (n * sqx - sq * sx) / det;
        let m_new = (s_new * sq - sx) / n;
        if s_new <= 0.0 || m_new < 0.0 {
            break;
        }
        s = s_new;
        m = m_new;
    }
    (s, m)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::matvec::tests::random;
    use crate::kernels::quant::dequantize;
    use crate::kernels::quant::tests::check_kernel;

    #[test]
    fn blocks_have_ggml_sizes() {
        assert_eq!(std::mem::size_of::<BlockQ4K>(), 144);
        assert_eq!(std::mem::size_of::<BlockQ6K>(), 210);
        assert_eq!(std::mem::size_of::<BlockQ5K>(), 176);
        assert_eq!(std::mem::size_of::<BlockQ4_0>(), 18);
        assert_eq!(std::mem::size_of::<BlockQ5_0>(), 22);
    }

    #[test]
    fn scales_pack_and_unpack() {
        let sc = [0, 1, 17, 63, 32, 48, 5, 62];
        let m = [63, 0, 40, 2, 15, 16, 33, 1];
        let packed = pack_scales(&sc, &m);
        for j in 0..8 {
            assert_eq!(scale_min(j, &packed), (sc[j], m[j]), "group {j}");
        }
        assert_eq!(scales_mins(&packed), (sc, m));
        // Every bit pattern unpacks the same both ways.
        let mut state = 7u64;
        for _ in 0..1000 {
            let q: [u8; K_SCALE_SIZE] = std::array::from_fn(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 56) as u8
            });
            let (a, b) = scales_mins(&q);
            for j in 0..8 {
                assert_eq!(scale_min(j, &q), (a[j], b[j]));
            }
        }
    }

    #[test]
    fn q4_k_round_trip_is_within_its_step() {
        let v = random(QK_K * 12, 3);
        let blocks = quantize_q4_k(&v);
        let back = dequantize(&blocks);
        let err: f32 = v.iter().zip(&back).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
        let norm: f32 = v.iter().map(|a| a * a).sum::<f32>().sqrt();
        // Uniform values in [-0.5, 0.5) with 16 levels per group: about 1/15/sqrt(12)/0.29 = 6.7%.
        assert!(err / norm < 0.08, "relative error {}", err / norm);
        assert!(quantize_q4_k(&[0.0; QK_K]).iter().all(|b| dequantize(&[*b]).iter().all(|&x| x == 0.0)));
    }

    #[test]
    fn q4_k_and_q6_k_kernels_match_their_references_in_every_variant() {
        check_kernel(quantize_q4_k);
        check_kernel(quantize_q6_k_for_tests);
    }

    /// Blocks with every code and scale bit drawn at random (any bit pattern is a valid block).
    pub(crate) fn random_blocks<B: QuantBlock>(values: &[f32]) -> Vec<B> {
        let n = values.len() / B::VALUES;
        let size = std::mem::size_of::<B>();
        let mut s = values.len() as u64 * 2654435761;
        let mut bytes: Vec<u8> = (0..n * size)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect();
        // Small finite f16 scales: every `f16` field of these blocks is `d` or `dmin`.
        for block in bytes.chunks_mut(size) {
            let offsets: &[usize] = match B::NAME {
                "Q4_K" | "Q5_K" => &[0, 2],
                "Q6_K" => &[208],
                _ => &[0],
            };
            for &o in offsets {
                let v = half::f16::from_f32(0.001 + (block[o + 1] as f32) / 25600.0).to_bits().to_le_bytes();
                block[o..o + 2].copy_from_slice(&v);
            }
        }
        // SAFETY: the block types are plain bytes and f16s; `bytes` holds `n` of them.
        (0..n).map(|i| unsafe { std::ptr::read_unaligned(bytes[i * size..].as_ptr().cast::<B>()) }).collect()
    }

    #[test]
    fn fallback_and_q5_k_kernels_match_their_references_in_every_variant() {
        check_kernel(random_blocks::<BlockQ4_0>);
        check_kernel(random_blocks::<BlockQ5_0>);
        check_kernel(random_blocks::<BlockQ5K>);
        check_kernel(random_blocks::<BlockQ4K>);
        check_kernel(random_blocks::<BlockQ6K>);
    }

    /// A Q6_K quantizer for tests only (GGUF files bring their own): max-abs scales per 16.
    fn quantize_q6_k_for_tests(values: &[f32]) -> Vec<BlockQ6K> {
        values
            .chunks(QK_K)
            .map(|x| {
                let amax: Vec<f32> = x.chunks(16).map(|g| g.iter().fold(0f32, |a, &b| a.max(b.abs()))).collect();
                let top = amax.iter().fold(0f32, |a, &b| a.max(b));
                let d = f16::from_f32(top / 31.0 / 127.0);
                let df = d.to_f32();
                let scales: [i8; 16] =
                    std::array::from_fn(|g| if df > 0.0 { (amax[g] / 31.0 / df).round().min(127.0) as i8 } else { 0 });
                let mut codes = [0u8; QK_K];
                for (i, c) in codes.iter_mut().enumerate() {
                    let step = df * scales[i / 16] as f32;
                    let q = if step > 0.0 { (x[i] / step).round().clamp(-32.0, 31.0) } else { 0.0 };
                    *c = (q as i32 + 32) as u8;
                }
                let mut b = BlockQ6K { ql: [0; 128], qh: [0; 64], scales, d };
                for n in 0..2 {
                    let c = &codes[128 * n..128 * n + 128];
                    for l in 0..32 {
                        b.ql[64 * n + l] = (c[l] & 0xf) | ((c[l + 64] & 0xf) << 4);
                        b.ql[64 * n + l + 32] = (c[l + 32] & 0xf) | ((c[l + 96] & 0xf) << 4);
                        b.qh[32 * n + l] =
                            (c[l] >> 4) | ((c[l + 32] >> 4) << 2) | ((c[l + 64] >> 4) << 4) | ((c[l + 96] >> 4) << 6);
                    }
                }
                b
            })
            .collect()
    }

    #[test]
    fn q6_k_codes_round_trip() {
        let v = random(QK_K * 2, 8);
        let back = dequantize(&quantize_q6_k_for_tests(&v));
        let err: f32 = v.iter().zip(&back).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
        let norm: f32 = v.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!(err / norm < 0.03, "relative error {}", err / norm);
    }
}
