//! The small building blocks: `Linear`, `RmsNorm`, SwiGLU `Mlp`, and a softmax over the last dim.
//!
//! Norms and softmax compute in f32 whatever the compute dtype, as the reference does
//! (`DeepseekV2RMSNorm.forward`, `eager_attention_forward` in transformers 5.23).

use candle_core::{CpuStorage, DType, Storage, Tensor};

use std::sync::Arc;

use crate::error::Result;
use crate::kernels::matvec::{matvec, MAX_ROWS};
use crate::kernels::quant::{dequantize_q8_0, matvec_q8_0, quantize_q8_0, BlockQ8_0, QK8_0};
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
    q8: Option<Q8Weight>,
    bias: Option<Tensor>,
}

/// A `(out, in)` weight in Q8_0 blocks.
#[derive(Debug, Clone)]
struct Q8Weight {
    blocks: Arc<Vec<BlockQ8_0>>,
    n_out: usize,
    n_in: usize,
}

impl Linear {
    /// Loads `name` with shape `(out, in)`, and its bias `bias_name` if given.
    pub fn load(w: &Weights, name: &str, out: usize, inp: usize, bias_name: Option<&str>) -> Result<Linear> {
        let mut weight = w.get(name, &[out, inp])?;
        let bias = match bias_name {
            Some(b) => Some(w.get(b, &[out])?),
            None => None,
        };
        let mut q8 = None;
        if w.quant() == Some(Quant::Q8_0) && inp.is_multiple_of(QK8_0) && !weight.track_op() {
            let values: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            q8 = Some(Q8Weight { blocks: Arc::new(quantize_q8_0(&values)), n_out: out, n_in: inp });
            weight = Tensor::zeros(0, weight.dtype(), weight.device())?;
        }
        Ok(Linear { weight, q8, bias })
    }

    /// Bytes the weight occupies (Q8_0 blocks or dense elements), bias excluded.
    pub fn weight_bytes(&self) -> usize {
        match &self.q8 {
            Some(q) => q.blocks.len() * std::mem::size_of::<BlockQ8_0>(),
            None => self.weight.elem_count() * self.weight.dtype().size_in_bytes(),
        }
    }

    /// `x Wᵀ` from Q8_0 blocks: the kernel for up to `MAX_ROWS` rows, else a GEMM over the
    /// dequantized weight (for many rows the product costs far more than the dequantization).
    fn forward_q8(q: &Q8Weight, x: &Tensor) -> Result<Tensor> {
        let (t, n_in) = x.dims2()?;
        let xs = x.to_dtype(DType::F32)?;
        let y = if t <= MAX_ROWS {
            let xv: Vec<f32> = xs.flatten_all()?.to_vec1()?;
            Tensor::from_vec(matvec_q8_0(&xv, &q.blocks, t, n_in, q.n_out), (t, q.n_out), x.device())?
        } else {
            let dense = Tensor::from_vec(dequantize_q8_0(&q.blocks), (q.n_out, q.n_in), x.device())?;
            xs.matmul(&dense.t()?)?
        };
        Ok(y.to_dtype(x.dtype())?)
    }

    /// `x Wᵀ` by the matvec kernel, if `x` has few rows and `W` is contiguous bf16 or f32 on the CPU.
    fn matvec(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (t, n_in) = x.dims2()?;
        let (n_out, _) = self.weight.dims2()?;
        // The kernel is not differentiable: weights that track gradients (training) take GEMM.
        if t > MAX_ROWS || self.weight.track_op() {
            return Ok(None);
        }
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let y = with_stored(&self.weight, |w| match w {
            Stored::Bf16(w) => matvec(&xs, w, t, n_in, n_out),
            Stored::F32(w) => matvec(&xs, w, t, n_in, n_out),
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
        Linear { weight, q8: None, bias: None }
    }

    /// `x: (T, in)` -> `(T, out)`. Up to `MAX_ROWS` rows (decode, short prompts) go through
    /// [`matvec`], more through GEMM.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.q8 {
            Some(q) => Linear::forward_q8(q, x)?,
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

/// `1 / (1 + e^-x)` from differentiable ops.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// Root-mean-square norm: `w * x / sqrt(mean(x²) + eps)`, normalised in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads the `(dim,)` weight `name`.
    pub fn load(w: &Weights, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: w.get(name, &[dim])?, eps })
    }

    /// Bytes of the weight.
    pub fn weight_bytes(&self) -> usize {
        self.weight.elem_count() * self.weight.dtype().size_in_bytes()
    }

    /// Normalises over the last dim; returns the input's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let normed = crate::model::ops::rms_normalize(&x.to_dtype(DType::F32)?, self.eps)?.to_dtype(dtype)?;
        Ok(normed.broadcast_mul(&self.weight)?)
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
        let gate = self.gate_proj.forward(x)?.silu()?; // (T, inter)
        let up = self.up_proj.forward(x)?; // (T, inter)
        self.down_proj.forward(&(gate * up)?)
    }
}

/// Softmax over the last dim, computed in f32; returns f32. Differentiable (training uses it too).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    crate::model::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)
}
