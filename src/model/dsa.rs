//! DeepSeek Sparse Attention (DeepSeek-V3.2): the lightning indexer of one layer.
//!
//! The indexer picks, for each query, the `index_topk` cached tokens its MLA attention reads
//! (the scoring and the selection are [`crate::kernels::dsa`]). Per token, with `x` the layer's
//! normed input and `q_a` the normed compressed query MLA already computes:
//!
//! - key `k = RoPE(LayerNorm(wk x))` (`d_i` values, one per token, cached beside the latent);
//! - queries `q_h = RoPE(wq_b q_a)_h` for `H_i` heads of `d_i`;
//! - head weights `w_h = weights_proj(x)_h · H_i^-1/2 · d_i^-1/2` (`weights_proj` kept in f32);
//! - score of a cached token `s`: `Σ_h w_h ReLU(q_h · k_s)`.
//!
//! RoPE rotates the first `qk_rope_head_dim` values of the query heads and the key, in halves
//! (`rotate_half`), not in the interleaved pairs of the main attention: DeepSeek corrected its
//! inference code to this in November 2025 and transformers 5.23 follows. The frequencies and
//! YaRN factor are the main attention's.
//!
//! Where DeepSeek's inference code and transformers part, latent follows transformers, the
//! numerical reference: no Hadamard rotation of `q` and `k` (orthogonal, so `q·k` is unchanged up
//! to rounding) and no FP8 rounding of them before scoring (tests/golden.rs,
//! `v32_follows_transformers_where_deepseek_inference_differs`, writes down what that changes).

use candle_core::{DType, Tensor};

use super::layers::{round_to, Linear};
use super::rope::Rope;
use crate::config::{Config, DsaConfig};
use crate::error::Result;
use crate::weights::{names::LayerNames, Weights};

/// LayerNorm's epsilon in the indexer (transformers' `nn.LayerNorm(eps=1e-6)`).
const K_NORM_EPS: f32 = 1e-6;

/// One layer's lightning indexer.
#[derive(Debug, Clone)]
pub struct Indexer {
    wq_b: Linear,         // (H_i d_i, q_lora_rank)
    wk: Linear,           // (d_i, hidden)
    weights_proj: Linear, // (H_i, hidden), f32
    norm_weight: Vec<f32>,
    norm_bias: Vec<f32>,
    rope: Rope,
    heads: usize,
    dim: usize,
    d_r: usize,
    topk: usize,
}

impl Indexer {
    /// Loads `self_attn.indexer.*` of one layer.
    pub fn load(w: &Weights, cfg: &Config, dsa: &DsaConfig, names: &LayerNames) -> Result<Indexer> {
        let (heads, dim, hidden) = (dsa.index_n_heads, dsa.index_head_dim, cfg.hidden_size);
        let rank = cfg.q_lora_rank.unwrap_or(0);
        let vector =
            |name: &str| -> Result<Vec<f32>> { Ok(w.get_as(&names.indexer(name), &[dim], DType::F32)?.to_vec1()?) };
        let rope =
            Rope::new(&crate::config::RopeConfig { rope_interleave: false, ..cfg.rope.clone() }, cfg.qk_rope_head_dim);
        Ok(Indexer {
            wq_b: Linear::from_weight(w.get(&names.indexer("wq_b.weight"), &[heads * dim, rank])?),
            wk: Linear::from_weight(w.get(&names.indexer("wk.weight"), &[dim, hidden])?),
            weights_proj: Linear::from_weight(w.get_as(
                &names.indexer("weights_proj.weight"),
                &[heads, hidden],
                DType::F32,
            )?),
            norm_weight: vector("k_norm.weight")?,
            norm_bias: vector("k_norm.bias")?,
            rope,
            heads,
            dim,
            d_r: cfg.qk_rope_head_dim,
            topk: dsa.index_topk,
        })
    }

    /// Positions a query attends to at most.
    pub fn topk(&self) -> usize {
        self.topk
    }

    /// Sets [`Indexer::topk`].
    pub(crate) fn set_topk(&mut self, topk: usize) {
        self.topk = topk;
    }

    /// The key's width, `d_i`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The query heads, `H_i`.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Bytes of every weight.
    pub fn weight_bytes(&self) -> usize {
        self.wq_b.weight_bytes() + self.wk.weight_bytes() + self.weights_proj.weight_bytes() + 8 * self.dim
    }

    /// The projections, for a decode step: `wk` and `weights_proj` read the layer's input,
    /// `wq_b` the normed compressed query.
    pub(crate) fn projections(&self) -> (&Linear, &Linear, &Linear) {
        (&self.wk, &self.weights_proj, &self.wq_b)
    }

    /// Whether the decode step's kernels take every projection.
    pub(crate) fn takes_step(&self) -> bool {
        self.wq_b.takes_token_rows() && self.wk.takes_token_rows() && self.weights_proj.takes_token_rows()
    }

    /// One token's key from `wk x` (`d_i` values, rounded to `dtype` as a `dtype` model rounds),
    /// in place: LayerNorm, then RoPE by the token's angles `cos`, `sin` (`d_r / 2` each).
    pub(crate) fn key_row(&self, k: &mut [f32], (cos, sin): (&[f32], &[f32]), dtype: DType) {
        let n = k.len() as f32;
        let mean = k.iter().sum::<f32>() / n;
        let var = k.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + K_NORM_EPS).sqrt();
        for ((v, g), b) in k.iter_mut().zip(&self.norm_weight).zip(&self.norm_bias) {
            *v = (*v - mean) * inv * g + b;
        }
        round_to(dtype, k);
        self.rope.rotate(&mut k[..self.d_r], cos, sin);
        round_to(dtype, k);
    }

    /// One token's query heads from `wq_b q_a` (`H_i d_i`, in place: RoPE by the token's angles on
    /// each head's first `d_r` values) and head weights from `weights_proj x` (`H_i`, in place:
    /// scaled).
    pub(crate) fn query_row(&self, q: &mut [f32], w: &mut [f32], (cos, sin): (&[f32], &[f32]), dtype: DType) {
        for head in q.chunks_exact_mut(self.dim) {
            self.rope.rotate(&mut head[..self.d_r], cos, sin);
        }
        round_to(dtype, q);
        let scale = (self.heads as f32).powf(-0.5) * (self.dim as f32).powf(-0.5);
        w.iter_mut().for_each(|v| *v *= scale);
    }

    /// The keys of `t` tokens at `start..`, `x (T, hidden)` the layer's normed input: `(T, d_i)`
    /// f32 (holding values of `x`'s dtype).
    pub(crate) fn keys(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let dtype = x.dtype();
        let t = x.dim(0)?;
        let mut k: Vec<f32> = self.wk.forward(x)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for (i, row) in k.chunks_exact_mut(self.dim).enumerate() {
            self.rope.angles_at(start + i, &mut cos, &mut sin);
            self.key_row(row, (&cos, &sin), dtype);
        }
        Ok(Tensor::from_vec(k, (t, self.dim), x.device())?)
    }

    /// The query heads `(T, H_i d_i)` and head weights `(T, H_i)` of `t` tokens at `start..`, in
    /// f32: `q_a (T, q_lora_rank)` the normed compressed query, `x (T, hidden)` the normed input.
    pub(crate) fn queries(&self, q_a: &Tensor, x: &Tensor, start: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let dtype = x.dtype();
        let mut q: Vec<f32> = self.wq_b.forward(q_a)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let x32 = x.to_dtype(DType::F32)?;
        let mut w: Vec<f32> = self.weights_proj.forward(&x32)?.flatten_all()?.to_vec1()?;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        let per_q = self.heads * self.dim;
        for (i, (q, w)) in q.chunks_exact_mut(per_q).zip(w.chunks_exact_mut(self.heads)).enumerate() {
            self.rope.angles_at(start + i, &mut cos, &mut sin);
            self.query_row(q, w, (&cos, &sin), dtype);
        }
        Ok((q, w))
    }
}
