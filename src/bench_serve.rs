//! A load generator for any OpenAI-compatible server (latent's, llama.cpp's, vLLM's), in two
//! modes, each run for a fixed time per level:
//! - closed loop: `N` clients each send a streaming `/v1/completions` request, wait for its last
//!   token, and send the next. At saturation this measures throughput; its time to first token is
//!   not comparable between servers, since by Little's law `N = requests/s × (TTFT + generation
//!   time)`: a server that generates faster leaves its clients more of each cycle to wait in the
//!   queue, so its TTFT looks worse at the same throughput.
//! - open loop: requests arrive at a fixed rate (Poisson arrivals, seeded) whatever the server
//!   does, as users do; at the same rate, times to first token compare directly.
//!
//! Reported per level: output tokens/s, requests/s, time to first token and inter-token latency
//! (p50, p99).
//!
//! Prompts are random words (about `prompt_words` of them, ~1.3 tokens a word for an English
//! BPE), different for every request so that no server can reuse a cached prefix. The client
//! speaks plain HTTP/1.1 over a socket of its own, so that it measures the server only.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// What to send and for how long.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// `host:port` of the server.
    pub addr: String,
    /// The `model` field of each request (`None`: left out).
    pub model: Option<String>,
    pub api_key: Option<String>,
    /// Concurrency levels (closed loop), run in turn.
    pub concurrency: Vec<usize>,
    /// Arrival rates in requests/s (open loop), run in turn instead of `concurrency` when given.
    pub rates: Vec<f64>,
    /// Words per prompt.
    pub prompt_words: usize,
    /// Tokens asked of each request (`max_tokens`).
    pub max_tokens: usize,
    /// Time each level runs, after its first requests are under way.
    pub duration: Duration,
    /// Requests each client (open loop: the level) sends at most.
    pub max_requests: usize,
    /// Extra fields of each request (e.g. `{"ignore_eos": true}` or a `logit_bias`).
    pub extra: Value,
}

/// One level's figures.
#[derive(Debug, Clone, Serialize)]
pub struct LevelReport {
    /// Clients (closed loop), or the most requests in flight at once (open loop).
    pub concurrency: usize,
    /// The arrival rate, requests/s (open loop only).
    pub rate: Option<f64>,
    pub requests: usize,
    pub failed: usize,
    pub output_tokens: usize,
    pub seconds: f64,
    pub output_tok_s: f64,
    pub requests_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
}

/// One request's timings.
struct Sample {
    ok: bool,
    tokens: usize,
    ttft: f64,
    gaps: Vec<f64>,
}

const WORDS: &[&str] = &[
    "the",
    "and",
    "of",
    "to",
    "in",
    "that",
    "he",
    "shall",
    "unto",
    "for",
    "his",
    "a",
    "lord",
    "they",
    "be",
    "is",
    "him",
    "not",
    "them",
    "it",
    "with",
    "all",
    "thou",
    "thy",
    "was",
    "god",
    "which",
    "my",
    "me",
    "said",
    "but",
    "ye",
    "their",
    "have",
    "will",
    "thee",
    "from",
    "as",
    "are",
    "when",
    "this",
    "out",
    "were",
    "upon",
    "man",
    "by",
    "you",
    "israel",
    "king",
    "son",
    "up",
    "there",
    "hath",
    "then",
    "people",
    "came",
    "had",
    "house",
    "into",
    "on",
    "her",
    "come",
    "one",
    "we",
    "children",
    "before",
    "your",
    "also",
    "day",
    "land",
    "men",
    "against",
    "shalt",
    "if",
    "now",
    "hand",
    "saying",
    "at",
    "even",
    "went",
    "us",
    "no",
    "every",
    "therefore",
    "behold",
    "things",
    "so",
    "did",
    "what",
    "she",
    "mine",
    "earth",
    "city",
    "our",
    "made",
    "days",
    "father",
    "go",
    "over",
    "may",
    "great",
    "name",
    "heart",
];

/// A random prompt of `n` words from `seed`.
fn prompt(n: usize, seed: u64) -> String {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut words = Vec::with_capacity(n);
    for _ in 0..n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        words.push(WORDS[(s % WORDS.len() as u64) as usize]);
    }
    words.join(" ")
}

/// Sends one streaming request and times its tokens (each SSE chunk with text is one token).
fn one(cfg: &LoadConfig, seed: u64) -> Sample {
    let fail = Sample { ok: false, tokens: 0, ttft: 0.0, gaps: Vec::new() };
    let mut body = json!({
        "prompt": prompt(cfg.prompt_words, seed),
        "max_tokens": cfg.max_tokens,
        "temperature": 0.0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(model) = &cfg.model {
        body["model"] = json!(model);
    }
    if let Some(extra) = cfg.extra.as_object() {
        for (k, v) in extra {
            body[k] = v.clone();
        }
    }
    let body = body.to_string();
    let Ok(mut stream) = TcpStream::connect(&cfg.addr) else { return fail };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(600)));
    let auth = cfg.api_key.as_ref().map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        cfg.addr,
        body.len()
    );
    let start = Instant::now();
    if stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body.as_bytes())).is_err() {
        return fail;
    }
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    if reader.read_line(&mut status).is_err() || !status.contains(" 200") {
        return fail;
    }
    let (mut chunks, mut ttft, mut last, mut gaps, mut usage, mut done) = (0, 0.0, start, Vec::new(), None, false);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else { continue };
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            usage = Some(n as usize);
        }
        // A chunk that carries a token: a choice that is not only the finish.
        let choice = &chunk["choices"][0];
        let token = choice.is_object()
            && (choice["finish_reason"].is_null() || choice["text"].as_str().is_some_and(|t| !t.is_empty()));
        if token {
            let now = Instant::now();
            if chunks == 0 {
                ttft = now.duration_since(start).as_secs_f64();
            } else {
                gaps.push(now.duration_since(last).as_secs_f64());
            }
            last = now;
            chunks += 1;
        }
    }
    Sample { ok: done && chunks > 0, tokens: usage.unwrap_or(chunks), ttft, gaps }
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

/// Runs every level of `cfg` in turn (its rates if any, else its concurrency levels);
/// `progress(level, done)` after each request.
pub fn run(cfg: &LoadConfig, mut progress: impl FnMut(usize, usize)) -> Result<Vec<LevelReport>> {
    if !cfg.rates.is_empty() {
        return cfg
            .rates
            .iter()
            .enumerate()
            .map(|(level, &rate)| open_loop(cfg, level, rate, |done| progress(level, done)))
            .collect();
    }
    let mut reports = Vec::new();
    for (level, &n) in cfg.concurrency.iter().enumerate() {
        if n == 0 {
            return Err(Error::InvalidArgument("--concurrency levels must be at least 1".into()));
        }
        let start = Instant::now();
        let deadline = start + cfg.duration;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            for client in 0..n {
                let tx = tx.clone();
                scope.spawn(move || {
                    for k in 0..cfg.max_requests {
                        if Instant::now() >= deadline {
                            break;
                        }
                        let seed = ((level as u64) << 40) ^ ((client as u64) << 20) ^ k as u64;
                        if tx.send(one(cfg, seed)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            let mut samples = Vec::new();
            for s in rx {
                samples.push(s);
                progress(level, samples.len());
            }
            reports.push(summarize(&samples, start.elapsed().as_secs_f64(), n, None));
        });
    }
    Ok(reports)
}

/// Requests arriving at `rate` a second for `cfg.duration` (exponential gaps from a fixed seed, so
/// two servers get the same schedule), each on its own thread; the level ends when the last one
/// does.
fn open_loop(cfg: &LoadConfig, level: usize, rate: f64, mut progress: impl FnMut(usize)) -> Result<LevelReport> {
    if !(rate > 0.0 && rate.is_finite()) {
        return Err(Error::InvalidArgument(format!("--rate {rate}: rates must be positive numbers of requests/s")));
    }
    let start = Instant::now();
    let mut arrivals = Vec::new();
    let (mut t, mut x) = (0.0f64, 0x2545_f491_4f6c_dd1du64 ^ level as u64);
    while arrivals.len() < cfg.max_requests {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let u = ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        t += -u.ln() / rate;
        if t >= cfg.duration.as_secs_f64() {
            break;
        }
        arrivals.push(t);
    }
    let in_flight = std::sync::atomic::AtomicUsize::new(0);
    let peak = std::sync::atomic::AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::channel();
    let mut samples = Vec::new();
    std::thread::scope(|scope| {
        let (in_flight, peak) = (&in_flight, &peak);
        let arrivals = &arrivals;
        scope.spawn(move || {
            for (k, &at) in arrivals.iter().enumerate() {
                let wait = Duration::from_secs_f64(at).saturating_sub(start.elapsed());
                std::thread::sleep(wait);
                let tx = tx.clone();
                scope.spawn(move || {
                    use std::sync::atomic::Ordering::Relaxed;
                    let now = in_flight.fetch_add(1, Relaxed) + 1;
                    peak.fetch_max(now, Relaxed);
                    let sample = one(cfg, ((level as u64) << 40) ^ (1 << 39) ^ k as u64);
                    in_flight.fetch_sub(1, Relaxed);
                    let _ = tx.send(sample);
                });
            }
        });
        for s in rx {
            samples.push(s);
            progress(samples.len());
        }
    });
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    Ok(summarize(&samples, start.elapsed().as_secs_f64(), peak, Some(rate)))
}

/// One level's figures from its requests.
fn summarize(samples: &[Sample], seconds: f64, concurrency: usize, rate: Option<f64>) -> LevelReport {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let tokens: usize = ok.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<f64> = ok.iter().map(|s| s.ttft * 1e3).collect();
    let mut itl: Vec<f64> = ok.iter().flat_map(|s| s.gaps.iter().map(|g| g * 1e3)).collect();
    LevelReport {
        concurrency,
        rate,
        requests: ok.len(),
        failed: samples.len() - ok.len(),
        output_tokens: tokens,
        seconds,
        output_tok_s: tokens as f64 / seconds,
        requests_s: ok.len() as f64 / seconds,
        ttft_p50_ms: percentile(&mut ttft, 0.5),
        ttft_p99_ms: percentile(&mut ttft, 0.99),
        itl_p50_ms: percentile(&mut itl, 0.5),
        itl_p99_ms: percentile(&mut itl, 0.99),
    }
}

/// A run written with `--json`: its label and levels (a figure written as `null`, a NaN, reads
/// back as NaN).
pub fn read_run(path: &Path) -> Result<(String, Vec<LevelReport>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::InvalidArgument(format!("{}: not a bench-serve JSON file: {e}", path.display())))?;
    let count = |l: &Value, k: &str| l[k].as_u64().unwrap_or(0) as usize;
    let figure = |l: &Value, k: &str| l[k].as_f64().unwrap_or(f64::NAN);
    let levels = v["levels"].as_array().map(Vec::as_slice).unwrap_or_default();
    let levels = levels
        .iter()
        .map(|l| LevelReport {
            concurrency: count(l, "concurrency").max(1),
            rate: l["rate"].as_f64(),
            requests: count(l, "requests"),
            failed: count(l, "failed"),
            output_tokens: count(l, "output_tokens"),
            seconds: figure(l, "seconds"),
            output_tok_s: figure(l, "output_tok_s"),
            requests_s: figure(l, "requests_s"),
            ttft_p50_ms: figure(l, "ttft_p50_ms"),
            ttft_p99_ms: figure(l, "ttft_p99_ms"),
            itl_p50_ms: figure(l, "itl_p50_ms"),
            itl_p99_ms: figure(l, "itl_p99_ms"),
        })
        .collect();
    Ok((v["label"].as_str().unwrap_or("run").to_string(), levels))
}

/// Draws output tokens/s and time to first token against concurrency (or, for open-loop runs,
/// against the arrival rate) into `path` (PNG).
pub fn plot(reports: &[(String, Vec<LevelReport>)], path: &Path) -> Result<()> {
    use crate::plot::{chart, Canvas, Panel, Series, PALETTE};
    let open = reports.iter().all(|(_, levels)| levels.iter().all(|l| l.rate.is_some()));
    let x = |l: &LevelReport| if open { l.rate.unwrap_or(0.0) } else { (l.concurrency as f64).log2() };
    let axis = if open { "arrival rate (requests/s)" } else { "log2 concurrent clients" };
    let mut canvas = Canvas::new(1000, 440);
    let series = |f: &dyn Fn(&LevelReport) -> f64| -> Vec<Series<'_>> {
        reports
            .iter()
            .enumerate()
            .map(|(i, (name, levels))| Series {
                name: name.as_str(),
                color: PALETTE[i % PALETTE.len()],
                points: levels.iter().map(|l| (x(l), f(l))).collect(),
            })
            .collect()
    };
    let left = Panel { x: 0, y: 0, w: 500, h: 440 };
    let right = Panel { x: 500, y: 0, w: 500, h: 440 };
    chart(&mut canvas, left, "output tokens/s", axis, &series(&|l| l.output_tok_s));
    chart(&mut canvas, right, "TTFT p50 (ms)", axis, &series(&|l| l.ttft_p50_ms));
    canvas.save(path)
}
