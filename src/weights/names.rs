//! Every Hugging Face / DeepSeek tensor name in one place.

/// Tensor names of one decoder layer: `model.layers.{i}.…`.
pub struct LayerNames {
    prefix: String,
}

/// Names of the layer at index `i`.
pub fn layer(i: usize) -> LayerNames {
    LayerNames { prefix: format!("model.layers.{i}") }
}

/// `model.embed_tokens.weight`
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
/// `model.norm.weight`
pub const FINAL_NORM: &str = "model.norm.weight";
/// `lm_head.weight`
pub const LM_HEAD: &str = "lm_head.weight";

impl LayerNames {
    fn name(&self, rest: &str) -> String {
        format!("{}.{rest}", self.prefix)
    }
    pub fn input_layernorm(&self) -> String {
        self.name("input_layernorm.weight")
    }
    pub fn post_attention_layernorm(&self) -> String {
        self.name("post_attention_layernorm.weight")
    }
    /// `self_attn.{proj}.weight` for q_proj, q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj.
    pub fn attn(&self, proj: &str) -> String {
        self.name(&format!("self_attn.{proj}.weight"))
    }
    /// `self_attn.{proj}.bias` (present when `attention_bias`).
    pub fn attn_bias(&self, proj: &str) -> String {
        self.name(&format!("self_attn.{proj}.bias"))
    }
    /// `self_attn.{norm}.weight` for q_a_layernorm, kv_a_layernorm.
    pub fn attn_norm(&self, norm: &str) -> String {
        self.name(&format!("self_attn.{norm}.weight"))
    }
    /// The lightning indexer's (V3.2) `self_attn.indexer.{rest}`: `wq_b.weight`, `wk.weight`,
    /// `k_norm.weight`, `k_norm.bias`, `weights_proj.weight`.
    pub fn indexer(&self, rest: &str) -> String {
        self.name(&format!("self_attn.indexer.{rest}"))
    }
    /// Dense layer: `mlp.{proj}.weight` for gate_proj, up_proj, down_proj.
    pub fn mlp(&self, proj: &str) -> String {
        self.name(&format!("mlp.{proj}.weight"))
    }
    /// Routed expert `e`: `mlp.experts.{e}.{proj}.weight`.
    pub fn expert(&self, e: usize, proj: &str) -> String {
        self.name(&format!("mlp.experts.{e}.{proj}.weight"))
    }
    /// Shared experts (fused into one SwiGLU): `mlp.shared_experts.{proj}.weight`.
    pub fn shared_expert(&self, proj: &str) -> String {
        self.name(&format!("mlp.shared_experts.{proj}.weight"))
    }
    /// A tensor of an MTP module (V3): `enorm.weight`, `hnorm.weight`, `eh_proj.weight`,
    /// `shared_head.norm.weight`, `shared_head.head.weight`, `embed_tokens.weight`.
    pub fn mtp(&self, rest: &str) -> String {
        self.name(rest)
    }
    /// `mlp.gate.weight`: the router.
    pub fn gate(&self) -> String {
        self.name("mlp.gate.weight")
    }
    /// `mlp.gate.e_score_correction_bias` (V3).
    pub fn gate_bias(&self) -> String {
        self.name("mlp.gate.e_score_correction_bias")
    }
}

/// Whether `name` belongs to a layer at index `>= first` (V3 keeps its MTP module there).
pub fn is_layer_at_or_past(name: &str, first: usize) -> bool {
    name.strip_prefix("model.layers.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
        .is_some_and(|i| i >= first)
}
