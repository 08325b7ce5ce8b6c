//! `latent bench`: prefill and decode speed, memory, and how close decode comes to the memory
//! roofline (the bytes one decoded token must read, divided by the bandwidth this machine shows).
//! At depth the attention adds arithmetic the bytes do not show (`heads × (2 d_c + d_r)`
//! multiply-adds per cached row and layer), so where the attention kernel has a dot-product
//! instruction whose throughput can be measured ([`crate::kernels::peak`]), a second roofline
//! counts it too.
//!
//! Decode at depth `d` runs over a latent cache of `d` rows filled with random latents: attention
//! costs the same whatever the values, and a 16K-token prefill is not needed to time it. Every
//! figure is the median of `repeats` runs.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::cache::{CacheKind, LatentCache};
use crate::error::{Error, Result};
use crate::inspect::param_counts;
use crate::model::{AttentionPath, LogitRows, Model, Workspace};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Prompt length of the prefill measurement.
    pub prompt_len: usize,
    /// Cache depths at which decode is timed.
    pub depths: Vec<usize>,
    /// Tokens decoded per timed run.
    pub decode_tokens: usize,
    /// Runs per figure (the median is kept).
    pub repeats: usize,
    /// How the cache stores rows (`None`: [`Model::cache_kind`]).
    pub cache_kind: Option<CacheKind>,
    /// Sequences decoded together, one step for all ([`Model::decode`]), each at depth
    /// `batch_depth`; empty measures no batch.
    pub batch_sizes: Vec<usize>,
    /// Cache depth of every sequence of a batch.
    pub batch_depth: usize,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            prompt_len: 512,
            depths: vec![0, 4096, 16384],
            decode_tokens: 32,
            repeats: 3,
            cache_kind: None,
            batch_sizes: Vec::new(),
            batch_depth: 0,
        }
    }
}

/// The figures `latent bench` prints (and writes as JSON with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The CPU and the kernel variant that ran.
    pub cpu: crate::kernels::CpuInfo,
    pub prefill_tok_s: f64,
    /// Decode tokens/s keyed by cache depth (JSON keys are the depths as strings).
    pub decode_tok_s: BTreeMap<usize, f64>,
    pub peak_rss_bytes: u64,
    /// Bytes of the weights as computed with (in the compute dtype).
    pub weight_bytes: usize,
    pub kv_bytes_per_token: usize,
    /// Bytes one decoded token must read at each depth: active weights, one embedding row, the cache.
    pub decode_bytes_per_token: BTreeMap<usize, usize>,
    /// Read bandwidth measured here, with the threads the model uses.
    pub memory_bandwidth_gb_s: f64,
    /// Achieved decode tokens/s over the roofline `bandwidth / bytes per token`, by depth.
    pub roofline_share: BTreeMap<usize, f64>,
    /// Multiply-adds of the decode attention per token at each depth: layers × heads × cached rows
    /// × `(2 kv_lora_rank + qk_rope_head_dim)`.
    pub attention_macs_per_token: BTreeMap<usize, u64>,
    /// Measured throughput of the attention kernel's dot-product instruction, all threads
    /// (`vpdpbusd` for an int8 cache, `vdpbf16ps` for a bf16 one), G multiply-adds/s; `null` where
    /// the kernel has none.
    pub attention_peak_gmac_s: Option<f64>,
    /// Achieved decode tokens/s over a roofline that counts the attention's arithmetic too: the
    /// weights at the bandwidth, then the slower of the cache's bytes at the bandwidth and the
    /// attention at its peak. Empty without a peak.
    pub roofline_with_attention_share: BTreeMap<usize, f64>,
    /// Per batch size `B`: tokens/s of all `B` sequences together (`B` tokens a step).
    pub batch_decode_tok_s: BTreeMap<usize, f64>,
    /// Per batch size: bytes one step must read if routing spreads tokens uniformly over the
    /// experts (the weights once, the expected union of the chosen experts, every cache's rows).
    pub batch_step_bytes: BTreeMap<usize, usize>,
    /// Per batch size: achieved tokens/s over that roofline's (the bytes at the measured bandwidth).
    pub batch_roofline_share: BTreeMap<usize, f64>,
    /// Cache depth of each sequence in the batch measurements.
    pub batch_depth: usize,
    /// For a model with a multi-token-prediction module, what speculative decoding's steps cost
    /// at depth 0 (medians, milliseconds).
    pub speculative: Option<SpeculativeCosts>,
    pub threads: usize,
}

/// The steps of speculative decoding against a plain one-token step.
#[derive(Debug, Clone, Serialize)]
pub struct SpeculativeCosts {
    pub plain_step_ms: f64,
    /// One forward over a token and one draft (two positions of one sequence).
    pub verify_step_ms: f64,
    /// One token through the MTP module and the output head.
    pub draft_step_ms: f64,
}

impl SpeculativeCosts {
    /// Decode speed with one draft per step accepted at `rate`, over plain decoding's.
    pub fn speedup(&self, rate: f64) -> f64 {
        (1.0 + rate) * self.plain_step_ms / (self.verify_step_ms + self.draft_step_ms)
    }
}

/// The measured peak of the instruction `model`'s decode attention multiplies with, over a new cache.
fn attention_peak(kind: CacheKind) -> Option<f64> {
    use crate::kernels::{mla_decode::rounds_queries, peak::dot_peaks, Simd};
    match kind {
        CacheKind::Int8 if Simd::detect() == Simd::Avx512Vnni => dot_peaks().int8_gmac_s,
        CacheKind::Dense(candle_core::DType::BF16) if rounds_queries::<half::bf16>() => {
            let peaks = dot_peaks();
            if crate::kernels::gemm::bf16_by_fma() {
                peaks.f32_gmac_s
            } else {
                peaks.bf16_gmac_s
            }
        }
        _ => None,
    }
}

/// Runs every measurement of `config` on `model`.
pub fn run(model: &Model, config: &BenchConfig) -> Result<BenchReport> {
    let cfg = model.config();
    let max = cfg.max_position_embeddings;
    let deepest = config.depths.iter().max().copied().unwrap_or(0);
    if config.prompt_len == 0 || config.prompt_len > max || deepest + config.decode_tokens > max {
        return Err(Error::InvalidArgument(format!(
            "the prompt ({}) and the deepest decode ({deepest} + {}) must fit the context ({max})",
            config.prompt_len, config.decode_tokens
        )));
    }
    if config.batch_depth + config.decode_tokens + 1 > max || config.batch_sizes.contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "--batch sizes must be at least 1, and the batch depth ({}) plus the decoded tokens ({} + 1) must fit \
             the context ({max})",
            config.batch_depth, config.decode_tokens
        )));
    }
    let repeats = config.repeats.max(1);
    let kind = config.cache_kind.unwrap_or(model.cache_kind());
    if let Some(&most) = config.batch_sizes.iter().max() {
        let layout = crate::cache::PageLayout::new(cfg, kind)?;
        let pages = (config.batch_depth + config.decode_tokens + 1).div_ceil(crate::cache::PAGE_ROWS);
        let need = most as f64 * pages as f64 * layout.page_bytes() as f64;
        crate::resources::check_fits(
            &format!("--batch {most}"),
            need,
            &format!("the caches of {most} sequences"),
            "give a smaller --batch",
        )?;
    }
    let prompt = random_tokens(config.prompt_len, cfg.vocab_size, 0x5eed);
    let prefill = median((0..repeats).map(|_| time_prefill(model, kind, &prompt)).collect::<Result<Vec<_>>>()?);

    let dtype_bytes = model.dtype().size_in_bytes();
    let counts = param_counts(cfg);
    // What the weights occupy as loaded (quantized linears included); the bytes a token reads
    // are the active parameters at the model's average bytes per parameter.
    let weight_bytes = model.weight_bytes();
    let bytes_per_param = weight_bytes as f64 / counts.total.max(1) as f64;
    let cache = model.new_cache_of(kind)?;
    // Sparse attention reads every row's indexer key but at most `index_topk` rows' latents.
    let key_bytes_per_token = cache.pool().layout().index_bytes_per_token();
    let kv_bytes_per_token = cache.bytes_per_token();
    let latent_bytes_per_token = kv_bytes_per_token - key_bytes_per_token;
    let topk = cfg.dsa.map_or(usize::MAX, |d| d.index_topk);
    let indexer_macs_per_row =
        cfg.dsa.map_or(0, |d| (cfg.num_hidden_layers * d.index_n_heads * d.index_head_dim) as u64);
    let active_bytes = (counts.active as f64 * bytes_per_param) as usize + cfg.hidden_size * dtype_bytes;
    let bandwidth = crate::kernels::peak::read_bandwidth_gb_s();

    // (Only where a depth has a cache to attend over.)
    let peak = if deepest > 0 { attention_peak(kind) } else { None };
    let macs_per_row =
        (cfg.num_hidden_layers * cfg.num_attention_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)) as u64;

    let (mut decode, mut bytes, mut share) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    let (mut macs, mut share_with_attention) = (BTreeMap::new(), BTreeMap::new());
    for &depth in &config.depths {
        let runs =
            (0..repeats).map(|_| time_decode(model, kind, depth, config.decode_tokens)).collect::<Result<Vec<_>>>()?;
        let tok_s = median(runs);
        // The cache as it stands halfway through the timed tokens.
        let rows = depth + config.decode_tokens / 2;
        let read = rows.min(topk);
        let cache_bytes = read * latent_bytes_per_token + rows * key_bytes_per_token;
        let per_token = active_bytes + cache_bytes;
        let roofline = bandwidth * 1e9 / per_token as f64;
        decode.insert(depth, tok_s);
        bytes.insert(depth, per_token);
        share.insert(depth, tok_s / roofline);
        let attention_macs = macs_per_row * read as u64 + indexer_macs_per_row * rows as u64;
        macs.insert(depth, attention_macs);
        if let Some(peak) = peak {
            let (weights_s, cache_s) =
                (active_bytes as f64 / (bandwidth * 1e9), cache_bytes as f64 / (bandwidth * 1e9));
            let floor_s = weights_s + cache_s.max(attention_macs as f64 / (peak * 1e9));
            share_with_attention.insert(depth, tok_s * floor_s);
        }
    }
    let (mut batch, mut batch_bytes, mut batch_share) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for &b in &config.batch_sizes {
        let runs = (0..repeats)
            .map(|_| time_batch(model, kind, b, config.batch_depth, config.decode_tokens))
            .collect::<Result<Vec<_>>>()?;
        let tok_s = median(runs);
        // One token's bytes, less its routed experts, plus the expected union of the batch's.
        let routed = match &cfg.moe {
            Some(m) => {
                let layers = (0..cfg.num_hidden_layers).filter(|&i| cfg.is_moe_layer(i)).count() as f64;
                let expert = (3 * cfg.hidden_size * m.moe_intermediate_size) as f64 * bytes_per_param;
                let (e, k) = (m.n_routed_experts as f64, m.num_experts_per_tok as f64);
                let union = e * (1.0 - (1.0 - k / e).powi(b as i32));
                layers * expert * (union - k)
            }
            None => 0.0,
        };
        let rows = config.batch_depth + config.decode_tokens / 2;
        let cache_bytes = rows.min(topk) * latent_bytes_per_token + rows * key_bytes_per_token;
        let step = active_bytes as f64 + routed + (b * cache_bytes) as f64;
        batch.insert(b, tok_s);
        batch_bytes.insert(b, step as usize);
        batch_share.insert(b, tok_s / (b as f64 * bandwidth * 1e9 / step));
    }
    Ok(BenchReport {
        cpu: crate::kernels::CpuInfo::detect(),
        prefill_tok_s: prefill,
        decode_tok_s: decode,
        peak_rss_bytes: peak_rss_bytes(),
        weight_bytes,
        kv_bytes_per_token,
        decode_bytes_per_token: bytes,
        memory_bandwidth_gb_s: bandwidth,
        roofline_share: share,
        attention_macs_per_token: macs,
        attention_peak_gmac_s: peak,
        roofline_with_attention_share: share_with_attention,
        batch_decode_tok_s: batch,
        batch_step_bytes: batch_bytes,
        batch_roofline_share: batch_share,
        batch_depth: config.batch_depth,
        speculative: (model.mtp_depth() > 0).then(|| time_speculative(model, kind, repeats)).transpose()?,
        threads: rayon::current_num_threads(),
    })
}

/// [`SpeculativeCosts`] over `repeats` runs of each step, after a prompt of 16 tokens.
fn time_speculative(model: &Model, kind: CacheKind, repeats: usize) -> Result<SpeculativeCosts> {
    let cfg = model.config();
    let prompt = random_tokens(16, cfg.vocab_size, 0x5bec);
    let mut cache = model.new_cache_of(kind)?;
    cache.reserve(prompt.len() + 4)?;
    model.forward(&prompt, &mut cache, AttentionPath::Expanded, LogitRows::Last)?;
    let mut mtp = model.new_mtp_cache(kind)?;
    mtp.reserve(4)?;
    let (n, h) = (cache.len(), vec![0.1f32; cfg.hidden_size]);
    let (mut ws, mut mtp_ws) = (Workspace::default(), Workspace::default());
    let (mut plain, mut verify, mut draft) = (Vec::new(), Vec::new(), Vec::new());
    // One untimed round first: the buffers reach their sizes.
    for round in 0..repeats + 1 {
        let start = Instant::now();
        model.decode_step(prompt[0], &mut cache, &mut ws)?;
        let plain_ms = start.elapsed().as_secs_f64() * 1e3;
        cache.truncate(n);
        let start = Instant::now();
        model.decode_runs(&prompt[..2], &[2], &mut [&mut cache], &mut ws)?;
        let verify_ms = start.elapsed().as_secs_f64() * 1e3;
        cache.truncate(n);
        let start = Instant::now();
        model.mtp_step(0, &h, &prompt[..1], &mut mtp, &mut mtp_ws)?;
        let draft_ms = start.elapsed().as_secs_f64() * 1e3;
        mtp.truncate(0);
        if round > 0 {
            plain.push(plain_ms);
            verify.push(verify_ms);
            draft.push(draft_ms);
        }
    }
    Ok(SpeculativeCosts { plain_step_ms: median(plain), verify_step_ms: median(verify), draft_step_ms: median(draft) })
}

fn time_prefill(model: &Model, kind: CacheKind, prompt: &[u32]) -> Result<f64> {
    let mut cache = model.new_cache_of(kind)?;
    let start = Instant::now();
    model.forward(prompt, &mut cache, AttentionPath::Expanded, LogitRows::Last)?;
    Ok(prompt.len() as f64 / start.elapsed().as_secs_f64())
}

fn time_decode(model: &Model, kind: CacheKind, depth: usize, n_tokens: usize) -> Result<f64> {
    let cfg = model.config();
    let mut cache = filled_cache(model, kind, depth, n_tokens)?;
    let tokens = random_tokens(n_tokens, cfg.vocab_size, depth as u64 + 1);
    let mut ws = Workspace::default();
    let start = Instant::now();
    for &t in &tokens {
        model.decode_step(t, &mut cache, &mut ws)?;
    }
    Ok(n_tokens as f64 / start.elapsed().as_secs_f64())
}

/// Tokens/s of `b` sequences at `depth` decoded together for `steps` steps (after one untimed).
fn time_batch(model: &Model, kind: CacheKind, b: usize, depth: usize, steps: usize) -> Result<f64> {
    let cfg = model.config();
    let mut caches = (0..b).map(|_| filled_cache(model, kind, depth, steps + 1)).collect::<Result<Vec<_>>>()?;
    let mut refs: Vec<&mut LatentCache> = caches.iter_mut().collect();
    let tokens = random_tokens((steps + 1) * b, cfg.vocab_size, b as u64 + 7);
    let mut ws = Workspace::default();
    model.decode(&tokens[..b], &mut refs, &mut ws)?;
    let start = Instant::now();
    for step in tokens.chunks_exact(b).skip(1) {
        model.decode(step, &mut refs, &mut ws)?;
    }
    Ok((steps * b) as f64 / start.elapsed().as_secs_f64())
}

/// A cache of `kind` holding `depth` random rows, with room for `more`.
fn filled_cache(model: &Model, kind: CacheKind, depth: usize, more: usize) -> Result<LatentCache> {
    let cfg = model.config();
    let mut cache = model.new_cache_of(kind)?;
    // Steady-state decode: the cache does not grow (and copy its rows) while being timed.
    cache.reserve(depth + more)?;
    if depth > 0 {
        let layout = *cache.pool().layout();
        let (d_c, d_r) = (layout.d_c, layout.d_r);
        let c_kv = Tensor::randn(0f32, 1.0, (depth, d_c), model.device())?.to_dtype(model.dtype())?;
        let k_rope = Tensor::randn(0f32, 1.0, (depth, d_r), model.device())?.to_dtype(model.dtype())?;
        // Sparse attention: random indexer keys too (the selection then reads scattered rows).
        let keys = match layout.d_i {
            0 => None,
            d_i => Some(Tensor::randn(0f32, 1.0, (depth, d_i), model.device())?),
        };
        for layer in 0..cfg.num_hidden_layers {
            match (cache.kind(), &keys) {
                (_, Some(keys)) => cache.append_indexed(layer, &c_kv, &k_rope, keys)?,
                (CacheKind::Int8, None) => cache.append_int8(layer, &c_kv, &k_rope)?,
                (CacheKind::Dense(_) | CacheKind::Expanded(_), None) => drop(cache.append(layer, &c_kv, &k_rope)?),
            }
        }
    }
    Ok(cache)
}

/// Median of `values` (the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

/// The process's peak resident memory (VmHWM), or 0 where /proc is not available.
pub fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}

/// One cache kind in the fixed-budget study ([`budget_study`]).
#[derive(Debug, Clone, Serialize)]
pub struct BudgetRow {
    /// `latent bf16`, `latent int8` or `expanded bf16` (the dtype the rows are stored in).
    pub cache: String,
    pub bytes_per_token: usize,
    /// Tokens the budget holds, in whole pages.
    pub tokens: usize,
    /// Sequences of the full context the budget holds.
    pub max_sequences: usize,
    /// Tokens/s of `B` such sequences decoded together, by `B` (the last is `max_sequences`).
    pub tok_s: BTreeMap<usize, f64>,
}

/// The paper's memory claim in miniature: give each kind of cache (the latent cache in the
/// model's dtype, the latent cache in int8, the expanded per-head cache) the same `budget`
/// bytes; count the sequences of `context` tokens each holds, and time the batched decode of
/// `low` sequences and of as many as fit, each sequence `context − decode_tokens − 1` deep.
/// `progress` is told each measurement as it starts.
pub fn budget_study(
    model: &Model,
    budget: usize,
    context: usize,
    low: &[usize],
    decode_tokens: usize,
    repeats: usize,
    mut progress: impl FnMut(&str, usize),
) -> Result<Vec<BudgetRow>> {
    use crate::cache::{PageLayout, PAGE_ROWS};
    let cfg = model.config();
    if context < decode_tokens + 2 || context > cfg.max_position_embeddings {
        return Err(Error::InvalidArgument(format!(
            "--context {context} must exceed the decoded tokens ({decode_tokens} + 1) and fit the model's context ({})",
            cfg.max_position_embeddings
        )));
    }
    let dtype = model.cache_kind().dtype().unwrap_or(DType::BF16);
    let mut kinds = vec![(model.cache_kind(), format!("latent {dtype:?}").to_lowercase())];
    if PageLayout::new(cfg, CacheKind::Int8).is_ok() {
        kinds.push((CacheKind::Int8, "latent int8".into()));
    }
    if model.takes_expanded_cache() {
        kinds.push((CacheKind::Expanded(dtype), format!("expanded {dtype:?}").to_lowercase()));
    }
    let depth = context - decode_tokens - 1;
    let mut smallest = usize::MAX;
    for (kind, _) in &kinds {
        smallest = smallest.min(PageLayout::new(cfg, *kind)?.page_bytes());
    }
    let per_sequence = context.div_ceil(PAGE_ROWS).saturating_mul(smallest);
    if budget < per_sequence {
        return Err(Error::InvalidArgument(format!(
            "--budget {budget} bytes holds no sequence of {context} tokens in any cache: the smallest takes {per_sequence} bytes"
        )));
    }
    // Each cache kind fills the budget in turn.
    crate::resources::check_fits(
        &format!("--budget {}", crate::inspect::bytes(budget)),
        budget as f64,
        "the study",
        "give a smaller --budget",
    )?;
    let mut rows = Vec::new();
    for (kind, name) in kinds {
        let layout = PageLayout::new(cfg, kind)?;
        let per_sequence = context.div_ceil(PAGE_ROWS) * layout.page_bytes();
        let max_sequences = budget / per_sequence.max(1);
        let mut sizes: Vec<usize> = low.iter().copied().filter(|&b| b > 0 && b < max_sequences).collect();
        if max_sequences > 0 {
            sizes.push(max_sequences);
        }
        let mut tok_s = BTreeMap::new();
        for b in sizes {
            progress(&name, b);
            let runs = (0..repeats.max(1))
                .map(|_| time_batch(model, kind, b, depth, decode_tokens))
                .collect::<Result<Vec<_>>>()?;
            tok_s.insert(b, median(runs));
        }
        rows.push(BudgetRow {
            cache: name,
            bytes_per_token: layout.bytes_per_token(),
            tokens: budget / layout.page_bytes().max(1) * PAGE_ROWS,
            max_sequences,
            tok_s,
        });
    }
    Ok(rows)
}

/// Draws the budget study: tokens/s against concurrent sequences, one line per cache, into
/// `path` (PNG).
pub fn plot_budget(rows: &[BudgetRow], title: &str, path: &std::path::Path) -> Result<()> {
    use crate::plot::{chart, Canvas, Panel, Series, PALETTE};
    let mut canvas = Canvas::new(700, 440);
    let series: Vec<Series<'_>> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| Series {
            name: r.cache.as_str(),
            color: PALETTE[i % PALETTE.len()],
            points: r.tok_s.iter().map(|(&b, &t)| ((b as f64).log2(), t)).collect(),
        })
        .collect();
    chart(&mut canvas, Panel { x: 0, y: 0, w: 700, h: 440 }, title, "log2 concurrent sequences", &series);
    canvas.save(path)
}
