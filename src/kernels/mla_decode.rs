//! Absorbed MLA attention of one new token over the latent cache (DeepSeek-V2 §2.1, decode):
//!
//! `o_lat[h] = Σ_s softmax_s(scale (q_lat[h]·c_kv[s] + q_rope[h]·k_rope[s])) c_kv[s]`
//!
//! Every head shares the cache, so each cached row is read once per step for all heads (MQA over
//! the latent). Keys and values are never expanded per head; the caller applies `W_UV` to `o_lat`.

use rayon::prelude::*;

use super::gemm::{gemm_bf16_parts, gemm_pair};
use super::matvec::weighted_rows;
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
    let MlaShape { heads, d_c, d_r, len } = shape;
    // Scores by the tiled GEMM: 4 heads x 4 cached rows per register tile, each cached row read
    // once per 4 heads (`matvec` widens it once per 8 heads but loads a head chunk per FMA).
    // The latent and RoPE parts of each score are summed in the same accumulators; over a bf16
    // cache, by `vdpbf16ps` with the queries rounded to bf16 (see `rounds_queries`).
    let bf16_scores = match (W::as_bf16(c_kv), W::as_bf16(k_rope)) {
        (Some(c), Some(r)) if rounds_queries::<W>() => {
            let (ql, qr) = (to_bf16(q_lat), to_bf16(q_rope));
            gemm_bf16_parts(&[(&ql, c, d_c), (&qr, r, d_r)], heads, len)
        }
        _ => None,
    };
    let mut probs = match bf16_scores {
        Some(p) => p,
        None => gemm_pair((q_lat, c_kv, d_c), (q_rope, k_rope, d_r), heads, len), // (H, S)
    };
    probs.par_chunks_mut(len).for_each(|row| {
        row.iter_mut().for_each(|v| *v *= scale);
        softmax_in_place(row)
    });
    weighted_rows(&probs, c_kv, heads, len, d_c) // (H, d_c)
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
            out[h * d_c + i] = v as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matvec::tests::{assert_close, random};
    use half::bf16;

    #[test]
    fn fast_mla_decode_matches_reference_on_ragged_lengths() {
        for len in [1, 7, 63, 64, 65, 1000] {
            for (heads, d_c, d_r) in [(4, 32, 8), (16, 512, 64)] {
                let shape = MlaShape { heads, d_c, d_r, len };
                let q_lat = random(heads * d_c, 1);
                let q_rope = random(heads * d_r, 2);
                let c_kv: Vec<bf16> = random(len * d_c, 3).iter().map(|&v| bf16::from_f32(v)).collect();
                let k_rope: Vec<bf16> = random(len * d_r, 4).iter().map(|&v| bf16::from_f32(v)).collect();
                let scale = 1.0 / ((d_c / 4) as f32).sqrt();
                assert_close(
                    &format!("mla_decode len {len} heads {heads}"),
                    &mla_decode(&q_lat, &q_rope, &c_kv, &k_rope, shape, scale),
                    &mla_decode_reference(&q_lat, &q_rope, &c_kv, &k_rope, shape, scale),
                );
            }
        }
    }
}
