//! Multi-head Latent Attention (DeepSeek-V2, section 2.1).
//!
//! Symbols: H = heads, d_c = kv_lora_rank, d_r = qk_rope_head_dim, d_n = qk_nope_head_dim,
//! d_v = v_head_dim, T = new tokens, S = cached + new tokens.
//!
//! - Queries: `q = W_UQ norm(W_DQ h)` (or `q_proj h` without `q_lora_rank`), split per head into
//!   `q_nope (d_n)` and `q_rope (d_r)`; RoPE rotates `q_rope`.
//! - Keys/values: `[c_kv_raw ‖ k_rope] = W_DKV h`; `c_kv = kv_a_layernorm(c_kv_raw)`; RoPE rotates
//!   the single shared `k_rope`. Only `c_kv ‖ k_rope` is cached ([`LatentCache`]).
//! - `kv_b_proj` holds `W_UK (H, d_n, d_c)` and `W_UV (H, d_v, d_c)`, kept split.
//! - Expanded (prefill, training): `k_nope = W_UK c_kv`, `v = W_UV c_kv` per head, then
//!   `softmax(scale (q_nope·k_nope + q_rope·k_rope)) v`.
//! - Absorbed (decode): `q_lat = W_UKᵀ q_nope (d_c)`; `score = q_lat·c_kv + q_rope·k_rope`;
//!   `out = W_UV (Σ p c_kv)`. That is MQA over the latent cache; K and V are never materialised.
//!
//! `scale = (d_n + d_r)^-1/2 · mscale²` under YaRN. The latent norms use eps 1e-6 whatever
//! `rms_norm_eps` says (transformers 5.23 `DeepseekV2Attention`, DeepSeek's own code alike).

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::cache::{CacheKind, DenseRows, Gathered, GatheredRows, IndexRows, LatentCache, PageLayout, PagePool};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::kernels::attention::{prefill_attention, AttnElem, PrefillShape};
use crate::kernels::dsa::{index_scores_with, top_k};
use crate::kernels::latent_int8::{mla_decode_int8, mla_decode_int8_into, Int8Scratch};
use crate::kernels::matvec::{batched_matvec_into, batched_weighted_rows_into};
use crate::kernels::mha_decode::mha_decode_paged;
use crate::kernels::mla_decode::{mla_decode, mla_decode_into, mla_decode_paged_into, MlaScratch, MlaShape};
use crate::kernels::quant::{QuantMatrix, QuantizedRows};
use crate::model::dsa::Indexer;
use crate::model::layers::{
    quantize_rows, round_to, softmax_last_dim, with_stored, JobOutputs, Linear, RmsNorm, Stored, TokenInput,
};
use crate::model::rope::{Angles, Rope};
use crate::weights::{names::LayerNames, Quant, Weights};

/// Which MLA algorithm a forward pass runs. Both give the same numbers (tests/golden.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    /// Expand K/V per head: compute-bound prefill and training.
    Expanded,
    /// Absorb W_UK and W_UV: memory-bound decode over the latent cache.
    Absorbed,
}

/// The latent norms' epsilon, fixed by the reference.
const LATENT_NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
enum QProj {
    Full(Linear),
    LowRank { a: Linear, norm: RmsNorm, b: Linear },
}

/// One layer's attention weights.
#[derive(Debug, Clone)]
pub struct Mla {
    q: QProj,
    kv_a: Linear,     // (d_c + d_r, hidden)
    kv_norm: RmsNorm, // (d_c)
    kv_b: Tensor,     // (H (d_n + d_v), d_c): training splits it per step, so its gradient is kv_b_proj's
    w_uk: Tensor,     // (H, d_n, d_c)
    w_uv: Tensor,     // (H, d_v, d_c)
    /// A GGUF file's own `attn_k_b (H d_c, d_n)` and `attn_v_b (H d_v, d_c)` blocks (or, with
    /// `--quant`, the same quantized from `w_uk` / `w_uv`), which decode multiplies per head
    /// instead of the dense `w_uk` / `w_uv` (a quarter of their bytes or less).
    absorb_blocks: Option<Arc<(QuantMatrix, QuantMatrix)>>,
    o_proj: Linear, // (hidden, H d_v)
    /// V3.2's lightning indexer: attention reads only the rows it selects.
    indexer: Option<Indexer>,
    n_heads: usize,
    d_n: usize,
    d_r: usize,
    d_v: usize,
    d_c: usize,
    scale: f64,
}

/// With `--quant`, decode's per-head absorption blocks quantized from the dense split, laid out as
/// a GGUF file's `attn_k_b (H d_c, d_n)` and `attn_v_b (H d_v, d_c)`, so that decode reads them
/// instead of the f32 `W_UK`/`W_UV` (8 MiB per layer and token at V2-Lite's sizes; 2.1 MiB in
/// blocks). They are Q8_0 whatever `--quant` asks: the dense copies stay for prefill, and 4-bit
/// ones would set decode apart from it (on the test model, logits 14% apart instead of 2%).
fn quantized_absorption(w: &Weights, w_uk: &Tensor, w_uv: &Tensor) -> Result<Option<(QuantMatrix, QuantMatrix)>> {
    if w.quant().is_none() || w_uk.track_op() {
        return Ok(None);
    }
    let quant = Quant::Q8_0;
    let (_, d_n, d_c) = w_uk.dims3()?;
    let k_b: Vec<f32> = w_uk.transpose(1, 2)?.contiguous()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let v_b: Vec<f32> = w_uv.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (Some(k_b), Some(v_b)) = (quantize_rows(quant, &k_b, d_n), quantize_rows(quant, &v_b, d_c)) else {
        return Ok(None);
    };
    w.note_quant_format(k_b.name());
    w.note_quant_format(v_b.name());
    Ok(Some((k_b.for_decode(d_n), v_b.for_decode(d_c))))
}

impl Mla {
    /// Loads `self_attn.*` of one layer, checking every shape against `cfg`.
    pub fn load(w: &Weights, cfg: &Config, names: &LayerNames) -> Result<Mla> {
        let (h, hidden) = (cfg.num_attention_heads, cfg.hidden_size);
        let (d_n, d_r, d_v, d_c) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
        let bias = |proj: &str| cfg.attention_bias.then(|| names.attn_bias(proj));
        let q = match cfg.q_lora_rank {
            Some(r) => QProj::LowRank {
                a: Linear::load(w, &names.attn("q_a_proj"), r, hidden, bias("q_a_proj").as_deref())?,
                norm: RmsNorm::load(w, &names.attn_norm("q_a_layernorm"), r, LATENT_NORM_EPS)?,
                b: Linear::load(w, &names.attn("q_b_proj"), h * (d_n + d_r), r, None)?,
            },
            None => QProj::Full(Linear::load(w, &names.attn("q_proj"), h * (d_n + d_r), hidden, None)?),
        };
        let kv_a_name = names.attn("kv_a_proj_with_mqa");
        let kv_a = Linear::load(w, &kv_a_name, d_c + d_r, hidden, bias("kv_a_proj_with_mqa").as_deref())?;
        let kv_norm = RmsNorm::load(w, &names.attn_norm("kv_a_layernorm"), d_c, LATENT_NORM_EPS)?;
        let kv_b = w.get(&names.attn("kv_b_proj"), &[h * (d_n + d_v), d_c])?;
        let (w_uk, w_uv) = split_kv_b(&kv_b, h, d_n, d_v, d_c)?;
        // Inference keeps only the split copies; training needs the stored tensor itself.
        let kv_b = if kv_b.track_op() { kv_b } else { Tensor::zeros(0, kv_b.dtype(), kv_b.device())? };
        let o_proj = Linear::load(w, &names.attn("o_proj"), hidden, h * d_v, bias("o_proj").as_deref())?;
        let absorb_blocks = match w.absorption_blocks(&names.attn("kv_b_proj")) {
            Some(blocks) => Some(blocks),
            None => quantized_absorption(w, &w_uk, &w_uv)?,
        }
        .filter(|(k_b, v_b)| {
            k_b.rows(d_n) == h * d_c && v_b.rows(d_c) == h * d_v && k_b.groups_fit(d_c) && v_b.groups_fit(d_v)
        });
        Ok(Mla {
            q,
            kv_a,
            kv_norm,
            kv_b,
            w_uk,
            w_uv,
            absorb_blocks: absorb_blocks.map(Arc::new),
            o_proj,
            indexer: cfg.dsa.as_ref().map(|dsa| Indexer::load(w, cfg, dsa, names)).transpose()?,
            n_heads: h,
            d_n,
            d_r,
            d_v,
            d_c,
            scale: cfg.softmax_scale(),
        })
    }

    /// Bytes of every weight of the layer's attention.
    pub fn weight_bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let q = match &self.q {
            QProj::Full(p) => p.weight_bytes(),
            QProj::LowRank { a, norm, b } => a.weight_bytes() + norm.weight_bytes() + b.weight_bytes(),
        };
        q + self.kv_a.weight_bytes()
            + self.kv_norm.weight_bytes()
            + dense(&self.kv_b)
            + dense(&self.w_uk)
            + dense(&self.w_uv)
            + self.absorb_blocks.as_ref().map_or(0, |b| b.0.bytes() + b.1.bytes())
            + self.o_proj.weight_bytes()
            + self.indexer.as_ref().map_or(0, Indexer::weight_bytes)
    }

    /// The layer's lightning indexer (V3.2), if it has one.
    pub fn indexer(&self) -> Option<&Indexer> {
        self.indexer.as_ref()
    }

    pub(crate) fn indexer_mut(&mut self) -> Option<&mut Indexer> {
        self.indexer.as_mut()
    }

    /// The attention of a batch's rows, `x: (N, hidden)`, span after span: each span's tokens
    /// attend to its own sequence only: the rows its cache holds (this layer's, to which the
    /// span's are appended) and its own, causally; a span without a cache (training) to its own
    /// rows from position 0. The projections run once over all `N` rows. Differentiable in
    /// every weight that tracks gradients (training takes the candle ops then).
    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        spans: &mut [SpanRows<'_, '_>],
        path: AttentionPath,
    ) -> Result<Tensor> {
        let (h, d_n, d_r, d_v, d_c) = (self.n_heads, self.d_n, self.d_r, self.d_v, self.d_c);
        // Training moves `kv_b_proj` itself: its split must follow, so that its gradient is the
        // stored tensor's.
        let (w_uk, w_uv) = if self.kv_b.track_op() {
            split_kv_b(&self.kv_b, h, d_n, d_v, d_c)?
        } else {
            (self.w_uk.clone(), self.w_uv.clone())
        };
        let (q, q_a) = match &self.q {
            QProj::Full(proj) => (proj.forward(x)?, None),
            QProj::LowRank { a, norm, b } => {
                let q_a = norm.forward(&a.forward(x)?)?;
                (b.forward(&q_a)?, Some(q_a))
            }
        }; // (N, H (d_n + d_r))
        let kv = self.kv_a.forward(x)?; // (N, d_c + d_r)
        let mut outs = Vec::with_capacity(spans.len());
        let mut at = 0;
        for span in spans.iter_mut() {
            let t = span.len;
            let (rope, angles) = (span.pos.rope, &span.pos.angles);
            let q = q.narrow(0, at, t)?.reshape((t, h, d_n + d_r))?.transpose(0, 1)?; // (H, T, d_n + d_r)
            let q_nope = q.narrow(2, 0, d_n)?.contiguous()?; // (H, T, d_n)
            let q_rope = rope.apply(&q.narrow(2, d_n, d_r)?.contiguous()?, angles)?; // (H, T, d_r)
            let kv = kv.narrow(0, at, t)?;
            let k_rope = rope.apply(&kv.narrow(1, d_c, d_r)?.contiguous()?, angles)?; // (T, d_r)
            if let (Some(ix), Some(q_a)) = (&self.indexer, &q_a) {
                let rows = (&x.narrow(0, at, t)?, &q_a.narrow(0, at, t)?);
                let span_cache = span.cache.as_deref_mut();
                let out = self.attend_sparse_span(
                    ix,
                    rows,
                    (&q_nope, &q_rope),
                    (&kv, &k_rope),
                    span_cache,
                    layer,
                    &span.pos,
                    path,
                    (&w_uk, &w_uv),
                )?;
                outs.push(out);
                at += t;
                continue;
            }
            at += t;
            let (c_kv, k_rope) = match span.cache.as_deref_mut().map(|c| (c.kind(), c)) {
                None => (self.kv_norm.forward(&kv.narrow(1, 0, d_c)?)?, k_rope),
                Some((CacheKind::Expanded(_), cache)) => {
                    let c_kv = self.kv_norm.forward(&kv.narrow(1, 0, d_c)?)?; // (T, d_c)
                    let kv = (&c_kv, &k_rope);
                    outs.push(self.attend_expanded_cache(
                        &q_nope,
                        &q_rope,
                        kv,
                        (&w_uk, &w_uv),
                        cache,
                        layer,
                        &span.pos,
                    )?);
                    continue;
                }
                Some((CacheKind::Dense(_), cache)) => {
                    let c_kv = self.kv_norm.forward(&kv.narrow(1, 0, d_c)?)?; // (T, d_c)
                    cache.append(layer, &c_kv, &k_rope)? // (S, d_c), (S, d_r)
                }
                Some((CacheKind::Int8, cache)) => {
                    // The normalized latents, without the norm's gain: the 8-bit codes see values
                    // of one scale, and the gain is folded into the query and the output.
                    cache.append_int8(layer, &self.kv_norm.normalize(&kv.narrow(1, 0, d_c)?)?, &k_rope)?;
                    if path == AttentionPath::Absorbed && t == 1 {
                        let out = self.int8_step(&q_nope, &q_rope, cache, layer)?; // (H, 1, d_v)
                        outs.push(out.transpose(0, 1)?.reshape((t, h * d_v))?);
                        continue;
                    }
                    let (c_hat, k_rope) = cache.dequantized(layer)?; // (S, d_c), (S, d_r), f32
                    let c_kv = c_hat.broadcast_mul(&self.kv_norm.gain_f32()?)?.to_dtype(x.dtype())?;
                    (c_kv, k_rope.to_dtype(x.dtype())?)
                }
            };
            outs.push(self.attend(&q_nope, &q_rope, &c_kv, &k_rope, (&w_uk, &w_uv), &span.pos, path, x.dtype())?);
        }
        let out = if outs.len() == 1 { outs.remove(0) } else { Tensor::cat(&outs, 0)? }; // (N, H d_v)
        self.o_proj.forward(&out)
    }

    /// One span's attention over an expanded cache (for study), `(T, H d_v)`: the span's keys
    /// (`W_UK c_kv` per head beside `k_rope`) and values (`W_UV c_kv`) are appended to `cache`'s
    /// `layer`, then every head attends over the cached keys and values as multi-head attention
    /// does, causally.
    #[allow(clippy::too_many_arguments)]
    fn attend_expanded_cache(
        &self,
        q_nope: &Tensor,
        q_rope: &Tensor,
        (c_kv, k_rope): (&Tensor, &Tensor),
        (w_uk, w_uv): (&Tensor, &Tensor),
        cache: &mut LatentCache,
        layer: usize,
        pos: &Positions<'_>,
    ) -> Result<Tensor> {
        let (h, d_n, d_r, d_v, d_c) = (self.n_heads, self.d_n, self.d_r, self.d_v, self.d_c);
        let (t, dtype) = (c_kv.dim(0)?, q_nope.dtype());
        let c = c_kv.to_dtype(w_uk.dtype())?;
        let k_nope = c.matmul(&w_uk.reshape((h * d_n, d_c))?.t()?)?.reshape((t, h, d_n))?;
        let k_r = k_rope.to_dtype(w_uk.dtype())?.reshape((t, 1, d_r))?.broadcast_as((t, h, d_r))?;
        let keys = Tensor::cat(&[&k_nope, &k_r.contiguous()?], 2)?.reshape((t, h * (d_n + d_r)))?;
        let values = c.matmul(&w_uv.reshape((h * d_v, d_c))?.t()?)?; // (T, H d_v)
        let (keys, values) = cache.append(layer, &keys, &values)?; // (S, ..), the cache's dtype
        let s = keys.dim(0)?;
        let keys = keys.to_dtype(dtype)?.reshape((s, h, d_n + d_r))?.transpose(0, 1)?.contiguous()?; // (H, S, d_k)
        let values = values.to_dtype(dtype)?.reshape((s, h, d_v))?.transpose(0, 1)?.contiguous()?; // (H, S, d_v)
        let q = Tensor::cat(&[q_nope, q_rope], 2)?; // (H, T, d_k)
        let scores = q.matmul(&keys.t()?)?; // (H, T, S)
        let probs = self.probs(&scores, &scores.zeros_like()?, pos.mask.as_ref(), dtype)?;
        Ok(probs.matmul(&values)?.transpose(0, 1)?.reshape((t, h * d_v))?)
    }

    /// One span's attention, `(T, H d_v)`: `q_nope (H, T, d_n)` and `q_rope (H, T, d_r)` over
    /// the `S` latent rows `c_kv (S, d_c)` and `k_rope (S, d_r)` the span sees, the last `T`
    /// of them its own, through `w_uk`, `w_uv` (the split of `kv_b_proj`).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q_nope: &Tensor,
        q_rope: &Tensor,
        c_kv: &Tensor,
        k_rope: &Tensor,
        (w_uk, w_uv): (&Tensor, &Tensor),
        pos: &Positions<'_>,
        path: AttentionPath,
        dtype: DType,
    ) -> Result<Tensor> {
        let (h, d_r, d_v, d_c) = (self.n_heads, self.d_r, self.d_v, self.d_c);
        let (t, s) = (q_nope.dim(1)?, c_kv.dim(0)?);
        // The candle paths compute in the activations' dtype (the cache may be narrower).
        let in_dtype = |x: &Tensor| x.to_dtype(dtype);
        // The positional part of the scores, q_rope·k_rope, for the paths that take candle ops.
        let position = || q_rope.reshape((h * t, d_r))?.matmul(&in_dtype(k_rope)?.t()?)?.reshape((h, t, s)); // (H, T, S)
        let out = match path {
            AttentionPath::Expanded => {
                match self.expanded_fast(q_nope, q_rope, &in_dtype(c_kv)?, &in_dtype(k_rope)?)? {
                    Some(out) => return Ok(out),
                    None => self.expanded(q_nope, &position()?, c_kv, (w_uk, w_uv), pos, dtype)?,
                }
            }
            AttentionPath::Absorbed if t == 1 && self.decode_kernel_fits(c_kv, k_rope) => {
                let q_lat = self.absorb_query(q_nope)?; // (H, 1, d_c)
                let o_lat = self.absorbed_step(&q_lat, q_rope, c_kv, k_rope)?; // (H, 1, d_c)
                self.expand_output(&o_lat)? // (H, 1, d_v)
            }
            AttentionPath::Absorbed => {
                let position = position()?;
                let c_kv = in_dtype(c_kv)?;
                let q_lat = q_nope.matmul(w_uk)?; // (H, T, d_c)
                let content = q_lat.reshape((h * t, d_c))?.matmul(&c_kv.t()?)?.reshape((h, t, s))?; // (H, T, S)
                let probs = self.probs(&content, &position, pos.mask.as_ref(), dtype)?;
                let o_lat = probs.reshape((h * t, s))?.matmul(&c_kv)?.reshape((h, t, d_c))?; // (H, T, d_c)
                o_lat.matmul(&w_uv.t()?)? // (H, T, d_v)
            }
        };
        Ok(out.transpose(0, 1)?.reshape((t, h * d_v))?) // (T, H d_v)
    }

    /// The expanded attention by candle ops: `(H, T, d_v)`.
    fn expanded(
        &self,
        q_nope: &Tensor,
        position: &Tensor,
        c_kv: &Tensor,
        (w_uk, w_uv): (&Tensor, &Tensor),
        pos: &Positions<'_>,
        dtype: DType,
    ) -> Result<Tensor> {
        let (h, d_n, d_v, d_c) = (self.n_heads, self.d_n, self.d_v, self.d_c);
        let c_kv = c_kv.to_dtype(dtype)?;
        let s = c_kv.dim(0)?;
        let k_nope = c_kv.matmul(&w_uk.reshape((h * d_n, d_c))?.t()?)?; // (S, H d_n)
        let k_nope = k_nope.reshape((s, h, d_n))?.transpose(0, 1)?.contiguous()?; // (H, S, d_n)
        let v = c_kv.matmul(&w_uv.reshape((h * d_v, d_c))?.t()?)?; // (S, H d_v)
        let v = v.reshape((s, h, d_v))?.transpose(0, 1)?.contiguous()?; // (H, S, d_v)
        let content = q_nope.matmul(&k_nope.t()?)?; // (H, T, S)
        let probs = self.probs(&content, position, pos.mask.as_ref(), dtype)?;
        Ok(probs.matmul(&v)?) // (H, T, d_v)
    }

    /// The expanded attention of a chunk by latent's kernels ([`prefill_attention`]) in the
    /// model's dtype: `(T, H d_v)`. In bf16 it rounds where transformers' bf16 attention rounds
    /// (one score from the concatenated `[q_nope; q_rope]·[k_nope; k_rope]`, where the candle ops
    /// round the two parts apart). `None` where they do not apply: an f16 model, weights that
    /// track gradients, bf16 on a CPU without AVX-512 BF16.
    fn expanded_fast(
        &self,
        q_nope: &Tensor,
        q_rope: &Tensor,
        c_kv: &Tensor,
        k_rope: &Tensor,
    ) -> Result<Option<Tensor>> {
        let tensors = [q_nope, q_rope, c_kv, k_rope, &self.w_uk, &self.w_uv];
        if tensors.iter().any(|t| t.track_op() || t.dtype() != q_nope.dtype()) {
            return Ok(None);
        }
        match q_nope.dtype() {
            DType::BF16 => self.expanded_in::<half::bf16>(q_nope, q_rope, c_kv, k_rope),
            DType::F32 => self.expanded_in::<f32>(q_nope, q_rope, c_kv, k_rope),
            _ => Ok(None),
        }
    }

    /// [`Mla::expanded_fast`] in `E`, the dtype of every tensor given and of `W_UK`, `W_UV`.
    fn expanded_in<E: AttnElem + Element>(
        &self,
        q_nope: &Tensor,
        q_rope: &Tensor,
        c_kv: &Tensor,
        k_rope: &Tensor,
    ) -> Result<Option<Tensor>> {
        let (h, d_n, d_r, d_v, d_c) = (self.n_heads, self.d_n, self.d_r, self.d_v, self.d_c);
        let (t, s, d_qk) = (q_nope.dim(1)?, c_kv.dim(0)?, d_n + d_r);
        // k_nope (S, H d_n) = c_kv W_UKᵀ and vᵀ (H d_v, S) = W_UV c_kvᵀ, as kv_b_proj's output.
        let products = with_stored(c_kv, |c| {
            with_stored(&self.w_uk, |wk| {
                with_stored(&self.w_uv, |wv| {
                    let (c, wk, wv) = (E::of(c)?, E::of(wk)?, E::of(wv)?);
                    if c.len() != s * d_c || wk.len() != h * d_n * d_c || wv.len() != h * d_v * d_c {
                        return None;
                    }
                    Some((E::gemm(c, wk, s, d_c, h * d_n)?, E::gemm(wv, c, h * d_v, d_c, s)?))
                })
            })
        });
        let Some(Some(Some(Some((k_nope, v_t))))) = products else { return Ok(None) };
        let rows = |x: &Tensor| -> Result<Vec<E>> { Ok(x.flatten_all()?.to_vec1()?) };
        let (q_nope, q_rope, k_rope) = (rows(q_nope)?, rows(q_rope)?, rows(k_rope)?);
        let mut q = Vec::with_capacity(h * t * d_qk); // (H, T, d_qk)
        for (n, r) in q_nope.chunks(d_n).zip(q_rope.chunks(d_r)) {
            q.extend_from_slice(n);
            q.extend_from_slice(r);
        }
        let mut k = Vec::with_capacity(h * s * d_qk); // (H, S, d_qk)
        for head in 0..h {
            for (j, r) in k_rope.chunks(d_r).enumerate() {
                let n = &k_nope[(j * h + head) * d_n..(j * h + head + 1) * d_n];
                k.extend(n.iter().map(|&v| E::from_f32(v)));
                k.extend_from_slice(r);
            }
        }
        let v_t: Vec<E> = v_t.iter().map(|&v| E::from_f32(v)).collect(); // (H, d_v, S)
        let shape = PrefillShape { heads: h, t, s, d_qk, d_v };
        let Some(out) = prefill_attention(&q, &k, &v_t, shape, self.scale as f32) else { return Ok(None) };
        Ok(Some(Tensor::from_vec(out, (t, h * d_v), c_kv.device())?))
    }

    /// Whether [`Mla::step`] can run this layer: every projection takes the decode kernels,
    /// and the absorption weights are blocks or stored bf16/f32 (not training variables).
    pub(crate) fn takes_step(&self) -> bool {
        let q = match &self.q {
            QProj::Full(p) => p.takes_token_rows(),
            QProj::LowRank { a, norm, b } => a.takes_token_rows() && !norm.tracks() && b.takes_token_rows(),
        };
        let stored = |t: &Tensor| !t.track_op() && with_stored(t, |_| ()).is_some();
        q && self.kv_a.takes_token_rows()
            && self.indexer.as_ref().is_none_or(Indexer::takes_step)
            && !self.kv_norm.tracks()
            && self.o_proj.takes_token_rows()
            && (self.absorb_blocks.is_some() || (stored(&self.w_uk) && stored(&self.w_uv)))
    }

    /// Whether `W_UK` and `W_UV` are stored bf16 or f32 (not only as quantized blocks).
    pub(crate) fn has_dense_kv_b(&self) -> bool {
        let stored = |t: &Tensor| !t.track_op() && with_stored(t, |_| ()).is_some();
        self.absorb_blocks.is_none() && stored(&self.w_uk) && stored(&self.w_uv)
    }

    /// The activation groups the first projections read the layer's input in.
    pub(crate) fn input_groups(&self) -> [Option<usize>; 2] {
        let q = match &self.q {
            QProj::Full(p) => p.act_group(),
            QProj::LowRank { a, .. } => a.act_group(),
        };
        [q, self.kv_a.act_group()]
    }

    /// A decode step's attention: `input` holding the `B` tokens' normed hidden states with
    /// codes for [`Mla::input_groups`], token `b` of sequence `owners[b]`, at the end of
    /// `caches[owners[b]]` (its row is appended to that cache's `layer`; a sequence's tokens come
    /// in order, so each sees the rows of those before it), `angles` their cos and sin (`B` rows
    /// of `d_r / 2`), into `out (B, hidden)`. The projections read each weight once for all `B`
    /// rows; each token's attention runs over its own sequence's cached rows only. Computes
    /// what [`Mla::forward`] computes for each token on the absorbed path, rounded alike in a
    /// `dtype` model, over slices that `s` keeps from step to step. Needs [`Mla::takes_step`]
    /// and bf16, f32 or int8 caches.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn step(
        &self,
        input: &TokenInput,
        layer: usize,
        (caches, owners): (&mut [&mut LatentCache], &[usize]),
        rope: &Rope,
        angles: (&[f32], &[f32]),
        dtype: DType,
        s: &mut AttnScratch,
        out: &mut [f32],
    ) -> Result<()> {
        let (h, d_n, d_r, d_v, d_c) = (self.n_heads, self.d_n, self.d_r, self.d_v, self.d_c);
        let (b, half) = (owners.len(), d_r / 2);
        let AttnScratch {
            proj,
            q_in,
            q_b,
            q_nope,
            q_rope,
            c,
            k_rope,
            q_lat,
            o_lat,
            xq,
            heads,
            o,
            mla,
            int8,
            expanded,
            ix_proj,
            ix_q,
            ix_rows,
            sparse,
        } = s;
        // The query's first projection and the latents' share the input: one pass.
        let first = match &self.q {
            QProj::Full(p) => p,
            QProj::LowRank { a, .. } => a,
        };
        Linear::token_rows_into(2, |j| ([first, &self.kv_a][j], input), proj);
        proj.round(dtype);
        let q_all = match &self.q {
            QProj::Full(_) => proj.get(0),
            QProj::LowRank { norm, b: q_b_proj, .. } => {
                let q_a = proj.get(0);
                let r = q_a.len() / b;
                let x = q_in.x_mut();
                x.resize(q_a.len(), 0.0);
                for (row, x) in q_a.chunks_exact(r).zip(x.chunks_exact_mut(r)) {
                    norm.forward_row(row, x, dtype);
                }
                q_in.requantize([q_b_proj.act_group()]);
                Linear::token_rows_into(1, |_| (q_b_proj, &*q_in), q_b);
                q_b.round(dtype);
                q_b.get(0)
            }
        };
        if let Some(ix) = &self.indexer {
            let (wk, wp, wq) = ix.projections();
            Linear::token_rows_into(2, |j| ([wk, wp][j], input), ix_proj);
            Linear::token_rows_into(1, |_| (wq, &*q_in), ix_q);
        }
        let heads_x = heads.x_mut();
        heads_x.resize(b * h * d_v, 0.0);
        let scale = self.scale as f32;
        let per_q = h * (d_n + d_r);
        for (token, &owner) in owners.iter().enumerate() {
            let cache = &mut *caches[owner];
            let (cos, sin) = (&angles.0[token * half..(token + 1) * half], &angles.1[token * half..(token + 1) * half]);
            q_nope.clear();
            q_rope.clear();
            for head in q_all[token * per_q..(token + 1) * per_q].chunks_exact(d_n + d_r) {
                q_nope.extend_from_slice(&head[..d_n]);
                q_rope.extend_from_slice(&head[d_n..]);
            }
            for head in q_rope.chunks_exact_mut(d_r) {
                rope.rotate(head, cos, sin);
            }
            round_to(dtype, q_rope);
            let kv = &proj.get(1)[token * (d_c + d_r)..(token + 1) * (d_c + d_r)];
            k_rope.clear();
            k_rope.extend_from_slice(&kv[d_c..]);
            rope.rotate(k_rope, cos, sin);
            round_to(dtype, k_rope);
            c.resize(d_c, 0.0);
            if let CacheKind::Expanded(_) = cache.kind() {
                self.kv_norm.forward_row(&kv[..d_c], c, dtype);
                let x = &mut heads_x[token * h * d_v..(token + 1) * h * d_v];
                self.expanded_step((q_nope, q_rope), (c, k_rope), (cache, layer), dtype, expanded, x)?;
                continue;
            }
            let is_int8 = match cache.kind() {
                CacheKind::Int8 => {
                    // Normalized without the gain, which goes into the query and the output.
                    self.kv_norm.normalize_row(&kv[..d_c], c);
                    true
                }
                CacheKind::Dense(_) | CacheKind::Expanded(_) => {
                    self.kv_norm.forward_row(&kv[..d_c], c, dtype);
                    false
                }
            };
            let [ix_k, ix_w, ix_qh] = ix_rows;
            match &self.indexer {
                Some(ix) => {
                    let (d_i, h_i) = (ix.dim(), ix.heads());
                    ix_k.clear();
                    ix_k.extend_from_slice(&ix_proj.get(0)[token * d_i..(token + 1) * d_i]);
                    round_to(dtype, ix_k);
                    ix.key_row(ix_k, (cos, sin), dtype);
                    cache.push_row_indexed(layer, c, k_rope, ix_k)?;
                    ix_w.clear();
                    ix_w.extend_from_slice(&ix_proj.get(1)[token * h_i..(token + 1) * h_i]);
                    ix_qh.clear();
                    ix_qh.extend_from_slice(&ix_q.get(0)[token * h_i * d_i..(token + 1) * h_i * d_i]);
                    round_to(dtype, ix_qh);
                    ix.query_row(ix_qh, ix_w, (cos, sin), dtype);
                }
                None => cache.push_row(layer, c, k_rope)?,
            }

            // q_lat = W_UKᵀ q_nope per head.
            q_lat.resize(h * d_c, 0.0);
            self.absorb_into(q_nope, xq, q_lat).ok_or_else(|| Error::internal("W_UK is not stored bf16 or f32"))?;
            round_to(dtype, q_lat);
            o_lat.resize(h * d_c, 0.0);
            let visible = cache.len();
            if let Some(ix) = self.indexer.as_ref().filter(|ix| visible > ix.topk()) {
                let query = (&ix_qh[..], &ix_w[..]);
                self.sparse_token(ix, (q_lat, q_rope), query, (cache, layer, visible), (sparse, mla, int8), o_lat)?;
                round_to(dtype, o_lat);
                let x = &mut heads_x[token * h * d_v..(token + 1) * h * d_v];
                self.expand_into(o_lat, xq, x).ok_or_else(|| Error::internal("W_UV is not stored bf16 or f32"))?;
                continue;
            }
            match is_int8.then_some(&mut *int8) {
                Some(scratch) => {
                    let rows = cache
                        .int8_rows(layer)
                        .ok_or_else(|| Error::internal(format!("layer {layer} has no int8 latent cache")))?;
                    let gain = self.kv_norm.gain();
                    for head in q_lat.chunks_exact_mut(d_c) {
                        head.iter_mut().zip(gain).for_each(|(x, g)| *x *= g);
                    }
                    mla_decode_int8_into(q_lat, q_rope, &rows, h, scale, scratch, o_lat);
                    for head in o_lat.chunks_exact_mut(d_c) {
                        head.iter_mut().zip(gain).for_each(|(x, g)| *x *= g);
                    }
                }
                None => {
                    // This layer's rows of this sequence, however many the others hold.
                    let shape = |len: usize| MlaShape { heads: h, d_c, d_r, len };
                    cache
                        .with_dense_rows(layer, |rows| match rows {
                            DenseRows::Bf16(rows) => {
                                mla_decode_paged_into(q_lat, q_rope, rows, shape(rows.len()), scale, mla, o_lat)
                            }
                            DenseRows::F32(rows) => {
                                mla_decode_paged_into(q_lat, q_rope, rows, shape(rows.len()), scale, mla, o_lat)
                            }
                        })
                        .ok_or_else(|| Error::internal("the latent cache is neither bf16 nor f32"))?;
                }
            }
            round_to(dtype, o_lat);
            // Per head W_UV o_lat.
            let x = &mut heads_x[token * h * d_v..(token + 1) * h * d_v];
            self.expand_into(o_lat, xq, x).ok_or_else(|| Error::internal("W_UV is not stored bf16 or f32"))?;
        }
        round_to(dtype, heads_x);
        heads.requantize([self.o_proj.act_group()]);
        Linear::token_rows_into(1, |_| (&self.o_proj, &*heads), o);
        o.round(dtype);
        out.copy_from_slice(o.get(0));
        Ok(())
    }

    /// One query's sparse attention (V3.2) into `o_lat (H d_c)`: the indexer scores the first
    /// `visible` rows of `cache`'s `layer` for `query = (q_h (H_i d_i), w (H_i))`, keeps the best
    /// [`Indexer::topk`] (every row when there are no more), gathers them and runs the absorbed
    /// attention of `q_lat (H d_c)` and `q_rope (H d_r)` over them alone. For an int8 cache the
    /// latents' gain goes into `q_lat` (which it scales in place) and into `o_lat`, as in
    /// [`Mla::step`].
    fn sparse_token(
        &self,
        ix: &Indexer,
        (q_lat, q_rope): (&mut [f32], &[f32]),
        (q_h, w): (&[f32], &[f32]),
        (cache, layer, visible): (&LatentCache, usize, usize),
        (s, mla, int8): (&mut SparseScratch, &mut MlaScratch, &mut Int8Scratch),
        o_lat: &mut [f32],
    ) -> Result<()> {
        let (h, d_c, d_r) = (self.n_heads, self.d_c, self.d_r);
        let SparseScratch { scores, pairs, order, chosen, gathered } = s;
        if visible <= ix.topk() {
            chosen.clear();
            chosen.extend(0..visible as u32);
        } else {
            // Room for every row the cache has reserved: a decode step then allocates nothing.
            for v in [&mut *order, &mut *chosen] {
                v.reserve(cache.capacity().saturating_sub(v.len()));
            }
            scores.reserve(cache.capacity().saturating_sub(scores.len()));
            scores.resize(visible, 0.0);
            cache
                .with_index_keys(layer, |keys| match keys {
                    IndexRows::Bf16(k) => index_scores_with(q_h, w, k, ix.dim(), scores, pairs),
                    IndexRows::F32(k) => index_scores_with(q_h, w, k, ix.dim(), scores, pairs),
                })
                .ok_or_else(|| Error::internal(format!("the latent cache has no layer {layer}")))?;
            top_k(scores, ix.topk(), order, chosen);
        }
        let (scale, shape) = (self.scale as f32, MlaShape { heads: h, d_c, d_r, len: chosen.len() });
        match cache.gather(layer, chosen, gathered)? {
            GatheredRows::Bf16(c, r) => mla_decode_into(q_lat, q_rope, c, r, shape, scale, mla, o_lat),
            GatheredRows::F32(c, r) => mla_decode_into(q_lat, q_rope, c, r, shape, scale, mla, o_lat),
            GatheredRows::Int8(rows) => {
                let gain = self.kv_norm.gain();
                for head in q_lat.chunks_exact_mut(d_c) {
                    head.iter_mut().zip(gain).for_each(|(x, g)| *x *= g);
                }
                mla_decode_int8_into(q_lat, q_rope, rows, h, scale, int8, o_lat);
                for head in o_lat.chunks_exact_mut(d_c) {
                    head.iter_mut().zip(gain).for_each(|(x, g)| *x *= g);
                }
            }
        }
        Ok(())
    }

    /// One span's attention with sparse attention (V3.2), `(T, H d_v)`: `x (T, hidden)` the
    /// span's normed input and `q_a (T, q_lora_rank)` its normed compressed query, `q_nope (H, T,
    /// d_n)`, `q_rope (H, T, d_r)`, `kv (T, d_c + d_r)` the latents' projection and `k_rope (T,
    /// d_r)` rotated. The span's rows and indexer keys are appended to `cache` (a span without
    /// one gets a cache of its own for the pass). While no query sees more rows than it may
    /// select, this is the dense attention on `path`; past that, each query's attention reads
    /// only its selected rows ([`Mla::sparse_token`], absorbed, as DeepSeek's sparse kernels run
    /// prefill too), computed as [`Mla::step`] computes a decoded token's.
    #[allow(clippy::too_many_arguments)]
    fn attend_sparse_span(
        &self,
        ix: &Indexer,
        (x, q_a): (&Tensor, &Tensor),
        (q_nope, q_rope): (&Tensor, &Tensor),
        (kv, k_rope): (&Tensor, &Tensor),
        cache: Option<&mut LatentCache>,
        layer: usize,
        pos: &Positions<'_>,
        path: AttentionPath,
        (w_uk, w_uv): (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let (h, d_n, d_r, d_v, d_c) = (self.n_heads, self.d_n, self.d_r, self.d_v, self.d_c);
        let (t, start, dtype) = (x.dim(0)?, pos.start, x.dtype());
        if [x, q_a, q_nope, w_uk].iter().any(|v| v.track_op()) {
            return Err(Error::InvalidArgument(
                "sparse attention (DeepSeek-V3.2) runs for inference only: its selection has no gradient".into(),
            ));
        }
        let keys = ix.keys(x, start)?;
        let mut own;
        let (cache, layer) = match cache {
            Some(cache) => (cache, layer),
            None => {
                let layout = PageLayout::of(CacheKind::Dense(dtype), 1, d_c, d_r)?.with_index_keys(ix.dim());
                own = LatentCache::in_pool(&PagePool::new(layout, None), x.device());
                (&mut own, 0)
            }
        };
        let int8 = cache.kind() == CacheKind::Int8;
        let latents = kv.narrow(1, 0, d_c)?;
        let c_in = if int8 { self.kv_norm.normalize(&latents)? } else { self.kv_norm.forward(&latents)? };
        cache.append_indexed(layer, &c_in, k_rope, &keys)?;
        if start + t <= ix.topk() {
            let (c_kv, k_rope) = if int8 {
                let (c_hat, k_rope) = cache.dequantized(layer)?;
                (c_hat.broadcast_mul(&self.kv_norm.gain_f32()?)?.to_dtype(dtype)?, k_rope.to_dtype(dtype)?)
            } else {
                cache.layer_rows(layer)?
            };
            return self.attend(q_nope, q_rope, &c_kv, &k_rope, (w_uk, w_uv), pos, path, dtype);
        }
        let (q_h, w) = ix.queries(q_a, x, start)?;
        let rows = |v: &Tensor| -> Result<Vec<f32>> {
            Ok(v.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?.flatten_all()?.to_vec1()?)
        };
        let (q_nope, q_rope) = (rows(q_nope)?, rows(q_rope)?); // (T, H, d_n), (T, H, d_r)
        let (h_i, d_i) = (ix.heads(), ix.dim());
        let (mut q_lat, mut o_lat, mut xq) = (vec![0f32; h * d_c], vec![0f32; h * d_c], Vec::new());
        let (mut sparse, mut mla, mut int8_scratch) = Default::default();
        let mut out = vec![0f32; t * h * d_v];
        for (i, out) in out.chunks_exact_mut(h * d_v).enumerate() {
            self.absorb_into(&q_nope[i * h * d_n..(i + 1) * h * d_n], &mut xq, &mut q_lat)
                .ok_or_else(|| Error::internal("W_UK is not stored bf16 or f32"))?;
            round_to(dtype, &mut q_lat);
            let q_rope = &q_rope[i * h * d_r..(i + 1) * h * d_r];
            let query = (&q_h[i * h_i * d_i..(i + 1) * h_i * d_i], &w[i * h_i..(i + 1) * h_i]);
            let scratch = (&mut sparse, &mut mla, &mut int8_scratch);
            self.sparse_token(ix, (&mut q_lat, q_rope), query, (cache, layer, start + i + 1), scratch, &mut o_lat)?;
            round_to(dtype, &mut o_lat);
            self.expand_into(&o_lat, &mut xq, out).ok_or_else(|| Error::internal("W_UV is not stored bf16 or f32"))?;
        }
        round_to(dtype, &mut out);
        Ok(Tensor::from_vec(out, (t, h * d_v), x.device())?.to_dtype(dtype)?)
    }

    /// One token's step over an expanded cache (for study), into `out (H d_v)`: its keys
    /// (`W_UK c` per head beside `k_rope`) and values (`W_UV c`) appended to `cache`'s `layer`,
    /// then multi-head attention of `[q_nope ‖ q_rope]` per head over every cached row.
    #[allow(clippy::too_many_arguments)]
    fn expanded_step(
        &self,
        (q_nope, q_rope): (&[f32], &[f32]),
        (c, k_rope): (&[f32], &[f32]),
        (cache, layer): (&mut LatentCache, usize),
        dtype: DType,
        [rep, key, value, q]: &mut [Vec<f32>; 4],
        out: &mut [f32],
    ) -> Result<()> {
        let (h, d_n, d_r, d_v, d_c) = (self.n_heads, self.d_n, self.d_r, self.d_v, self.d_c);
        let needs = || Error::internal("an expanded cache needs kv_b_proj stored bf16 or f32");
        rep.clear();
        (0..h).for_each(|_| rep.extend_from_slice(c));
        let project = |w: &Tensor, width: usize, y: &mut Vec<f32>| {
            y.resize(h * width, 0.0);
            with_stored(w, |w| match w {
                Stored::Bf16(w) => batched_matvec_into(rep, w, h, d_c, width, y),
                Stored::F32(w) => batched_matvec_into(rep, w, h, d_c, width, y),
            })
        };
        project(&self.w_uk, d_n, q).ok_or_else(needs)?; // k_nope, per head
        project(&self.w_uv, d_v, value).ok_or_else(needs)?;
        key.clear();
        for k_nope in q.chunks_exact(d_n) {
            key.extend_from_slice(k_nope);
            key.extend_from_slice(k_rope);
        }
        round_to(dtype, key);
        round_to(dtype, value);
        cache.push_row(layer, key, value)?;
        q.clear();
        for (n, r) in q_nope.chunks_exact(d_n).zip(q_rope.chunks_exact(d_r)) {
            q.extend_from_slice(n);
            q.extend_from_slice(r);
        }
        let scale = self.scale as f32;
        cache
            .with_dense_rows(layer, |rows| match rows {
                DenseRows::Bf16(rows) => mha_decode_paged(q, rows, h, d_n + d_r, d_v, scale, out),
                DenseRows::F32(rows) => mha_decode_paged(q, rows, h, d_n + d_r, d_v, scale, out),
            })
            .ok_or_else(|| Error::internal("the expanded cache is neither bf16 nor f32"))
    }

    fn decode_kernel_fits(&self, c_kv: &Tensor, k_rope: &Tensor) -> bool {
        with_stored(c_kv, |c| {
            with_stored(k_rope, |r| {
                matches!((c, r), (Stored::Bf16(_), Stored::Bf16(_)) | (Stored::F32(_), Stored::F32(_)))
            })
        })
        .flatten()
        .unwrap_or(false)
    }

    /// `q_lat = W_UKᵀ q_nope` per head for one token, `q_nope (H d_n)` into `out (H d_c)`: over the
    /// absorption blocks, or `W_UK` stored bf16 or f32 (`None` otherwise). `xq` keeps the blocks'
    /// 8-bit activations.
    fn absorb_into(&self, q_nope: &[f32], xq: &mut Vec<QuantizedRows>, out: &mut [f32]) -> Option<()> {
        let (h, d_n, d_c) = (self.n_heads, self.d_n, self.d_c);
        if let Some(blocks) = &self.absorb_blocks {
            blocks.0.grouped_matvec_into(q_nope, h, d_n, xq, out);
            return Some(());
        }
        with_stored(&self.w_uk, |w| match w {
            Stored::Bf16(w) => batched_weighted_rows_into(q_nope, w, h, d_n, d_c, out),
            Stored::F32(w) => batched_weighted_rows_into(q_nope, w, h, d_n, d_c, out),
        })
    }

    /// `W_UV o_lat` per head for one token, `o_lat (H d_c)` into `out (H d_v)`, as
    /// [`Mla::absorb_into`] does for the query.
    fn expand_into(&self, o_lat: &[f32], xq: &mut Vec<QuantizedRows>, out: &mut [f32]) -> Option<()> {
        let (h, d_v, d_c) = (self.n_heads, self.d_v, self.d_c);
        if let Some(blocks) = &self.absorb_blocks {
            blocks.1.grouped_matvec_into(o_lat, h, d_c, xq, out);
            return Some(());
        }
        with_stored(&self.w_uv, |w| match w {
            Stored::Bf16(w) => batched_matvec_into(o_lat, w, h, d_c, d_v, out),
            Stored::F32(w) => batched_matvec_into(o_lat, w, h, d_c, d_v, out),
        })
    }

    /// `q_nope (H, 1, d_n) · W_UK (H, d_n, d_c)` for one token ([`Mla::absorb_into`], else candle).
    fn absorb_query(&self, q_nope: &Tensor) -> Result<Tensor> {
        let (h, d_c) = (self.n_heads, self.d_c);
        let q: Vec<f32> = q_nope.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut y = vec![0f32; h * d_c];
        match self.absorb_into(&q, &mut Vec::new(), &mut y) {
            Some(()) => Ok(Tensor::from_vec(y, (h, 1, d_c), q_nope.device())?.to_dtype(q_nope.dtype())?),
            None => Ok(q_nope.matmul(&self.w_uk)?),
        }
    }

    /// `o_lat (H, 1, d_c) · W_UVᵀ` for one token ([`Mla::expand_into`], else candle).
    fn expand_output(&self, o_lat: &Tensor) -> Result<Tensor> {
        let (h, d_v) = (self.n_heads, self.d_v);
        let o: Vec<f32> = o_lat.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut y = vec![0f32; h * d_v];
        match self.expand_into(&o, &mut Vec::new(), &mut y) {
            Some(()) => Ok(Tensor::from_vec(y, (h, 1, d_v), o_lat.device())?.to_dtype(o_lat.dtype())?),
            None => Ok(o_lat.matmul(&self.w_uv.t()?)?),
        }
    }

    /// One token's absorbed attention over an int8 cache, expanded: `(H, 1, d_v)`. The latents'
    /// gain `g` (left out of the cache) goes into the query, `(q_lat ⊙ g)·ĉ`, and the output,
    /// `g ⊙ Σ p ĉ`.
    fn int8_step(&self, q_nope: &Tensor, q_rope: &Tensor, cache: &LatentCache, layer: usize) -> Result<Tensor> {
        let (h, d_c) = (self.n_heads, self.d_c);
        let rows = cache
            .int8_rows(layer)
            .ok_or_else(|| crate::error::Error::InvalidArgument(format!("layer {layer} has no int8 latent cache")))?;
        let gain: Vec<f32> = self.kv_norm.gain_f32()?.to_vec1()?;
        let scaled = |v: &mut Vec<f32>| {
            for row in v.chunks_exact_mut(d_c) {
                row.iter_mut().zip(&gain).for_each(|(x, g)| *x *= g);
            }
        };
        let mut q_lat: Vec<f32> = self.absorb_query(q_nope)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        scaled(&mut q_lat);
        let q_rope: Vec<f32> = q_rope.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut o_lat = mla_decode_int8(&q_lat, &q_rope, &rows, h, self.scale as f32);
        scaled(&mut o_lat);
        let o_lat = Tensor::from_vec(o_lat, (h, 1, d_c), q_nope.device())?.to_dtype(q_nope.dtype())?;
        self.expand_output(&o_lat)
    }

    /// One token's absorbed attention by the [`mla_decode`] kernel: `o_lat (H, 1, d_c)`.
    fn absorbed_step(&self, q_lat: &Tensor, q_rope: &Tensor, c_kv: &Tensor, k_rope: &Tensor) -> Result<Tensor> {
        let (h, d_c, d_r) = (self.n_heads, self.d_c, self.d_r);
        let shape = MlaShape { heads: h, d_c, d_r, len: c_kv.dim(0)? };
        let q_lat_v: Vec<f32> = q_lat.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let q_rope_v: Vec<f32> = q_rope.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let scale = self.scale as f32;
        let o_lat = with_stored(c_kv, |c| {
            with_stored(k_rope, |r| match (c, r) {
                (Stored::Bf16(c), Stored::Bf16(r)) => Some(mla_decode(&q_lat_v, &q_rope_v, c, r, shape, scale)),
                (Stored::F32(c), Stored::F32(r)) => Some(mla_decode(&q_lat_v, &q_rope_v, c, r, shape, scale)),
                _ => None,
            })
        })
        .flatten()
        .flatten()
        .expect("decode_kernel_fits checked the cache's storage");
        Ok(Tensor::from_vec(o_lat, (h, 1, d_c), q_lat.device())?.to_dtype(q_lat.dtype())?)
    }

    /// `softmax(scale (content + position) + causal mask)`, in f32, returned in `dtype`.
    fn probs(&self, content: &Tensor, position: &Tensor, mask: Option<&Tensor>, dtype: DType) -> Result<Tensor> {
        let scores = ((content + position)? * self.scale)?;
        let scores = match mask {
            Some(mask) => scores.to_dtype(DType::F32)?.broadcast_add(mask)?,
            None => scores,
        };
        Ok(softmax_last_dim(&scores)?.to_dtype(dtype)?)
    }
}

/// An element type [`Mla::expanded_fast`] reads from a stored tensor.
trait Element: candle_core::WithDType {
    fn of(stored: Stored<'_>) -> Option<&[Self]>;
}

impl Element for half::bf16 {
    fn of(stored: Stored<'_>) -> Option<&[half::bf16]> {
        match stored {
            Stored::Bf16(v) => Some(v),
            Stored::F32(_) => None,
        }
    }
}

impl Element for f32 {
    fn of(stored: Stored<'_>) -> Option<&[f32]> {
        match stored {
            Stored::F32(v) => Some(v),
            Stored::Bf16(_) => None,
        }
    }
}

/// The buffers of [`Mla::step`], kept from token to token (and layer to layer).
#[derive(Default)]
pub(crate) struct AttnScratch {
    proj: JobOutputs,
    q_in: TokenInput,
    q_b: JobOutputs,
    q_nope: Vec<f32>,
    q_rope: Vec<f32>,
    c: Vec<f32>,
    k_rope: Vec<f32>,
    q_lat: Vec<f32>,
    o_lat: Vec<f32>,
    xq: Vec<QuantizedRows>,
    heads: TokenInput,
    o: JobOutputs,
    mla: MlaScratch,
    int8: Int8Scratch,
    /// The expanded cache's step: the latents repeated per head, a key row, a value row and the
    /// query.
    expanded: [Vec<f32>; 4],
    /// The indexer's projections of the step's tokens: `wk` and `weights_proj`, then `wq_b`.
    ix_proj: JobOutputs,
    ix_q: JobOutputs,
    /// One token's indexer key, head weights and query heads.
    ix_rows: [Vec<f32>; 3],
    sparse: SparseScratch,
}

/// What one query's sparse attention keeps from step to step: the indexer's scores, the
/// selection and the rows it gathered.
#[derive(Default)]
pub(crate) struct SparseScratch {
    scores: Vec<f32>,
    /// The indexer query's bf16 pairs ([`index_scores_with`]).
    pairs: Vec<half::bf16>,
    order: Vec<u32>,
    chosen: Vec<u32>,
    gathered: Gathered,
}

/// `kv_b_proj (H (d_n + d_v), d_c)` -> `W_UK (H, d_n, d_c)`, `W_UV (H, d_v, d_c)`.
fn split_kv_b(kv_b: &Tensor, h: usize, d_n: usize, d_v: usize, d_c: usize) -> Result<(Tensor, Tensor)> {
    let kv_b = kv_b.reshape((h, d_n + d_v, d_c))?;
    Ok((kv_b.narrow(1, 0, d_n)?.contiguous()?, kv_b.narrow(1, d_n, d_v)?.contiguous()?))
}

/// One span of a tensor pass as [`Mla::forward`] sees it: `len` new tokens at `pos`, after
/// what `cache` holds (no cache: a training sequence, on its own rows from position 0).
pub struct SpanRows<'p, 'c> {
    pub len: usize,
    pub pos: Positions<'p>,
    pub cache: Option<&'c mut LatentCache>,
}

/// Where the new tokens sit, shared by every layer of one step: their RoPE angles and, for more
/// than one token, the causal mask.
#[derive(Clone)]
pub struct Positions<'a> {
    rope: &'a Rope,
    angles: Angles,
    mask: Option<Tensor>,
    /// The first new token's position.
    start: usize,
}

impl<'a> Positions<'a> {
    /// `t` new tokens after `past` cached ones.
    pub fn new(rope: &'a Rope, past: usize, t: usize, device: &candle_core::Device) -> Result<Positions<'a>> {
        let mask = if t > 1 { Some(causal_mask(t, past + t, device)?) } else { None };
        Ok(Positions { rope, angles: rope.angles(past, t, device)?, mask, start: past })
    }

    /// The first new token's position.
    pub fn start(&self) -> usize {
        self.start
    }
}

/// `(T, S)`: 0 where query `i` (at position `S - T + i`) may see key `j`, -inf after it.
fn causal_mask(t: usize, s: usize, device: &candle_core::Device) -> Result<Tensor> {
    let past = s - t;
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..s).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Tensor::from_vec(mask, (t, s), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dsa::{index_scores, ContiguousKeys};
    use crate::kernels::matvec::tests::random;

    #[test]
    fn sparse_attention_reads_only_the_rows_the_indexer_selects() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-v32");
        let (model, _) = crate::Model::load(&dir, None, &candle_core::Device::Cpu).unwrap();
        let mla = &model.layers[1].attn;
        let ix = mla.indexer.as_ref().unwrap();
        let (h, d_c, d_r, d_i, h_i) = (mla.n_heads, mla.d_c, mla.d_r, ix.dim(), ix.heads());
        let n = 150;
        let (c, r, keys) = (random(n * d_c, 1), random(n * d_r, 2), random(n * d_i, 3));
        let (q_h, w, q_lat, q_rope) = (random(h_i * d_i, 4), random(h_i, 5), random(h * d_c, 6), random(h * d_r, 7));
        // The selection, by the kernels directly.
        let mut scores = vec![0f32; n];
        index_scores(&q_h, &w, &ContiguousKeys { keys: &keys, d_i }, d_i, &mut scores);
        let (mut order, mut chosen) = (Vec::new(), Vec::new());
        top_k(&scores, ix.topk(), &mut order, &mut chosen);
        assert_eq!(chosen.len(), ix.topk());
        // A cache whose other rows are NaN: attention that read them, even masked, would be NaN.
        let layout = PageLayout::of(CacheKind::Dense(DType::F32), 1, d_c, d_r).unwrap().with_index_keys(d_i);
        let mut cache = LatentCache::in_pool(&PagePool::new(layout, None), &candle_core::Device::Cpu);
        let nan = vec![f32::NAN; d_c.max(d_r)];
        for s in 0..n {
            let (row_c, row_r) = if chosen.contains(&(s as u32)) {
                (&c[s * d_c..(s + 1) * d_c], &r[s * d_r..(s + 1) * d_r])
            } else {
                (&nan[..d_c], &nan[..d_r])
            };
            cache.push_row_indexed(0, row_c, row_r, &keys[s * d_i..(s + 1) * d_i]).unwrap();
        }
        let mut o_lat = vec![0f32; h * d_c];
        let scratch = (&mut SparseScratch::default(), &mut MlaScratch::default(), &mut Int8Scratch::default());
        let mut q = q_lat.clone();
        mla.sparse_token(ix, (&mut q, &q_rope), (&q_h, &w), (&cache, 0, n), scratch, &mut o_lat).unwrap();
        // The same as attention over the chosen rows alone.
        let pick = |v: &[f32], d: usize| -> Vec<f32> {
            chosen.iter().flat_map(|&s| v[s as usize * d..(s as usize + 1) * d].to_vec()).collect()
        };
        let shape = MlaShape { heads: h, d_c, d_r, len: chosen.len() };
        let want = mla_decode(&q_lat, &q_rope, &pick(&c, d_c), &pick(&r, d_r), shape, mla.scale as f32);
        assert!(o_lat.iter().all(|v| v.is_finite()), "a row that was not selected was read");
        assert_eq!(o_lat, want);
    }
}
