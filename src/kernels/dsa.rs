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

use super::gemm::gemm;
use super::paged::PAGE_ROWS;
use super::Load16;

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
pub fn index_scores<W: Load16>(q: &[f32], w: &[f32], keys: &dyn KeyPages<W>, d_i: usize, out: &mut [f32]) {
    let heads = w.len();
    assert_eq!(q.len(), heads * d_i, "index_scores: query size");
    assert!(out.len() <= keys.len(), "index_scores: more scores asked than keys cached");
    out.par_chunks_mut(PAGE_ROWS).enumerate().for_each(|(i, out)| {
        let page = &keys.page(i)[..out.len() * d_i];
        let s = gemm(q, page, heads, d_i, out.len()); // (H_i, n)
        out.fill(0.0);
        for (h, row) in s.chunks_exact(out.len()).enumerate() {
            for (o, &v) in out.iter_mut().zip(row) {
                *o += w[h] * v.max(0.0);
            }
        }
    });
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
        let (heads, d_i, n) = (3, 8, 150);
        let q = crate::kernels::matvec::tests::random(heads * d_i, 1);
        let w = [0.5, -1.25, 2.0];
        let keys = crate::kernels::matvec::tests::random(n * d_i, 2);
        let bf16: Vec<half::bf16> = keys.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let mut got = vec![0f32; n - 3];
        index_scores(&q, &w, &ContiguousKeys { keys: &keys, d_i }, d_i, &mut got);
        let mut got_bf16 = vec![0f32; n];
        index_scores(&q, &w, &ContiguousKeys { keys: &bf16, d_i }, d_i, &mut got_bf16);
        for s in 0..n {
            let score = |k: &dyn Fn(usize) -> f32| -> f32 {
                (0..heads).map(|h| w[h] * (0..d_i).map(|j| q[h * d_i + j] * k(s * d_i + j)).sum::<f32>().max(0.0)).sum()
            };
            let want = score(&|i| keys[i]);
            if s < n - 3 {
                assert!((got[s] - want).abs() <= 1e-5 * (1.0 + want.abs()), "row {s}: {} vs {want}", got[s]);
            }
            let want = score(&|i| bf16[i].to_f32());
            assert!((got_bf16[s] - want).abs() <= 1e-5 * (1.0 + want.abs()), "bf16 row {s}");
        }
    }
}
