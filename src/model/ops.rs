//! Fused row-wise ops with their own backward passes, over the kernels of `crate::kernels::rows`:
//! softmax over the last dim, RMS normalisation, and per-row cross-entropy. They compute what the
//! composed tensor-op versions compute (the reference twins below, tested against them), with one
//! pass over memory each way instead of one per elementary op. Only contiguous f32 CPU tensors take
//! the fused path; anything else falls back to the composed ops.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, D};

use crate::error::{Error, Result};
use crate::kernels::rows;

/// Runs `f` on the elements of a contiguous f32 CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => candle_core::bail!("fused row op: expected a contiguous f32 CPU tensor"),
    }
}

fn f32_input<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], usize)> {
    let (CpuStorage::F32(v), Some((a, b))) = (s, l.contiguous_offsets()) else {
        candle_core::bail!("fused row op: expected a contiguous f32 CPU tensor");
    };
    Ok((&v[a..b], l.dims().last().copied().unwrap_or(1)))
}

fn fusable(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && x.device().is_cpu() && x.rank() >= 1 && x.elem_count() > 0
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "latent-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, cols) = f32_input(s, l)?;
        let mut y = vec![0.0; x.len()];
        rows::softmax_rows(x, cols, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let cols = res.dims().last().copied().unwrap_or(1);
        let mut dx = vec![0.0; res.elem_count()];
        with_f32(res, |y| with_f32(grad, |g| rows::softmax_rows_bwd(y, g, cols, &mut dx)))??;
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

struct RmsNormalize {
    eps: f32,
}

impl CustomOp1 for RmsNormalize {
    fn name(&self) -> &'static str {
        "latent-rms-normalize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, cols) = f32_input(s, l)?;
        let mut y = vec![0.0; x.len()];
        rows::rms_rows(x, cols, self.eps, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let cols = arg.dims().last().copied().unwrap_or(1);
        let mut dx = vec![0.0; arg.elem_count()];
        with_f32(arg, |x| with_f32(grad, |g| rows::rms_rows_bwd(x, g, cols, self.eps, &mut dx)))??;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

struct CrossEntropy {
    targets: Vec<u32>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "latent-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, cols) = f32_input(s, l)?;
        let mut loss = vec![0.0; self.targets.len()];
        rows::cross_entropy_rows(x, cols, &self.targets, &mut loss);
        Ok((CpuStorage::F32(loss), Shape::from(self.targets.len())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let cols = arg.dims().last().copied().unwrap_or(1);
        let mut dx = vec![0.0; arg.elem_count()];
        with_f32(arg, |x| with_f32(grad, |g| rows::cross_entropy_rows_bwd(x, cols, &self.targets, g, &mut dx)))??;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Softmax over the last dim of an f32 tensor (fused when possible), differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        return Ok(x.contiguous()?.apply_op1(Softmax)?);
    }
    softmax_composed(x)
}

/// `x / sqrt(mean(x²) + eps)` over the last dim of an f32 tensor (fused when possible), differentiable.
pub fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(x) {
        return Ok(x.contiguous()?.apply_op1(RmsNormalize { eps: eps as f32 })?);
    }
    rms_composed(x, eps)
}

/// Per-row cross-entropy `logsumexp(x_i) − x_i[t_i]` of `logits (N, V)`, f32 `(N)`, differentiable.
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        return Err(Error::InvalidArgument(format!("{} targets for {n} rows of logits", targets.len())));
    }
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= v) {
        return Err(Error::InvalidArgument(format!("target id {bad} is outside the vocabulary ({v} logits)")));
    }
    if fusable(logits) {
        return Ok(logits.contiguous()?.apply_op1(CrossEntropy { targets: targets.to_vec() })?);
    }
    cross_entropy_composed(&logits.to_dtype(DType::F32)?, targets)
}

/// Reference twin of [`softmax_last_dim`], from elementary ops.
pub fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Reference twin of [`rms_normalize`], from elementary ops.
pub fn rms_composed(x: &Tensor, eps: f64) -> Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?)
}

/// Reference twin of [`cross_entropy_rows`], from elementary ops.
pub fn cross_entropy_composed(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let picked: Vec<u32> = targets.iter().enumerate().map(|(i, &t)| (i * v) as u32 + t).collect();
    let picked = logits.flatten_all()?.index_select(&Tensor::from_vec(picked, n, logits.device())?, 0)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?.squeeze(D::Minus1)?;
    Ok((lse - picked)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        let mut s = seed;
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 6.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= tol, "max difference {d}");
    }

    /// Value and gradient (against a random upstream gradient) of fused and composed versions.
    fn check(fused: impl Fn(&Tensor) -> Tensor, composed: impl Fn(&Tensor) -> Tensor, shape: (usize, usize)) {
        let x = Var::from_tensor(&random(shape, 1)).unwrap();
        let (a, b) = (fused(x.as_tensor()), composed(x.as_tensor()));
        close(&a, &b, 1e-5);
        let w = if a.rank() == 1 { random((shape.0, 1), 2).squeeze(1).unwrap() } else { random(shape, 2) };
        let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        close(ga.get(x.as_tensor()).unwrap(), gb.get(x.as_tensor()).unwrap(), 1e-5);
    }

    #[test]
    fn fused_ops_match_their_composed_twins() {
        for shape in [(1, 1), (3, 7), (37, 130), (5, 4096)] {
            check(|x| softmax_last_dim(x).unwrap(), |x| softmax_composed(x).unwrap(), shape);
            check(|x| rms_normalize(x, 1e-6).unwrap(), |x| rms_composed(x, 1e-6).unwrap(), shape);
            let targets: Vec<u32> = (0..shape.0).map(|i| ((i * 7) % shape.1) as u32).collect();
            let t2 = targets.clone();
            check(
                move |x| cross_entropy_rows(x, &targets).unwrap(),
                move |x| cross_entropy_composed(x, &t2).unwrap(),
                shape,
            );
        }
    }

    #[test]
    fn masked_rows_and_bad_targets() {
        let x = Tensor::new(&[[f32::NEG_INFINITY, 0.0], [f32::NEG_INFINITY, f32::NEG_INFINITY]], &Device::Cpu).unwrap();
        let y = softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![0.0, 1.0], vec![0.0, 0.0]]);
        assert!(cross_entropy_rows(&random((2, 3), 3), &[0, 3]).is_err());
    }
}
