//! Generation, perplexity and chat against the reference's numbers.

mod common;

use candle_core::{DType, Device};
use common::{assert_close, load_model, Fixture, Tol, MODELS};
use latent::generate::{generate, ChatSession, Request, StopReason};
use latent::perplexity::{perplexity, perplexity_with};
use latent::tokenizer::Message;
use latent::{AttentionPath, LogitRows, Model, SamplingParams};

fn greedy(max_tokens: usize) -> Request {
    Request {
        max_tokens,
        sampling: SamplingParams { temperature: 0.0, ..Default::default() },
        stop: vec![],
        draft_tokens: 0,
    }
}

#[test]
fn greedy_continuations_of_20_tokens_are_those_of_transformers() {
    for name in MODELS {
        let (fx, model, tokenizer) = load_model(name);
        let mut cache = model.new_cache().unwrap();
        // The fixture tokenizer's EOS is id 1; a random model rarely picks it, and the reference didn't.
        assert!(!fx.meta.greedy_tokens.contains(&1));
        let g = generate(&model, &tokenizer, &mut cache, &fx.meta.prompt_tokens, &greedy(20), |_| {}).unwrap();
        assert_eq!(g.tokens, fx.meta.greedy_tokens, "{name}");
        assert_eq!(g.stop, StopReason::MaxTokens);
        // Every generated token but the last went through the cache.
        assert_eq!(cache.len(), fx.meta.prompt_tokens.len() + 19);
    }
}

#[test]
fn perplexity_matches_transformers_to_1e_5_relative() {
    for name in MODELS {
        let (fx, model, tokenizer) = load_model(name);
        let reference = fx.meta.perplexity.as_ref().unwrap();
        let text = std::fs::read_to_string(fx.dir.join(&reference.file)).unwrap();
        let tokens = tokenizer.encode(&text).unwrap();
        assert_eq!(tokens[0], 0, "{name}: the tokenizer config adds BOS");
        let mut done = 0;
        let p = perplexity(&model, &tokens, reference.context, |d, _| done = d).unwrap();
        assert_eq!(p.tokens, reference.tokens, "{name}");
        let rel = ((p.ppl - reference.ppl) / reference.ppl).abs();
        assert!(rel < 1e-5, "{name}: ppl {} vs reference {} (rel {rel:e})", p.ppl, reference.ppl);
        assert_eq!(done, tokens.len());
    }
}

#[test]
fn bf16_compute_stays_close_to_the_f32_reference() {
    let fx = Fixture::load("tiny-v3");
    let (model, _) = Model::load(&fx.dir, Some(DType::BF16), &Device::Cpu).unwrap();
    assert_eq!(model.dtype(), DType::BF16);
    let mut cache = model.new_cache().unwrap();
    assert_eq!(cache.bytes_per_token(), 3 * (32 + 8) * 2);
    let logits = model.forward(&fx.meta.prompt_tokens, &mut cache, AttentionPath::Expanded, LogitRows::All).unwrap();
    assert_close("bf16 logits", &logits, fx.reference("logits"), Tol { abs: 0.25, rel: 0.0 });
}

#[test]
fn a_stop_string_ends_generation_and_is_not_part_of_the_text() {
    let (fx, model, tokenizer) = load_model("tiny-v2-lite");
    let mut cache = model.new_cache().unwrap();
    let full = generate(&model, &tokenizer, &mut cache, &fx.meta.prompt_tokens, &greedy(20), |_| {}).unwrap();
    let cut: String = full.text.chars().skip(3).take(2).collect();
    let at = full.text.find(&cut).unwrap();
    let mut cache = model.new_cache().unwrap();
    let mut streamed = String::new();
    let request = Request { stop: vec![cut.clone()], ..greedy(20) };
    let g =
        generate(&model, &tokenizer, &mut cache, &fx.meta.prompt_tokens, &request, |t| streamed.push_str(t)).unwrap();
    assert_eq!(g.stop, StopReason::StopString(cut));
    assert_eq!(g.text, full.text[..at]);
    assert_eq!(streamed, g.text);
}

#[test]
fn a_prompt_longer_than_the_context_is_refused_with_both_lengths() {
    let (_, model, tokenizer) = load_model("tiny-v2");
    let mut cache = model.new_cache().unwrap();
    let err = generate(&model, &tokenizer, &mut cache, &vec![5; 300], &greedy(4), |_| {}).unwrap_err().to_string();
    assert!(err.contains("300") && err.contains("256") && err.contains("max_position_embeddings"), "{err}");
}

#[test]
fn generation_stops_when_the_context_is_full() {
    let (_, model, tokenizer) = load_model("tiny-v2");
    let mut cache = model.new_cache().unwrap();
    let prompt = vec![5u32; 250];
    let g = generate(&model, &tokenizer, &mut cache, &prompt, &greedy(100), |_| {}).unwrap();
    assert_eq!(g.stop, StopReason::ContextFull);
    assert_eq!(cache.len(), 256);
}

#[test]
fn chat_turns_reuse_the_cached_conversation_and_match_a_fresh_run() {
    let (_, model, tokenizer) = load_model("tiny-v3");
    let mut chat = ChatSession::new(&model, &tokenizer, Some("Be brief.")).unwrap();
    chat.reply("Hello!", &greedy(6), |_| {}).unwrap();
    let second = chat.reply("And then?", &greedy(6), |_| {}).unwrap();
    assert_eq!(chat.messages().len(), 5);
    // The whole first-turn prompt was reused: only what follows it was run again.
    let first_turn = tokenizer.apply_chat_template(&chat.messages()[..2], true).unwrap();
    let first_len = tokenizer.encode_plain(&first_turn).unwrap().len();
    let prompt = tokenizer.apply_chat_template(chat.messages().split_last().unwrap().1, true).unwrap();
    let ids = tokenizer.encode_plain(&prompt).unwrap();
    assert!(
        second.n_prompt <= ids.len() - first_len,
        "second turn ran {} of {} prompt tokens",
        second.n_prompt,
        ids.len()
    );
    // And it generated what a run from scratch generates.
    let mut cache = model.new_cache().unwrap();
    let fresh = generate(&model, &tokenizer, &mut cache, &ids, &greedy(6), |_| {}).unwrap();
    assert_eq!(second.tokens, fresh.tokens);
    assert_eq!(chat.messages()[4], Message::new("assistant", &fresh.text));
}

#[test]
fn the_same_seed_gives_the_same_sampled_text() {
    let (fx, model, tokenizer) = load_model("tiny-v2");
    let run = |seed| {
        let sampling = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed, ..Default::default() };
        let mut cache = model.new_cache().unwrap();
        let request = Request { max_tokens: 24, sampling, stop: vec![], draft_tokens: 0 };
        generate(&model, &tokenizer, &mut cache, &fx.meta.prompt_tokens, &request, |_| {}).unwrap().tokens
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
}

#[test]
fn chunked_prefill_and_chunked_perplexity_give_the_reference_numbers() {
    let (fx, model, tokenizer) = load_model("tiny-v2");
    let chunk = 5; // the 12-token prompt runs as 5 + 5 + 2
    let mut cache = model.new_cache().unwrap();
    let tokens = &fx.meta.prompt_tokens;
    let logits = model.forward_chunked(tokens, &mut cache, AttentionPath::Expanded, LogitRows::All, chunk).unwrap();
    assert_close("chunked logits", &logits, fx.reference("logits"), Tol::F32);
    let mut cache = model.new_cache().unwrap();
    let last = model.forward_chunked(tokens, &mut cache, AttentionPath::Expanded, LogitRows::Last, chunk).unwrap();
    assert_close("chunked last row", &last, &fx.reference("logits").narrow(0, 11, 1).unwrap(), Tol::F32);
    let reference = fx.meta.perplexity.as_ref().unwrap();
    let text = std::fs::read_to_string(fx.dir.join(&reference.file)).unwrap();
    let ids = tokenizer.encode(&text).unwrap();
    let p = perplexity_with(&model, &ids, reference.context, model.cache_kind(), chunk, |_, _| {}).unwrap();
    assert_eq!(p.tokens, reference.tokens);
    assert!(((p.ppl - reference.ppl) / reference.ppl).abs() < 1e-5, "{} vs {}", p.ppl, reference.ppl);
}

/// `--quant q8_0`: logits within Q8_0's error of the dense model's, perplexity within 1%.
#[test]
fn q8_0_weights_stay_close_to_the_dense_model() {
    use candle_core::{DType, Device};
    use latent::weights::Quant;
    let (fx, dense, tok) = common::load_model("tiny-v2-lite");
    let (q8, _) =
        latent::Model::load_quantized(&fx.dir, Some(DType::F32), Some(Quant::Q8_0), &Device::Cpu, |_, _| {}).unwrap();
    assert!(q8.weight_bytes() < dense.weight_bytes() * 2 / 3, "the linear weights are quantized");
    let prompt = &fx.meta.prompt_tokens;
    let logits = |m: &latent::Model| {
        let mut cache = m.new_cache().unwrap();
        m.forward(prompt, &mut cache, latent::AttentionPath::Absorbed, latent::LogitRows::All).unwrap()
    };
    let (a, b) = (logits(&dense), logits(&q8));
    // Most logits move by Q8_0's rounding noise; a token whose routing flips can move more.
    let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let mut diffs: Vec<f32> = (&a - &b).unwrap().abs().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    diffs.sort_by(f32::total_cmp);
    let median = diffs[diffs.len() / 2];
    assert!(median > 0.0 && median < 0.01 * scale, "median |logit difference| {median}, max |logit| {scale}");
    let text = std::fs::read_to_string(common::fixtures_dir().join("ppl.txt")).unwrap();
    let ids = tok.encode(&text).unwrap();
    let ppl = |m: &latent::Model| latent::perplexity::perplexity(m, &ids, 16, |_, _| {}).unwrap().ppl;
    let (pd, pq) = (ppl(&dense), ppl(&q8));
    assert!((pq - pd).abs() < 0.01 * pd, "perplexity {pq} (Q8_0) vs {pd}");
}
