//! Speculative decoding with DeepSeek-V3's multi-token-prediction module: the output is plain
//! decoding's (greedy: token for token; sampled: in distribution), and the verify step (several
//! tokens of one sequence in one decode step) computes what one token at a time computes.
//!
//! `tests/fixtures/tiny-v3-mtp` is a tiny V3 trained by latent with one MTP module on the
//! fixtures' corpus (its run file is beside it), so its drafts are often accepted; `tiny-v3` is
//! the transformers fixture, whose MTP layer is completed here with random weights (drafts then
//! mostly rejected: the other path).

mod common;

use candle_core::{DType, Device};
use latent::cache::CacheKind;
use latent::generate::{generate, ChatSession, Generation, Request};
use latent::{AttentionPath, LogitRows, Model, SamplingParams, Tokenizer, Workspace};

fn load(dir: &std::path::Path, dtype: DType) -> (Model, Tokenizer) {
    let (model, _) = Model::load(dir, Some(dtype), &Device::Cpu).unwrap();
    let tokenizer = Tokenizer::load(dir, Some(model.config())).unwrap();
    (model, tokenizer)
}

fn trained() -> std::path::PathBuf {
    common::fixtures_dir().join("tiny-v3-mtp")
}

/// tiny-v3 with its MTP layer (index 3) completed: the decoder block's tensors copied from layer 2.
fn completed_tiny_v3() -> tempfile::TempDir {
    let dir = common::copy_fixture("tiny-v3");
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let block: Vec<(String, candle_core::Tensor)> = tensors
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("model.layers.2.").map(|rest| (format!("model.layers.3.{rest}"), v.clone()))
        })
        .collect();
    for (k, v) in block {
        tensors.entry(k).or_insert(v);
    }
    candle_core::safetensors::save(&tensors, &path).unwrap();
    dir
}

/// The models with an MTP module the tests run, and their dtypes: the trained fixture in f32 and
/// bf16, and `tiny-v3` completed (in `completed`) in f32.
fn with_mtp(completed: &tempfile::TempDir) -> [(std::path::PathBuf, DType); 3] {
    [(trained(), DType::F32), (trained(), DType::BF16), (completed.path().to_path_buf(), DType::F32)]
}

fn run(model: &Model, tok: &Tokenizer, kind: CacheKind, prompt: &[u32], request: &Request) -> Generation {
    let mut cache = model.new_cache_of(kind).unwrap();
    generate(model, tok, &mut cache, prompt, request, |_| {}).unwrap()
}

fn greedy(max_tokens: usize, draft_tokens: usize) -> Request {
    Request { draft_tokens, ..Request::new(max_tokens, SamplingParams { temperature: 0.0, ..Default::default() }) }
}

#[test]
fn greedy_speculative_decoding_gives_the_plain_tokens() {
    let completed = completed_tiny_v3();
    for (dir, dtype) in with_mtp(&completed) {
        let (model, tok) = load(&dir, dtype);
        assert_eq!(model.mtp_depth(), 1, "{}", dir.display());
        let prompt = tok.encode("Beautiful is better than").unwrap();
        for kind in [model.cache_kind(), CacheKind::Int8] {
            let plain = run(&model, &tok, kind, &prompt, &greedy(60, 0));
            assert!(plain.speculation.is_none());
            for k in [1, 2, 3] {
                let spec = run(&model, &tok, kind, &prompt, &greedy(60, k));
                let what = format!("{} {dtype:?} {kind:?} k={k}", dir.display());
                assert_eq!(spec.tokens, plain.tokens, "{what}");
                assert_eq!((spec.text.as_str(), &spec.stop), (plain.text.as_str(), &plain.stop), "{what}");
                let s = spec.speculation.unwrap();
                assert!(s.steps > 0 && s.drafted >= s.steps && s.accepted <= s.drafted, "{what}: {s:?}");
                if dir == trained() && k == 1 {
                    // A trained head: most of its drafts are the main model's next token.
                    assert!(s.acceptance() > 0.4, "{what}: acceptance {:.2}", s.acceptance());
                }
            }
        }
    }
}

#[test]
fn a_conversation_decodes_the_same_with_and_without_drafts() {
    let (model, tok) = load(&trained(), DType::F32);
    let turns = ["Beautiful is better than", "Errors should never", "Now is better"];
    let mut replies = Vec::new();
    for k in [0, 2] {
        let mut session = ChatSession::new(&model, &tok, Some("Zen")).unwrap();
        let mut texts = Vec::new();
        for turn in turns {
            let g = session.reply(turn, &greedy(24, k), |_| {}).unwrap();
            assert_eq!(g.speculation.is_some(), k > 0);
            texts.push(g.tokens);
        }
        replies.push(texts);
    }
    assert_eq!(replies[0], replies[1]);
}

#[test]
fn a_verify_step_computes_what_single_steps_compute() {
    // Three tokens of one sequence and one of another in one step, against one token at a time.
    let (model, tok) = load(&trained(), DType::F32);
    let (a, b) = (tok.encode("Simple is better").unwrap(), tok.encode("Flat is").unwrap());
    let vocab = model.config().vocab_size;
    let prefill = |p: &[u32]| {
        let mut c = model.new_cache().unwrap();
        model.forward(p, &mut c, AttentionPath::Expanded, LogitRows::Last).unwrap();
        c
    };
    let (mut ca, mut cb) = (prefill(&a), prefill(&b));
    let (mut sa, mut sb) = (ca.clone(), cb.clone());
    let mut ws = Workspace::default();
    let logits = model.decode_runs(&[5, 6, 7, 8], &[3, 1], &mut [&mut ca, &mut cb], &mut ws).unwrap().to_vec();
    let hidden = ws.hidden().to_vec();
    assert_eq!((logits.len(), ca.len(), cb.len()), (4 * vocab, a.len() + 3, b.len() + 1));
    let mut want = Vec::new();
    let mut want_hidden = Vec::new();
    let mut one = Workspace::default();
    for t in [5, 6, 7] {
        want.extend_from_slice(model.decode_step(t, &mut sa, &mut one).unwrap());
        want_hidden.extend_from_slice(one.hidden());
    }
    want.extend_from_slice(model.decode_step(8, &mut sb, &mut one).unwrap());
    want_hidden.extend_from_slice(one.hidden());
    let worst = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
    assert!(worst(&logits, &want) < 1e-4, "logits differ by {}", worst(&logits, &want));
    assert!(worst(&hidden, &want_hidden) < 1e-4, "hidden states differ by {}", worst(&hidden, &want_hidden));
}

#[test]
fn sampled_speculative_decoding_keeps_the_distribution() {
    // The first two sampled tokens after a prompt (of three), over 3000 seeds, with and without
    // drafts: the
    // second one is where a draft is accepted or rejected. Their empirical distributions must
    // agree with the exact one, p(t1) p(t2 | t1), computed from the model's logits.
    let (model, tok) = load(&trained(), DType::F32);
    let prompt = tok.encode("Although").unwrap();
    // A high temperature: the trained model is sure of most tokens, and only a spread
    // distribution shows a bias in the acceptance rule.
    const T: f32 = 3.0;
    let sampling = |seed: u64| SamplingParams { temperature: T, top_k: 4, top_p: 1.0, seed, ..Default::default() };
    let probs = |logits: &[f32]| -> Vec<(u32, f64)> {
        let mut ids: Vec<usize> = (0..logits.len()).collect();
        ids.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        ids.truncate(4);
        let e = |i: usize| (((logits[i] - logits[ids[0]]) / T) as f64).exp();
        let z: f64 = ids.iter().map(|&i| e(i)).sum();
        ids.iter().map(|&i| (i as u32, e(i) / z)).collect()
    };
    let last = |tokens: &[u32]| -> Vec<f32> {
        let mut c = model.new_cache().unwrap();
        model
            .forward(tokens, &mut c, AttentionPath::Expanded, LogitRows::Last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut exact = std::collections::HashMap::new();
    for (t1, p1) in probs(&last(&prompt)) {
        let mut with = prompt.clone();
        with.push(t1);
        for (t2, p2) in probs(&last(&with)) {
            exact.insert((t1, t2), p1 * p2);
        }
    }
    let n = 3000;
    let mut accepted = 0;
    for k in [0, 1] {
        let mut counts = std::collections::HashMap::new();
        for seed in 0..n {
            let request = Request { draft_tokens: k, ..Request::new(3, sampling(seed)) };
            let g = run(&model, &tok, model.cache_kind(), &prompt, &request);
            accepted += g.speculation.map_or(0, |s| s.accepted);
            *counts.entry((g.tokens[0], g.tokens[1])).or_insert(0usize) += 1;
        }
        let tv: f64 = exact
            .iter()
            .map(|(key, p)| (counts.get(key).copied().unwrap_or(0) as f64 / n as f64 - p).abs())
            .sum::<f64>()
            / 2.0;
        assert!(counts.keys().all(|key| exact.contains_key(key)), "a pair outside the top-4 supports");
        // Sampling noise over 16 pairs and 3000 draws: about 0.03 (measured 0.025 plain and 0.022 with
        // drafts; accepting a draft with probability sqrt(p) instead of p gives 0.086).
        assert!(tv < 0.06, "draft_tokens {k}: total variation {tv:.3} from the exact distribution");
    }
    assert!(accepted > n as usize / 4, "the drafts were rarely accepted ({accepted}): the test would miss a bias");
}

#[test]
fn speculation_needs_an_mtp_module_and_reports_when_off() {
    // A model without MTP decodes plainly whatever the request asks.
    let fx = common::Fixture::load("tiny-v2");
    let (model, tok) = load(&fx.dir, DType::F32);
    assert_eq!(model.mtp_depth(), 0);
    let g = run(&model, &tok, model.cache_kind(), &fx.meta.prompt_tokens, &greedy(20, 2));
    assert!(g.speculation.is_none());
    assert_eq!(g.tokens, fx.meta.greedy_tokens);
}

/// The draft step on the decode step's buffers computes what the module computes over tensors:
/// the last position's logits and every position's hidden state, over successive calls of
/// several positions and one.
#[test]
fn the_draft_step_computes_what_the_tensor_path_computes() {
    let completed = completed_tiny_v3();
    for (dir, dtype) in with_mtp(&completed) {
        let (model, tok) = load(&dir, dtype);
        let (h, vocab) = (model.config().hidden_size, model.config().vocab_size);
        let prompt = tok.encode("Beautiful is better than ugly. Explicit is better than implicit.").unwrap();
        for kind in [model.cache_kind(), CacheKind::Int8] {
            let mut cache = model.new_cache_of(kind).unwrap();
            let (_, hidden) = model.prefill_hidden(&prompt, &mut cache, 64).unwrap();
            let hidden: Vec<f32> = hidden.flatten_all().unwrap().to_vec1().unwrap();
            let (mut by_tensors, mut by_step) =
                (model.new_mtp_cache(kind).unwrap(), model.new_mtp_cache(kind).unwrap());
            let mut ws = Workspace::default();
            for (from, to) in [(0, 3), (3, 4), (4, 6), (6, 7)] {
                let (hs, toks) = (&hidden[from * h..to * h], &prompt[from + 1..to + 1]);
                let (logits, y) = model.mtp_forward(0, hs, toks, &mut by_tensors).unwrap();
                let (draft, y_step) = model.mtp_step(0, hs, toks, &mut by_step, &mut ws).unwrap();
                let what = format!("{} {dtype:?} {kind:?} positions {from}..{to}", dir.display());
                let last = &logits[logits.len() - vocab..];
                let scale = last.iter().fold(0f32, |m, v| m.max(v.abs()));
                // The int8 rows are read by other kernels on the two paths (the step's quantizes
                // the query too): equal within the format's error, not to f32 rounding.
                let exact = dtype == DType::F32 && kind != CacheKind::Int8;
                let tol = if exact { 1e-4 } else { 2e-2 * scale };
                let worst = last.iter().zip(draft).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst <= tol, "{what}: logits differ by {worst} (largest {scale})");
                let worst = y.iter().zip(y_step).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst <= if exact { 1e-4 } else { 5e-2 }, "{what}: hidden states differ by {worst}");
                assert_eq!(latent::sampling::argmax(last), latent::sampling::argmax(draft), "{what}");
                assert_eq!(by_step.layer_len(0), to, "{what}");
            }
        }
    }
}

/// DeepSeek publishes V3 and R1 in block FP8, the MTP layer included
/// (`tests/fixtures/tiny-v3-mtp-fp8` is the trained fixture so quantized by
/// tools/make_mtp_fixtures.py): the module loads from FP8 and drafts, the output is plain
/// decoding's, and the weights are the f32 ones within e4m3's error.
#[test]
fn an_fp8_checkpoint_drafts_with_its_mtp_layer() {
    let (fp8, tok) = load(&common::fixtures_dir().join("tiny-v3-mtp-fp8"), DType::F32);
    assert_eq!(fp8.mtp_depth(), 1);
    let prompt = tok.encode("Beautiful is better than").unwrap();
    let plain = run(&fp8, &tok, fp8.cache_kind(), &prompt, &greedy(60, 0));
    let spec = run(&fp8, &tok, fp8.cache_kind(), &prompt, &greedy(60, 1));
    assert_eq!(spec.tokens, plain.tokens);
    let s = spec.speculation.unwrap();
    assert!(s.acceptance() > 0.4, "acceptance {:.2}", s.acceptance());

    let (full, _) = load(&trained(), DType::F32);
    let logits = |m: &Model| {
        let mut cache = m.new_cache_of(m.cache_kind()).unwrap();
        let l = m.forward(&prompt, &mut cache, AttentionPath::Expanded, LogitRows::All).unwrap();
        l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (a, b) = (logits(&fp8), logits(&full));
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
    let size = b.iter().map(|y| y.abs()).sum::<f32>() / b.len() as f32;
    assert!(diff > 0.0 && diff < 0.1 * size, "FP8 logits differ by {diff} on average (mean size {size})");
}
