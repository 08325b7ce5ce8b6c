//! DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2): which cached rows a query's
//! attention reads.
//!
//! Every cached token `s` has one indexer key `k_s` (`d_i` values, RoPE'd and normed by the
//! model). A query brings `H_i` indexer heads `q_h` and a weight per head `w_h`; its score of row
//! `s` is `Σ_h w_h · ReLU(q_h · k_s)`, and its attention reads the `index_topk` rows of the best
//! score among the rows it may see (every one when they are no more).
//!
//! [`index_scores`] is a small GEMM per page of keys, the pages in parallel: `H_i · d_i`
//! multiply-adds per cached row, against MLA's `2 · H · (d_c + d_r)` per row it reads (at V3.2's
//! sizes 8,192 against 147,456: the indexer over 64K rows costs about as much as MLA over 3.6K).
//!
//! [`top_k`] is the selection. Ties are broken toward the earlier position, and a NaN score
//! ranks below every number, so the choice is a function of the scores alone (the reference,
//! `torch.topk`, leaves the order of equal scores unspecified).

use rayon::prelude::*;

use super::gemm::{bf16_rows_into, tiles};
use super::paged::PAGE_ROWS;
use super::{Load16, Simd};

/// One layer's indexer keys, page by page where the cache keeps them.
pub trait KeyPages<W>: Sync {
    /// Keys cached.
    fn len(&self) -> usize;

    /// Whether no key is cached.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Page `i`'s keys: `n × d_i` values, `n = min(PAGE_ROWS, len − i · PAGE_ROWS)`.
    fn page(&self, i: usize) -> &[W];
}

/// Keys held in one piece, `(len, d_i)`, seen as pages.
pub struct ContiguousKeys<'a, W> {
    pub keys: &'a [W],
    pub d_i: usize,
}

impl<W: Sync> KeyPages<W> for ContiguousKeys<'_, W> {
    fn len(&self) -> usize {
        self.keys.len() / self.d_i.max(1)
    }

    fn page(&self, i: usize) -> &[W] {
        let end = ((i + 1) * PAGE_ROWS).min(self.len());
        &self.keys[i * PAGE_ROWS * self.d_i..end * self.d_i]
    }
}

/// The indexer's scores of the first `out.len()` cached rows for one query: `q (H_i, d_i)`
/// (rotated), `w (H_i)` (the head weights, every scale folded in), into `out[s] = Σ_h w_h ·
/// ReLU(q_h · k_s)`.
///
/// Over bf16 keys with a query of bf16 values (a bf16 model's), on a CPU with AVX-512 BF16, the
/// products take `vdpbf16ps` (exact products, f32 sums): twice the multiply-adds per instruction
/// of widening the keys to f32, and the indexer is bound by them, not by the keys' bytes.
pub fn index_scores<W: Load16>(q: &[f32], w: &[f32], keys: &dyn KeyPages<W>, d_i: usize, out: &mut [f32]) {
    PAIRS.with_borrow_mut(|pairs| index_scores_with(q, w, keys, d_i, out, pairs));
}

/// [`index_scores`] with the query's bf16 pairs in a buffer of the caller's, which a decode step
/// keeps from step to step (a step's calling thread changes with the pool's scheduling, so a
/// buffer of the thread's would be made anew on each thread it lands on).
pub fn index_scores_with<W: Load16>(
    q: &[f32],
    w: &[f32],
    keys: &dyn KeyPages<W>,
    d_i: usize,
    out: &mut [f32],
    pairs: &mut Vec<half::bf16>,
) {
    let heads = w.len();
    assert_eq!(q.len(), heads * d_i, "index_scores: query size");
    assert!(out.len() <= keys.len(), "index_scores: more scores asked than keys cached");
    let exact = W::as_bf16(&[]).is_some() && q.iter().all(|&v| half::bf16::from_f32(v).to_f32() == v);
    #[cfg(target_arch = "x86_64")]
    if exact && heads.is_multiple_of(16) && d_i.is_multiple_of(2) && super::gemm::has_avx512_bf16() {
        head_pairs(q, heads, d_i, pairs);
        let pairs = &pairs[..];
        out.par_chunks_mut(PAGE_ROWS).enumerate().for_each(|(i, out)| {
            if let Some(page) = W::as_bf16(&keys.page(i)[..out.len() * d_i]) {
                // SAFETY: the CPU has AVX-512 BF16 (checked above); the sizes are the kernel's.
                unsafe { broadcast::scores(pairs, w, page, d_i, out) }
            }
        });
        return;
    }
    let simd = Simd::detect();
    // Each page on one thread, the pages in parallel: (n, H_i) products, then the weighted ReLU.
    out.par_chunks_mut(PAGE_ROWS).enumerate().for_each(|(i, out)| {
        let n = out.len();
        let page = &keys.page(i)[..n * d_i];
        PRODUCTS.with_borrow_mut(|s| {
            // Room for a whole page at once: a page fills up over a decode, and the buffer must not
            // grow step after step with it (nor on each thread the page lands on).
            s.reserve((PAGE_ROWS * heads).saturating_sub(s.len()));
            s.resize(n * heads, 0.0);
            let done = exact
                && Q16.with_borrow_mut(|q16| {
                    q16.clear();
                    q16.extend(q.iter().map(|&v| half::bf16::from_f32(v)));
                    W::as_bf16(page).is_some_and(|k| bf16_rows_into(q16, k, heads, d_i, s))
                });
            if !done {
                tiles(simd, q, page, heads, d_i, s);
            }
            for (o, row) in out.iter_mut().zip(s.chunks_exact(heads)) {
                *o = row.iter().zip(w).map(|(&v, &w)| w * v.max(0.0)).sum();
            }
        });
    });
}

thread_local! {
    /// Each thread's buffers for [`index_scores`], kept from call to call (a decode step
    /// allocates nothing once they have held a step's worth).
    static PAIRS: std::cell::RefCell<Vec<half::bf16>> = const { std::cell::RefCell::new(Vec::new()) };
    static PRODUCTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static Q16: std::cell::RefCell<Vec<half::bf16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `q (H_i, d_i)` as the broadcast kernel reads it: per pair of dimensions `p`, per head `h`,
/// `(q[h][2p], q[h][2p + 1])` in bf16.
#[cfg(target_arch = "x86_64")]
fn head_pairs(q: &[f32], heads: usize, d_i: usize, pairs: &mut Vec<half::bf16>) {
    pairs.clear();
    pairs.reserve(heads * d_i);
    for p in 0..d_i / 2 {
        for h in 0..heads {
            pairs.push(half::bf16::from_f32(q[h * d_i + 2 * p]));
            pairs.push(half::bf16::from_f32(q[h * d_i + 2 * p + 1]));
        }
    }
}

/// The indexer's scores with `vdpbf16ps` and no horizontal sum in the inner loop: a key's pair of
/// dimensions is broadcast to every lane and multiplied against 16 heads' pairs at once, so each
/// lane accumulates one head's dot product (64 heads: 4 registers per key). The short rows
/// (`d_i` = 128) leave a tiled GEMM more reductions than products; here there is one per key, of
/// the weighted ReLUs.
#[cfg(target_arch = "x86_64")]
mod broadcast {
    use std::arch::x86_64::*;

    /// `out[s] = Σ_h w_h ReLU(q_h · k_s)` for the keys of one page, `keys (n, d_i)`, `pairs` from
    /// [`super::head_pairs`].
    ///
    /// # Safety
    /// AVX-512 F/BW and BF16 must be present; `w.len()` a multiple of 16, `d_i` even,
    /// `pairs.len() == w.len() · d_i`, `keys.len() == out.len() · d_i`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn scores(pairs: &[half::bf16], w: &[f32], keys: &[half::bf16], d_i: usize, out: &mut [f32]) {
        let (heads, n) = (w.len(), out.len());
        assert!(heads.is_multiple_of(16) && pairs.len() == heads * d_i && keys.len() == n * d_i, "broadcast::scores");
        out.fill(0.0);
        let mut first = 0;
        while first < heads / 16 {
            // Up to 4 registers of 16 heads per pass; 4 keys per step share each load of them.
            let groups = match heads / 16 - first {
                4.. => 4,
                2 | 3 => 2,
                _ => 1,
            };
            let mut row = 0;
            while row < n {
                let at = Block { pairs, w, keys, d_i, heads, first, row };
                // SAFETY: the caller's contract; `row + R <= n` and `first + G` groups exist.
                unsafe {
                    match (n - row >= 4, groups) {
                        (true, 4) => block::<4, 4>(at, out),
                        (true, 2) => block::<4, 2>(at, out),
                        (true, _) => block::<4, 1>(at, out),
                        (false, 4) => block::<1, 4>(at, out),
                        (false, 2) => block::<1, 2>(at, out),
                        (false, _) => block::<1, 1>(at, out),
                    }
                }
                row += if n - row >= 4 { 4 } else { 1 };
            }
            first += groups;
        }
    }

    /// Where one block of [`block`] lies.
    #[derive(Clone, Copy)]
    struct Block<'a> {
        pairs: &'a [half::bf16],
        w: &'a [f32],
        keys: &'a [half::bf16],
        d_i: usize,
        heads: usize,
        /// The first group of 16 heads.
        first: usize,
        row: usize,
    }

    /// Keys `row..row + R` against head groups `first..first + G`, their weighted ReLUs added to
    /// `out`: `R × G` accumulators in registers (the loops are over constants).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn block<const R: usize, const G: usize>(b: Block<'_>, out: &mut [f32]) {
        let Block { pairs, w, keys, d_i, heads, first, row } = b;
        let mut acc = [[_mm512_setzero_ps(); G]; R];
        for p in 0..d_i / 2 {
            // SAFETY: pair p of heads (first + g)·16.. lies in `pairs`; key row + r < n, 2p + 1 < d_i.
            unsafe {
                let q: [__m512bh; G] = std::array::from_fn(|g| {
                    let at = (p * heads + (first + g) * 16) * 2;
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(pairs.as_ptr().add(at).cast()))
                });
                for (r, acc) in acc.iter_mut().enumerate() {
                    let k = keys.as_ptr().add((row + r) * d_i + 2 * p).cast::<i32>().read_unaligned();
                    let k = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(k));
                    for g in 0..G {
                        acc[g] = _mm512_dpbf16_ps(acc[g], q[g], k);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let mut sum = _mm512_setzero_ps();
            for (g, acc) in acc.iter().enumerate() {
                // SAFETY: heads (first + g)·16.. lie in `w`.
                let wv = unsafe { _mm512_loadu_ps(w.as_ptr().add((first + g) * 16)) };
                sum = _mm512_fmadd_ps(_mm512_max_ps(*acc, _mm512_setzero_ps()), wv, sum);
            }
            out[row + r] += _mm512_reduce_add_ps(sum);
        }
    }
}

/// The positions of the `k` best `scores`, ascending, into `out` (cleared; `idx` is scratch):
/// all of them when there are no more than `k`. Equal scores rank the earlier position first;
/// NaN ranks last.
pub fn top_k(scores: &[f32], k: usize, idx: &mut Vec<u32>, out: &mut Vec<u32>) {
    out.clear();
    if scores.len() <= k {
        out.extend(0..scores.len() as u32);
        return;
    }
    idx.clear();
    idx.extend(0..scores.len() as u32);
    let key = |i: u32| {
        let s = scores[i as usize];
        if s.is_nan() {
            f32::NEG_INFINITY
        } else {
            s
        }
    };
    // Best first: higher score, then lower position (a total order on distinct positions).
    let better = |a: &u32, b: &u32| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
    if k > 0 {
        idx.select_nth_unstable_by(k - 1, better);
    }
    out.extend_from_slice(&idx[..k]);
    out.sort_unstable();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_breaks_ties_toward_the_earlier_position() {
        let (mut idx, mut out) = (Vec::new(), Vec::new());
        top_k(&[1.0, 3.0, 2.0, 3.0, 0.5], 2, &mut idx, &mut out);
        assert_eq!(out, [1, 3]);
        // Four rows tie at 0 (every head's ReLU is 0): the earliest two of them are kept.
        top_k(&[0.0, 5.0, 0.0, 0.0, 0.0], 3, &mut idx, &mut out);
        assert_eq!(out, [0, 1, 2]);
        top_k(&[f32::NAN, -1.0, f32::NEG_INFINITY, -2.0], 2, &mut idx, &mut out);
        assert_eq!(out, [1, 3], "NaN ranks below every number");
        top_k(&[0.3, 0.1], 5, &mut idx, &mut out);
        assert_eq!(out, [0, 1], "all rows when there are no more than k");
        top_k(&[0.3, 0.1], 0, &mut idx, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn index_scores_are_the_weighted_relu_of_every_head() {
        // 3 heads take the tiled products; 16, 48 and 64 the broadcast kernel (bf16 keys and a
        // query of bf16 values, on CPUs with AVX-512 BF16), 48 in passes of 2 and 1 registers.
        for (heads, d_i, n) in [(3, 8, 150), (16, 16, 70), (48, 128, 150), (64, 128, 131)] {
            let q: Vec<f32> = crate::kernels::matvec::tests::random(heads * d_i, 1)
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect();
            let w: Vec<f32> = crate::kernels::matvec::tests::random(heads, 9);
            let keys = crate::kernels::matvec::tests::random(n * d_i, 2);
            let bf16: Vec<half::bf16> = keys.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let mut got = vec![0f32; n - 3];
            index_scores(&q, &w, &ContiguousKeys { keys: &keys, d_i }, d_i, &mut got);
            let mut got_bf16 = vec![0f32; n];
            index_scores(&q, &w, &ContiguousKeys { keys: &bf16, d_i }, d_i, &mut got_bf16);
            for s in 0..n {
                let score = |k: &dyn Fn(usize) -> f32| -> f32 {
                    (0..heads)
                        .map(|h| w[h] * (0..d_i).map(|j| q[h * d_i + j] * k(s * d_i + j)).sum::<f32>().max(0.0))
                        .sum()
                };
                let want = score(&|i| keys[i]);
                if s < n - 3 {
                    assert!(
                        (got[s] - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{heads} heads, row {s}: {} vs {want}",
                        got[s]
                    );
                }
                let want = score(&|i| bf16[i].to_f32());
                assert!(
                    (got_bf16[s] - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{heads} heads bf16, row {s}: {} vs {want}",
                    got_bf16[s]
                );
            }
        }
    }
}
