//! The arithmetic ceilings of the decode attention on this CPU: how many multiply-adds per second
//! `vpdpbusd` (8-bit, the int8 cache's kernel) and `vdpbf16ps` (bf16, the bf16 cache's fused
//! kernel) sustain, measured on every thread of the pool at once with 16 independent chains each.
//!
//! At depth the attention costs `heads × (2 d_c + d_r)` multiply-adds per cached row and layer
//! whatever the cache's bytes, so its time has this floor as the weights' has the bandwidth one.

/// Measured throughputs in G multiply-adds per second, all threads together; `None` where the
/// CPU lacks the instruction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DotPeaks {
    /// `vpdpbusd` on 512-bit registers (64 multiply-adds each).
    pub int8_gmac_s: Option<f64>,
    /// `vdpbf16ps` on 512-bit registers (32 each).
    pub bf16_gmac_s: Option<f64>,
}

/// Instructions per chain per measurement: about 45 ms at one instruction per cycle.
const ROUNDS: usize = 10_000_000;

/// Measures both throughputs (about 0.1 s).
pub fn dot_peaks() -> DotPeaks {
    #[cfg(target_arch = "x86_64")]
    {
        let int8 = is_x86_feature_detected!("avx512vnni").then(|| {
            // SAFETY: the CPU has AVX-512 VNNI (and F, which VNNI implies).
            on_every_thread(64.0, || unsafe { x86::int8_chains() })
        });
        let bf16 = is_x86_feature_detected!("avx512bf16").then(|| {
            // SAFETY: the CPU has AVX-512 BF16.
            on_every_thread(32.0, || unsafe { x86::bf16_chains() })
        });
        DotPeaks { int8_gmac_s: int8, bf16_gmac_s: bf16 }
    }
    #[cfg(not(target_arch = "x86_64"))]
    DotPeaks { int8_gmac_s: None, bf16_gmac_s: None }
}

/// G multiply-adds per second of `run` (16 chains of `ROUNDS` instructions of `macs` each) on
/// every thread of the pool at once, summed.
fn on_every_thread<R>(macs: f64, run: impl Fn() -> R + Sync) -> f64 {
    rayon::broadcast(|_| {
        let start = std::time::Instant::now();
        std::hint::black_box(run());
        16.0 * ROUNDS as f64 * macs / start.elapsed().as_secs_f64() / 1e9
    })
    .into_iter()
    .sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::ROUNDS;

    /// 16 chains of `vpdpbusd`.
    ///
    /// # Safety
    /// AVX-512 F and VNNI.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn int8_chains() -> i32 {
        let (a, b) = (std::hint::black_box(_mm512_set1_epi8(3)), std::hint::black_box(_mm512_set1_epi8(5)));
        let mut acc = [_mm512_setzero_si512(); 16];
        for _ in 0..ROUNDS {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_epi32(x)).fold(0, i32::wrapping_add)
    }

    /// 16 chains of `vdpbf16ps`.
    ///
    /// # Safety
    /// AVX-512 F and BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn bf16_chains() -> f32 {
        let ones = std::hint::black_box(_mm512_set1_epi16(0x3f80));
        // SAFETY: a bit-for-bit reinterpretation of 512 bits.
        let v = unsafe { std::mem::transmute::<__m512i, __m512bh>(ones) };
        let mut acc = [_mm512_setzero_ps(); 16];
        for _ in 0..ROUNDS {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, v, v);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }
}
