//! OpenAI's wire format: reading requests field by field (so that every invalid value is an
//! error naming its `param`), and the shapes of responses, chunks and errors.

use axum::http::StatusCode;
use serde_json::{json, Map, Value};

use crate::engine::{Finish, Params, TokenLogprob, Usage};
use crate::sampling::SamplingParams;
use crate::tokenizer::Message;

/// The most completions one request may ask for (`n`).
pub const MAX_N: usize = 16;
/// The most alternatives per token (`top_logprobs`, completions' `logprobs`).
pub const MAX_LOGPROBS: usize = 20;
/// The most stop strings.
pub const MAX_STOP: usize = 16;
/// Tokens generated when a request names no `max_tokens`, at most what the context leaves.
pub const DEFAULT_MAX_TOKENS: usize = 512;

/// An error answer: status and OpenAI's `{"error": {message, type, param, code}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 `invalid_request_error` naming `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// An error of another status and type.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError { status, message: message.into(), kind, param: None, code }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// A request's fields, taken out one by one.
pub struct Fields(Map<String, Value>);

impl Fields {
    /// The body's top-level object.
    pub fn parse(body: &[u8]) -> Result<Fields, ApiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                format!("the request body is not valid JSON: {e}"),
            )
        })?;
        match value {
            Value::Object(map) => Ok(Fields(map)),
            other => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                format!("the request body must be a JSON object, got {}", kind_of(&other)),
            )),
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub fn string(&self, key: &str) -> Result<Option<String>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(ApiError::invalid(key, format!("`{key}` must be a string, got {}", kind_of(v)))),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(ApiError::invalid(key, format!("`{key}` must be a boolean, got {}", kind_of(v)))),
        }
    }

    pub fn number(&self, key: &str) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| ApiError::invalid(key, format!("`{key}` must be a finite number"))),
            Some(v) => Err(ApiError::invalid(key, format!("`{key}` must be a number, got {}", kind_of(v)))),
        }
    }

    pub fn integer(&self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => Ok(Some(i)),
                (None, Some(u)) => Ok(Some(u.min(i64::MAX as u64) as i64)),
                _ => Err(ApiError::invalid(key, format!("`{key}` must be an integer, got {n}"))),
            },
            Some(v) => Err(ApiError::invalid(key, format!("`{key}` must be an integer, got {}", kind_of(v)))),
        }
    }

    fn value(&self, key: &str) -> Option<&Value> {
        self.get(key)
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What a completion request asks for, besides its prompt.
#[derive(Debug, Clone)]
pub struct Common {
    pub model: Option<String>,
    pub params: Params,
    /// `max_tokens` as given (else the default, cut to what the context leaves).
    pub max_tokens: Option<usize>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Whether the seed was given (else each request draws one).
    pub seeded: bool,
}

/// Reads the parameters both endpoints share. `chat` selects chat's spelling of logprobs
/// (`logprobs: bool` and `top_logprobs`) over completions' (`logprobs: int`).
pub fn common(f: &Fields, chat: bool, vocab: usize) -> Result<Common, ApiError> {
    let model = f.string("model")?;
    let mut max_tokens = None;
    for key in ["max_tokens", "max_completion_tokens"] {
        if let Some(v) = f.integer(key)? {
            if v < 1 {
                return Err(ApiError::invalid(key, format!("`{key}` must be at least 1, got {v}")));
            }
            max_tokens = Some(v as usize);
        }
    }
    let temperature = f.number("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("`temperature` must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = f.number("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", format!("`top_p` must be in (0, 1], got {top_p}")));
    }
    let top_k = match f.integer("top_k")? {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(ApiError::invalid("top_k", format!("`top_k` must be -1, 0 or positive, got {k}"))),
    };
    let n = f.integer("n")?.unwrap_or(1);
    if n < 1 || n > MAX_N as i64 {
        return Err(ApiError::invalid("n", format!("`n` must be between 1 and {MAX_N}, got {n}")));
    }
    let penalty = |key: &str| -> Result<f32, ApiError> {
        let v = f.number(key)?.unwrap_or(0.0);
        if !(-2.0..=2.0).contains(&v) {
            return Err(ApiError::invalid(key, format!("`{key}` must be between -2 and 2, got {v}")));
        }
        Ok(v as f32)
    };
    let presence_penalty = penalty("presence_penalty")?;
    let frequency_penalty = penalty("frequency_penalty")?;
    let repetition_penalty = f.number("repetition_penalty")?.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty <= 10.0) {
        return Err(ApiError::invalid(
            "repetition_penalty",
            format!("`repetition_penalty` must be in (0, 10], got {repetition_penalty}"),
        ));
    }
    let seed = f.integer("seed")?;
    let stop = match f.value("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            let mut stops = Vec::new();
            for item in items {
                match item {
                    Value::String(s) => stops.push(s.clone()),
                    v => {
                        return Err(ApiError::invalid(
                            "stop",
                            format!("`stop` items must be strings, got {}", kind_of(v)),
                        ))
                    }
                }
            }
            if stops.len() > MAX_STOP {
                return Err(ApiError::invalid("stop", format!("`stop` takes at most {MAX_STOP} strings")));
            }
            stops
        }
        Some(v) => {
            return Err(ApiError::invalid("stop", format!("`stop` must be a string or an array, got {}", kind_of(v))))
        }
    };
    let logit_bias = match f.value("logit_bias") {
        None => Vec::new(),
        Some(Value::Object(map)) => {
            let mut bias = Vec::new();
            for (k, v) in map {
                let id: u32 = k.parse().ok().filter(|&id: &u32| (id as usize) < vocab).ok_or_else(|| {
                    ApiError::invalid("logit_bias", format!("`logit_bias` key {k:?} is not a token id below {vocab}"))
                })?;
                let b = v.as_f64().filter(|b| (-100.0..=100.0).contains(b)).ok_or_else(|| {
                    ApiError::invalid(
                        "logit_bias",
                        format!("`logit_bias` values must be numbers in [-100, 100], got {v}"),
                    )
                })?;
                bias.push((id, b as f32));
            }
            bias
        }
        Some(v) => {
            return Err(ApiError::invalid("logit_bias", format!("`logit_bias` must be an object, got {}", kind_of(v))))
        }
    };
    let logprobs = if chat {
        let on = f.bool("logprobs")?.unwrap_or(false);
        let top = f.integer("top_logprobs")?;
        match top {
            Some(t) if !(0..=MAX_LOGPROBS as i64).contains(&t) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("`top_logprobs` must be between 0 and {MAX_LOGPROBS}, got {t}"),
                ))
            }
            Some(_) if !on => return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`")),
            _ => {}
        }
        on.then_some(top.unwrap_or(0) as usize)
    } else {
        match f.integer("logprobs")? {
            None => None,
            Some(t) if (0..=MAX_LOGPROBS as i64).contains(&t) => Some(t as usize),
            Some(t) => {
                return Err(ApiError::invalid(
                    "logprobs",
                    format!("`logprobs` must be between 0 and {MAX_LOGPROBS}, got {t}"),
                ))
            }
        }
    };
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.value("stream_options") {
        None => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(ApiError::invalid(
                    "stream_options",
                    format!("`stream_options.include_usage` must be a boolean, got {}", kind_of(v)),
                ))
            }
        },
        Some(v) => {
            return Err(ApiError::invalid(
                "stream_options",
                format!("`stream_options` must be an object, got {}", kind_of(v)),
            ))
        }
    };
    let seed_value = seed.map(|s| s as u64).unwrap_or_else(fresh_seed);
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_k,
        top_p: top_p as f32,
        repeat_penalty: repetition_penalty as f32,
        repeat_last_n: usize::MAX,
        seed: seed_value,
    };
    let params = Params {
        max_tokens: max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        sampling,
        presence_penalty,
        frequency_penalty,
        logit_bias,
        stop,
        logprobs,
    };
    Ok(Common { model, params, max_tokens, n: n as usize, stream, include_usage, seeded: seed.is_some() })
}

/// A seed for a request that names none.
fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

/// Chat's `messages`: roles and text contents (a string, or an array of text parts).
pub fn messages(f: &Fields) -> Result<Vec<Message>, ApiError> {
    let items = match f.value("messages") {
        Some(Value::Array(items)) => items,
        None => return Err(ApiError::invalid("messages", "`messages` is required")),
        Some(v) => {
            return Err(ApiError::invalid("messages", format!("`messages` must be an array, got {}", kind_of(v))))
        }
    };
    if items.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must hold at least one message"));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let param = format!("messages[{i}]");
        let Value::Object(m) = item else {
            return Err(ApiError::invalid(&param, format!("{param} must be an object, got {}", kind_of(item))));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) if ["system", "developer", "user", "assistant", "tool"].contains(&r.as_str()) => {
                if r == "developer" {
                    "system".to_string()
                } else {
                    r.clone()
                }
            }
            Some(v) => {
                return Err(ApiError::invalid(
                    &format!("{param}.role"),
                    format!("{param}.role must be one of system, developer, user, assistant, tool; got {v}"),
                ))
            }
            None => return Err(ApiError::invalid(&format!("{param}.role"), format!("{param}.role is required"))),
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None if role == "assistant" => String::new(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                &format!("{param}.content"),
                                format!("{param}.content parts must be {{\"type\": \"text\", \"text\": ...}}"),
                            ))
                        }
                    }
                }
                text
            }
            Some(v) => {
                return Err(ApiError::invalid(
                    &format!("{param}.content"),
                    format!("{param}.content must be a string or an array of text parts, got {}", kind_of(v)),
                ))
            }
            None => return Err(ApiError::invalid(&format!("{param}.content"), format!("{param}.content is required"))),
        };
        out.push(Message { role, content });
    }
    Ok(out)
}

/// Completions' `prompt`: a string, an array of one string, or token ids.
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

pub fn prompt(f: &Fields, vocab: usize) -> Result<Prompt, ApiError> {
    match f.value("prompt") {
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            Ok(Prompt::Text(items[0].as_str().unwrap_or_default().to_string()))
        }
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_number) => {
            let ids: Option<Vec<u32>> =
                items.iter().map(|v| v.as_u64().filter(|&id| (id as usize) < vocab).map(|id| id as u32)).collect();
            ids.map(Prompt::Tokens).ok_or_else(|| {
                ApiError::invalid("prompt", format!("`prompt` token ids must be integers below {vocab}"))
            })
        }
        None => Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(_) => Err(ApiError::invalid("prompt", "`prompt` must be a string, an array of one string, or token ids")),
    }
}

/// The usage object, with DeepSeek's cache fields, and speculative decoding's drafts in
/// OpenAI's `completion_tokens_details` (`accepted_prediction_tokens`,
/// `rejected_prediction_tokens`).
pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {
            "accepted_prediction_tokens": u.accepted_drafts,
            "rejected_prediction_tokens": u.rejected_drafts,
        },
        "prompt_cache_hit_tokens": u.cached_tokens,
        "prompt_cache_miss_tokens": u.prompt_tokens - u.cached_tokens.min(u.prompt_tokens),
    })
}

pub fn finish_str(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

/// Chat's `logprobs.content` entries.
pub fn chat_logprobs(lp: &[TokenLogprob]) -> Value {
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    Value::Array(
        lp.iter()
            .map(|t| {
                let mut e = entry(&t.token, t.logprob);
                e["top_logprobs"] = Value::Array(t.top.iter().map(|(tok, l)| entry(tok, *l)).collect());
                e
            })
            .collect(),
    )
}

/// Completions' `logprobs` object, offsets counted from `offset` bytes of text.
pub fn completion_logprobs(lp: &[TokenLogprob], mut offset: usize) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    for t in lp {
        tokens.push(json!(t.token));
        token_logprobs.push(json!(t.logprob));
        let mut m = Map::new();
        for (tok, l) in &t.top {
            m.insert(tok.clone(), json!(l));
        }
        top.push(Value::Object(m));
        offsets.push(json!(offset));
        offset += t.token.len();
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}
