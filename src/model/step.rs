//! Decode without allocating: one token through every layer over slices of a [`Workspace`].
//!
//! [`Model::decode_step`] computes what [`Model::forward`] computes for one token on the absorbed
//! path (tests/step.rs holds them together, and the parity fixtures decode through it), but
//! over buffers sized by the first token and reused by the next ones, instead of a candle tensor
//! per op. The products are the same kernels; the step only drops the tensors around them, so
//! at depth 0 it is a few percent faster and its memory does not churn.
//!
//! What still allocates per token: the thread pool's queue, a block per 63 tasks it is handed
//! (one per token: the whole step runs as one task of the pool), and the kernels' fallbacks
//! where the fast ones do not apply (an f32 latent cache, or a CPU without AVX-512 BF16 for a
//! bf16 one).

use candle_core::DType;

use super::layers::{round_to, JobOutputs, Linear, Mlp, TokenInput};
use super::mla::{AttentionPath, AttnScratch};
use super::moe::FfnScratch;
use super::{Ffn, LogitRows, Model};
use crate::cache::{CacheKind, LatentCache};
use crate::error::{Error, Result};

/// The buffers of [`Model::decode_step`], kept from token to token. One per sequence being
/// decoded at a time; [`Workspace::default`] makes an empty one, sized by its first step.
#[derive(Default)]
pub struct Workspace {
    /// The residual stream.
    x: Vec<f32>,
    /// A sublayer's normed input, with its codes.
    normed: TokenInput,
    /// A sublayer's output.
    out: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    attn: AttnScratch,
    ffn: FfnScratch,
    logits: JobOutputs,
    /// The logits where the step falls back to [`Model::forward`].
    fallback: Vec<f32>,
    /// Whether the last step fell back.
    fell_back: bool,
}

impl Workspace {
    /// The logits of the last [`Model::decode_step`] (empty before the first).
    pub fn logits(&self) -> &[f32] {
        if self.fell_back || self.logits.is_empty() {
            &self.fallback
        } else {
            self.logits.get(0)
        }
    }
}

impl Model {
    /// Whether [`Model::decode_step`] runs its own step on this model (else it falls back to
    /// [`Model::forward`]): every weight takes the decode kernels (no biases, no training
    /// variables) and the embedding is quantized or stored bf16 or f32.
    pub fn takes_step(&self) -> bool {
        let ffn = |f: &Ffn| match f {
            Ffn::Dense(mlp) => mlp.takes_token(),
            Ffn::Moe(moe) => moe.takes_step(),
        };
        self.embed_tokens.takes_rows()
            && self.lm_head.takes_token_rows()
            && !self.norm.tracks()
            && self.layers.iter().all(|l| {
                l.attn.takes_step()
                    && ffn(&l.ffn)
                    && !l.input_layernorm.tracks()
                    && !l.post_attention_layernorm.tracks()
            })
    }

    /// Decodes `token` after what `cache` holds: appends its latents and returns its logits
    /// (f32, `vocab_size`), which live in `ws` until the next step. The same logits as
    /// `forward(&[token], cache, AttentionPath::Absorbed, LogitRows::Last)`, computed without a
    /// tensor per op: once `ws` has seen a token and `cache` has room
    /// ([`LatentCache::reserve`]), the step allocates nothing (see the module's notes).
    pub fn decode_step<'w>(&self, token: u32, cache: &mut LatentCache, ws: &'w mut Workspace) -> Result<&'w [f32]> {
        self.check_tokens(&[token], cache.len())?;
        let dense_ok = matches!(cache.kind(), CacheKind::Int8 | CacheKind::Dense(DType::BF16 | DType::F32));
        if !dense_ok || !self.steps {
            let logits = self.forward(&[token], cache, AttentionPath::Absorbed, LogitRows::Last)?;
            ws.fallback = logits.flatten_all()?.to_vec1()?;
            ws.fell_back = true;
            return Ok(&ws.fallback);
        }
        ws.fell_back = false;
        // The whole step as one task of the thread pool: its parallel loops then queue their
        // tasks on the pool's own deques, not on the shared queue that allocates as it goes.
        rayon::scope(|_| self.step(token, cache, ws))?;
        Ok(ws.logits.get(0))
    }

    fn step(&self, token: u32, cache: &mut LatentCache, ws: &mut Workspace) -> Result<()> {
        let (hidden, dtype) = (self.config.hidden_size, self.dtype);
        let Workspace { x, normed, out, cos, sin, attn, ffn, logits, .. } = ws;
        x.resize(hidden, 0.0);
        out.resize(hidden, 0.0);
        self.embed_tokens
            .row_into(token as usize, x)
            .ok_or_else(|| Error::InvalidArgument("the embedding is neither quantized nor bf16/f32".into()))?;
        round_to(dtype, x);
        self.rope.angles_at(cache.len(), cos, sin);
        let add = |x: &mut Vec<f32>, out: &[f32]| {
            x.iter_mut().zip(out).for_each(|(a, &b)| *a += b);
            round_to(dtype, x);
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let input = normed.x_mut();
            input.resize(hidden, 0.0);
            layer.input_layernorm.forward_row(x, input, dtype);
            normed.requantize(layer.attn.input_groups());
            layer.attn.step(normed, i, cache, &self.rope, (cos, sin), dtype, attn, out)?;
            add(x, out);

            let input = normed.x_mut();
            layer.post_attention_layernorm.forward_row(x, input, dtype);
            match &layer.ffn {
                Ffn::Dense(mlp) => {
                    normed.requantize(mlp.input_groups());
                    let scratch = ffn.mlp();
                    Mlp::run_token(1, |_| mlp, normed, dtype, scratch);
                    out.copy_from_slice(scratch.output(0));
                }
                Ffn::Moe(moe) => moe.step(normed, dtype, ffn, out),
            }
            add(x, out);
        }
        let input = normed.x_mut();
        self.norm.forward_row(x, input, dtype);
        normed.requantize([self.lm_head.act_group()]);
        Linear::token_rows_into(1, |_| (&self.lm_head, &*normed), logits);
        logits.round(dtype);
        Ok(())
    }
}
