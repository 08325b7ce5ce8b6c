//! Decode without allocating: one token of each of `B` sequences through every layer over slices
//! of a [`Workspace`].
//!
//! [`Model::decode`] computes what [`Model::forward_spans`] computes for `B` one-token spans on
//! the absorbed path (tests/step.rs and tests/batch.rs hold them together, and the parity
//! fixtures decode through it), but over buffers sized by the first step and reused by the next
//! ones, instead of a candle tensor per op. It runs the same layer loop
//! ([`super::DecoderLayer::run`]) through [`StepPass`]. Each linear layer multiplies the `B`
//! rows in one pass over its weight, each MoE expert runs once on the tokens that chose it, and
//! each token attends to its own sequence's cache only.
//!
//! What still allocates per step: the thread pool's queue, a block per 63 tasks it is handed
//! (one per step: the whole step runs as one task of the pool), and the kernels' fallbacks
//! where the fast ones do not apply (an f32 latent cache, or a CPU without AVX-512 BF16 for a
//! bf16 one).

use candle_core::DType;

use super::layers::{round_to, JobOutputs, Linear, Mlp, RmsNorm, TokenInput};
use super::mla::{AttnScratch, Mla};
use super::moe::FfnScratch;
use super::{AttentionPath, DecoderLayer, Ffn, LogitRows, Model, Pass, Span};
use crate::cache::{CacheKind, LatentCache};
use crate::error::{Error, Result};

/// The buffers of [`Model::decode`], kept from step to step. One per batch being decoded at a
/// time; [`Workspace::default`] makes an empty one, sized by its first step.
#[derive(Default)]
pub struct Workspace {
    /// The residual stream, `(B, hidden)`.
    x: Vec<f32>,
    /// A sublayer's normed input, with its codes.
    normed: TokenInput,
    /// A sublayer's output.
    out: Vec<f32>,
    /// Each token's RoPE angles, `(B, d_r / 2)`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// One token's angles.
    cos1: Vec<f32>,
    sin1: Vec<f32>,
    attn: AttnScratch,
    ffn: FfnScratch,
    logits: JobOutputs,
    /// The logits and final hidden states where the step falls back to the tensor path.
    fallback: Vec<f32>,
    fallback_hidden: Vec<f32>,
    /// Whether the last step fell back.
    fell_back: bool,
    /// Each token's sequence (its index in the step's caches), and each sequence's token count.
    owners: Vec<usize>,
    runs: Vec<usize>,
}

impl Workspace {
    /// The last step's final hidden states, after the model's last norm: `(tokens, hidden)`.
    pub fn hidden(&self) -> &[f32] {
        if self.fell_back {
            &self.fallback_hidden
        } else {
            self.normed.x()
        }
    }

    /// The logits of the last [`Model::decode`], `(B, V)` (empty before the first).
    pub fn logits(&self) -> &[f32] {
        if self.fell_back || self.logits.is_empty() {
            &self.fallback
        } else {
            self.logits.get(0)
        }
    }
}

/// The layer loop's pass over a [`Workspace`]'s slices: `B` tokens, one per cache.
struct StepPass<'a, 'c> {
    ws: &'a mut Workspace,
    caches: &'a mut [&'c mut LatentCache],
    model: &'a Model,
}

impl StepPass<'_, '_> {
    /// `normed = norm(x)`, row by row.
    fn norm(&mut self, norm: &RmsNorm) {
        let (hidden, dtype) = (self.model.config.hidden_size, self.model.dtype);
        let Workspace { x, normed, .. } = &mut *self.ws;
        let input = normed.x_mut();
        input.resize(x.len(), 0.0);
        for (x, y) in x.chunks_exact(hidden).zip(input.chunks_exact_mut(hidden)) {
            norm.forward_row(x, y, dtype);
        }
    }

    /// `x += out`, rounded as a `dtype` model adds.
    fn add(&mut self) {
        let Workspace { x, out, .. } = &mut *self.ws;
        x.iter_mut().zip(out.iter()).for_each(|(a, &b)| *a += b);
        round_to(self.model.dtype, x);
    }
}

impl Pass for StepPass<'_, '_> {
    fn attention(&mut self, index: usize, norm: &RmsNorm, attn: &Mla) -> Result<()> {
        self.norm(norm);
        let Workspace { normed, out, cos, sin, attn: scratch, owners, .. } = &mut *self.ws;
        normed.requantize(attn.input_groups());
        let rope = &self.model.rope;
        attn.step(normed, index, (self.caches, owners), rope, (cos, sin), self.model.dtype, scratch, out)?;
        self.add();
        Ok(())
    }

    fn feed_forward(&mut self, _index: usize, norm: &RmsNorm, ffn: &Ffn) -> Result<()> {
        self.norm(norm);
        let dtype = self.model.dtype;
        let Workspace { normed, out, ffn: scratch, .. } = &mut *self.ws;
        match ffn {
            Ffn::Dense(mlp) => {
                normed.requantize(mlp.input_groups());
                let mlp_scratch = scratch.mlp();
                Mlp::run_token(1, |_| (mlp, &*normed), dtype, mlp_scratch);
                out.copy_from_slice(mlp_scratch.output(0));
            }
            Ffn::Moe(moe) => moe.step(normed, dtype, scratch, out),
        }
        self.add();
        Ok(())
    }
}

/// The most positions [`Model::mtp_step`] runs on the decode kernels; more go the prefill's way.
const MTP_STEP_ROWS: usize = 16;

/// Whether a decoder layer's weights all take the decode kernels.
fn layer_takes_step(l: &DecoderLayer) -> bool {
    let ffn = match &l.ffn {
        Ffn::Dense(mlp) => mlp.takes_token(),
        Ffn::Moe(moe) => moe.takes_step(),
    };
    l.attn.takes_step() && ffn && !l.input_layernorm.tracks() && !l.post_attention_layernorm.tracks()
}

impl Model {
    /// Whether [`Model::decode_step`] runs its own step on this model (else it falls back to
    /// [`Model::forward`]): every weight takes the decode kernels (no biases, no training
    /// variables) and the embedding is quantized or stored bf16 or f32.
    pub fn takes_step(&self) -> bool {
        self.embed_tokens.takes_rows()
            && self.lm_head.takes_token_rows()
            && !self.norm.tracks()
            && self.layers.iter().all(layer_takes_step)
    }

    /// Decodes `token` after what `cache` holds: appends its latents and returns its logits
    /// (f32, `vocab_size`), which live in `ws` until the next step: [`Model::decode`] of one
    /// sequence.
    pub fn decode_step<'w>(&self, token: u32, cache: &mut LatentCache, ws: &'w mut Workspace) -> Result<&'w [f32]> {
        self.decode(&[token], &mut [cache], ws)
    }

    /// One decode step of `B` sequences: `tokens[b]` after what `caches[b]` holds. Appends each
    /// token's latents to its cache and returns the logits, `(B, vocab_size)` f32, which live in
    /// `ws` until the next step. Each sequence's logits are those it gets decoded alone, and
    /// those of `forward_spans` over one-token spans on the absorbed path; computed without a
    /// tensor per op: once `ws` has seen a step of `B` tokens and the caches have room
    /// ([`LatentCache::reserve`]), the step allocates nothing (see the module's notes). Every
    /// weight is read once per step for all `B` tokens.
    pub fn decode<'w>(
        &self,
        tokens: &[u32],
        caches: &mut [&mut LatentCache],
        ws: &'w mut Workspace,
    ) -> Result<&'w [f32]> {
        if tokens.len() != caches.len() || tokens.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "a decode step takes one token per cache, got {} tokens for {} caches",
                tokens.len(),
                caches.len()
            )));
        }
        ws.runs.clear();
        ws.runs.resize(tokens.len(), 1);
        let runs = std::mem::take(&mut ws.runs);
        let out = self.decode_runs_with(tokens, &runs, caches, ws, None);
        ws.runs = runs;
        out?;
        Ok(ws.logits())
    }

    /// [`Model::decode`] with `runs[b]` tokens for `caches[b]` (at least one; `tokens` holds each
    /// sequence's in order, sequence after sequence): the verify step of speculative decoding,
    /// where a sequence brings its next token and the drafts after it. Returns every token's
    /// logits, `(tokens.len(), vocab_size)`. A sequence's tokens attend causally: each to the rows
    /// before it and its own, as a prefill of those tokens would; every weight is still read once
    /// for all the step's tokens. [`Workspace::hidden`] then holds every token's final hidden
    /// state (after the last norm), which multi-token prediction drafts from.
    pub fn decode_runs<'w>(
        &self,
        tokens: &[u32],
        runs: &[usize],
        caches: &mut [&mut LatentCache],
        ws: &'w mut Workspace,
    ) -> Result<&'w [f32]> {
        self.decode_runs_with(tokens, runs, caches, ws, None)?;
        Ok(ws.logits())
    }

    /// [`Model::decode_runs`] keeping the logits and final hidden states of the tokens that
    /// `keep` marks only (one flag per token, at least one set), in token order: a sequence
    /// whose rows are recomputed needs no logits but its last one's, and the output head is a
    /// large share of a token's work.
    pub fn decode_runs_keeping<'w>(
        &self,
        tokens: &[u32],
        runs: &[usize],
        caches: &mut [&mut LatentCache],
        ws: &'w mut Workspace,
        keep: &[bool],
    ) -> Result<&'w [f32]> {
        if keep.len() != tokens.len() || !keep.contains(&true) {
            return Err(Error::InvalidArgument(format!(
                "a decode step keeps the logits of at least one of its tokens, one flag each: {} flags for {} tokens",
                keep.len(),
                tokens.len()
            )));
        }
        self.decode_runs_with(tokens, runs, caches, ws, Some(keep))?;
        Ok(ws.logits())
    }

    /// Whether a decode step over caches of `kind` computes each row on the decode kernels,
    /// where a token's row has the same bits however the step's tokens are grouped (alone, beside
    /// other sequences, or in a run of its own sequence's tokens). Elsewhere a run is a prefill
    /// span, whose rows may differ from one-token steps' in the last bits.
    pub fn steps_on_kernels(&self, kind: CacheKind) -> bool {
        let dense_ok = matches!(
            kind,
            CacheKind::Int8
                | CacheKind::Dense(DType::BF16 | DType::F32)
                | CacheKind::Expanded(DType::BF16 | DType::F32)
        );
        self.steps && dense_ok
    }

    fn decode_runs_with(
        &self,
        tokens: &[u32],
        runs: &[usize],
        caches: &mut [&mut LatentCache],
        ws: &mut Workspace,
        keep: Option<&[bool]>,
    ) -> Result<()> {
        if runs.len() != caches.len() || runs.contains(&0) || runs.iter().sum::<usize>() != tokens.len() {
            return Err(Error::InvalidArgument(format!(
                "a decode step takes one or more tokens per cache: {} tokens in runs {runs:?} for {} caches",
                tokens.len(),
                caches.len()
            )));
        }
        let mut at = 0;
        for (&run, cache) in runs.iter().zip(caches.iter()) {
            self.check_tokens(&tokens[at..at + run], cache.len())?;
            at += run;
        }
        let kinds_ok = caches.iter().all(|c| c.kind() == caches[0].kind());
        if !kinds_ok || !self.steps_on_kernels(caches[0].kind()) {
            let mut spans: Vec<Span<'_>> = Vec::with_capacity(caches.len());
            let mut at = 0;
            for (&run, c) in runs.iter().zip(caches.iter_mut()) {
                spans.push(Span::new(&tokens[at..at + run], c));
                at += run;
            }
            let (logits, hidden) = self.forward_spans_hidden(&mut spans, AttentionPath::Absorbed, LogitRows::All)?;
            ws.fallback.clear();
            ws.fallback.extend(logits.flatten_all()?.to_vec1::<f32>()?);
            ws.fallback_hidden.clear();
            ws.fallback_hidden.extend(hidden.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            if let Some(keep) = keep {
                keep_rows(&mut ws.fallback, keep);
                keep_rows(&mut ws.fallback_hidden, keep);
            }
            ws.fell_back = true;
            return Ok(());
        }
        ws.fell_back = false;
        ws.owners.clear();
        for (b, &run) in runs.iter().enumerate() {
            ws.owners.extend(std::iter::repeat_n(b, run));
        }
        // The whole step as one task of the thread pool: its parallel loops then queue their
        // tasks on the pool's own deques, not on the shared queue that allocates as it goes.
        rayon::scope(|_| self.step(tokens, caches, ws, keep))
    }

    /// Multi-token prediction on a decode step's buffers: what [`Model::mtp_forward`] computes
    /// for module `k` over the `m` positions of `tokens` (appending the module's latent rows to
    /// `cache`'s layer `k`), but the logits of the last position only (`vocab_size`: the draft),
    /// and every position's output hidden state (`m × hidden`). Both live in `ws` until its next
    /// use; keep a workspace apart from the main model's, whose hidden states are the input.
    /// Allocates nothing once `ws` has seen as many positions and `cache` has room.
    pub fn mtp_step<'w>(
        &self,
        k: usize,
        hidden: &[f32],
        tokens: &[u32],
        cache: &mut LatentCache,
        ws: &'w mut Workspace,
    ) -> Result<(&'w [f32], &'w [f32])> {
        let (m, h) = (tokens.len(), self.config.hidden_size);
        let (module, start) = self.mtp_checked(k, hidden, tokens, cache)?;
        let dense_ok = matches!(cache.kind(), CacheKind::Int8 | CacheKind::Dense(DType::BF16 | DType::F32));
        let steps = self.steps
            && dense_ok
            && layer_takes_step(&module.block)
            && module.eh_proj.takes_token_rows()
            && ![&module.enorm, &module.hnorm, &module.head_norm].iter().any(|n| n.tracks());
        // Many positions at once (the module catching up over a prompt) are a prefill: the
        // tensor path's prefill attention runs them faster than the decode kernels.
        if !steps || tokens.len() > MTP_STEP_ROWS {
            let (module, y) = self.mtp_block(k, hidden, tokens, cache)?;
            let last = y.narrow(0, tokens.len() - 1, 1)?;
            let logits = self.lm_head.forward(&module.head_norm.forward(&last)?)?;
            ws.fallback.clear();
            ws.fallback.extend(logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            ws.fallback_hidden.clear();
            ws.fallback_hidden.extend(y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            ws.fell_back = true;
            return Ok((&ws.fallback, &ws.fallback_hidden));
        }
        let dtype = self.dtype;
        {
            let Workspace { x, normed, out, cos, sin, cos1, sin1, owners, logits, .. } = &mut *ws;
            // eh_proj([enorm(embedding) ‖ hnorm(hidden)]), row by row as the tensor path rounds.
            x.resize(m * h, 0.0);
            out.resize(m * h, 0.0);
            let cat = normed.x_mut();
            cat.resize(m * 2 * h, 0.0);
            for (i, &token) in tokens.iter().enumerate() {
                let e = &mut x[i * h..(i + 1) * h];
                self.embed_tokens
                    .row_into(token as usize, e)
                    .ok_or_else(|| Error::internal("the embedding is neither quantized nor bf16/f32"))?;
                round_to(dtype, e);
                let row = &mut cat[i * 2 * h..(i + 1) * 2 * h];
                module.enorm.forward_row(e, &mut row[..h], dtype);
                let prev = &mut out[i * h..(i + 1) * h];
                prev.copy_from_slice(&hidden[i * h..(i + 1) * h]);
                round_to(dtype, prev);
                module.hnorm.forward_row(prev, &mut row[h..], dtype);
            }
            normed.requantize([module.eh_proj.act_group()]);
            Linear::token_rows_into(1, |_| (&module.eh_proj, &*normed), logits);
            logits.round(dtype);
            x.copy_from_slice(logits.get(0));
            owners.clear();
            owners.resize(m, 0);
            cos.clear();
            sin.clear();
            for i in 0..m {
                self.rope.angles_at(start + i, cos1, sin1);
                cos.extend_from_slice(cos1);
                sin.extend_from_slice(sin1);
            }
        }
        let caches = &mut [cache];
        rayon::scope(|_| -> Result<()> {
            let mut pass = StepPass { ws: &mut *ws, caches, model: self };
            module.block.run(k, &mut pass)?;
            // The draft: the last position's logits through the module's own norm.
            let Workspace { x, normed, logits, .. } = &mut *pass.ws;
            let input = normed.x_mut();
            input.resize(h, 0.0);
            module.head_norm.forward_row(&x[(m - 1) * h..], input, dtype);
            normed.requantize([self.lm_head.act_group()]);
            Linear::token_rows_into(1, |_| (&self.lm_head, &*normed), logits);
            logits.round(dtype);
            Ok(())
        })?;
        ws.fell_back = false;
        Ok((ws.logits.get(0), &ws.x))
    }

    fn step(
        &self,
        tokens: &[u32],
        caches: &mut [&mut LatentCache],
        ws: &mut Workspace,
        keep: Option<&[bool]>,
    ) -> Result<()> {
        let (hidden, dtype, b) = (self.config.hidden_size, self.dtype, tokens.len());
        {
            let Workspace { x, out, cos, sin, cos1, sin1, owners, .. } = &mut *ws;
            x.resize(b * hidden, 0.0);
            out.resize(b * hidden, 0.0);
            cos.clear();
            sin.clear();
            for (i, (&token, x)) in tokens.iter().zip(x.chunks_exact_mut(hidden)).enumerate() {
                self.embed_tokens
                    .row_into(token as usize, x)
                    .ok_or_else(|| Error::internal("the embedding is neither quantized nor bf16/f32"))?;
                // The token's position: after its cache's rows and the sequence's tokens before it.
                let before = owners[..i].iter().rev().take_while(|&&o| o == owners[i]).count();
                self.rope.angles_at(caches[owners[i]].len() + before, cos1, sin1);
                cos.extend_from_slice(cos1);
                sin.extend_from_slice(sin1);
            }
            round_to(dtype, x);
        }
        let mut pass = StepPass { ws, caches, model: self };
        self.run_layers(&mut pass)?;
        pass.norm(&self.norm);
        let Workspace { normed, logits, .. } = ws;
        if let Some(keep) = keep {
            keep_rows(normed.x_mut(), keep);
        }
        normed.requantize([self.lm_head.act_group()]);
        Linear::token_rows_into(1, |_| (&self.lm_head, &*normed), logits);
        logits.round(dtype);
        Ok(())
    }
}

/// Keeps the rows of `rows` (`keep.len()` rows of equal length) that `keep` marks, in order.
fn keep_rows(rows: &mut Vec<f32>, keep: &[bool]) {
    let width = rows.len() / keep.len().max(1);
    let mut kept = 0;
    for (i, _) in keep.iter().enumerate().filter(|(_, &k)| k) {
        rows.copy_within(i * width..(i + 1) * width, kept * width);
        kept += 1;
    }
    rows.truncate(kept * width);
}
