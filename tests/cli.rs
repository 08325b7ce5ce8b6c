//! The `latent` binary end to end on the fixtures.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::fixtures_dir;

fn latent(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_latent"))
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        // A command that refuses its input may close it before reading it all.
        let _ = child.stdin.take().unwrap().write_all(text.as_bytes());
    }
    child.wait_with_output().unwrap()
}

fn fixture(name: &str) -> String {
    fixtures_dir().join(name).display().to_string()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn generate_with_a_seed_repeats_itself_and_reports_speed() {
    let args =
        ["generate", "--model", &fixture("tiny-v3"), "--prompt", "Beautiful is", "--max-tokens", "16", "--seed", "5"];
    let (a, b) = (latent(&args, None), latent(&args, None));
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert!(!a.stdout.is_empty());
    assert_eq!(a.stdout, b.stdout);
    let err = text(&a.stderr);
    assert!(err.contains("tokens/s") && err.contains("generated 16 tokens"), "{err}");
}

#[test]
fn generate_reads_the_prompt_from_stdin_and_defaults_to_the_built_in_model() {
    let out = latent(&["generate", "--max-tokens", "4", "--temperature", "0"], Some("Simple is better"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no --model given"));
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/models/kjv-v3");
    let same = latent(
        &["generate", "--model", demo, "--max-tokens", "4", "--temperature", "0", "--prompt", "Simple is better"],
        None,
    );
    assert_eq!(out.stdout, same.stdout);
}

/// A newcomer's first conversation: `chat` with no model runs the built-in chat-tuned variant,
/// which answers a question on its text briefly and ends its turn (long before the token limit),
/// and a second question gets its own short answer.
#[test]
fn chat_defaults_to_the_built_in_chat_model_which_answers_briefly() {
    let questions = "Who created the heaven and the earth?\nWho called for Moses and Aaron?\n";
    let args = ["chat", "--max-tokens", "64", "--temperature", "0"];
    let out = latent(&args, Some(questions));
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("no --model given") && err.contains("chat model"), "{err}");
    let chat = concat!(env!("CARGO_MANIFEST_DIR"), "/models/kjv-v3-chat");
    let same = latent(&[&args[..], &["--model", chat]].concat(), Some(questions));
    assert_eq!(out.stdout, same.stdout);
    let replies = text(&out.stdout);
    let replies: Vec<&str> = replies.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert!(replies[0].contains("God"), "{replies:?}");
    assert!(replies[1].contains("Moses"), "{replies:?}");
    // "[N tokens, ...]" per reply: each ended by the end of its turn, not by --max-tokens.
    let counts: Vec<usize> = err.lines().filter_map(|l| l.split_once('[')?.1.split(' ').next()?.parse().ok()).collect();
    assert!(counts.len() == 2 && counts.iter().all(|&n| n < 40), "{err}");
}

#[test]
fn perplexity_json_has_tokens_nll_and_ppl() {
    let file = fixtures_dir().join("ppl.txt").display().to_string();
    let out = latent(
        &["perplexity", "--model", &fixture("tiny-v2-lite"), "--file", &file, "--context", "16", "--json"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(v["tokens"], 681);
    assert!((v["ppl"].as_f64().unwrap() - v["nll"].as_f64().unwrap().exp()).abs() < 1e-9);
}

#[test]
fn chat_answers_each_line_in_turn() {
    let out =
        latent(&["chat", "--model", &fixture("tiny-v2"), "--max-tokens", "3", "--seed", "1"], Some("Hello!\nMore?\n"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr).matches("tokens/s").count(), 2);
}

#[test]
fn inspect_compares_the_latent_cache_with_mha_and_gqa() {
    let out = latent(&["inspect", "--model", &fixture("tiny-v3")], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    for needle in ["DeepseekV3", "MLA latent", "MHA", "GQA", "active per token", "NoauxTc"] {
        assert!(s.contains(needle), "{needle} missing from:\n{s}");
    }
}

#[test]
fn bad_arguments_fail_with_a_message_not_a_panic() {
    for (args, needle) in [
        (vec!["generate", "--model", "/no/such/model", "--prompt", "x"], "/no/such/model: cannot be read"),
        (vec!["generate", "--prompt", "x", "--temperature", "-1"], "`temperature`"),
        (vec!["generate", "--prompt", "x", "--top-p", "0"], "`top_p`"),
        (vec!["perplexity", "--file", "/no/such/file.txt"], "/no/such/file.txt"),
        (vec!["perplexity", "--file", "Cargo.toml", "--context", "1"], "--context"),
    ] {
        let out = latent(&args, None);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle) && !err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let long = "Errors should never pass silently. ".repeat(40);
    let out = latent(&["generate", "--model", &fixture("tiny-v2"), "--prompt", &long], None);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("max_position_embeddings") && err.contains("256"), "{err}");
}

#[test]
fn bench_json_reports_speeds_by_depth_memory_and_the_roofline() {
    let args = [
        "bench",
        "--model",
        &fixture("tiny-v2"),
        "--depths",
        "0,16",
        "--prompt-len",
        "8",
        "--decode-tokens",
        "2",
        "--repeats",
        "1",
        "--json",
    ];
    let out = latent(&args, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert!(v["prefill_tok_s"].as_f64().unwrap() > 0.0);
    for depth in ["0", "16"] {
        assert!(v["decode_tok_s"][depth].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["roofline_share"][depth].as_f64().unwrap() > 0.0, "{v}");
    }
    // 3 layers x (32 + 8) latent values x 4 bytes; the weights are the fixture's f32 parameters.
    assert_eq!(v["kv_bytes_per_token"], 480);
    assert_eq!(v["weight_bytes"].as_u64().unwrap(), 4 * 245_424);
    let deeper =
        v["decode_bytes_per_token"]["16"].as_u64().unwrap() - v["decode_bytes_per_token"]["0"].as_u64().unwrap();
    assert_eq!(deeper, 16 * 480);
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert!(v["memory_bandwidth_gb_s"].as_f64().unwrap() > 0.0);
    // 3 layers x 4 heads x (2 x 32 + 8) multiply-adds per cached row, the cache halfway through
    // the timed tokens holding depth + 1 rows.
    assert_eq!(v["attention_macs_per_token"]["16"], 3 * 4 * 72 * 17);
    assert_eq!(v["attention_macs_per_token"]["0"], 3 * 4 * 72);
    // An f32 cache's attention has no dot-product instruction to measure.
    assert!(v["attention_peak_gmac_s"].is_null(), "{v}");
    assert_eq!(v["roofline_with_attention_share"], serde_json::json!({}));
}

/// Where the attention kernel's instruction was measured, the roofline that counts the
/// attention's arithmetic too is never below the bytes-only one, at any depth.
fn check_attention_roofline(v: &serde_json::Value) {
    let Some(peak) = v["attention_peak_gmac_s"].as_f64() else { return };
    assert!(peak > 0.0, "{v}");
    let shares = v["roofline_with_attention_share"].as_object().unwrap();
    assert_eq!(shares.len(), v["decode_tok_s"].as_object().unwrap().len(), "{v}");
    for (depth, s) in shares {
        assert!(s.as_f64().unwrap() >= v["roofline_share"][depth].as_f64().unwrap() * 0.999, "{v}");
    }
}

#[test]
fn an_int8_cache_generates_and_benches_at_about_half_the_bytes() {
    let model = fixture("tiny-v2");
    let out =
        latent(&["generate", "--model", &model, "--prompt", "hello", "--max-tokens", "6", "--kv-cache", "int8"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("tokens/s"), "{}", text(&out.stderr));
    let args = ["bench", "--model", &model, "--depths", "0,40", "--prompt-len", "8", "--decode-tokens", "2"];
    let out = latent(&[&args[..], &["--repeats", "1", "--json", "--kv-cache", "int8"]].concat(), None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert!(v["decode_tok_s"]["40"].as_f64().unwrap() > 0.0, "{v}");
    // 3 layers x (32 + 8 codes and 2 scales of 4 bytes), against 480 for f32.
    assert_eq!(v["kv_bytes_per_token"], 3 * (40 + 8));
    // Which machine and which kernels: a figure is told apart by its CPU.
    let kernels = v["cpu"]["kernels"].as_str().unwrap_or_default();
    assert!(["portable", "avx2", "avx512"].iter().any(|k| kernels.starts_with(k)), "{v}");
    assert!(v["cpu"]["model_name"].is_string() && v["cpu"]["features"].is_array(), "{v}");
    // With AVX-512 VNNI the int8 kernel's `vpdpbusd` is measured and counted.
    check_attention_roofline(&v);
}

#[test]
fn bench_refuses_depths_beyond_the_context() {
    let out = latent(&["bench", "--model", &fixture("tiny-v2"), "--depths", "1000", "--repeats", "1"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("context (256)"), "{}", text(&out.stderr));
}

/// `latent tokenizer train`, `latent train` and a checkpoint that `generate` and `perplexity` load.
/// A temporary folder holding a byte-level BPE tokenizer of 300 tokens trained on the fixture text
/// (in `tok/`), the text's path, and the tokenizer's folder.
fn trained_tokenizer() -> (tempfile::TempDir, String, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok");
    let corpus = fixture("ppl.txt");
    let out = latent(&["tokenizer", "train", &corpus, "--vocab-size", "300", "--out", tok.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    (dir, corpus, tok)
}

/// `latent train preset:tiny-v2` on `corpus` with `tok`, 16-token sequences, writing into `out`, with
/// `sets` as more `--set` overrides.
fn tiny_train_args(corpus: &str, tok: &std::path::Path, out: &std::path::Path, sets: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["train".into(), "preset:tiny-v2".into()];
    let data = [format!("data.train=[{corpus:?}]"), format!("data.tokenizer={:?}", tok.to_str().unwrap())];
    for set in data.iter().map(String::as_str).chain(["data.seq_len=16"]).chain(sets.iter().copied()) {
        args.extend(["--set".to_string(), set.to_string()]);
    }
    args.extend(["--out".to_string(), out.to_str().unwrap().to_string()]);
    args
}

#[test]
fn train_then_generate_from_the_checkpoint() {
    let (dir, corpus, tok) = trained_tokenizer();
    let run_out = dir.path().join("run");
    let args = tiny_train_args(&corpus, &tok, &run_out, &["schedule.steps=4", "data.valid_fraction=0.2"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = latent(&args, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("val") && err.contains("saved"), "{err}");
    for f in ["train_log.jsonl", "loss.png", "expert_load.png", "latest", "checkpoint-000004/model.safetensors"] {
        assert!(run_out.join(f).exists(), "{f} is missing");
    }
    let log = std::fs::read_to_string(run_out.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4);
    let ckpt = run_out.join("checkpoint-000004");
    let out =
        latent(&["generate", "--model", ckpt.to_str().unwrap(), "--prompt", "Beautiful", "--max-tokens", "5"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = latent(&["perplexity", "--model", ckpt.to_str().unwrap(), "--file", &corpus, "--json"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Fine-tuning needs no run file: --init with the sft preset.
    let chat = dir.path().join("chat.jsonl");
    let line =
        r#"{"messages": [{"role": "user", "content": "Beautiful?"}, {"role": "assistant", "content": "Simple."}]}"#;
    std::fs::write(&chat, format!("{line}\n{line}\n{line}\n")).unwrap();
    let sft_out = dir.path().join("sft");
    let args = [
        "train",
        "--init",
        ckpt.to_str().unwrap(),
        "--sft",
        chat.to_str().unwrap(),
        "--set",
        "schedule.steps=2",
        "--set",
        "data.seq_len=24",
        "--out",
        sft_out.to_str().unwrap(),
    ];
    let out = latent(&args, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(sft_out.join("checkpoint-000002/model.safetensors").exists());

    // Bad run-file input exits 1 with the key named, no panic.
    let out = latent(&["train", "preset:tiny-v2", "--set", "optim.beta2=1.5"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("optim.beta2"), "{}", text(&out.stderr));
    let out = latent(&["train", "preset:tiny-v2", "--set", "optim.typo=1"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("typo"), "{}", text(&out.stderr));
}

/// With no --model, the built-in demo model runs (written once to the cache folder).
#[test]
fn the_built_in_demo_model_runs_without_a_model_folder() {
    let cache = tempfile::tempdir().unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_latent"))
            .args(["generate", "--prompt", "In the beginning", "--max-tokens", "12", "--temperature", "0"])
            .env("XDG_CACHE_HOME", cache.path())
            .output()
            .unwrap()
    };
    let (a, b) = (run(), run());
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert!(text(&a.stderr).contains("King James"), "{}", text(&a.stderr));
    assert!(!text(&a.stdout).trim().is_empty());
    assert_eq!(a.stdout, b.stdout, "greedy output repeats, from the cached copy the second time");
    assert_eq!(std::fs::read_dir(cache.path().join("latent")).unwrap().count(), 1);
}

#[test]
fn a_gguf_file_runs_generate_chat_and_bench() {
    let model = fixture("gguf/tiny-v3-256-q4_k_m.gguf");
    let out = latent(
        &["generate", "--model", &model, "--prompt", "In the beginning", "--max-tokens", "8", "--seed", "1"],
        None,
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("Q4_K, Q5_0, Q6_K") && err.contains("generated 8 tokens"), "{err}");
    let out = latent(&["inspect", "--model", &model], None);
    assert!(out.status.success() && text(&out.stdout).contains("MLA latent"), "{}", text(&out.stderr));
    let out = latent(&["chat", "--model", &model, "--max-tokens", "4", "--seed", "1"], Some("Who?\n"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = latent(
        &[
            "--threads",
            "1",
            "bench",
            "--model",
            &model,
            "--depths",
            "0,64",
            "--prompt-len",
            "32",
            "--repeats",
            "1",
            "--json",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["decode_tok_s"]["64"].as_f64().unwrap() > 0.0, "{report}");
    // The bench counts the blocks as stored: well under the f32 size of the same weights.
    assert!(report["weight_bytes"].as_u64().unwrap() < 3 << 20, "{report}");
}

#[test]
fn an_absurd_thread_count_is_refused_at_once() {
    let start = std::time::Instant::now();
    let out = latent(&["--threads", "1000000", "inspect", "--model", &fixture("tiny-v3")], None);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("--threads 1000000") && err.contains("cores"), "{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(10), "refused before spawning anything");
}

#[test]
fn the_budget_study_counts_sequences_per_cache_and_times_them() {
    let dir = std::env::temp_dir().join(format!("latent-budget-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("budget.png");
    let out = latent(
        &[
            "bench",
            "--model",
            &fixture("tiny-v2"),
            "--budget",
            "2MiB",
            "--context",
            "128",
            "--batch",
            "1",
            "--decode-tokens",
            "2",
            "--repeats",
            "1",
            "--json",
            "--plot",
            png.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let caches = v["caches"].as_array().unwrap();
    let names: Vec<&str> = caches.iter().map(|c| c["cache"].as_str().unwrap()).collect();
    assert_eq!(names, ["latent f32", "latent int8", "expanded f32"]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("tiny-v2/config.json")).unwrap()).unwrap();
    let n = |k: &str| config[k].as_u64().unwrap() as usize;
    let (layers, heads) = (n("num_hidden_layers"), n("num_attention_heads"));
    let latent = layers * (n("kv_lora_rank") + n("qk_rope_head_dim")) * 4;
    let expanded = layers * heads * (n("qk_nope_head_dim") + n("qk_rope_head_dim") + n("v_head_dim")) * 4;
    assert_eq!(caches[0]["bytes_per_token"].as_u64().unwrap() as usize, latent);
    assert_eq!(caches[2]["bytes_per_token"].as_u64().unwrap() as usize, expanded);
    for c in caches {
        // Sequences of 128 tokens (2 pages of 64) in 2 MiB, each timed at 1 and at the most.
        let per_seq = 128 * c["bytes_per_token"].as_u64().unwrap();
        assert_eq!(c["max_sequences"].as_u64().unwrap(), (2 << 20) / per_seq);
        let timed = c["tok_s"].as_object().unwrap();
        assert!(timed.contains_key(&c["max_sequences"].to_string()));
        assert!(timed.values().all(|t| t.as_f64().unwrap() > 0.0));
    }
    assert!(std::fs::metadata(&png).unwrap().len() > 1000, "the plot is drawn");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_model_path_that_is_not_a_model_says_what_it_is() {
    let dir = std::env::temp_dir().join(format!("latent-notmodel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, "hello world").unwrap();
    let ggml = dir.join("old.gguf");
    std::fs::write(&ggml, b"GGML\x01\x00\x00\x00").unwrap();
    for (path, says) in [
        (notes.to_str().unwrap(), "starts with `hello.wo`"),
        (ggml.to_str().unwrap(), "not GGUF (it starts with `GGML....`"),
        ("/dev/null", "neither a folder nor a regular file"),
        ("/no/such/model", "cannot be read"),
    ] {
        let out = latent(&["generate", "--model", path, "--prompt", "hi"], None);
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains(path) && err.contains(says), "{path}: {err}");
        assert!(err.contains("expected a model folder"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn input_beyond_what_the_context_could_hold_is_refused_before_it_is_read() {
    // The demo model's context is 1024 tokens: a prompt or a chat line is read up to 64 KiB.
    let long = "a".repeat(200_000);
    let out = latent(&["generate", "--max-tokens", "2"], Some(&long));
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("the prompt on stdin is longer than 65536 bytes"), "{err}");
    let out = latent(&["chat", "--max-tokens", "2"], Some(&format!("In the beginning\n{long}\n")));
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("a chat line is longer than 65536 bytes"), "{err}");
    // A file past --max-file-bytes (an endless one too) is refused, naming it and the flag.
    let out = latent(&["perplexity", "--file", "/dev/zero", "--max-file-bytes", "1MiB"], None);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("/dev/zero") && err.contains("--max-file-bytes"), "{err}");
}

#[test]
fn generate_encodes_special_token_strings_as_text_unless_asked() {
    let prompt = "And God said<｜end▁of▁sentence｜>";
    let count = |extra: &[&str]| {
        let mut args = vec!["generate", "--prompt", prompt, "--max-tokens", "1", "--temperature", "0"];
        args.extend_from_slice(extra);
        let out = latent(&args, None);
        let err = text(&out.stderr);
        assert!(out.status.success(), "{err}");
        let n = err.split("prompt ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse::<usize>().ok());
        n.unwrap_or_else(|| panic!("no prompt count in {err}"))
    };
    let (as_text, raw) = (count(&[]), count(&["--special-tokens"]));
    // With --special-tokens the marker is one control token; as text it is several.
    assert!(as_text > raw + 3, "as text {as_text} tokens, raw {raw}");
}

#[test]
fn a_tokenizer_regex_that_backtracks_past_its_limit_is_an_error_not_a_panic() {
    let dir = std::env::temp_dir().join(format!("latent-regex-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures_dir().join("tiny-v2");
    for f in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap()).unwrap();
    let split =
        serde_json::json!({"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated", "invert": false});
    let old = tok["pre_tokenizer"].take();
    let chain: Vec<serde_json::Value> = std::iter::once(split).chain((!old.is_null()).then_some(old)).collect();
    tok["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": chain});
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let prompt = format!("{}b", "a".repeat(5000));
    let out = latent(&["generate", "--model", dir.to_str().unwrap(), "--max-tokens", "1"], Some(&prompt));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the tokenizer failed on this text") && !err.contains("panicked"), "{err}");
    // Just short of the engine's limit each piece backtracks for 0.1 s; a hundred of them would
    // take 12 s, and encoding stops at its time bound (5 s plus 2 s a megabyte) with an error.
    let prompt = format!("{}b", "a".repeat(30)).repeat(100);
    let started = std::time::Instant::now();
    let out = latent(&["generate", "--model", dir.to_str().unwrap(), "--max-tokens", "1"], Some(&prompt));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("took more than 5 s") && err.contains("backtracks"), "{err}");
    assert!(started.elapsed().as_secs() < 9, "took {:?}", started.elapsed());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn steps_with_a_non_finite_loss_are_skipped_then_the_run_stops_with_its_checkpoint_intact() {
    let (dir, corpus, tok) = trained_tokenizer();
    let run_out = dir.path().join("run");
    // A learning rate that throws the weights past f32 after the first step: every step after it
    // has a non-finite loss; three are skipped, the fourth stops the run.
    let sets = [
        "schedule.steps=10",
        "schedule.warmup_steps=0",
        "optim.lr=1e38",
        "optim.grad_clip=0",
        "optim.max_bad_steps=3",
        "run.save_every=1",
    ];
    let args = tiny_train_args(&corpus, &tok, &run_out, &sets);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = latent(&args, None);
    let err = text(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    assert_eq!(err.matches("skipped: its loss or gradient is not finite").count(), 3, "{err}");
    assert!(err.contains("4 steps in a row had a non-finite loss or gradient"), "{err}");
    // Skipped steps leave no line in the log, and the checkpoints saved load.
    let log = std::fs::read_to_string(run_out.join("train_log.jsonl")).unwrap();
    assert!(log.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "{log}");
    let latest = std::fs::read_to_string(run_out.join("latest")).unwrap();
    let latest = run_out.join(latest.trim());
    let inspect = latent(&["inspect", "--model", latest.to_str().unwrap()], None);
    assert!(inspect.status.success(), "{}", text(&inspect.stderr));
}

/// A training run killed at arbitrary moments (while saving and pruning checkpoints every step),
/// and resumed, always leaves only complete checkpoints under checkpoint names, and `latest` names
/// the newest; each loads.
#[test]
fn killed_training_leaves_every_checkpoint_loadable() {
    let (dir, corpus, tok) = trained_tokenizer();
    let run_out = dir.path().join("run");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let started = std::time::Instant::now();
    let mut newest = 0;
    for round in 0..8 {
        let resume = latent::train::checkpoint::list(&run_out).is_ok_and(|l| !l.is_empty());
        let sets = ["schedule.steps=100000", "run.save_every=1", "run.eval_every=0"];
        let mut args = tiny_train_args(&corpus, &tok, &run_out, &sets);
        if resume {
            args.push("--resume".into());
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_latent"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = 400 + seed % 1200;
        std::thread::sleep(std::time::Duration::from_millis(delay));
        // On a slow machine, let the first checkpoint appear before the first kill counts.
        let wait = std::time::Instant::now();
        while newest == 0
            && !latent::train::checkpoint::list(&run_out).is_ok_and(|l| !l.is_empty())
            && wait.elapsed().as_secs() < 20
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().unwrap();

        let found = latent::train::checkpoint::list(&run_out).unwrap_or_default();
        for (step, ckpt) in &found {
            for f in latent::train::checkpoint::CHECKPOINT_FILES {
                assert!(ckpt.join(f).is_file(), "round {round}: checkpoint {step} lacks {f}");
            }
            latent::Model::load(ckpt, None, &candle_core::Device::Cpu)
                .unwrap_or_else(|e| panic!("round {round}: checkpoint {step} does not load: {e}"));
        }
        if let Some((step, _)) = found.last() {
            // `latest` names the newest, or (killed between the rename and the pointer's update) the
            // one before it; both are complete.
            let latest = latent::train::checkpoint::latest(&run_out).unwrap();
            let at = found.iter().position(|(_, d)| *d == latest);
            assert!(at.is_some_and(|i| i + 2 >= found.len()), "round {round}: latest {latest:?} of {found:?}");
            assert!(*step >= newest, "round {round}: the newest checkpoint went back from {newest} to {step}");
            newest = *step;
        }
        assert!(started.elapsed().as_secs() < 120, "the kill loop is over its time bound");
    }
    assert!(newest > 0, "no checkpoint was written in 8 rounds");
}

/// Counts that cannot fit this machine's memory are refused at once with the setting named, not
/// by the kernel's out-of-memory killer.
#[test]
fn counts_beyond_memory_are_refused_naming_the_flag() {
    let model = fixture("tiny-v2");
    for (args, flag) in [
        (
            vec![
                "bench",
                "--model",
                &model,
                "--batch",
                "100000000",
                "--prompt-len",
                "8",
                "--depths",
                "0",
                "--decode-tokens",
                "2",
            ],
            "--batch",
        ),
        (
            vec!["bench", "--model", &model, "--budget", "1000000GiB", "--context", "64", "--decode-tokens", "2"],
            "--budget",
        ),
        (vec!["serve", "--model", &model, "--kv-memory", "1000000GiB", "--port", "0"], "--kv-memory"),
    ] {
        let started = std::time::Instant::now();
        let out = latent(&args, None);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(flag) && err.contains("available"), "{args:?}: {err}");
        assert!(started.elapsed().as_secs() < 20, "{args:?} took {:?}", started.elapsed());
    }
}
