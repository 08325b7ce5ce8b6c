//! The latent KV cache: per layer and per token, only `c_kv` (d_c, after `kv_a_layernorm`) and the
//! rotated `k_rope` (d_r) — `kv_lora_rank + qk_rope_head_dim` values. Nothing per head is cached.
//!
//! Rows live in two growable buffers per layer (`c_kv` and `k_rope`), so each read is a contiguous
//! view of the first `len` rows. Capacity doubles when full; memory is counted in bytes.
//!
//! An int8 cache ([`CacheKind::Int8`]) keeps 8-bit codes instead, with a scale per 128 latents
//! ([`Int8Rows`]): 596 bytes a row at V2's sizes against 1152 in bf16. Its latents are cached
//! before `kv_a_layernorm`'s gain, which the attention folds into its query and output.

use candle_core::{DType, Device, Tensor};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::kernels::latent_int8::Int8Rows;

/// How cached rows are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// In a float dtype.
    Dense(DType),
    /// 8-bit codes, a scale per 128 latents and one for the RoPE part.
    Int8,
}

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
    /// The rows of an int8 cache (then `layers` stay empty).
    int8: Vec<Int8Rows>,
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
        Ok(LatentCache {
            layers: vec![empty; cfg.num_hidden_layers],
            int8: Vec::new(),
            d_c,
            d_r,
            dtype,
            device: device.clone(),
        })
    }

    /// An empty cache for `cfg` of the given kind.
    pub fn with_kind(cfg: &Config, kind: CacheKind, device: &Device) -> Result<LatentCache> {
        match kind {
            CacheKind::Dense(dtype) => LatentCache::new(cfg, dtype, device),
            CacheKind::Int8 => {
                let (d_c, d_r) = (cfg.kv_lora_rank, cfg.qk_rope_head_dim);
                let rows = Int8Rows::new(d_c, d_r).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "an int8 latent cache needs kv_lora_rank and qk_rope_head_dim in multiples of 4, \
                         the model has {d_c} and {d_r}"
                    ))
                })?;
                Ok(LatentCache {
                    layers: Vec::new(),
                    int8: vec![rows; cfg.num_hidden_layers],
                    d_c,
                    d_r,
                    dtype: DType::F32,
                    device: device.clone(),
                })
            }
        }
    }

    /// How the rows are stored.
    pub fn kind(&self) -> CacheKind {
        if self.int8.is_empty() {
            CacheKind::Dense(self.dtype)
        } else {
            CacheKind::Int8
        }
    }

    /// Tokens cached (the position the next token will take).
    pub fn len(&self) -> usize {
        match self.int8.first() {
            Some(rows) => rows.len(),
            None => self.layers.first().map_or(0, |l| l.len),
        }
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes one token occupies across all layers: `n_layers * (d_c + d_r) * dtype size`, or
    /// the codes and scales of an int8 cache.
    pub fn bytes_per_token(&self) -> usize {
        match self.int8.first() {
            Some(rows) => self.int8.len() * rows.bytes_per_row(),
            None => self.layers.len() * (self.d_c + self.d_r) * self.dtype.size_in_bytes(),
        }
    }

    /// Forgets every token, keeping the buffers.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keeps only the first `len` tokens (a no-op if fewer are cached).
    pub fn truncate(&mut self, len: usize) {
        self.layers.iter_mut().for_each(|l| l.len = l.len.min(len));
        self.int8.iter_mut().for_each(|rows| rows.truncate(len));
    }

    /// Makes room for `tokens` tokens in every layer without growing again, so a caller that knows
    /// how long the sequence will get (the prompt plus the tokens to generate) pays for no copy
    /// of the rows mid-generation.
    pub fn reserve(&mut self, tokens: usize) -> Result<()> {
        self.int8.iter_mut().for_each(|rows| rows.reserve(tokens));
        for layer in 0..self.layers.len() {
            self.grow(layer, tokens)?;
        }
        Ok(())
    }

    /// Ensures `layer` holds at least `capacity` rows, copying the cached ones over.
    fn grow(&mut self, layer: usize, capacity: usize) -> Result<()> {
        let rows = &mut self.layers[layer];
        if capacity <= rows.c_kv.dim(0)? {
            return Ok(());
        }
        let grown_c = Tensor::zeros((capacity, self.d_c), self.dtype, &self.device)?;
        let grown_r = Tensor::zeros((capacity, self.d_r), self.dtype, &self.device)?;
        if rows.len > 0 {
            grown_c.slice_set(&rows.c_kv.narrow(0, 0, rows.len)?, 0, 0)?;
            grown_r.slice_set(&rows.k_rope.narrow(0, 0, rows.len)?, 0, 0)?;
        }
        rows.c_kv = grown_c;
        rows.k_rope = grown_r;
        Ok(())
    }

    /// Appends `c_kv: (T, d_c)` and `k_rope: (T, d_r)` to `layer`; returns all rows `(S, d_c)`, `(S, d_r)`.
    /// Capacity at least doubles when it runs out.
    pub fn append(&mut self, layer: usize, c_kv: &Tensor, k_rope: &Tensor) -> Result<(Tensor, Tensor)> {
        if !self.int8.is_empty() {
            return Err(Error::InvalidArgument("an int8 latent cache takes rows through append_int8".into()));
        }
        let (len, capacity) = (self.layers[layer].len, self.layers[layer].c_kv.dim(0)?);
        let needed = len + c_kv.dim(0)?;
        if needed > capacity {
            self.grow(layer, needed.max(2 * capacity).max(64))?;
        }
        let dtype = self.dtype;
        let rows = &mut self.layers[layer];
        rows.c_kv.slice_set(&c_kv.to_dtype(dtype)?.contiguous()?, 0, len)?;
        rows.k_rope.slice_set(&k_rope.to_dtype(dtype)?.contiguous()?, 0, len)?;
        rows.len = needed;
        Ok((rows.c_kv.narrow(0, 0, needed)?, rows.k_rope.narrow(0, 0, needed)?))
    }
}

impl LatentCache {
    /// Appends to an int8 cache's `layer` the normalized latents `c_hat: (T, d_c)` (before
    /// `kv_a_layernorm`'s gain) and `k_rope: (T, d_r)`.
    pub fn append_int8(&mut self, layer: usize, c_hat: &Tensor, k_rope: &Tensor) -> Result<()> {
        let rows = self
            .int8
            .get_mut(layer)
            .ok_or_else(|| Error::InvalidArgument(format!("layer {layer} has no int8 latent cache")))?;
        let c: Vec<f32> = c_hat.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let r: Vec<f32> = k_rope.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        for (c, r) in c.chunks_exact(self.d_c).zip(r.chunks_exact(self.d_r)) {
            rows.push(c, r);
        }
        Ok(())
    }

    /// An int8 cache's rows of `layer`.
    pub fn int8_rows(&self, layer: usize) -> Option<&Int8Rows> {
        self.int8.get(layer)
    }

    /// An int8 cache's rows of `layer` dequantized: `(S, d_c)` normalized latents and `(S, d_r)`, f32.
    pub fn dequantized(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let rows = self
            .int8
            .get(layer)
            .ok_or_else(|| Error::InvalidArgument(format!("layer {layer} has no int8 latent cache")))?;
        let (c, r) = rows.dequantize();
        let s = rows.len();
        Ok((Tensor::from_vec(c, (s, self.d_c), &self.device)?, Tensor::from_vec(r, (s, self.d_r), &self.device)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(first: usize, n: usize, width: usize) -> Tensor {
        let values: Vec<f32> = (first * width..(first + n) * width).map(|v| v as f32).collect();
        Tensor::from_vec(values, (n, width), &Device::Cpu).unwrap()
    }

    #[test]
    fn rows_survive_reserving_and_growing() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-v2/config.json");
        let cfg = Config::from_file(&path).unwrap();
        let (d_c, d_r) = (cfg.kv_lora_rank, cfg.qk_rope_head_dim);
        let mut cache = LatentCache::new(&cfg, DType::F32, &Device::Cpu).unwrap();
        cache.append(0, &rows(0, 3, d_c), &rows(0, 3, d_r)).unwrap();
        cache.reserve(100).unwrap();
        assert_eq!(cache.layers[0].c_kv.dim(0).unwrap(), 100);
        assert_eq!(cache.layers[1].c_kv.dim(0).unwrap(), 100, "every layer is reserved");
        cache.append(0, &rows(3, 97, d_c), &rows(3, 97, d_r)).unwrap();
        assert_eq!(cache.layers[0].c_kv.dim(0).unwrap(), 100, "appends within the reservation do not grow");
        // Past the reservation capacity doubles, and every row is kept.
        let (c, r) = cache.append(0, &rows(100, 1, d_c), &rows(100, 1, d_r)).unwrap();
        assert_eq!(cache.layers[0].c_kv.dim(0).unwrap(), 200);
        assert_eq!(
            c.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            rows(0, 101, d_c).flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            r.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            rows(0, 101, d_r).flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // A smaller reservation changes nothing.
        cache.reserve(10).unwrap();
        assert_eq!(cache.layers[0].c_kv.dim(0).unwrap(), 200);
    }
}
