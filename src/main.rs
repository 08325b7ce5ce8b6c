//! The `latent` command line: generate, chat, perplexity, inspect, bench, train, tokenizer, plot.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use latent::bench::{self, BenchConfig};
use latent::cache::CacheKind;
use latent::generate::{generate, ChatSession, Generation, Request, StopReason};
use latent::inspect::{bytes as bytes_str, Report};
use latent::model::DEFAULT_PREFILL_CHUNK;
use latent::perplexity::perplexity_with;
use latent::weights::Weights;
use latent::{Config, Model, SamplingParams, Tokenizer};

/// Chat templates and tokenizers run under a memory bound (see `latent::bounded`).
#[global_allocator]
static ALLOC: latent::bounded::BoundedAlloc = latent::bounded::BoundedAlloc;

mod default_model;

use default_model::Demo;

#[derive(Parser)]
#[command(
    name = "latent",
    version,
    about = "Run and train DeepSeek-V2-family models (DeepSeek-V2, V2-Lite, V3) with a latent KV cache"
)]
struct Cli {
    /// Worker threads (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt, streaming text to stdout (the prompt comes from --prompt or stdin).
    Generate(GenerateArgs),
    /// Talk with the model in the terminal, through its chat template.
    Chat(ChatArgs),
    /// Perplexity of a text file.
    Perplexity(PerplexityArgs),
    /// Summarise a checkpoint: config, parameters, KV-cache bytes per token next to MHA and GQA.
    Inspect(ModelArgs),
    /// Measure prefill and decode speed, memory, and the share of the decode roofline reached.
    Bench(BenchArgs),
    /// Drive an OpenAI-compatible server with N concurrent streaming clients; report output
    /// tokens/s, requests/s, time to first token and inter-token latency per N, and plot them.
    BenchServe(BenchServeArgs),
    /// Serve the model over HTTP with OpenAI's API (chat and text completions, streaming),
    /// batching every running request into each decode step.
    Serve(ServeArgs),
    /// Pre-train a model from plain text, or fine-tune one on chat data (--init, --sft).
    Train(TrainArgs),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Redraw a training run's plots (loss.png, expert_load.png) from its train_log.jsonl.
    Plot {
        /// The run's output folder.
        run: PathBuf,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// The run file (TOML); `preset:NAME` for a built-in one (kjv, kjv-v3, kjv-v3-chat, sft, tiny-v2, tiny-v3, v2-lite-6m).
    /// Optional with --init, where it defaults to `preset:sft`.
    run: Option<String>,
    /// Override a run-file key, e.g. --set optim.lr=1e-3 --set schedule.steps=200 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Output folder (same as --set run.out=DIR).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Start from this checkpoint (its config, weights and tokenizer) instead of a fresh model.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Fine-tune on chat conversations: one {"messages": [...]} per line; loss on assistant tokens.
    #[arg(long, requires = "init")]
    sft: Option<PathBuf>,
    /// Continue the run in the output folder from its latest checkpoint.
    #[arg(long)]
    resume: bool,
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer on text files.
    Train {
        /// Text files to learn from.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Vocabulary size, special tokens included.
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        /// Folder to write tokenizer.json and tokenizer_config.json into.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Cache depths at which decode is timed, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,4096,16384")]
    depths: Vec<usize>,
    /// Tokens decoded per timed run.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Runs per figure; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Also decode this many sequences together, one step for all (e.g. 1,4,16), and report
    /// their tokens/s in all.
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    /// Cache depth of each sequence in the --batch measurements.
    #[arg(long, default_value_t = 0)]
    batch_depth: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Instead, the fixed-budget study: give the latent cache (model dtype, int8) and the
    /// expanded per-head cache this many bytes each (e.g. 2GiB), count the sequences of
    /// --context tokens each holds, and time decoding --batch sequences and as many as fit.
    #[arg(long, value_parser = parse_bytes)]
    budget: Option<usize>,
    /// Context of each sequence in the --budget study.
    #[arg(long, default_value_t = 4096)]
    context: usize,
    /// Draw the --budget study's tokens/s against concurrency into this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
    F16,
}

impl From<DtypeArg> for DType {
    fn from(d: DtypeArg) -> DType {
        match d {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F16 => DType::F16,
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* requests.
    #[arg(long)]
    api_key: Option<String>,
    /// The model's name in requests and responses (default: the model folder's or file's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most sequences decoded together in one step.
    #[arg(long, default_value_t = 16)]
    max_seqs: usize,
    /// Most tokens computed in one step (decodes plus prompt chunks).
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// Memory for the latent caches of all running sequences, in bytes (suffixes K, M, G, KiB,
    /// MiB, GiB). Each request holds rows for its prompt plus max_tokens while it runs.
    #[arg(long, default_value = "2GiB", value_parser = parse_bytes)]
    kv_memory: usize,
    /// Most requests waiting for room; past it requests get 503 at once.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// Largest request body, in bytes (suffixes as for --kv-memory).
    #[arg(long, default_value = "4MiB", value_parser = parse_bytes)]
    max_body: usize,
    /// Seconds in-flight requests may take to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
    /// Speculative decoding: `mtp` has each sequence draft with the model's multi-token-prediction
    /// module (the default when the model has one), `off` decodes token by token. Drafting and
    /// plain sequences share each decode step.
    #[arg(long, value_enum)]
    speculative: Option<SpeculativeArg>,
    /// Tokens each sequence drafts per step with --speculative mtp.
    #[arg(long, default_value_t = 1)]
    draft_tokens: usize,
}

#[derive(Args)]
struct BenchServeArgs {
    /// The server's `host:port`.
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: String,
    /// The `model` field of each request (default: none sent).
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    api_key: Option<String>,
    /// Concurrent clients, one level after another.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    concurrency: Vec<usize>,
    /// Open loop instead: requests arrive at these rates (requests/s, Poisson, the same schedule on
    /// every run), one level after another; times to first token then compare between servers.
    #[arg(long, value_delimiter = ',')]
    rate: Vec<f64>,
    /// Words per prompt (about 1.3 tokens each for an English tokenizer).
    #[arg(long, default_value_t = 400)]
    prompt_words: usize,
    /// Tokens asked of each request.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Seconds each level runs.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Requests per client per level, at most.
    #[arg(long, default_value_t = 1000)]
    max_requests: usize,
    /// Extra JSON fields for every request, e.g. '{"ignore_eos": true}'.
    #[arg(long, default_value = "{}")]
    extra: String,
    /// Name of this run in the plot and the JSON.
    #[arg(long, default_value = "server")]
    label: String,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Plot output tokens/s and time to first token against concurrency into this PNG (earlier
    /// runs given with --compare are drawn beside it).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// JSON files of earlier runs (from --json) to draw in the same plot.
    #[arg(long, value_delimiter = ',')]
    compare: Vec<PathBuf>,
    /// Run no load: only draw the --compare runs into --plot.
    #[arg(long, requires_all = ["plot", "compare"])]
    plot_only: bool,
}

/// `2GiB`, `512M`, `1000000`: a count of bytes.
fn parse_bytes(text: &str) -> std::result::Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a size: give bytes, e.g. 2GiB or 512M"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit {other:?} in {text:?}: use K, M, G, KiB, MiB or GiB")),
    };
    let bytes = value * scale;
    if !(1.0..1e18).contains(&bytes) {
        return Err(format!("{text:?} is not a usable size"));
    }
    Ok(bytes as usize)
}

#[derive(Args)]
struct ModelArgs {
    /// Folder with config.json, *.safetensors and tokenizer.json, or a GGUF file of llama.cpp's deepseek2
    /// architecture (default: the built-in demo model, a small DeepSeek-V3 with MTP trained on the
    /// King James Bible; `chat` and `serve` default to its chat-tuned variant).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute dtype (default: the checkpoint's).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Quantize the weights on load to a GGML format: q8_0 (8.5 bits per weight) or q4_k (4.5;
    /// rows shorter than 256 take Q8_0). GGUF files keep the formats they were written in.
    #[arg(long, value_enum)]
    quant: Option<QuantArg>,
    /// How the latent cache stores rows: auto (the compute dtype; bf16 where weights are
    /// quantized), int8 (8-bit codes with a scale per 128 latents: about half of bf16's bytes,
    /// and faster decode over long contexts on CPUs with AVX-512 VNNI), or expanded (for study:
    /// per-head keys and values as multi-head attention caches them, n_h (d_nope + d_rope + d_v)
    /// values per token and layer; bf16 or f32 models only).
    #[arg(long, value_enum, default_value_t = KvCacheArg::Auto)]
    kv_cache: KvCacheArg,
    /// Sparse-attention models (DeepSeek-V3.2) only: attend to at most this many rows per query
    /// instead of the config's index_topk. For study and measurement: a value past the context
    /// turns the selection off (dense MLA over every row).
    #[arg(long)]
    index_topk: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KvCacheArg {
    Auto,
    Int8,
    /// For study: per-head keys and values, as multi-head attention caches them.
    Expanded,
}

#[derive(Clone, Copy, ValueEnum)]
enum QuantArg {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4K,
}

impl From<QuantArg> for latent::weights::Quant {
    fn from(q: QuantArg) -> Self {
        match q {
            QuantArg::Q8_0 => latent::weights::Quant::Q8_0,
            QuantArg::Q4K => latent::weights::Quant::Q4K,
        }
    }
}

#[derive(Args)]
struct SamplingArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p.
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    top_p: f32,
    /// Penalty for tokens among the last --repeat-last-n (1: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Random seed (default: from the clock, printed to stderr); the same seed gives the same text.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Speculative decoding: `mtp` drafts tokens with the model's multi-token-prediction module
    /// and verifies them in one forward of the main model (the default when the model has one;
    /// the output is the same as plain decoding's), `off` decodes token by token.
    #[arg(long, value_enum)]
    speculative: Option<SpeculativeArg>,
    /// Tokens drafted per step with --speculative mtp (one module drafts again from its own
    /// output past the first).
    #[arg(long, default_value_t = 1)]
    draft_tokens: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SpeculativeArg {
    Mtp,
    Off,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (default: read from stdin).
    #[arg(long)]
    prompt: Option<String>,
    /// Encode special tokens' strings in the prompt (`<｜end▁of▁sentence｜>`, role markers) as the
    /// control tokens they name, for a prompt that writes its own chat format. By default they
    /// are text, as in `chat` and `serve`'s messages.
    #[arg(long)]
    special_tokens: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A system message opening the conversation.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to score.
    #[arg(long)]
    file: PathBuf,
    /// Window length in tokens (default: the model's max_position_embeddings).
    #[arg(long)]
    context: Option<usize>,
    /// Print one JSON object: {"tokens":…, "nll":…, "ppl":…}.
    #[arg(long)]
    json: bool,
    /// Most bytes of --file read (a larger file or an endless source is refused, not read).
    #[arg(long, value_parser = parse_bytes, default_value = "256MiB")]
    max_file_bytes: usize,
}

/// Bytes of input allowed per token of context when reading a prompt or a chat line: far more
/// than any tokenizer's longest token, so only input that could never fit is refused.
const INPUT_BYTES_PER_TOKEN: usize = 64;

/// Reads at most `limit` bytes of UTF-8 text from `reader`; more is an error naming `what` and
/// the limit, raised before the excess is read.
fn read_bounded(reader: impl Read, limit: usize, what: &str, raise: &str) -> Result<String> {
    let mut bytes = Vec::new();
    reader.take(limit as u64 + 1).read_to_end(&mut bytes).with_context(|| format!("reading {what}"))?;
    if bytes.len() > limit {
        bail!("{what} is longer than {limit} bytes; {raise}");
    }
    String::from_utf8(bytes).with_context(|| format!("{what} is not UTF-8 text"))
}

fn main() {
    latent::bounded::install_panic_hook();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // More workers than cores only contend for them; thousands would take seconds to start
        // and memory for their stacks.
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let most = (8 * cores).max(64);
        if n > most {
            bail!("--threads {n} is more than this machine can use: it has {cores} cores; give at most {most}");
        }
        // candle's GEMM reads RAYON_NUM_THREADS; latent's kernels use the pool built here.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        pool = pool.num_threads(n);
    }
    // candle runs elementwise ops on a pool of its own whose workers spin for a while after each
    // op, while the matrix products run on the rayon pool: on a small machine the two fight for the
    // same cores.
    if matches!(cli.command, Command::Train(_)) && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Training is matrix-product bound, so elementwise ops stay on the calling thread (1.3x the
        // tokens/s on 2 cores; tools/bench_train.py).
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // Elsewhere its workers sleep as soon as an op is done (with `keep_freed_memory`, a 512-token
        // bf16 prefill on 2 cores went from 157 to 185 tokens/s).
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    keep_freed_memory();
    // The whole command runs on a worker of the pool: a parallel product called from there shares
    // its work with the other workers directly, where one called from outside the pool would hand
    // it over and sleep until it is done (two thread switches per product, about 35 us: a quarter
    // of a 2048 x 512 Q4_K product, and ~150 products per decoded token).
    let pool = pool.build().context("setting up the thread pool")?;
    pool.install(|| run_command(cli))
}

fn run_command(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => run_generate(args),
        Command::Chat(args) => run_chat(args),
        Command::Perplexity(args) => run_perplexity(args),
        Command::Inspect(args) => run_inspect(args),
        Command::Bench(args) => run_bench(args),
        Command::Serve(args) => run_serve(args),
        Command::BenchServe(args) => run_bench_serve(args),
        Command::Train(args) => run_train(args),
        Command::Plot { run } => {
            let log = run.join(latent::train::trainer::LOG_FILE);
            if !log.is_file() {
                bail!("{}: no training log here", log.display());
            }
            let history = latent::train::trainer::read_log(&log, usize::MAX)?;
            latent::plot::training_plots(&history, &run)?;
            eprintln!("latent: {} steps plotted into {}", history.len(), run.display());
            Ok(())
        }
        Command::Tokenizer(TokenizerCommand::Train { files, vocab_size, out }) => {
            let start = Instant::now();
            let tok = latent::tokenizer::train_bpe(&files, vocab_size, &out)?;
            eprintln!(
                "latent: trained a {}-id byte-level BPE in {:.1} s; wrote {}",
                tok.vocab_size(),
                start.elapsed().as_secs_f64(),
                out.join("tokenizer.json").display()
            );
            Ok(())
        }
    }
}

fn run_train(args: TrainArgs) -> Result<()> {
    let mut overrides = args.overrides.clone();
    if let Some(out) = &args.out {
        overrides.push(format!("run.out={:?}", out.to_string_lossy()));
    }
    let source = match (&args.run, &args.init) {
        (Some(run), _) => run.clone(),
        (None, Some(_)) => "preset:sft".to_string(),
        (None, None) => bail!("give a run file or preset:NAME (or --init DIR to fine-tune with preset:sft)"),
    };
    let (run, run_path) = latent::train::RunFile::load(&source, &overrides)?;
    let out = run.run.out.clone();
    let opts = latent::train::TrainOptions { init: args.init.clone(), sft: args.sft.clone(), resume: args.resume };
    let mut trainer = latent::train::Trainer::new(run, &run_path, &opts)?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{spinner} train [{bar:30}] {pos}/{len} steps  {msg}  {elapsed_precise} (ETA {eta_precise})",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // Without a terminal the bar is hidden; status lines then go to stderr as plain text.
    let say = |line: String| if bar.is_hidden() { eprintln!("{line}") } else { bar.println(line) };
    let mut last_val: Option<f64> = None;
    trainer.run(|event| match event {
        latent::train::trainer::Event::Started { start_step, steps, params, train_samples, valid_samples } => {
            say(format!(
                "latent: {params} parameters; {train_samples} training and {valid_samples} validation sequences; \
                 steps {start_step}..{steps}; logging to {}",
                out.join(latent::train::trainer::LOG_FILE).display()
            ));
            bar.set_length(steps as u64);
            bar.set_position(start_step as u64);
            bar.reset_eta();
        }
        latent::train::trainer::Event::Step(log) => {
            if let Some(v) = log.val_loss {
                last_val = Some(v);
                say(format!(
                    "step {:>6}  loss {:.4}  val {:.4} (ppl {:.2})  lr {:.2e}  MaxVio {:.3}  {:.0} tok/s",
                    log.step,
                    log.lm_loss,
                    v,
                    v.exp(),
                    log.lr,
                    log.max_vio_mean,
                    log.tokens_per_s
                ));
            }
            let val = last_val.map(|v| format!(" val {v:.3}")).unwrap_or_default();
            bar.set_message(format!("loss {:.3}{val}  {:.0} tok/s", log.lm_loss, log.tokens_per_s));
            bar.set_position(log.step as u64);
        }
        latent::train::trainer::Event::Saved(dir) => say(format!("saved {}", dir.display())),
    })?;
    bar.finish();
    eprintln!("latent: plots in {} (loss.png, expert_load.png)", out.display());
    Ok(())
}

/// The model `args` names, or the built-in `demo` when none is given.
fn model_dir(args: &ModelArgs, demo: Demo) -> Result<PathBuf> {
    match &args.model {
        Some(dir) => Ok(dir.clone()),
        None => {
            let dir = default_model::dir(demo)?;
            eprintln!("latent: no --model given, using {} ({})", demo.describe(), dir.display());
            Ok(dir)
        }
    }
}

/// The kind of latent cache `--kv-cache` asks of `model` (checked against its sizes).
fn cache_kind(args: &ModelArgs, model: &Model) -> Result<CacheKind> {
    match args.kv_cache {
        KvCacheArg::Int8 => {
            model.new_cache_of(CacheKind::Int8).context("--kv-cache int8")?;
            Ok(CacheKind::Int8)
        }
        KvCacheArg::Expanded => {
            let dtype = model.cache_kind().dtype().unwrap_or(DType::BF16);
            if model.config().dsa.is_some() {
                bail!(
                    "--kv-cache expanded cannot serve sparse attention (DeepSeek-V3.2): the indexer selects latent rows; \
                     use --kv-cache auto or int8"
                );
            }
            if !model.takes_expanded_cache() {
                bail!("--kv-cache expanded needs kv_b_proj stored in bf16 or f32 (not a quantized model)");
            }
            Ok(CacheKind::Expanded(dtype))
        }
        KvCacheArg::Auto => Ok(model.cache_kind()),
    }
}

fn load(args: &ModelArgs, demo: Demo) -> Result<(Model, Tokenizer)> {
    let dir = model_dir(args, demo)?;
    let start = Instant::now();
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {bar:40} {pos}/{len} layers  {per_sec}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let dtype = args.dtype.map(DType::from);
    let quant = args.quant.map(latent::weights::Quant::from);
    let loaded = Model::load_quantized(&dir, dtype, quant, &Device::Cpu, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let (mut model, report) = loaded.with_context(|| format!("loading the model in {}", dir.display()))?;
    if let Some(topk) = args.index_topk {
        model.set_index_topk(topk)?;
    }
    cache_kind(args, &model)?;
    let tokenizer = if latent::weights::gguf::is_gguf(&dir) {
        let file = latent::weights::gguf::GgufFile::open(&dir)?;
        latent::weights::gguf_model::tokenizer(&file)
            .with_context(|| format!("reading the tokenizer in {}", dir.display()))?
    } else {
        Tokenizer::load(&dir, Some(model.config()))
            .with_context(|| format!("loading the tokenizer in {}", dir.display()))?
    };
    let quantized = match model.quant_summary() {
        Some(kinds) => format!(", linear weights in {kinds}: {} in memory", bytes_str(model.weight_bytes())),
        None => String::new(),
    };
    eprintln!(
        "latent: loaded {} ({}, {:?}{quantized}) in {:.2} s",
        dir.display(),
        bytes_str(report.stored_bytes),
        model.dtype(),
        start.elapsed().as_secs_f64()
    );
    if model.mtp_depth() > 0 {
        eprintln!(
            "latent: {} multi-token-prediction module(s) loaded: they draft tokens for speculative decoding",
            model.mtp_depth()
        );
    } else if !report.skipped_mtp.is_empty() {
        eprintln!(
            "latent: skipped {} multi-token-prediction tensors (the checkpoint holds no whole module)",
            report.skipped_mtp.len()
        );
    }
    if !report.unused.is_empty() {
        let shown: Vec<&str> = report.unused.iter().take(5).map(String::as_str).collect();
        eprintln!(
            "latent: warning: {} tensors in the checkpoint are not used: {}",
            report.unused.len(),
            shown.join(", ")
        );
    }
    Ok((model, tokenizer))
}

fn request(args: &SamplingArgs, model: &Model) -> Result<Request> {
    let seed = args.seed.unwrap_or_else(|| {
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        eprintln!("latent: --seed {seed}");
        seed
    });
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repeat_penalty: args.repeat_penalty,
        repeat_last_n: args.repeat_last_n,
        seed,
    }
    .validate()?;
    let draft_tokens = match args.speculative {
        Some(SpeculativeArg::Off) => 0,
        Some(SpeculativeArg::Mtp) if model.mtp_depth() == 0 => {
            bail!("--speculative mtp: the model has no multi-token-prediction module (num_nextn_predict_layers)")
        }
        _ if args.draft_tokens == 0 => {
            bail!("--draft-tokens must be at least 1 (--speculative off turns drafting off)")
        }
        _ if model.mtp_depth() > 0 => args.draft_tokens,
        _ => 0,
    };
    Ok(Request { max_tokens: args.max_tokens, sampling, stop: args.stop.clone(), draft_tokens })
}

fn print_piece(piece: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. `| head`) must not panic; the generation simply goes unseen.
    let _ = out.write_all(piece.as_bytes()).and_then(|_| out.flush());
}

fn report_speed(g: &Generation) {
    let reason = match &g.stop {
        StopReason::Eos => "end of sequence".to_string(),
        StopReason::MaxTokens => "--max-tokens".to_string(),
        StopReason::StopString(s) => format!("stop string {s:?}"),
        StopReason::ContextFull => "context full".to_string(),
    };
    eprintln!(
        "\nlatent: prompt {} tokens in {:.3} s ({:.1} tokens/s); generated {} tokens in {:.3} s ({:.1} tokens/s); stopped by {reason}",
        g.n_prompt,
        g.prompt_secs,
        g.prompt_tok_s(),
        g.tokens.len(),
        g.decode_secs,
        g.decode_tok_s()
    );
    if let Some(s) = &g.speculation {
        eprintln!(
            "latent: speculative decoding (MTP): {} of {} drafted tokens accepted ({:.1}%), {} verify steps",
            s.accepted,
            s.drafted,
            100.0 * s.acceptance(),
            s.steps
        );
    }
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    if args.prompt.is_none() && std::io::stdin().is_terminal() {
        bail!("give the prompt with --prompt TEXT or on stdin (e.g. echo TEXT | latent generate)");
    }
    let (model, tokenizer) = load(&args.model, Demo::Base)?;
    let request = request(&args.sampling, &model)?;
    let limit = model.config().max_position_embeddings.saturating_mul(INPUT_BYTES_PER_TOKEN);
    let prompt = match args.prompt {
        Some(p) => p,
        None => read_bounded(
            std::io::stdin(),
            limit,
            "the prompt on stdin",
            &format!("the model's context is {} tokens", model.config().max_position_embeddings),
        )?,
    };
    let ids = if args.special_tokens { tokenizer.encode(&prompt)? } else { tokenizer.encode_as_text(&prompt)? };
    let mut cache = model.new_cache_of(cache_kind(&args.model, &model)?)?;
    let generation = generate(&model, &tokenizer, &mut cache, &ids, &request, print_piece)?;
    report_speed(&generation);
    Ok(())
}

fn run_chat(args: ChatArgs) -> Result<()> {
    let (model, tokenizer) = load(&args.model, Demo::Chat)?;
    let request = request(&args.sampling, &model)?;
    let cache = model.new_cache_of(cache_kind(&args.model, &model)?)?;
    let mut session = ChatSession::with_cache(&model, &tokenizer, args.system.as_deref(), cache)?;
    eprintln!("latent: chat; an empty line or end of input quits");
    let limit = model.config().max_position_embeddings.saturating_mul(INPUT_BYTES_PER_TOKEN);
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    loop {
        eprint!("> ");
        // One line, read no further than the context could hold.
        let mut bytes = Vec::new();
        (&mut input).take(limit as u64 + 1).read_until(b'\n', &mut bytes).context("reading from stdin")?;
        if bytes.is_empty() {
            break;
        }
        if bytes.len() > limit && !bytes.ends_with(b"\n") {
            bail!(
                "a chat line is longer than {limit} bytes; the model's context is {} tokens",
                model.config().max_position_embeddings
            );
        }
        let line = String::from_utf8(bytes).context("a chat line is not UTF-8 text")?;
        if line.trim().is_empty() {
            break;
        }
        let generation = session.reply(line.trim(), &request, print_piece)?;
        println!();
        let accepted = match &generation.speculation {
            Some(s) => format!(", {:.0}% of drafts accepted", 100.0 * s.acceptance()),
            None => String::new(),
        };
        eprintln!(
            "[{} tokens, {:.1} tokens/s, {} cached{accepted}]",
            generation.tokens.len(),
            generation.decode_tok_s(),
            session.cached_tokens()
        );
    }
    Ok(())
}

fn run_perplexity(args: PerplexityArgs) -> Result<()> {
    let file = std::fs::File::open(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let what = args.file.display().to_string();
    let text = read_bounded(file, args.max_file_bytes, &what, "raise --max-file-bytes to read it")?;
    let (model, tokenizer) = load(&args.model, Demo::Base)?;
    let tokens = tokenizer.encode(&text)?;
    let context = args.context.unwrap_or(model.config().max_position_embeddings);
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} tokens  {per_sec}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let kind = cache_kind(&args.model, &model)?;
    let result = perplexity_with(&model, &tokens, context, kind, DEFAULT_PREFILL_CHUNK, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!("tokens {}  nll {:.6} nats  perplexity {:.4}", result.tokens, result.nll, result.ppl);
    }
    Ok(())
}

fn run_budget_study(model: &Model, args: &BenchArgs, budget: usize) -> Result<()> {
    let bar = ProgressBar::new_spinner();
    let rows =
        bench::budget_study(model, budget, args.context, &args.batch, args.decode_tokens, args.repeats, |c, b| {
            bar.set_message(format!("{c}: {b} sequences of {} tokens", args.context));
            bar.tick();
        })?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::json!({"budget_bytes": budget, "context": args.context, "caches": rows}));
    } else {
        let gib = budget as f64 / (1u64 << 30) as f64;
        println!("{gib:.2} GiB of cache each, sequences of {} tokens", args.context);
        println!(
            "{:<15} {:>11} {:>12} {:>9}  tokens/s at B sequences",
            "cache", "bytes/token", "tokens held", "max seqs"
        );
        let base = rows.first().map_or(1, |r| r.tokens.max(1)) as f64;
        for r in &rows {
            let figures: Vec<String> = r.tok_s.iter().map(|(b, t)| format!("B={b}: {t:.1}")).collect();
            println!(
                "{:<15} {:>11} {:>12} {:>9}  {}   ({:.2}x the first's tokens)",
                r.cache,
                r.bytes_per_token,
                r.tokens,
                r.max_sequences,
                figures.join(", "),
                r.tokens as f64 / base
            );
        }
    }
    if let Some(path) = &args.plot {
        let title = format!("decode tok/s, {} MiB cache each", budget >> 20);
        bench::plot_budget(&rows, &title, path)?;
    }
    Ok(())
}

fn run_bench_serve(args: BenchServeArgs) -> Result<()> {
    use latent::bench_serve::{plot, read_run, run, LoadConfig};
    if let (true, Some(path)) = (args.plot_only, &args.plot) {
        let all = args.compare.iter().map(|f| read_run(f)).collect::<latent::Result<Vec<_>>>()?;
        plot(&all, path)?;
        eprintln!("latent: plot in {}", path.display());
        return Ok(());
    }
    let extra: serde_json::Value = serde_json::from_str(&args.extra).context("--extra must be a JSON object")?;
    if !(extra.is_object() && args.seconds > 0.0 && args.seconds.is_finite()) {
        bail!("--extra must be a JSON object and --seconds a positive number");
    }
    let cfg = LoadConfig {
        addr: args.addr.clone(),
        model: args.model.clone(),
        api_key: args.api_key.clone(),
        concurrency: args.concurrency.clone(),
        rates: args.rate.clone(),
        prompt_words: args.prompt_words,
        max_tokens: args.max_tokens.max(1),
        duration: std::time::Duration::from_secs_f64(args.seconds),
        max_requests: args.max_requests.max(1),
        extra,
    };
    let levels = if args.rate.is_empty() { args.concurrency.len() } else { args.rate.len() };
    let bar = ProgressBar::new(levels as u64).with_style(
        ProgressStyle::with_template("level {pos}/{len} {bar:30} {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let reports = run(&cfg, |level, done| {
        bar.set_position(level as u64);
        match cfg.rates.get(level) {
            Some(rate) => bar.set_message(format!("{rate} requests/s, {done} done")),
            None => bar.set_message(format!("{} clients, {done} requests", cfg.concurrency[level])),
        }
    })?;
    bar.finish_and_clear();
    let first = if cfg.rates.is_empty() { "clients" } else { "rate/s" };
    println!(
        "{:>7} {:>9} {:>7} {:>10} {:>8} {:>9} {:>9} {:>8} {:>8}",
        first, "requests", "failed", "out tok/s", "req/s", "ttft p50", "ttft p99", "itl p50", "itl p99"
    );
    for r in &reports {
        let level = r.rate.map_or(r.concurrency.to_string(), |x| format!("{x}"));
        println!(
            "{:>7} {:>9} {:>7} {:>10.1} {:>8.2} {:>7.0}ms {:>7.0}ms {:>6.1}ms {:>6.1}ms",
            level,
            r.requests,
            r.failed,
            r.output_tok_s,
            r.requests_s,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.itl_p50_ms,
            r.itl_p99_ms
        );
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&serde_json::json!({"label": args.label, "levels": reports}))?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let mut all = vec![(args.label.clone(), reports)];
        for file in &args.compare {
            all.push(read_run(file)?);
        }
        plot(&all, path)?;
        eprintln!("latent: plot in {}", path.display());
    }
    Ok(())
}

fn run_serve(args: ServeArgs) -> Result<()> {
    use latent::engine::{Engine, EngineConfig};
    use latent::server::{serve, ServerConfig};
    let dir = model_dir(&args.model, Demo::Chat)?;
    let name = args.served_model_name.clone().unwrap_or_else(|| match &args.model.model {
        None => Demo::Chat.served_name().into(),
        Some(_) => dir
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
            .unwrap_or("latent".into()),
    });
    let config = ServerConfig {
        host: args.host.clone(),
        port: args.port,
        api_key: args.api_key.clone(),
        served_model_name: name.clone(),
        max_body_bytes: args.max_body,
        shutdown_grace: std::time::Duration::from_secs(args.shutdown_grace),
        ..ServerConfig::default()
    };
    let engine_config = EngineConfig {
        max_seqs: args.max_seqs.max(1),
        max_batch_tokens: args.max_batch_tokens.max(1),
        kv_memory: args.kv_memory,
        max_waiting: args.max_waiting.max(1),
        ..EngineConfig::default()
    };
    let model_args = args.model;
    let (speculative, draft_tokens) = (args.speculative, args.draft_tokens);
    if draft_tokens == 0 {
        bail!("--draft-tokens must be at least 1 (--speculative off turns drafting off)");
    }
    let load = move || -> latent::Result<Engine> {
        let (model, tokenizer) =
            load(&model_args, Demo::Chat).map_err(|e| latent::Error::InvalidArgument(format!("{e:#}")))?;
        let kind = cache_kind(&model_args, &model).map_err(|e| latent::Error::InvalidArgument(format!("{e:#}")))?;
        let draft_tokens = match (speculative, model.mtp_depth()) {
            (Some(SpeculativeArg::Off), _) => 0,
            (Some(SpeculativeArg::Mtp), 0) => {
                return Err(latent::Error::InvalidArgument(
                    "--speculative mtp: the model has no multi-token-prediction module".into(),
                ))
            }
            (_, 0) => 0,
            _ => draft_tokens,
        };
        let engine = Engine::start(
            model,
            std::sync::Arc::new(tokenizer),
            EngineConfig { cache_kind: Some(kind), draft_tokens, ..engine_config },
        )?;
        eprintln!("latent: ready; serving `{name}`");
        Ok(engine)
    };
    serve(config, load, |addr| eprintln!("latent: listening on http://{addr}"))
}

fn run_bench(args: BenchArgs) -> Result<()> {
    let (model, _) = load(&args.model, Demo::Base)?;
    if let Some(budget) = args.budget {
        return run_budget_study(&model, &args, budget);
    }
    let config = BenchConfig {
        prompt_len: args.prompt_len,
        depths: args.depths,
        decode_tokens: args.decode_tokens,
        repeats: args.repeats,
        cache_kind: Some(cache_kind(&args.model, &model)?),
        batch_sizes: args.batch.clone(),
        batch_depth: args.batch_depth,
    };
    let report = bench::run(&model, &config)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!("prefill     {:.1} tokens/s ({} tokens)", report.prefill_tok_s, config.prompt_len);
    for (depth, tok_s) in &report.decode_tok_s {
        let bytes = report.decode_bytes_per_token[depth];
        let share = report.roofline_share[depth];
        let with_attention = match (report.roofline_with_attention_share.get(depth), report.attention_peak_gmac_s) {
            (Some(s), Some(peak)) if *depth > 0 => {
                let macs = report.attention_macs_per_token[depth] as f64;
                let macs = if macs >= 1e9 { format!("{:.2} G", macs / 1e9) } else { format!("{:.1} M", macs / 1e6) };
                format!("; {:.0}% counting the attention's {macs} multiply-adds at {peak:.0} GMAC/s", 100.0 * s)
            }
            _ => String::new(),
        };
        println!(
            "decode @{depth:<6} {tok_s:.1} tokens/s, {} read per token, {:.0}% of the roofline{with_attention}",
            bytes_str(bytes),
            100.0 * share
        );
    }
    let single = report.batch_decode_tok_s.get(&1).copied();
    for (b, tok_s) in &report.batch_decode_tok_s {
        let gain = single.map(|s| format!(", {:.2}x one sequence", tok_s / s)).unwrap_or_default();
        let bytes = report.batch_step_bytes.get(b).copied().unwrap_or(0);
        let share = report.batch_roofline_share.get(b).copied().unwrap_or(f64::NAN);
        println!(
            "batch {b:<4}  {tok_s:.1} tokens/s in all, {:.1} per sequence (depth {}{gain}); {} read per step, {:.0}% of the roofline",
            tok_s / *b as f64,
            report.batch_depth,
            bytes_str(bytes),
            100.0 * share
        );
    }
    if let Some(s) = &report.speculative {
        println!(
            "speculative (MTP) at depth 0: plain step {:.2} ms, verify step of 2 tokens {:.2} ms ({:.2}x), draft step {:.2} ms \
             ({:.2}x); with one draft accepted 85% of the time: {:.2}x plain decoding",
            s.plain_step_ms,
            s.verify_step_ms,
            s.verify_step_ms / s.plain_step_ms,
            s.draft_step_ms,
            s.draft_step_ms / s.plain_step_ms,
            s.speedup(0.85)
        );
    }
    println!("bandwidth   {:.1} GB/s measured ({} threads)", report.memory_bandwidth_gb_s, report.threads);
    println!("cpu         {}", report.cpu);
    println!(
        "memory      peak RSS {}, weights {}, KV cache {} per token",
        bytes_str(report.peak_rss_bytes as usize),
        bytes_str(report.weight_bytes),
        bytes_str(report.kv_bytes_per_token)
    );
    Ok(())
}

fn run_inspect(args: ModelArgs) -> Result<()> {
    let dir = model_dir(&args, Demo::Base)?;
    if latent::weights::gguf::is_gguf(&dir) {
        let file = latent::weights::gguf::GgufFile::open(&dir)?;
        let config = latent::weights::gguf_model::config(&file)?;
        let stored: usize = file.tensors.iter().map(|t| t.len).sum();
        let dtype = args.dtype.map_or(DType::F32, DType::from);
        let report = Report {
            config: &config,
            source: dir.display().to_string(),
            weights: Some((stored, 1)),
            dtype_bytes: dtype.size_in_bytes(),
            dtype_name: format!("{dtype:?}"),
        };
        println!("{report}");
        return Ok(());
    }
    let config_path = dir.join("config.json");
    let config = Config::from_file(&config_path)?;
    let (weights, dtype) = if Weights::present(&dir) {
        let w = Weights::open(&dir, args.dtype.map(DType::from), &Device::Cpu)?;
        (Some((w.stored_bytes(), w.files().len())), w.dtype())
    } else {
        (None, args.dtype.map_or(DType::BF16, DType::from))
    };
    let report = Report {
        config: &config,
        source: dir.display().to_string(),
        weights,
        dtype_bytes: dtype.size_in_bytes(),
        dtype_name: format!("{dtype:?}"),
    };
    println!("{report}");
    Ok(())
}

/// Has the allocator keep freed memory for reuse instead of giving it back to the system.
///
/// Training steps and prefills allocate and free activations of a few to tens of MiB per op.
/// glibc serves blocks above its mmap threshold with fresh mappings and unmaps them when freed,
/// so every op would page-fault and have the kernel zero each 4 KiB it touches again: 7% of a
/// 512-token bf16 prefill on 2 cores. Kept in the heap, they are reused warm. Peak memory stays
/// that of the largest working set (about 1% more RSS in `latent bench`).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters (under the allocator's locks), and
    // both values are valid for these options.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
