//! Hot loops written by hand, each next to a plain reference twin and a test that they agree.
//!
//! Each loop is written once, generic over the weight element ([`Widen`]) and over whether
//! multiply-adds fuse, and compiled three times: AVX-512, AVX2 + FMA, and portable. [`Simd::detect`]
//! picks the widest the running CPU supports.

pub mod attention;
pub mod dsa;
pub mod gemm;
pub mod kquant;
pub mod latent_int8;
pub mod matvec;
pub mod mha_decode;
pub mod mla_decode;
pub mod paged;
pub mod peak;
pub mod quant;
pub mod rows;
pub mod tiles;

use std::sync::OnceLock;

use half::bf16;

/// A stored element the kernels widen to f32.
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

/// A stored element loaded 16 at a time into an AVX-512 register of f32.
pub trait Load16: Widen {
    /// # Safety
    /// `p` must point to 16 readable elements, on a CPU with AVX-512.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;

    /// # Safety
    /// `p` must point to 8 readable elements, on a CPU with AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;

    /// The elements as bf16, if that is what they are.
    fn as_bf16(elements: &[Self]) -> Option<&[half::bf16]> {
        let _ = elements;
        None
    }
}

impl Load16 for f32 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl Load16 for half::bf16 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const half::bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract; a bf16 is the top half of an f32.
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())), 16)) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract.
        unsafe { _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())), 16)) }
    }

    fn as_bf16(elements: &[half::bf16]) -> Option<&[half::bf16]> {
        Some(elements)
    }
}

/// `x` rounded to the nearest bf16 (ties to even), for finite values, in integer operations the
/// compiler vectorizes (`half`'s conversion also handles NaN, and costs a tenth of a prefill's
/// dequantization). Agrees with `half::bf16::from_f32` on every finite f32 (tested).
#[inline(always)]
pub fn bf16_round(x: f32) -> half::bf16 {
    let bits = x.to_bits();
    half::bf16::from_bits(((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16)
}

/// `a * b + c`, fused where the variant has FMA (elsewhere `mul_add` would be a slow library call).
#[inline(always)]
pub(crate) fn mul_add<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// A register of 32 bf16 values as two of f32: the high (odd) value of each 32-bit lane, by a
/// mask, and the low (even) one, by a shift. `vdpbf16ps` adds a lane's high product, then its low
/// one, each rounded; two FMAs over these halves in that order give its bits (the bf16 kernels
/// take that way where `vdpbf16ps` is slow: [`gemm::bf16_by_fma`]).
///
/// # Safety
/// AVX-512 F must be present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn bf16_halves(v: std::arch::x86_64::__m512i) -> [std::arch::x86_64::__m512; 2] {
    use std::arch::x86_64::*;
    // SAFETY: register-only instructions of AVX-512 F, present per the caller's contract.
    unsafe {
        let high = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
        [_mm512_castsi512_ps(_mm512_and_si512(v, high)), _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v))]
    }
}

/// Appends `x` as [`bf16_halves`] lays it out in memory, for an operand reused by many products:
/// each 32 values (zeros past the end of `x`) as 16 f32 of the odd ones, then 16 of the even ones.
pub fn push_bf16_halves(x: &[half::bf16], out: &mut Vec<f32>) {
    for src in x.chunks(32) {
        let at = out.len();
        out.resize(at + 32, 0.0);
        for (j, v) in src.iter().enumerate() {
            out[at + if j % 2 == 1 { j / 2 } else { 16 + j / 2 }] = v.to_f32();
        }
    }
}

/// One register whose lane `k` is the sum of the lanes of `v[k]`: pairs interleaved and added
/// within 128-bit lanes, then quads, then the 128-bit lanes themselves (about 3 instructions per
/// sum, where reducing each register alone takes 8).
///
/// # Safety
/// AVX-512 F must be present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn reduce16(v: [std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: register-only instructions of AVX-512 F, present per the caller's contract.
    unsafe {
        // Plain loops, not closures: a closure is a function of its own, without the caller's
        // target features, and an intrinsic that is not inlined is a call per instruction.
        let mut s1 = [_mm512_setzero_ps(); 8];
        for (k, s) in s1.iter_mut().enumerate() {
            *s = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
        }
        let mut s2 = [_mm512_setzero_ps(); 4];
        for (k, s) in s2.iter_mut().enumerate() {
            let (a, b) = (_mm512_castps_pd(s1[2 * k]), _mm512_castps_pd(s1[2 * k + 1]));
            *s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
        }
        #[inline(always)]
        unsafe fn fold(a: __m512, b: __m512) -> __m512 {
            // SAFETY: as the enclosing function's.
            unsafe {
                _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b))
            }
        }
        let s3 = [fold(s2[0], s2[1]), fold(s2[2], s2[3])];
        fold(s3[0], s3[1])
    }
}

/// Clears `v` to `n` copies of `value`, keeping its buffer (a kernel's scratch, reused per step).
pub(crate) fn reset<T: Copy>(v: &mut Vec<T>, n: usize, value: T) {
    v.clear();
    v.resize(n, value);
}

/// Makes room for `n` values in `v` in all, so that a later [`reset`] to `n` allocates nothing.
pub(crate) fn reserve_to<T>(v: &mut Vec<T>, n: usize) {
    v.reserve(n.saturating_sub(v.len()));
}

/// The instruction-set variants the kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    /// AVX-512 with VNNI (`vpdpbusd`, `vpdpwssd`: 8- and 16-bit dot products into 32-bit lanes),
    /// which only the quantized kernels use; the float kernels run their AVX-512 code here.
    Avx512Vnni,
    Avx512,
    Avx2,
    Portable,
}

impl Simd {
    /// The best variant the running CPU supports (detected once), or the one the environment
    /// variable `LATENT_SIMD` names (`portable`, `avx2`, `avx512`, `avx512vnni`) if the CPU has
    /// it: so the narrower kernels can be measured on a wide CPU.
    pub fn detect() -> Simd {
        static BEST: OnceLock<Simd> = OnceLock::new();
        *BEST.get_or_init(|| {
            let available = Simd::available();
            let best = *available.last().unwrap_or(&Simd::Portable);
            let Ok(wanted) = std::env::var("LATENT_SIMD") else { return best };
            match available.iter().find(|s| s.name().eq_ignore_ascii_case(wanted.trim())) {
                Some(&chosen) => chosen,
                None => {
                    let names: Vec<&str> = available.iter().map(|s| s.name()).collect();
                    eprintln!(
                        "latent: LATENT_SIMD={wanted} is not a variant this CPU runs (it runs {}); using {}",
                        names.join(", "),
                        best.name()
                    );
                    best
                }
            }
        })
    }

    /// The variant's name, as `LATENT_SIMD` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Simd::Avx512Vnni => "avx512vnni",
            Simd::Avx512 => "avx512",
            Simd::Avx2 => "avx2",
            Simd::Portable => "portable",
        }
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
                is_x86_feature_detected!("f16c"),
            ];
            if has(&avx512) {
                variants.push(Simd::Avx512);
                if is_x86_feature_detected!("avx512vnni") {
                    variants.push(Simd::Avx512Vnni);
                }
            }
        }
        variants
    }
}

/// The CPU the kernels run on, as `latent bench` reports it: so a figure can be told apart by
/// machine (bandwidth and instruction sets differ between generations).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CpuInfo {
    /// `model name` from `/proc/cpuinfo` (or "unknown").
    pub model_name: String,
    /// x86 family and model numbers (e.g. 6 and 143 for Sapphire Rapids).
    pub family: Option<u32>,
    pub model: Option<u32>,
    /// The instruction sets the kernels care about that this CPU has.
    pub features: Vec<&'static str>,
    /// The kernel variant that runs ([`Simd::detect`]), and whether the bf16 products use
    /// `vdpbf16ps`.
    pub kernels: String,
}

impl CpuInfo {
    /// The running CPU.
    pub fn detect() -> CpuInfo {
        let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        #[allow(unused_mut)]
        let mut features = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            let known: [(&'static str, bool); 9] = [
                ("avx2", is_x86_feature_detected!("avx2")),
                ("fma", is_x86_feature_detected!("fma")),
                ("avx512f", is_x86_feature_detected!("avx512f")),
                ("avx512vnni", is_x86_feature_detected!("avx512vnni")),
                ("avx512bf16", is_x86_feature_detected!("avx512bf16")),
                ("avx512fp16", is_x86_feature_detected!("avx512fp16")),
                ("amx-tile", text.contains(" amx_tile")),
                ("amx-bf16", text.contains(" amx_bf16")),
                ("amx-int8", text.contains(" amx_int8")),
            ];
            features.extend(known.iter().filter(|(_, has)| *has).map(|(name, _)| *name));
        }
        let simd = Simd::detect();
        let bf16 = match (gemm::has_avx512_bf16(), gemm::bf16_by_fma()) {
            (true, true) => " + bf16 pairs by FMAs (vdpbf16ps measured slower here)",
            (true, false) => " + vdpbf16ps for bf16",
            _ => "",
        };
        CpuInfo {
            model_name: field("model name").unwrap_or_else(|| "unknown".into()),
            family: field("cpu family").and_then(|v| v.parse().ok()),
            model: field("model").and_then(|v| v.parse().ok()),
            features,
            kernels: format!("{}{bf16}", simd.name()),
        }
    }
}

impl std::fmt::Display for CpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.model_name)?;
        if let (Some(family), Some(model)) = (self.family, self.model) {
            write!(f, " (family {family} model {model})")?;
        }
        write!(f, "; {}; kernels {}", self.features.join(" "), self.kernels)
    }
}

/// Defines `$name`, which runs the generic `$body::<W, FUSED>` compiled for the given variant.
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident => $body:ident($($arg:ident: $ty:ty),*)) => {
        $(#[$doc])*
        pub(crate) fn $name<W: $crate::kernels::Widen>(simd: $crate::kernels::Simd, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
            unsafe fn avx512<W: $crate::kernels::Widen>($($arg: $ty),*) {
                $body::<W, true>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<W: $crate::kernels::Widen>($($arg: $ty),*) {
                $body::<W, true>($($arg),*)
            }
            match simd {
                // SAFETY: `Simd::detect` and `Simd::available` only return a variant whose
                // features the running CPU has.
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::Simd::Avx512 | $crate::kernels::Simd::Avx512Vnni => unsafe { avx512::<W>($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::Simd::Avx2 => unsafe { avx2::<W>($($arg),*) },
                _ => $body::<W, false>($($arg),*),
            }
        }
    };
}
pub(crate) use dispatch;

/// Prefetches byte ranges into L2 a slice at a time, spread over the iterations of a loop that
/// computes from cache: so that the next piece of work finds its data there instead of waiting
/// on memory. The decode attention kernels fetch a run's cached rows this way while they sum the
/// run before it.
pub(crate) struct Prefetch<const N: usize = 2> {
    /// Start and length in bytes: addresses only, never read through (a prefetch of any
    /// address is harmless), so no borrow is held.
    spans: [(*const u8, usize); N],
    at: usize,
    per_tick: usize,
}

impl Prefetch {
    /// Where `v` lies in memory, as a span for [`Prefetch::new`].
    pub(crate) fn span<T>(v: &[T]) -> (*const u8, usize) {
        (v.as_ptr().cast(), std::mem::size_of_val(v))
    }
}

impl<const N: usize> Prefetch<N> {
    /// `N` spans ([`Prefetch::span`]) laid end to end, over `ticks` calls of [`Prefetch::tick`].
    pub(crate) fn new(spans: [(*const u8, usize); N], ticks: usize) -> Self {
        let total: usize = spans.iter().map(|s| s.1).sum();
        Prefetch { spans, at: 0, per_tick: total.div_ceil(ticks.max(1)).next_multiple_of(64) }
    }

    /// Prefetches the next slice, a cache line at a time.
    #[inline(always)]
    pub(crate) fn tick(&mut self) {
        let (to, mut start) = (self.at + self.per_tick, 0);
        for (p, len) in self.spans {
            let (lo, hi) = (self.at.max(start), to.min(start + len));
            for _a in (lo..hi).step_by(64) {
                // SAFETY: a prefetch is a hint: it reads nothing into the program and never
                // faults, whatever the address (this one lies inside the span anyway).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
                    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(_a - start).cast())
                };
            }
            start += len;
        }
        self.at = to;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bf16_rounding_matches_half_on_finite_values() {
        let mut bits = 0u32;
        loop {
            let x = f32::from_bits(bits);
            if x.is_finite() && half::bf16::from_f32(x).is_finite() {
                assert_eq!(super::bf16_round(x).to_bits(), half::bf16::from_f32(x).to_bits(), "{bits:#010x}");
            }
            bits = match bits.checked_add(4093) {
                Some(b) => b,
                None => break,
            };
        }
    }
}
