//! The arithmetic ceilings of the decode attention on this CPU: how many multiply-adds per second
//! `vpdpbusd` (8-bit, the int8 cache's kernel), `vdpbf16ps` and `vfmadd231ps` (the two ways the
//! bf16 kernels multiply bf16 pairs) sustain, measured on every thread of the pool at once with
//! 16 independent chains each.
//!
//! At depth the attention costs `heads × (2 d_c + d_r)` multiply-adds per cached row and layer
//! whatever the cache's bytes, so its time has this floor as the weights' has the bandwidth one.

use rayon::prelude::*;

use super::matvec::PREFETCH_BYTES;

/// Measured throughputs in G multiply-adds per second, all threads together; `None` where the
/// CPU lacks the instruction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DotPeaks {
    /// `vpdpbusd` on 512-bit registers (64 multiply-adds each).
    pub int8_gmac_s: Option<f64>,
    /// `vdpbf16ps` on 512-bit registers (32 each).
    pub bf16_gmac_s: Option<f64>,
    /// `vfmadd231ps` on 512-bit registers (16 each): what the bf16 kernels' other way of
    /// multiplying bf16 pairs runs on ([`super::gemm::bf16_by_fma`]).
    pub f32_gmac_s: Option<f64>,
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
            on_every_thread(32.0, || unsafe { x86::bf16_chains(ROUNDS) })
        });
        let f32 = is_x86_feature_detected!("avx512f").then(|| {
            // SAFETY: the CPU has AVX-512 F.
            on_every_thread(16.0, || unsafe { x86::fma_chains(ROUNDS) })
        });
        DotPeaks { int8_gmac_s: int8, bf16_gmac_s: bf16, f32_gmac_s: f32 }
    }
    #[cfg(not(target_arch = "x86_64"))]
    DotPeaks { int8_gmac_s: None, bf16_gmac_s: None, f32_gmac_s: None }
}

/// Multiply-adds per second of `vdpbf16ps` against `vfmadd231ps` on the calling thread, in a
/// quick measurement (about 15 ms: the best of three short runs each, in turns, after one of
/// each to bring the core to its AVX-512 clock): `(bf16, f32)`, `None` without AVX-512 BF16.
pub fn bf16_against_fma() -> Option<(f64, f64)> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512f") {
        const SHORT: usize = 250_000;
        let rate = |macs: f64, run: &dyn Fn() -> f32| {
            let start = std::time::Instant::now();
            std::hint::black_box(run());
            16.0 * SHORT as f64 * macs / start.elapsed().as_secs_f64() / 1e9
        };
        let (mut bf16, mut f32) = (0f64, 0f64);
        for round in 0..4 {
            if round == 0 {
                // Warm-up: the first wide instructions run slowly while the clock settles.
                // SAFETY: the CPU has AVX-512 F and BF16 (checked above).
                let _ = (
                    rate(32.0, &|| unsafe { x86::bf16_chains(SHORT) }),
                    rate(16.0, &|| unsafe { x86::fma_chains(SHORT) }),
                );
                continue;
            }
            // SAFETY: the CPU has AVX-512 F and BF16 (checked above).
            bf16 = bf16.max(rate(32.0, &|| unsafe { x86::bf16_chains(SHORT) }));
            f32 = f32.max(rate(16.0, &|| unsafe { x86::fma_chains(SHORT) }));
        }
        return Some((bf16, f32));
    }
    None
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

/// The read bandwidth of memory in GB/s, all threads of the pool together: the median of five
/// passes over a 512 MiB buffer (on huge pages where the kernel grants them, as the weights are)
/// split in one contiguous share per thread, each read by the loop the decode products stream
/// their weights with (64-byte loads, a prefetch [`PREFETCH_BYTES`] ahead, independent sums).
///
/// A plain summing loop without the prefetch read 16-21 GB/s on a Xeon family 6 model 207
/// (2 threads) in minutes where this one read 24-31: a roofline taken from it credited the
/// products with more than 100% of the machine.
pub fn read_bandwidth_gb_s() -> f64 {
    const BYTES: usize = 512 << 20;
    let n = BYTES / 4;
    let mut buffer: Vec<f32> = Vec::with_capacity(n);
    crate::weights::advise_huge_pages(buffer.as_mut_ptr().cast(), BYTES);
    buffer.extend((0..n).map(|i| (i % 1024) as f32));
    let threads = rayon::current_num_threads().max(1);
    let share = n.div_ceil(threads).next_multiple_of(16);
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let start = std::time::Instant::now();
            let sum: f32 = buffer.par_chunks(share).with_max_len(1).map(read_sum).sum();
            std::hint::black_box(sum);
            BYTES as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// The sum of `v`, read as [`read_bandwidth_gb_s`] describes (AVX-512), or by the portable loop.
fn read_sum(v: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F.
        return unsafe { x86::read_sum(v) };
    }
    super::rows::sum_lanes(v)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{PREFETCH_BYTES, ROUNDS};

    /// The sum of `v` by four chains of 16-lane adds over 64-byte loads, with a prefetch
    /// `PREFETCH_BYTES` ahead.
    ///
    /// # Safety
    /// AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn read_sum(v: &[f32]) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut lines = v.chunks_exact(64);
        for line in lines.by_ref() {
            let p = line.as_ptr();
            // SAFETY: `line` holds 64 floats (four 64-byte loads); the prefetch is a hint that may
            // point past `v` and never faults.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(PREFETCH_BYTES));
                _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(PREFETCH_BYTES + 64));
                _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(PREFETCH_BYTES + 128));
                _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(PREFETCH_BYTES + 192));
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_add_ps(*a, _mm512_loadu_ps(p.add(16 * k)));
                }
            }
        }
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(sum) + lines.remainder().iter().sum::<f32>()
    }

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
    pub unsafe fn bf16_chains(rounds: usize) -> f32 {
        let ones = std::hint::black_box(_mm512_set1_epi16(0x3f80));
        // SAFETY: a bit-for-bit reinterpretation of 512 bits.
        let v = unsafe { std::mem::transmute::<__m512i, __m512bh>(ones) };
        let mut acc = [_mm512_setzero_ps(); 16];
        for _ in 0..rounds {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, v, v);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }

    /// 16 chains of `vfmadd231ps`.
    ///
    /// # Safety
    /// AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_chains(rounds: usize) -> f32 {
        let (a, b) = (std::hint::black_box(_mm512_set1_ps(1.0)), std::hint::black_box(_mm512_set1_ps(0.5)));
        let mut acc = [_mm512_setzero_ps(); 16];
        for _ in 0..rounds {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(a, b, *x);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_read_probe_sums_every_value() {
        // 15 whole runs of 64 values and a remainder of 40; small integers add exactly in any order.
        let v: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
        assert_eq!(super::read_sum(&v), v.iter().sum::<f32>());
    }
}
