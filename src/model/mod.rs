//! The DeepSeek-V2-family decoder: `embed -> [x + MLA(norm x); x + FFN(norm x)] x L -> norm -> lm_head`.
//!
//! One definition serves V2, V2-Lite and V3: query compression, YaRN, MoE layout and routing come
//! from config fields and tensor presence. The model is stateless: the [`LatentCache`] is passed
//! into `forward`, and the caller picks the attention path with [`AttentionPath`].

pub mod layers;
pub mod mla;
pub mod moe;
pub mod rope;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::cache::LatentCache;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::weights::{names, Weights};
use layers::{Linear, Mlp, RmsNorm};
pub use mla::AttentionPath;
use mla::{Mla, Positions};
use moe::Moe;
use rope::Rope;

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

/// Which rows of the logits `forward` computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// Every new token: perplexity, tests.
    All,
    /// Only the last token: generation.
    Last,
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
    embed_tokens: Tensor, // (V, hidden)
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear, // (V, hidden)
    rope: Rope,
    dtype: DType,
    device: Device,
    prefill_chunk: usize,
}

/// Tokens run per step of a long prefill: attention scores then take `H x chunk x S` values, not `H x T x S`.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

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
        let config = Config::from_file(&dir.join("config.json"))?;
        let weights = Weights::open(dir, dtype, device)?.with_fp8_block(config.fp8_block);
        let model = Model::from_weights(config, &weights, progress)?;
        let n_layers = model.config.num_hidden_layers;
        let (skipped_mtp, unused) =
            weights.unused().into_iter().partition(|name| names::is_layer_at_or_past(name, n_layers));
        Ok((model, LoadReport { skipped_mtp, unused, stored_bytes: weights.stored_bytes() }))
    }

    /// Builds the model from already mapped weights, checking every tensor's shape against `config`;
    /// `progress(layers_done, n_layers)` follows the decoder layers.
    pub fn from_weights(config: Config, w: &Weights, mut progress: impl FnMut(usize, usize)) -> Result<Model> {
        let (hidden, vocab, n_layers) = (config.hidden_size, config.vocab_size, config.num_hidden_layers);
        let embed_tokens = w.get(names::EMBED_TOKENS, &[vocab, hidden])?;
        let mut layers = Vec::new();
        for i in 0..n_layers {
            layers.push(load_layer(w, &config, i)?);
            progress(i + 1, n_layers);
        }
        let norm = RmsNorm::load(w, names::FINAL_NORM, hidden, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings {
            Linear::from_weight(embed_tokens.clone())
        } else {
            Linear::load(w, names::LM_HEAD, vocab, hidden, None)?
        };
        let rope = Rope::new(&config.rope, config.qk_rope_head_dim);
        Ok(Model {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            dtype: w.dtype(),
            device: w.device().clone(),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        })
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

    /// An empty latent cache for this model, in its compute dtype.
    pub fn new_cache(&self) -> Result<LatentCache> {
        LatentCache::new(&self.config, self.dtype, &self.device)
    }

    /// Runs `tokens` after what `cache` holds, appends their latents, returns f32 logits `(rows, V)`.
    /// More than `prefill_chunk` tokens are run chunk by chunk; the result is the same.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut LatentCache,
        path: AttentionPath,
        rows: LogitRows,
    ) -> Result<Tensor> {
        self.check_tokens(tokens, cache.len())?;
        let chunks: Vec<&[u32]> = tokens.chunks(self.prefill_chunk).collect();
        let mut logits = Vec::with_capacity(chunks.len());
        for (i, chunk) in chunks.iter().enumerate() {
            let hidden = self.hidden_states(chunk, cache, path, None)?;
            match rows {
                LogitRows::All => logits.push(self.logits(&hidden)?),
                LogitRows::Last if i + 1 == chunks.len() => {
                    logits.push(self.logits(&hidden.narrow(0, chunk.len() - 1, 1)?)?)
                }
                LogitRows::Last => {}
            }
        }
        Ok(Tensor::cat(&logits, 0)?)
    }

    /// Tokens a long `forward` runs per step (bounds the attention scores' memory).
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }

    /// Sets the prefill chunk (at least 1 token).
    pub fn set_prefill_chunk(&mut self, tokens: usize) {
        self.prefill_chunk = tokens.max(1);
    }

    /// Like `forward` with every row, also returning each decoder layer's output `(T, hidden)`.
    pub fn forward_traced(
        &self,
        tokens: &[u32],
        cache: &mut LatentCache,
        path: AttentionPath,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut trace = Vec::with_capacity(self.layers.len());
        let hidden = self.hidden_states(tokens, cache, path, Some(&mut trace))?;
        Ok((self.logits(&hidden)?, trace))
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let normed = self.norm.forward(hidden)?;
        Ok(self.lm_head.forward(&normed)?.to_dtype(DType::F32)?)
    }

    fn hidden_states(
        &self,
        tokens: &[u32],
        cache: &mut LatentCache,
        path: AttentionPath,
        mut trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        self.check_tokens(tokens, cache.len())?;
        let ids = Tensor::from_slice(tokens, tokens.len(), &self.device)?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?; // (T, hidden)
        let pos = Positions::new(&self.rope, cache.len(), tokens.len(), &self.device)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let attn = layer.attn.forward(&layer.input_layernorm.forward(&x)?, i, cache, &pos, path)?;
            x = (x + attn)?;
            let normed = layer.post_attention_layernorm.forward(&x)?;
            let ffn = match &layer.ffn {
                Ffn::Dense(mlp) => mlp.forward(&normed)?,
                Ffn::Moe(moe) => moe.forward(&normed)?,
            };
            x = (x + ffn)?;
            if let Some(trace) = trace.as_deref_mut() {
                trace.push(x.to_dtype(DType::F32)?);
            }
        }
        Ok(x)
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
