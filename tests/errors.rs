//! Bad input: every error names the file, the field or tensor, the value and what was expected.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{copy_fixture, set_config_value};
use latent::weights::Weights;
use latent::{Config, LogitRows, Model, Tokenizer};
use serde_json::json;

fn load_err(dir: &Path) -> String {
    match Model::load(dir, None, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn config_err(fixture: &str, field: &str, value: serde_json::Value) -> String {
    let dir = copy_fixture(fixture);
    set_config_value(dir.path(), field, value);
    match Config::from_file(&dir.path().join("config.json")) {
        Ok(_) => panic!("{field} should be refused"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(err: &str, needles: &[&str]) {
    for needle in needles {
        assert!(err.contains(needle), "`{needle}` missing from: {err}");
    }
}

#[test]
fn an_unknown_model_type_names_the_field_the_value_and_what_is_supported() {
    let err = config_err("tiny-v2", "model_type", json!("llama"));
    assert_mentions(&err, &["config.json", "model_type", "llama", "deepseek_v2", "deepseek_v3"]);
}

#[test]
fn an_unknown_topk_method_lists_the_known_ones() {
    let err = config_err("tiny-v2", "topk_method", json!("best"));
    assert_mentions(&err, &["config.json", "topk_method", "best", "group_limited_greedy", "noaux_tc"]);
}

#[test]
fn a_missing_required_field_is_named() {
    let dir = copy_fixture("tiny-v2");
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("kv_lora_rank");
    std::fs::write(&path, cfg.to_string()).unwrap();
    assert_mentions(&Config::from_file(&path).unwrap_err().to_string(), &["config.json", "kv_lora_rank"]);
}

#[test]
fn inconsistent_moe_sizes_are_refused_with_the_field_and_value() {
    assert_mentions(
        &config_err("tiny-v2", "num_experts_per_tok", json!(9)),
        &["num_experts_per_tok", "9", "n_routed_experts"],
    );
    assert_mentions(&config_err("tiny-v2", "topk_group", json!(5)), &["topk_group", "5", "n_group"]);
    assert_mentions(&config_err("tiny-v2", "n_group", json!(3)), &["n_group", "divisible", "8", "3"]);
    assert_mentions(&config_err("tiny-v3", "n_group", json!(8)), &["n_group", "noaux_tc"]);
    assert_mentions(&config_err("tiny-v2", "qk_rope_head_dim", json!(7)), &["qk_rope_head_dim", "even", "7"]);
    assert_mentions(&config_err("tiny-v2", "eos_token_id", json!(999)), &["eos_token_id", "999", "vocab_size"]);
    assert_mentions(&config_err("tiny-v2", "hidden_act", json!("gelu")), &["hidden_act", "gelu", "silu"]);
    assert_mentions(&config_err("tiny-v2", "num_hidden_layers", json!(-1)), &["num_hidden_layers", "-1"]);
    assert_mentions(
        &config_err("tiny-v2", "num_attention_heads", json!(1u64 << 40)),
        &["num_attention_heads", "1099511627776", "1048576"],
    );
}

#[test]
fn an_unsupported_rope_scaling_type_is_named() {
    let err = config_err("tiny-v2", "rope_scaling", json!({"type": "dynamic", "factor": 2.0}));
    assert_mentions(&err, &["rope_scaling.rope_type", "dynamic", "yarn"]);
    let err = config_err("tiny-v3", "rope_parameters", json!({"rope_type": "yarn", "rope_theta": 10000.0}));
    assert_mentions(&err, &["rope_parameters.factor", "required"]);
}

#[test]
fn sizes_that_disagree_with_the_tensors_name_the_tensor_and_both_shapes() {
    let dir = copy_fixture("tiny-v2");
    set_config_value(dir.path(), "kv_lora_rank", json!(24));
    let err = load_err(dir.path());
    assert_mentions(
        &err,
        &["model.safetensors", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "[32, 64]", "[40, 64]"],
    );
}

fn rewrite_tensors(path: &Path, edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn a_missing_tensor_is_named_with_its_expected_shape() {
    let dir = copy_fixture("tiny-v2");
    rewrite_tensors(&dir.path().join("model.safetensors"), |t| {
        t.remove("model.layers.2.mlp.experts.5.down_proj.weight");
    });
    assert_mentions(&load_err(dir.path()), &["model.layers.2.mlp.experts.5.down_proj.weight", "missing", "[64, 32]"]);
}

#[test]
fn a_tensor_of_an_unsupported_dtype_is_named() {
    let dir = copy_fixture("tiny-v2");
    rewrite_tensors(&dir.path().join("model.safetensors"), |t| {
        let name = "model.norm.weight".to_string();
        let v = t[&name].to_dtype(DType::U8).unwrap();
        t.insert(name, v);
    });
    assert_mentions(&load_err(dir.path()), &["model.norm.weight", "U8", "bf16, f16, f32"]);
}

#[test]
fn a_truncated_safetensors_file_is_refused() {
    let dir = copy_fixture("tiny-v2");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    assert_mentions(&load_err(dir.path()), &["model.safetensors", "not a valid safetensors file"]);
}

/// A safetensors file from a raw JSON header and `data_len` bytes of data.
fn raw_safetensors(header: &str, data_len: usize) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(vec![0u8; data_len]);
    bytes
}

#[test]
fn headers_with_overlapping_or_out_of_range_offsets_are_refused() {
    let overlapping = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let past_end = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let wrong_size = r#"{"a":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,8]}}"#;
    let bad_dtype = r#"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#;
    let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
    for (header, data, names) in [
        (overlapping, 12, &["`b`", "overlaps", "`a`"][..]),
        (past_end, 8, &["`a`", "[0, 16]", "8 bytes"][..]),
        (wrong_size, 8, &["`a`", "[1000000000000]", "4000000000000 bytes", "span 8 bytes"][..]),
        (bad_dtype, 8, &["`a`", "Q9"][..]),
        (gap, 12, &["`b`", "belong to no tensor"][..]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), raw_safetensors(header, data)).unwrap();
        let err = Weights::open(dir.path(), None, &Device::Cpu).err().expect("should fail").to_string();
        assert_mentions(&err, &["model.safetensors", "not a valid safetensors file"]);
        assert_mentions(&err, names);
    }
}

#[test]
fn a_header_length_larger_than_the_file_allocates_nothing_and_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = (u64::MAX / 2).to_le_bytes().to_vec();
    bytes.extend(b"{}");
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    let err = Weights::open(dir.path(), None, &Device::Cpu).err().expect("should fail").to_string();
    assert_mentions(&err, &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn garbage_files_never_panic() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for len in 0..300usize {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        if len >= 8 && len % 3 == 0 {
            bytes[..8].copy_from_slice(&((len as u64 - 8) / 2).to_le_bytes()); // a plausible header length
        }
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        assert!(Weights::open(dir.path(), None, &Device::Cpu).is_err());
    }
}

#[test]
fn the_same_tensor_in_two_shards_is_an_error_not_last_one_wins() {
    let dir = copy_fixture("tiny-v2-lite");
    let first = dir.path().join("model-00001-of-00005.safetensors");
    let stolen = candle_core::safetensors::load(&first, &Device::Cpu).unwrap().into_iter().next().unwrap();
    rewrite_tensors(&dir.path().join("model-00002-of-00005.safetensors"), |t| {
        t.insert(stolen.0.clone(), stolen.1.clone());
    });
    assert_mentions(
        &load_err(dir.path()),
        &[&stolen.0, "model-00001-of-00005.safetensors", "model-00002-of-00005.safetensors", "once"],
    );
}

fn rewrite_index(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut index);
    std::fs::write(&path, index.to_string()).unwrap();
}

#[test]
fn an_index_naming_a_missing_shard_or_a_path_outside_the_folder_is_refused() {
    for (shard, needles) in [
        ("model-00009-of-00009.safetensors", vec!["model-00009-of-00009.safetensors", "does not exist"]),
        ("../model.safetensors", vec!["../model.safetensors", "inside the model folder"]),
        ("/etc/passwd", vec!["/etc/passwd", "inside the model folder"]),
    ] {
        let dir = copy_fixture("tiny-v2-lite");
        rewrite_index(dir.path(), |index| index["weight_map"]["model.norm.weight"] = json!(shard));
        let mut all = vec!["model.safetensors.index.json", "weight_map"];
        all.extend(needles);
        assert_mentions(&load_err(dir.path()), &all);
    }
}

#[test]
fn an_index_that_places_a_tensor_in_the_wrong_shard_is_refused() {
    let dir = copy_fixture("tiny-v2-lite");
    let mut moved = String::new();
    rewrite_index(dir.path(), |index| {
        let map = index["weight_map"].as_object_mut().unwrap();
        let (name, file) = map.iter().find(|(_, f)| f.as_str() != Some("model-00005-of-00005.safetensors")).unwrap();
        moved = format!("{name} {file}");
        let name = name.clone();
        map.insert(name, json!("model-00005-of-00005.safetensors"));
    });
    let name = moved.split(' ').next().unwrap();
    assert_mentions(&load_err(dir.path()), &[name, "model-00005-of-00005.safetensors", "says the tensor is in"]);
}

#[test]
fn a_folder_without_a_checkpoint_says_what_it_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    assert_mentions(&load_err(dir.path()), &["config.json"]);
    std::fs::copy(common::fixtures_dir().join("tiny-v2/config.json"), dir.path().join("config.json")).unwrap();
    assert_mentions(&load_err(dir.path()), &["model.safetensors", "model.safetensors.index.json"]);
}

#[test]
fn a_broken_tokenizer_names_its_file_and_a_missing_special_token_its_field() {
    let dir = copy_fixture("tiny-v2");
    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    let err = Tokenizer::load(dir.path(), None).err().expect("should fail").to_string();
    assert_mentions(&err, &["tokenizer.json", "not a valid tokenizer.json"]);
    // A mutated tokenizer.json on which the tokenizers library panics in its decoder's
    // deserializer (found by tests/fuzz.rs): an error naming the file, not a panic.
    std::fs::copy(
        common::fixtures_dir().join("hostile/tokenizer-decoder-panic.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let err = Tokenizer::load(dir.path(), None).err().expect("should fail").to_string();
    assert_mentions(&err, &["tokenizer.json", "not a valid tokenizer.json", "failed on it"]);

    let dir = copy_fixture("tiny-v2");
    let path = dir.path().join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["bos_token"] = json!("<no-such-token>");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = Tokenizer::load(dir.path(), None).err().expect("should fail").to_string();
    assert_mentions(&err, &["tokenizer_config.json", "bos_token", "<no-such-token>"]);
}

#[test]
fn token_ids_outside_the_vocabulary_are_refused() {
    let (model, _) = Model::load(&common::fixtures_dir().join("tiny-v2"), None, &Device::Cpu).unwrap();
    let mut cache = model.new_cache().unwrap();
    let err =
        model.forward(&[3, 320], &mut cache, latent::AttentionPath::Expanded, LogitRows::Last).unwrap_err().to_string();
    assert_mentions(&err, &["320", "vocab_size"]);
    assert!(cache.is_empty(), "a refused forward must not touch the cache");
}

#[test]
fn a_tensor_missing_from_a_sharded_checkpoint_names_the_index() {
    let dir = copy_fixture("tiny-v2-lite");
    let name = "model.layers.0.self_attn.o_proj.weight";
    let mut shard = String::new();
    rewrite_index(dir.path(), |index| {
        let map = index["weight_map"].as_object_mut().unwrap();
        shard = map.remove(name).unwrap().as_str().unwrap().to_string();
    });
    rewrite_tensors(&dir.path().join(&shard), |t| {
        t.remove(name);
    });
    assert_mentions(&load_err(dir.path()), &["model.safetensors.index.json", name, "missing", "[64, 64]"]);
}

#[test]
fn fp8_problems_name_the_field_or_the_missing_scale() {
    assert_mentions(
        &config_err("tiny-v3-fp8", "quantization_config", json!({"quant_method": "awq"})),
        &["quantization_config.quant_method", "awq", "fp8"],
    );
    assert_mentions(
        &config_err(
            "tiny-v3-fp8",
            "quantization_config",
            json!({"quant_method": "fp8", "weight_block_size": [0, 128]}),
        ),
        &["quantization_config.weight_block_size", "[0, 128]"],
    );

    let dir = copy_fixture("tiny-v3-fp8");
    let name = "model.layers.1.self_attn.o_proj.weight";
    rewrite_tensors(&dir.path().join("model.safetensors"), |t| {
        t.remove(&format!("{name}_scale_inv"));
    });
    assert_mentions(&load_err(dir.path()), &[&format!("{name}_scale_inv"), "missing"]);

    let dir = copy_fixture("tiny-v3-fp8");
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(&path, cfg.to_string()).unwrap();
    assert_mentions(&load_err(dir.path()), &["F8_E4M3", "quantization_config"]);
}
