//! One request: prefill the prompt (expanded attention), then decode token by token (absorbed
//! attention over the latent cache), streaming text, until EOS, a stop string, `max_tokens` or a
//! full context.

use std::time::Instant;

use crate::cache::LatentCache;
use crate::error::{Error, Result};
use crate::model::{AttentionPath, LogitRows, Model, Workspace, DEFAULT_PREFILL_CHUNK};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{Message, TextStream, Tokenizer};

/// What to generate.
#[derive(Debug, Clone)]
pub struct Request {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before the first occurrence of any of these; they are not printed.
    pub stop: Vec<String>,
    /// Speculative decoding: tokens the model's multi-token-prediction module drafts per step
    /// (chained past one module), verified by the main model in one forward. 0, or a model
    /// without MTP modules: plain decoding. The output is the same either way (greedy: token for
    /// token; sampled: in distribution).
    pub draft_tokens: usize,
}

impl Request {
    /// `max_tokens` with `sampling`, no stop strings, no speculation.
    pub fn new(max_tokens: usize, sampling: SamplingParams) -> Request {
        Request { max_tokens, sampling, stop: Vec::new(), draft_tokens: 0 }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    MaxTokens,
    StopString(String),
    ContextFull,
}

/// What speculative decoding did in one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Speculation {
    /// Verify steps (one forward of the main model each).
    pub steps: usize,
    /// Tokens drafted, and of them those the main model accepted.
    pub drafted: usize,
    pub accepted: usize,
}

impl Speculation {
    /// Accepted drafts over drafted ones.
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }
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
    /// What speculative decoding did, where it ran.
    pub speculation: Option<Speculation>,
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
    on_text: impl FnMut(&str),
) -> Result<Generation> {
    generate_with_mtp(model, tokenizer, (cache, None), prompt, request, on_text)
}

/// [`generate`] with the cache of the model's multi-token-prediction modules
/// ([`Model::new_mtp_cache`]) kept by the caller, so that a conversation's next turn drafts
/// without recomputing the earlier ones: it holds rows for a prefix of the positions `cache`
/// holds. Without one, speculation makes its own and prefills every prompt token.
pub fn generate_with_mtp(
    model: &Model,
    tokenizer: &Tokenizer,
    (cache, mtp): (&mut LatentCache, Option<&mut LatentCache>),
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
    let speculate = if model.mtp_depth() > 0 { request.draft_tokens } else { 0 };
    let mut own_mtp;
    let mut mtp = match (speculate, mtp) {
        (0, _) => None,
        (_, Some(m)) => Some(m),
        (_, None) => {
            own_mtp = model.new_mtp_cache(cache.kind())?;
            Some(&mut own_mtp)
        }
    };
    let mut reused = cache.len().min(prompt.len() - 1);
    if let Some(m) = mtp.as_deref_mut() {
        // Drafting needs the main model's hidden state at every position without an MTP row.
        reused = reused.min(m.len());
        m.truncate(reused);
        m.reserve((prompt.len() + request.max_tokens + speculate).min(max))?;
    }
    cache.truncate(reused);
    // Room for the whole generation up front (and a verify step's drafts): growing mid-way copies
    // every cached row.
    cache.reserve((prompt.len() + request.max_tokens + speculate).min(max))?;

    let start = Instant::now();
    let hidden = model.config().hidden_size;
    // Positions whose MTP row is not written yet: their hidden states, and the tokens after all
    // but the last (the last one's is the token being decoded).
    let (mut pending_h, mut pending_tok) = (Vec::new(), Vec::new());
    let prefilled: Vec<f32> = if mtp.is_some() {
        let (logits, h) = model.prefill_hidden(&prompt[reused..], cache, DEFAULT_PREFILL_CHUNK)?;
        pending_h = h.flatten_all()?.to_vec1()?;
        pending_tok.extend_from_slice(&prompt[reused + 1..]);
        // The module's rows for the prompt's positions but the last (whose next token is not
        // drawn yet), as part of the prefill.
        if let (Some(mtp), false) = (mtp.as_deref_mut(), pending_tok.is_empty()) {
            let rows = pending_tok.len();
            model.mtp_prefill(0, &pending_h[..rows * hidden], &pending_tok, mtp)?;
            pending_h.drain(..rows * hidden);
            pending_tok.clear();
        }
        logits.flatten_all()?.to_vec1()?
    } else {
        let logits = model.forward(&prompt[reused..], cache, AttentionPath::Expanded, LogitRows::Last)?;
        logits.flatten_all()?.to_vec1()?
    };
    let prompt_secs = start.elapsed().as_secs_f64();
    // Decode steps over buffers kept from token to token.
    let mut ws = Workspace::default();
    // The MTP module's steps, apart: they read the main model's hidden states from `ws`.
    let (mut mtp_ws, mut last) = (Workspace::default(), Vec::with_capacity(hidden));

    let start = Instant::now();
    let mut out = Emitter {
        tokenizer,
        history: prompt.to_vec(),
        tokens: Vec::new(),
        stream: TextStream::new(),
        text: StopScan::new(&request.stop),
    };
    let mut stats = Speculation::default();
    let vocab = model.config().vocab_size;
    let (mut rows, mut drafts, mut run) = (Vec::new(), Vec::new(), Vec::new());
    let stop = 'gen: {
        if request.max_tokens == 0 {
            break 'gen StopReason::MaxTokens;
        }
        let mut next = sampler.sample(&prefilled, &out.history);
        loop {
            if let Some(stop) = out.emit(next, &mut on_text)? {
                break 'gen stop;
            }
            if out.tokens.len() >= request.max_tokens {
                break 'gen StopReason::MaxTokens;
            }
            if cache.len() + 1 > max {
                break 'gen StopReason::ContextFull;
            }
            let room = (request.max_tokens - out.tokens.len() - 1).min(max - cache.len() - 1);
            let k = speculate.min(room);
            let Some(mtp) = mtp.as_deref_mut().filter(|_| k > 0) else {
                let logits = model.decode_step(next, cache, &mut ws)?;
                next = sampler.sample(logits, &out.history);
                if mtp.is_some() {
                    pending_tok.push(out.history[out.history.len() - 1]);
                    pending_h.extend_from_slice(&ws.hidden()[..hidden]);
                }
                continue;
            };
            // Draft k tokens: the module's rows for the pending positions (the main model's hidden
            // states are known there), then chained on its own output.
            pending_tok.push(next);
            let (logits, h) = model.mtp_step(0, &pending_h, &pending_tok, mtp, &mut mtp_ws)?;
            let verified = mtp.layer_len(0);
            drafts.clear();
            drafts.push(crate::sampling::argmax(logits));
            last.clear();
            last.extend_from_slice(&h[h.len() - hidden..]);
            for _ in 1..k {
                let (logits, y) = model.mtp_step(0, &last, &drafts[drafts.len() - 1..], mtp, &mut mtp_ws)?;
                let d = crate::sampling::argmax(logits);
                last.clear();
                last.extend_from_slice(&y[y.len() - hidden..]);
                drafts.push(d);
            }
            mtp.truncate(verified);
            // Verify: `next` and the drafts in one forward of the main model.
            run.clear();
            run.push(next);
            run.extend_from_slice(&drafts);
            let n_before = cache.len();
            let logits = model.decode_runs(&run, &[run.len()], &mut [&mut *cache], &mut ws)?;
            rows.clear();
            rows.extend_from_slice(logits);
            stats.steps += 1;
            stats.drafted += k;
            let mut emitted = 0;
            let mut next_token = None;
            for (j, &d) in drafts.iter().enumerate() {
                let t = sampler.sample_given_draft(&rows[j * vocab..(j + 1) * vocab], &out.history, Some(d));
                if t != d {
                    next_token = Some(t);
                    break;
                }
                stats.accepted += 1;
                if let Some(stop) = out.emit(t, &mut on_text)? {
                    cache.truncate(n_before + 1 + emitted);
                    break 'gen stop;
                }
                emitted += 1;
                if out.tokens.len() >= request.max_tokens {
                    cache.truncate(n_before + 1 + emitted);
                    break 'gen StopReason::MaxTokens;
                }
            }
            // The rows of `next` and the accepted drafts stay; the rejected ones go.
            cache.truncate(n_before + 1 + emitted);
            next = match next_token {
                Some(t) => t,
                None => sampler.sample(&rows[k * vocab..(k + 1) * vocab], &out.history),
            };
            pending_h.clear();
            pending_h.extend_from_slice(&ws.hidden()[..(emitted + 1) * hidden]);
            pending_tok.clear();
            pending_tok.extend_from_slice(&drafts[..emitted]);
        }
    };
    let Emitter { tokens, mut stream, mut text, .. } = out;
    if !matches!(stop, StopReason::StopString(_)) {
        if let Some(rest) = stream.finish(tokenizer)? {
            text.push(&rest, &mut on_text);
        }
        text.flush(&mut on_text);
    }
    let decode_secs = start.elapsed().as_secs_f64();
    let speculation = mtp.is_some().then_some(stats);
    Ok(Generation {
        tokens,
        text: text.emitted,
        stop,
        n_prompt: prompt.len() - reused,
        prompt_secs,
        decode_secs,
        speculation,
    })
}

/// The generated tokens so far and their text.
struct Emitter<'t> {
    tokenizer: &'t Tokenizer,
    history: Vec<u32>,
    tokens: Vec<u32>,
    stream: TextStream,
    text: StopScan,
}

impl Emitter<'_> {
    /// Takes `token`: `Some` if generation ends with it (EOS, not kept; a stop string).
    fn emit(&mut self, token: u32, on_text: &mut impl FnMut(&str)) -> Result<Option<StopReason>> {
        if self.tokenizer.eos_ids().contains(&token) {
            return Ok(Some(StopReason::Eos));
        }
        self.tokens.push(token);
        self.history.push(token);
        if let Some(piece) = self.stream.step(self.tokenizer, token)? {
            if let Some(s) = self.text.push(&piece, on_text) {
                return Ok(Some(StopReason::StopString(s)));
            }
        }
        Ok(None)
    }
}

/// A multi-turn conversation rendered with the model's chat template. The latent cache is kept
/// between turns: each turn runs only the tokens after the longest prefix already cached.
pub struct ChatSession<'m> {
    model: &'m Model,
    tokenizer: &'m Tokenizer,
    messages: Vec<Message>,
    cache: LatentCache,
    /// The multi-token-prediction modules' cache, for models that have them.
    mtp: Option<LatentCache>,
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
        let mtp = (model.mtp_depth() > 0).then(|| model.new_mtp_cache(cache.kind())).transpose()?;
        Ok(ChatSession { model, tokenizer, messages, cache, mtp, cached: Vec::new() })
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
        let caches = (&mut self.cache, self.mtp.as_mut());
        let generation = generate_with_mtp(self.model, self.tokenizer, caches, &ids, request, on_text);
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
