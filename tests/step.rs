//! `Model::decode_step`, the allocation-free decode step, against `Model::forward` one token at a
//! time (candle tensors per op, the same kernels) on every kind of model latent loads: f32 and bf16
//! safetensors, quantized on load, GGUF files, and the int8 latent cache; and against transformers'
//! logits on the parity fixtures.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, Fixture, Tol, MODELS};
use latent::cache::CacheKind;
use latent::weights::Quant;
use latent::{AttentionPath, LogitRows, Model, Workspace};

/// Logits of `tokens[prefill..]` decoded one at a time after an expanded prefill of
/// `tokens[..prefill]`: by `decode_step` if `step`, else by `forward`.
fn decoded(m: &Model, kind: CacheKind, tokens: &[u32], prefill: usize, step: bool) -> Vec<Vec<f32>> {
    let mut cache = m.new_cache_of(kind).unwrap();
    m.forward(&tokens[..prefill], &mut cache, AttentionPath::Expanded, LogitRows::Last).unwrap();
    let mut ws = Workspace::default();
    tokens[prefill..]
        .iter()
        .map(|&t| match step {
            true => m.decode_step(t, &mut cache, &mut ws).unwrap().to_vec(),
            false => {
                let l = m.forward(&[t], &mut cache, AttentionPath::Absorbed, LogitRows::Last).unwrap();
                l.flatten_all().unwrap().to_vec1().unwrap()
            }
        })
        .collect()
}

/// Largest `|a − b|` over the largest `|b|`, row by row.
fn worst_relative(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            assert_eq!(a.len(), b.len());
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            diff / b.iter().map(|y| y.abs()).fold(0f32, f32::max)
        })
        .fold(0f32, f32::max)
}

fn prompt(n: u32) -> Vec<u32> {
    (0..n).map(|i| if i == 0 { 0 } else { 4 + (i * 37 + 11) % 300 }).collect()
}

#[test]
fn the_step_decodes_the_parity_fixtures_as_transformers_does() {
    for name in MODELS {
        let fx = Fixture::load(name);
        let (model, _) = Model::load(&fx.dir, None, &Device::Cpu).unwrap();
        assert!(model.takes_step(), "{name}: the fixtures must run the step, not its fallback");
        let tokens = &fx.meta.prompt_tokens;
        let mut cache = model.new_cache().unwrap();
        let mut rows = vec![model.forward(&tokens[..4], &mut cache, AttentionPath::Expanded, LogitRows::All).unwrap()];
        let mut ws = Workspace::default();
        for &t in &tokens[4..] {
            let logits = model.decode_step(t, &mut cache, &mut ws).unwrap();
            rows.push(Tensor::from_slice(logits, (1, logits.len()), &Device::Cpu).unwrap());
        }
        let stepped = Tensor::cat(&rows, 0).unwrap();
        assert_close(&format!("{name} stepped logits"), &stepped, fx.reference("logits"), Tol::F32);
        // And the tensor path agrees to rounding.
        let forward = decoded(&model, model.cache_kind(), tokens, 4, false);
        let step = decoded(&model, model.cache_kind(), tokens, 4, true);
        let err = worst_relative(&step, &forward);
        assert!(err < 1e-5, "{name}: step against forward {err}");
    }
}

#[test]
fn the_step_matches_forward_in_bf16_quantized_and_with_an_int8_cache() {
    let dir = common::fixtures_dir();
    let tokens = prompt(40);
    let load = |name: &str, dtype: DType, quant: Option<Quant>| {
        Model::load_quantized(&dir.join(name), Some(dtype), quant, &Device::Cpu, |_, _| {}).unwrap().0
    };
    let cases = [
        // bf16 rounds after every op, and the step rounds where the tensors do: here they agree
        // exactly, but a kernel that sums in another order may flip a rounding.
        ("tiny-v3 bf16", load("tiny-v3", DType::BF16, None), 0.01),
        ("tiny-v2 bf16", load("tiny-v2", DType::BF16, None), 0.01),
        ("tiny-v3-256 Q8_0", load("tiny-v3-256", DType::F32, Some(Quant::Q8_0)), 1e-5),
        ("tiny-v3-256 Q4_K", load("tiny-v3-256", DType::F32, Some(Quant::Q4K)), 1e-5),
        ("tiny-v2-lite Q8_0", load("tiny-v2-lite", DType::F32, Some(Quant::Q8_0)), 1e-5),
        ("gguf Q4_K_M", load("gguf/tiny-v3-256-q4_k_m.gguf", DType::F32, None), 1e-5),
        ("gguf Q8_0", load("gguf/tiny-v3-256-q8_0.gguf", DType::F32, None), 1e-5),
        ("gguf F16", load("gguf/tiny-v2-lite-f16.gguf", DType::F32, None), 1e-5),
    ];
    for (what, model, tol) in cases {
        assert!(model.takes_step(), "{what}: runs the step");
        for int8 in [false, true] {
            let kind = if int8 { CacheKind::Int8 } else { model.cache_kind() };
            if model.new_cache_of(kind).is_err() {
                continue;
            }
            let err =
                worst_relative(&decoded(&model, kind, &tokens, 5, true), &decoded(&model, kind, &tokens, 5, false));
            assert!(err < tol, "{what} (int8 cache: {int8}): step against forward {err}");
        }
    }
}

#[test]
fn the_step_is_not_the_tensor_path_by_accident() {
    // A step that returned the tensor path's logits would pass the tests above trivially: the
    // step must run on its own, and a model it cannot run (a training model's variables) must
    // still decode, through the fallback.
    let fx = Fixture::load("tiny-v2");
    let (model, _) = Model::load(&fx.dir, None, &Device::Cpu).unwrap();
    let mut cache = model.new_cache().unwrap();
    let mut ws = Workspace::default();
    model.decode_step(5, &mut cache, &mut ws).unwrap();
    assert_eq!(cache.len(), 1, "the step appends its latents");
    assert_eq!(ws.logits().len(), model.config().vocab_size);
    let err = model.decode_step(model.config().vocab_size as u32, &mut cache, &mut ws).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    assert_eq!(cache.len(), 1, "a bad token changes nothing");

    let params = latent::train::params::Params::load(model.config(), &fx.dir, &Device::Cpu).unwrap();
    let trainable = params.build_model(model.config()).unwrap();
    assert!(!trainable.takes_step(), "training variables take the fallback");
    let tokens = prompt(12);
    let err = worst_relative(
        &decoded(&trainable, trainable.cache_kind(), &tokens, 3, true),
        &decoded(&model, model.cache_kind(), &tokens, 3, true),
    );
    assert!(err < 1e-4, "fallback against step {err}");
}
