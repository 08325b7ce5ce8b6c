//! GGUF files written by llama.cpp's own converter and quantizer (tools/make_gguf_fixtures.py):
//! block decoding against llama.cpp's gguf-py, the deepseek2 metadata as a config, the tokenizer
//! from the metadata, and logits against the same checkpoint in safetensors.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use latent::cache::CacheKind;
use latent::weights::gguf::GgufFile;
use latent::weights::{gguf_model, Weights};
use latent::{AttentionPath, LogitRows, Model};

fn gguf(name: &str) -> PathBuf {
    common::fixtures_dir().join("gguf").join(name)
}

fn load(path: &std::path::Path) -> Model {
    Model::load_quantized(path, Some(DType::F32), None, &Device::Cpu, |_, _| {}).unwrap().0
}

fn logits(m: &Model, tokens: &[u32]) -> Vec<f32> {
    logits_in(m, m.cache_kind(), tokens)
}

fn logits_in(m: &Model, kind: CacheKind, tokens: &[u32]) -> Vec<f32> {
    let mut cache = m.new_cache_of(kind).unwrap();
    let l = m.forward(tokens, &mut cache, AttentionPath::Absorbed, LogitRows::All).unwrap();
    l.flatten_all().unwrap().to_vec1().unwrap()
}

/// `|a - b| / |b|` over all values.
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>().sqrt();
    diff / b.iter().map(|y| y * y).sum::<f32>().sqrt()
}

fn prompt() -> Vec<u32> {
    (0..40u32).map(|i| if i == 0 { 0 } else { 4 + (i * 37 + 11) % 300 }).collect()
}

fn perplexity(m: &Model) -> f64 {
    perplexity_in(m, m.cache_kind())
}

fn perplexity_in(m: &Model, kind: CacheKind) -> f64 {
    let dir = common::fixtures_dir();
    let tok = latent::Tokenizer::load(&dir.join("tiny-v3-256"), None).unwrap();
    let ids = tok.encode(&std::fs::read_to_string(dir.join("ppl.txt")).unwrap()).unwrap();
    latent::perplexity::perplexity_with(m, &ids, 64, kind, 512, |_, _| {}).unwrap().ppl
}

#[test]
fn every_block_format_decodes_as_llama_cpp_decodes_it() {
    let reference =
        candle_core::safetensors::load(gguf("dequant.safetensors"), &Device::Cpu).expect("dequant.safetensors");
    let mut kinds = std::collections::BTreeSet::new();
    for (key, want) in &reference {
        let (file, tensor) = key.split_once('/').unwrap();
        let g = GgufFile::open(&gguf(file)).unwrap();
        let info = g.tensors.iter().find(|t| t.name == tensor).unwrap();
        let got = latent::weights::dequantize_ggml(info.ggml_type, g.data(info));
        let want: Vec<f32> = want.to_vec1().unwrap();
        assert_eq!(&got[..want.len()], &want[..], "{key} ({})", info.ggml_type.name());
        kinds.insert(info.ggml_type.name());
    }
    for kind in ["F16", "F32", "Q8_0", "Q4_K", "Q6_K", "Q5_0"] {
        assert!(kinds.contains(kind), "the fixtures cover {kind} (have {kinds:?})");
    }
}

#[test]
fn the_metadata_is_the_checkpoint_config() {
    let dir = common::fixtures_dir();
    for (file, folder) in [("tiny-v3-256-q4_k_m.gguf", "tiny-v3-256"), ("tiny-v2-lite-f16.gguf", "tiny-v2-lite")] {
        let from_gguf = gguf_model::config(&GgufFile::open(&gguf(file)).unwrap()).unwrap();
        let hf = latent::Config::from_file(&dir.join(folder).join("config.json")).unwrap();
        // GGUF keeps the norm epsilon as an f32.
        assert!((from_gguf.rms_norm_eps - hf.rms_norm_eps).abs() < 1e-12, "{file}: rms_norm_eps");
        let norm = |c: &latent::Config| {
            let mut c = c.clone();
            c.rms_norm_eps = 0.0;
            c.initializer_range = 0.0;
            c.max_position_embeddings = 0;
            // GGUF keeps 0.1 * mscale_all_dim as an f32.
            if let Some(y) = c.rope.yarn.as_mut() {
                y.mscale = y.mscale.map(|m| (m * 1e5).round() / 1e5);
                y.mscale_all_dim = y.mscale_all_dim.map(|m| (m * 1e5).round() / 1e5);
            }
            format!("{c:?}")
        };
        assert_eq!(norm(&from_gguf), norm(&hf), "{file} vs {folder}/config.json");
    }
}

#[test]
fn the_tokenizer_comes_from_the_metadata() {
    let dir = common::fixtures_dir();
    let g = GgufFile::open(&gguf("tiny-v3-256-q8_0.gguf")).unwrap();
    let from_gguf = gguf_model::tokenizer(&g).unwrap();
    let hf = latent::Tokenizer::load(&dir.join("tiny-v3-256"), None).unwrap();
    let text = std::fs::read_to_string(dir.join("ppl.txt")).unwrap() + " 12345 naïve  spaces\n\ttabs <｜User｜>";
    assert_eq!(from_gguf.encode(&text).unwrap(), hf.encode(&text).unwrap());
    assert_eq!(from_gguf.bos_id(), Some(0));
    let ids = from_gguf.encode(&text).unwrap();
    assert_eq!(from_gguf.decode(&ids, true).unwrap(), hf.decode(&ids, true).unwrap());
    let chat = [latent::tokenizer::Message::new("user", "Who?")];
    let rendered = from_gguf.apply_chat_template(&chat, true).unwrap();
    assert!(rendered.contains("Who?"), "{rendered}");
}

#[test]
fn split_k_b_v_b_join_back_into_kv_b_proj_exactly() {
    let dir = common::fixtures_dir().join("tiny-v2-lite");
    let g = GgufFile::open(&gguf("tiny-v2-lite-f16.gguf")).unwrap();
    assert!(g.tensors.iter().any(|t| t.name == "blk.0.attn_k_b.weight"), "the fixture uses the split form");
    let config = gguf_model::config(&g).unwrap();
    let from_gguf = Weights::open_gguf(g, &config, Some(DType::F32), &Device::Cpu).unwrap();
    let hf = Weights::open(&dir, Some(DType::F32), &Device::Cpu).unwrap();
    for layer in 0..config.num_hidden_layers {
        let name = format!("model.layers.{layer}.self_attn.kv_b_proj.weight");
        let shape = hf.shape(&name).unwrap().to_vec();
        let want = hf.get(&name, &shape).unwrap().to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
        let got = from_gguf.get(&name, &shape).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "{name}");
    }
}

#[test]
fn f16_gguf_logits_match_the_safetensors_checkpoint() {
    let dir = common::fixtures_dir().join("tiny-v2-lite");
    let (st, gg) = (load(&dir), load(&gguf("tiny-v2-lite-f16.gguf")));
    let tokens = prompt();
    let err = relative_error(&logits(&gg, &tokens), &logits(&st, &tokens));
    // F16 rounding of the weights only.
    assert!(err < 2e-3, "relative logit error {err}");
}

/// Q8_0 and Q4_K_M files of the same checkpoint: logits within each format's error of the bf16
/// safetensors, Q8_0 perplexity within 1%; and quantize-on-load lands close to llama.cpp's file.
#[test]
fn quantized_gguf_logits_stay_within_their_format_error() {
    let st = load(&common::fixtures_dir().join("tiny-v3-256"));
    let q8 = load(&gguf("tiny-v3-256-q8_0.gguf"));
    let q4 = load(&gguf("tiny-v3-256-q4_k_m.gguf"));
    assert_eq!(q8.quant_summary(), Some("Q8_0"));
    // (Q5_0: the split `attn_k_b`, whose rows of 128 are too short for Q4_K; decode multiplies
    // its blocks per head.)
    assert_eq!(q4.quant_summary(), Some("Q4_K, Q5_0, Q6_K"));
    let tokens = prompt();
    let want = logits(&st, &tokens);
    let (e8, e4) = (relative_error(&logits(&q8, &tokens), &want), relative_error(&logits(&q4, &tokens), &want));
    // A random net has no redundancy: each of its ~8 chained products adds its format's noise
    // (measured: Q8_0 2.8%, Q4_K_M 25%, latent's own Q4_K 24%); Q4_K_M must move them clearly more.
    eprintln!("relative logit error: Q8_0 {e8}, Q4_K_M {e4}");
    assert!(e8 > 0.0 && e8 < 0.05, "Q8_0 relative logit error {e8}");
    assert!(e4 > 3.0 * e8 && e4 < 0.4, "Q4_K_M relative logit error {e4} (Q8_0: {e8})");
    let (p, p8, p4) = (perplexity(&st), perplexity(&q8), perplexity(&q4));
    eprintln!("perplexity: bf16 {p}, Q8_0 {p8}, Q4_K_M {p4}");
    assert!((p8 - p).abs() < 0.01 * p, "Q8_0 perplexity {p8} vs {p}");
    assert!((p4 - p).abs() < 0.05 * p, "Q4_K_M perplexity {p4} vs {p}");

    // latent's own Q4_K (quantize on load) is in the same range as llama.cpp's file.
    let dir = common::fixtures_dir().join("tiny-v3-256");
    let ours =
        Model::load_quantized(&dir, Some(DType::F32), Some(latent::weights::Quant::Q4K), &Device::Cpu, |_, _| {})
            .unwrap()
            .0;
    let e = relative_error(&logits(&ours, &tokens), &want);
    eprintln!("relative logit error: on-load Q4_K {e}");
    assert!(e < 1.3 * e4, "on-load Q4_K relative logit error {e} vs llama.cpp's Q4_K_M {e4}");
    assert!(ours.weight_bytes() < st.weight_bytes() / 2);
}

#[test]
fn bad_gguf_files_are_refused_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(gguf("tiny-v2-lite-f16.gguf")).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = Model::load_quantized(&cut, None, None, &Device::Cpu, |_, _| {}).err().unwrap().to_string();
    assert!(err.contains("cut.gguf") && err.contains("past the end"), "{err}");

    // Another architecture: named, not misread.
    let mut other = bytes.clone();
    let at = other.windows(9).position(|w| w == b"deepseek2").unwrap();
    other[at..at + 9].copy_from_slice(b"deepseek9");
    let path = tmp.path().join("other.gguf");
    std::fs::write(&path, &other).unwrap();
    let err = Model::load_quantized(&path, None, None, &Device::Cpu, |_, _| {}).err().unwrap().to_string();
    assert!(err.contains("other.gguf") && err.contains("deepseek9"), "{err}");
}

/// Logits of each token fed one at a time (the decode kernels), for comparison with a prefill.
fn stepwise_logits(m: &Model, tokens: &[u32]) -> Vec<f32> {
    stepwise_logits_in(m, m.cache_kind(), tokens)
}

fn stepwise_logits_in(m: &Model, kind: CacheKind, tokens: &[u32]) -> Vec<f32> {
    let mut cache = m.new_cache_of(kind).unwrap();
    let mut out = vec![];
    for &t in tokens {
        let l = m.forward(&[t], &mut cache, AttentionPath::Absorbed, LogitRows::All).unwrap();
        out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

/// A prompt long enough for the tiled GEMM (past 64 rows even for GGML blocks) agrees with the same
/// tokens decoded one by one, in every dtype and format: bf16 compute (bf16 GEMM, fused decode
/// attention over a bf16 cache), f32, Q8_0 and Q4_K_M (tiles, or blocks dequantized per run of
/// rows), and Q8_0 and Q4_K quantized on load.
fn on_load(dir: &std::path::Path, quant: latent::weights::Quant) -> Model {
    Model::load_quantized(dir, Some(DType::F32), Some(quant), &Device::Cpu, |_, _| {}).unwrap().0
}

#[test]
fn long_prefill_matches_token_by_token_decode() {
    let tokens: Vec<u32> = (0..100u32).map(|i| if i == 0 { 0 } else { 4 + (i * 53 + 7) % 300 }).collect();
    let dir = common::fixtures_dir().join("tiny-v3-256");
    let bf16 = Model::load_quantized(&dir, Some(DType::BF16), None, &Device::Cpu, |_, _| {}).unwrap().0;
    let cases = [
        ("bf16", bf16, 0.02),
        ("f32", load(&dir), 1e-4),
        // Prefill and decode differ in attention (expanded heads against the absorbed latent),
        // and where weights are not tiled (no VNNI) the prefill multiplies bf16-rounded blocks by
        // bf16 activations, the decode by 8-bit ones.
        ("Q8_0", load(&gguf("tiny-v3-256-q8_0.gguf")), 0.03),
        ("Q4_K_M", load(&gguf("tiny-v3-256-q4_k_m.gguf")), 0.05),
        // Quantized on load: decode absorbs with per-head blocks quantized from `kv_b_proj`.
        ("on-load Q8_0", on_load(&dir, latent::weights::Quant::Q8_0), 0.03),
        ("on-load Q4_K", on_load(&dir, latent::weights::Quant::Q4K), 0.05),
    ];
    for (name, m, bound) in cases {
        let e = relative_error(&logits(&m, &tokens), &stepwise_logits(&m, &tokens));
        eprintln!("{name}: prefill against decode, relative logit error {e}");
        assert!(e < bound, "{name}: prefill of 100 tokens against decode: relative error {e}");
    }
}

/// An int8 latent cache: decode (the 8-bit attention kernel) and prefill (attention over the
/// dequantized rows) both stay close to the f32 cache's logits, and perplexity within 1%.
#[test]
fn int8_latent_cache_stays_close_to_the_f32_cache() {
    let tokens: Vec<u32> = (0..100u32).map(|i| if i == 0 { 0 } else { 4 + (i * 53 + 7) % 300 }).collect();
    let dir = common::fixtures_dir().join("tiny-v3-256");
    let dense = load(&dir);
    let int8 = load(&dir);
    let kind = CacheKind::Int8;
    assert_eq!(int8.new_cache_of(kind).unwrap().kind(), kind);
    let want = logits(&dense, &tokens);
    let decode = relative_error(&stepwise_logits_in(&int8, kind, &tokens), &want);
    let prefill = relative_error(&logits_in(&int8, kind, &tokens), &want);
    eprintln!("int8 cache: relative logit error, decode {decode}, prefill {prefill}");
    assert!(decode > 0.0 && decode < 0.02, "int8 cache decode: relative logit error {decode}");
    assert!(prefill > 0.0 && prefill < 0.02, "int8 cache prefill: relative logit error {prefill}");
    let (p, p8) = (perplexity(&dense), perplexity_in(&int8, kind));
    eprintln!("perplexity: f32 cache {p}, int8 cache {p8}");
    assert!((p8 - p).abs() < 0.01 * p, "int8 cache perplexity {p8} vs {p}");
    // 256 + 32 codes and 3 scales a row, per layer, against 288 f32.
    let cfg = int8.config();
    assert_eq!(int8.new_cache_of(kind).unwrap().bytes_per_token(), cfg.num_hidden_layers * (256 + 32 + 3 * 4));
}

/// A GGUF file that carries DeepSeek-V3's multi-token-prediction block (llama.cpp's `nextn`
/// convention; tools/make_mtp_fixtures.py writes it from tests/fixtures/tiny-v3-mtp in f32):
/// the module loads, drafts exactly what the safetensors checkpoint's module drafts, and
/// speculative decoding from the file gives the plain tokens.
#[test]
fn a_gguf_file_with_an_mtp_block_drafts_as_the_checkpoint_does() {
    let file = gguf("tiny-v3-mtp-f32.gguf");
    let config = gguf_model::config(&GgufFile::open(&file).unwrap()).unwrap();
    assert_eq!((config.num_hidden_layers, config.num_nextn_predict_layers), (2, 1));
    let (from_gguf, hf) = (load(&file), load(&common::fixtures_dir().join("tiny-v3-mtp")));
    assert_eq!((from_gguf.mtp_depth(), hf.mtp_depth()), (1, 1));
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % 300 + 2).collect();
    let drafts = |m: &Model| {
        let mut cache = m.new_cache_of(m.cache_kind()).unwrap();
        let (_, hidden) = m.prefill_hidden(&tokens, &mut cache, 64).unwrap();
        let hidden: Vec<f32> = hidden.flatten_all().unwrap().to_vec1().unwrap();
        let mut mtp_cache = m.new_mtp_cache(m.cache_kind()).unwrap();
        m.mtp_forward(0, &hidden[..hidden.len() - m.config().hidden_size], &tokens[1..], &mut mtp_cache).unwrap().0
    };
    let (a, b) = (drafts(&from_gguf), drafts(&hf));
    assert_eq!(a.len(), (tokens.len() - 1) * 320);
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "MTP logits differ by {worst}");

    let tok = gguf_model::tokenizer(&GgufFile::open(&file).unwrap()).unwrap();
    let prompt = tok.encode("Beautiful is better than").unwrap();
    let run = |draft_tokens| {
        let params = latent::SamplingParams { temperature: 0.0, ..Default::default() };
        let request = latent::generate::Request { draft_tokens, ..latent::generate::Request::new(40, params) };
        let mut cache = from_gguf.new_cache_of(from_gguf.cache_kind()).unwrap();
        latent::generate::generate(&from_gguf, &tok, &mut cache, &prompt, &request, |_| {}).unwrap()
    };
    let (plain, spec) = (run(0), run(1));
    assert_eq!(spec.tokens, plain.tokens);
    let s = spec.speculation.unwrap();
    assert!(s.accepted > 0, "{s:?}");
}

#[test]
fn nextn_layers_must_leave_the_model_a_layer() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(gguf("tiny-v3-mtp-f32.gguf")).unwrap();
    // `deepseek2.nextn_predict_layers` = 1 -> 3 (= block_count).
    let key = b"deepseek2.nextn_predict_layers";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
    assert_eq!(&bytes[at..at + 4], &1u32.to_le_bytes());
    bytes[at..at + 4].copy_from_slice(&3u32.to_le_bytes());
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err = gguf_model::config(&GgufFile::open(&path).unwrap()).unwrap_err().to_string();
    assert!(err.contains("nextn_predict_layers") && err.contains("block_count"), "{err}");
}
