//! One request: prefill the prompt (expanded attention), then decode token by token (absorbed
//! attention over the latent cache), streaming text, until EOS, a stop string, `max_tokens` or a
//! full context.

use std::time::Instant;

use crate::cache::LatentCache;
use crate::error::{Error, Result};
use crate::model::{AttentionPath, LogitRows, Model, Workspace};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{Message, TextStream, Tokenizer};

/// What to generate.
#[derive(Debug, Clone)]
pub struct Request {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before the first occurrence of any of these; they are not printed.
    pub stop: Vec<String>,
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    MaxTokens,
    StopString(String),
    ContextFull,
}

/// The result of one request.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    pub n_prompt: usize,
    pub prompt_secs: f64,
    pub decode_secs: f64,
}

impl Generation {
    /// Prompt tokens per second of prefill.
    pub fn prompt_tok_s(&self) -> f64 {
        self.n_prompt as f64 / self.prompt_secs.max(1e-9)
    }

    /// Generated tokens per second after the first (the first comes from the prefill).
    pub fn decode_tok_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Generates after `prompt`. `cache` is empty or holds a prefix of `prompt` (those tokens are
/// not run again). Text goes to `on_text` as soon as it is final.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    cache: &mut LatentCache,
    prompt: &[u32],
    request: &Request,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let max = model.config().max_position_embeddings;
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("the prompt is empty: give at least one token".into()));
    }
    if prompt.len() >= max {
        return Err(Error::PromptTooLong { n_tokens: prompt.len(), max });
    }
    let mut sampler = Sampler::new(request.sampling).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let reused = cache.len().min(prompt.len() - 1);
    cache.truncate(reused);
    // Room for the whole generation up front: growing mid-way copies every cached row.
    cache.reserve((prompt.len() + request.max_tokens).min(max))?;

    let start = Instant::now();
    let prefilled = model.forward(&prompt[reused..], cache, AttentionPath::Expanded, LogitRows::Last)?;
    let prefilled: Vec<f32> = prefilled.flatten_all()?.to_vec1()?;
    let prompt_secs = start.elapsed().as_secs_f64();
    // Decode steps over buffers kept from token to token.
    let mut ws = Workspace::default();
    let mut stepped = false;

    let start = Instant::now();
    let mut history = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut stream = TextStream::new();
    let mut text = StopScan::new(&request.stop);
    let stop = loop {
        if tokens.len() >= request.max_tokens {
            break StopReason::MaxTokens;
        }
        let logits = if stepped { ws.logits() } else { &prefilled };
        let next = sampler.sample(logits, &history);
        if tokenizer.eos_ids().contains(&next) {
            break StopReason::Eos;
        }
        tokens.push(next);
        history.push(next);
        if let Some(piece) = stream.step(tokenizer, next)? {
            if let Some(s) = text.push(&piece, &mut on_text) {
                break StopReason::StopString(s);
            }
        }
        if cache.len() + 1 > max {
            break StopReason::ContextFull;
        }
        if tokens.len() < request.max_tokens {
            model.decode_step(next, cache, &mut ws)?;
            stepped = true;
        }
    };
    if !matches!(stop, StopReason::StopString(_)) {
        if let Some(rest) = stream.finish(tokenizer)? {
            text.push(&rest, &mut on_text);
        }
        text.flush(&mut on_text);
    }
    let decode_secs = start.elapsed().as_secs_f64();
    Ok(Generation { tokens, text: text.emitted, stop, n_prompt: prompt.len() - reused, prompt_secs, decode_secs })
}

/// A multi-turn conversation rendered with the model's chat template. The latent cache is kept
/// between turns: each turn runs only the tokens after the longest prefix already cached.
pub struct ChatSession<'m> {
    model: &'m Model,
    tokenizer: &'m Tokenizer,
    messages: Vec<Message>,
    cache: LatentCache,
    cached: Vec<u32>,
}

impl<'m> ChatSession<'m> {
    /// A conversation, opened by `system` if given.
    pub fn new(model: &'m Model, tokenizer: &'m Tokenizer, system: Option<&str>) -> Result<ChatSession<'m>> {
        ChatSession::with_cache(model, tokenizer, system, model.new_cache()?)
    }

    /// [`ChatSession::new`] keeping the conversation in `cache` (empty; of the kind the caller
    /// chose, e.g. [`crate::cache::CacheKind::Int8`]).
    pub fn with_cache(
        model: &'m Model,
        tokenizer: &'m Tokenizer,
        system: Option<&str>,
        mut cache: LatentCache,
    ) -> Result<ChatSession<'m>> {
        cache.clear();
        if !tokenizer.has_chat_template() {
            return Err(Error::Template("tokenizer_config.json has no `chat_template`; use `generate` instead".into()));
        }
        let messages = system.map(|s| vec![Message::new("system", s)]).unwrap_or_default();
        Ok(ChatSession { model, tokenizer, messages, cache, cached: Vec::new() })
    }

    /// The messages so far.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Tokens of the conversation the cache holds.
    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }

    /// Answers `user`, streaming the reply to `on_text`; the reply joins the conversation.
    pub fn reply(&mut self, user: &str, request: &Request, on_text: impl FnMut(&str)) -> Result<Generation> {
        self.messages.push(Message::new("user", user));
        // The user's words are text: control tokens come only from the template.
        let ids = self.tokenizer.encode_chat(&self.messages, true)?;
        let common = self.cached.iter().zip(&ids).take(self.cache.len()).take_while(|(a, b)| a == b).count();
        self.cache.truncate(common);
        let generation = generate(self.model, self.tokenizer, &mut self.cache, &ids, request, on_text);
        let generation = match generation {
            Ok(g) => g,
            Err(e) => {
                self.messages.pop();
                return Err(e);
            }
        };
        self.cached = ids;
        self.cached.extend(&generation.tokens);
        self.messages.push(Message::new("assistant", &generation.text));
        Ok(generation)
    }
}

/// Streams text while holding back any tail that could still become a stop string.
pub(crate) struct StopScan {
    stops: Vec<String>,
    all: String,
    emitted: String,
}

impl StopScan {
    pub(crate) fn new(stops: &[String]) -> StopScan {
        StopScan { stops: stops.to_vec(), all: String::new(), emitted: String::new() }
    }

    /// Adds `piece`; emits what is final; returns the stop string if one now appears.
    pub(crate) fn push(&mut self, piece: &str, on_text: &mut impl FnMut(&str)) -> Option<String> {
        self.all.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.all.find(s.as_str()).map(|at| (at, s.clone())))
            .min_by_key(|(at, _)| *at);
        if let Some((at, s)) = found {
            self.emit_until(at, on_text);
            return Some(s);
        }
        let held = self.longest_stop_prefix_suffix();
        self.emit_until(self.all.len() - held, on_text);
        None
    }

    pub(crate) fn flush(&mut self, on_text: &mut impl FnMut(&str)) {
        self.emit_until(self.all.len(), on_text);
    }

    fn emit_until(&mut self, end: usize, on_text: &mut impl FnMut(&str)) {
        let start = self.emitted.len();
        if end > start {
            let piece = &self.all[start..end];
            on_text(piece);
            self.emitted.push_str(piece);
        }
    }

    /// Bytes at the end of the text that begin some stop string.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let tail_start = self.emitted.len();
        (tail_start..self.all.len())
            .filter(|&i| self.all.is_char_boundary(i))
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.all[i..])))
            .map_or(0, |i| self.all.len() - i)
    }
}

#[cfg(test)]
mod tests {
    use super::StopScan;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut scan = StopScan::new(&stops);
        let mut out = String::new();
        for p in pieces {
            if let Some(s) = scan.push(p, &mut |t| out.push_str(t)) {
                return (out, Some(s));
            }
        }
        scan.flush(&mut |t| out.push_str(t));
        (out, None)
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_never_printed() {
        assert_eq!(
            run(&["\nUser:"], &["Hello", " there\nUs", "er: more"]),
            ("Hello there".into(), Some("\nUser:".into()))
        );
    }

    #[test]
    fn held_back_text_is_released_when_it_turns_out_not_to_stop() {
        assert_eq!(run(&["END"], &["the EN", "D? no, the ENigma"]), ("the ".into(), Some("END".into())));
        assert_eq!(run(&["END"], &["the EN", "igma"]), ("the ENigma".into(), None));
    }

    #[test]
    fn multibyte_text_is_held_on_character_boundaries() {
        assert_eq!(run(&["停止"], &["你好停", "下"]), ("你好停下".into(), None));
    }
}
