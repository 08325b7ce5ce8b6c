//! Many requests on one model: continuous batching.
//!
//! One engine thread owns the model, every sequence's latent cache and the [`Scheduler`].
//! Requests reach it over a channel ([`Engine::submit`]); each gets its own channel of
//! [`Event`]s back. Every step the thread takes in new requests, drops the sequences whose
//! receiver is gone (a client that disconnected: its cache is freed within one step), asks
//! the scheduler for the step's work, and runs it:
//!
//! - the prefill chunks, each span over its own cache ([`Model::forward_chunked`], expanded
//!   attention), from the rows a prefix found in the prefix cache on ([`prefix`]);
//! - every running decode in one [`Model::decode`]: one token per sequence, each weight read
//!   once for all of them, each sequence attending to its own rows only;
//!
//! then samples each sequence's next token with its own seeded sampler and sends the text
//! that is final (never part of a UTF-8 character, never part of a possible stop string).
//!
//! Every cache takes its pages from one [`PagePool`] sized by `kv_memory`. A sequence grows a
//! page at a time; when the pool runs out, the sequence admitted last is preempted (its full
//! pages go to the prefix cache, the rest back to the pool) and its rows are computed again
//! when it resumes: its prompt's by prefill chunks, its generated tokens' as one run in the
//! decode step beside the running sequences (each weight still read once per step), which gives
//! every row the bits it first had. The `n` completions of one prompt share the prompt's pages: one prefill,
//! then each continues on its own (the last, partial page copied for each).
//!
//! A sequence's logits do not depend on what else runs: decode rows are computed one by one
//! over the same weights, and prompts are cut at fixed offsets whatever the load (see
//! [`scheduler`]), so a seed gives the same tokens alone or batched.

pub mod metrics;
pub mod prefix;
pub mod scheduler;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::cache::{CacheKind, LatentCache, PageLayout, PagePool};
use crate::error::{Error, ErrorKind, Result};
use crate::generate::StopScan;
use crate::model::{AttentionPath, LogitRows, Model, Span, Workspace};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{TextStream, Tokenizer};
pub use metrics::Metrics;
use prefix::PrefixStore;
use scheduler::{pages_for, Limits, Pages, Scheduler, SeqCounts, SeqId};

/// How the engine runs.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Most sequences running at once.
    pub max_seqs: usize,
    /// Most tokens one step computes (decodes plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Prompt tokens per prefill chunk (at most `max_batch_tokens`).
    pub prefill_chunk: usize,
    /// Bytes the latent cache's pages take, all sequences and the prefix cache together.
    pub kv_memory: usize,
    /// How caches store rows (`None`: the model's default).
    pub cache_kind: Option<CacheKind>,
    /// Most requests waiting; past it [`Engine::submit`] refuses at once.
    pub max_waiting: usize,
    /// Tokens each sequence drafts per step with the model's multi-token-prediction module
    /// (speculative decoding; 0 or a model without MTP: none). Sequences that draft and sequences
    /// that do not run in the same decode steps.
    pub draft_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_seqs: 16,
            max_batch_tokens: 512,
            prefill_chunk: crate::model::DEFAULT_PREFILL_CHUNK,
            kv_memory: 2 << 30,
            cache_kind: None,
            max_waiting: 256,
            draft_tokens: 0,
        }
    }
}

/// One generation's settings, validated by the caller (the server checks each value).
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Temperature, top-k, top-p, repetition penalty, seed.
    pub sampling: SamplingParams,
    /// Subtracted from the logit of every token generated so far.
    pub presence_penalty: f32,
    /// Subtracted once per occurrence so far.
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens.
    pub logit_bias: Vec<(u32, f32)>,
    /// Generation stops before the first of these; they are not sent.
    pub stop: Vec<String>,
    /// Log-probabilities of each generated token and of this many alternatives.
    pub logprobs: Option<usize>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            max_tokens: 16,
            sampling: SamplingParams::default(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            stop: Vec::new(),
            logprobs: None,
        }
    }
}

/// A generated token's log-probability (from the model's distribution, before penalties and
/// temperature), with the best alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End of sequence or a stop string.
    Stop,
    /// `max_tokens`, or the context is full.
    Length,
}

/// Token counts of one sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose cache rows were reused rather than computed.
    pub cached_tokens: usize,
    /// Speculative decoding: drafted tokens the model accepted, and those it did not.
    pub accepted_drafts: usize,
    pub rejected_drafts: usize,
}

/// What a request's channel carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Text that is final, and the log-probabilities of the tokens generated since the last event.
    Text { text: String, logprobs: Vec<TokenLogprob> },
    /// The end: no more events follow.
    Done { finish: Finish, usage: Usage },
    /// A failure after the request was accepted; no more events follow.
    Error { message: String, kind: ErrorKind },
}

/// A request for one sequence.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: Params,
}

/// Why [`Engine::submit`] refused a request.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The waiting queue is full: try again later.
    #[error("the server is busy: {0} requests are waiting")]
    QueueFull(usize),
    /// The request cannot run (too long for the context or the cache memory, bad values);
    /// `param` names the request field at fault.
    #[error("{error}")]
    Invalid { error: Error, param: &'static str },
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

enum Command {
    /// `n` sequences of one request: ids `id..id + n`, one channel each, each seed the request's
    /// plus its index.
    Submit { id: SeqId, request: Request, events: Vec<UnboundedSender<Event>>, at: Instant },
}

/// A running engine: its thread and the way in.
pub struct Engine {
    tx: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    metrics: Arc<Metrics>,
    tokenizer: Arc<Tokenizer>,
    max_positions: usize,
    /// The model's vocabulary (a prompt's ids must be below it).
    vocab: usize,
    limits: Limits,
    page_bytes: usize,
    max_waiting: usize,
    next_id: std::sync::atomic::AtomicU64,
}

impl Engine {
    /// Starts the engine thread over `model`.
    pub fn start(model: Model, tokenizer: Arc<Tokenizer>, config: EngineConfig) -> Result<Engine> {
        let kind = config.cache_kind.unwrap_or(model.cache_kind());
        let layout = PageLayout::new(model.config(), kind)?;
        let pool = PagePool::new(layout, Some(config.kv_memory));
        let pages = pool.total_pages().unwrap_or(0);
        if pages == 0 {
            return Err(Error::InvalidArgument(format!(
                "--kv-memory {} bytes holds no page of the latent cache: a page ({} tokens) takes {} bytes",
                config.kv_memory,
                crate::cache::PAGE_ROWS,
                layout.page_bytes()
            )));
        }
        // Pages are taken as sequences grow, so a budget beyond the machine would end in the
        // out-of-memory killer under load, not here.
        crate::resources::check_fits(
            &format!("--kv-memory {}", crate::inspect::bytes(config.kv_memory)),
            config.kv_memory as f64,
            "the latent cache budget",
            "give a smaller --kv-memory",
        )?;
        let limits = Limits {
            max_seqs: config.max_seqs.max(1),
            max_batch_tokens: config.max_batch_tokens.max(1),
            chunk: config.prefill_chunk.max(1),
            pages,
        };
        let scheduler = Scheduler::new(limits);
        let limits = scheduler.limits();
        let metrics = Arc::new(Metrics::new(pages, layout.page_bytes()));
        let (tx, rx) = mpsc::channel();
        let max_positions = model.config().max_position_embeddings;
        let vocab = model.config().vocab_size;
        let worker = Worker {
            model,
            tokenizer: tokenizer.clone(),
            pool,
            scheduler,
            seqs: HashMap::new(),
            ws: Workspace::default(),
            mtp_ws: Workspace::default(),
            metrics: metrics.clone(),
            prefix: PrefixStore::default(),
            step_logits: Vec::new(),
            adjusted: Vec::new(),
            step_hidden: Vec::new(),
            draft_tokens: config.draft_tokens,
        };
        // The loop runs on a worker of a pool of its own, as the command line's commands do: a
        // parallel product started there shares its work with the other workers directly.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("latent-engine-{i}"))
            .build()
            .map_err(|e| Error::internal(format!("cannot start the engine's threads: {e}")))?;
        let thread = std::thread::Builder::new()
            .name("latent-engine".into())
            .spawn(move || pool.install(move || worker.run(rx)))
            .map_err(|e| Error::internal(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            tx: Some(tx),
            thread: Some(thread),
            metrics,
            tokenizer,
            max_positions,
            vocab,
            limits,
            page_bytes: layout.page_bytes(),
            max_waiting: config.max_waiting.max(1),
            next_id: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// The tokenizer requests are encoded with.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The counters `/metrics` shows.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The model's context (`max_position_embeddings`).
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Queues `request`; its events come on the returned channel. Refused at once, without
    /// work, when the waiting queue is full or the request cannot fit. Dropping the receiver
    /// cancels the sequence within one step and frees its cache.
    pub fn submit(&self, request: Request) -> std::result::Result<UnboundedReceiver<Event>, SubmitError> {
        let mut receivers = self.submit_n(request, 1)?;
        receivers.pop().ok_or(SubmitError::Stopped)
    }

    /// Queues `n` completions of `request` (at least one), completion `i` sampled with the
    /// request's seed plus `i`; they share the prompt's prefill and its pages. One channel each.
    pub fn submit_n(
        &self,
        request: Request,
        n: usize,
    ) -> std::result::Result<Vec<UnboundedReceiver<Event>>, SubmitError> {
        let (len, max_tokens) = (request.prompt.len(), request.params.max_tokens);
        let n = n.max(1);
        let invalid =
            |param: &'static str, reason: String| SubmitError::Invalid { error: Error::InvalidArgument(reason), param };
        if len == 0 {
            return Err(invalid("prompt", "the prompt is empty: give at least one token".into()));
        }
        if max_tokens == 0 {
            return Err(invalid("max_tokens", "max_tokens must be at least 1".into()));
        }
        // Checked here, so that no request can fail the step it would share with others.
        let vocab = self.vocab;
        if let Some(bad) = request.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(invalid("prompt", format!("token id {bad} is outside the model's vocabulary ({vocab})")));
        }
        if let Some(&(bad, _)) = request.params.logit_bias.iter().find(|&&(t, _)| t as usize >= vocab) {
            return Err(invalid(
                "logit_bias",
                format!("logit_bias names token {bad}, outside the vocabulary ({vocab})"),
            ));
        }
        if len + max_tokens > self.max_positions {
            let error = Error::PromptTooLong { n_tokens: len + max_tokens, max: self.max_positions };
            return Err(SubmitError::Invalid { error, param: "max_tokens" });
        }
        let rows = len + max_tokens;
        if pages_for(rows) > self.limits.pages {
            return Err(invalid(
                "max_tokens",
                format!(
                    "the prompt and max_tokens ({rows} tokens, {} bytes of cache) do not fit the cache memory ({} \
                     pages of {} tokens; --kv-memory)",
                    pages_for(rows) * self.page_bytes,
                    self.limits.pages,
                    crate::cache::PAGE_ROWS
                ),
            ));
        }
        let waiting = self.metrics.waiting_total();
        if waiting >= self.max_waiting {
            return Err(SubmitError::QueueFull(waiting));
        }
        let tx = self.tx.as_ref().ok_or(SubmitError::Stopped)?;
        let (events, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| unbounded_channel()).unzip();
        let id = self.next_id.fetch_add(n as u64, Ordering::Relaxed);
        self.metrics.waiting.fetch_add(n, Ordering::Relaxed);
        tx.send(Command::Submit { id, request, events, at: Instant::now() }).map_err(|_| {
            self.metrics.waiting.fetch_sub(n, Ordering::Relaxed);
            SubmitError::Stopped
        })?;
        Ok(receivers)
    }

    /// Stops taking requests, lets the running and waiting ones finish, and joins the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One sequence on the engine thread.
struct Seq {
    events: UnboundedSender<Event>,
    prompt: Vec<u32>,
    params: Params,
    cache: Option<LatentCache>,
    /// Prompt tokens whose rows came from the prefix cache (or the request's first sequence).
    cached: usize,
    /// Tokens of `history` whose rows the prefill computes: the prompt, or after a preemption
    /// every token the sequence had cached.
    target: usize,
    /// Whether the sequence has been admitted (a prefix hit counts in its usage only then).
    admitted: bool,
    /// The other completions of its request, waiting for this one's prefill to share it.
    followers: Vec<SeqId>,
    sampler: Sampler,
    /// Prompt and generated tokens.
    history: Vec<u32>,
    /// Occurrences of each generated token (presence and frequency penalties).
    counts: HashMap<u32, u32>,
    stream: TextStream,
    stop: StopScan,
    generated: usize,
    /// The sampled token the next decode runs.
    next: Option<u32>,
    submitted: Instant,
    last_token: Option<Instant>,
    /// Speculative decoding's state, for a model with an MTP module and drafts asked for.
    spec: Option<Spec>,
}

/// One sequence's drafting state: the MTP module's cache (its own, outside the page pool: one
/// layer's rows, a small share of the main cache's), which holds rows for positions
/// `from - mtp.len()..from`, and the main model's final hidden states at `from..`, which its
/// rows there still need. After a preemption or a prefix hit the module starts again from where
/// hidden states are known: RoPE is relative, so its attention over the later rows is what it
/// would be over a sequence starting there. Drafts only propose: what the module attends to
/// changes how many are accepted, never the output.
struct Spec {
    mtp: LatentCache,
    from: usize,
    pending: Vec<f32>,
    accepted: usize,
    rejected: usize,
}

impl Spec {
    /// Forgets everything: the module starts again at position `at`.
    fn restart(&mut self, at: usize) {
        self.mtp.clear();
        self.from = at;
        self.pending.clear();
    }
}

struct Worker {
    model: Model,
    tokenizer: Arc<Tokenizer>,
    pool: PagePool,
    scheduler: Scheduler,
    seqs: HashMap<SeqId, Seq>,
    ws: Workspace,
    /// The MTP modules' draft steps (every speculating sequence's in turn).
    mtp_ws: Workspace,
    metrics: Arc<Metrics>,
    prefix: PrefixStore,
    /// The last decode step's logits, `(B, V)`.
    step_logits: Vec<f32>,
    /// One sequence's logits with its penalties and biases.
    adjusted: Vec<f32>,
    /// The last decode step's final hidden states, `(tokens, hidden)`.
    step_hidden: Vec<f32>,
    draft_tokens: usize,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut open = true;
        loop {
            if self.seqs.is_empty() {
                if !open {
                    break;
                }
                match rx.recv() {
                    Ok(cmd) => self.take(cmd),
                    Err(_) => break,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.take(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.cancel_dropped();
            if let Err(e) = self.step() {
                // A failure of the step itself: every sequence in it is told and dropped, and the
                // engine goes on with new requests.
                let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
                for id in ids {
                    self.finish_with(id, Event::Error { message: e.to_string(), kind: e.kind() });
                }
            }
            self.metrics.beat();
            self.publish();
        }
    }

    fn take(&mut self, cmd: Command) {
        let Command::Submit { id, request, events, at } = cmd;
        self.metrics.waiting.fetch_sub(events.len(), Ordering::Relaxed);
        let Request { prompt, params } = request;
        let mut ids = Vec::with_capacity(events.len());
        for (i, events) in events.into_iter().enumerate() {
            let mut params = params.clone();
            params.sampling.seed = params.sampling.seed.wrapping_add(i as u64);
            let sampler = match Sampler::new(params.sampling) {
                Ok(s) => s,
                Err(e) => {
                    let _ = events.send(Event::Error { message: e.to_string(), kind: ErrorKind::Request });
                    continue;
                }
            };
            let stop = StopScan::new(&params.stop);
            let spec = match (self.draft_tokens, self.model.new_mtp_cache(self.pool.layout().kind)) {
                (1.., Ok(mtp)) if self.model.mtp_depth() > 0 => {
                    Some(Spec { mtp, from: 0, pending: Vec::new(), accepted: 0, rejected: 0 })
                }
                _ => None,
            };
            let seq = Seq {
                events,
                history: prompt.clone(),
                target: prompt.len(),
                prompt: prompt.clone(),
                params,
                cache: None,
                cached: 0,
                admitted: false,
                followers: Vec::new(),
                sampler,
                counts: HashMap::new(),
                stream: TextStream::new(),
                stop,
                generated: 0,
                next: None,
                submitted: at,
                last_token: None,
                spec,
            };
            self.seqs.insert(id + i as u64, seq);
            ids.push(id + i as u64);
        }
        // The first sequence prefills; the others wait for its prompt's rows.
        if let Some((&first, rest)) = ids.split_first() {
            self.scheduler.push(first, SeqCounts::new(prompt.len()));
            if let Some(seq) = self.seqs.get_mut(&first) {
                seq.followers = rest.to_vec();
            }
        }
    }

    /// Drops every sequence whose receiver is gone.
    fn cancel_dropped(&mut self) {
        let gone: Vec<SeqId> = self.seqs.iter().filter(|(_, s)| s.events.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            self.scheduler.remove(id);
            if let Some(seq) = self.seqs.remove(&id) {
                self.release_followers(seq.followers);
            }
            self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            self.publish();
        }
    }

    /// Queues on their own the followers of a sequence that ends before its prompt's rows
    /// are there to share.
    fn release_followers(&mut self, followers: Vec<SeqId>) {
        for f in followers {
            if let Some(seq) = self.seqs.get(&f) {
                self.scheduler.push(f, SeqCounts::new(seq.target));
            }
        }
    }

    fn publish(&self) {
        let m = &self.metrics;
        m.running.store(self.scheduler.running(), Ordering::Relaxed);
        m.queued.store(self.scheduler.waiting(), Ordering::Relaxed);
        m.pages_used.store(self.pool.used_pages(), Ordering::Relaxed);
        m.pages_cached.store(self.prefix.pages(), Ordering::Relaxed);
        let held: usize = self.seqs.values().filter_map(|s| s.cache.as_ref()).map(LatentCache::len).sum();
        m.cache_rows_held.store(held, Ordering::Relaxed);
        m.preemptions.store(self.scheduler.preemptions(), Ordering::Relaxed);
    }

    /// Lets a preempted sequence's cache go: its full pages to the prefix cache (where it will
    /// likely find them again), the rest to the pool. It computes every row it held again: its
    /// prompt's by prefill chunks, its generated tokens' on the decode kernels, as they first were.
    fn let_go(&mut self, id: SeqId) {
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        if let Some(cache) = seq.cache.take() {
            seq.target = seq.target.max(cache.len());
            self.prefix.insert(&seq.history, &cache);
        }
        if let Some(spec) = &mut seq.spec {
            spec.restart(0);
        }
    }

    /// Makes room in `id`'s cache for `tokens` rows; a sequence that cannot have it is
    /// preempted (whether it has it).
    fn grow(&mut self, id: SeqId, tokens: usize) -> bool {
        let Some(seq) = self.seqs.get_mut(&id) else { return false };
        let cache = seq.cache.get_or_insert_with(|| LatentCache::in_pool(&self.pool, self.model.device()));
        let mut fits = cache.reserve(tokens).is_ok();
        while !fits && self.prefix.evict() {
            fits = cache.reserve(tokens).is_ok();
        }
        if !fits {
            self.scheduler.preempt(id);
            self.let_go(id);
        }
        fits
    }

    fn step(&mut self) -> Result<()> {
        let plan = {
            let device = self.model.device();
            let mut pages = WorkerPages { pool: &self.pool, prefix: &mut self.prefix, seqs: &mut self.seqs, device };
            self.scheduler.plan(&mut pages)
        };
        for &id in &plan.preempted {
            self.let_go(id);
        }
        if plan.is_empty() {
            return Ok(());
        }
        // Sequences that run for the first time: their prefix hits count now.
        for id in plan.decode.iter().chain(plan.prefill.iter().map(|p| &p.0)) {
            if let Some(seq) = self.seqs.get_mut(id).filter(|s| !s.admitted) {
                seq.admitted = true;
                self.metrics.prefix_cache_hit_tokens.fetch_add(seq.cached as u64, Ordering::Relaxed);
            }
        }
        // The step's pages: kept prefixes give way, least recently used first.
        while self.pool.free_pages() < plan.pages && self.prefix.evict() {}
        // Prefill chunks, each over its own cache; the generated tokens a resumed sequence
        // recomputes go into the decode step below.
        let mut replays: Vec<(SeqId, usize, usize)> = Vec::new();
        for &(id, start, n) in &plan.prefill {
            if !self.grow(id, start + n) {
                continue;
            }
            let Some(seq) = self.seqs.get_mut(&id) else { continue };
            let cache = seq.cache.as_mut().ok_or_else(|| Error::internal("a prefilled sequence has no cache"))?;
            // A resumed sequence computes its generated tokens' rows as it first did, on the
            // decode kernels, where a row has the same bits whether its token ran alone, beside
            // other sequences or in a run of its own: one run in this step's decode, beside the
            // running sequences (or, where the model's steps do not run on the kernels, one
            // token at a time here). Its continuation then does not depend on having been
            // preempted. Its prompt's rows come from prefill chunks at the same offsets as before.
            let prompt_end = (start + n).min(seq.prompt.len().max(start));
            let chunk = &seq.history[start..prompt_end];
            let logits = if chunk.is_empty() {
                None
            } else if let Some(spec) = seq.spec.as_mut() {
                // The module drafts from the main model's hidden states: keep the chunk's.
                let spans = &mut [Span::new(chunk, cache)];
                let (logits, hidden) =
                    self.model.forward_spans_hidden(spans, AttentionPath::Expanded, LogitRows::Last)?;
                let rows = spec.pending.len() / self.model.config().hidden_size;
                if spec.from + rows != start {
                    spec.restart(start);
                }
                spec.pending.extend(hidden.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
                Some(logits)
            } else {
                let rows = chunk.len();
                Some(self.model.forward_chunked(chunk, cache, AttentionPath::Expanded, LogitRows::Last, rows)?)
            };
            self.scheduler.prefilled(id, n);
            self.metrics.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
            if prompt_end < start + n && self.model.steps_on_kernels(cache.kind()) {
                replays.push((id, prompt_end, start + n));
                self.metrics.recomputed_tokens.fetch_add((start + n - prompt_end) as u64, Ordering::Relaxed);
                continue;
            }
            for &token in &seq.history[prompt_end..start + n] {
                self.model.decode(&[token], &mut [&mut *cache], &mut self.ws)?;
            }
            if let Some(spec) = seq.spec.as_mut().filter(|_| prompt_end < start + n) {
                // Rows recomputed by decode steps: the module starts again after them.
                spec.restart(cache.len());
                spec.pending.extend_from_slice(&self.ws.hidden()[..self.model.config().hidden_size]);
                spec.from = cache.len() - 1;
            }
            // A resumed sequence has its next token already.
            if let (true, None, Some(logits)) = (start + n == seq.target, seq.next, logits) {
                let row: Vec<f32> = logits.flatten_all()?.to_vec1()?;
                let followers = std::mem::take(&mut seq.followers);
                self.emit(id, &row)?;
                self.share_prompt(id, followers, &row)?;
            }
        }
        let decodes: Vec<SeqId> = plan.decode.iter().copied().filter(|&id| self.scheduler.is_running(id)).collect();
        let (mut ids, mut ks) = (Vec::with_capacity(decodes.len()), Vec::with_capacity(decodes.len()));
        for id in decodes {
            let Some(seq) = self.seqs.get(&id) else { continue };
            let len = seq.cache.as_ref().map_or(0, LatentCache::len);
            let k = self.planned_drafts(seq, len);
            if self.grow(id, len + 1 + k) {
                ids.push(id);
                ks.push(k);
            }
        }
        // Every running decode in one step, with the resumed sequences' runs.
        let running: Vec<bool> = ids.iter().map(|id| self.seqs.get(id).is_some_and(|s| s.next.is_some())).collect();
        let mut keep = running.iter();
        ids.retain(|_| keep.next().copied().unwrap_or(false));
        let mut keep = running.iter();
        ks.retain(|_| keep.next().copied().unwrap_or(false));
        if ids.is_empty() && replays.is_empty() {
            return Ok(());
        }
        // Drafts first: each speculating sequence's MTP module proposes its next tokens.
        let mut drafts = Vec::new();
        for (id, k) in ids.iter().zip(ks.iter_mut()) {
            if *k > 0 {
                drafts.push(self.draft(*id, *k)?);
            } else {
                drafts.push(Vec::new());
            }
        }
        let n = ids.len() + replays.len();
        let mut tokens = Vec::with_capacity(n);
        let mut runs = Vec::with_capacity(n);
        let mut caches = Vec::with_capacity(n);
        let mut before = Vec::with_capacity(ids.len());
        // Every token's logits but those of a replay's run before its last.
        let mut kept = Vec::with_capacity(n);
        // Disjoint borrows of the sequences' caches, in `ids` order, then the replays'.
        let mut by_id: HashMap<SeqId, &mut Seq> = self
            .seqs
            .iter_mut()
            .filter(|(id, _)| ids.contains(id) || replays.iter().any(|r| r.0 == **id))
            .map(|(&id, s)| (id, s))
            .collect();
        for (id, d) in ids.iter().zip(&drafts) {
            let seq = by_id.remove(id).ok_or_else(|| Error::internal("a decoded sequence vanished"))?;
            tokens.push(seq.next.take().unwrap_or(0));
            tokens.extend_from_slice(d);
            runs.push(1 + d.len());
            kept.extend(std::iter::repeat_n(true, 1 + d.len()));
            let cache = seq.cache.as_mut().ok_or_else(|| Error::internal("a decoded sequence has no cache"))?;
            before.push(cache.len());
            caches.push(cache);
        }
        for &(id, from, to) in &replays {
            let seq = by_id.remove(&id).ok_or_else(|| Error::internal("a resumed sequence vanished"))?;
            let run = seq.history.get(from..to).ok_or_else(|| Error::internal("a replay past the history"))?;
            tokens.extend_from_slice(run);
            runs.push(run.len());
            kept.extend((from..to).map(|i| i + 1 == to));
            caches.push(seq.cache.as_mut().ok_or_else(|| Error::internal("a resumed sequence has no cache"))?);
        }
        // The step's logits and hidden states leave the workspace for buffers kept between steps,
        // so that sampling (which needs the engine) can read them.
        let mut logits = std::mem::take(&mut self.step_logits);
        logits.clear();
        logits.extend_from_slice(self.model.decode_runs_keeping(&tokens, &runs, &mut caches, &mut self.ws, &kept)?);
        let mut states = std::mem::take(&mut self.step_hidden);
        states.clear();
        drop(caches);
        let speculating = |id: &SeqId| self.seqs.get(id).is_some_and(|s| s.spec.is_some());
        if ids.iter().chain(replays.iter().map(|r| &r.0)).any(speculating) {
            states.extend_from_slice(self.ws.hidden());
        }
        let result = self.settle_step(&ids, &runs, &drafts, &before, &replays, (&logits, &states));
        self.step_logits = logits;
        self.step_hidden = states;
        result
    }

    /// After a decode step: settles each decoded sequence (`ids`, with `runs` tokens, `drafts`
    /// and `before` rows), then each replay; `rows` holds the step's kept logits and (where a
    /// sequence speculates) hidden states, decoded sequences first.
    fn settle_step(
        &mut self,
        ids: &[SeqId],
        runs: &[usize],
        drafts: &[Vec<u32>],
        before: &[usize],
        replays: &[(SeqId, usize, usize)],
        (logits, states): (&[f32], &[f32]),
    ) -> Result<()> {
        let (vocab, hidden) = (self.model.config().vocab_size, self.model.config().hidden_size);
        let mut row = 0;
        for (i, &id) in ids.iter().enumerate() {
            let n = runs[i];
            let rows = &logits[row * vocab..(row + n) * vocab];
            let h = (!states.is_empty()).then(|| &states[row * hidden..(row + n) * hidden]);
            row += n;
            self.settle(id, rows, h, &drafts[i], before[i])?;
        }
        for &(id, _, to) in replays {
            let logits = &logits[row * vocab..(row + 1) * vocab];
            let h = (!states.is_empty()).then(|| &states[row * hidden..(row + 1) * hidden]);
            row += 1;
            let Some(seq) = self.seqs.get_mut(&id) else { continue };
            let len = seq.cache.as_ref().map_or(0, LatentCache::len);
            if let (Some(spec), Some(h)) = (seq.spec.as_mut(), h) {
                // Rows recomputed by decode steps: the module starts again after them.
                spec.restart(len);
                spec.pending.extend_from_slice(h);
                spec.from = len - 1;
            }
            // A resumed sequence has its next token already.
            if to == seq.target && seq.next.is_none() {
                let followers = std::mem::take(&mut seq.followers);
                self.emit(id, logits)?;
                self.share_prompt(id, followers, logits)?;
            }
        }
        Ok(())
    }

    /// How many tokens `seq` drafts this step: none without a module, without the hidden state
    /// at its last position (after a preemption, until a plain step gives it one), or without
    /// room before `max_tokens` or the context's end.
    fn planned_drafts(&self, seq: &Seq, len: usize) -> usize {
        let Some(spec) = &seq.spec else { return 0 };
        let rows = spec.pending.len() / self.model.config().hidden_size.max(1);
        if rows == 0 || spec.from + rows != len {
            return 0;
        }
        let left = seq.params.max_tokens.saturating_sub(seq.generated + 1);
        let room = self.model.config().max_position_embeddings.saturating_sub(len + 1);
        self.draft_tokens.min(left).min(room)
    }

    /// `k` drafts of `id`'s MTP module: its rows for the positions whose hidden states wait,
    /// the last one predicting the token after `next`, then chained on its own output.
    fn draft(&mut self, id: SeqId, k: usize) -> Result<Vec<u32>> {
        let hidden = self.model.config().hidden_size;
        let seq = self.seqs.get_mut(&id).ok_or_else(|| Error::internal("a drafting sequence vanished"))?;
        let spec = seq.spec.as_mut().ok_or_else(|| Error::internal("a drafting sequence has no MTP state"))?;
        let len = spec.from + spec.pending.len() / hidden;
        // The token after each waiting position: the history holds them, `next` last.
        let after = seq.history.get(spec.from + 1..=len).ok_or_else(|| Error::internal("the history is short"))?;
        let ws = &mut self.mtp_ws;
        let (logits, h) = self.model.mtp_step(0, &spec.pending, after, &mut spec.mtp, ws)?;
        let verified = spec.mtp.layer_len(0);
        spec.from = len;
        spec.pending.clear();
        let mut drafts = vec![crate::sampling::argmax(logits)];
        let mut last = h[h.len() - hidden..].to_vec();
        for _ in 1..k {
            let (logits, y) = self.model.mtp_step(0, &last, &drafts[drafts.len() - 1..], &mut spec.mtp, ws)?;
            let d = crate::sampling::argmax(logits);
            last.copy_from_slice(&y[y.len() - hidden..]);
            drafts.push(d);
        }
        spec.mtp.truncate(verified);
        Ok(drafts)
    }

    /// After a decode step: `id`'s next token was verified with `drafts` behind it, `rows` their
    /// logits and `hidden` their final hidden states (present for speculating sequences), its
    /// cache held `before` rows. Accepts drafts by the speculative-sampling rule, drops the rows
    /// of the rejected ones, and emits every token taken.
    fn settle(&mut self, id: SeqId, rows: &[f32], hidden: Option<&[f32]>, drafts: &[u32], before: usize) -> Result<()> {
        let vocab = self.model.config().vocab_size;
        let mut accepted = 0;
        let mut token = None;
        for (j, &d) in drafts.iter().enumerate() {
            let row = &rows[j * vocab..(j + 1) * vocab];
            let Some(t) = self.choose(id, row, Some(d)) else { return Ok(()) };
            if t != d {
                token = Some((t, j));
                break;
            }
            accepted += 1;
            self.deliver(id, row, d)?;
            if !self.seqs.contains_key(&id) {
                return Ok(());
            }
        }
        if let Some(seq) = self.seqs.get_mut(&id) {
            // The rows of `next` and the accepted drafts stay; a rejected draft's go before the
            // token that replaces it is taken (a finished sequence's pages join the prefix cache).
            if let Some(cache) = seq.cache.as_mut() {
                cache.truncate(before + 1 + accepted);
            }
            if let Some(spec) = &mut seq.spec {
                spec.accepted += accepted;
                spec.rejected += drafts.len() - accepted;
                let hidden_size = self.model.config().hidden_size;
                if let Some(h) = hidden {
                    if spec.from != before || !spec.pending.is_empty() {
                        // A plain step after a restart: its hidden state is the module's start.
                        let rows = spec.pending.len() / hidden_size;
                        if spec.from + rows != before {
                            spec.restart(before);
                        }
                    }
                    spec.pending.extend_from_slice(&h[..(accepted + 1) * hidden_size]);
                }
            }
        }
        self.scheduler.decoded_n(id, 1 + accepted);
        match token {
            Some((t, j)) => self.deliver(id, &rows[j * vocab..(j + 1) * vocab], t),
            None => {
                let row = &rows[drafts.len() * vocab..(drafts.len() + 1) * vocab];
                match self.choose(id, row, None) {
                    Some(t) => self.deliver(id, row, t),
                    None => Ok(()),
                }
            }
        }
    }

    /// Starts `leader`'s followers (the other completions of its request) on the prompt's rows it
    /// just computed: each takes the leader's pages, shared (the last, partial one copied, as it
    /// will write there), samples its first token from the same `logits`, and queues first.
    fn share_prompt(&mut self, leader: SeqId, followers: Vec<SeqId>, logits: &[f32]) -> Result<()> {
        if followers.is_empty() {
            return Ok(());
        }
        // The leader may have ended on its first token: its rows went to the prefix cache.
        let (cache, cached) = match self.seqs.get(&leader) {
            Some(seq) => (seq.cache.clone(), seq.cached),
            None => (None, 0),
        };
        let Some(cache) = cache else {
            self.release_followers(followers);
            return Ok(());
        };
        let len = cache.len();
        for &f in followers.iter().rev() {
            let mut fork = cache.clone();
            if fork.reserve(len + 1).is_err() {
                // No page for its copy: it computes its prompt itself.
                self.release_followers(vec![f]);
                continue;
            }
            let Some(seq) = self.seqs.get_mut(&f) else { continue };
            seq.cache = Some(fork);
            seq.cached = cached;
            self.scheduler.push_front(f, SeqCounts { prompt: len, prefilled: len, len });
        }
        for f in followers {
            self.emit(f, logits)?;
        }
        Ok(())
    }

    /// Samples `id`'s next token from `logits`, sends what text is final, and ends the
    /// sequence on EOS, a stop string, `max_tokens` or a full context.
    fn emit(&mut self, id: SeqId, logits: &[f32]) -> Result<()> {
        match self.choose(id, logits, None) {
            Some(token) => self.deliver(id, logits, token),
            None => Ok(()),
        }
    }

    /// `id`'s next token from `logits`, with its penalties and biases; given a draft, the draft
    /// if accepted ([`Sampler::sample_given_draft`]). `None` for a sequence that is gone.
    fn choose(&mut self, id: SeqId, logits: &[f32], draft: Option<u32>) -> Option<u32> {
        let seq = self.seqs.get_mut(&id)?;
        let p = &seq.params;
        // Penalties and biases on a copy of the logits (kept between calls), only when asked.
        let penalised = p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        let adjusted: &[f32] = if penalised || !p.logit_bias.is_empty() {
            let adjusted = &mut self.adjusted;
            adjusted.clear();
            adjusted.extend_from_slice(logits);
            if penalised {
                for (&t, &c) in &seq.counts {
                    if let Some(l) = adjusted.get_mut(t as usize) {
                        *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                    }
                }
            }
            for &(t, b) in &p.logit_bias {
                if let Some(l) = adjusted.get_mut(t as usize) {
                    *l += b;
                }
            }
            adjusted
        } else {
            logits
        };
        Some(seq.sampler.sample_given_draft(adjusted, &seq.history, draft))
    }

    /// Takes `token` as `id`'s next: sends what text is final and ends the sequence on EOS, a
    /// stop string, `max_tokens` or a full context.
    fn deliver(&mut self, id: SeqId, logits: &[f32], token: u32) -> Result<()> {
        let max_positions = self.model.config().max_position_embeddings;
        let Some(seq) = self.seqs.get_mut(&id) else { return Ok(()) };
        let now = Instant::now();
        match seq.last_token {
            None => self.metrics.ttft.observe(now.duration_since(seq.submitted).as_secs_f64()),
            Some(t) => self.metrics.itl.observe(now.duration_since(t).as_secs_f64()),
        }
        seq.last_token = Some(now);
        if self.tokenizer.eos_ids().contains(&token) {
            return self.finish(id, Finish::Stop);
        }
        seq.generated += 1;
        self.metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
        seq.history.push(token);
        *seq.counts.entry(token).or_insert(0) += 1;
        let logprobs = match seq.params.logprobs {
            Some(top) => vec![token_logprob(&self.tokenizer, logits, token, top)],
            None => Vec::new(),
        };
        let mut text = String::new();
        let mut stopped = false;
        if let Some(piece) = seq.stream.step(&self.tokenizer, token)? {
            stopped = seq.stop.push(&piece, &mut |t: &str| text.push_str(t)).is_some();
        }
        let full = seq.prompt.len() + seq.generated >= max_positions;
        let finish = if stopped {
            Some(Finish::Stop)
        } else if seq.generated >= seq.params.max_tokens || full {
            Some(Finish::Length)
        } else {
            None
        };
        if !stopped && finish.is_some() {
            if let Some(rest) = seq.stream.finish(&self.tokenizer)? {
                stopped = seq.stop.push(&rest, &mut |t: &str| text.push_str(t)).is_some();
            }
            if !stopped {
                seq.stop.flush(&mut |t: &str| text.push_str(t));
            }
        }
        // One event per token, even with no text yet (a character's first bytes, or a token
        // the tokenizer cannot spell): streams then show every token's timing.
        let _ = seq.events.send(Event::Text { text, logprobs });
        match finish {
            Some(f) => self.finish(id, if stopped { Finish::Stop } else { f }),
            None => {
                seq.next = Some(token);
                Ok(())
            }
        }
    }

    fn finish(&mut self, id: SeqId, finish: Finish) -> Result<()> {
        let Some(mut seq) = self.seqs.remove(&id) else { return Ok(()) };
        self.scheduler.remove(id);
        let (accepted_drafts, rejected_drafts) = seq.spec.as_ref().map_or((0, 0), |s| (s.accepted, s.rejected));
        self.metrics.accepted_drafts.fetch_add(accepted_drafts as u64, Ordering::Relaxed);
        self.metrics.rejected_drafts.fetch_add(rejected_drafts as u64, Ordering::Relaxed);
        let usage = Usage {
            prompt_tokens: seq.prompt.len(),
            completion_tokens: seq.generated,
            cached_tokens: seq.cached,
            accepted_drafts,
            rejected_drafts,
        };
        self.metrics.finished.fetch_add(1, Ordering::Relaxed);
        // The full pages stay for a later request that shares the prefix (the next turn of a
        // chat); the rest go back to the pool.
        if let Some(cache) = seq.cache.take() {
            self.prefix.insert(&seq.history, &cache);
        }
        self.release_followers(std::mem::take(&mut seq.followers));
        // The counters show the sequence gone before its client hears the end.
        self.publish();
        let _ = seq.events.send(Event::Done { finish, usage });
        Ok(())
    }

    fn finish_with(&mut self, id: SeqId, event: Event) {
        let seq = self.seqs.remove(&id);
        self.scheduler.remove(id);
        self.publish();
        if let Some(seq) = seq {
            let _ = seq.events.send(event);
        }
    }
}

/// The scheduler's view of the pool: free pages and pages only the prefix cache holds; and at
/// admission, the prefix a sequence finds.
struct WorkerPages<'a> {
    pool: &'a PagePool,
    prefix: &'a mut PrefixStore,
    seqs: &'a mut HashMap<SeqId, Seq>,
    device: &'a candle_core::Device,
}

impl Pages for WorkerPages<'_> {
    fn free(&self) -> usize {
        self.pool.free_pages().saturating_add(self.prefix.evictable())
    }

    fn reuse(&mut self, id: SeqId) -> usize {
        let Some(seq) = self.seqs.get_mut(&id) else { return 0 };
        if seq.cache.is_none() {
            let (pages, rows) = self.prefix.lookup(&seq.history[..seq.target]);
            if rows > 0 {
                seq.cache = LatentCache::from_pages(self.pool, pages, rows, self.device).ok();
            }
        }
        let rows = seq.cache.as_ref().map_or(0, LatentCache::len);
        if !seq.admitted {
            seq.cached = seq.cached.max(rows.min(seq.prompt.len()));
        }
        rows
    }
}

/// `token`'s log-probability under `logits` and the `top` best alternatives.
fn token_logprob(tokenizer: &Tokenizer, logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
    let lp = |id: usize| logits.get(id).map_or(f32::NEG_INFINITY, |&l| l - log_sum);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let k = top.min(order.len());
    if k > 0 {
        order.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        order.truncate(k);
        order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    } else {
        order.clear();
    }
    TokenLogprob {
        token: tokenizer.token_text(token),
        logprob: lp(token as usize),
        top: order.into_iter().map(|id| (tokenizer.token_text(id as u32), lp(id))).collect(),
    }
}
