//! `latent serve`: an OpenAI-compatible HTTP server over the [`Engine`].
//!
//! axum on tokio. The handlers read and check a request, render and encode its prompt, and
//! hand it to the engine; they talk to it only through [`Engine::submit`] and the event
//! channel it returns. A client that goes away drops that channel, and the engine frees the
//! sequence within one step. Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`,
//! `GET /v1/models`, `GET /health`, `GET /metrics`.

pub mod api;
pub mod think;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::engine::{Engine, Event, Finish, Request, SubmitError, TokenLogprob, Usage};
use crate::error::{Error, ErrorKind};
use api::{ApiError, Common, Fields, Prompt};
use think::ThinkSplitter;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Requests to `/v1/*` must carry `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// The model's name in requests and responses.
    pub served_model_name: String,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// How long in-flight requests may finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Seconds without an engine step, while it has work, after which `/health` says 503.
    pub stuck_after_secs: f64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            served_model_name: "latent".into(),
            max_body_bytes: 4 << 20,
            shutdown_grace: Duration::from_secs(30),
            stuck_after_secs: 120.0,
        }
    }
}

struct AppState {
    engine: OnceLock<Engine>,
    config: ServerConfig,
    created: u64,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let mut response = (self.status, Json(self.body())).into_response();
        if retry {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn random_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    format!("{prefix}-{:016x}", h.finish())
}

/// Serves on `config.host:config.port` until SIGTERM or Ctrl-C. `load` runs on a blocking
/// thread once the socket is bound (`/health` answers 503 until it returns); `on_bound` is told
/// the address (port 0 picks a free one).
pub fn serve(
    config: ServerConfig,
    load: impl FnOnce() -> crate::error::Result<Engine> + Send + 'static,
    on_bound: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port)).await?;
        on_bound(listener.local_addr()?);
        let grace = config.shutdown_grace;
        let limit = config.max_body_bytes;
        let state = Arc::new(AppState { engine: OnceLock::new(), config, created: unix_now() });
        let loader = state.clone();
        let loading = tokio::task::spawn_blocking(move || {
            let engine = load()?;
            let _ = loader.engine.set(engine);
            Ok::<_, Error>(())
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/completions", post(completions))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(limit))
            .with_state(state.clone());
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stop_rx.wait_for(|&stop| stop).await;
        });
        let server = tokio::spawn(async move { server.await });
        let signals = async {
            #[cfg(unix)]
            {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            #[cfg(not(unix))]
            tokio::signal::ctrl_c().await?;
            Ok::<_, std::io::Error>(())
        };
        tokio::pin!(signals);
        tokio::select! {
            loaded = loading => {
                match loaded {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(anyhow::Error::new(e).context("loading the model")),
                    Err(e) => return Err(anyhow::anyhow!("loading the model: {e}")),
                }
                (&mut signals).await?;
            }
            s = &mut signals => s?,
        }
        eprintln!("latent: stopping: no new connections; in-flight requests have {} s to finish", grace.as_secs());
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(grace, server).await;
        Ok(())
    })
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found"), "no such route")
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.config.api_key else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if g.trim() == key => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            "the API key is wrong",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            "an API key is required: send `Authorization: Bearer KEY`",
        )),
    }
}

fn engine(state: &AppState) -> Result<&Engine, ApiError> {
    state.engine.get().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("loading"), "the model is still loading")
    })
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.engine.get() {
        None => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "loading"}))).into_response(),
        Some(e) if e.metrics().stuck(state.config.stuck_after_secs) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "stuck"}))).into_response()
        }
        Some(_) => Json(json!({"status": "ok"})).into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.engine.get() {
        Some(e) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], e.metrics().prometheus()).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "# the model is loading\n").into_response(),
    }
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    Ok(Json(json!({
        "object": "list",
        "data": [{"id": state.config.served_model_name, "object": "model", "created": state.created, "owned_by": "latent"}],
    })))
}

fn body_error(rejection: BytesRejection, limit: usize) -> ApiError {
    let status = rejection.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            status,
            "invalid_request_error",
            Some("request_too_large"),
            format!("the request body is over {limit} bytes"),
        );
    }
    ApiError::new(status, "invalid_request_error", None, rejection.body_text())
}

/// The checks both endpoints make before encoding: key, body, model name.
fn begin<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(&'a Engine, Fields), ApiError> {
    authorize(state, headers)?;
    let body = body.map_err(|r| body_error(r, state.config.max_body_bytes))?;
    let fields = Fields::parse(&body)?;
    let engine = engine(state)?;
    if let Some(model) = fields.string("model")? {
        if model != state.config.served_model_name {
            return Err(ApiError {
                param: Some("model".into()),
                ..ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    Some("model_not_found"),
                    format!(
                        "the model `{model}` does not exist; this server serves `{}`",
                        state.config.served_model_name
                    ),
                )
            });
        }
    }
    Ok((engine, fields))
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (engine, fields) = begin(&state, &headers, body)?;
    let tokenizer = engine.tokenizer().clone();
    let common = api::common(&fields, true, tokenizer.vocab_size())?;
    let messages = api::messages(&fields)?;
    if !tokenizer.has_chat_template() {
        return Err(ApiError::invalid("messages", "this model's tokenizer has no chat template; use /v1/completions"));
    }
    let rendered = tokenizer.apply_chat_template(&messages, true).map_err(|e| request_error(&e, "messages"))?;
    let in_thought = think::opens_thought(&rendered);
    let prompt = tokenizer.encode_chat(&messages, true).map_err(|e| request_error(&e, "messages"))?;
    run(state.clone(), engine, prompt, common, Kind::Chat { in_thought }).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (engine, fields) = begin(&state, &headers, body)?;
    let tokenizer = engine.tokenizer().clone();
    let common = api::common(&fields, false, tokenizer.vocab_size())?;
    let prompt = match api::prompt(&fields, tokenizer.vocab_size())? {
        Prompt::Tokens(ids) => ids,
        Prompt::Text(text) => tokenizer.encode(&text).map_err(|e| request_error(&e, "prompt"))?,
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` encodes to no token"));
    }
    run(state.clone(), engine, prompt, common, Kind::Completion).await
}

fn request_error(e: &Error, param: &str) -> ApiError {
    match e.kind() {
        ErrorKind::Internal => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, e.to_string()),
        _ => ApiError::invalid(param, e.to_string()),
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Chat { in_thought: bool },
    Completion,
}

fn context_exceeded(n_prompt: usize, max_tokens: usize, max: usize) -> ApiError {
    ApiError {
        param: Some("messages".into()),
        ..ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("context_length_exceeded"),
            format!(
                "this model's context is {max} tokens; the prompt has {n_prompt} and max_tokens asks for {max_tokens} more"
            ),
        )
    }
}

/// Submits the request's `n` sequences and answers with their whole results or a stream.
async fn run(
    state: Arc<AppState>,
    engine: &Engine,
    prompt: Vec<u32>,
    mut common: Common,
    kind: Kind,
) -> Result<Response, ApiError> {
    let max = engine.max_positions();
    let n_prompt = prompt.len();
    if n_prompt >= max {
        return Err(context_exceeded(n_prompt, common.max_tokens.unwrap_or(1), max));
    }
    match common.max_tokens {
        Some(m) if n_prompt + m > max => return Err(context_exceeded(n_prompt, m, max)),
        Some(_) => {}
        None => common.params.max_tokens = common.params.max_tokens.min(max - n_prompt),
    }
    // The `n` completions share the prompt's prefill; completion i samples with the seed plus i.
    let receivers = match engine.submit_n(Request { prompt, params: common.params.clone() }, common.n) {
        Ok(receivers) => receivers,
        Err(SubmitError::QueueFull(w)) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("server_busy"),
                format!("the server is busy ({w} requests waiting); retry later"),
            ))
        }
        Err(SubmitError::Invalid { error: Error::PromptTooLong { .. }, .. }) => {
            return Err(context_exceeded(n_prompt, common.params.max_tokens, max))
        }
        Err(SubmitError::Invalid { error, param }) => return Err(request_error(&error, param)),
        Err(SubmitError::Stopped) => {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", None, "the server is stopping"))
        }
    };
    let meta = Meta {
        id: random_id(if matches!(kind, Kind::Chat { .. }) { "chatcmpl" } else { "cmpl" }),
        created: unix_now(),
        model: state.config.served_model_name.clone(),
        kind,
    };
    if common.stream {
        return Ok(stream(meta, receivers, common.include_usage).into_response());
    }
    whole(meta, receivers).await
}

/// What every response and chunk of one request repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat { .. }, false) => "chat.completion",
            (Kind::Chat { .. }, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices})
    }
}

fn event_error(message: String, kind: ErrorKind) -> ApiError {
    match kind {
        ErrorKind::Request => ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", None, message),
        _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, message),
    }
}

/// Usage of `n` completions of one prompt: the prompt counted once.
fn total_usage(usages: &[Usage]) -> Usage {
    let first = usages.first().copied().unwrap_or_default();
    Usage {
        prompt_tokens: first.prompt_tokens,
        completion_tokens: usages.iter().map(|u| u.completion_tokens).sum(),
        cached_tokens: first.cached_tokens,
        accepted_drafts: usages.iter().map(|u| u.accepted_drafts).sum(),
        rejected_drafts: usages.iter().map(|u| u.rejected_drafts).sum(),
    }
}

/// Waits for every sequence and answers with one JSON body.
async fn whole(meta: Meta, receivers: Vec<UnboundedReceiver<Event>>) -> Result<Response, ApiError> {
    let mut choices = Vec::with_capacity(receivers.len());
    let mut usages = Vec::new();
    for (index, mut rx) in receivers.into_iter().enumerate() {
        let (mut text, mut logprobs, mut done) = (String::new(), Vec::<TokenLogprob>::new(), None);
        while let Some(event) = rx.recv().await {
            match event {
                Event::Text { text: t, logprobs: l } => {
                    text.push_str(&t);
                    logprobs.extend(l);
                }
                Event::Done { finish, usage } => {
                    done = Some(finish);
                    usages.push(usage);
                }
                Event::Error { message, kind } => return Err(event_error(message, kind)),
            }
        }
        let finish = done.ok_or_else(|| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, "the engine stopped mid-request")
        })?;
        let wants_logprobs = !logprobs.is_empty();
        choices.push(match meta.kind {
            Kind::Chat { in_thought } => {
                let mut split = ThinkSplitter::new(in_thought);
                let (a, b) = (split.push(&text), split.finish());
                let (reasoning, content) = (a.reasoning + &b.reasoning, a.content + &b.content);
                let mut message = json!({"role": "assistant", "content": content});
                if !reasoning.is_empty() {
                    message["reasoning_content"] = json!(reasoning);
                }
                let lp = if wants_logprobs { json!({"content": api::chat_logprobs(&logprobs)}) } else { Value::Null };
                json!({"index": index, "message": message, "logprobs": lp, "finish_reason": api::finish_str(finish)})
            }
            Kind::Completion => {
                let lp = if wants_logprobs { api::completion_logprobs(&logprobs, 0) } else { Value::Null };
                json!({"index": index, "text": text, "logprobs": lp, "finish_reason": api::finish_str(finish)})
            }
        });
    }
    let mut body = meta.envelope(false, Value::Array(choices));
    body["usage"] = api::usage_json(&total_usage(&usages));
    Ok(Json(body).into_response())
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
fn stream(meta: Meta, receivers: Vec<UnboundedReceiver<Event>>, include_usage: bool) -> impl IntoResponse {
    let (out, out_rx) = unbounded_channel::<SseEvent>();
    let (merged_tx, merged) = unbounded_channel::<(usize, Event)>();
    for (index, mut rx) in receivers.into_iter().enumerate() {
        let tx = merged_tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = rx.recv() => match event {
                        Some(e) => if tx.send((index, e)).is_err() { return },
                        None => return,
                    },
                    // The client went away: dropping `rx` cancels the sequence.
                    _ = tx.closed() => return,
                }
            }
        });
    }
    drop(merged_tx);
    tokio::spawn(forward(meta, merged, out, include_usage));
    Sse::new(UnboundedReceiverStream::new(out_rx).map(Ok::<_, Infallible>)).keep_alive(KeepAlive::default())
}

async fn forward(
    meta: Meta,
    mut merged: UnboundedReceiver<(usize, Event)>,
    out: UnboundedSender<SseEvent>,
    include_usage: bool,
) {
    let send = |v: Value| out.send(SseEvent::default().data(v.to_string())).is_ok();
    let mut splitters: Vec<ThinkSplitter> = Vec::new();
    let mut offsets: Vec<usize> = Vec::new();
    let mut usages = Vec::new();
    let mut started = std::collections::HashSet::new();
    loop {
        let next = tokio::select! {
            e = merged.recv() => e,
            _ = out.closed() => return,
        };
        let Some((index, event)) = next else { break };
        while splitters.len() <= index {
            let in_thought = matches!(meta.kind, Kind::Chat { in_thought: true });
            splitters.push(ThinkSplitter::new(in_thought));
            offsets.push(0);
        }
        if let Kind::Chat { .. } = meta.kind {
            if started.insert(index) {
                let choice = json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
                if !send(meta.envelope(true, choice)) {
                    return;
                }
            }
        }
        let ok = match event {
            Event::Text { text, logprobs } => match meta.kind {
                Kind::Chat { .. } => {
                    let split = splitters[index].push(&text);
                    chat_delta(&meta, index, split, &logprobs, None, &send)
                }
                Kind::Completion => {
                    let lp = if logprobs.is_empty() {
                        Value::Null
                    } else {
                        api::completion_logprobs(&logprobs, offsets[index])
                    };
                    offsets[index] += text.len();
                    let choice = json!([{"index": index, "text": text, "logprobs": lp, "finish_reason": null}]);
                    send(meta.envelope(true, choice))
                }
            },
            Event::Done { finish, usage } => {
                usages.push(usage);
                match meta.kind {
                    Kind::Chat { .. } => {
                        let split = splitters[index].finish();
                        chat_delta(&meta, index, split, &[], Some(finish), &send)
                    }
                    Kind::Completion => {
                        let choice = json!([{"index": index, "text": "", "logprobs": null, "finish_reason": api::finish_str(finish)}]);
                        send(meta.envelope(true, choice))
                    }
                }
            }
            Event::Error { message, kind } => {
                // After the stream began: an error event, then the stream closes.
                let _ = send(event_error(message, kind).body());
                return;
            }
        };
        if !ok {
            return;
        }
    }
    if include_usage {
        let mut chunk = meta.envelope(true, json!([]));
        chunk["usage"] = api::usage_json(&total_usage(&usages));
        if !send(chunk) {
            return;
        }
    }
    let _ = out.send(SseEvent::default().data("[DONE]"));
}

/// One chat chunk: the split text (reasoning and content), its log-probabilities, and the
/// finish reason on the last; nothing is sent for an empty piece that finishes nothing.
fn chat_delta(
    meta: &Meta,
    index: usize,
    split: think::Split,
    logprobs: &[TokenLogprob],
    finish: Option<Finish>,
    send: &impl Fn(Value) -> bool,
) -> bool {
    let mut delta = serde_json::Map::new();
    if !split.reasoning.is_empty() {
        delta.insert("reasoning_content".into(), json!(split.reasoning));
    }
    if !split.content.is_empty() {
        delta.insert("content".into(), json!(split.content));
    }
    if delta.is_empty() && logprobs.is_empty() && finish.is_none() {
        return true;
    }
    let lp = if logprobs.is_empty() { Value::Null } else { json!({"content": api::chat_logprobs(logprobs)}) };
    let choice = json!([{
        "index": index,
        "delta": Value::Object(delta),
        "logprobs": lp,
        "finish_reason": finish.map(api::finish_str),
    }]);
    send(meta.envelope(true, choice))
}
