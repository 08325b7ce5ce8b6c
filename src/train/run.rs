//! The run file: one TOML document says everything about a training run. `[model]` is a
//! `config.json` in TOML (the Hugging Face vocabulary, validated by [`Config`]); the other sections
//! have fixed keys, and an unknown key is an error that names it. Presets are run files built in;
//! `key.path=value` overrides (values in TOML syntax; bare words are strings) apply on top.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};

/// Built-in run files, by name.
pub const PRESETS: &[(&str, &str)] = &[
    ("kjv", include_str!("../../presets/kjv.toml")),
    ("kjv-v3", include_str!("../../presets/kjv-v3.toml")),
    ("kjv-v3-chat", include_str!("../../presets/kjv-v3-chat.toml")),
    ("sft", include_str!("../../presets/sft.toml")),
    ("tiny-v2", include_str!("../../presets/tiny-v2.toml")),
    ("tiny-v3", include_str!("../../presets/tiny-v3.toml")),
    ("v2-lite-6m", include_str!("../../presets/v2-lite-6m.toml")),
];

/// A whole run, as read from the run file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    /// The model's `config.json`, in TOML (absent when fine-tuning: the model comes from `--init`).
    #[serde(default)]
    pub model: toml::Table,
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    pub optim: OptimSection,
    #[serde(default)]
    pub schedule: ScheduleSection,
    #[serde(default)]
    pub balance: BalanceSection,
    #[serde(default)]
    pub mtp: MtpSection,
    #[serde(default)]
    pub run: RunSection,
}

/// `[data]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Plain-text training files.
    pub train: Vec<PathBuf>,
    /// Plain-text validation files; when empty, the last `valid_fraction` of the training tokens.
    pub valid: Vec<PathBuf>,
    pub valid_fraction: f64,
    /// A folder with `tokenizer.json` (and `tokenizer_config.json`).
    pub tokenizer: PathBuf,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            train: Vec::new(),
            valid: Vec::new(),
            valid_fraction: 0.05,
            tokenizer: PathBuf::new(),
            seq_len: 256,
            batch_size: 8,
        }
    }
}

/// `[optim]`: AdamW, with DeepSeek-V2's defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices and embeddings (not to norms or biases).
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 turns clipping off.
    pub grad_clip: f64,
    /// Micro-batches per optimizer step.
    pub accumulation: usize,
    /// Steps in a row whose loss or gradient is not finite that are skipped (parameters and
    /// optimizer state untouched, a warning each) before the run stops.
    pub max_bad_steps: usize,
}

impl Default for OptimSection {
    fn default() -> Self {
        OptimSection {
            lr: 4.2e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            accumulation: 1,
            max_bad_steps: 5,
        }
    }
}

/// The learning-rate schedule's shape after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// DeepSeek-V2's: multiply by `decay_factor` at each point of `decay_at` (fractions of the steps).
    Step,
    /// Cosine from the peak to `min_lr_ratio` of it.
    Cosine,
}

/// `[schedule]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSection {
    pub kind: ScheduleKind,
    /// Optimizer steps in the run.
    pub steps: usize,
    pub warmup_steps: usize,
    pub decay_at: Vec<f64>,
    pub decay_factor: f64,
    pub min_lr_ratio: f64,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        ScheduleSection {
            kind: ScheduleKind::Step,
            steps: 1000,
            warmup_steps: 100,
            decay_at: vec![0.6, 0.9],
            decay_factor: 0.316,
            min_lr_ratio: 0.1,
        }
    }
}

impl ScheduleSection {
    /// The learning rate of optimizer step `step` (0-based) for peak `lr`.
    pub fn lr_at(&self, lr: f64, step: usize) -> f64 {
        if step < self.warmup_steps {
            return lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.kind {
            ScheduleKind::Step => {
                let done = step as f64 / self.steps.max(1) as f64;
                let n = self.decay_at.iter().filter(|&&at| done >= at).count();
                lr * self.decay_factor.powi(n as i32)
            }
            ScheduleKind::Cosine => {
                let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
                let min = lr * self.min_lr_ratio;
                min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// `[balance]`. Unset weights take the defaults of the model's generation: V2-style routers
/// (no correction bias) get α1/α2/α3 = 0.003/0.05/0.02; V3-style (`noaux_tc`) get the bias update
/// with γ = 0.001 and the sequence-wise loss with α = 0.0001.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceSection {
    pub alpha1: Option<f64>,
    pub alpha2: Option<f64>,
    pub alpha3: Option<f64>,
    pub seq_alpha: Option<f64>,
    pub gamma: Option<f64>,
    /// Device-level token dropping; absent means off (DeepSeek-V2 used 1.0).
    pub capacity_factor: Option<f64>,
    /// Share of sequences whose tokens are never dropped (DeepSeek-V2 kept about 10%).
    pub protected_share: Option<f64>,
}

/// `[mtp]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MtpSection {
    /// Weight λ of the MTP loss (`λ/D Σ_k L_k`).
    pub lambda: f64,
}

impl Default for MtpSection {
    fn default() -> Self {
        MtpSection { lambda: 0.3 }
    }
}

/// `[run]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    pub seed: u64,
    /// Output folder: checkpoints, the JSONL log, plots.
    pub out: PathBuf,
    /// Validation every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Validation micro-batches per evaluation (0: the whole split).
    pub eval_batches: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// Weights' dtype in saved checkpoints: "f32" or "bf16" (the optimizer state keeps f32 master
    /// weights either way, so resuming is exact).
    pub save_dtype: String,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            seed: 0,
            out: PathBuf::from("runs/latest"),
            eval_every: 100,
            eval_batches: 16,
            save_every: 500,
            save_dtype: "f32".into(),
        }
    }
}

impl RunFile {
    /// Reads `path` (or the preset `name` when `path` is `preset:name`) and applies `overrides`.
    pub fn load(source: &str, overrides: &[String]) -> Result<(RunFile, PathBuf)> {
        let (text, path) = match source.strip_prefix("preset:") {
            Some(name) => match PRESETS.iter().find(|(n, _)| *n == name) {
                Some((_, text)) => (text.to_string(), PathBuf::from(format!("<preset {name}>"))),
                None => {
                    let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
                    return Err(Error::InvalidArgument(format!(
                        "unknown preset `{name}`; presets are {}",
                        names.join(", ")
                    )));
                }
            },
            None => {
                let path = PathBuf::from(source);
                (std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?, path)
            }
        };
        Ok((RunFile::parse(&text, &path, overrides)?, path))
    }

    /// Parses a run file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<RunFile> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            Error::config(path, e.span().map(|s| format!("at byte {}", s.start)).as_deref().unwrap_or("?"), e.message())
        })?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let run: RunFile = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| Error::config(path, &e.path().to_string(), e.inner().message().to_string()))?;
        run.validate(path)?;
        Ok(run)
    }

    /// The model config the run trains.
    pub fn config(&self, path: &Path) -> Result<Config> {
        let json = serde_json::to_string(&self.model)
            .map_err(|e| Error::config(path, "model", format!("cannot express as JSON: {e}")))?;
        Config::from_json(&json, path)
    }

    /// The `config.json` to save next to the weights (what transformers needs to load them).
    pub fn config_json(&self, tokenizer_bos: Option<u32>, eos: Option<u32>) -> Result<serde_json::Value> {
        let mut json = serde_json::to_value(&self.model)
            .map_err(|e| Error::InvalidArgument(format!("[model] cannot be written as JSON: {e}")))?;
        if let Some(obj) = json.as_object_mut() {
            let arch = match obj.get("model_type").and_then(|v| v.as_str()) {
                Some("deepseek_v3") => "DeepseekV3ForCausalLM",
                _ => "DeepseekV2ForCausalLM",
            };
            obj.entry("architectures").or_insert(serde_json::json!([arch]));
            if let Some(bos) = tokenizer_bos {
                obj.entry("bos_token_id").or_insert(bos.into());
            }
            if let Some(eos) = eos {
                obj.entry("eos_token_id").or_insert(eos.into());
            }
            obj.insert("dtype".into(), "float32".into());
        }
        // Every value latent resolved is written out: where a key is absent, transformers' defaults
        // differ from latent's (an absent `q_lora_rank` means none to latent but 1536 to
        // transformers), and a checkpoint must mean the same thing to both.
        let text = serde_json::to_string(&json).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let cfg = Config::from_json(&text, Path::new("run file [model]"))?;
        let mut resolved = serde_json::json!({
            "q_lora_rank": cfg.q_lora_rank,
            "num_key_value_heads": cfg.num_attention_heads,
            "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.rms_norm_eps,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "attention_bias": cfg.attention_bias,
            "initializer_range": cfg.initializer_range,
            "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
            "hidden_act": "silu",
        });
        if let (Some(m), Some(r)) = (&cfg.moe, resolved.as_object_mut()) {
            let moe = serde_json::json!({
                "n_routed_experts": m.n_routed_experts,
                "n_shared_experts": m.n_shared_experts,
                "num_experts_per_tok": m.num_experts_per_tok,
                "moe_intermediate_size": m.moe_intermediate_size,
                "moe_layer_freq": m.moe_layer_freq,
                "first_k_dense_replace": m.first_k_dense_replace,
                "topk_method": m.topk_method,
                "scoring_func": m.scoring_func,
                "n_group": m.n_group,
                "topk_group": m.topk_group,
                "norm_topk_prob": m.norm_topk_prob,
                "routed_scaling_factor": m.routed_scaling_factor,
            });
            r.extend(moe.as_object().cloned().unwrap_or_default());
        }
        if let (Some(obj), Some(r)) = (json.as_object_mut(), resolved.as_object_mut()) {
            if !obj.contains_key("rope_theta") && !obj.contains_key("rope_parameters") {
                obj.insert("rope_theta".into(), cfg.rope.rope_theta.into());
            }
            for (k, v) in std::mem::take(r) {
                obj.entry(k).or_insert(v);
            }
        }
        Ok(json)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, reason: String| Err(Error::config(path, field, reason));
        // [model] is a config.json: keys latent reads, and those a published DeepSeek config.json
        // carries that latent has no use for. Anything else is a misspelling, refused as the
        // other sections refuse theirs.
        for key in self.model.keys() {
            if !MODEL_KEYS.contains(&key.as_str()) {
                let near = MODEL_KEYS.iter().min_by_key(|k| edit_distance(k, key)).copied().unwrap_or_default();
                let hint =
                    if edit_distance(near, key) <= 3 { format!(" (did you mean `{near}`?)") } else { String::new() };
                return bad(&format!("model.{key}"), format!("is not a model config key{hint}"));
            }
        }
        let (d, o, s, r) = (&self.data, &self.optim, &self.schedule, &self.run);
        if d.seq_len < 2 {
            return bad("data.seq_len", format!("is {}, expected at least 2", d.seq_len));
        }
        if d.batch_size == 0 {
            return bad("data.batch_size", "is 0, expected at least 1".into());
        }
        if !(0.0..1.0).contains(&d.valid_fraction) {
            return bad("data.valid_fraction", format!("is {}, expected 0 <= x < 1", d.valid_fraction));
        }
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return bad("optim.lr", format!("is {}, expected a positive number", o.lr));
        }
        for (name, v) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(name, format!("is {v}, expected 0 <= x < 1"));
            }
        }
        if o.eps.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return bad("optim.eps", format!("is {}, expected > 0", o.eps));
        }
        if o.weight_decay < 0.0 || o.grad_clip < 0.0 {
            return bad("optim", "weight_decay and grad_clip must be >= 0".into());
        }
        if o.accumulation == 0 {
            return bad("optim.accumulation", "is 0, expected at least 1".into());
        }
        if s.steps == 0 {
            return bad("schedule.steps", "is 0, expected at least 1".into());
        }
        if s.decay_at.iter().any(|a| !(0.0..=1.0).contains(a)) {
            return bad("schedule.decay_at", format!("is {:?}, expected fractions in [0, 1]", s.decay_at));
        }
        if s.decay_factor.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
            || !(0.0..=1.0).contains(&s.min_lr_ratio)
        {
            return bad("schedule", "decay_factor must be > 0 and min_lr_ratio in [0, 1]".into());
        }
        let b = &self.balance;
        for (name, v) in [
            ("balance.alpha1", b.alpha1),
            ("balance.alpha2", b.alpha2),
            ("balance.alpha3", b.alpha3),
            ("balance.seq_alpha", b.seq_alpha),
            ("balance.gamma", b.gamma),
        ] {
            if let Some(v) = v {
                if !(v >= 0.0 && v.is_finite()) {
                    return bad(name, format!("is {v}, expected a number >= 0"));
                }
            }
        }
        if let Some(cf) = b.capacity_factor {
            if !(cf > 0.0 && cf.is_finite()) {
                return bad("balance.capacity_factor", format!("is {cf}, expected > 0"));
            }
        }
        if let Some(p) = b.protected_share {
            if !(0.0..=1.0).contains(&p) {
                return bad("balance.protected_share", format!("is {p}, expected 0 <= x <= 1"));
            }
        }
        if self.mtp.lambda < 0.0 {
            return bad("mtp.lambda", format!("is {}, expected >= 0", self.mtp.lambda));
        }
        if !["f32", "bf16"].contains(&r.save_dtype.as_str()) {
            return bad("run.save_dtype", format!("is `{}`, expected \"f32\" or \"bf16\"", r.save_dtype));
        }
        if !self.model.is_empty() {
            self.config(path)?;
        }
        Ok(())
    }
}

/// Applies `a.b.c=value` to `table`; `value` is TOML (`1e-3`, `true`, `[0.8, 0.9]`, `"x"`), or a
/// bare string.
pub fn apply_override(table: &mut toml::Table, text: &str) -> Result<()> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(Error::InvalidArgument(format!("override `{text}`: expected KEY=VALUE, e.g. optim.lr=1e-3")));
    };
    let value: toml::Value = match format!("v = {value}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(value.to_string())),
        Err(_) => toml::Value::String(value.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, parents) = parts
        .split_last()
        .filter(|(l, _)| !l.is_empty())
        .ok_or_else(|| Error::InvalidArgument(format!("override `{text}`: empty key")))?;
    let mut at = table;
    for p in parents {
        let entry = at.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(Error::InvalidArgument(format!("override `{text}`: `{p}` is not a section"))),
        };
    }
    at.insert(last.to_string(), value);
    Ok(())
}

/// The keys `[model]` may hold: what latent reads from a config.json, and the keys of DeepSeek's
/// published configs that it has no use for.
const MODEL_KEYS: &[&str] = &[
    "architectures",
    "attention_bias",
    "attention_dropout",
    "auto_map",
    "aux_loss_alpha",
    "bos_token_id",
    "dtype",
    "eos_token_id",
    "ep_size",
    "first_k_dense_replace",
    "head_dim",
    "hidden_act",
    "hidden_size",
    "initializer_range",
    "intermediate_size",
    "kv_lora_rank",
    "max_position_embeddings",
    "mlp_bias",
    "model_type",
    "moe_intermediate_size",
    "moe_layer_freq",
    "n_group",
    "n_routed_experts",
    "n_shared_experts",
    "norm_topk_prob",
    "num_attention_heads",
    "num_experts_per_tok",
    "num_hidden_layers",
    "num_key_value_heads",
    "num_nextn_predict_layers",
    "pad_token_id",
    "pretraining_tp",
    "q_lora_rank",
    "qk_head_dim",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "quantization_config",
    "rms_norm_eps",
    "rope_interleave",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "routed_scaling_factor",
    "scoring_func",
    "seq_aux",
    "tie_word_embeddings",
    "topk_group",
    "topk_method",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "v_head_dim",
    "vocab_size",
];

/// Levenshtein distance, for suggesting the key a misspelling meant.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (prev + usize::from(ca != cb)).min(row[j] + 1).min(row[j + 1] + 1);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_a_valid_run_file() {
        for (name, text) in PRESETS {
            let run = RunFile::parse(text, Path::new(name), &[]);
            assert!(run.is_ok(), "preset {name}: {:?}", run.err());
        }
    }
}
