//! Perplexity of a text: the sequence is BOS (when the tokenizer adds one) and the text's tokens,
//! cut into consecutive non-overlapping windows of at most `context` tokens; every token after
//! the first of a window is predicted from the tokens before it in that window.

use serde::Serialize;

use crate::cache::CacheKind;
use crate::error::{Error, Result};
use crate::model::{AttentionPath, LogitRows, Model, DEFAULT_PREFILL_CHUNK};

/// Mean negative log-likelihood (nats) over `tokens` predictions, and `exp(nll)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Perplexity {
    pub tokens: usize,
    pub nll: f64,
    pub ppl: f64,
}

/// Scores `tokens` window by window; `progress(tokens_done, total)` follows the work.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    context: usize,
    progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    perplexity_with(model, tokens, context, model.cache_kind(), DEFAULT_PREFILL_CHUNK, progress)
}

/// [`perplexity`] with the latent cache stored as `kind`, running at most `chunk` tokens per
/// forward pass.
pub fn perplexity_with(
    model: &Model,
    tokens: &[u32],
    context: usize,
    kind: CacheKind,
    chunk: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    let max = model.config().max_position_embeddings;
    if context < 2 || context > max {
        return Err(Error::InvalidArgument(format!(
            "--context must be between 2 and the model's max_position_embeddings ({max}), got {context}"
        )));
    }
    let windows: Vec<&[u32]> = tokens.chunks(context).filter(|w| w.len() >= 2).collect();
    if windows.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "the text has {} tokens; perplexity needs at least 2",
            tokens.len()
        )));
    }
    let total: usize = windows.iter().map(|w| w.len()).sum();
    let mut cache = model.new_cache_of(kind)?;
    let (mut nll, mut count, mut done) = (0f64, 0usize, 0usize);
    for window in windows {
        cache.clear();
        // Chunk by chunk, so that neither attention scores nor logits grow with the window.
        let per = chunk.max(1);
        for (c, part) in window.chunks(per).enumerate() {
            let start = c * per;
            let logits = model.forward_chunked(part, &mut cache, AttentionPath::Expanded, LogitRows::All, per)?;
            for (i, row) in logits.to_vec2::<f32>()?.iter().enumerate() {
                if let Some(&target) = window.get(start + i + 1) {
                    nll -= log_softmax_at(row, target as usize);
                    count += 1;
                }
            }
            done += part.len();
            progress(done, total);
        }
    }
    let nll = nll / count as f64;
    Ok(Perplexity { tokens: count, nll, ppl: nll.exp() })
}

/// `log softmax(row)[target]` in f64.
fn log_softmax_at(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row[target] as f64 - max - sum.ln()
}
