//! A GGUF file of llama.cpp's `deepseek2` architecture as a latent checkpoint: its metadata as a
//! `config.json`, its tensors under the Hugging Face names, its vocabulary as a tokenizer.
//!
//! Tensor names (`blk.N.` is `model.layers.N.`):
//!
//! | GGUF | Hugging Face |
//! |---|---|
//! | `token_embd`, `output_norm`, `output` | `model.embed_tokens`, `model.norm`, `lm_head` |
//! | `attn_norm`, `ffn_norm` | `input_layernorm`, `post_attention_layernorm` |
//! | `attn_q` or `attn_q_a`, `attn_q_a_norm`, `attn_q_b` | `self_attn.q_proj` or `q_a_proj`, `q_a_layernorm`, `q_b_proj` |
//! | `attn_kv_a_mqa`, `attn_kv_a_norm`, `attn_output` | `kv_a_proj_with_mqa`, `kv_a_layernorm`, `o_proj` |
//! | `attn_kv_b`, or `attn_k_b` + `attn_v_b` | `kv_b_proj` |
//! | `ffn_gate`, `ffn_up`, `ffn_down` | `mlp.gate_proj`, `up_proj`, `down_proj` (dense layers) |
//! | `ffn_{gate,up,down}_exps` (one 3-d tensor) | `mlp.experts.{e}.{gate,up,down}_proj` |
//! | `ffn_{gate,up,down}_shexp`, `ffn_gate_inp`, `exp_probs_b` | `mlp.shared_experts.*`, `mlp.gate`, `mlp.gate.e_score_correction_bias` |
//!
//! | `nextn.eh_proj`, `nextn.enorm`, `nextn.hnorm` | `eh_proj`, `enorm`, `hnorm` (an MTP block) |
//! | `nextn.shared_head_norm`, `nextn.shared_head_head`, `nextn.embed_tokens` | `shared_head.norm`, `shared_head.head`, `embed_tokens` |
//!
//! The multi-token-prediction modules, where a file carries them, are the last
//! `deepseek2.nextn_predict_layers` of the `block_count` blocks (llama.cpp's convention).
//!
//! Newer converters split `kv_b_proj` per head into `attn_k_b` `(H, kv_lora, nope)` (transposed,
//! for absorbed attention) and `attn_v_b` `(H, v, kv_lora)`; they are joined back here, which is
//! exact whatever their format (they are dequantized first).

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Map, Value as Json};

use super::gguf::{GgmlType, GgufFile, TensorInfo, Value};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// The architecture latent reads.
pub const ARCH: &str = "deepseek2";

/// A tensor as the checkpoint presents it: a byte range of the file under a Hugging Face name.
#[derive(Debug, Clone)]
pub struct Mapped {
    pub name: String,
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    pub start: usize,
    pub len: usize,
}

/// `kv_b_proj` of layer `layer` to be assembled from `attn_k_b` and `attn_v_b`.
#[derive(Debug, Clone)]
pub struct SplitKvB {
    pub layer: usize,
    pub k_b: TensorInfo,
    pub v_b: TensorInfo,
}

fn meta<'a>(g: &'a GgufFile, key: &str) -> Option<&'a Value> {
    g.get(&format!("{ARCH}.{key}"))
}

fn required_u64(g: &GgufFile, key: &str) -> Result<u64> {
    let full = format!("{ARCH}.{key}");
    match g.get(&full) {
        Some(v) => v.as_u64().ok_or_else(|| {
            Error::gguf(&g.path, format!("metadata `{full}` is {}, expected an unsigned integer", v.describe()))
        }),
        None => Err(Error::gguf(&g.path, format!("metadata `{full}` is missing"))),
    }
}

fn optional_u64(g: &GgufFile, key: &str) -> Result<Option<u64>> {
    match meta(g, key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            Error::gguf(&g.path, format!("metadata `{ARCH}.{key}` is {}, expected an unsigned integer", v.describe()))
        }),
    }
}

fn optional_f64(g: &GgufFile, key: &str) -> Result<Option<f64>> {
    match meta(g, key) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| {
            Error::gguf(&g.path, format!("metadata `{ARCH}.{key}` is {}, expected a number", v.describe()))
        }),
    }
}

/// Checks `general.architecture`.
pub fn check_arch(g: &GgufFile) -> Result<()> {
    match g.get("general.architecture").and_then(Value::as_str) {
        Some(ARCH) => Ok(()),
        Some(other) => Err(Error::gguf(
            &g.path,
            format!("general.architecture is `{other}`; latent runs `{ARCH}` (DeepSeek-V2/V3) files"),
        )),
        None => Err(Error::gguf(&g.path, "metadata `general.architecture` is missing")),
    }
}

fn has_tensor(g: &GgufFile, name: &str) -> bool {
    g.tensors.iter().any(|t| t.name == name)
}

/// The checkpoint's `config.json`, from the metadata (the JSON `Config::from_json` reads).
pub fn config_json(g: &GgufFile) -> Result<Json> {
    check_arch(g)?;
    let n_layers = required_u64(g, "block_count")?;
    // Multi-token-prediction modules are the last `nextn_predict_layers` blocks of `block_count`.
    let nextn = optional_u64(g, "nextn_predict_layers")?.unwrap_or(0);
    if nextn >= n_layers {
        return Err(Error::gguf(
            &g.path,
            format!(
                "metadata `{ARCH}.nextn_predict_layers` is {nextn}, expected fewer than block_count ({n_layers}): \
                 the MTP modules come after the model's own layers"
            ),
        ));
    }
    let rope_dim = required_u64(g, "rope.dimension_count")?;
    // Newer files give the per-head MLA sizes under `*_mla` (the plain ones then describe the
    // absorbed, MQA-like form); older files give them in the plain keys.
    let key_length = match optional_u64(g, "attention.key_length_mla")? {
        Some(k) => k,
        None => required_u64(g, "attention.key_length")?,
    };
    let v_head_dim = match optional_u64(g, "attention.value_length_mla")? {
        Some(v) => v,
        None => required_u64(g, "attention.value_length")?,
    };
    let Some(nope) = key_length.checked_sub(rope_dim).filter(|&n| n > 0) else {
        return Err(Error::gguf(
            &g.path,
            format!("key length {key_length} is not larger than rope.dimension_count {rope_dim}"),
        ));
    };
    let vocab = match optional_u64(g, "vocab_size")? {
        Some(v) => v,
        None => g.get("tokenizer.ggml.tokens").and_then(Value::as_array).map_or(0, |t| t.len() as u64),
    };
    let experts = optional_u64(g, "expert_count")?.unwrap_or(0);
    let sigmoid = optional_u64(g, "expert_gating_func")? == Some(2);
    let n_group = optional_u64(g, "expert_group_count")?.unwrap_or(1).max(1);
    let topk_group = optional_u64(g, "expert_group_used_count")?.unwrap_or(n_group);
    let has_bias = (0..n_layers).any(|i| has_tensor(g, &format!("blk.{i}.exp_probs_b.bias")));
    let topk_method = if has_bias {
        "noaux_tc"
    } else if n_group > 1 {
        "group_limited_greedy"
    } else {
        "greedy"
    };
    let mut c = Map::new();
    c.insert("architectures".into(), json!([if sigmoid { "DeepseekV3ForCausalLM" } else { "DeepseekV2ForCausalLM" }]));
    c.insert("model_type".into(), json!(if sigmoid || has_bias { "deepseek_v3" } else { "deepseek_v2" }));
    c.insert("vocab_size".into(), json!(vocab));
    c.insert("hidden_size".into(), json!(required_u64(g, "embedding_length")?));
    c.insert("intermediate_size".into(), json!(required_u64(g, "feed_forward_length")?));
    c.insert("num_hidden_layers".into(), json!(n_layers - nextn));
    if nextn > 0 {
        c.insert("num_nextn_predict_layers".into(), json!(nextn));
    }
    c.insert("num_attention_heads".into(), json!(required_u64(g, "attention.head_count")?));
    c.insert("q_lora_rank".into(), json!(optional_u64(g, "attention.q_lora_rank")?.filter(|&r| r > 0)));
    c.insert("kv_lora_rank".into(), json!(required_u64(g, "attention.kv_lora_rank")?));
    c.insert("qk_nope_head_dim".into(), json!(nope));
    c.insert("qk_rope_head_dim".into(), json!(rope_dim));
    c.insert("v_head_dim".into(), json!(v_head_dim));
    c.insert("max_position_embeddings".into(), json!(required_u64(g, "context_length")?));
    c.insert("rms_norm_eps".into(), json!(optional_f64(g, "attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6)));
    c.insert("tie_word_embeddings".into(), json!(!has_tensor(g, "output.weight")));
    if experts > 0 {
        c.insert("n_routed_experts".into(), json!(experts));
        c.insert("n_shared_experts".into(), json!(optional_u64(g, "expert_shared_count")?.unwrap_or(0)));
        c.insert("num_experts_per_tok".into(), json!(required_u64(g, "expert_used_count")?));
        c.insert("moe_intermediate_size".into(), json!(required_u64(g, "expert_feed_forward_length")?));
        c.insert("first_k_dense_replace".into(), json!(optional_u64(g, "leading_dense_block_count")?.unwrap_or(0)));
        c.insert("moe_layer_freq".into(), json!(1));
        c.insert("routed_scaling_factor".into(), json!(optional_f64(g, "expert_weights_scale")?.unwrap_or(1.0)));
        let norm = meta(g, "expert_weights_norm").and_then(Value::as_bool).unwrap_or(false);
        c.insert("norm_topk_prob".into(), json!(norm));
        c.insert("scoring_func".into(), json!(if sigmoid { "sigmoid" } else { "softmax" }));
        c.insert("topk_method".into(), json!(topk_method));
        c.insert("n_group".into(), json!(n_group));
        c.insert("topk_group".into(), json!(topk_group));
    }
    let theta = optional_f64(g, "rope.freq_base")?.unwrap_or(10000.0);
    c.insert("rope_theta".into(), json!(theta));
    let scaling = meta(g, "rope.scaling.type").and_then(Value::as_str);
    match scaling {
        None | Some("none") => {}
        Some("yarn") => {
            let factor = optional_f64(g, "rope.scaling.factor")?.unwrap_or(1.0);
            let original = optional_u64(g, "rope.scaling.original_context_length")?;
            // llama.cpp keeps `0.1 * mscale_all_dim` as an f32 (DeepSeek's checkpoints have mscale
            // equal to it); rounding to 6 decimals gives back the published value (0.707, 1.0).
            let mscale = optional_f64(g, "rope.scaling.yarn_log_multiplier")?.map(|m| (m / 0.1 * 1e6).round() / 1e6);
            let mut y = Map::new();
            y.insert("type".into(), json!("yarn"));
            y.insert("factor".into(), json!(factor));
            if let Some(o) = original {
                y.insert("original_max_position_embeddings".into(), json!(o));
            }
            y.insert("beta_fast".into(), json!(optional_f64(g, "rope.scaling.yarn_beta_fast")?.unwrap_or(32.0)));
            y.insert("beta_slow".into(), json!(optional_f64(g, "rope.scaling.yarn_beta_slow")?.unwrap_or(1.0)));
            if let Some(m) = mscale {
                y.insert("mscale".into(), json!(m));
                y.insert("mscale_all_dim".into(), json!(m));
            }
            c.insert("rope_scaling".into(), Json::Object(y));
        }
        Some(other) => {
            return Err(Error::gguf(
                &g.path,
                format!("metadata `{ARCH}.rope.scaling.type` is `{other}`; expected `yarn` or none"),
            ))
        }
    }
    let token_id = |key: &str| g.get(key).and_then(Value::as_u64);
    if let Some(bos) = token_id("tokenizer.ggml.bos_token_id") {
        c.insert("bos_token_id".into(), json!(bos));
    }
    if let Some(eos) = token_id("tokenizer.ggml.eos_token_id") {
        c.insert("eos_token_id".into(), json!(eos));
    }
    Ok(Json::Object(c))
}

/// The validated configuration.
pub fn config(g: &GgufFile) -> Result<Config> {
    let text = config_json(g)?.to_string();
    Config::from_json(&text, &g.path)
}

/// GGUF name of a layer tensor -> Hugging Face name, for the 2-d and 1-d tensors mapped one to one.
fn hf_layer_name(rest: &str) -> Option<&'static str> {
    Some(match rest {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_q_a.weight" => "self_attn.q_a_proj.weight",
        "attn_q_a_norm.weight" => "self_attn.q_a_layernorm.weight",
        "attn_q_b.weight" => "self_attn.q_b_proj.weight",
        "attn_kv_a_mqa.weight" => "self_attn.kv_a_proj_with_mqa.weight",
        "attn_kv_a_norm.weight" => "self_attn.kv_a_layernorm.weight",
        "attn_kv_b.weight" => "self_attn.kv_b_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "ffn_gate_shexp.weight" => "mlp.shared_experts.gate_proj.weight",
        "ffn_up_shexp.weight" => "mlp.shared_experts.up_proj.weight",
        "ffn_down_shexp.weight" => "mlp.shared_experts.down_proj.weight",
        "ffn_gate_inp.weight" => "mlp.gate.weight",
        "exp_probs_b.bias" => "mlp.gate.e_score_correction_bias",
        // A multi-token-prediction block (llama.cpp's `nextn` names): its own tensors beside an
        // ordinary decoder layer's.
        "nextn.eh_proj.weight" => "eh_proj.weight",
        "nextn.enorm.weight" => "enorm.weight",
        "nextn.hnorm.weight" => "hnorm.weight",
        "nextn.shared_head_norm.weight" => "shared_head.norm.weight",
        "nextn.shared_head_head.weight" => "shared_head.head.weight",
        "nextn.embed_tokens.weight" => "embed_tokens.weight",
        _ => return None,
    })
}

/// Every tensor under its Hugging Face name (experts one by one), the `kv_b_proj`s to assemble,
/// and the GGUF tensors that have no place in the model.
pub fn map_tensors(g: &GgufFile) -> Result<(Vec<Mapped>, Vec<SplitKvB>, Vec<String>)> {
    let mut mapped = Vec::new();
    let mut unknown = Vec::new();
    let mut halves: HashMap<usize, (Option<TensorInfo>, Option<TensorInfo>)> = HashMap::new();
    for t in &g.tensors {
        let whole = |name: &str| Mapped {
            name: name.to_string(),
            shape: t.shape(),
            ggml_type: t.ggml_type,
            start: t.start,
            len: t.len,
        };
        match t.name.as_str() {
            "token_embd.weight" => mapped.push(whole(super::names::EMBED_TOKENS)),
            "output_norm.weight" => mapped.push(whole(super::names::FINAL_NORM)),
            "output.weight" => mapped.push(whole(super::names::LM_HEAD)),
            name => {
                let parsed = name.strip_prefix("blk.").and_then(|r| r.split_once('.'));
                let Some((layer, rest)) = parsed.and_then(|(i, r)| i.parse::<usize>().ok().map(|i| (i, r))) else {
                    unknown.push(name.to_string());
                    continue;
                };
                let prefix = format!("model.layers.{layer}");
                if let Some(hf) = hf_layer_name(rest) {
                    mapped.push(whole(&format!("{prefix}.{hf}")));
                } else if let Some(proj) = rest.strip_suffix("_exps.weight").and_then(|p| p.strip_prefix("ffn_")) {
                    // (E, out, in): one byte range per expert.
                    let shape = t.shape();
                    if shape.len() != 3 {
                        return Err(Error::gguf(&g.path, format!("tensor `{name}` has shape {shape:?}, expected 3-d")));
                    }
                    let per_expert = t.len / shape[0];
                    for e in 0..shape[0] {
                        mapped.push(Mapped {
                            name: format!("{prefix}.mlp.experts.{e}.{proj}_proj.weight"),
                            shape: shape[1..].to_vec(),
                            ggml_type: t.ggml_type,
                            start: t.start + e * per_expert,
                            len: per_expert,
                        });
                    }
                } else if rest == "attn_k_b.weight" {
                    halves.entry(layer).or_default().0 = Some(t.clone());
                } else if rest == "attn_v_b.weight" {
                    halves.entry(layer).or_default().1 = Some(t.clone());
                } else {
                    unknown.push(name.to_string());
                }
            }
        }
    }
    let mut split = Vec::new();
    let mut layers: Vec<usize> = halves.keys().copied().collect();
    layers.sort_unstable();
    for layer in layers {
        match halves.remove(&layer) {
            Some((Some(k_b), Some(v_b))) => split.push(SplitKvB { layer, k_b, v_b }),
            _ => {
                return Err(Error::gguf(
                    &g.path,
                    format!("layer {layer} has only one of attn_k_b and attn_v_b; both are needed for kv_b_proj"),
                ))
            }
        }
    }
    Ok((mapped, split, unknown))
}

/// `kv_b_proj (H·(nope + v), kv_lora)` from `k_b (H, kv_lora, nope)` and `v_b (H, v, kv_lora)`
/// (their values, row-major): per head, the transposed `k_b` rows, then the `v_b` rows.
pub fn join_kv_b(k_b: &[f32], v_b: &[f32], heads: usize, rank: usize, nope: usize, v: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(heads * (nope + v) * rank);
    for h in 0..heads {
        let k = &k_b[h * rank * nope..(h + 1) * rank * nope];
        for n in 0..nope {
            out.extend((0..rank).map(|r| k[r * nope + n]));
        }
        out.extend_from_slice(&v_b[h * v * rank..(h + 1) * v * rank]);
    }
    out
}

/// The pre-tokenizer of `tokenizer.ggml.pre`, as tokenizer.json writes it.
fn pre_tokenizer(pre: &str) -> Option<Json> {
    let byte_level =
        |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    let splits = |patterns: &[&str]| {
        let mut seq: Vec<Json> = patterns
            .iter()
            .map(|p| json!({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false}))
            .collect();
        seq.push(byte_level(false));
        json!({"type": "Sequence", "pretokenizers": seq})
    };
    Some(match pre {
        // GPT-2's regex, which the ByteLevel pre-tokenizer applies itself.
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        // DeepSeek-V3 / R1 (`tokenizer.json` as published).
        "deepseek-v3" => splits(&[
            r"\p{N}{1,3}",
            "[一-龥\u{3040}-ゟ゠-ヿ]+",
            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
        ]),
        // DeepSeek-LLM / V2.
        "deepseek-llm" => splits(&[
            "[\r\n]",
            "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
            "\\s?[!-/:-~！-／：-～‘-‟\u{3000}-。]+",
            "\\s+$",
            "[一-龥ࠀ-一가-퟿]+",
            "\\p{N}+",
        ]),
        _ => return None,
    })
}

/// The tokenizer stored in the metadata (`tokenizer.ggml.*`, byte-level BPE as llama.cpp's
/// converter writes DeepSeek's), with BOS/EOS and `tokenizer.chat_template`.
pub fn tokenizer(g: &GgufFile) -> Result<Tokenizer> {
    let err = |reason: String| Error::gguf(&g.path, reason);
    match g.get("tokenizer.ggml.model").and_then(Value::as_str) {
        Some("gpt2") => {}
        Some(other) => {
            return Err(err(format!("tokenizer.ggml.model is `{other}`; latent reads byte-level BPE (`gpt2`)")))
        }
        None => return Err(err("metadata `tokenizer.ggml.model` is missing: the file has no tokenizer".into())),
    }
    let pre_name = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    let Some(pre) = pre_tokenizer(pre_name) else {
        return Err(err(format!(
            "tokenizer.ggml.pre is `{pre_name}`; latent knows `default`, `gpt-2`, `deepseek-llm` and `deepseek-v3`"
        )));
    };
    let strings = |key: &str| -> Result<Vec<&str>> {
        let Some(items) = g.get(key).and_then(Value::as_array) else {
            return Err(err(format!("metadata `{key}` is missing or not an array")));
        };
        items.iter().map(|v| v.as_str().ok_or_else(|| err(format!("`{key}` holds a non-string")))).collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = match g.get("tokenizer.ggml.merges") {
        Some(_) => strings("tokenizer.ggml.merges")?,
        None => Vec::new(),
    };
    let types: Vec<u64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(t) if t.len() == tokens.len() => t.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        Some(t) => {
            return Err(err(format!("tokenizer.ggml.token_type has {} entries for {} tokens", t.len(), tokens.len())))
        }
        None => vec![1; tokens.len()],
    };
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, (tok, &kind)) in tokens.iter().zip(&types).enumerate() {
        if vocab.insert(tok.to_string(), json!(id)).is_some() {
            return Err(err(format!("tokenizer.ggml.tokens lists `{tok}` twice")));
        }
        // 3: control (BOS, EOS, chat markers), 4: user-defined.
        if kind == 3 || kind == 4 {
            added.push(json!({"id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": kind == 3}));
        }
    }
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    });
    let id = |key: &str| g.get(key).and_then(Value::as_u64).map(|v| v as u32);
    let bos = id("tokenizer.ggml.bos_token_id");
    let eos: Vec<u32> = id("tokenizer.ggml.eos_token_id").into_iter().collect();
    let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(bos.is_some());
    let template = g.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string);
    Tokenizer::from_settings(tokenizer.to_string().as_bytes(), &g.path, bos, eos, add_bos, template)
}

/// Whether `path` names a GGUF file rather than a checkpoint folder.
pub fn is_gguf_path(path: &Path) -> bool {
    super::gguf::is_gguf(path)
}
