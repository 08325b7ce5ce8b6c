//! The small building blocks: `Linear`, `RmsNorm`, SwiGLU `Mlp`, and a softmax over the last dim.
//!
//! Norms and softmax compute in f32 whatever the compute dtype, as the reference does
//! (`DeepseekV2RMSNorm.forward`, `eager_attention_forward` in transformers 5.23).

use candle_core::{CpuStorage, DType, Storage, Tensor};

use std::sync::Arc;

use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::gemm::{gemm, gemm_bf16, gemm_quant};
use crate::kernels::kquant::{quantize_q4_k, QK_K};
use crate::kernels::matvec::{dot_block, dot_block_bf16, matvec, FMA_ROWS, MAX_ROWS, MAX_ROWS_QUANT};
use crate::kernels::quant::{quantize_q8_0, QuantMatrix, QuantizedRows, QK8_0};
use crate::kernels::Simd;
use crate::weights::{Quant, Weights};

/// A contiguous CPU tensor's elements, for the hand-written kernels.
pub(crate) enum Stored<'a> {
    Bf16(&'a [half::bf16]),
    F32(&'a [f32]),
}

/// Runs `f` on `t`'s elements if it is a contiguous bf16 or f32 CPU tensor.
pub(crate) fn with_stored<R>(t: &Tensor, f: impl FnOnce(Stored<'_>) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::BF16(v)) => Some(f(Stored::Bf16(&v[start..end]))),
        Storage::Cpu(CpuStorage::F32(v)) => Some(f(Stored::F32(&v[start..end]))),
        _ => None,
    }
}

/// `y = x Wᵀ (+ b)`, with `W` stored `(out, in)` as in the checkpoint.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The dense weight; empty when the weight is quantized.
    weight: Tensor,
    quant: Option<QuantWeight>,
    bias: Option<Tensor>,
}

/// A `(out, in)` weight in GGML blocks.
#[derive(Debug, Clone)]
struct QuantWeight {
    blocks: Arc<QuantMatrix>,
    n_out: usize,
    n_in: usize,
}

impl Linear {
    /// Loads `name` with shape `(out, in)`, and its bias `bias_name` if given.
    pub fn load(w: &Weights, name: &str, out: usize, inp: usize, bias_name: Option<&str>) -> Result<Linear> {
        let bias = match bias_name {
            Some(b) => Some(w.get(b, &[out])?),
            None => None,
        };
        let empty = || Tensor::zeros(0, w.dtype(), w.device());
        // Blocks stored in the file (GGUF) are used as they are.
        if let Some(blocks) = w.get_quantized(name, &[out, inp])? {
            w.note_quant_format(blocks.name());
            let quant = QuantWeight { blocks: Arc::new(blocks.for_decode(inp)), n_out: out, n_in: inp };
            return Ok(Linear { weight: empty()?, quant: Some(quant), bias });
        }
        let weight = w.get(name, &[out, inp])?;
        if let (Some(quant), false) = (w.quant(), weight.track_op()) {
            let values: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            if let Some(blocks) = quantize_rows(quant, &values, inp) {
                w.note_quant_format(blocks.name());
                let quant = QuantWeight { blocks: Arc::new(blocks.for_decode(inp)), n_out: out, n_in: inp };
                return Ok(Linear { weight: empty()?, quant: Some(quant), bias });
            }
        }
        Ok(Linear { weight, quant: None, bias })
    }

    /// Bytes the weight occupies (quantized blocks or dense elements), bias excluded.
    pub fn weight_bytes(&self) -> usize {
        match &self.quant {
            Some(q) => q.blocks.bytes(),
            None => self.weight.elem_count() * self.weight.dtype().size_in_bytes(),
        }
    }

    /// GGML's name of the weight's block format, if quantized.
    pub fn quant_name(&self) -> Option<&'static str> {
        self.quant.as_ref().map(|q| q.blocks.name())
    }

    /// Rows of `y = W x` per task in [`Linear::token_rows_into`] (tiles of 16 rows fit whole).
    const TOKEN_TASK_ROWS: usize = 32;

    /// Whether [`Linear::token_rows_into`] can take this weight: no bias, not tracking gradients,
    /// quantized or a contiguous bf16/f32 weight.
    pub(crate) fn takes_token_rows(&self) -> bool {
        if self.bias.is_some() {
            return false;
        }
        self.quant.is_some() || (!self.weight.track_op() && with_stored(&self.weight, |_| ()).is_some())
    }

    /// Output features.
    pub(crate) fn n_out(&self) -> usize {
        match &self.quant {
            Some(q) => q.n_out,
            None => self.weight.dims2().map_or(0, |(o, _)| o),
        }
    }

    /// The activation group a quantized weight reads its input in.
    pub(crate) fn act_group(&self) -> Option<usize> {
        self.quant.as_ref().map(|q| q.blocks.act_group())
    }

    /// Input features.
    pub(crate) fn n_in(&self) -> usize {
        match &self.quant {
            Some(q) => q.n_in,
            None => self.weight.dims2().map_or(0, |(_, i)| i),
        }
    }

    /// `x Wᵀ` for each of `n` jobs `job(j) = (W, x)` into `out` (`out.get(j)`, `(t_j, out)` where
    /// `x` holds `t_j` rows), in one parallel pass over runs of 32 rows of all the weights: each
    /// run of a weight is read once for all of its job's rows (a batched decode step's tokens, or
    /// the tokens an expert was chosen by). Allocates nothing once `out` has held as many values.
    /// The weights must pass [`Linear::takes_token_rows`].
    pub(crate) fn token_rows_into<'a>(
        n: usize,
        job: impl Fn(usize) -> (&'a Linear, &'a TokenInput) + Sync,
        out: &mut JobOutputs,
    ) {
        const TASK: usize = Linear::TOKEN_TASK_ROWS;
        let JobOutputs { tasks, starts, lens, ts, all, rows, row_starts } = out;
        tasks.clear();
        starts.clear();
        lens.clear();
        ts.clear();
        row_starts.clear();
        let (mut end, mut rows_end) = (0, 0);
        for j in 0..n {
            let (l, input) = job(j);
            let (n_out, n_in) = (l.n_out(), l.n_in());
            let t = input.x.len().checked_div(n_in).unwrap_or(0);
            starts.push(end);
            lens.push(n_out);
            ts.push(t);
            row_starts.push(rows_end);
            // Each job's rows start a task, so that no task spans two weights.
            tasks.extend((0..n_out.div_ceil(TASK)).map(|r| (j, r * TASK)));
            end += n_out.next_multiple_of(TASK) * t;
            if t > 1 {
                rows_end += n_out * t;
            }
        }
        all.resize(end, 0.0);
        rows.resize(rows_end, 0.0);
        /// `all`'s values, written by tasks over disjoint runs.
        struct Values(*mut f32);
        // SAFETY: every task writes only its own run of `all` (below), so no value is shared.
        unsafe impl Sync for Values {}
        let values = Values(all.as_mut_ptr());
        let (values, starts, lens, ts, simd) = (&values, &*starts, &*lens, &*ts, Simd::detect());
        tasks.par_iter().for_each(|&(j, first)| {
            let (t, n) = (ts[j], (lens[j] - first).min(TASK));
            // SAFETY: job `j`'s runs of `TASK` rows by `t` columns tile `starts[j]..` without
            // overlap (the lengths above), inside `all`, which outlives the parallel loop.
            let out = unsafe { std::slice::from_raw_parts_mut(values.0.add(starts[j] + first * t), n * t) };
            let (l, input) = job(j);
            match &l.quant {
                Some(q) => {
                    if let Some(xq) = input.quantized(q.blocks.act_group()) {
                        q.blocks.run_rows(simd, xq, first, q.n_in, t, out);
                    }
                }
                None => {
                    let n_in = l.n_in();
                    let w_rows = first * n_in..(first + n) * n_in;
                    with_stored(&l.weight, |w| match w {
                        Stored::Bf16(w) => {
                            let split = input.split().filter(|_| t >= FMA_ROWS);
                            let done = input
                                .bf16()
                                .is_some_and(|x| dot_block_bf16(x, split, &w[w_rows.clone()], t, n_in, out));
                            if !done {
                                dot_block(simd, &input.x, &w[w_rows], t, n_in, out)
                            }
                        }
                        Stored::F32(w) => dot_block(simd, &input.x, &w[w_rows], t, n_in, out),
                    });
                }
            }
        });
        // Jobs of several rows: `(out, t)` as the kernels write it, to `(t, out)`.
        for j in 0..n {
            let (t, n_out) = (ts[j], lens[j]);
            if t > 1 {
                let src = &all[starts[j]..starts[j] + n_out * t];
                let dst = &mut rows[row_starts[j]..row_starts[j] + n_out * t];
                for (o, col) in src.chunks_exact(t).enumerate() {
                    for (ti, &v) in col.iter().enumerate() {
                        dst[ti * n_out + o] = v;
                    }
                }
            }
        }
    }

    /// `x Wᵀ` from quantized blocks: the decode kernel for up to `MAX_ROWS_QUANT` rows, and for
    /// any number of rows over tiles (8-bit activations, several rows per pass over the codes);
    /// else the tiled GEMM, which dequantizes one run of rows at a time.
    fn forward_quant(q: &QuantWeight, x: &Tensor) -> Result<Tensor> {
        let (t, n_in) = x.dims2()?;
        if n_in != q.n_in {
            return Err(candle_core::Error::Msg(format!(
                "quantized linear: input has {n_in} features, the weight expects {}",
                q.n_in
            ))
            .into());
        }
        let xv: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let y = if t <= MAX_ROWS_QUANT || q.blocks.is_tiled() {
            q.blocks.matvec(&xv, t, n_in, q.n_out)
        } else {
            gemm_quant(&xv, &q.blocks, t, n_in, q.n_out)
        };
        Ok(Tensor::from_vec(y, (t, q.n_out), x.device())?.to_dtype(x.dtype())?)
    }

    /// `x Wᵀ` by latent's kernels (the decode kernel for up to `MAX_ROWS` rows, else the tiled
    /// GEMM), if `W` is contiguous bf16 or f32 on the CPU and tracks no gradient.
    fn matvec(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (t, n_in) = x.dims2()?;
        let (n_out, _) = self.weight.dims2()?;
        // The kernels are not differentiable: weights that track gradients (training) take candle.
        if self.weight.track_op() {
            return Ok(None);
        }
        if t > MAX_ROWS {
            // A bf16 model's prefill: bf16 activations against bf16 weights, as they are.
            let x = x.contiguous()?;
            let y = with_stored(&x, |xs| {
                with_stored(&self.weight, |w| match (xs, w) {
                    (Stored::Bf16(xs), Stored::Bf16(w)) => gemm_bf16(xs, w, t, n_in, n_out),
                    _ => None,
                })
            });
            if let Some(Some(Some(y))) = y {
                return Ok(Some(Tensor::from_vec(y, (t, n_out), x.device())?.to_dtype(x.dtype())?));
            }
        }
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let y = with_stored(&self.weight, |w| match (w, t <= MAX_ROWS) {
            (Stored::Bf16(w), true) => matvec(&xs, w, t, n_in, n_out),
            (Stored::F32(w), true) => matvec(&xs, w, t, n_in, n_out),
            (Stored::Bf16(w), false) => gemm(&xs, w, t, n_in, n_out),
            (Stored::F32(w), false) => gemm(&xs, w, t, n_in, n_out),
        });
        match y {
            Some(y) => Ok(Some(Tensor::from_vec(y, (t, n_out), x.device())?.to_dtype(x.dtype())?)),
            None => Ok(None),
        }
    }

    /// The `(out, in)` weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Wraps an existing `(out, in)` weight.
    pub fn from_weight(weight: Tensor) -> Linear {
        Linear { weight, quant: None, bias: None }
    }

    /// `x: (T, in)` -> `(T, out)`: up to `MAX_ROWS` rows (decode, short prompts) through
    /// [`matvec`], more through [`gemm`]; candle's GEMM only where gradients are tracked.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.quant {
            Some(q) => Linear::forward_quant(q, x)?,
            None => match self.matvec(x)? {
                Some(y) => y,
                None => x.matmul(&self.weight.t()?)?,
            },
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Rows of `row_len` values in `quant`'s block format (`--quant`); rows too short for Q4_K's 256
/// take Q8_0, as GGML's quantizer falls back to a 32-value format for them. `None` where the rows
/// fit neither.
pub(crate) fn quantize_rows(quant: Quant, values: &[f32], row_len: usize) -> Option<QuantMatrix> {
    match quant {
        Quant::Q4K if row_len.is_multiple_of(QK_K) => Some(QuantMatrix::Q4K(quantize_q4_k(values))),
        _ if row_len.is_multiple_of(QK8_0) => Some(QuantMatrix::Q8_0(quantize_q8_0(values))),
        _ => None,
    }
}

/// The token embedding `(V, hidden)`: a dense tensor, or quantized rows (a GGUF file's, or
/// `--quant`) dequantized on lookup, so a quantized model never holds a dense copy.
#[derive(Debug, Clone)]
pub struct Embedding {
    dense: Option<Tensor>,
    quant: Option<Arc<QuantMatrix>>,
    hidden: usize,
    dtype: DType,
}

impl Embedding {
    /// Loads `name` with shape `(vocab, hidden)`.
    pub fn load(w: &Weights, name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        let dtype = w.dtype();
        if let Some(blocks) = w.get_quantized(name, &[vocab, hidden])? {
            return Ok(Embedding { dense: None, quant: Some(Arc::new(blocks)), hidden, dtype });
        }
        let weight = w.get(name, &[vocab, hidden])?;
        if let (Some(quant), false) = (w.quant(), weight.track_op()) {
            let values: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            if let Some(blocks) = quantize_rows(quant, &values, hidden) {
                return Ok(Embedding { dense: None, quant: Some(Arc::new(blocks)), hidden, dtype });
            }
        }
        Ok(Embedding { dense: Some(weight), quant: None, hidden, dtype })
    }

    /// Rows `ids` `(n, hidden)`; differentiable when the table is a variable.
    pub fn forward(&self, ids: &[u32], device: &candle_core::Device) -> Result<Tensor> {
        match (&self.dense, &self.quant) {
            (Some(t), _) => Ok(t.index_select(&Tensor::from_slice(ids, ids.len(), device)?, 0)?),
            (None, Some(q)) => {
                let rows: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
                let values = q.dequantize_rows(&rows, self.hidden);
                Ok(Tensor::from_vec(values, (ids.len(), self.hidden), device)?.to_dtype(self.dtype)?)
            }
            (None, None) => Err(crate::error::Error::InvalidArgument("embedding has no weight".into())),
        }
    }

    /// Row `id` into `out` (`hidden` values, f32); `None` where the table is neither quantized
    /// nor stored bf16 or f32.
    pub(crate) fn row_into(&self, id: usize, out: &mut [f32]) -> Option<()> {
        match (&self.dense, &self.quant) {
            (Some(t), _) => with_stored(t, |w| match w {
                Stored::Bf16(w) => out.iter_mut().zip(&w[id * self.hidden..]).for_each(|(o, v)| *o = v.to_f32()),
                Stored::F32(w) => out.copy_from_slice(&w[id * self.hidden..(id + 1) * self.hidden]),
            }),
            (None, Some(q)) => {
                q.dequantize_row(id, out);
                Some(())
            }
            (None, None) => None,
        }
    }

    /// Whether [`Embedding::row_into`] can read the table.
    pub(crate) fn takes_rows(&self) -> bool {
        match &self.dense {
            Some(t) => !t.track_op() && with_stored(t, |_| ()).is_some(),
            None => self.quant.is_some(),
        }
    }

    /// The same table as an output head (tied embeddings).
    pub fn as_linear(&self) -> Result<Linear> {
        Ok(match (&self.dense, &self.quant) {
            (Some(t), _) => Linear::from_weight(t.clone()),
            (None, q) => Linear {
                weight: Tensor::zeros(0, self.dtype, &candle_core::Device::Cpu)?,
                quant: q.clone().map(|blocks| QuantWeight {
                    n_out: blocks.rows(self.hidden),
                    n_in: self.hidden,
                    blocks,
                }),
                bias: None,
            },
        })
    }

    /// Bytes of the table.
    pub fn weight_bytes(&self) -> usize {
        match (&self.dense, &self.quant) {
            (Some(t), _) => t.elem_count() * t.dtype().size_in_bytes(),
            (None, Some(q)) => q.bytes(),
            (None, None) => 0,
        }
    }
}

/// `1 / (1 + e^-x)` from differentiable ops.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// Root-mean-square norm: `w * x / sqrt(mean(x²) + eps)`, normalised in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    /// The weight in f32, for decode's slices (inference only: training moves `weight`).
    gain: Vec<f32>,
    eps: f64,
}

impl RmsNorm {
    /// Loads the `(dim,)` weight `name`.
    pub fn load(w: &Weights, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        let weight = w.get(name, &[dim])?;
        let gain = weight.to_dtype(DType::F32)?.to_vec1()?;
        Ok(RmsNorm { weight, gain, eps })
    }

    /// Bytes of the weight.
    pub fn weight_bytes(&self) -> usize {
        self.weight.elem_count() * self.weight.dtype().size_in_bytes()
    }

    /// `x / sqrt(mean(x²) + eps)` in f32, without the gain.
    pub fn normalize(&self, x: &Tensor) -> Result<Tensor> {
        crate::model::ops::rms_normalize(&x.to_dtype(DType::F32)?, self.eps)
    }

    /// The gain `w` in f32.
    pub fn gain_f32(&self) -> Result<Tensor> {
        Ok(self.weight.to_dtype(DType::F32)?)
    }

    /// The gain `w` in f32, as loaded.
    pub(crate) fn gain(&self) -> &[f32] {
        &self.gain
    }

    /// Whether the weight is a training variable (then [`RmsNorm::gain`] may be stale).
    pub(crate) fn tracks(&self) -> bool {
        self.weight.track_op()
    }

    /// [`RmsNorm::normalize`] of one row `x` into `out`.
    pub(crate) fn normalize_row(&self, x: &[f32], out: &mut [f32]) {
        crate::kernels::rows::rms_rows(x, x.len(), self.eps as f32, out);
    }

    /// [`RmsNorm::forward`] of one row `x` into `out`, rounded as a `dtype` model rounds: the
    /// normalized values, then their product with the gain.
    pub(crate) fn forward_row(&self, x: &[f32], out: &mut [f32], dtype: DType) {
        self.normalize_row(x, out);
        round_to(dtype, out);
        out.iter_mut().zip(&self.gain).for_each(|(o, g)| *o *= g);
        round_to(dtype, out);
    }

    /// Normalises over the last dim; returns the input's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let normed = crate::model::ops::rms_normalize(&x.to_dtype(DType::F32)?, self.eps)?.to_dtype(dtype)?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}

/// Rounds `v` to `dtype` and back (what storing an f32 result in a `dtype` tensor does).
#[inline]
pub(crate) fn round_to(dtype: DType, v: &mut [f32]) {
    match dtype {
        DType::BF16 => v.iter_mut().for_each(|x| *x = crate::kernels::bf16_round(*x).to_f32()),
        DType::F16 => v.iter_mut().for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
        _ => {}
    }
}

/// [`round_to`] of one value (inlined, so that loops over values test `dtype` once).
#[inline(always)]
pub(crate) fn round_one(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::BF16 => crate::kernels::bf16_round(v).to_f32(),
        DType::F16 => half::f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`; dense layers, experts and shared experts.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// Loads `{prefix-fn}(gate_proj|up_proj|down_proj)` with the given sizes.
    pub fn load(w: &Weights, name: impl Fn(&str) -> String, hidden: usize, inter: usize) -> Result<Mlp> {
        Ok(Mlp {
            gate_proj: Linear::load(w, &name("gate_proj"), inter, hidden, None)?,
            up_proj: Linear::load(w, &name("up_proj"), inter, hidden, None)?,
            down_proj: Linear::load(w, &name("down_proj"), hidden, inter, None)?,
        })
    }

    /// Bytes of the three weights.
    pub fn weight_bytes(&self) -> usize {
        self.gate_proj.weight_bytes() + self.up_proj.weight_bytes() + self.down_proj.weight_bytes()
    }

    /// `x: (T, hidden)` -> `(T, hidden)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?; // (T, inter)
                                               // silu in f32 and rounded once, as torch computes it for bf16 and f16 tensors (candle's own
                                               // bf16 silu rounds the exponential, the sum and the quotient apart).
        let gate = match gate.dtype() {
            DType::BF16 | DType::F16 => gate.to_dtype(DType::F32)?.silu()?.to_dtype(gate.dtype())?,
            _ => gate.silu()?,
        };
        let up = self.up_proj.forward(x)?; // (T, inter)
        self.down_proj.forward(&(gate * up)?)
    }

    /// The intermediate size.
    pub(crate) fn inter(&self) -> usize {
        self.gate_proj.n_out()
    }

    /// Whether every weight takes [`Mlp::run_token`].
    pub(crate) fn takes_token(&self) -> bool {
        [&self.gate_proj, &self.up_proj, &self.down_proj].iter().all(|l| l.takes_token_rows())
    }

    /// The activation groups the gate and up products read the input in.
    pub(crate) fn input_groups(&self) -> [Option<usize>; 2] {
        [self.gate_proj.act_group(), self.up_proj.act_group()]
    }

    /// The SwiGLU of the MLPs `job(0..n) = (mlp, input)`, each on its own rows of input (codes
    /// made for every [`Mlp::input_groups`]): the chosen experts of a decode step, each on the
    /// tokens that chose it, and the shared or dense MLP on every token. Two parallel passes:
    /// every gate and up product, then every down product, each weight read once for all of
    /// its rows. Output `i` is `scratch.output(i)`, `(rows, hidden)`, rounded to `dtype` as
    /// [`Mlp::forward`] rounds. Allocates nothing once `scratch` has served as many MLPs of
    /// these sizes and rows.
    pub(crate) fn run_token<'a>(
        n: usize,
        job: impl Fn(usize) -> (&'a Mlp, &'a TokenInput) + Sync,
        dtype: DType,
        scratch: &mut MlpScratch,
    ) {
        let MlpScratch { firsts, hidden, downs } = scratch;
        let first = |j: usize| {
            let (m, input) = job(j / 2);
            (if j.is_multiple_of(2) { &m.gate_proj } else { &m.up_proj }, input)
        };
        Linear::token_rows_into(2 * n, first, firsts);
        while hidden.len() < n {
            hidden.push(TokenInput::default());
        }
        // silu(gate) · up, rounded where [`Mlp::forward`] rounds in a bf16 or f16 model: each
        // product, silu (computed in f32), and their product.
        let round = |v: f32| round_one(dtype, v);
        for (i, h) in hidden.iter_mut().enumerate().take(n) {
            let (g, u) = (firsts.get(2 * i), firsts.get(2 * i + 1));
            let x = h.x_mut();
            x.clear();
            x.extend(g.iter().zip(u).map(|(&g, &u)| {
                let (g, u) = (round(g), round(u));
                round(round(g / (1.0 + (-g).exp())) * u)
            }));
            h.requantize([job(i).0.down_proj.act_group()]);
        }
        let hidden = &hidden[..n];
        Linear::token_rows_into(n, |i| (&job(i).0.down_proj, &hidden[i]), downs);
        downs.round(dtype);
    }
}

/// Where [`Mlp::run_token`] keeps its products between steps.
#[derive(Default)]
pub(crate) struct MlpScratch {
    firsts: JobOutputs,
    hidden: Vec<TokenInput>,
    downs: JobOutputs,
}

impl MlpScratch {
    /// The output of MLP `i` of the last [`Mlp::run_token`].
    pub(crate) fn output(&self, i: usize) -> &[f32] {
        self.downs.get(i)
    }

    /// Sizes the buffers for up to `jobs` MLPs like `mlp` (intermediate size at most `inter`)
    /// over `rows` rows in all, at most `per_job` each, so that no later [`Mlp::run_token`]
    /// within those bounds allocates, however a batch's tokens fall on its experts.
    pub(crate) fn reserve(&mut self, mlp: &Mlp, inter: usize, jobs: usize, rows: usize, per_job: usize) {
        const TASK: usize = Linear::TOKEN_TASK_ROWS;
        let hidden = mlp.down_proj.n_out();
        self.firsts.reserve(2 * jobs, 2 * jobs * inter.div_ceil(TASK), 2 * inter.next_multiple_of(TASK) * rows);
        self.downs.reserve(jobs, jobs * hidden.div_ceil(TASK), hidden.next_multiple_of(TASK) * rows);
        while self.hidden.len() < jobs {
            self.hidden.push(TokenInput::default());
        }
        for h in &mut self.hidden[..jobs] {
            h.reserve(per_job * inter, [mlp.down_proj.act_group()]);
        }
    }
}

/// The outputs of [`Linear::token_rows_into`]: job `j`'s rows at `get(j)`.
#[derive(Default)]
pub(crate) struct JobOutputs {
    /// `(job, first row)` of each task.
    tasks: Vec<(usize, usize)>,
    starts: Vec<usize>,
    lens: Vec<usize>,
    /// Rows of input per job.
    ts: Vec<usize>,
    /// Each job's products as the kernels write them: `(out, t)`.
    all: Vec<f32>,
    /// Jobs of more than one row, transposed to `(t, out)`.
    rows: Vec<f32>,
    row_starts: Vec<usize>,
}

impl JobOutputs {
    /// Whether no job has run.
    pub(crate) fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Job `j`'s output, `(t_j, out)`.
    pub(crate) fn get(&self, j: usize) -> &[f32] {
        let n = self.lens[j] * self.ts[j];
        match self.ts[j] {
            1 => &self.all[self.starts[j]..self.starts[j] + n],
            _ => &self.rows[self.row_starts[j]..self.row_starts[j] + n],
        }
    }

    /// Room for `jobs` jobs, `tasks` tasks and `values` products in all.
    pub(crate) fn reserve(&mut self, jobs: usize, tasks: usize, values: usize) {
        use crate::kernels::reserve_to;
        reserve_to(&mut self.tasks, tasks);
        for v in [&mut self.starts, &mut self.lens, &mut self.ts, &mut self.row_starts] {
            reserve_to(v, jobs);
        }
        reserve_to(&mut self.all, values);
        reserve_to(&mut self.rows, values);
    }

    /// Rounds every output to `dtype`, as a `dtype` model stores a product.
    pub(crate) fn round(&mut self, dtype: DType) {
        round_to(dtype, &mut self.all);
        round_to(dtype, &mut self.rows);
    }
}

/// Rows of activations for [`Linear::token_rows_into`] (one per token of a decode step), with
/// their 8-bit forms for the quantized weights that read them (one per activation group in
/// use). Reusable: its buffers are kept from step to step.
#[derive(Default)]
pub(crate) struct TokenInput {
    x: Vec<f32>,
    quantized: Vec<QuantizedRows>,
    /// The first `used` of `quantized` hold the codes of `x`.
    used: usize,
    /// `x` in bf16, valid where every value is one (a bf16 model's activations) and the CPU has
    /// AVX-512 BF16: bf16 weights then multiply it by `vdpbf16ps` ([`dot_block_bf16`]).
    bf16: Vec<half::bf16>,
    bf16_valid: bool,
    /// `bf16` split for the FMA way of multiplying bf16 pairs ([`crate::kernels::push_bf16_halves`]), where the
    /// CPU takes it ([`crate::kernels::gemm::bf16_by_fma`]) and `bf16` is valid.
    split: Vec<f32>,
}

impl TokenInput {
    /// The values, to write before [`TokenInput::requantize`].
    pub(crate) fn x_mut(&mut self) -> &mut Vec<f32> {
        self.bf16_valid = false;
        &mut self.x
    }

    /// The values in bf16, if they are all bf16 values and [`TokenInput::requantize`] saw them.
    fn bf16(&self) -> Option<&[half::bf16]> {
        self.bf16_valid.then_some(&self.bf16[..])
    }

    /// The bf16 values split for the FMA way, where they are.
    fn split(&self) -> Option<&[f32]> {
        (self.bf16_valid && !self.split.is_empty()).then_some(&self.split[..])
    }

    /// The values.
    pub(crate) fn x(&self) -> &[f32] {
        &self.x
    }

    /// Sizes the buffers for `values` values and their codes for each of `groups`, keeping no
    /// values.
    pub(crate) fn reserve(&mut self, values: usize, groups: impl IntoIterator<Item = Option<usize>> + Clone) {
        self.bf16.reserve(values.saturating_sub(self.bf16.len()));
        if crate::kernels::gemm::bf16_by_fma() {
            self.split.reserve(values.next_multiple_of(32).saturating_sub(self.split.len()));
        }
        if self.x.capacity() >= values && self.used > 0 {
            return;
        }
        self.x.clear();
        self.x.resize(values, 0.0);
        self.requantize(groups);
        self.x.clear();
    }

    /// Quantizes the values for each of `groups` (once per distinct group).
    pub(crate) fn requantize(&mut self, groups: impl IntoIterator<Item = Option<usize>>) {
        self.bf16_valid = false;
        if crate::kernels::gemm::has_avx512_bf16() {
            self.bf16.clear();
            let mut exact = true;
            self.bf16.extend(self.x.iter().map(|&v| {
                let b = half::bf16::from_f32(v);
                exact &= b.to_f32() == v;
                b
            }));
            self.bf16_valid = exact;
            self.split.clear();
            if exact && crate::kernels::gemm::bf16_by_fma() {
                crate::kernels::push_bf16_halves(&self.bf16, &mut self.split);
            }
        }
        self.used = 0;
        for group in groups.into_iter().flatten() {
            if self.quantized[..self.used].iter().any(|q| q.group == group) {
                continue;
            }
            if self.used == self.quantized.len() {
                self.quantized.push(QuantizedRows::empty(group));
            }
            self.quantized[self.used].quantize(&self.x, group);
            self.used += 1;
        }
    }

    fn quantized(&self, group: usize) -> Option<&QuantizedRows> {
        self.quantized[..self.used].iter().find(|q| q.group == group)
    }
}

/// Softmax over the last dim, computed in f32; returns f32. Differentiable (training uses it too).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    crate::model::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)
}
