//! Corpus -> token stream -> windows of `seq_len + 1` tokens (inputs and shifted targets),
//! shuffled per epoch by the seed. A sample is named by its global index, so the batch of any step
//! is known without replaying the ones before: resuming needs only the step number.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::tokenizer::{Message, Tokenizer};
use crate::train::params::SplitMix;

/// Tokenizes the text files in order, an end-of-sequence token after each one.
pub fn tokenize_files(files: &[PathBuf], tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let eos = tokenizer.eos_ids().first().copied();
    let mut tokens = Vec::new();
    for path in files {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()),
                ),
            )
        })?;
        tokens.extend(tokenizer.encode_chunks(&text)?);
        tokens.extend(eos);
    }
    Ok(tokens)
}

/// Training samples, each `seq_len + 1` tokens, with an optional mask over its `seq_len` targets.
#[derive(Debug, Clone)]
pub struct Samples {
    samples: Vec<(Vec<u32>, Option<Vec<bool>>)>,
}

impl Samples {
    /// A token stream cut into windows whose targets cover the stream once. With `bos`, every
    /// window starts with it (`[BOS] + seq_len` stream tokens), as prompts do at inference time;
    /// without, windows are `seq_len + 1` stream tokens overlapping by one.
    pub fn stream(tokens: &[u32], seq_len: usize, bos: Option<u32>) -> Samples {
        let samples = match bos {
            Some(bos) => tokens
                .chunks_exact(seq_len)
                .map(|w| (std::iter::once(bos).chain(w.iter().copied()).collect(), None))
                .collect(),
            None => (0..tokens.len().saturating_sub(1) / seq_len)
                .map(|i| (tokens[i * seq_len..i * seq_len + seq_len + 1].to_vec(), None))
                .collect(),
        };
        Samples { samples }
    }

    /// Padded examples with target masks (each `seq_len + 1` tokens, `seq_len` mask values).
    pub fn examples(examples: Vec<(Vec<u32>, Vec<bool>)>) -> Samples {
        Samples { samples: examples.into_iter().map(|(t, m)| (t, Some(m))).collect() }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Sample `i`: `seq_len + 1` tokens and which of the `seq_len` targets count (all when `None`).
    pub fn get(&self, i: usize) -> (&[u32], Option<&[bool]>) {
        let (t, m) = &self.samples[i];
        (t, m.as_deref())
    }

    /// Splits off the last `fraction` of the samples as validation data.
    pub fn split_tail(mut self, fraction: f64) -> (Samples, Samples) {
        let n_valid = ((self.len() as f64) * fraction).round() as usize;
        let valid = self.samples.split_off(self.len() - n_valid);
        (self, Samples { samples: valid })
    }
}

/// Which sample the `g`-th draw of training takes: epoch `g / n`, then a seeded permutation.
#[derive(Debug, Clone)]
pub struct Order {
    n: usize,
    seed: u64,
    epoch: Option<(usize, Vec<usize>)>,
}

impl Order {
    pub fn new(n: usize, seed: u64) -> Order {
        Order { n, seed, epoch: None }
    }

    /// The sample of global draw `g` (deterministic in `seed` and `g`).
    pub fn sample(&mut self, g: usize) -> usize {
        let (epoch, pos) = (g / self.n, g % self.n);
        if self.epoch.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut perm: Vec<usize> = (0..self.n).collect();
            let mut rng = SplitMix::new(self.seed ^ 0x5eed_0000 ^ (epoch as u64).wrapping_mul(0x9e37_79b9));
            for i in (1..perm.len()).rev() {
                perm.swap(i, rng.below(i + 1));
            }
            self.epoch = Some((epoch, perm));
        }
        self.epoch.as_ref().map(|(_, p)| p[pos]).unwrap_or(pos)
    }
}

/// Whether sample draw `g` belongs to the protected share of sequences (never dropped).
pub fn is_protected(seed: u64, g: usize, share: f64) -> bool {
    SplitMix::new(seed ^ 0x0070_0000_u64.wrapping_add(g as u64).wrapping_mul(0x2545_f491)).uniform() < share
}

/// One SFT conversation per line: `{"messages": [{"role": ..., "content": ...}, ...]}`, rendered
/// with the chat template; targets count only inside assistant replies. Examples are cut or padded
/// (with the end-of-sequence token, masked) to `seq_len + 1` tokens.
pub fn sft_examples(path: &Path, tokenizer: &Tokenizer, seq_len: usize) -> Result<Vec<(Vec<u32>, Vec<bool>)>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        messages: Vec<Message>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let pad = tokenizer.eos_ids().first().copied().unwrap_or(0);
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = |reason: String| {
            Error::io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, format!("line {}: {reason}", n + 1)))
        };
        let line: Line = serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
        if !line.messages.iter().any(|m| m.role == "assistant") {
            return Err(at("no assistant message: nothing to learn from".into()));
        }
        let (mut tokens, mut mask) = render_masked(tokenizer, &line.messages).map_err(|e| at(e.to_string()))?;
        tokens.truncate(seq_len + 1);
        mask.truncate(tokens.len());
        while tokens.len() < seq_len + 1 {
            tokens.push(pad);
            mask.push(false);
        }
        // mask[i] says whether token i is learned, i.e. whether target i - 1 counts.
        out.push((tokens, mask[1..].to_vec()));
    }
    if out.is_empty() {
        return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, "no conversations")));
    }
    Ok(out)
}

/// The conversation's tokens, and per token whether it belongs to an assistant reply. The reply of
/// message `i` is what the template adds between `messages[..i]` (with the generation prompt) and
/// `messages[..=i]`.
pub fn render_masked(tokenizer: &Tokenizer, messages: &[Message]) -> Result<(Vec<u32>, Vec<bool>)> {
    let full = tokenizer.apply_chat_template(messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = tokenizer.apply_chat_template(&messages[..i], true)?;
        let through = tokenizer.apply_chat_template(&messages[..=i], false)?;
        if !full.starts_with(&through) || !through.starts_with(&before) {
            return Err(Error::Template(format!(
                "message {i}: the template does not render conversations prefix by prefix, so the \
                 assistant's tokens cannot be located"
            )));
        }
        spans.push(before.len()..through.len());
    }
    let (tokens, offsets) = tokenizer.encode_with_offsets(&full)?;
    let mask = offsets
        .iter()
        .map(|&(start, end)| spans.iter().any(|s| start >= s.start && end <= s.end && end > start))
        .collect();
    Ok((tokens, mask))
}
