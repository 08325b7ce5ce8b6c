//! The latent KV cache: per layer and per token, only `c_kv` (d_c, after `kv_a_layernorm`) and the
//! rotated `k_rope` (d_r) — `kv_lora_rank + qk_rope_head_dim` values. Nothing per head is cached.
//!
//! Rows live in two growable buffers per layer (`c_kv` and `k_rope`) in the cache's dtype, owned
//! here, so that a decode step writes its row in place and reads the first `len` rows as slices.
//! Capacity doubles when full; memory is counted in bytes. The tensor path ([`LatentCache::append`])
//! gets a copy of the rows as tensors.
//!
//! An int8 cache ([`CacheKind::Int8`]) keeps 8-bit codes instead, with a scale per 128 latents
//! ([`Int8Rows`]): 596 bytes a row at V2's sizes against 1152 in bf16. Its latents are cached
//! before `kv_a_layernorm`'s gain, which the attention folds into its query and output.

use candle_core::{DType, Device, Tensor};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::kernels::latent_int8::Int8Rows;
use crate::model::layers::Stored;

/// How cached rows are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// In a float dtype.
    Dense(DType),
    /// 8-bit codes, a scale per 128 latents and one for the RoPE part.
    Int8,
}

/// Values in one float dtype.
#[derive(Debug, Clone)]
enum Buf {
    Bf16(Vec<half::bf16>),
    F16(Vec<half::f16>),
    F32(Vec<f32>),
}

impl Buf {
    fn new(dtype: DType) -> Result<Buf> {
        match dtype {
            DType::BF16 => Ok(Buf::Bf16(Vec::new())),
            DType::F16 => Ok(Buf::F16(Vec::new())),
            DType::F32 => Ok(Buf::F32(Vec::new())),
            other => Err(Error::InvalidArgument(format!("a latent cache holds bf16, f16 or f32 rows, not {other:?}"))),
        }
    }

    fn len(&self) -> usize {
        match self {
            Buf::Bf16(v) => v.len(),
            Buf::F16(v) => v.len(),
            Buf::F32(v) => v.len(),
        }
    }

    /// Keeps the first `n` values and frees the rest of the allocation.
    fn shrink(&mut self, n: usize) {
        match self {
            Buf::Bf16(v) => (v.truncate(n), v.shrink_to_fit()),
            Buf::F16(v) => (v.truncate(n), v.shrink_to_fit()),
            Buf::F32(v) => (v.truncate(n), v.shrink_to_fit()),
        };
    }

    /// Grows to `n` values (zeros), copying the old ones once.
    fn grow(&mut self, n: usize) {
        match self {
            Buf::Bf16(v) => v.resize(n, half::bf16::ZERO),
            Buf::F16(v) => v.resize(n, half::f16::ZERO),
            Buf::F32(v) => v.resize(n, 0.0),
        }
    }

    /// Writes `values`, converted, from value `at` on.
    fn write(&mut self, at: usize, values: &[f32]) {
        let n = values.len();
        match self {
            Buf::Bf16(v) => v[at..at + n].iter_mut().zip(values).for_each(|(d, &x)| *d = half::bf16::from_f32(x)),
            Buf::F16(v) => v[at..at + n].iter_mut().zip(values).for_each(|(d, &x)| *d = half::f16::from_f32(x)),
            Buf::F32(v) => v[at..at + n].copy_from_slice(values),
        }
    }

    /// Writes the values of `t`, converted to this buffer's dtype, from value `at` on.
    fn write_tensor(&mut self, at: usize, t: &Tensor) -> Result<()> {
        let t = t.flatten_all()?;
        match self {
            Buf::Bf16(v) => copy_into(&mut v[at..], &t.to_dtype(DType::BF16)?.to_vec1()?),
            Buf::F16(v) => copy_into(&mut v[at..], &t.to_dtype(DType::F16)?.to_vec1()?),
            Buf::F32(v) => copy_into(&mut v[at..], &t.to_dtype(DType::F32)?.to_vec1()?),
        }
        Ok(())
    }

    /// The first `rows` rows of `width` values as a tensor (a copy).
    fn tensor(&self, rows: usize, width: usize, device: &Device) -> Result<Tensor> {
        let n = rows * width;
        Ok(match self {
            Buf::Bf16(v) => Tensor::from_slice(&v[..n], (rows, width), device)?,
            Buf::F16(v) => Tensor::from_slice(&v[..n], (rows, width), device)?,
            Buf::F32(v) => Tensor::from_slice(&v[..n], (rows, width), device)?,
        })
    }
}

fn copy_into<T: Copy>(dst: &mut [T], src: &[T]) {
    dst[..src.len()].copy_from_slice(src);
}

/// One layer's latent rows: `capacity` rows of each buffer, the first `len` written.
#[derive(Debug, Clone)]
struct LayerRows {
    c_kv: Buf,   // (capacity, d_c)
    k_rope: Buf, // (capacity, d_r)
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
        let empty = LayerRows { c_kv: Buf::new(dtype)?, k_rope: Buf::new(dtype)?, len: 0 };
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

    /// Returns the memory past the rows held to the allocator (a cache kept for its prefix).
    pub fn shrink(&mut self) {
        let (d_c, d_r) = (self.d_c, self.d_r);
        for rows in &mut self.layers {
            let len = rows.len;
            rows.c_kv.shrink(len * d_c);
            rows.k_rope.shrink(len * d_r);
        }
        self.int8.iter_mut().for_each(Int8Rows::shrink);
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

    /// Rows `layer` holds room for.
    fn capacity(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |rows| rows.c_kv.len() / self.d_c.max(1))
    }

    /// Ensures `layer` holds at least `capacity` rows, copying the cached ones over.
    fn grow(&mut self, layer: usize, capacity: usize) -> Result<()> {
        if capacity <= self.capacity(layer) {
            return Ok(());
        }
        let rows = &mut self.layers[layer];
        rows.c_kv.grow(capacity * self.d_c);
        rows.k_rope.grow(capacity * self.d_r);
        Ok(())
    }

    /// Appends `c_kv: (T, d_c)` and `k_rope: (T, d_r)` to `layer`; returns all rows `(S, d_c)`,
    /// `(S, d_r)` (copies, in the cache's dtype). Capacity at least doubles when it runs out.
    pub fn append(&mut self, layer: usize, c_kv: &Tensor, k_rope: &Tensor) -> Result<(Tensor, Tensor)> {
        if !self.int8.is_empty() {
            return Err(Error::InvalidArgument("an int8 latent cache takes rows through append_int8".into()));
        }
        let (t, capacity) = (c_kv.dim(0)?, self.capacity(layer));
        let Some(len) = self.layers.get(layer).map(|rows| rows.len) else {
            return Err(Error::InvalidArgument(format!("the latent cache has no layer {layer}")));
        };
        if k_rope.dims() != [t, self.d_r] || c_kv.dims() != [t, self.d_c] {
            return Err(Error::InvalidArgument(format!(
                "latent cache rows are ({t}, {}) and ({t}, {}), got {:?} and {:?}",
                self.d_c,
                self.d_r,
                c_kv.dims(),
                k_rope.dims()
            )));
        }
        let needed = len + t;
        if needed > capacity {
            self.grow(layer, needed.max(2 * capacity).max(64))?;
        }
        let rows = &mut self.layers[layer];
        rows.c_kv.write_tensor(len * self.d_c, c_kv)?;
        rows.k_rope.write_tensor(len * self.d_r, k_rope)?;
        rows.len = needed;
        Ok((rows.c_kv.tensor(needed, self.d_c, &self.device)?, rows.k_rope.tensor(needed, self.d_r, &self.device)?))
    }
}

impl LatentCache {
    /// Appends one token's row to `layer`: `c` (`d_c` latents; for an int8 cache, normalized
    /// without `kv_a_layernorm`'s gain) and `r` (`d_r` rotated RoPE values), in place. Allocates
    /// nothing within the capacity ([`LatentCache::reserve`]). Dense rows must be bf16 or f32.
    pub fn push_row(&mut self, layer: usize, c: &[f32], r: &[f32]) -> Result<()> {
        if c.len() != self.d_c || r.len() != self.d_r {
            return Err(Error::InvalidArgument(format!(
                "a latent cache row is {} + {} values, got {} + {}",
                self.d_c,
                self.d_r,
                c.len(),
                r.len()
            )));
        }
        if let Some(rows) = self.int8.get_mut(layer) {
            rows.push(c, r);
            return Ok(());
        }
        let (capacity, (d_c, d_r)) = (self.capacity(layer), (self.d_c, self.d_r));
        let Some(len) = self.layers.get(layer).map(|rows| rows.len) else {
            return Err(Error::InvalidArgument(format!("the latent cache has no layer {layer}")));
        };
        if len + 1 > capacity {
            self.grow(layer, (2 * capacity).max(64))?;
        }
        let rows = &mut self.layers[layer];
        rows.c_kv.write(len * d_c, c);
        rows.k_rope.write(len * d_r, r);
        rows.len += 1;
        Ok(())
    }

    /// Runs `f` on the cached rows of a dense `layer` as stored: `(len, d_c)` and `(len, d_r)`,
    /// row-major. `None` for an int8 cache, or rows neither bf16 nor f32.
    pub(crate) fn with_dense_rows<R>(&self, layer: usize, f: impl FnOnce(Stored<'_>, Stored<'_>) -> R) -> Option<R> {
        let rows = self.layers.get(layer)?;
        let (c_len, r_len) = (rows.len * self.d_c, rows.len * self.d_r);
        match (&rows.c_kv, &rows.k_rope) {
            (Buf::Bf16(c), Buf::Bf16(r)) => Some(f(Stored::Bf16(&c[..c_len]), Stored::Bf16(&r[..r_len]))),
            (Buf::F32(c), Buf::F32(r)) => Some(f(Stored::F32(&c[..c_len]), Stored::F32(&r[..r_len]))),
            _ => None,
        }
    }

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
        assert_eq!(cache.capacity(0), 100);
        assert_eq!(cache.capacity(1), 100, "every layer is reserved");
        cache.append(0, &rows(3, 97, d_c), &rows(3, 97, d_r)).unwrap();
        assert_eq!(cache.capacity(0), 100, "appends within the reservation do not grow");
        // Past the reservation capacity doubles, and every row is kept.
        let (c, r) = cache.append(0, &rows(100, 1, d_c), &rows(100, 1, d_r)).unwrap();
        assert_eq!(cache.capacity(0), 200);
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
        assert_eq!(cache.capacity(0), 200);
    }
}
