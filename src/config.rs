//! `config.json` -> [`Config`], with Hugging Face field names verbatim.
//!
//! Two spellings of RoPE are accepted: DeepSeek's published one (top-level `rope_theta` and
//! `rope_scaling: {"type": "yarn", ...}`) and the one transformers 5 writes
//! (`rope_parameters: {"rope_type": "yarn", "rope_theta": ..., ...}`). Both become [`RopeConfig`].
//! `validate` checks the cross-field rules and names the field and value that break one.

use std::fs;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Which DeepSeek generation the checkpoint belongs to; it only sets defaults, never code paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ModelType {
    #[serde(rename = "deepseek_v2")]
    DeepseekV2,
    #[serde(rename = "deepseek_v3")]
    DeepseekV3,
    /// V3 with DeepSeek Sparse Attention (V3.2-Exp, V3.2): V3's defaults plus [`DsaConfig`].
    #[serde(rename = "deepseek_v32")]
    DeepseekV32,
}

impl ModelType {
    /// Whether the checkpoint takes V3's defaults (sigmoid routing, `noaux_tc`, scaling after
    /// normalising): V3 and V3.2.
    pub fn is_v3_family(self) -> bool {
        matches!(self, ModelType::DeepseekV3 | ModelType::DeepseekV32)
    }
}

/// DeepSeek Sparse Attention (V3.2): a lightning indexer per layer scores every earlier token
/// and the attention reads only the best `index_topk` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DsaConfig {
    /// The indexer's query heads.
    pub index_n_heads: usize,
    /// The width of the indexer's query heads and of its single key; the first
    /// `qk_rope_head_dim` values are rotated.
    pub index_head_dim: usize,
    /// Positions each query attends to at most.
    pub index_topk: usize,
}

/// How the router restricts the experts a token may pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TopkMethod {
    /// Top-k over all experts (DeepSeek-V2-Lite).
    Greedy,
    /// Device-limited routing: best `topk_group` groups by their best expert, then top-k (V2).
    GroupLimitedGreedy,
    /// V3: groups ranked by the sum of their two best biased scores; bias only picks.
    NoauxTc,
}

/// How router logits become affinities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoringFunc {
    Softmax,
    Sigmoid,
}

/// YaRN parameters (DeepSeek-V2 appendix B; transformers `_compute_yarn_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Only used together with `mscale_all_dim` (transformers' `_compute_yarn_parameters`).
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
}

/// RoPE base and optional YaRN scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub rope_theta: f64,
    pub yarn: Option<Yarn>,
    /// DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), …; `false` rotates halves (`rotate_half`).
    pub rope_interleave: bool,
}

/// `quantization_config` as DeepSeek-V3 publishes it.
#[derive(Debug, Clone, Deserialize)]
struct RawQuantization {
    quant_method: String,
    fmt: Option<String>,
    weight_block_size: Option<Vec<usize>>,
}

/// `eos_token_id` is a single id or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    /// All ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `rope_scaling` / `rope_parameters` as written in the file.
#[derive(Debug, Clone, Deserialize)]
struct RawRope {
    #[serde(rename = "type")]
    kind: Option<String>,
    rope_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    #[allow(dead_code)]
    partial_rotary_factor: Option<f64>,
    truncate: Option<bool>,
    attention_factor: Option<f64>,
}

/// The file as written; `Config::from_file` resolves defaults and RoPE into [`Config`].
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    model_type: ModelType,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    q_lora_rank: Option<usize>,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    moe_intermediate_size: Option<usize>,
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    #[serde(default = "one")]
    moe_layer_freq: usize,
    #[serde(default)]
    first_k_dense_replace: usize,
    topk_method: Option<TopkMethod>,
    scoring_func: Option<ScoringFunc>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    #[serde(default)]
    norm_topk_prob: bool,
    #[serde(default = "one_f64")]
    routed_scaling_factor: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
    #[serde(default)]
    num_nextn_predict_layers: usize,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    rope_interleave: Option<bool>,
    #[serde(default = "default_init")]
    initializer_range: f64,
    hidden_act: Option<String>,
    #[serde(default)]
    mlp_bias: bool,
    quantization_config: Option<RawQuantization>,
    index_n_heads: Option<usize>,
    index_head_dim: Option<usize>,
    index_topk: Option<usize>,
    /// transformers 5's spelling of the dense/MoE layout (`"dense"` or `"sparse"` per layer).
    mlp_layer_types: Option<Vec<String>>,
}

fn default_eps() -> f64 {
    1e-6
}
fn one() -> usize {
    1
}
fn one_f64() -> f64 {
    1.0
}
fn default_init() -> f64 {
    0.02
}

/// The largest width, rank, head, layer or expert count accepted (2^20).
pub const MAX_SIZE: usize = 1 << 20;
/// The largest vocabulary or context accepted (2^32).
pub const MAX_LENGTH: usize = 1 << 32;

/// A DeepSeek-V2-family model configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `None`: queries are projected directly (`q_proj`, V2-Lite).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// `None`: every layer is dense.
    pub moe: Option<MoeConfig>,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
    pub num_nextn_predict_layers: usize,
    pub rope: RopeConfig,
    pub initializer_range: f64,
    /// `quantization_config.weight_block_size` of an FP8 (e4m3) checkpoint: rows x columns per scale.
    pub fp8_block: Option<[usize; 2]>,
    /// V3.2's sparse attention; `None`: every layer attends densely.
    pub dsa: Option<DsaConfig>,
    /// `mlp_layer_types` where the file gives it: whether each layer is MoE, overriding
    /// `first_k_dense_replace` and `moe_layer_freq`.
    pub moe_layers: Option<Vec<bool>>,
}

/// DeepSeekMoE settings; present when the config has `n_routed_experts`.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub moe_intermediate_size: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_layer_freq: usize,
    pub first_k_dense_replace: usize,
    pub topk_method: TopkMethod,
    pub scoring_func: ScoringFunc,
    /// Groups (devices) for group-limited routing; 1 when routing is not grouped.
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
}

impl Config {
    /// Reads and validates `config.json`; errors name the file, the field and the value.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Config::from_json(&text, path)
    }

    /// Parses config text; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Config> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let mut reason = e.inner().to_string();
            if field == "model_type" {
                reason.push_str(" (latent supports deepseek_v2, deepseek_v3 and deepseek_v32)");
            }
            Error::config(path, &field, reason)
        })?;
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(Error::config(
                path,
                "hidden_act",
                format!("`{act}` is not supported, expected `silu` (SwiGLU)"),
            ));
        }
        if raw.mlp_bias {
            return Err(Error::config(path, "mlp_bias", "true is not supported: DeepSeek's MLPs have no bias"));
        }
        let rope = resolve_rope(&raw, path)?;
        let fp8_block = raw.quantization_config.as_ref().map(|q| resolve_fp8(q, path)).transpose()?;
        let moe = resolve_moe(&raw, path)?;
        let dsa = resolve_dsa(&raw, path)?;
        let moe_layers =
            raw.mlp_layer_types.as_ref().map(|types| resolve_layer_types(types, &raw, path)).transpose()?;
        let config = Config {
            model_type: raw.model_type,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            q_lora_rank: raw.q_lora_rank,
            kv_lora_rank: raw.kv_lora_rank,
            qk_nope_head_dim: raw.qk_nope_head_dim,
            qk_rope_head_dim: raw.qk_rope_head_dim,
            v_head_dim: raw.v_head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            moe,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_bias: raw.attention_bias,
            bos_token_id: raw.bos_token_id,
            eos_token_id: raw.eos_token_id.map(|e| e.to_vec()).unwrap_or_default(),
            num_nextn_predict_layers: raw.num_nextn_predict_layers,
            rope,
            initializer_range: raw.initializer_range,
            fp8_block,
            dsa,
            moe_layers,
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Cross-field rules; the error names the first field that breaks one.
    pub fn validate(&self, path: &Path) -> Result<()> {
        // (field, value, smallest, largest): the upper bounds are far above any DeepSeek model, so
        // that no size arithmetic on them can overflow.
        let moe = |f: fn(&MoeConfig) -> usize| self.moe.as_ref().map_or(1, f);
        let sizes = [
            ("vocab_size", self.vocab_size, 1, MAX_LENGTH),
            ("max_position_embeddings", self.max_position_embeddings, 1, MAX_LENGTH),
            ("hidden_size", self.hidden_size, 1, MAX_SIZE),
            ("intermediate_size", self.intermediate_size, 1, MAX_SIZE),
            ("num_hidden_layers", self.num_hidden_layers, 1, MAX_SIZE),
            ("num_attention_heads", self.num_attention_heads, 1, MAX_SIZE),
            ("kv_lora_rank", self.kv_lora_rank, 1, MAX_SIZE),
            ("q_lora_rank", self.q_lora_rank.unwrap_or(1), 1, MAX_SIZE),
            ("qk_nope_head_dim", self.qk_nope_head_dim, 0, MAX_SIZE),
            ("qk_rope_head_dim", self.qk_rope_head_dim, 1, MAX_SIZE),
            ("v_head_dim", self.v_head_dim, 1, MAX_SIZE),
            ("moe_intermediate_size", moe(|m| m.moe_intermediate_size), 1, MAX_SIZE),
            ("n_routed_experts", moe(|m| m.n_routed_experts), 1, MAX_SIZE),
            ("n_shared_experts", moe(|m| m.n_shared_experts), 0, MAX_SIZE),
        ];
        for (field, value, smallest, largest) in sizes {
            if value < smallest || value > largest {
                return Err(Error::config(path, field, format!("must be in {smallest}..={largest}, got {value}")));
            }
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            let got = self.qk_rope_head_dim;
            return Err(Error::config(
                path,
                "qk_rope_head_dim",
                format!("must be even (RoPE rotates pairs), got {got}"),
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            let got = self.rms_norm_eps;
            return Err(Error::config(path, "rms_norm_eps", format!("must be > 0, got {got}")));
        }
        if let Some(bos) = self.bos_token_id {
            check_token_id(path, "bos_token_id", bos, self.vocab_size)?;
        }
        for &eos in &self.eos_token_id {
            check_token_id(path, "eos_token_id", eos, self.vocab_size)?;
        }
        if let Some(moe) = &self.moe {
            moe.validate(path)?;
        }
        if let Some(dsa) = &self.dsa {
            self.validate_dsa(dsa, path)?;
        }
        Ok(())
    }

    fn validate_dsa(&self, dsa: &DsaConfig, path: &Path) -> Result<()> {
        let sizes = [
            ("index_n_heads", dsa.index_n_heads, 1, MAX_SIZE),
            ("index_head_dim", dsa.index_head_dim, self.qk_rope_head_dim, MAX_SIZE),
            ("index_topk", dsa.index_topk, 1, MAX_LENGTH),
        ];
        for (field, value, smallest, largest) in sizes {
            if value < smallest || value > largest {
                let why = match field {
                    "index_head_dim" => " (its first qk_rope_head_dim values are rotated)",
                    _ => "",
                };
                return Err(Error::config(path, field, format!("must be in {smallest}..={largest}{why}, got {value}")));
            }
        }
        if self.q_lora_rank.is_none() {
            return Err(Error::config(
                path,
                "q_lora_rank",
                "is required with sparse attention: the indexer's query is projected from the compressed query",
            ));
        }
        Ok(())
    }

    /// Whether decoder layer `i` uses DeepSeekMoE (else a dense SwiGLU): `mlp_layer_types` where
    /// the file gives it, else `first_k_dense_replace` and `moe_layer_freq`.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        if let Some(layers) = &self.moe_layers {
            return self.moe.is_some() && layers.get(i).copied().unwrap_or(false);
        }
        self.moe.as_ref().is_some_and(|m| i >= m.first_k_dense_replace && i.is_multiple_of(m.moe_layer_freq))
    }

    /// Query/key head size: `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The attention softmax scale: `qk_head_dim^-1/2`, times `mscale(factor, mscale_all_dim)^2` under YaRN.
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.rope.yarn {
            Some(Yarn { factor, mscale_all_dim: Some(all), .. }) if *all != 0.0 => {
                let m = yarn_mscale(*factor, *all);
                base * m * m
            }
            _ => base,
        }
    }

    /// Latent KV-cache elements per token per layer: `kv_lora_rank + qk_rope_head_dim`.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

fn check_token_id(path: &Path, field: &str, id: u32, vocab_size: usize) -> Result<()> {
    if id as usize >= vocab_size {
        return Err(Error::config(path, field, format!("{id} is not below vocab_size {vocab_size}")));
    }
    Ok(())
}

impl MoeConfig {
    fn validate(&self, path: &Path) -> Result<()> {
        let n = self.n_routed_experts;
        if self.moe_layer_freq == 0 {
            return Err(Error::config(path, "moe_layer_freq", "must be > 0, got 0"));
        }
        let k = self.num_experts_per_tok;
        if k == 0 || k > n {
            return Err(Error::config(
                path,
                "num_experts_per_tok",
                format!("must be in 1..={n} (n_routed_experts), got {k}"),
            ));
        }
        if self.n_group == 0 || !n.is_multiple_of(self.n_group) {
            let g = self.n_group;
            return Err(Error::config(
                path,
                "n_group",
                format!("n_routed_experts ({n}) must be divisible by n_group ({g})"),
            ));
        }
        if self.topk_group == 0 || self.topk_group > self.n_group {
            let (t, g) = (self.topk_group, self.n_group);
            return Err(Error::config(path, "topk_group", format!("must be in 1..={g} (n_group), got {t}")));
        }
        let per_group = n / self.n_group;
        if self.topk_method == TopkMethod::NoauxTc && per_group < 2 {
            return Err(Error::config(
                path,
                "n_group",
                "noaux_tc scores groups by their two best experts: each group needs at least 2",
            ));
        }
        if k > self.topk_group * per_group {
            return Err(Error::config(
                path,
                "num_experts_per_tok",
                format!("{k} experts cannot be chosen from topk_group ({}) groups of {per_group}", self.topk_group),
            ));
        }
        if !(self.routed_scaling_factor.is_finite()) {
            return Err(Error::config(path, "routed_scaling_factor", "must be finite"));
        }
        Ok(())
    }
}

fn resolve_moe(raw: &RawConfig, path: &Path) -> Result<Option<MoeConfig>> {
    let Some(n_routed_experts) = raw.n_routed_experts else {
        return Ok(None);
    };
    let need = |v: Option<usize>, field: &str| {
        v.ok_or_else(|| Error::config(path, field, "is required when n_routed_experts is set"))
    };
    let v3 = raw.model_type.is_v3_family();
    let topk_method = raw.topk_method.unwrap_or(if v3 { TopkMethod::NoauxTc } else { TopkMethod::Greedy });
    let grouped = topk_method != TopkMethod::Greedy;
    let (n_group, topk_group) = if grouped {
        (need(raw.n_group, "n_group")?, need(raw.topk_group, "topk_group")?)
    } else {
        (raw.n_group.unwrap_or(1).max(1), raw.topk_group.unwrap_or(1).max(1).min(raw.n_group.unwrap_or(1).max(1)))
    };
    Ok(Some(MoeConfig {
        moe_intermediate_size: need(raw.moe_intermediate_size, "moe_intermediate_size")?,
        n_routed_experts,
        n_shared_experts: raw.n_shared_experts.unwrap_or(0),
        num_experts_per_tok: need(raw.num_experts_per_tok, "num_experts_per_tok")?,
        moe_layer_freq: raw.moe_layer_freq,
        first_k_dense_replace: raw.first_k_dense_replace,
        topk_method,
        scoring_func: raw.scoring_func.unwrap_or(if v3 { ScoringFunc::Sigmoid } else { ScoringFunc::Softmax }),
        n_group,
        topk_group,
        norm_topk_prob: raw.norm_topk_prob,
        routed_scaling_factor: raw.routed_scaling_factor,
    }))
}

/// V3.2's indexer: transformers' defaults (64 heads of 128, top 2048) for a `deepseek_v32` file
/// that leaves a field out; the fields alone in another model type are an error, not ignored.
fn resolve_dsa(raw: &RawConfig, path: &Path) -> Result<Option<DsaConfig>> {
    let fields =
        [("index_n_heads", raw.index_n_heads), ("index_head_dim", raw.index_head_dim), ("index_topk", raw.index_topk)];
    if raw.model_type != ModelType::DeepseekV32 {
        if let Some((field, _)) = fields.iter().find(|(_, v)| v.is_some()) {
            return Err(Error::config(
                path,
                field,
                format!("belongs to sparse attention, which needs model_type deepseek_v32, not {:?}", raw.model_type),
            ));
        }
        return Ok(None);
    }
    Ok(Some(DsaConfig {
        index_n_heads: raw.index_n_heads.unwrap_or(64),
        index_head_dim: raw.index_head_dim.unwrap_or(128),
        index_topk: raw.index_topk.unwrap_or(2048),
    }))
}

/// `mlp_layer_types`: one `"dense"` or `"sparse"` per layer.
fn resolve_layer_types(types: &[String], raw: &RawConfig, path: &Path) -> Result<Vec<bool>> {
    if types.len() != raw.num_hidden_layers {
        return Err(Error::config(
            path,
            "mlp_layer_types",
            format!("has {} entries for {} layers (num_hidden_layers)", types.len(), raw.num_hidden_layers),
        ));
    }
    types
        .iter()
        .enumerate()
        .map(|(i, t)| match t.as_str() {
            "dense" => Ok(false),
            "sparse" if raw.n_routed_experts.is_some() => Ok(true),
            "sparse" => {
                Err(Error::config(path, &format!("mlp_layer_types[{i}]"), "is sparse but n_routed_experts is not set"))
            }
            other => Err(Error::config(
                path,
                &format!("mlp_layer_types[{i}]"),
                format!("`{other}`, expected `dense` or `sparse`"),
            )),
        })
        .collect()
}

fn resolve_rope(raw: &RawConfig, path: &Path) -> Result<RopeConfig> {
    let (field, spec) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(p), _) => ("rope_parameters", Some(p)),
        (None, Some(s)) => ("rope_scaling", Some(s)),
        (None, None) => ("rope_scaling", None),
    };
    let rope_theta = spec.and_then(|s| s.rope_theta).or(raw.rope_theta).unwrap_or(10000.0);
    let rope_interleave = raw.rope_interleave.unwrap_or(true);
    if rope_theta.is_nan() || rope_theta <= 1.0 {
        return Err(Error::config(path, "rope_theta", format!("must be > 1, got {rope_theta}")));
    }
    let Some(spec) = spec else {
        return Ok(RopeConfig { rope_theta, yarn: None, rope_interleave });
    };
    let kind = spec.rope_type.as_deref().or(spec.kind.as_deref()).unwrap_or("default");
    let yarn = match kind {
        "default" => None,
        "yarn" => Some(resolve_yarn(raw, spec, field, path)?),
        other => {
            return Err(Error::config(
                path,
                &format!("{field}.rope_type"),
                format!("unsupported RoPE type `{other}`, expected `default` or `yarn`"),
            ))
        }
    };
    Ok(RopeConfig { rope_theta, yarn, rope_interleave })
}

fn resolve_yarn(raw: &RawConfig, spec: &RawRope, field: &str, path: &Path) -> Result<Yarn> {
    let factor = spec.factor.ok_or_else(|| Error::config(path, &format!("{field}.factor"), "is required for YaRN"))?;
    if factor.is_nan() || factor < 1.0 {
        return Err(Error::config(path, &format!("{field}.factor"), format!("must be >= 1, got {factor}")));
    }
    if spec.attention_factor.is_some() {
        return Err(Error::config(
            path,
            &format!("{field}.attention_factor"),
            "is not used by DeepSeek checkpoints; give mscale/mscale_all_dim instead",
        ));
    }
    if spec.truncate == Some(false) {
        return Err(Error::config(
            path,
            &format!("{field}.truncate"),
            "only the truncated YaRN ramp (true) is supported",
        ));
    }
    let original = spec.original_max_position_embeddings.unwrap_or(raw.max_position_embeddings);
    if original == 0 {
        return Err(Error::config(path, &format!("{field}.original_max_position_embeddings"), "must be > 0"));
    }
    Ok(Yarn {
        factor,
        original_max_position_embeddings: original,
        beta_fast: spec.beta_fast.unwrap_or(32.0),
        beta_slow: spec.beta_slow.unwrap_or(1.0),
        mscale: spec.mscale,
        mscale_all_dim: spec.mscale_all_dim,
    })
}

fn resolve_fp8(q: &RawQuantization, path: &Path) -> Result<[usize; 2]> {
    if q.quant_method != "fp8" {
        return Err(Error::config(
            path,
            "quantization_config.quant_method",
            format!("`{}` is not supported, expected `fp8` (DeepSeek-V3 block FP8)", q.quant_method),
        ));
    }
    if let Some(fmt) = q.fmt.as_deref().filter(|f| *f != "e4m3") {
        return Err(Error::config(
            path,
            "quantization_config.fmt",
            format!("`{fmt}` is not supported, expected `e4m3`"),
        ));
    }
    match q.weight_block_size.as_deref().unwrap_or(&[128, 128]) {
        &[rows, cols] if rows > 0 && cols > 0 && rows <= MAX_SIZE && cols <= MAX_SIZE => Ok([rows, cols]),
        other => Err(Error::config(
            path,
            "quantization_config.weight_block_size",
            format!("expected two positive sizes like [128, 128], got {other:?}"),
        )),
    }
}

/// YaRN's attention temperature: `0.1 * mscale * ln(scale) + 1` for scale > 1, else 1.
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}
