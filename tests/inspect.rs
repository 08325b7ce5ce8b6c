//! Parameter counts and KV-cache footprints.

mod common;

use std::path::Path;

use candle_core::Device;
use common::{fixtures_dir, MODELS};
use latent::inspect::{kv_footprint, param_counts};
use latent::weights::{names, Weights};
use latent::Config;

fn published(name: &str) -> Config {
    Config::from_file(&fixtures_dir().join("configs").join(name)).unwrap()
}

#[test]
fn parameter_counts_from_the_config_equal_the_checkpoint_tensors() {
    for name in MODELS {
        let dir = fixtures_dir().join(name);
        let config = Config::from_file(&dir.join("config.json")).unwrap();
        let weights = Weights::open(&dir, None, &Device::Cpu).unwrap();
        let stored: usize = weights
            .names()
            .into_iter()
            .filter(|n| !names::is_layer_at_or_past(n, config.num_hidden_layers))
            .map(|n| weights.shape(n).unwrap().iter().product::<usize>())
            .sum();
        assert_eq!(param_counts(&config).total, stored, "{name}");
    }
}

#[test]
fn v32_adds_the_lightning_indexer_to_v3() {
    // DeepSeek-V3.2-Exp is V3 plus, per layer, wq_b (1536 x 64·128), wk (7168 x 128), k_norm
    // (2 x 128) and weights_proj (7168 x 64): 13.97 M, 852 M over 61 layers.
    let (v3, v32) = (param_counts(&published("deepseek-v3.json")), param_counts(&published("deepseek-v3.2.json")));
    let per_layer = 1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64;
    assert_eq!(v32.total - v3.total, 61 * per_layer);
    assert_eq!(v32.active - v3.active, 61 * per_layer);
    let report = latent::inspect::Report {
        config: &published("deepseek-v3.2.json"),
        source: "config".into(),
        weights: None,
        dtype_bytes: 2,
        dtype_name: "BF16".into(),
    }
    .to_string();
    // 128 bf16 values per layer beside 576: 18.2% of what a token caches.
    assert!(report.contains("+ DSA indexer key") && report.contains("18.2% of latent + key"), "{report}");
    assert!(report.contains("at most 2048 rows"), "{report}");
}

#[test]
fn published_shapes_give_the_papers_parameter_counts() {
    // DeepSeek-V2 paper: 236B total, 21B activated; V2-Lite 15.7B and 2.4B; V3 paper: 671B and 37B.
    for (file, total, active) in
        [("deepseek-v2.json", 236.0, 21.0), ("deepseek-v2-lite.json", 15.7, 2.4), ("deepseek-v3.json", 671.0, 37.0)]
    {
        let p = param_counts(&published(file));
        let (t, a) = (p.total as f64 / 1e9, p.active as f64 / 1e9);
        assert!((t - total).abs() / total < 0.01, "{file}: total {t:.2} B, paper {total} B");
        assert!((a - active).abs() / active < 0.05, "{file}: active {a:.2} B, paper {active} B");
    }
}

#[test]
fn deepseek_v2_caches_576_values_per_layer_against_32768_for_mha() {
    let config = published("deepseek-v2.json");
    let kv = kv_footprint(&config);
    assert_eq!(kv.mla, 576 * 60);
    assert_eq!(kv.mha, 32768 * 60);
    let saving = 1.0 - kv.mla as f64 / kv.mha as f64;
    assert!(saving > 0.98, "{saving}");
    // The latent cache itself: 576 values x 60 layers x 2 bytes in bf16.
    let cache = latent::LatentCache::new(&config, candle_core::DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(cache.bytes_per_token(), 576 * 60 * 2);
    // The int8 cache: 576 codes, 4 latent scales and a RoPE scale of 4 bytes: 596 bytes a layer.
    let int8 = latent::LatentCache::with_kind(&config, latent::cache::CacheKind::Int8, &Device::Cpu).unwrap();
    assert_eq!(int8.bytes_per_token(), 596 * 60);
}

#[test]
fn yarn_changes_the_softmax_scale_by_mscale_squared() {
    let config = published("deepseek-v2.json");
    let m = 0.1 * 0.707 * 40f64.ln() + 1.0;
    assert!((config.softmax_scale() - m * m / 192f64.sqrt()).abs() < 1e-12);
    let plain: Config = Config::from_json(
        &std::fs::read_to_string(fixtures_dir().join("tiny-v2-lite/config.json")).unwrap(),
        Path::new("config.json"),
    )
    .unwrap();
    assert!((plain.softmax_scale() - 1.0 / 24f64.sqrt()).abs() < 1e-12);
}

/// Sizes at the validator's extreme bounds: the counts are computed in checked arithmetic, and a
/// count past the word size is reported as such, not wrapped into a small wrong number.
#[test]
fn extreme_sizes_are_counted_without_overflow() {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("tiny-v2/config.json")).unwrap()).unwrap();
    let big = latent::config::MAX_SIZE;
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "kv_lora_rank",
        "q_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "moe_intermediate_size",
        "n_routed_experts",
        "n_shared_experts",
    ] {
        json[key] = big.into();
    }
    json["vocab_size"] = latent::config::MAX_LENGTH.into();
    json["n_group"] = 1.into();
    json["topk_group"] = 1.into();
    let config = Config::from_json(&json.to_string(), Path::new("<test>")).unwrap();
    assert_eq!(latent::inspect::try_param_counts(&config), None);
    assert_eq!(param_counts(&config).total, usize::MAX, "saturates");
    let report = latent::inspect::Report {
        config: &config,
        source: "<test>".into(),
        weights: None,
        dtype_bytes: 4,
        dtype_name: "F32".into(),
    }
    .to_string();
    assert!(report.contains("more than 2^64"), "{report}");
    assert!(report.contains("EiB"), "{report}");
    // A large config that fits is counted exactly: the embedding alone is vocab x hidden.
    json["num_hidden_layers"] = 2.into();
    json["n_routed_experts"] = 4.into();
    json["n_shared_experts"] = 1.into();
    json["hidden_size"] = 4096.into();
    let config = Config::from_json(&json.to_string(), Path::new("<test>")).unwrap();
    let p = latent::inspect::try_param_counts(&config).unwrap();
    assert_eq!(p.embedding, latent::config::MAX_LENGTH * 4096);
}
