//! The latent KV cache: per layer and per token, only `c_kv` (d_c, after `kv_a_layernorm`) and the
//! rotated `k_rope` (d_r) — `kv_lora_rank + qk_rope_head_dim` values. Nothing per head is cached.
//!
//! Rows live in two growable buffers per layer (`c_kv` and `k_rope`), so each read is a contiguous
//! view of the first `len` rows. Capacity doubles when full; memory is counted in bytes.

use candle_core::{DType, Device, Tensor};

use crate::config::Config;
use crate::error::Result;

/// One layer's latent rows.
#[derive(Debug, Clone)]
struct LayerRows {
    c_kv: Tensor,   // (capacity, d_c)
    k_rope: Tensor, // (capacity, d_r)
    len: usize,
}

/// The latent cache of one sequence, for every layer.
#[derive(Debug, Clone)]
pub struct LatentCache {
    layers: Vec<LayerRows>,
    d_c: usize,
    d_r: usize,
    dtype: DType,
    device: Device,
}

impl LatentCache {
    /// An empty cache for `cfg` holding rows in `dtype`.
    pub fn new(cfg: &Config, dtype: DType, device: &Device) -> Result<LatentCache> {
        let (d_c, d_r) = (cfg.kv_lora_rank, cfg.qk_rope_head_dim);
        let empty = LayerRows {
            c_kv: Tensor::zeros((0, d_c), dtype, device)?,
            k_rope: Tensor::zeros((0, d_r), dtype, device)?,
            len: 0,
        };
        Ok(LatentCache { layers: vec![empty; cfg.num_hidden_layers], d_c, d_r, dtype, device: device.clone() })
    }

    /// Tokens cached (the position the next token will take).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes one token occupies across all layers: `n_layers * (d_c + d_r) * dtype size`.
    pub fn bytes_per_token(&self) -> usize {
        self.layers.len() * (self.d_c + self.d_r) * self.dtype.size_in_bytes()
    }

    /// Forgets every token, keeping the buffers.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keeps only the first `len` tokens (a no-op if fewer are cached).
    pub fn truncate(&mut self, len: usize) {
        self.layers.iter_mut().for_each(|l| l.len = l.len.min(len));
    }

    /// Appends `c_kv: (T, d_c)` and `k_rope: (T, d_r)` to `layer`; returns all rows `(S, d_c)`, `(S, d_r)`.
    pub fn append(&mut self, layer: usize, c_kv: &Tensor, k_rope: &Tensor) -> Result<(Tensor, Tensor)> {
        let (d_c, d_r, dtype) = (self.d_c, self.d_r, self.dtype);
        let device = self.device.clone();
        let rows = &mut self.layers[layer];
        let t = c_kv.dim(0)?;
        let needed = rows.len + t;
        if needed > rows.c_kv.dim(0)? {
            let capacity = needed.max(2 * rows.c_kv.dim(0)?).max(64);
            let grown_c = Tensor::zeros((capacity, d_c), dtype, &device)?;
            let grown_r = Tensor::zeros((capacity, d_r), dtype, &device)?;
            if rows.len > 0 {
                grown_c.slice_set(&rows.c_kv.narrow(0, 0, rows.len)?, 0, 0)?;
                grown_r.slice_set(&rows.k_rope.narrow(0, 0, rows.len)?, 0, 0)?;
            }
            rows.c_kv = grown_c;
            rows.k_rope = grown_r;
        }
        rows.c_kv.slice_set(&c_kv.to_dtype(dtype)?.contiguous()?, 0, rows.len)?;
        rows.k_rope.slice_set(&k_rope.to_dtype(dtype)?.contiguous()?, 0, rows.len)?;
        rows.len = needed;
        Ok((rows.c_kv.narrow(0, 0, needed)?, rows.k_rope.narrow(0, 0, needed)?))
    }
}
