//! The engine's counters, shared with the server, and their Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds buckets of the latency histograms.
const BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// A histogram of seconds.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// The sum, in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation of `secs` seconds.
    pub fn observe(&self, secs: f64) {
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add((secs.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", count.load(Ordering::Relaxed));
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

/// What the engine did and holds; updated by the engine thread, read by anyone.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests submitted and not yet taken by the engine thread.
    pub waiting: AtomicUsize,
    /// Sequences taken by the engine and waiting for room.
    pub queued: AtomicUsize,
    /// Sequences running.
    pub running: AtomicUsize,
    /// Pages of the cache pool held (by sequences or the prefix cache).
    pub pages_used: AtomicUsize,
    /// Pages the prefix cache keeps (some may be shared with sequences too).
    pub pages_cached: AtomicUsize,
    /// Cache rows holding a token of a waiting or running sequence.
    pub cache_rows_held: AtomicUsize,
    /// Sequences preempted for room.
    pub preemptions: AtomicU64,
    /// Generated tokens whose rows a resumed sequence computed again, in runs of the decode step.
    pub recomputed_tokens: AtomicU64,
    /// Pages the memory budget holds.
    pub pages_total: usize,
    /// Bytes one page takes, every layer together.
    pub page_bytes: usize,
    /// Prompt tokens computed.
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens whose rows were reused instead.
    pub prefix_cache_hit_tokens: AtomicU64,
    /// Tokens generated.
    pub generation_tokens: AtomicU64,
    /// Sequences that ended (EOS, stop, length).
    pub finished: AtomicU64,
    /// Sequences dropped because their client went away.
    pub cancelled: AtomicU64,
    /// Speculative decoding: drafted tokens accepted and rejected, over finished sequences.
    pub accepted_drafts: AtomicU64,
    pub rejected_drafts: AtomicU64,
    /// Seconds from submission to the first token.
    pub ttft: Histogram,
    /// Seconds between a sequence's tokens.
    pub itl: Histogram,
    /// When the engine thread last went round its loop (Unix milliseconds).
    pub heartbeat_ms: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Metrics {
    /// Counters for a pool of `pages_total` pages of `page_bytes` bytes.
    pub fn new(pages_total: usize, page_bytes: usize) -> Metrics {
        let m = Metrics { pages_total, page_bytes, ..Metrics::default() };
        m.beat();
        m
    }

    /// Marks the engine thread alive now.
    pub fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Sequences waiting, in the channel or in the scheduler.
    pub fn waiting_total(&self) -> usize {
        self.waiting.load(Ordering::Relaxed) + self.queued.load(Ordering::Relaxed)
    }

    /// Whether the engine has work but has not gone round its loop for `secs` seconds.
    pub fn stuck(&self, secs: f64) -> bool {
        let busy = self.running.load(Ordering::Relaxed) + self.waiting_total() > 0;
        let idle_ms = now_ms().saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed));
        busy && idle_ms as f64 > secs * 1e3
    }

    /// The Prometheus text exposition of every counter.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, value: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        let get = |a: &AtomicUsize| a.load(Ordering::Relaxed) as f64;
        let get64 = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        gauge("latent_running_sequences", "Sequences running.", "gauge", get(&self.running));
        gauge("latent_waiting_sequences", "Sequences waiting for room.", "gauge", self.waiting_total() as f64);
        gauge(
            "latent_kv_pages_used",
            "Pages of the latent cache held, sequences and prefix cache.",
            "gauge",
            get(&self.pages_used),
        );
        gauge(
            "latent_kv_pages_total",
            "Pages of the latent cache the memory budget holds.",
            "gauge",
            self.pages_total as f64,
        );
        gauge(
            "latent_kv_pages_prefix_cached",
            "Pages kept for prefix reuse (evicted when room is needed, unless a sequence shares them).",
            "gauge",
            get(&self.pages_cached),
        );
        gauge(
            "latent_cache_rows_used",
            "Latent cache rows holding a token of a sequence.",
            "gauge",
            get(&self.cache_rows_held),
        );
        gauge("latent_kv_page_tokens", "Tokens per page.", "gauge", crate::cache::PAGE_ROWS as f64);
        gauge(
            "latent_cache_bytes_used",
            "Bytes of latent cache pages held.",
            "gauge",
            (self.pages_used.load(Ordering::Relaxed) * self.page_bytes) as f64,
        );
        gauge(
            "latent_cache_bytes_total",
            "Bytes of the latent cache budget (--kv-memory), in whole pages.",
            "gauge",
            (self.pages_total * self.page_bytes) as f64,
        );
        gauge(
            "latent_preemptions_total",
            "Sequences preempted for room (their rows computed again when they resume).",
            "counter",
            get64(&self.preemptions),
        );
        gauge(
            "latent_recomputed_tokens_total",
            "Generated tokens whose rows resumed sequences computed again (runs in the decode step).",
            "counter",
            get64(&self.recomputed_tokens),
        );
        gauge("latent_prompt_tokens_total", "Prompt tokens computed.", "counter", get64(&self.prompt_tokens));
        gauge(
            "latent_prefix_cache_hit_tokens_total",
            "Prompt tokens whose cache rows were reused.",
            "counter",
            get64(&self.prefix_cache_hit_tokens),
        );
        gauge("latent_generation_tokens_total", "Tokens generated.", "counter", get64(&self.generation_tokens));
        gauge("latent_requests_finished_total", "Sequences that ended.", "counter", get64(&self.finished));
        gauge(
            "latent_requests_cancelled_total",
            "Sequences whose client went away.",
            "counter",
            get64(&self.cancelled),
        );
        gauge(
            "latent_spec_accepted_draft_tokens_total",
            "Tokens drafted by the MTP module that the model accepted.",
            "counter",
            get64(&self.accepted_drafts),
        );
        gauge(
            "latent_spec_rejected_draft_tokens_total",
            "Tokens drafted by the MTP module that the model rejected.",
            "counter",
            get64(&self.rejected_drafts),
        );
        self.ttft.write(&mut out, "latent_time_to_first_token_seconds", "Seconds from a request to its first token.");
        self.itl.write(&mut out, "latent_inter_token_latency_seconds", "Seconds between a sequence's tokens.");
        out
    }
}
