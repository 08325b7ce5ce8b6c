//! `y = x Wᵀ` for a few rows of `x` (decode: one token per sequence) over weights stored as bf16
//! or f32 `(out, in)`, as the checkpoint has them. Each weight row is read once and converted to
//! f32 on the fly, for every row of `x` at the same time; output rows are split over threads.
//! This is the memory-bound case, where a general GEMM that packs (and converts) the whole weight
//! first costs several times the bytes that must be read. The loop is compiled three times (AVX-512,
//! AVX2 + FMA, portable) and the widest the CPU supports is chosen at run time.

use half::bf16;
use std::sync::OnceLock;

use rayon::prelude::*;

/// Most rows of `x` the kernel takes at once; callers fall back to GEMM above it.
pub const MAX_ROWS: usize = 8;

/// A weight element the kernel can widen to f32.
pub trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

const LANES: usize = 16;
const ROWS_PER_TASK: usize = 32;

/// `y (t, out) = x (t, in) · w (out, in)ᵀ` with `t <= MAX_ROWS`, f32 accumulation.
pub fn matvec<W: Widen>(x: &[f32], w: &[W], t: usize, n_in: usize, n_out: usize) -> Vec<f32> {
    assert!(t <= MAX_ROWS && x.len() == t * n_in && w.len() == n_out * n_in, "matvec: shapes disagree");
    // Transposed result (out, t): each task owns a contiguous run of output rows.
    let simd = Simd::detect();
    let mut y_t = vec![0f32; n_out * t];
    y_t.par_chunks_mut(ROWS_PER_TASK * t).enumerate().for_each(|(task, out)| {
        let first = task * ROWS_PER_TASK;
        let rows = &w[first * n_in..(first + out.len() / t) * n_in];
        simd.dot_block(x, rows, t, n_in, out);
    });
    let mut y = vec![0f32; t * n_out];
    for (o, ys) in y_t.chunks(t).enumerate() {
        for (ti, v) in ys.iter().enumerate() {
            y[ti * n_out + o] = *v;
        }
    }
    y
}

/// The widest vector instructions this CPU has, chosen once per call at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    Avx512,
    Avx2,
    Portable,
}

impl Simd {
    /// The best variant the running CPU supports (detected once).
    pub fn detect() -> Simd {
        static BEST: OnceLock<Simd> = OnceLock::new();
        *BEST.get_or_init(|| *Simd::available().last().unwrap_or(&Simd::Portable))
    }

    /// Every variant this CPU can run, narrowest first (the tests check each against the reference).
    pub fn available() -> Vec<Simd> {
        let mut variants = vec![Simd::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            let has = |features: &[bool]| features.iter().all(|&f| f);
            if has(&[is_x86_feature_detected!("avx2"), is_x86_feature_detected!("fma")]) {
                variants.push(Simd::Avx2);
            }
            let avx512 = [
                is_x86_feature_detected!("avx512f"),
                is_x86_feature_detected!("avx512bw"),
                is_x86_feature_detected!("avx512vl"),
                is_x86_feature_detected!("fma"),
            ];
            if has(&avx512) {
                variants.push(Simd::Avx512);
            }
        }
        variants
    }

    /// `out (rows, t) = rows (rows, in) · x (t, in)ᵀ`, the same loop compiled for this variant.
    fn dot_block<W: Widen>(self, x: &[f32], rows: &[W], t: usize, n_in: usize, out: &mut [f32]) {
        match self {
            // SAFETY: `detect` and `available` only return these variants when the CPU has their features.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => unsafe { dot_block_avx512(x, rows, t, n_in, out) },
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { dot_block_avx2(x, rows, t, n_in, out) },
            _ => dot_block(x, rows, t, n_in, out),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn dot_block_avx512<W: Widen>(x: &[f32], rows: &[W], t: usize, n_in: usize, out: &mut [f32]) {
    dot_block(x, rows, t, n_in, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_block_avx2<W: Widen>(x: &[f32], rows: &[W], t: usize, n_in: usize, out: &mut [f32]) {
    dot_block(x, rows, t, n_in, out)
}

#[inline(always)]
fn dot_block<W: Widen>(x: &[f32], rows: &[W], t: usize, n_in: usize, out: &mut [f32]) {
    for (row, y_row) in rows.chunks_exact(n_in).zip(out.chunks_mut(t)) {
        dot_rows(x, row, t, n_in, y_row);
    }
}

/// `y[ti] = x[ti] · row` for every row `ti` of `x`, reading `row` once.
#[inline(always)]
fn dot_rows<W: Widen>(x: &[f32], row: &[W], t: usize, n_in: usize, y: &mut [f32]) {
    let mut acc = [[0f32; LANES]; MAX_ROWS];
    let full = n_in / LANES * LANES;
    for (c, chunk) in row[..full].chunks_exact(LANES).enumerate() {
        let mut wide = [0f32; LANES];
        for (d, s) in wide.iter_mut().zip(chunk) {
            *d = s.widen();
        }
        for (ti, a) in acc.iter_mut().enumerate().take(t) {
            let xs = &x[ti * n_in + c * LANES..ti * n_in + (c + 1) * LANES];
            for l in 0..LANES {
                a[l] += wide[l] * xs[l];
            }
        }
    }
    for (ti, out) in y.iter_mut().enumerate() {
        let mut sum: f32 = acc[ti].iter().sum();
        for i in full..n_in {
            sum += row[i].widen() * x[ti * n_in + i];
        }
        *out = sum;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn matvec_matches_its_reference_on_ragged_shapes() {
        for (t, n_in, n_out) in
            [(1, 1, 1), (1, 15, 3), (1, 16, 33), (2, 17, 64), (3, 100, 65), (8, 2048, 70), (5, 513, 1)]
        {
            let x = random(t * n_in, 1);
            let w32 = random(n_out * n_in, 2);
            let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut cases = vec![
                (matvec(&x, &w32, t, n_in, n_out), matvec_reference(&x, &w32, t, n_in, n_out)),
                (matvec(&x, &wb, t, n_in, n_out), matvec_reference(&x, &wb, t, n_in, n_out)),
            ];
            for simd in Simd::available() {
                let mut out = vec![0f32; n_out * t];
                simd.dot_block(&x, &wb, t, n_in, &mut out);
                let transposed: Vec<f32> = (0..t * n_out).map(|k| out[(k % n_out) * t + k / n_out]).collect();
                cases.push((transposed, matvec_reference(&x, &wb, t, n_in, n_out)));
            }
            for (got, want) in cases {
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-5 + 1e-5 * b.abs(), "t {t} in {n_in} out {n_out}: [{i}] {a} vs {b}");
                }
            }
        }
    }
}
