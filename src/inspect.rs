//! What a checkpoint is, computed from its config: parameter counts (total and per token) and the
//! KV-cache bytes per token of MLA next to MHA and GQA of the same head size, as in the
//! DeepSeek-V2 paper's table 1 (`2 n_h d_h l` for MHA, `2 n_g d_h l` for GQA, `(d_c + d_r) l`
//! for MLA, with `d_h = qk_nope_head_dim`).

use std::fmt;

use crate::config::{Config, TopkMethod};

/// Parameter counts of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    /// Every parameter of the main model (V3's MTP module excluded).
    pub total: usize,
    /// What one token computes with: all but the routed experts it does not choose and the input
    /// embedding (a row lookup). This is how the DeepSeek papers count "activated" parameters.
    pub active: usize,
    /// The input embedding table.
    pub embedding: usize,
}

/// Counts the parameters `cfg` implies (router correction bias included for `noaux_tc`). A count
/// past `usize::MAX` (possible only for configs at the validator's extreme bounds) saturates; the
/// report uses [`try_param_counts`] and says so.
pub fn param_counts(cfg: &Config) -> ParamCounts {
    try_param_counts(cfg).unwrap_or(ParamCounts { total: usize::MAX, active: usize::MAX, embedding: usize::MAX })
}

/// [`param_counts`] in checked arithmetic: `None` when a count does not fit a `usize`.
pub fn try_param_counts(cfg: &Config) -> Option<ParamCounts> {
    // u128 with checked operations: no product of the config's bounded sizes can wrap silently.
    let n = |x: usize| x as u128;
    let mul = |xs: &[u128]| xs.iter().try_fold(1u128, |acc, &x| acc.checked_mul(x));
    let sum = |xs: &[u128]| xs.iter().try_fold(0u128, |acc, &x| acc.checked_add(x));
    let (h, v, heads) = (n(cfg.hidden_size), n(cfg.vocab_size), n(cfg.num_attention_heads));
    let (d_n, d_r, d_v, d_c) =
        (n(cfg.qk_nope_head_dim), n(cfg.qk_rope_head_dim), n(cfg.v_head_dim), n(cfg.kv_lora_rank));
    let bias = u128::from(cfg.attention_bias);
    let q = match cfg.q_lora_rank.map(n) {
        Some(r) => sum(&[mul(&[h, r])?, bias * r, r, mul(&[r, heads, d_n + d_r])?])?,
        None => mul(&[h, heads, d_n + d_r])?,
    };
    // V3.2's lightning indexer: wq_b, wk, k_norm (weight and bias), weights_proj.
    let indexer = match (&cfg.dsa, cfg.q_lora_rank) {
        (Some(dsa), Some(r)) => {
            let (h_i, d_i) = (n(dsa.index_n_heads), n(dsa.index_head_dim));
            sum(&[mul(&[n(r), h_i, d_i])?, mul(&[h, d_i])?, 2 * d_i, mul(&[h, h_i])?])?
        }
        _ => 0,
    };
    let attn = sum(&[
        q,
        mul(&[h, d_c + d_r])?,
        bias * (d_c + d_r),
        d_c,
        mul(&[d_c, heads, d_n + d_v])?,
        mul(&[heads, d_v, h])?,
        bias * h,
        indexer,
    ])?;
    let embedding = mul(&[v, h])?;
    let head = if cfg.tie_word_embeddings { 0 } else { embedding };
    let (mut total, mut active) = (sum(&[embedding, head, h])?, sum(&[head, h])?);
    let common = sum(&[attn, 2 * h])?;
    let dense = mul(&[3, h, n(cfg.intermediate_size)])?;
    let (n_moe, n_dense) = {
        let moe = (0..cfg.num_hidden_layers).filter(|&i| cfg.is_moe_layer(i)).count();
        (n(moe), n(cfg.num_hidden_layers - moe))
    };
    let (mut all, mut used) = (mul(&[n_dense, sum(&[common, dense])?])?, mul(&[n_dense, sum(&[common, dense])?])?);
    if let Some(m) = &cfg.moe {
        let expert = mul(&[3, h, n(m.moe_intermediate_size)])?;
        let router = sum(&[
            mul(&[n(m.n_routed_experts), h])?,
            if m.topk_method == TopkMethod::NoauxTc { n(m.n_routed_experts) } else { 0 },
        ])?;
        let shared = sum(&[mul(&[expert, n(m.n_shared_experts)])?, router])?;
        let layer_all = sum(&[common, mul(&[expert, n(m.n_routed_experts)])?, shared])?;
        let layer_used = sum(&[common, mul(&[expert, n(m.num_experts_per_tok)])?, shared])?;
        all = sum(&[all, mul(&[n_moe, layer_all])?])?;
        used = sum(&[used, mul(&[n_moe, layer_used])?])?;
    }
    total = sum(&[total, all])?;
    active = sum(&[active, used])?;
    let fit = |x: u128| usize::try_from(x).ok();
    Some(ParamCounts { total: fit(total)?, active: fit(active)?, embedding: fit(embedding)? })
}

/// KV-cache values per token (all layers) of MLA and the attentions it is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvFootprint {
    /// MLA's latent cache: `(d_c + d_r) l`.
    pub mla: usize,
    /// Multi-head attention with `n_h` heads of `d_h`: `2 n_h d_h l`.
    pub mha: usize,
    /// Grouped-query attention with `gqa_groups` KV heads of `d_h`: `2 n_g d_h l`.
    pub gqa: usize,
    pub gqa_groups: usize,
    /// Per-head K and V as MLA's expanded form would cache them: `n_h (d_n + d_r + d_v) l`.
    pub expanded: usize,
}

/// The KV footprint of `cfg`, with GQA at 8 KV heads (fewer if the model has fewer heads).
pub fn kv_footprint(cfg: &Config) -> KvFootprint {
    let (l, heads, d_h) = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.qk_nope_head_dim);
    let gqa_groups = heads.min(8);
    // Saturating: the config's bounds keep these below 2^63, and a wrap must never pass silently.
    let mul = |xs: &[usize]| xs.iter().fold(1usize, |acc, &x| acc.saturating_mul(x));
    KvFootprint {
        mla: mul(&[cfg.latent_dim(), l]),
        mha: mul(&[2, heads, d_h, l]),
        gqa: mul(&[2, gqa_groups, d_h, l]),
        gqa_groups,
        expanded: mul(&[heads, cfg.qk_head_dim() + cfg.v_head_dim, l]),
    }
}

/// The `latent inspect` report.
pub struct Report<'a> {
    pub config: &'a Config,
    pub source: String,
    /// Bytes and number of files of the safetensors, if the folder has them.
    pub weights: Option<(usize, usize)>,
    pub dtype_bytes: usize,
    pub dtype_name: String,
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.config;
        let n_moe = (0..c.num_hidden_layers).filter(|&i| c.is_moe_layer(i)).count();
        writeln!(f, "model       {:?} from {}", c.model_type, self.source)?;
        writeln!(
            f,
            "layers      {} ({} dense + {} MoE), hidden {}, heads {}, vocab {}, context {}",
            c.num_hidden_layers,
            c.num_hidden_layers - n_moe,
            n_moe,
            c.hidden_size,
            c.num_attention_heads,
            c.vocab_size,
            c.max_position_embeddings
        )?;
        let q = c.q_lora_rank.map_or("none (q_proj)".to_string(), |r| r.to_string());
        writeln!(
            f,
            "attention   MLA: q_lora_rank {q}, kv_lora_rank {}, qk_nope {} + qk_rope {}, v {}; softmax scale {:.5}",
            c.kv_lora_rank,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            c.softmax_scale()
        )?;
        match &c.rope.yarn {
            Some(y) => writeln!(
                f,
                "rope        theta {}, YaRN factor {} from {} positions, beta {}/{}, mscale {}, mscale_all_dim {}",
                c.rope.rope_theta,
                y.factor,
                y.original_max_position_embeddings,
                y.beta_fast,
                y.beta_slow,
                y.mscale.map_or("-".into(), |m| m.to_string()),
                y.mscale_all_dim.map_or("-".into(), |m| m.to_string())
            )?,
            None => writeln!(f, "rope        theta {}", c.rope.rope_theta)?,
        }
        if let Some(m) = &c.moe {
            writeln!(
                f,
                "moe         {} routed (top-{}, {:?} {:?}, {} groups, top {}) + {} shared, intermediate {}, scaling {}, norm_topk_prob {}",
                m.n_routed_experts,
                m.num_experts_per_tok,
                m.scoring_func,
                m.topk_method,
                m.n_group,
                m.topk_group,
                m.n_shared_experts,
                m.moe_intermediate_size,
                m.routed_scaling_factor,
                m.norm_topk_prob
            )?;
        }
        match try_param_counts(c) {
            Some(p) => writeln!(
                f,
                "parameters  total {}, active per token {} ({:.1}%; the input embedding, {}, is a lookup)",
                human(p.total),
                human(p.active),
                100.0 * p.active as f64 / p.total as f64,
                human(p.embedding)
            )?,
            None => writeln!(
                f,
                "parameters  more than 2^64 (1.8e19): too many to count in this machine's word size, and to load anywhere"
            )?,
        }
        match self.weights {
            Some((size, files)) => writeln!(f, "weights     {} in {files} file(s)", bytes(size))?,
            None => writeln!(f, "weights     none in this folder (config only)")?,
        }
        let kv = kv_footprint(c);
        let b = self.dtype_bytes;
        writeln!(f, "kv cache per token ({}, all {} layers):", self.dtype_name, c.num_hidden_layers)?;
        let rows = [
            ("MLA latent  (d_c + d_r) l", kv.mla),
            ("MHA         2 n_h d_h l", kv.mha),
            (&*format!("GQA         2 n_g d_h l, n_g = {}", kv.gqa_groups), kv.gqa),
            ("expanded    n_h (d_n + d_r + d_v) l", kv.expanded),
        ];
        for (name, values) in rows {
            let ratio = values as f64 / kv.mla as f64;
            let size = bytes_f64(values as f64 * b as f64);
            writeln!(f, "  {name:<38} {values:>9} values {size:>11}  {ratio:>6.2}x MLA")?;
        }
        // `--kv-cache int8`: codes plus a 4-byte scale per 128 latents and one for the RoPE part.
        if let Some(rows) = crate::kernels::latent_int8::Int8Rows::new(c.kv_lora_rank, c.qk_rope_head_dim) {
            let int8 = rows.bytes_per_row() as f64 * c.num_hidden_layers as f64;
            writeln!(
                f,
                "  {:<38} {:>9} codes  {:>11}  {:>6.2}x MLA in {}",
                "MLA latent, --kv-cache int8",
                kv.mla,
                bytes_f64(int8),
                int8 / (kv.mla as f64 * b as f64),
                self.dtype_name
            )?;
        }
        if let Some(dsa) = &c.dsa {
            // The indexer key is cached beside the latent: f32 in an f32 cache, else bf16.
            let keys = dsa.index_head_dim.saturating_mul(c.num_hidden_layers);
            let key_bytes = if b == 4 { 4 } else { 2 };
            let size = keys as f64 * key_bytes as f64;
            let total = size + kv.mla as f64 * b as f64;
            writeln!(
                f,
                "  {:<38} {keys:>9} values {:>11}  {:>5.1}% of latent + key",
                "+ DSA indexer key  d_i l",
                bytes_f64(size),
                100.0 * size / total
            )?;
            writeln!(
                f,
                "  sparse attention: each query reads at most {} rows (index_topk); the indexer scores every row with {} \
                 heads of {}",
                dsa.index_topk, dsa.index_n_heads, dsa.index_head_dim
            )?;
        }
        write!(f, "  MLA saves {:.1}% of the MHA cache", 100.0 * (1.0 - kv.mla as f64 / kv.mha as f64))
    }
}

/// `1.23 B`, `45.6 M`, `789 K`.
pub fn human(n: usize) -> String {
    let x = n as f64;
    match n {
        _ if x >= 1e9 => format!("{:.2} B", x / 1e9),
        _ if x >= 1e6 => format!("{:.2} M", x / 1e6),
        _ if x >= 1e3 => format!("{:.1} K", x / 1e3),
        _ => n.to_string(),
    }
}

/// Bytes in binary units.
pub fn bytes(n: usize) -> String {
    bytes_f64(n as f64)
}

/// [`bytes`] for sizes computed in floating point: past `usize` too (TiB to EiB, then powers of
/// ten).
pub fn bytes_f64(x: f64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = x.max(0.0);
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{v} B"),
        1 => format!("{v:.1} KiB"),
        _ if v.is_finite() && v < 1024.0 => format!("{v:.2} {}", UNITS[unit]),
        _ => format!("{x:.1e} B"),
    }
}
