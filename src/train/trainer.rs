//! The training loop: batches, losses, backward, clipping, AdamW, the V3 bias update, logs,
//! validation, plots and checkpoints.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::train::balance::{max_vio, update_bias, BalanceWeights};
use crate::train::checkpoint::{self, Snapshot, TokenizerFiles, TrainerState};
use crate::train::data::{is_protected, sft_examples, tokenize_files, Order, Samples};
use crate::train::loss::{batch_losses, Batch, LossSettings};
use crate::train::optim::{clip_grad_norm, AdamW, AdamWStep};
use crate::train::params::{ParamKind, Params};
use crate::train::run::RunFile;

/// How a run starts.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Start from this checkpoint's weights, config and tokenizer (fine-tuning).
    pub init: Option<PathBuf>,
    /// Fine-tune on these chat conversations (JSONL) instead of plain text.
    pub sft: Option<PathBuf>,
    /// Continue from `out/latest`.
    pub resume: bool,
}

/// One line of `train_log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    /// Optimizer steps completed.
    pub step: usize,
    /// Everything differentiated, averaged over the micro-batches.
    pub loss: f64,
    pub lm_loss: f64,
    pub mtp_loss: Option<f64>,
    pub expert_balance_loss: f64,
    pub device_balance_loss: f64,
    pub comm_balance_loss: f64,
    pub seq_balance_loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    /// Tokens routed to each expert, per MoE layer (index in `moe_layers`).
    pub moe_layers: Vec<usize>,
    pub expert_load: Vec<Vec<usize>>,
    /// MaxVio per MoE layer, and its mean.
    pub max_vio: Vec<f64>,
    pub max_vio_mean: f64,
    /// Share of token-expert assignments dropped by the capacity.
    pub dropped_share: f64,
    /// Validation loss, on steps that evaluate.
    pub val_loss: Option<f64>,
}

/// What the loop reports as it goes.
pub enum Event<'a> {
    Started { start_step: usize, steps: usize, params: usize, train_samples: usize, valid_samples: usize },
    Step(&'a StepLog),
    Saved(&'a Path),
}

/// A training run in progress.
pub struct Trainer {
    run: RunFile,
    cfg: Config,
    config_json: serde_json::Value,
    params: Params,
    model: Model,
    master: Vec<Vec<f32>>,
    decay: Vec<f64>,
    opt: AdamW,
    /// The tokenizer files every checkpoint carries, read when the run starts.
    tokenizer_files: TokenizerFiles,
    train: Samples,
    valid: Samples,
    order: Order,
    step: usize,
    /// Steps skipped in a row for a non-finite loss or gradient.
    bad_steps: usize,
    settings: LossSettings,
    gamma: f64,
    protected_share: f64,
    history: Vec<StepLog>,
    out: PathBuf,
}

impl Trainer {
    /// Prepares the run: tokenizer, data, parameters (fresh, from `--init`, or resumed).
    pub fn new(run: RunFile, run_path: &Path, opts: &TrainOptions) -> Result<Trainer> {
        let out = run.run.out.clone();
        let resume_dir = if opts.resume { Some(checkpoint::latest(&out)?) } else { None };
        let (cfg, config_json, tokenizer_dir) = match (&resume_dir, &opts.init) {
            (Some(dir), _) | (None, Some(dir)) => {
                let path = dir.join("config.json");
                let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                let json: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| Error::config(&path, "config.json", format!("not JSON: {e}")))?;
                (Config::from_json(&text, &path)?, json, dir.clone())
            }
            (None, None) => {
                if run.model.is_empty() {
                    return Err(Error::config(run_path, "model", "the run file has no [model] section"));
                }
                let tokenizer_dir = run.data.tokenizer.clone();
                let tok = Tokenizer::load(&tokenizer_dir, None)?;
                let json = run.config_json(tok.bos_id(), tok.eos_ids().first().copied())?;
                let text = serde_json::to_string(&json).map_err(|e| Error::InvalidArgument(e.to_string()))?;
                (Config::from_json(&text, run_path)?, json, tokenizer_dir)
            }
        };
        if cfg.dsa.is_some() {
            return Err(Error::config(
                run_path,
                "model.model_type",
                "deepseek_v32 cannot be trained here: its sparse attention's indexer learns from its own loss, \
                 which latent does not implement; train a deepseek_v3 model instead",
            ));
        }
        // The tokenizer trained with is built from the very bytes every checkpoint will carry.
        let tokenizer_files = TokenizerFiles::read(&tokenizer_dir)?;
        let tokenizer = Tokenizer::from_parts(
            tokenizer_files.get("tokenizer.json").unwrap_or_default(),
            &tokenizer_dir.join("tokenizer.json"),
            &tokenizer_dir.join("tokenizer_config.json"),
            Some(&cfg),
        )?;
        if tokenizer.vocab_size() > cfg.vocab_size {
            return Err(Error::config(
                run_path,
                "model.vocab_size",
                format!(
                    "is {}, but the tokenizer in {} has {} ids",
                    cfg.vocab_size,
                    tokenizer_dir.display(),
                    tokenizer.vocab_size()
                ),
            ));
        }

        let seq_len = run.data.seq_len;
        if seq_len > cfg.max_position_embeddings {
            return Err(Error::config(
                run_path,
                "data.seq_len",
                format!("is {seq_len}, above the model's max_position_embeddings {}", cfg.max_position_embeddings),
            ));
        }
        check_memory(&cfg, &run, run_path)?;
        let (train, valid) = match &opts.sft {
            Some(path) => {
                Samples::examples(sft_examples(path, &tokenizer, seq_len)?).split_tail(run.data.valid_fraction)
            }
            None => {
                if run.data.train.is_empty() {
                    return Err(Error::config(run_path, "data.train", "lists no training files"));
                }
                let bos = if tokenizer.adds_bos() { tokenizer.bos_id() } else { None };
                let stream = Samples::stream(&tokenize_files(&run.data.train, &tokenizer)?, seq_len, bos);
                if run.data.valid.is_empty() {
                    stream.split_tail(run.data.valid_fraction)
                } else {
                    (stream, Samples::stream(&tokenize_files(&run.data.valid, &tokenizer)?, seq_len, bos))
                }
            }
        };
        if train.is_empty() {
            return Err(Error::config(
                run_path,
                "data",
                format!("the training data holds no sequence of {} tokens", seq_len + 1),
            ));
        }

        let device = Device::Cpu;
        let (params, master, opt, step) = match &resume_dir {
            Some(dir) => {
                let r = checkpoint::restore(dir, &cfg)?;
                (r.params, r.master, r.opt, r.state.step)
            }
            None => {
                let params = match &opts.init {
                    Some(dir) => Params::load(&cfg, dir, &device)?,
                    None => Params::init(&cfg, run.run.seed, &device)?,
                };
                let master = params.values()?;
                let opt = AdamW::new(&params.specs.iter().map(|s| s.numel()).collect::<Vec<_>>());
                (params, master, opt, 0)
            }
        };
        let decay = params
            .specs
            .iter()
            .map(|s| if s.kind == ParamKind::Matrix { run.optim.weight_decay } else { 0.0 })
            .collect();
        let model = params.build_model(&cfg)?;

        let v3_style = !params.router_bias.is_empty();
        let b = &run.balance;
        let v2 = |x: Option<f64>, d: f64| x.unwrap_or(if v3_style { 0.0 } else { d });
        let settings = LossSettings {
            balance: BalanceWeights {
                expert: v2(b.alpha1, 0.003),
                device: v2(b.alpha2, 0.05),
                comm: v2(b.alpha3, 0.02),
                sequence: b.seq_alpha.unwrap_or(if v3_style { 1e-4 } else { 0.0 }),
            },
            capacity_factor: b.capacity_factor,
            mtp_lambda: run.mtp.lambda,
        };
        let gamma = b.gamma.unwrap_or(if v3_style { 1e-3 } else { 0.0 });
        let order = Order::new(train.len(), run.run.seed);
        let history = if opts.resume { read_log(&out.join(LOG_FILE), step)? } else { Vec::new() };
        Ok(Trainer {
            protected_share: b.protected_share.unwrap_or(0.1),
            run,
            cfg,
            config_json,
            params,
            model,
            master,
            decay,
            opt,
            tokenizer_files,
            train,
            valid,
            order,
            step,
            bad_steps: 0,
            settings,
            gamma,
            history,
            out,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The trainable parameters.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Optimizer steps completed.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// Every step logged so far.
    pub fn history(&self) -> &[StepLog] {
        &self.history
    }

    /// Runs to `schedule.steps`, validating, plotting and saving on the way.
    pub fn run(&mut self, on_event: impl FnMut(Event<'_>)) -> Result<()> {
        self.run_until(self.run.schedule.steps, on_event)
    }

    /// Like `run`, stopping after step `stop` (at most `schedule.steps`), as an interrupted run would.
    pub fn run_until(&mut self, stop: usize, mut on_event: impl FnMut(Event<'_>)) -> Result<()> {
        std::fs::create_dir_all(&self.out).map_err(|e| Error::io(&self.out, e))?;
        let log_path = self.out.join(LOG_FILE);
        rewrite_log(&log_path, &self.history)?;
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log_path)
            .map_err(|e| Error::io(&log_path, e))?;
        let steps = self.run.schedule.steps;
        on_event(Event::Started {
            start_step: self.step,
            steps,
            params: self.params.numel(),
            train_samples: self.train.len(),
            valid_samples: self.valid.len(),
        });
        let (eval_every, save_every) = (self.run.run.eval_every, self.run.run.save_every);
        while self.step < stop.min(steps) {
            let stepped = self.train_step()?;
            let last = self.step == steps;
            if let Some(mut entry) = stepped {
                if last || (eval_every > 0 && self.step.is_multiple_of(eval_every)) {
                    entry.val_loss = self.validate()?;
                }
                let line = serde_json::to_string(&entry).map_err(|e| Error::InvalidArgument(e.to_string()))?;
                writeln!(log, "{line}").map_err(|e| Error::io(&log_path, e))?;
                on_event(Event::Step(&entry));
                let evaluated = entry.val_loss.is_some();
                self.history.push(entry);
                if evaluated {
                    crate::plot::training_plots(&self.history, &self.out)?;
                }
            }
            if last || (save_every > 0 && self.step.is_multiple_of(save_every)) {
                let dir = self.save()?;
                on_event(Event::Saved(&dir));
            }
        }
        Ok(())
    }

    /// One optimizer step over `accumulation` micro-batches; `None` when it was skipped for a
    /// non-finite loss or gradient (see `optim.max_bad_steps`).
    pub fn train_step(&mut self) -> Result<Option<StepLog>> {
        let started = Instant::now();
        let (bsz, accum) = (self.run.data.batch_size, self.run.optim.accumulation);
        let lr = self.run.schedule.lr_at(self.run.optim.lr, self.step);
        let mut grads: Vec<Vec<f32>> = self.params.specs.iter().map(|s| vec![0.0; s.numel()]).collect();
        let mut sums = [0.0f64; 6]; // loss, lm, expert, device, comm, sequence
        let mut mtp_sum: Option<f64> = None;
        let mut load: Vec<(usize, Vec<usize>)> = Vec::new();
        let (mut dropped, mut assignments, mut tokens) = (0usize, 0usize, 0usize);
        let drop_tokens = self.settings.capacity_factor.is_some();
        for micro in 0..accum {
            let first = (self.step * accum + micro) * bsz;
            let draws: Vec<usize> = (first..first + bsz).collect();
            let picks: Vec<usize> = draws.iter().map(|&g| self.order.sample(g)).collect();
            let batch = Batch {
                samples: picks.iter().map(|&i| self.train.get(i).0).collect(),
                masks: picks.iter().map(|&i| self.train.get(i).1).collect(),
                protected: draws
                    .iter()
                    .map(|&g| drop_tokens && is_protected(self.run.run.seed, g, self.protected_share))
                    .collect(),
            };
            tokens += batch.samples.iter().map(|s| s.len() - 1).sum::<usize>();
            let losses = batch_losses(&self.model, &batch, self.settings)?;
            let scaled = (&losses.total / accum as f64)?;
            let store = scaled.backward()?;
            for (g, var) in grads.iter_mut().zip(&self.params.vars) {
                if let Some(grad) = store.get(var.as_tensor()) {
                    let values: Vec<f32> = grad.flatten_all()?.to_vec1()?;
                    g.iter_mut().zip(values).for_each(|(a, b)| *a += b);
                }
            }
            sums[0] += losses.total.to_scalar::<f32>()? as f64 / accum as f64;
            sums[1] += losses.lm / accum as f64;
            sums[2] += losses.expert / accum as f64;
            sums[3] += losses.device / accum as f64;
            sums[4] += losses.comm / accum as f64;
            sums[5] += losses.sequence / accum as f64;
            if let Some(m) = losses.mtp {
                *mtp_sum.get_or_insert(0.0) += m / accum as f64;
            }
            if load.is_empty() {
                load = losses.load;
            } else {
                for ((_, acc), (_, l)) in load.iter_mut().zip(losses.load) {
                    acc.iter_mut().zip(l).for_each(|(a, b)| *a += b);
                }
            }
            dropped += losses.dropped;
            assignments += losses.assignments;
        }
        let finite = sums.iter().chain(mtp_sum.iter()).all(|x| x.is_finite())
            && grads.iter().all(|g| g.iter().all(|v| v.is_finite()));
        if !finite {
            // Skipped: the batch is consumed, nothing else changes.
            self.bad_steps += 1;
            let most = self.run.optim.max_bad_steps;
            if self.bad_steps > most {
                return Err(Error::InvalidArgument(format!(
                    "stopping at step {}: {} steps in a row had a non-finite loss or gradient (lr {lr:.3e}; \
                     optim.max_bad_steps is {most}); lower optim.lr or raise schedule.warmup_steps. The last \
                     checkpoint saved is intact",
                    self.step + 1,
                    self.bad_steps
                )));
            }
            eprintln!(
                "latent: warning: step {} skipped: its loss or gradient is not finite (lr {lr:.3e}); parameters and \
                 optimizer state unchanged ({} in a row, at most {most})",
                self.step + 1,
                self.bad_steps
            );
            self.step += 1;
            return Ok(None);
        }
        self.bad_steps = 0;
        let grad_norm = clip_grad_norm(&mut grads, self.run.optim.grad_clip);
        let o = &self.run.optim;
        self.opt.step(
            &mut self.master,
            &grads,
            &self.decay,
            AdamWStep { lr, beta1: o.beta1, beta2: o.beta2, eps: o.eps },
        );
        self.params.set_values(&self.master)?;
        if self.gamma > 0.0 {
            for (layer, moe) in self.model.moe_layers_mut() {
                if let (Some(bias), Some((_, l))) = (moe.correction_bias(), load.iter().find(|(i, _)| *i == layer)) {
                    let mut bias = bias.to_vec();
                    update_bias(&mut bias, l, self.gamma);
                    moe.set_correction_bias(bias);
                }
            }
        }
        self.step += 1;
        let elapsed = started.elapsed().as_secs_f64();
        let max_vios: Vec<f64> = load.iter().map(|(_, l)| max_vio(l)).collect();
        let prev_elapsed = self.history.last().map_or(0.0, |h| h.elapsed_s);
        Ok(Some(StepLog {
            step: self.step,
            loss: sums[0],
            lm_loss: sums[1],
            mtp_loss: mtp_sum,
            expert_balance_loss: sums[2],
            device_balance_loss: sums[3],
            comm_balance_loss: sums[4],
            seq_balance_loss: sums[5],
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / elapsed.max(1e-9),
            elapsed_s: prev_elapsed + elapsed,
            moe_layers: load.iter().map(|(i, _)| *i).collect(),
            max_vio_mean: if max_vios.is_empty() { 0.0 } else { max_vios.iter().sum::<f64>() / max_vios.len() as f64 },
            max_vio: max_vios,
            expert_load: load.into_iter().map(|(_, l)| l).collect(),
            dropped_share: if assignments == 0 { 0.0 } else { dropped as f64 / assignments as f64 },
            val_loss: None,
        }))
    }

    /// Mean language-model loss over the validation samples (`eval_batches` micro-batches at most).
    pub fn validate(&self) -> Result<Option<f64>> {
        let bsz = self.run.data.batch_size;
        let n = self.valid.len();
        if n == 0 {
            return Ok(None);
        }
        let mut batches = n.div_ceil(bsz);
        if self.run.run.eval_batches > 0 {
            batches = batches.min(self.run.run.eval_batches);
        }
        let settings = LossSettings {
            balance: BalanceWeights { expert: 0.0, device: 0.0, comm: 0.0, sequence: 0.0 },
            capacity_factor: None,
            mtp_lambda: 0.0,
        };
        let (mut sum, mut count) = (0.0, 0usize);
        for b in 0..batches {
            let idx: Vec<usize> = (b * bsz..((b + 1) * bsz).min(n)).collect();
            let batch = Batch {
                samples: idx.iter().map(|&i| self.valid.get(i).0).collect(),
                masks: idx.iter().map(|&i| self.valid.get(i).1).collect(),
                protected: vec![false; idx.len()],
            };
            let losses = batch_losses(&self.model, &batch, settings)?;
            sum += losses.lm * idx.len() as f64;
            count += idx.len();
        }
        Ok(Some(sum / count.max(1) as f64))
    }

    /// Writes a checkpoint of the current state; returns its folder.
    pub fn save(&mut self) -> Result<PathBuf> {
        for (layer, moe) in self.model.moe_layers_mut() {
            if let (Some(bias), Some((_, slot))) =
                (moe.correction_bias(), self.params.router_bias.iter_mut().find(|(i, _)| *i == layer))
            {
                slot.clone_from(&bias.to_vec());
            }
        }
        let run_toml = toml::to_string(&self.run).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let dtype = if self.run.run.save_dtype == "bf16" { DType::BF16 } else { DType::F32 };
        let mut config_json = self.config_json.clone();
        if let Some(obj) = config_json.as_object_mut() {
            obj.insert("dtype".into(), if dtype == DType::BF16 { "bfloat16" } else { "float32" }.into());
        }
        let snap = Snapshot {
            cfg: &self.cfg,
            config_json: &config_json,
            run_toml: &run_toml,
            params: &self.params,
            master: &self.master,
            opt: &self.opt,
            state: TrainerState { step: self.step, adam_t: self.opt.t, seed: self.run.run.seed, master_weights: false },
            tokenizer: &self.tokenizer_files,
            dtype,
        };
        checkpoint::save(&self.out, &snap, 3)
    }
}

/// The memory a training run needs, estimated from the model and the run's counts before anything
/// is allocated. Calibrated on this trainer (peak resident memory of runs of the v2-lite-6m and
/// tiny-v2 presets at batch 1 to 64 and sequences of 16 to 1024 tokens: within about 10%).
#[derive(Debug, Clone, Copy)]
pub struct MemoryEstimate {
    /// Parameters, gradients, AdamW's two moments and the f32 master copy: 20 bytes a parameter.
    pub state_bytes: f64,
    /// Activations kept for the backward pass, per token of a micro-batch.
    pub per_token_bytes: f64,
}

impl MemoryEstimate {
    /// Bytes for micro-batches of `tokens` tokens.
    pub fn total(&self, tokens: f64) -> f64 {
        self.state_bytes + self.per_token_bytes * tokens
    }
}

/// Estimates what training `cfg` on sequences of `seq_len` tokens needs (f64 throughout, so no count
/// can overflow the arithmetic).
pub fn estimate_memory(cfg: &Config, seq_len: usize) -> MemoryEstimate {
    let f = |x: usize| x as f64;
    let layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers;
    let params = crate::inspect::param_counts(cfg).total as f64 * f(layers) / f(cfg.num_hidden_layers);
    let (h, heads, vocab) = (f(cfg.hidden_size), f(cfg.num_attention_heads), f(cfg.vocab_size));
    let mut per_token = 4.0 * vocab * f(1 + cfg.num_nextn_predict_layers);
    for i in 0..layers {
        let ffn = match &cfg.moe {
            Some(m) if cfg.is_moe_layer(i.min(cfg.num_hidden_layers - 1)) => {
                f(m.num_experts_per_tok + m.n_shared_experts) * f(m.moe_intermediate_size)
            }
            _ => f(cfg.intermediate_size),
        };
        per_token +=
            24.0 * h + 5.0 * heads * f(seq_len) + 4.0 * heads * f(cfg.qk_head_dim() + cfg.v_head_dim) + 6.0 * ffn;
    }
    MemoryEstimate { state_bytes: 20.0 * params, per_token_bytes: 4.0 * per_token }
}

/// Refuses a run whose model or micro-batch cannot fit the memory this machine has, naming the
/// setting to change.
fn check_memory(cfg: &Config, run: &RunFile, run_path: &Path) -> Result<()> {
    let Some(available) = crate::resources::available_memory() else { return Ok(()) };
    let available = available as f64;
    let (batch, seq_len) = (run.data.batch_size, run.data.seq_len);
    let est = estimate_memory(cfg, seq_len);
    let fmt = crate::inspect::bytes_f64;
    if est.total(1.0) > available {
        return Err(Error::config(
            run_path,
            "model",
            format!(
                "the model's parameters with their gradients and optimizer state need about {}, but this machine \
                 has {} of memory available",
                fmt(est.state_bytes),
                fmt(available)
            ),
        ));
    }
    let tokens = batch as f64 * seq_len as f64;
    if est.total(tokens) > available {
        let fits = ((available - est.state_bytes) / (est.per_token_bytes * seq_len as f64)).floor().max(0.0);
        return Err(Error::config(
            run_path,
            "data.batch_size",
            format!(
                "is {batch}: {batch} sequences of {seq_len} tokens (data.seq_len) need about {} of activations plus {} \
                 for the parameters and optimizer state, but this machine has {} of memory available; give \
                 data.batch_size at most {fits} (or a shorter data.seq_len), and raise optim.accumulation to keep \
                 the tokens per step",
                fmt(est.per_token_bytes * tokens),
                fmt(est.state_bytes),
                fmt(available)
            ),
        ));
    }
    Ok(())
}

/// The per-step log in a run's output folder.
pub const LOG_FILE: &str = "train_log.jsonl";

/// Log entries of steps `<= before_step` (what a resumed run keeps).
pub fn read_log(path: &Path, before_step: usize) -> Result<Vec<StepLog>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let entry: StepLog = serde_json::from_str(line).map_err(|e| {
            Error::io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, format!("line {}: {e}", i + 1)))
        })?;
        if entry.step <= before_step {
            out.push(entry);
        }
    }
    Ok(out)
}

fn rewrite_log(path: &Path, history: &[StepLog]) -> Result<()> {
    let mut text = String::new();
    for h in history {
        text.push_str(&serde_json::to_string(h).map_err(|e| Error::InvalidArgument(e.to_string()))?);
        text.push('\n');
    }
    crate::train::write_atomic(path, text.as_bytes())
}
