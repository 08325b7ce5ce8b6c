//! DeepSeekMoE: `n_shared_experts` always-on experts (one fused SwiGLU) plus `k` of
//! `n_routed_experts` fine-grained routed experts chosen per token by one router.
//!
//! Router (`route_token`), for every DeepSeek mode:
//! 1. `s = softmax(logits)` (V2) or `sigmoid(logits)` (V3); logits are `h·W_gate` in f32.
//! 2. `choice = s + e_score_correction_bias` (V3 only; the bias picks experts, never weighs them).
//! 3. Groups (devices): `greedy` allows all; `group_limited_greedy` keeps the `topk_group` groups
//!    with the best single `choice`; `noaux_tc` ranks groups by the sum of their two best.
//! 4. Top-k of `choice` inside the allowed groups; weights are `s` of the chosen experts.
//! 5. Weights: DeepSeek-V3 normalises (if `norm_topk_prob`) and then multiplies by
//!    `routed_scaling_factor`; DeepSeek-V2's code normalises *or* scales. transformers 5.23's
//!    `deepseek_v2` always scales and ignores `norm_topk_prob`; latent follows DeepSeek's code
//!    (`RouterSpec::scale_after_norm`), and the two agree when `norm_topk_prob` is false, as in
//!    every published V2 checkpoint. tests/routing.rs pins the difference.

use candle_core::{DType, Tensor};

use crate::config::{Config, ModelType, MoeConfig, ScoringFunc, TopkMethod};
use crate::error::Result;
use rayon::prelude::*;

use crate::kernels::matvec::dot_block;
use crate::kernels::Simd;
use crate::model::layers::{round_one, sigmoid, softmax_last_dim, with_stored, Mlp, MlpScratch, Stored, TokenInput};
use crate::weights::{names::LayerNames, Weights};

/// Everything `route_token` needs to know about the router.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterSpec {
    pub scoring_func: ScoringFunc,
    pub topk_method: TopkMethod,
    pub n_routed_experts: usize,
    pub k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
    /// V3 scales after normalising; V2 scales only when it does not normalise.
    pub scale_after_norm: bool,
}

impl RouterSpec {
    /// The router of `cfg`'s MoE layers.
    pub fn new(moe: &MoeConfig, model_type: ModelType) -> RouterSpec {
        RouterSpec {
            scoring_func: moe.scoring_func,
            topk_method: moe.topk_method,
            n_routed_experts: moe.n_routed_experts,
            k: moe.num_experts_per_tok,
            n_group: moe.n_group,
            topk_group: moe.topk_group,
            norm_topk_prob: moe.norm_topk_prob,
            routed_scaling_factor: moe.routed_scaling_factor as f32,
            scale_after_norm: model_type.is_v3_family(),
        }
    }
}

/// One chosen expert and its weight in the token's output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Routed {
    pub expert: usize,
    pub weight: f32,
}

/// Chooses `spec.k` experts for one token, best first. `bias` (V3) affects which, never their weights.
pub fn route_token(logits: &[f32], spec: &RouterSpec, bias: Option<&[f32]>) -> Vec<Routed> {
    let mut routed = Vec::new();
    route_token_into(logits, spec, bias, &mut RouteScratch::default(), &mut routed);
    routed
}

/// The buffers [`route_token_into`] works in, kept from token to token.
#[derive(Debug, Default)]
pub struct RouteScratch {
    scores: Vec<f32>,
    choice: Vec<f32>,
    groups: Vec<f32>,
    allowed: Vec<bool>,
    order: Vec<usize>,
}

/// [`route_token`] into `routed` (cleared), allocating nothing once `scratch` has routed a token.
pub fn route_token_into(
    logits: &[f32],
    spec: &RouterSpec,
    bias: Option<&[f32]>,
    scratch: &mut RouteScratch,
    routed: &mut Vec<Routed>,
) {
    let RouteScratch { scores, choice, groups, allowed, order } = scratch;
    scores.clear();
    match spec.scoring_func {
        ScoringFunc::Softmax => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            scores.extend(logits.iter().map(|v| (v - max).exp()));
            let sum: f32 = scores.iter().sum();
            scores.iter_mut().for_each(|v| *v /= sum);
        }
        ScoringFunc::Sigmoid => scores.extend(logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp()))),
    }
    choice.clear();
    choice.extend_from_slice(scores);
    if let Some(bias) = bias {
        choice.iter_mut().zip(bias).for_each(|(c, b)| *c += b);
    }
    let per_group = spec.n_routed_experts / spec.n_group;
    allowed.clear();
    match spec.topk_method {
        TopkMethod::Greedy => allowed.resize(spec.n_group, true),
        TopkMethod::GroupLimitedGreedy | TopkMethod::NoauxTc => {
            groups.clear();
            for g in choice.chunks(per_group) {
                groups.push(match spec.topk_method {
                    TopkMethod::GroupLimitedGreedy => g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                    _ => {
                        top_indices(g, 2, order);
                        order.iter().map(|&i| g[i]).sum()
                    }
                });
            }
            allowed.resize(spec.n_group, false);
            top_indices(groups, spec.topk_group, order);
            order.iter().for_each(|&g| allowed[g] = true);
        }
    }
    for (e, c) in choice.iter_mut().enumerate() {
        if !allowed[e / per_group] {
            *c = f32::NEG_INFINITY;
        }
    }
    top_indices(choice, spec.k, order);
    routed.clear();
    routed.extend(order.iter().map(|&e| Routed { expert: e, weight: scores[e] }));
    let normalise = spec.norm_topk_prob && spec.k > 1;
    if normalise {
        let sum: f32 = routed.iter().map(|r| r.weight).sum::<f32>() + 1e-20;
        routed.iter_mut().for_each(|r| r.weight /= sum);
    }
    if spec.scale_after_norm || !normalise {
        routed.iter_mut().for_each(|r| r.weight *= spec.routed_scaling_factor);
    }
}

/// Indices of the `k` largest values into `idx`, largest first; ties go to the lower index.
fn top_indices(values: &[f32], k: usize, idx: &mut Vec<usize>) {
    idx.clear();
    idx.extend(0..values.len());
    idx.sort_unstable_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
}

/// One MoE layer: router, routed experts, shared experts.
#[derive(Debug, Clone)]
pub struct Moe {
    gate: Tensor,           // (E, hidden), f32
    bias: Option<Vec<f32>>, // (E), V3
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
    spec: RouterSpec,
}

impl Moe {
    /// Loads `mlp.*` of an MoE layer.
    pub fn load(w: &Weights, cfg: &Config, moe: &MoeConfig, names: &LayerNames) -> Result<Moe> {
        let (hidden, inter, n) = (cfg.hidden_size, moe.moe_intermediate_size, moe.n_routed_experts);
        let gate = w.get_as(&names.gate(), &[n, hidden], DType::F32)?;
        let bias = if w.contains(&names.gate_bias()) {
            Some(w.get_as(&names.gate_bias(), &[n], DType::F32)?.to_vec1::<f32>()?)
        } else {
            None
        };
        let experts =
            (0..n).map(|e| Mlp::load(w, |p| names.expert(e, p), hidden, inter)).collect::<Result<Vec<_>>>()?;
        let shared = match moe.n_shared_experts {
            0 => None,
            s => Some(Mlp::load(w, |p| names.shared_expert(p), hidden, inter * s)?),
        };
        Ok(Moe { gate, bias, experts, shared, spec: RouterSpec::new(moe, cfg.model_type) })
    }

    /// The router settings.
    pub fn spec(&self) -> &RouterSpec {
        &self.spec
    }

    /// Bytes of the router and every expert.
    pub fn weight_bytes(&self) -> usize {
        let gate = self.gate.elem_count() * self.gate.dtype().size_in_bytes();
        gate + self.experts.iter().map(Mlp::weight_bytes).sum::<usize>()
            + self.shared.as_ref().map_or(0, Mlp::weight_bytes)
    }

    /// The V3 correction bias (`e_score_correction_bias`), which the auxiliary-loss-free balance moves.
    pub fn correction_bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// Sets the correction bias; `bias` has one value per routed expert.
    pub fn set_correction_bias(&mut self, bias: Vec<f32>) {
        if bias.len() == self.spec.n_routed_experts {
            self.bias = Some(bias);
        }
    }

    /// The router weight `(E, hidden)`, f32.
    pub fn gate(&self) -> &Tensor {
        &self.gate
    }

    /// The layer over the rows of `x: (N, hidden)`: each expert runs once on the rows routed to
    /// it. With `training`, the chosen weights are taken from the differentiable scores, so the
    /// router learns, tokens of over-full devices may be dropped, and the trace the balance
    /// losses need comes back; `x` then holds whole sequences of `training.seq_len` tokens.
    pub fn forward(&self, x: &Tensor, training: Option<&MoeTraining<'_>>) -> Result<(Tensor, Option<MoeTrace>)> {
        let spec = &self.spec;
        let (n, e, k) = (x.dim(0)?, spec.n_routed_experts, spec.k);
        let logits = x.to_dtype(DType::F32)?.matmul(&self.gate.t()?)?; // (N, E)
        let logit_rows = logits.to_vec2::<f32>()?;
        let routes: Vec<Vec<Routed>> =
            logit_rows.iter().map(|row| route_token(row, spec, self.bias.as_deref())).collect();
        let Some(opts) = training else {
            let mut groups: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); e];
            for (t, chosen) in routes.iter().enumerate() {
                for r in chosen {
                    groups[r.expert].0.push(t as u32);
                    groups[r.expert].1.push(r.weight);
                }
            }
            let groups = groups
                .into_iter()
                .map(|(rows, w)| {
                    let m = w.len();
                    Ok((rows, if m == 0 { None } else { Some(Tensor::from_vec(w, (m, 1), x.device())?) }))
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok((self.run_experts(x, groups)?, None));
        };
        let scores = match spec.scoring_func {
            ScoringFunc::Softmax => softmax_last_dim(&logits)?,
            ScoringFunc::Sigmoid => sigmoid(&logits)?,
        };
        let chosen: Vec<Vec<usize>> = routes.iter().map(|r| r.iter().map(|r| r.expert).collect()).collect();
        // Weights of the chosen experts, from the scores tensor so the gradient reaches the gate.
        let flat: Vec<u32> =
            chosen.iter().enumerate().flat_map(|(t, c)| c.iter().map(move |&x| (t * e + x) as u32)).collect();
        let flat = Tensor::from_vec(flat, n * k, x.device())?;
        let mut weights = scores.flatten_all()?.index_select(&flat, 0)?.reshape((n, k))?;
        let normalise = spec.norm_topk_prob && k > 1;
        if normalise {
            weights = weights.broadcast_div(&(weights.sum_keepdim(1)? + 1e-20)?)?;
        }
        if spec.scale_after_norm || !normalise {
            weights = (weights * spec.routed_scaling_factor as f64)?;
        }
        let weights = weights.flatten_all()?; // (N k), row t*k + j for chosen[t][j]

        let score_rows = scores.to_vec2::<f32>()?;
        let kept = match opts.capacity_factor {
            Some(cf) => drop_by_capacity(&chosen, &score_rows, spec, cf, opts),
            None => chosen.iter().map(|c| vec![true; c.len()]).collect(),
        };
        let mut per_expert: Vec<(Vec<u32>, Vec<u32>)> = vec![(Vec::new(), Vec::new()); e];
        for (t, (experts, keep)) in chosen.iter().zip(&kept).enumerate() {
            for (j, (&x, &keep)) in experts.iter().zip(keep).enumerate() {
                if keep {
                    per_expert[x].0.push(t as u32);
                    per_expert[x].1.push((t * k + j) as u32);
                }
            }
        }
        let mut groups = Vec::with_capacity(e);
        for (rows, slots) in per_expert {
            let m = slots.len();
            let w = if m == 0 {
                None
            } else {
                Some(weights.index_select(&Tensor::from_vec(slots, m, x.device())?, 0)?.reshape((m, 1))?)
            };
            groups.push((rows, w));
        }
        let out = self.run_experts(x, groups)?;
        let dropped = kept.iter().flatten().filter(|&&k| !k).count();
        Ok((out, Some(MoeTrace { scores, chosen, dropped, seq_len: opts.seq_len })))
    }

    /// Routing decisions for every row of `x: (T, hidden)`.
    pub fn route(&self, x: &Tensor) -> Result<Vec<Vec<Routed>>> {
        let logits = x.to_dtype(DType::F32)?.matmul(&self.gate.t()?)?.to_vec2::<f32>()?; // (T, E)
        Ok(logits.iter().map(|row| route_token(row, &self.spec, self.bias.as_deref())).collect())
    }

    /// Whether [`Moe::step`] can run this layer: an f32 router and experts that take the decode
    /// kernels (not training variables).
    pub(crate) fn takes_step(&self) -> bool {
        !self.gate.track_op()
            && with_stored(&self.gate, |w| matches!(w, Stored::F32(_))).unwrap_or(false)
            && self.experts.iter().chain(&self.shared).all(Mlp::takes_token)
    }

    /// A decode step's layer into `out (B, hidden)`: `input` holds the step's `B` normed hidden
    /// states, one per sequence (their codes are made here). Each token is routed alone; the
    /// tokens are then grouped by expert, so that each expert any of them chose runs once, on
    /// the rows of the tokens that chose it, and the shared experts once on all rows: every
    /// weight is read once per step. Each token's output is what [`Moe::forward`] computes for
    /// it, rounded alike in a `dtype` model (routed experts by index, each output weighted in
    /// f32 and added in the model's dtype, then the shared experts), whatever else the batch
    /// holds. Allocates nothing once `s` has served a step of this size. Needs
    /// [`Moe::takes_step`].
    pub(crate) fn step(&self, input: &mut TokenInput, dtype: DType, s: &mut FfnScratch, out: &mut [f32]) {
        let FfnScratch { logits, row, route, routed, members, chosen, inputs, mlp, rows_ready } = s;
        let n_experts = self.spec.n_routed_experts;
        let hidden = self.gate.dims2().map_or(1, |(_, h)| h.max(1));
        let b = input.x().len() / hidden;
        members.resize_with(n_experts, Vec::new);
        if b > *rows_ready {
            // Every buffer at its size for any routing of `b` tokens, so that no later step of
            // as many allocates (each token picks k experts: at most `b k` distinct ones).
            let most = n_experts.min(b * self.spec.k);
            members.iter_mut().for_each(|m| crate::kernels::reserve_to(m, b));
            while inputs.len() < most {
                inputs.push(TokenInput::default());
            }
            if let Some(expert) = self.experts.first() {
                for x in &mut inputs[..most] {
                    x.reserve(b * hidden, expert.input_groups());
                }
                let jobs = most + usize::from(self.shared.is_some());
                let inter = self.shared.as_ref().map_or(0, Mlp::inter).max(expert.inter());
                mlp.reserve(expert, inter, jobs, b * (self.spec.k + 1), b);
            }
            crate::kernels::reserve_to(chosen, most);
            *rows_ready = b;
        }
        // Router logits of every token, `(E, B)`: each run of 16 gate rows read once.
        logits.resize(n_experts * b, 0.0);
        let simd = Simd::detect();
        with_stored(&self.gate, |w| {
            if let Stored::F32(w) = w {
                logits.par_chunks_mut(16 * b).enumerate().for_each(|(i, out)| {
                    let rows = &w[i * 16 * hidden..(i * 16 + out.len() / b) * hidden];
                    dot_block(simd, input.x(), rows, b, hidden, out);
                });
            }
        });
        members.iter_mut().for_each(Vec::clear);
        for token in 0..b {
            row.clear();
            row.extend(logits.iter().skip(token).step_by(b));
            route_token_into(row, &self.spec, self.bias.as_deref(), route, routed);
            for r in routed.iter() {
                members[r.expert].push((token, r.weight));
            }
        }
        chosen.clear();
        chosen.extend((0..n_experts).filter(|&e| !members[e].is_empty()));
        while inputs.len() < chosen.len() {
            inputs.push(TokenInput::default());
        }
        for (&e, x) in chosen.iter().zip(inputs.iter_mut()) {
            let x_rows = x.x_mut();
            x_rows.clear();
            for &(token, _) in &members[e] {
                x_rows.extend_from_slice(&input.x()[token * hidden..(token + 1) * hidden]);
            }
            x.requantize(self.experts[e].input_groups());
        }
        if let Some(shared) = &self.shared {
            input.requantize(shared.input_groups());
        }
        let (experts, shared, chosen_ref, inputs_ref, input_ref) =
            (&self.experts, self.shared.as_ref(), &*chosen, &*inputs, &*input);
        let n = chosen_ref.len() + usize::from(shared.is_some());
        let job = |i: usize| match chosen_ref.get(i) {
            Some(&e) => (&experts[e], &inputs_ref[i]),
            None => (shared.unwrap_or(&experts[0]), input_ref),
        };
        Mlp::run_token(n, job, dtype, mlp);
        let round = |v: f32| round_one(dtype, v);
        out.fill(0.0);
        for (i, &e) in chosen_ref.iter().enumerate() {
            let y = mlp.output(i);
            for (k, &(token, w)) in members[e].iter().enumerate() {
                let o = &mut out[token * hidden..(token + 1) * hidden];
                for (o, &v) in o.iter_mut().zip(&y[k * hidden..(k + 1) * hidden]) {
                    *o = round(*o + round(v * w));
                }
            }
        }
        if shared.is_some() {
            for (o, &v) in out.iter_mut().zip(mlp.output(chosen_ref.len())) {
                *o = round(*o + v);
            }
        }
    }

    /// Runs expert `e` on the rows `groups[e].0` of `x`, scales its outputs by the f32 weights
    /// `groups[e].1 (m, 1)`, sums them into their rows, and adds the shared experts.
    fn run_experts(&self, x: &Tensor, groups: Vec<(Vec<u32>, Option<Tensor>)>) -> Result<Tensor> {
        let mut out = x.zeros_like()?;
        for (expert, (rows, weights)) in self.experts.iter().zip(groups) {
            let Some(weights) = weights else { continue };
            let n = rows.len();
            let idx = Tensor::from_vec(rows, n, x.device())?;
            let y = expert.forward(&x.index_select(&idx, 0)?)?; // (n, hidden)
            let y = y.to_dtype(DType::F32)?.broadcast_mul(&weights)?.to_dtype(x.dtype())?;
            out = out.index_add(&idx, &y, 0)?;
        }
        match &self.shared {
            Some(shared) => Ok((out + shared.forward(x)?)?),
            None => Ok(out),
        }
    }
}

/// The buffers of [`Moe::step`], kept from token to token (and layer to layer).
#[derive(Default)]
pub(crate) struct FfnScratch {
    /// Router logits, `(E, B)`.
    logits: Vec<f32>,
    /// One token's logits.
    row: Vec<f32>,
    route: RouteScratch,
    routed: Vec<Routed>,
    /// Per expert, the step's `(token, weight)` that chose it.
    members: Vec<Vec<(usize, f32)>>,
    /// The experts chosen by any token, ascending.
    chosen: Vec<usize>,
    /// Their input rows.
    inputs: Vec<TokenInput>,
    mlp: MlpScratch,
    /// The most tokens a step has sized the buffers for.
    rows_ready: usize,
}

impl FfnScratch {
    /// The SwiGLU buffers (for a dense layer's MLP).
    pub(crate) fn mlp(&mut self) -> &mut MlpScratch {
        &mut self.mlp
    }
}

/// How an MoE layer behaves in a training step.
#[derive(Debug, Clone)]
pub struct MoeTraining<'a> {
    /// Device-level token dropping (DeepSeek-V2 §2.1.5): each device (expert group) takes at most
    /// `capacity_factor · N k / n_group` token-expert assignments. `None` drops nothing.
    pub capacity_factor: Option<f64>,
    /// Per sequence: never drop its tokens.
    pub protected: &'a [bool],
    /// Tokens per sequence; the layer's input holds `protected.len()` of them back to back.
    pub seq_len: usize,
}

/// What one MoE layer did in a training step: what the balance losses and the logs need.
#[derive(Debug, Clone)]
pub struct MoeTrace {
    /// Affinities `s (N, E)`, f32, differentiable (softmax for V2, sigmoid for V3).
    pub scores: Tensor,
    /// The experts routing chose for each token, before any dropping.
    pub chosen: Vec<Vec<usize>>,
    /// Token-expert assignments dropped by the capacity.
    pub dropped: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
}

impl MoeTrace {
    /// Tokens routed to each expert (before dropping).
    pub fn load(&self, n_experts: usize) -> Vec<usize> {
        let mut load = vec![0; n_experts];
        self.chosen.iter().flatten().for_each(|&e| load[e] += 1);
        load
    }
}

/// Which assignments survive the device capacity: on an over-full device, the lowest-affinity
/// assignments of unprotected sequences go first, until it fits or only protected ones remain.
pub fn drop_by_capacity(
    chosen: &[Vec<usize>],
    scores: &[Vec<f32>],
    spec: &RouterSpec,
    capacity_factor: f64,
    opts: &MoeTraining<'_>,
) -> Vec<Vec<bool>> {
    let mut kept: Vec<Vec<bool>> = chosen.iter().map(|c| vec![true; c.len()]).collect();
    let devices = spec.n_group.max(1);
    let per_device = spec.n_routed_experts / devices;
    let assignments: usize = chosen.iter().map(Vec::len).sum();
    let capacity = (capacity_factor * assignments as f64 / devices as f64).ceil() as usize;
    let mut on_device: Vec<Vec<(usize, usize)>> = vec![Vec::new(); devices];
    for (t, experts) in chosen.iter().enumerate() {
        for (j, &e) in experts.iter().enumerate() {
            on_device[e / per_device].push((t, j));
        }
    }
    for list in on_device {
        let mut excess = list.len().saturating_sub(capacity);
        if excess == 0 {
            continue;
        }
        let seq = |t: usize| t / opts.seq_len.max(1);
        let mut droppable: Vec<(usize, usize)> =
            list.into_iter().filter(|&(t, _)| !opts.protected.get(seq(t)).copied().unwrap_or(false)).collect();
        droppable.sort_by(|&(ta, ja), &(tb, jb)| {
            scores[ta][chosen[ta][ja]].total_cmp(&scores[tb][chosen[tb][jb]]).then((ta, ja).cmp(&(tb, jb)))
        });
        for (t, j) in droppable {
            if excess == 0 {
                break;
            }
            kept[t][j] = false;
            excess -= 1;
        }
    }
    kept
}
