//! The trainable tensors of a config, by their Hugging Face names: the table, the initialisation
//! (as transformers' `_init_weights`: matrices `N(0, initializer_range)`, norms 1, biases 0), and
//! the variables a model is built from.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::config::{Config, TopkMethod};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::weights::{names, Weights};

/// What a tensor is, which decides its initialisation and whether weight decay applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A projection or embedding: `N(0, initializer_range)`, decayed.
    Matrix,
    /// An RMSNorm weight: ones, not decayed.
    Norm,
    /// A linear bias: zeros, not decayed.
    Bias,
}

/// One trainable tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
}

impl ParamSpec {
    fn new(name: String, shape: &[usize], kind: ParamKind) -> ParamSpec {
        ParamSpec { name, shape: shape.to_vec(), kind }
    }

    /// Elements in the tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Every trainable tensor of `cfg`, including its `num_nextn_predict_layers` MTP modules, in a fixed
/// order. The V3 router bias is not here: it is moved by the balance rule, not by gradients.
pub fn param_specs(cfg: &Config) -> Vec<ParamSpec> {
    use ParamKind::*;
    let (h, v, heads) = (cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads);
    let (d_n, d_r, d_v, d_c) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
    let mut specs = vec![ParamSpec::new(names::EMBED_TOKENS.into(), &[v, h], Matrix)];
    let layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers;
    for i in 0..layers {
        let n = names::layer(i);
        if i >= cfg.num_hidden_layers {
            specs.push(ParamSpec::new(n.mtp("enorm.weight"), &[h], Norm));
            specs.push(ParamSpec::new(n.mtp("hnorm.weight"), &[h], Norm));
            specs.push(ParamSpec::new(n.mtp("eh_proj.weight"), &[h, 2 * h], Matrix));
            specs.push(ParamSpec::new(n.mtp("shared_head.norm.weight"), &[h], Norm));
        }
        specs.push(ParamSpec::new(n.input_layernorm(), &[h], Norm));
        let mut linear = |proj: &str, out: usize, inp: usize, bias: bool| {
            specs.push(ParamSpec::new(n.attn(proj), &[out, inp], Matrix));
            if bias && cfg.attention_bias {
                specs.push(ParamSpec::new(n.attn_bias(proj), &[out], Bias));
            }
        };
        match cfg.q_lora_rank {
            Some(r) => {
                linear("q_a_proj", r, h, true);
                linear("q_b_proj", heads * (d_n + d_r), r, false);
            }
            None => linear("q_proj", heads * (d_n + d_r), h, false),
        }
        linear("kv_a_proj_with_mqa", d_c + d_r, h, true);
        linear("kv_b_proj", heads * (d_n + d_v), d_c, false);
        linear("o_proj", h, heads * d_v, true);
        if let Some(r) = cfg.q_lora_rank {
            specs.push(ParamSpec::new(n.attn_norm("q_a_layernorm"), &[r], Norm));
        }
        specs.push(ParamSpec::new(n.attn_norm("kv_a_layernorm"), &[d_c], Norm));
        specs.push(ParamSpec::new(n.post_attention_layernorm(), &[h], Norm));
        let mlp = |specs: &mut Vec<ParamSpec>, name: &dyn Fn(&str) -> String, inter: usize| {
            specs.push(ParamSpec::new(name("gate_proj"), &[inter, h], Matrix));
            specs.push(ParamSpec::new(name("up_proj"), &[inter, h], Matrix));
            specs.push(ParamSpec::new(name("down_proj"), &[h, inter], Matrix));
        };
        match &cfg.moe {
            Some(m) if cfg.is_moe_layer(i) => {
                specs.push(ParamSpec::new(n.gate(), &[m.n_routed_experts, h], Matrix));
                for e in 0..m.n_routed_experts {
                    mlp(&mut specs, &|p| n.expert(e, p), m.moe_intermediate_size);
                }
                if m.n_shared_experts > 0 {
                    mlp(&mut specs, &|p| n.shared_expert(p), m.moe_intermediate_size * m.n_shared_experts);
                }
            }
            _ => mlp(&mut specs, &|p| n.mlp(p), cfg.intermediate_size),
        }
    }
    specs.push(ParamSpec::new(names::FINAL_NORM.into(), &[h], Norm));
    if !cfg.tie_word_embeddings {
        specs.push(ParamSpec::new(names::LM_HEAD.into(), &[v, h], Matrix));
    }
    specs
}

/// Names of the V3 router biases (`e_score_correction_bias`) of `cfg`'s MoE layers, MTP included.
pub fn router_bias_names(cfg: &Config) -> Vec<(usize, String)> {
    let Some(moe) = &cfg.moe else { return Vec::new() };
    if moe.topk_method != TopkMethod::NoauxTc {
        return Vec::new();
    }
    (0..cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
        .filter(|&i| cfg.is_moe_layer(i))
        .map(|i| (i, names::layer(i).gate_bias()))
        .collect()
}

/// A small deterministic generator (SplitMix64) for initialisation and shuffling.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// A uniformly random index below `n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
}

/// The trainable state of a model: one f32 variable per [`ParamSpec`], and the router biases.
pub struct Params {
    pub specs: Vec<ParamSpec>,
    pub vars: Vec<Var>,
    /// `(layer, bias)` of every V3 router bias.
    pub router_bias: Vec<(usize, Vec<f32>)>,
}

impl Params {
    /// Fresh initialisation of `cfg` from `seed`.
    pub fn init(cfg: &Config, seed: u64, device: &Device) -> Result<Params> {
        let specs = param_specs(cfg);
        let mut vars = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let values: Vec<f32> = match spec.kind {
                ParamKind::Norm => vec![1.0; spec.numel()],
                ParamKind::Bias => vec![0.0; spec.numel()],
                ParamKind::Matrix => {
                    let mut rng = SplitMix::new(seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
                    (0..spec.numel()).map(|_| (rng.normal() * cfg.initializer_range) as f32).collect()
                }
            };
            vars.push(Var::from_tensor(&Tensor::from_vec(values, spec.shape.as_slice(), device)?)?);
        }
        let router_bias = router_bias_names(cfg)
            .into_iter()
            .map(|(i, _)| (i, vec![0.0; cfg.moe.as_ref().map_or(0, |m| m.n_routed_experts)]))
            .collect();
        Ok(Params { specs, vars, router_bias })
    }

    /// Reads every parameter of `cfg` from the checkpoint in `dir` (as f32).
    pub fn load(cfg: &Config, dir: &Path, device: &Device) -> Result<Params> {
        let w = Weights::open(dir, Some(DType::F32), device)?.with_fp8_block(cfg.fp8_block);
        let specs = param_specs(cfg);
        let mut vars = Vec::with_capacity(specs.len());
        for spec in &specs {
            vars.push(Var::from_tensor(&w.get(&spec.name, &spec.shape)?)?);
        }
        let n_experts = cfg.moe.as_ref().map_or(0, |m| m.n_routed_experts);
        let mut router_bias = Vec::new();
        for (i, name) in router_bias_names(cfg) {
            let bias = if w.contains(&name) { w.get(&name, &[n_experts])?.to_vec1()? } else { vec![0.0; n_experts] };
            router_bias.push((i, bias));
        }
        Ok(Params { specs, vars, router_bias })
    }

    /// Replaces every variable's value with `values` (same order and sizes as `specs`).
    pub fn set_values(&self, values: &[Vec<f32>]) -> Result<()> {
        for ((var, spec), v) in self.vars.iter().zip(&self.specs).zip(values) {
            var.set(&Tensor::from_slice(v, spec.shape.as_slice(), var.device())?)?;
        }
        Ok(())
    }

    /// The current values, flattened.
    pub fn values(&self) -> Result<Vec<Vec<f32>>> {
        self.vars.iter().map(|v| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?)).collect()
    }

    /// A model whose weights are these variables (gradients flow into them), MTP modules included.
    pub fn build_model(&self, cfg: &Config) -> Result<Model> {
        let device = self.vars.first().map(|v| v.device().clone()).unwrap_or(Device::Cpu);
        let mut map: HashMap<String, Tensor> =
            self.specs.iter().zip(&self.vars).map(|(s, v)| (s.name.clone(), v.as_tensor().clone())).collect();
        for (i, bias) in &self.router_bias {
            map.insert(names::layer(*i).gate_bias(), Tensor::from_slice(bias, bias.len(), &device)?);
        }
        let w = Weights::from_tensors(map, Path::new("<training variables>"), &device);
        Model::from_weights_with_mtp(cfg.clone(), &w)
    }

    /// All tensors to save, in the published layout: the variables, the router biases, and for each
    /// MTP module the copies of the embedding and output head that V3 checkpoints carry
    /// (`model.layers.{L+k}.embed_tokens.weight`, `shared_head.head.weight`).
    pub fn checkpoint_tensors(&self, cfg: &Config, dtype: DType) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (spec, var) in self.specs.iter().zip(&self.vars) {
            out.insert(spec.name.clone(), var.as_tensor().detach().to_dtype(dtype)?);
        }
        let device = self.vars.first().map(|v| v.device().clone()).unwrap_or(Device::Cpu);
        for (i, bias) in &self.router_bias {
            // The bias stays f32 whatever the weights' dtype, as in the published V3 checkpoints.
            out.insert(names::layer(*i).gate_bias(), Tensor::from_slice(bias, bias.len(), &device)?);
        }
        for k in 0..cfg.num_nextn_predict_layers {
            let n = names::layer(cfg.num_hidden_layers + k);
            let embed = out.get(names::EMBED_TOKENS).cloned();
            let head = if cfg.tie_word_embeddings { embed.clone() } else { out.get(names::LM_HEAD).cloned() };
            if let (Some(embed), Some(head)) = (embed, head) {
                out.insert(n.mtp("embed_tokens.weight"), embed);
                out.insert(n.mtp("shared_head.head.weight"), head);
            }
        }
        Ok(out)
    }

    /// Total trainable elements.
    pub fn numel(&self) -> usize {
        self.specs.iter().map(ParamSpec::numel).sum()
    }

    /// The index of `name` in `specs`.
    pub fn index_of(&self, name: &str) -> Result<usize> {
        self.specs
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| Error::InvalidArgument(format!("no parameter named `{name}`")))
    }
}
