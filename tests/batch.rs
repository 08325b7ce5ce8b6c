//! One forward over a batch of sequences: each sequence decoded or prefilled in a batch gets the
//! logits it gets alone, and attends to its own rows only.

mod common;

use candle_core::{DType, Device};
use latent::cache::{CacheKind, LatentCache};
use latent::weights::Quant;
use latent::{AttentionPath, ErrorKind, LogitRows, Model, Span, Workspace};

/// Prompts of ragged lengths (one of a single token), all different.
fn prompts() -> Vec<Vec<u32>> {
    [3usize, 9, 1, 14, 6]
        .iter()
        .enumerate()
        .map(|(s, &n)| (0..n as u32).map(|i| 4 + (i * 37 + 11 * s as u32 + 5) % 250).collect())
        .collect()
}

/// The token sequence `s` is fed at decode step `k` (teacher-forced, so every run feeds the same).
fn next_token(s: usize, k: usize) -> u32 {
    4 + ((s * 61 + k * 29 + 3) % 240) as u32
}

const STEPS: usize = 6;

/// Each sequence prefilled alone, then decoded `STEPS` tokens by `decode_step` alone.
fn solo(model: &Model, kind: CacheKind) -> Vec<Vec<Vec<f32>>> {
    prompts()
        .iter()
        .enumerate()
        .map(|(s, prompt)| {
            let mut cache = model.new_cache_of(kind).unwrap();
            model.forward(prompt, &mut cache, AttentionPath::Expanded, LogitRows::Last).unwrap();
            let mut ws = Workspace::default();
            (0..STEPS).map(|k| model.decode_step(next_token(s, k), &mut cache, &mut ws).unwrap().to_vec()).collect()
        })
        .collect()
}

/// The same sequences prefilled in one batch, then decoded together, one step for all of them.
fn batched(model: &Model, kind: CacheKind) -> Vec<Vec<Vec<f32>>> {
    let prompts = prompts();
    let mut caches: Vec<LatentCache> = prompts.iter().map(|_| model.new_cache_of(kind).unwrap()).collect();
    {
        let mut spans: Vec<Span<'_>> = prompts.iter().zip(caches.iter_mut()).map(|(p, c)| Span::new(p, c)).collect();
        let last = model.forward_spans(&mut spans, AttentionPath::Expanded, LogitRows::Last).unwrap();
        assert_eq!(last.dims2().unwrap().0, prompts.len(), "one row per span");
    }
    let mut ws = Workspace::default();
    let mut out = vec![Vec::new(); prompts.len()];
    for k in 0..STEPS {
        let tokens: Vec<u32> = (0..prompts.len()).map(|s| next_token(s, k)).collect();
        let mut refs: Vec<&mut LatentCache> = caches.iter_mut().collect();
        let logits = model.decode(&tokens, &mut refs, &mut ws).unwrap();
        let vocab = model.config().vocab_size;
        assert_eq!(logits.len(), tokens.len() * vocab);
        for (s, row) in logits.chunks_exact(vocab).enumerate() {
            out[s].push(row.to_vec());
        }
    }
    for (cache, prompt) in caches.iter().zip(&prompts) {
        assert_eq!(cache.len(), prompt.len() + STEPS, "each cache holds its own rows only");
    }
    out
}

fn worst_abs(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> f32 {
    let rows = |x: &[Vec<Vec<f32>>]| x.iter().flatten().flatten().copied().collect::<Vec<f32>>();
    let (a, b) = (rows(a), rows(b));
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

fn load(name: &str, dtype: DType, quant: Option<Quant>) -> Model {
    let dir = common::fixtures_dir().join(name);
    Model::load_quantized(&dir, Some(dtype), quant, &Device::Cpu, |_, _| {}).unwrap().0
}

#[test]
fn sequences_decoded_together_get_the_logits_they_get_alone() {
    let cases = [
        ("tiny-v2 f32", load("tiny-v2", DType::F32, None)),
        ("tiny-v2-lite f32", load("tiny-v2-lite", DType::F32, None)),
        ("tiny-v3 f32", load("tiny-v3", DType::F32, None)),
        ("tiny-v2 bf16", load("tiny-v2", DType::BF16, None)),
        ("tiny-v3-256 Q4_K", load("tiny-v3-256", DType::F32, Some(Quant::Q4K))),
        ("tiny-v3-256 Q8_0", load("tiny-v3-256", DType::F32, Some(Quant::Q8_0))),
        ("gguf Q4_K_M", load("gguf/tiny-v3-256-q4_k_m.gguf", DType::F32, None)),
    ];
    for (name, model) in &cases {
        assert!(model.takes_step(), "{name}: runs the batched step, not its fallback");
        for kind in [model.cache_kind(), CacheKind::Int8] {
            if model.new_cache_of(kind).is_err() {
                continue;
            }
            let (alone, together) = (solo(model, kind), batched(model, kind));
            let err = worst_abs(&together, &alone);
            eprintln!("{name} ({kind:?}): batched against alone, worst |Δlogit| {err}");
            assert!(err <= 1e-4, "{name} ({kind:?}): batched decode differs from solo decode by {err}");
        }
    }
}

#[test]
fn the_tensor_path_batches_spans_of_different_lengths_and_depths() {
    for name in common::MODELS {
        let model = load(name, DType::F32, None);
        let prompts = prompts();
        for path in [AttentionPath::Expanded, AttentionPath::Absorbed] {
            // Each sequence's first half cached alone, then every second half in one batch.
            let mut caches: Vec<LatentCache> = Vec::new();
            let mut want = Vec::new();
            for p in &prompts {
                let half = p.len() / 2;
                let mut cache = model.new_cache().unwrap();
                if half > 0 {
                    model.forward(&p[..half], &mut cache, path, LogitRows::All).unwrap();
                }
                let mut alone = cache.clone();
                want.push(model.forward(&p[half..], &mut alone, path, LogitRows::All).unwrap());
                caches.push(cache);
            }
            let mut spans: Vec<Span<'_>> =
                prompts.iter().zip(caches.iter_mut()).map(|(p, c)| Span::new(&p[p.len() / 2..], c)).collect();
            let got = model.forward_spans(&mut spans, path, LogitRows::All).unwrap();
            let want = candle_core::Tensor::cat(&want, 0).unwrap();
            common::assert_close(&format!("{name} {path:?} spans"), &got, &want, common::Tol::F32);
            for (cache, p) in caches.iter().zip(&prompts) {
                assert_eq!(cache.len(), p.len());
            }
            // Spans without a cache run from position 0, as each prompt alone does.
            let mut fresh: Vec<Span<'_>> = prompts.iter().map(|p| Span::fresh(p)).collect();
            let got = model.forward_spans(&mut fresh, path, LogitRows::Last).unwrap();
            for (s, p) in prompts.iter().enumerate() {
                let mut cache = model.new_cache().unwrap();
                let want = model.forward(p, &mut cache, path, LogitRows::Last).unwrap();
                let row = got.narrow(0, s, 1).unwrap();
                common::assert_close(&format!("{name} {path:?} fresh span {s}"), &row, &want, common::Tol::F32);
            }
        }
    }
}

#[test]
fn a_bad_request_in_a_batch_is_a_request_error_and_changes_no_cache() {
    let model = load("tiny-v3", DType::F32, None);
    let mut a = model.new_cache().unwrap();
    let mut b = model.new_cache().unwrap();
    model.forward(&[5, 6, 7], &mut a, AttentionPath::Expanded, LogitRows::Last).unwrap();
    let mut ws = Workspace::default();
    let vocab = model.config().vocab_size as u32;
    let err = model.decode(&[9, vocab], &mut [&mut a, &mut b], &mut ws).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Request, "{err}");
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    assert_eq!((a.len(), b.len()), (3, 0), "no cache took a row");
    let err = model.decode(&[9], &mut [&mut a, &mut b], &mut ws).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Request, "{err}");
    // Past the context: a request error too, naming the limit.
    let max = model.config().max_position_embeddings;
    let long = vec![5u32; max + 1];
    let err = model.forward(&long, &mut b, AttentionPath::Expanded, LogitRows::Last).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Request, "{err}");
    assert!(err.to_string().contains("max_position_embeddings"), "{err}");
    // And the batch still decodes afterwards.
    let logits = model.decode(&[9, 10], &mut [&mut a, &mut b], &mut ws).unwrap();
    assert_eq!(logits.len(), 2 * vocab as usize);
    assert_eq!((a.len(), b.len()), (4, 1));
}

#[test]
fn an_expanded_cache_gives_the_logits_of_the_latent_cache() {
    for name in common::MODELS {
        let model = load(name, DType::F32, None);
        let kind = CacheKind::Expanded(DType::F32);
        if model.config().dsa.is_some() {
            // Sparse attention selects latent rows: an expanded cache has none to select.
            assert!(!model.takes_expanded_cache(), "{name}");
            let err = model.new_cache_of(kind).unwrap_err().to_string();
            assert!(err.contains("sparse attention"), "{name}: {err}");
            continue;
        }
        assert!(model.takes_expanded_cache());
        // Prefilled and decoded (batched step, then its tensor fallback through `forward`).
        let (latent, expanded) = (batched(&model, model.cache_kind()), batched(&model, kind));
        let err = worst_abs(&latent, &expanded);
        assert!(err <= 1e-4, "{name}: the expanded cache's logits differ by {err}");
        let (alone_latent, alone_expanded) = (solo(&model, model.cache_kind()), solo(&model, kind));
        assert!(worst_abs(&alone_latent, &alone_expanded) <= 1e-4, "{name}: alone");
        let c = model.config();
        let bytes = |k: CacheKind| model.new_cache_of(k).unwrap().bytes_per_token();
        let per_head = c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim);
        assert_eq!(bytes(kind), c.num_hidden_layers * per_head * 4);
        assert_eq!(bytes(model.cache_kind()), c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 4);
    }
}

/// What the engine relies on to recompute a preempted sequence's generated tokens in one run:
/// on the decode kernels a token's row and logits have the same bits whether its token was
/// decoded alone, step by step, or in one run of the sequence's tokens beside other sequences.
#[test]
fn a_run_of_tokens_computes_the_bits_single_steps_compute() {
    let cases = [
        ("tiny-v2 f32", load("tiny-v2", DType::F32, None)),
        ("tiny-v3 f32", load("tiny-v3", DType::F32, None)),
        ("tiny-v2 bf16", load("tiny-v2", DType::BF16, None)),
        ("tiny-v3-256 Q4_K", load("tiny-v3-256", DType::F32, Some(Quant::Q4K))),
        ("tiny-v3-256 Q8_0", load("tiny-v3-256", DType::F32, Some(Quant::Q8_0))),
        ("gguf Q4_K_M", load("gguf/tiny-v3-256-q4_k_m.gguf", DType::F32, None)),
    ];
    let (prompt, other) = (&prompts()[3], &prompts()[1]);
    let run: Vec<u32> = (0..STEPS).map(|k| next_token(0, k)).collect();
    for (name, model) in &cases {
        let vocab = model.config().vocab_size;
        for kind in [model.cache_kind(), CacheKind::Int8] {
            if model.new_cache_of(kind).is_err() {
                continue;
            }
            assert!(model.steps_on_kernels(kind), "{name} ({kind:?})");
            let prefilled = |p: &[u32]| {
                let mut cache = model.new_cache_of(kind).unwrap();
                model.forward(p, &mut cache, AttentionPath::Expanded, LogitRows::Last).unwrap();
                cache
            };
            // Step by step, alone; then one more token over those rows.
            let mut ws = Workspace::default();
            let mut alone = prefilled(prompt);
            let mut last = Vec::new();
            for &t in &run {
                last = model.decode_step(t, &mut alone, &mut ws).unwrap().to_vec();
            }
            let after_alone = model.decode_step(7, &mut alone, &mut ws).unwrap().to_vec();
            // One run, beside another sequence's single token; only the run's last logits kept.
            let mut ws = Workspace::default();
            let (mut ran, mut beside) = (prefilled(prompt), prefilled(other));
            let mut tokens = vec![next_token(1, 0)];
            tokens.extend_from_slice(&run);
            let mut keep = vec![true];
            keep.extend((0..STEPS).map(|k| k + 1 == STEPS));
            let kept = model
                .decode_runs_keeping(&tokens, &[1, STEPS], &mut [&mut beside, &mut ran], &mut ws, &keep)
                .unwrap()
                .to_vec();
            assert_eq!(kept.len(), 2 * vocab, "{name}: the kept rows only");
            assert_eq!(ws.hidden().len(), 2 * model.config().hidden_size, "{name}: the kept hidden states only");
            let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same(&kept[vocab..], &last), "{name} ({kind:?}): the run's last logits differ from the step's");
            let after_run = model.decode_step(7, &mut ran, &mut ws).unwrap().to_vec();
            assert!(same(&after_run, &after_alone), "{name} ({kind:?}): the rows a run wrote differ from the steps'");
        }
    }
}
