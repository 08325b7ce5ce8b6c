//! DeepSeek-V3.2's sparse attention (DSA) against transformers' `deepseek_v32` (tests/fixtures/
//! tiny-v32: `index_topk` 6 of up to 32 positions). The parity tests every fixture takes are in
//! golden.rs, generate.rs, step.rs and batch.rs; these are the ones particular to the selection.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, Fixture, Tol};
use latent::cache::CacheKind;
use latent::{AttentionPath, LogitRows, Model, Workspace};

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn dense_attention_fails_the_v32_fixture() {
    // With the selection disabled (a top-k past the sequence), every query attends to every
    // earlier row: a dense implementation. It must miss the reference, or the fixture proves
    // nothing about the selection.
    let fx = Fixture::load("tiny-v32");
    let dir = common::copy_fixture("tiny-v32");
    common::set_config_value(dir.path(), "index_topk", serde_json::json!(1 << 20));
    let (dense, _) = Model::load(dir.path(), None, &Device::Cpu).unwrap();
    let (sparse, _) = Model::load(&fx.dir, None, &Device::Cpu).unwrap();
    let tokens = &fx.meta.prompt_tokens;
    let run =
        |m: &Model| m.forward(tokens, &mut m.new_cache().unwrap(), AttentionPath::Expanded, LogitRows::All).unwrap();
    let (dense, sparse) = (run(&dense), run(&sparse));
    assert_close("sparse", &sparse, fx.reference("logits"), Tol::F32);
    let diff = max_abs(&dense, fx.reference("logits"));
    assert!(diff > 0.1, "dense attention is only {diff} from the sparse reference");
    // The first index_topk rows select every row they see: there the two agree.
    assert_close(
        "rows before any selection",
        &dense.narrow(0, 0, 6).unwrap(),
        &sparse.narrow(0, 0, 6).unwrap(),
        Tol::F32,
    );
}

/// `n` token ids of the fixture's vocabulary, spread out.
fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 4 + (i * 37 + i * i * 11) % 300).collect()
}

#[test]
fn sparse_decoding_over_many_pages_equals_the_full_sequence() {
    // 150 tokens: three pages of the cache, each query selecting 6 rows from up to 150 spread
    // over them. The decode step (gathering its rows from the pages) must give the logits of one
    // pass over the whole sequence (each query selecting from the rows before it).
    let fx = Fixture::load("tiny-v32");
    let (model, _) = Model::load(&fx.dir, None, &Device::Cpu).unwrap();
    let ids = tokens(150);
    let vocab = model.config().vocab_size;
    for kind in [CacheKind::Dense(DType::F32), CacheKind::Int8] {
        let mut cache = model.new_cache_of(kind).unwrap();
        let full = model.forward(&ids, &mut cache, AttentionPath::Expanded, LogitRows::All).unwrap();
        let mut cache = model.new_cache_of(kind).unwrap();
        let mut rows = vec![model.forward(&ids[..10], &mut cache, AttentionPath::Expanded, LogitRows::All).unwrap()];
        let mut ws = Workspace::default();
        for &t in &ids[10..] {
            let logits = model.decode(&[t], &mut [&mut cache], &mut ws).unwrap();
            rows.push(Tensor::from_vec(logits.to_vec(), (1, vocab), &Device::Cpu).unwrap());
        }
        let stepped = Tensor::cat(&rows, 0).unwrap();
        assert_close(&format!("{kind:?}: decode steps vs one pass"), &stepped, &full, Tol::F32);
        assert_eq!(cache.len(), ids.len());
    }
}

#[test]
fn the_cache_holds_the_indexer_key_beside_the_latent() {
    let fx = Fixture::load("tiny-v32");
    let (model, _) = Model::load(&fx.dir, None, &Device::Cpu).unwrap();
    let c = model.config();
    let dsa = c.dsa.unwrap();
    assert_eq!((dsa.index_n_heads, dsa.index_head_dim, dsa.index_topk), (16, 16, 6));
    let per_layer = c.kv_lora_rank + c.qk_rope_head_dim + dsa.index_head_dim;
    assert_eq!(model.new_cache().unwrap().bytes_per_token(), c.num_hidden_layers * per_layer * 4);
    // bf16 rows keep bf16 keys; int8 rows keep bf16 keys too (a key's rounding moves the
    // selection).
    let bf16 = model.new_cache_of(CacheKind::Dense(DType::BF16)).unwrap();
    assert_eq!(bf16.bytes_per_token(), c.num_hidden_layers * per_layer * 2);
    let int8 = model.new_cache_of(CacheKind::Int8).unwrap();
    let int8_latent = c.kv_lora_rank + c.qk_rope_head_dim + 4 * 2; // codes and two scales
    assert_eq!(int8.bytes_per_token(), c.num_hidden_layers * (int8_latent + 2 * dsa.index_head_dim));
}

#[test]
fn an_fp8_v32_checkpoint_matches_transformers_dequantizing_it() {
    let fx = Fixture::load("tiny-v32-fp8");
    let (model, report) = Model::load(&fx.dir, Some(DType::F32), &Device::Cpu).unwrap();
    assert!(report.unused.is_empty(), "unused: {:?}", report.unused);
    let mut cache = model.new_cache().unwrap();
    let logits = model.forward(&fx.meta.prompt_tokens, &mut cache, AttentionPath::Expanded, LogitRows::All).unwrap();
    assert_close("fp8 v32 logits", &logits, fx.reference("logits"), Tol::F32);
    assert_eq!(fx.greedy_tokens(&model), fx.meta.greedy_tokens);
}

#[test]
fn a_v32_config_is_checked_field_by_field() {
    let path = std::path::Path::new("config.json");
    let base = std::fs::read_to_string(common::fixtures_dir().join("tiny-v32/config.json")).unwrap();
    let with = |field: &str, value: serde_json::Value| {
        let mut cfg: serde_json::Value = serde_json::from_str(&base).unwrap();
        if value.is_null() {
            cfg.as_object_mut().unwrap().remove(field);
        } else {
            cfg[field] = value;
        }
        latent::Config::from_json(&cfg.to_string(), path)
    };
    // Fields left out take transformers' defaults.
    let cfg = with("index_topk", serde_json::Value::Null).unwrap();
    assert_eq!(cfg.dsa.unwrap().index_topk, 2048);
    for (field, value, says) in [
        ("index_head_dim", serde_json::json!(4), "index_head_dim"),
        ("index_n_heads", serde_json::json!(0), "index_n_heads"),
        ("index_topk", serde_json::json!(0), "index_topk"),
        ("q_lora_rank", serde_json::Value::Null, "q_lora_rank"),
        ("mlp_layer_types", serde_json::json!(["dense", "sparse"]), "mlp_layer_types"),
        ("mlp_layer_types", serde_json::json!(["dense", "moe", "sparse"]), "mlp_layer_types[1]"),
    ] {
        let err = with(field, value).unwrap_err().to_string();
        assert!(err.contains(says), "{field}: {err}");
    }
    // Indexer fields in a model without sparse attention are an error, not ignored.
    let err = with("model_type", serde_json::json!("deepseek_v3")).unwrap_err().to_string();
    assert!(err.contains("index_") && err.contains("deepseek_v32"), "{err}");
    // mlp_layer_types decides which layers are MoE.
    let cfg = with("mlp_layer_types", serde_json::json!(["sparse", "dense", "sparse"])).unwrap();
    assert_eq!((0..3).map(|i| cfg.is_moe_layer(i)).collect::<Vec<_>>(), [true, false, true]);
}

/// `x` rounded to the nearest FP8 e4m3 value (ties to the even code), after the scale of its
/// block of 128: DeepSeek's `act_quant` of the indexer's q and k.
fn fp8_round(x: &[f32]) -> Vec<f32> {
    let mut grid: Vec<f32> = (0u8..=0x7e).map(latent::weights::fp8::e4m3_to_f32).filter(|v| v.is_finite()).collect();
    grid.sort_by(f32::total_cmp);
    x.chunks(128)
        .flat_map(|block| {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-4);
            let scale = amax / 448.0;
            let grid = &grid;
            block.iter().map(move |&v| {
                let a = (v / scale).abs();
                let i = grid.partition_point(|&g| g < a).min(grid.len() - 1);
                let nearest = if i > 0 && (a - grid[i - 1]) <= (grid[i] - a) { grid[i - 1] } else { grid[i] };
                nearest.copysign(v) * scale
            })
        })
        .collect()
}

/// The Hadamard transform of DeepSeek's `rotate_activation`, scaled by `n^-1/2` (orthogonal).
fn hadamard(x: &[f32]) -> Vec<f32> {
    let mut y = x.to_vec();
    let mut h = 1;
    while h < y.len() {
        for i in (0..y.len()).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (y[j], y[j + h]);
                (y[j], y[j + h]) = (a + b, a - b);
            }
        }
        h *= 2;
    }
    let s = (y.len() as f32).powf(-0.5);
    y.iter().map(|v| v * s).collect()
}

#[test]
fn v32_follows_transformers_where_deepseek_inference_differs() {
    // DeepSeek's inference code rotates the indexer's q and k by a Hadamard transform and rounds
    // them to FP8 (e4m3, a scale per 128) before scoring; transformers 5.23 does neither, and latent
    // follows transformers. This writes down what that changes, on V3.2's sizes (64 heads of 128)
    // with random queries and 1024 keys, top 256.
    use latent::kernels::dsa::{index_scores, top_k, ContiguousKeys};
    let (heads, d_i, n, k) = (64, 128, 1024, 256);
    let random = |len: usize, seed: u64| -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    };
    let keys = random(n * d_i, 1);
    let select = |q: &[f32], w: &[f32], keys: &[f32]| {
        let mut scores = vec![0f32; n];
        index_scores(q, w, &ContiguousKeys { keys, d_i }, d_i, &mut scores);
        let (mut order, mut chosen) = (Vec::new(), Vec::new());
        top_k(&scores, k, &mut order, &mut chosen);
        chosen
    };
    let per_row = |x: &[f32], f: fn(&[f32]) -> Vec<f32>| -> Vec<f32> { x.chunks(d_i).flat_map(f).collect() };
    let (rotated_keys, fp8_keys) = (per_row(&keys, hadamard), per_row(&keys, fp8_round));
    let (mut rotation_changes, mut fp8_changes, mut fp8_rows_moved) = (0, 0, 0);
    let queries = 40;
    for seed in 0..queries {
        let (q, w) = (random(heads * d_i, 100 + seed), random(heads, 200 + seed));
        let exact = select(&q, &w, &keys);
        // The rotation keeps every product (H is orthogonal): the selection moves only where two
        // scores are within f32 rounding.
        if select(&per_row(&q, hadamard), &w, &rotated_keys) != exact {
            rotation_changes += 1;
        }
        let fp8 = select(&per_row(&q, fp8_round), &w, &fp8_keys);
        if fp8 != exact {
            fp8_changes += 1;
            fp8_rows_moved += fp8.iter().filter(|s| !exact.contains(s)).count();
        }
    }
    assert_eq!(rotation_changes, 0, "the Hadamard rotation changed a selection");
    // FP8's 3 mantissa bits move scores by a few percent: most queries swap some of their 256
    // rows near the boundary, but few rows each (measured: all 40 queries, 2.3% of their rows).
    assert!(fp8_changes * 2 > queries, "FP8 changed only {fp8_changes} of {queries} selections");
    let moved = fp8_rows_moved as f64 / (queries as usize * k) as f64;
    assert!(moved > 0.0 && moved < 0.15, "FP8 moved {:.1}% of the selected rows", 100.0 * moved);
}
