//! The DeepSeek-V2-family decoder: `embed -> [x + MLA(norm x); x + FFN(norm x)] x L -> norm -> lm_head`.
//!
//! One definition serves V2, V2-Lite and V3: query compression, YaRN, MoE layout and routing come
//! from config fields and tensor presence. The model is stateless: the [`LatentCache`] is passed
//! into `forward`, and the caller picks the attention path with [`AttentionPath`].

pub mod dsa;
pub mod layers;
pub mod mla;
pub mod moe;
pub mod ops;
pub mod rope;
pub mod step;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::cache::{CacheKind, LatentCache};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::weights::{names, Quant, Weights};
use layers::{Embedding, Linear, Mlp, RmsNorm};
pub use mla::AttentionPath;
use mla::{Mla, Positions, SpanRows};
use moe::{Moe, MoeTrace, MoeTraining};
use rope::Rope;
pub use step::Workspace;

/// A layer's feed-forward block.
#[derive(Debug, Clone)]
pub enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    attn: Mla,
    post_attention_layernorm: RmsNorm,
    ffn: Ffn,
}

impl DecoderLayer {
    /// The layer over whatever holds the batch's rows: `x + MLA(norm x)`, then `x + FFN(norm x)`.
    /// `index` is the layer's cache (and trace) index.
    fn run(&self, index: usize, pass: &mut impl Pass) -> Result<()> {
        pass.attention(index, &self.input_layernorm, &self.attn)?;
        pass.feed_forward(index, &self.post_attention_layernorm, &self.ffn)
    }
}

/// What the layer loop runs on: the residual stream of every row of a batch, and each
/// sublayer's way of computing over it. Two kinds exist: [`TensorPass`] over candle tensors
/// (training with autograd, prefill, and decoding where the slice kernels do not apply) and
/// `step::StepPass` over reused slices (decode steps that allocate nothing). Both are driven by
/// the one loop in [`DecoderLayer::run`] and [`Model::run_layers`].
trait Pass {
    /// `x += attn(norm(x))` for layer `index`.
    fn attention(&mut self, index: usize, norm: &RmsNorm, attn: &Mla) -> Result<()>;
    /// `x += ffn(norm(x))` for layer `index`.
    fn feed_forward(&mut self, index: usize, norm: &RmsNorm, ffn: &Ffn) -> Result<()>;
}

/// A pass over candle tensors: `x (N, hidden)` holds the spans' rows back to back.
struct TensorPass<'p, 'c> {
    x: Tensor,
    spans: Vec<SpanRows<'p, 'c>>,
    path: AttentionPath,
    /// Training's MoE settings; `None` for inference.
    training: Option<&'p MoeTraining<'p>>,
    /// `(layer index, trace)` of every MoE layer run in training.
    moe: Vec<(usize, MoeTrace)>,
    /// Each layer's output, in f32 (`Model::forward_traced`).
    trace: Option<Vec<Tensor>>,
}

impl Pass for TensorPass<'_, '_> {
    fn attention(&mut self, index: usize, norm: &RmsNorm, attn: &Mla) -> Result<()> {
        let y = attn.forward(&norm.forward(&self.x)?, index, &mut self.spans, self.path)?;
        self.x = (&self.x + y)?;
        Ok(())
    }

    fn feed_forward(&mut self, index: usize, norm: &RmsNorm, ffn: &Ffn) -> Result<()> {
        let normed = norm.forward(&self.x)?;
        let y = match ffn {
            Ffn::Dense(mlp) => mlp.forward(&normed)?,
            Ffn::Moe(moe) => {
                let (y, trace) = moe.forward(&normed, self.training)?;
                self.moe.extend(trace.map(|t| (index, t)));
                y
            }
        };
        self.x = (&self.x + y)?;
        if let Some(trace) = &mut self.trace {
            trace.push(self.x.to_dtype(DType::F32)?);
        }
        Ok(())
    }
}

/// One sequence's part of a [`Model::forward_spans`] batch.
pub struct Span<'a> {
    /// The new tokens.
    pub tokens: &'a [u32],
    /// The sequence's latent cache: the span attends to its rows and appends its own; the
    /// span's first token sits at position `cache.len()`. `None` runs the span on its own rows
    /// from position 0 and keeps nothing (training, scoring).
    pub cache: Option<&'a mut LatentCache>,
}

impl<'a> Span<'a> {
    /// `tokens` after what `cache` holds.
    pub fn new(tokens: &'a [u32], cache: &'a mut LatentCache) -> Span<'a> {
        Span { tokens, cache: Some(cache) }
    }

    /// `tokens` alone, from position 0.
    pub fn fresh(tokens: &'a [u32]) -> Span<'a> {
        Span { tokens, cache: None }
    }

    fn start(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.len())
    }
}

/// One multi-token-prediction module of DeepSeek-V3 (§2.2), stored as layer `num_hidden_layers + k`:
/// `h_k = block(eh_proj [enorm(embed(t_{i+k})) ‖ hnorm(h_{k-1})])`, predicting `t_{i+k+1}` through
/// `shared_head.norm` and the main model's output head. The embedding goes first in the
/// concatenation, as in the inference engines that load the published V3 weights.
#[derive(Debug, Clone)]
pub struct MtpModule {
    enorm: RmsNorm,
    hnorm: RmsNorm,
    eh_proj: Linear, // (hidden, 2 hidden)
    block: DecoderLayer,
    head_norm: RmsNorm,
}

/// What a training forward pass produced.
pub struct TrainOutput {
    /// Logits `(B T, V)`, f32.
    pub logits: Tensor,
    /// Per MTP depth k (1-based order): logits `(B (T - k), V)` predicting token `i + k + 1` at row `i`.
    pub mtp_logits: Vec<Tensor>,
    /// `(layer index, trace)` of every MoE layer run, MTP blocks last.
    pub moe: Vec<(usize, MoeTrace)>,
}

/// Which rows of the logits `forward` computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// Every new token: perplexity, tests.
    All,
    /// Only the last token: generation.
    Last,
}

/// The rows of `x` (the spans' rows back to back) that `rows` asks for: all, or each span's last.
fn pick_rows(x: Tensor, spans: &[Span<'_>], rows: LogitRows) -> Result<Tensor> {
    match rows {
        LogitRows::All => Ok(x),
        LogitRows::Last => {
            let mut last = Vec::with_capacity(spans.len());
            let mut at = 0;
            for span in spans {
                at += span.tokens.len();
                last.push(x.narrow(0, at - 1, 1)?);
            }
            Ok(Tensor::cat(&last, 0)?)
        }
    }
}

/// What loading found besides the model.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Tensors of V3's multi-token-prediction module (layers past `num_hidden_layers`), not used yet.
    pub skipped_mtp: Vec<String>,
    /// Tensors nobody asked for.
    pub unused: Vec<String>,
    /// Bytes of tensor data in the checkpoint files.
    pub stored_bytes: usize,
}

/// A loaded model.
#[derive(Debug, Clone)]
pub struct Model {
    config: Config,
    embed_tokens: Embedding, // (V, hidden)
    layers: Vec<DecoderLayer>,
    mtp: Vec<MtpModule>,
    norm: RmsNorm,
    lm_head: Linear, // (V, hidden)
    rope: Rope,
    dtype: DType,
    device: Device,
    /// Whether [`Model::decode`] runs its own step ([`Model::takes_step`], found at load).
    steps: bool,
    /// GGML formats of the quantized linear weights, e.g. `Q4_K, Q6_K`.
    quant_formats: Option<String>,
}

/// Tokens [`Model::forward`] runs per pass of a long prefill: attention scores then take
/// `H x chunk x S` values, not `H x T x S` ([`Model::forward_chunked`] takes the caller's).
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// An error saying what `path` is, when it is neither a folder nor a GGUF file: missing, a
/// file of another kind (its first bytes shown), or something else (a device, a socket).
fn not_a_model_folder(path: &Path) -> Result<()> {
    let expected = "a model folder (config.json, *.safetensors, tokenizer.json) or a GGUF file";
    let what = match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(m) if m.is_file() => {
            use std::io::Read;
            let mut head = [0u8; 8];
            let n = std::fs::File::open(path).and_then(|mut f| f.read(&mut head)).unwrap_or(0);
            let shown: String = head[..n].iter().map(|&b| if b.is_ascii_graphic() { b as char } else { '.' }).collect();
            format!(
                "is a file of {} bytes that is not GGUF (it starts with `{shown}`, a GGUF file with `GGUF`)",
                m.len()
            )
        }
        Ok(_) => "is neither a folder nor a regular file".to_string(),
        Err(e) => format!("cannot be read ({e})"),
    };
    Err(Error::InvalidArgument(format!("{}: {what}; expected {expected}", path.display())))
}

impl Model {
    /// Loads `config.json` and the safetensors in `dir`, computing in `dtype` (the checkpoint's if `None`).
    pub fn load(dir: &Path, dtype: Option<DType>, device: &Device) -> Result<(Model, LoadReport)> {
        Model::load_with_progress(dir, dtype, device, |_, _| {})
    }

    /// Like `load`, calling `progress(layers_done, n_layers)` as decoder layers are read.
    pub fn load_with_progress(
        dir: &Path,
        dtype: Option<DType>,
        device: &Device,
        progress: impl FnMut(usize, usize),
    ) -> Result<(Model, LoadReport)> {
        Model::load_quantized(dir, dtype, None, device, progress)
    }

    /// Like `load_with_progress`, quantizing the linear weights to `quant` as they are read.
    /// `dir` may also be a GGUF file of llama.cpp's `deepseek2` architecture: its quantized
    /// weights are then used as they are stored, the others computed in `dtype` (F32 if `None`).
    pub fn load_quantized(
        dir: &Path,
        dtype: Option<DType>,
        quant: Option<Quant>,
        device: &Device,
        progress: impl FnMut(usize, usize),
    ) -> Result<(Model, LoadReport)> {
        let (config, weights) = if crate::weights::gguf::is_gguf(dir) {
            let file = crate::weights::gguf::GgufFile::open(dir)?;
            let config = crate::weights::gguf_model::config(&file)?;
            let weights = Weights::open_gguf(file, &config, dtype, device)?;
            (config, weights)
        } else {
            not_a_model_folder(dir)?;
            let config = Config::from_file(&dir.join("config.json"))?;
            (config.clone(), Weights::open(dir, dtype, device)?.with_fp8_block(config.fp8_block))
        };
        let weights = weights.with_quant(quant);
        // The multi-token-prediction modules load when the file has them whole (a checkpoint may
        // carry only part of one, or none); they draft tokens for speculative decoding.
        let mtp = (0..config.num_nextn_predict_layers).all(|k| {
            let n = names::layer(config.num_hidden_layers + k);
            ["eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight"]
                .iter()
                .all(|t| weights.contains(&n.mtp(t)))
                && weights.contains(&n.attn("o_proj"))
                && weights.contains(&n.input_layernorm())
        });
        let model = Model::build(config, &weights, mtp, progress)?;
        let n_layers = model.config.num_hidden_layers;
        let (skipped_mtp, unused) =
            weights.unused().into_iter().partition(|name| names::is_layer_at_or_past(name, n_layers));
        Ok((model, LoadReport { skipped_mtp, unused, stored_bytes: weights.stored_bytes() }))
    }

    /// Builds the model from already mapped weights, checking every tensor's shape against `config`;
    /// `progress(layers_done, n_layers)` follows the decoder layers.
    pub fn from_weights(config: Config, w: &Weights, progress: impl FnMut(usize, usize)) -> Result<Model> {
        Model::build(config, w, false, progress)
    }

    /// Like `from_weights`, also loading the `num_nextn_predict_layers` MTP modules (training).
    pub fn from_weights_with_mtp(config: Config, w: &Weights) -> Result<Model> {
        Model::build(config, w, true, |_, _| {})
    }

    fn build(config: Config, w: &Weights, with_mtp: bool, mut progress: impl FnMut(usize, usize)) -> Result<Model> {
        let (hidden, vocab, n_layers) = (config.hidden_size, config.vocab_size, config.num_hidden_layers);
        let embed_tokens = Embedding::load(w, names::EMBED_TOKENS, vocab, hidden)?;
        let mut layers = Vec::new();
        for i in 0..n_layers {
            layers.push(load_layer(w, &config, i)?);
            progress(i + 1, n_layers);
        }
        let mut mtp = Vec::new();
        if with_mtp {
            for k in 0..config.num_nextn_predict_layers {
                let i = n_layers + k;
                let n = names::layer(i);
                mtp.push(MtpModule {
                    enorm: RmsNorm::load(w, &n.mtp("enorm.weight"), hidden, config.rms_norm_eps)?,
                    hnorm: RmsNorm::load(w, &n.mtp("hnorm.weight"), hidden, config.rms_norm_eps)?,
                    eh_proj: Linear::load(w, &n.mtp("eh_proj.weight"), hidden, 2 * hidden, None)?,
                    block: load_layer(w, &config, i)?,
                    head_norm: RmsNorm::load(w, &n.mtp("shared_head.norm.weight"), hidden, config.rms_norm_eps)?,
                });
            }
        }
        let norm = RmsNorm::load(w, names::FINAL_NORM, hidden, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.as_linear()?
        } else {
            Linear::load(w, names::LM_HEAD, vocab, hidden, None)?
        };
        let rope = Rope::new(&config.rope, config.qk_rope_head_dim);
        let mut model = Model {
            config,
            embed_tokens,
            layers,
            mtp,
            norm,
            lm_head,
            rope,
            dtype: w.dtype(),
            device: w.device().clone(),
            steps: false,
            quant_formats: w.quant_formats(),
        };
        model.steps = model.takes_step();
        Ok(model)
    }

    /// Bytes the weights occupy in memory as loaded (quantized linears at their block size).
    pub fn weight_bytes(&self) -> usize {
        let mut total = self.embed_tokens.weight_bytes() + self.norm.weight_bytes();
        if !self.config.tie_word_embeddings {
            total += self.lm_head.weight_bytes();
        }
        for layer in &self.layers {
            total += layer.input_layernorm.weight_bytes() + layer.post_attention_layernorm.weight_bytes();
            total += layer.attn.weight_bytes();
            total += match &layer.ffn {
                Ffn::Dense(mlp) => mlp.weight_bytes(),
                Ffn::Moe(moe) => moe.weight_bytes(),
            };
        }
        total
    }

    /// GGML formats of the quantized linear weights (`Q4_K, Q6_K`), `None` when all are dense.
    pub fn quant_summary(&self) -> Option<&str> {
        self.quant_formats.as_deref()
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty latent cache for this model, in [`Model::cache_dtype`].
    pub fn new_cache(&self) -> Result<LatentCache> {
        self.new_cache_of(self.cache_kind())
    }

    /// An empty latent cache of `kind`: 8-bit rows ([`CacheKind::Int8`]: half of bf16's bytes,
    /// and decode attention by 8-bit products) fail where the latent sizes are not multiples
    /// of 4.
    pub fn new_cache_of(&self, kind: CacheKind) -> Result<LatentCache> {
        LatentCache::with_kind(&self.config, kind, &self.device)
    }

    /// Sets how many rows each query of a sparse-attention model (DeepSeek-V3.2) attends to at
    /// most, in place of the config's `index_topk`: for study and measurement (a value past the
    /// context turns the selection off: dense MLA over every row, with the indexer's keys still
    /// computed and cached). An error for a model without sparse attention, or for 0.
    pub fn set_index_topk(&mut self, topk: usize) -> Result<()> {
        let Some(dsa) = self.config.dsa.as_mut() else {
            return Err(Error::InvalidArgument(format!(
                "--index-topk applies to sparse-attention models (model_type deepseek_v32); this one is {:?}",
                self.config.model_type
            )));
        };
        if topk == 0 {
            return Err(Error::InvalidArgument("--index-topk must be at least 1".into()));
        }
        dsa.index_topk = topk;
        for layer in &mut self.layers {
            if let Some(ix) = layer.attn.indexer_mut() {
                ix.set_topk(topk);
            }
        }
        Ok(())
    }

    /// Whether every layer can fill an expanded cache ([`CacheKind::Expanded`], for study): its
    /// `kv_b_proj` is stored bf16 or f32.
    pub fn takes_expanded_cache(&self) -> bool {
        self.config.dsa.is_none() && self.layers.iter().all(|l| l.attn.has_dense_kv_b())
    }

    /// The default kind of cache: rows in [`Model::cache_dtype`].
    pub fn cache_kind(&self) -> CacheKind {
        CacheKind::Dense(self.cache_dtype())
    }

    /// The dtype of the latent cache: the compute dtype, except that a model with quantized
    /// weights computing in f32 caches in bf16 (as llama.cpp caches in f16): half the bytes read
    /// per decoded token at depth, and the fused bf16 attention kernel. Its 8-bit
    /// weights and activations err far more than the bf16 rounding of the cache.
    pub fn cache_dtype(&self) -> DType {
        match (self.dtype, &self.quant_formats) {
            (DType::F32, Some(_)) => DType::BF16,
            (dtype, _) => dtype,
        }
    }

    /// Runs `tokens` after what `cache` holds, appends their latents, returns f32 logits `(rows, V)`.
    /// More than [`DEFAULT_PREFILL_CHUNK`] tokens are run chunk by chunk; the result is the same.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut LatentCache,
        path: AttentionPath,
        rows: LogitRows,
    ) -> Result<Tensor> {
        self.forward_chunked(tokens, cache, path, rows, DEFAULT_PREFILL_CHUNK)
    }

    /// [`Model::forward`] in passes of at most `chunk` tokens (at least 1).
    pub fn forward_chunked(
        &self,
        tokens: &[u32],
        cache: &mut LatentCache,
        path: AttentionPath,
        rows: LogitRows,
        chunk: usize,
    ) -> Result<Tensor> {
        self.check_tokens(tokens, cache.len())?;
        let chunks: Vec<&[u32]> = tokens.chunks(chunk.max(1)).collect();
        let mut logits = Vec::with_capacity(chunks.len());
        for (i, part) in chunks.iter().enumerate() {
            let rows = match rows {
                LogitRows::Last if i + 1 < chunks.len() => None,
                rows => Some(rows),
            };
            let mut spans = [Span::new(part, cache)];
            let out = self.forward_spans(&mut spans, path, rows.unwrap_or(LogitRows::Last))?;
            if rows.is_some() {
                logits.push(out);
            }
        }
        Ok(Tensor::cat(&logits, 0)?)
    }

    /// One forward over a batch of sequences: each span's tokens after what its cache holds
    /// (or alone from position 0), every span over its own rows only. Returns f32 logits of the
    /// rows asked for, span after span: every token's (`All`) or each span's last (`Last`).
    /// Every linear layer multiplies all the batch's rows per pass over its weight; each MoE
    /// expert runs once on the rows routed to it.
    pub fn forward_spans(&self, spans: &mut [Span<'_>], path: AttentionPath, rows: LogitRows) -> Result<Tensor> {
        let (x, _) = self.tensor_pass(spans, path, None, false)?;
        self.logits(&pick_rows(x, spans, rows)?)
    }

    /// [`Model::forward_spans`], and every row's final hidden state after the model's last norm
    /// `(N, hidden)`: what multi-token prediction drafts from. The logits of `rows` are computed
    /// as [`Model::forward_spans`] computes them (the same products over the same rows).
    pub fn forward_spans_hidden(
        &self,
        spans: &mut [Span<'_>],
        path: AttentionPath,
        rows: LogitRows,
    ) -> Result<(Tensor, Tensor)> {
        let (x, _) = self.tensor_pass(spans, path, None, false)?;
        let normed = self.norm.forward(&x)?;
        let picked = pick_rows(normed.clone(), spans, rows)?;
        Ok((self.lm_head.forward(&picked)?.to_dtype(DType::F32)?, normed))
    }

    /// A prefill that also returns the final hidden states: `tokens` after what `cache` holds, in
    /// chunks of at most `chunk`; the last token's logits `(1, V)` and every token's hidden state
    /// after the last norm, `(T, hidden)` f32.
    pub fn prefill_hidden(&self, tokens: &[u32], cache: &mut LatentCache, chunk: usize) -> Result<(Tensor, Tensor)> {
        self.check_tokens(tokens, cache.len())?;
        let (mut logits, mut hidden) = (None, Vec::new());
        for part in tokens.chunks(chunk.max(1)) {
            let path = if part.len() > 1 { AttentionPath::Expanded } else { AttentionPath::Absorbed };
            let (l, h) = self.forward_spans_hidden(&mut [Span::new(part, cache)], path, LogitRows::Last)?;
            logits = Some(l);
            hidden.push(h.to_dtype(DType::F32)?);
        }
        let logits = logits.ok_or_else(|| Error::InvalidArgument("forward needs at least one token".into()))?;
        Ok((logits, Tensor::cat(&hidden, 0)?))
    }

    /// A cache for the multi-token-prediction modules: one layer per module, of `kind`.
    pub fn new_mtp_cache(&self, kind: CacheKind) -> Result<LatentCache> {
        let layout = crate::cache::PageLayout::new(&self.config, kind)?;
        let layout = crate::cache::PageLayout { layers: self.mtp.len().max(1), ..layout };
        Ok(LatentCache::in_pool(&crate::cache::PagePool::new(layout, None), &self.device))
    }

    /// Multi-token prediction at inference: module `k` over `m` positions that follow what
    /// `cache`'s layer `k` holds. `hidden (m × hidden)` is the previous depth's hidden state at
    /// each position (the main model's after its last norm for `k = 0`, module `k - 1`'s output
    /// for deeper ones, or module `k`'s own when one module is chained), `tokens (m)` the token
    /// after each position. Appends the module's latent rows to `cache`'s layer `k` and returns
    /// each position's logits for the token after `tokens` (`m × V`) and the module's output
    /// hidden states (`m × hidden`), f32.
    pub fn mtp_forward(
        &self,
        k: usize,
        hidden: &[f32],
        tokens: &[u32],
        cache: &mut LatentCache,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (module, y) = self.mtp_block(k, hidden, tokens, cache)?;
        let logits = self.lm_head.forward(&module.head_norm.forward(&y)?)?.to_dtype(DType::F32)?;
        Ok((logits.flatten_all()?.to_vec1()?, y.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?))
    }

    /// [`Model::mtp_forward`] without the logits: the module's latent rows for `tokens`'
    /// positions appended to `cache`'s layer `k` (a prompt's, before any draft is asked for).
    pub fn mtp_prefill(&self, k: usize, hidden: &[f32], tokens: &[u32], cache: &mut LatentCache) -> Result<()> {
        self.mtp_block(k, hidden, tokens, cache).map(drop)
    }

    /// Module `k`, and the position `tokens` start at, once the inputs are checked: a hidden state
    /// per token, tokens in the vocabulary and within the context.
    fn mtp_checked(
        &self,
        k: usize,
        hidden: &[f32],
        tokens: &[u32],
        cache: &LatentCache,
    ) -> Result<(&MtpModule, usize)> {
        let module = self.mtp.get(k).ok_or_else(|| {
            Error::InvalidArgument(format!("the model has {} MTP modules, not {}", self.mtp.len(), k + 1))
        })?;
        let (m, h) = (tokens.len(), self.config.hidden_size);
        if m == 0 || hidden.len() != m * h {
            return Err(Error::InvalidArgument(format!(
                "MTP takes a hidden state of {h} values per token: {} values for {m} tokens",
                hidden.len()
            )));
        }
        let start = cache.layer_len(k);
        self.check_tokens(tokens, start)?;
        Ok((module, start))
    }

    /// Module `k`'s layer over `tokens`' positions: the module and its output `(m, hidden)`.
    fn mtp_block(
        &self,
        k: usize,
        hidden: &[f32],
        tokens: &[u32],
        cache: &mut LatentCache,
    ) -> Result<(&MtpModule, Tensor)> {
        let (module, start) = self.mtp_checked(k, hidden, tokens, cache)?;
        let (m, h) = (tokens.len(), self.config.hidden_size);
        let emb = self.embed_tokens.forward(tokens, &self.device)?;
        let prev = Tensor::from_vec(hidden.to_vec(), (m, h), &self.device)?.to_dtype(emb.dtype())?;
        let cat = Tensor::cat(&[module.enorm.forward(&emb)?, module.hnorm.forward(&prev)?], 1)?;
        let x = module.eh_proj.forward(&cat)?;
        let pos = Positions::new(&self.rope, start, m, &self.device)?;
        let path = if m > 1 { AttentionPath::Expanded } else { AttentionPath::Absorbed };
        let spans = vec![SpanRows { len: m, pos, cache: Some(cache) }];
        let mut pass = TensorPass { x, spans, path, training: None, moe: Vec::new(), trace: None };
        module.block.run(k, &mut pass)?;
        Ok((module, pass.x))
    }

    /// The layer loop over `spans` by candle tensors: the last hidden states `(N, hidden)` and
    /// the pass (its MoE traces and layer outputs).
    fn tensor_pass<'p, 'c>(
        &'p self,
        spans: &'c mut [Span<'_>],
        path: AttentionPath,
        training: Option<&'p MoeTraining<'p>>,
        traced: bool,
    ) -> Result<(Tensor, TensorPass<'p, 'c>)> {
        if spans.is_empty() {
            return Err(Error::InvalidArgument("forward needs at least one sequence".into()));
        }
        let mut ids = Vec::new();
        let mut rows: Vec<SpanRows<'_, '_>> = Vec::with_capacity(spans.len());
        for span in spans.iter_mut() {
            let (start, len) = (span.start(), span.tokens.len());
            self.check_tokens(span.tokens, start)?;
            ids.extend_from_slice(span.tokens);
            // Spans at the same positions (a training batch) share their angles and mask.
            let pos = match rows.last() {
                Some(prev) if prev.len == len && prev.pos.start() == start => prev.pos.clone(),
                _ => Positions::new(&self.rope, start, len, &self.device)?,
            };
            rows.push(SpanRows { len, pos, cache: span.cache.as_deref_mut() });
        }
        let x = self.embed_tokens.forward(&ids, &self.device)?; // (N, hidden)
        let mut pass = TensorPass { x, spans: rows, path, training, moe: Vec::new(), trace: traced.then(Vec::new) };
        self.run_layers(&mut pass)?;
        Ok((pass.x.clone(), pass))
    }

    /// The one layer loop, over any [`Pass`].
    fn run_layers(&self, pass: &mut impl Pass) -> Result<()> {
        for (i, layer) in self.layers.iter().enumerate() {
            layer.run(i, pass)?;
        }
        Ok(())
    }

    /// Training's forward: `tokens` holds `b` sequences of `t` tokens back to back, each starting at
    /// position 0. Returns the logits of every token, of every MTP depth, and the MoE traces.
    pub fn forward_train(&self, tokens: &[u32], b: usize, t: usize, moe: &MoeTraining<'_>) -> Result<TrainOutput> {
        if tokens.len() != b * t || t == 0 {
            return Err(Error::InvalidArgument(format!(
                "forward_train needs {b} sequences of {t} tokens, got {} tokens",
                tokens.len()
            )));
        }
        let mut spans: Vec<Span<'_>> = tokens.chunks(t).map(Span::fresh).collect();
        let moe_main = MoeTraining { seq_len: t, ..moe.clone() };
        let (x, pass) = self.tensor_pass(&mut spans, AttentionPath::Expanded, Some(&moe_main), false)?;
        let mut traces = pass.moe;
        let normed = self.norm.forward(&x)?;
        let logits = self.lm_head.forward(&normed)?.to_dtype(DType::F32)?;

        let hidden = self.config.hidden_size;
        let embedded = self.embed_tokens.forward(tokens, &self.device)?.reshape((b, t, hidden))?;
        let mut mtp_logits = Vec::with_capacity(self.mtp.len());
        let mut prev = normed.reshape((b, t, hidden))?; // h_0: the main model's output
        for (k, module) in self.mtp.iter().enumerate() {
            let depth = k + 1;
            if depth >= t {
                break;
            }
            let len = t - depth;
            let emb = embedded.narrow(1, depth, len)?; // embed(t_{i+k})
            let h = prev.narrow(1, 0, len)?;
            let cat = Tensor::cat(
                &[
                    module.enorm.forward(&emb.reshape((b * len, hidden))?)?,
                    module.hnorm.forward(&h.reshape((b * len, hidden))?)?,
                ],
                1,
            )?;
            let x = module.eh_proj.forward(&cat)?;
            let moe_k = MoeTraining { seq_len: len, ..moe.clone() };
            let pos = Positions::new(&self.rope, 0, len, &self.device)?;
            let rows = (0..b).map(|_| SpanRows { len, pos: pos.clone(), cache: None }).collect();
            let mut pass = TensorPass {
                x,
                spans: rows,
                path: AttentionPath::Expanded,
                training: Some(&moe_k),
                moe: Vec::new(),
                trace: None,
            };
            module.block.run(self.layers.len() + k, &mut pass)?;
            traces.append(&mut pass.moe);
            let y = pass.x;
            mtp_logits.push(self.lm_head.forward(&module.head_norm.forward(&y)?)?.to_dtype(DType::F32)?);
            prev = y.reshape((b, len, hidden))?;
        }
        Ok(TrainOutput { logits, mtp_logits, moe: traces })
    }

    /// MoE layers by index (MTP blocks numbered after the decoder layers), for training's bias updates.
    pub fn moe_layers_mut(&mut self) -> Vec<(usize, &mut Moe)> {
        let n = self.layers.len();
        let main = self.layers.iter_mut().enumerate();
        let mtp = self.mtp.iter_mut().enumerate().map(|(k, m)| (n + k, &mut m.block));
        main.chain(mtp)
            .filter_map(|(i, layer)| match &mut layer.ffn {
                Ffn::Moe(moe) => Some((i, moe)),
                Ffn::Dense(_) => None,
            })
            .collect()
    }

    /// The MTP modules loaded (training only).
    pub fn mtp_depth(&self) -> usize {
        self.mtp.len()
    }

    /// Like `forward` with every row, also returning each decoder layer's output `(T, hidden)`.
    pub fn forward_traced(
        &self,
        tokens: &[u32],
        cache: &mut LatentCache,
        path: AttentionPath,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut spans = [Span::new(tokens, cache)];
        let (x, pass) = self.tensor_pass(&mut spans, path, None, true)?;
        Ok((self.logits(&x)?, pass.trace.unwrap_or_default()))
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let normed = self.norm.forward(hidden)?;
        Ok(self.lm_head.forward(&normed)?.to_dtype(DType::F32)?)
    }

    fn check_tokens(&self, tokens: &[u32], past: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::InvalidArgument("forward needs at least one token".into()));
        }
        let max = self.config.max_position_embeddings;
        if past + tokens.len() > max {
            return Err(Error::PromptTooLong { n_tokens: past + tokens.len(), max });
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary (vocab_size {})",
                self.config.vocab_size
            )));
        }
        Ok(())
    }
}

fn load_layer(w: &Weights, cfg: &Config, i: usize) -> Result<DecoderLayer> {
    let names = names::layer(i);
    let hidden = cfg.hidden_size;
    let ffn = match &cfg.moe {
        Some(moe) if cfg.is_moe_layer(i) => Ffn::Moe(Moe::load(w, cfg, moe, &names)?),
        _ => Ffn::Dense(Mlp::load(w, |p| names.mlp(p), hidden, cfg.intermediate_size)?),
    };
    Ok(DecoderLayer {
        input_layernorm: RmsNorm::load(w, &names.input_layernorm(), hidden, cfg.rms_norm_eps)?,
        attn: Mla::load(w, cfg, &names)?,
        post_attention_layernorm: RmsNorm::load(w, &names.post_attention_layernorm(), hidden, cfg.rms_norm_eps)?,
        ffn,
    })
}
