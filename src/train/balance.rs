//! Load balance, as the papers define it.
//!
//! DeepSeek-V2 §2.1.3 (per MoE layer, over the `T` tokens of a batch, `N` routed experts, `K`
//! chosen per token, `s` the softmax affinities; `D = n_group` devices each holding the experts
//! `E_d`, `M = topk_group` the device limit):
//! - expert level: `f_i = N/(K T) Σ_t 1[t chose i]`, `P_i = 1/T Σ_t s_{i,t}`, `L = α1 Σ_i f_i P_i`;
//! - device level: `f'_d = 1/|E_d| Σ_{i∈E_d} f_i`, `P'_d = Σ_{i∈E_d} P_i`, `L = α2 Σ_d f'_d P'_d`;
//! - communication: `f''_d = D/(M T) Σ_t 1[t sent to d]`, `P''_d = P'_d`, `L = α3 Σ_d f''_d P''_d`.
//!
//! DeepSeek-V3 §2.1.2: the auxiliary-loss-free balance moves each expert's
//! `e_score_correction_bias` by `±γ` after every step (up when the expert took fewer tokens than
//! the mean, down when more), and a complementary sequence-wise loss over each sequence's `T`
//! tokens: `f_i = N/(K T) Σ_t 1[t chose i]`, `s'_{i,t} = s_{i,t} / Σ_j s_{j,t}`,
//! `P_i = 1/T Σ_t s'_{i,t}`, `L = α Σ_i f_i P_i`, averaged over the sequences.
//!
//! `f` counts are constants; the gradient flows through `P` into the router.

use candle_core::{Tensor, D};

use crate::error::Result;
use crate::model::moe::MoeTrace;

/// The balance settings of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalanceWeights {
    /// Expert-level weight α1.
    pub expert: f64,
    /// Device-level weight α2.
    pub device: f64,
    /// Communication weight α3.
    pub comm: f64,
    /// Sequence-wise weight α (V3).
    pub sequence: f64,
}

/// Router shape the losses need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterShape {
    pub n_experts: usize,
    pub k: usize,
    pub n_group: usize,
    pub topk_group: usize,
}

/// The balance losses of one MoE layer (scalars, differentiable through `trace.scores`).
pub struct LayerBalance {
    pub expert: Option<Tensor>,
    pub device: Option<Tensor>,
    pub comm: Option<Tensor>,
    pub sequence: Option<Tensor>,
}

/// `f_i` over a run of tokens: `N/(K T) Σ_t 1[t chose i]`.
pub fn expert_fraction(chosen: &[Vec<usize>], shape: RouterShape) -> Vec<f32> {
    let t = chosen.len().max(1) as f64;
    let mut f = vec![0.0f64; shape.n_experts];
    chosen.iter().flatten().for_each(|&e| f[e] += 1.0);
    let scale = shape.n_experts as f64 / (shape.k as f64 * t);
    f.into_iter().map(|c| (c * scale) as f32).collect()
}

/// `f''_d`: `D/(M T) Σ_t 1[t sent to device d]`.
pub fn device_send_fraction(chosen: &[Vec<usize>], shape: RouterShape) -> Vec<f32> {
    let per = shape.n_experts / shape.n_group.max(1);
    let t = chosen.len().max(1) as f64;
    let mut f = vec![0.0f64; shape.n_group];
    for experts in chosen {
        let mut seen = vec![false; shape.n_group];
        experts.iter().for_each(|&e| seen[e / per] = true);
        seen.iter().enumerate().filter(|(_, &s)| s).for_each(|(d, _)| f[d] += 1.0);
    }
    let scale = shape.n_group as f64 / (shape.topk_group.max(1) as f64 * t);
    f.into_iter().map(|c| (c * scale) as f32).collect()
}

/// The losses of one layer whose weight is nonzero.
pub fn layer_losses(trace: &MoeTrace, shape: RouterShape, w: BalanceWeights) -> Result<LayerBalance> {
    let device = trace.scores.device();
    let n = trace.chosen.len();
    let f = expert_fraction(&trace.chosen, shape);
    let p = trace.scores.mean(0)?; // (E): P_i
    let mut out = LayerBalance { expert: None, device: None, comm: None, sequence: None };
    if w.expert > 0.0 {
        let f_t = Tensor::from_slice(&f, shape.n_experts, device)?;
        out.expert = Some(((f_t * &p)?.sum_all()? * w.expert)?);
    }
    let groups = shape.n_group.max(1);
    if groups > 1 && (w.device > 0.0 || w.comm > 0.0) {
        let per = shape.n_experts / groups;
        let p_dev = p.reshape((groups, per))?.sum(1)?; // P'_d
        if w.device > 0.0 {
            let f_dev: Vec<f32> = f.chunks(per).map(|c| c.iter().sum::<f32>() / per as f32).collect();
            let f_dev = Tensor::from_vec(f_dev, groups, device)?;
            out.device = Some(((f_dev * &p_dev)?.sum_all()? * w.device)?);
        }
        if w.comm > 0.0 {
            let f_comm = Tensor::from_vec(device_send_fraction(&trace.chosen, shape), groups, device)?;
            out.comm = Some(((f_comm * &p_dev)?.sum_all()? * w.comm)?);
        }
    }
    if w.sequence > 0.0 && trace.seq_len > 0 {
        let t = trace.seq_len;
        let n_seq = n / t;
        let normed = trace.scores.broadcast_div(&trace.scores.sum_keepdim(D::Minus1)?)?; // s'
        let mut total: Option<Tensor> = None;
        for s in 0..n_seq {
            let f_s = expert_fraction(&trace.chosen[s * t..(s + 1) * t], shape);
            let f_s = Tensor::from_vec(f_s, shape.n_experts, device)?;
            let p_s = normed.narrow(0, s * t, t)?.mean(0)?;
            let l = (f_s * p_s)?.sum_all()?;
            total = Some(match total {
                Some(acc) => (acc + l)?,
                None => l,
            });
        }
        if let Some(total) = total {
            out.sequence = Some((total * (w.sequence / n_seq as f64))?);
        }
    }
    Ok(out)
}

/// MaxVio of one layer's load (Loss-Free Balancing, Wang et al. 2024):
/// `(max_i load_i - mean load) / mean load`; 0 for an empty layer.
pub fn max_vio(load: &[usize]) -> f64 {
    let total: usize = load.iter().sum();
    if load.is_empty() || total == 0 {
        return 0.0;
    }
    let mean = total as f64 / load.len() as f64;
    let max = load.iter().copied().max().unwrap_or(0) as f64;
    (max - mean) / mean
}

/// The auxiliary-loss-free update: `b_i += γ sign(mean load - load_i)`.
pub fn update_bias(bias: &mut [f32], load: &[usize], gamma: f64) {
    let total: usize = load.iter().sum();
    if load.is_empty() || total == 0 {
        return;
    }
    let mean = total as f64 / load.len() as f64;
    for (b, &l) in bias.iter_mut().zip(load) {
        let err = mean - l as f64;
        if err > 0.0 {
            *b += gamma as f32;
        } else if err < 0.0 {
            *b -= gamma as f32;
        }
    }
}
