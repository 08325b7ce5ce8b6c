//! The losses of a training step, built from differentiable tensor ops.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::moe::MoeTraining;
use crate::model::Model;
use crate::train::balance::{layer_losses, BalanceWeights, RouterShape};

/// Mean cross-entropy of `logits (N, V)` against `targets (N)`, over the rows `mask` keeps
/// (all when `None`). `None` when no row counts.
pub fn cross_entropy(logits: &Tensor, targets: &[u32], mask: Option<&[bool]>) -> Result<Option<Tensor>> {
    let (n, _) = logits.dims2()?;
    if targets.len() != n {
        return Err(Error::InvalidArgument(format!("{} targets for {n} rows of logits", targets.len())));
    }
    let rows: Vec<u32> = (0..n as u32).filter(|&r| mask.is_none_or(|m| m[r as usize])).collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let logits = if rows.len() == n {
        logits.clone()
    } else {
        logits.index_select(&Tensor::from_slice(&rows, rows.len(), logits.device())?, 0)?
    };
    let targets: Vec<u32> = rows.iter().map(|&r| targets[r as usize]).collect();
    Ok(Some(crate::model::ops::cross_entropy_rows(&logits, &targets)?.mean_all()?))
}

/// One micro-batch: `b` samples of `t + 1` tokens each, and optional target masks.
pub struct Batch<'a> {
    pub samples: Vec<&'a [u32]>,
    pub masks: Vec<Option<&'a [bool]>>,
    pub protected: Vec<bool>,
}

/// Every loss of one micro-batch, as scalar tensors.
pub struct Losses {
    /// What is differentiated: `lm + λ/D Σ mtp + balance`.
    pub total: Tensor,
    pub lm: f64,
    pub mtp: Option<f64>,
    pub expert: f64,
    pub device: f64,
    pub comm: f64,
    pub sequence: f64,
    /// `(layer, tokens per expert)` of every MoE layer.
    pub load: Vec<(usize, Vec<usize>)>,
    pub dropped: usize,
    pub assignments: usize,
}

/// What the loss needs beyond the batch.
#[derive(Debug, Clone, Copy)]
pub struct LossSettings {
    pub balance: BalanceWeights,
    pub capacity_factor: Option<f64>,
    pub mtp_lambda: f64,
}

/// Runs `model` on `batch` and builds every loss.
pub fn batch_losses(model: &Model, batch: &Batch<'_>, s: LossSettings) -> Result<Losses> {
    let b = batch.samples.len();
    let t = batch.samples.first().map_or(0, |x| x.len().saturating_sub(1));
    let mut inputs = Vec::with_capacity(b * t);
    let mut targets = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    for (sample, m) in batch.samples.iter().zip(&batch.masks) {
        if sample.len() != t + 1 {
            return Err(Error::InvalidArgument("samples of a batch must have the same length".into()));
        }
        inputs.extend_from_slice(&sample[..t]);
        targets.extend_from_slice(&sample[1..]);
        match m {
            Some(m) => mask.extend_from_slice(m),
            None => mask.extend(std::iter::repeat_n(true, t)),
        }
    }
    let moe = MoeTraining { capacity_factor: s.capacity_factor, protected: &batch.protected, seq_len: t };
    let out = model.forward_train(&inputs, b, t, &moe)?;
    let all = mask.iter().all(|&m| m);
    let lm = cross_entropy(&out.logits, &targets, (!all).then_some(mask.as_slice()))?;
    let device = out.logits.device().clone();
    let mut total = match &lm {
        Some(l) => l.clone(),
        None => Tensor::zeros((), candle_core::DType::F32, &device)?,
    };
    let lm_value = match &lm {
        Some(l) => l.to_scalar::<f32>()? as f64,
        None => 0.0,
    };

    let mut mtp_value = None;
    if !out.mtp_logits.is_empty() {
        let depth = out.mtp_logits.len();
        let mut sum = 0.0;
        for (k, logits) in out.mtp_logits.iter().enumerate() {
            let d = k + 1;
            let len = t - d;
            let mut tg = Vec::with_capacity(b * len);
            let mut mk = Vec::with_capacity(b * len);
            for (r, sample) in batch.samples.iter().enumerate() {
                tg.extend_from_slice(&sample[d + 1..]);
                mk.extend((0..len).map(|i| mask[r * t + i + d]));
            }
            if let Some(l) = cross_entropy(logits, &tg, Some(&mk))? {
                sum += l.to_scalar::<f32>()? as f64;
                total = (total + (l * (s.mtp_lambda / depth as f64))?)?;
            }
        }
        mtp_value = Some(sum / depth as f64);
    }

    let cfg = model.config();
    let mut losses = Losses {
        total: Tensor::zeros((), candle_core::DType::F32, &device)?,
        lm: lm_value,
        mtp: mtp_value,
        expert: 0.0,
        device: 0.0,
        comm: 0.0,
        sequence: 0.0,
        load: Vec::new(),
        dropped: 0,
        assignments: 0,
    };
    if let Some(m) = &cfg.moe {
        let shape = RouterShape {
            n_experts: m.n_routed_experts,
            k: m.num_experts_per_tok,
            n_group: m.n_group,
            topk_group: m.topk_group,
        };
        for (layer, trace) in &out.moe {
            let l = layer_losses(trace, shape, s.balance)?;
            for (term, acc) in [
                (l.expert, &mut losses.expert),
                (l.device, &mut losses.device),
                (l.comm, &mut losses.comm),
                (l.sequence, &mut losses.sequence),
            ] {
                if let Some(term) = term {
                    *acc += term.to_scalar::<f32>()? as f64;
                    total = (total + term)?;
                }
            }
            losses.load.push((*layer, trace.load(m.n_routed_experts)));
            losses.dropped += trace.dropped;
            losses.assignments += trace.chosen.iter().map(Vec::len).sum::<usize>();
        }
    }
    losses.total = total;
    Ok(losses)
}
