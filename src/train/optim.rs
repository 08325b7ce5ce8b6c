//! AdamW (Loshchilov & Hutter) on flat f32 buffers, and global-norm gradient clipping, as PyTorch's
//! `torch.optim.AdamW` and `clip_grad_norm_` compute them:
//! `p *= 1 - lr wd; m = β1 m + (1-β1) g; v = β2 v + (1-β2) g²;
//!  p -= lr (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + eps)`.

use rayon::prelude::*;

/// Moment buffers of every parameter tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// Steps taken.
    pub t: u64,
}

/// Hyper-parameters of one step.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl AdamW {
    /// Zero moments for tensors of these sizes.
    pub fn new(sizes: &[usize]) -> AdamW {
        AdamW {
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            t: 0,
        }
    }

    /// One update of `params` by `grads`; `decay[i]` is tensor `i`'s weight decay.
    pub fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], decay: &[f64], h: AdamWStep) {
        self.t += 1;
        let bc1 = 1.0 - h.beta1.powi(self.t as i32);
        let bc2 = 1.0 - h.beta2.powi(self.t as i32);
        let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
        let step_size = (h.lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = h.eps as f32;
        params
            .par_iter_mut()
            .zip(grads.par_iter())
            .zip(self.m.par_iter_mut())
            .zip(self.v.par_iter_mut())
            .zip(decay.par_iter())
            .for_each(|((((p, g), m), v), &wd)| {
                let shrink = (1.0 - h.lr * wd) as f32;
                for i in 0..p.len() {
                    let gi = g[i];
                    m[i] = b1 * m[i] + (1.0 - b1) * gi;
                    v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                    let denom = v[i].sqrt() / bc2_sqrt + eps;
                    p[i] = p[i] * shrink - step_size * m[i] / denom;
                }
            });
    }
}

/// The global L2 norm of `grads`; if above `max_norm` (> 0), scales them down to it, as
/// `clip_grad_norm_` does (`g *= max_norm / (norm + 1e-6)`). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let sq: f64 = grads.par_iter().map(|g| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).sum();
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let c = (max_norm / (norm + 1e-6)) as f32;
        grads.par_iter_mut().for_each(|g| g.iter_mut().for_each(|x| *x *= c));
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_weight_by_lr() {
        // With bias correction the first Adam step is lr * sign(g) (|g| >> eps), plus decay.
        let mut opt = AdamW::new(&[3]);
        let mut p = vec![vec![1.0f32, -2.0, 0.5]];
        let g = vec![vec![0.3f32, -4.0, 1e-2]];
        opt.step(&mut p, &g, &[0.1], AdamWStep { lr: 0.01, beta1: 0.9, beta2: 0.95, eps: 1e-8 });
        let want = [1.0 * 0.999 - 0.01, -2.0 * 0.999 + 0.01, 0.5 * 0.999 - 0.01];
        for (a, b) in p[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![vec![3.0f32], vec![4.0]];
        let norm = clip_grad_norm(&mut g, 1.0);
        assert!((norm - 5.0).abs() < 1e-9);
        let after = (g[0][0].powi(2) + g[1][0].powi(2)).sqrt();
        assert!((after - 1.0).abs() < 1e-5);
        let mut small = vec![vec![0.1f32]];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small[0][0], 0.1);
    }
}
