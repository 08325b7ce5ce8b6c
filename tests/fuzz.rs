//! Mutation fuzzing of every parser of a file a user gives latent: safetensors, GGUF, config.json,
//! tokenizer.json, tokenizer_config.json (and its chat template), run files. Each parser gets
//! thousands of inputs made from valid files by byte-level mutations (bit flips, interesting
//! integers, insertions, deletions, splices, truncation) and structure-aware ones (a JSON or TOML
//! value swapped for an extreme one, keys dropped or duplicated, hostile snippets spliced into the
//! template), and each input must end in a result or an error: no panic, within a time bound, and
//! within a memory bound (the allocator's per-thread budget, `latent::bounded`).
//!
//! `LATENT_FUZZ_CASES` (default 3000 per parser) and `LATENT_FUZZ_SECONDS` (default 12 per
//! parser) size a run; a failing input is written to `target/fuzz-failures/` to reproduce.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use latent::bounded::{Exceeded, Limits};

#[global_allocator]
static ALLOC: latent::bounded::BoundedAlloc = latent::bounded::BoundedAlloc;

/// Memory one parse may hold at once.
const CASE_MEMORY: usize = 1 << 30;
/// Time one parse may take.
const CASE_TIME: Duration = Duration::from_secs(20);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    7,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
    u64::MAX - 7,
];

/// One byte-level mutation of `data`, mostly within its first `focus` bytes (the header).
fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, focus: usize) {
    let span = focus.min(data.len()).max(1);
    let at = |rng: &mut Rng, len: usize| if rng.below(4) == 0 { rng.below(len.max(1)) } else { rng.below(span) };
    if data.is_empty() {
        data.push(rng.next() as u8);
        return;
    }
    match rng.below(9) {
        0 => {
            let i = at(rng, data.len()).min(data.len() - 1);
            data[i] ^= 1 << rng.below(8);
        }
        1 => {
            let i = at(rng, data.len()).min(data.len() - 1);
            data[i] = rng.next() as u8;
        }
        2 | 3 => {
            // An interesting integer, 4 or 8 bytes little-endian.
            let width = if rng.below(2) == 0 { 4 } else { 8 };
            let v = rng.pick(&INTERESTING).to_le_bytes();
            let i = at(rng, data.len()).min(data.len().saturating_sub(width));
            let end = (i + width).min(data.len());
            data[i..end].copy_from_slice(&v[..end - i]);
        }
        4 => {
            let i = at(rng, data.len());
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            data.splice(i..i, bytes);
        }
        5 => {
            let i = at(rng, data.len());
            let n = (1 + rng.below(64)).min(data.len() - i);
            data.drain(i..i + n);
        }
        6 => {
            // Copy a chunk over another place (duplicated structures).
            let (a, b) = (at(rng, data.len()), at(rng, data.len()));
            let n = (1 + rng.below(256)).min(data.len() - a).min(data.len() - b);
            let chunk = data[a..a + n].to_vec();
            data[b..b + n].copy_from_slice(&chunk);
        }
        7 => {
            let keep = rng.below(data.len());
            data.truncate(keep);
        }
        _ => {
            // Append garbage or a repeated chunk.
            let n = 1 + rng.below(4096);
            data.extend((0..n).map(|_| rng.next() as u8));
        }
    }
}

fn extreme_json(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    let options = [
        json!(0),
        json!(-1),
        json!(1),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1u64 << 53),
        json!(4294967296u64),
        json!(1e300),
        json!(-1e300),
        json!(0.5),
        json!(""),
        json!("x".repeat(10_000)),
        json!("<｜end▁of▁sentence｜>"),
        json!([]),
        json!({}),
        json!(null),
        json!(true),
        json!([[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]),
        json!(["a", 1, null, 1e308]),
        json!({"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated", "invert": false}),
    ];
    rng.pick(&options).clone()
}

/// Every path in a JSON value, as a sequence of keys and indices.
fn json_paths(v: &serde_json::Value, prefix: &mut Vec<serde_json::Value>, out: &mut Vec<Vec<serde_json::Value>>) {
    out.push(prefix.clone());
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                prefix.push(k.clone().into());
                json_paths(x, prefix, out);
                prefix.pop();
            }
        }
        serde_json::Value::Array(a) => {
            // Long arrays (vocabularies, merges): a few elements are enough.
            let mut picks: Vec<usize> =
                [0, 1, a.len() / 2, a.len().saturating_sub(1)].into_iter().filter(|&i| i < a.len()).collect();
            picks.dedup();
            picks.sort_unstable();
            picks.dedup();
            for i in picks {
                prefix.push(i.into());
                json_paths(&a[i], prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn json_at<'a>(v: &'a mut serde_json::Value, path: &[serde_json::Value]) -> Option<&'a mut serde_json::Value> {
    let mut cur = v;
    for p in path {
        cur = match p {
            serde_json::Value::String(k) => cur.get_mut(k.as_str())?,
            serde_json::Value::Number(i) => cur.get_mut(i.as_u64()? as usize)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Template pieces that are hostile, broken, or both.
const TEMPLATE_SNIPPETS: [&str; 14] = [
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{{ messages[0]['content'] * 100000000 }}",
    "{{ (messages|tojson) * 1000 }}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "{{ raise_exception('no') }}",
    "{% if",
    "}}",
    "{% endfor %}",
    "{{ bos_token }}{{ eos_token }}<｜end▁of▁sentence｜>",
    "{{ messages[99]['content'] }}",
    "{{ ('x'|indent(100000000)) }}",
    "{% for m in messages %}{{ m.content|replace('', 'xxxxxxxxxxxxxxxx') }}{% endfor %}",
    "{{ range(10000000)|list|length }}",
];

/// One structure-aware mutation of a JSON document.
fn mutate_json(rng: &mut Rng, data: &[u8]) -> Option<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(data).ok()?;
    let mut paths = Vec::new();
    json_paths(&v, &mut Vec::new(), &mut paths);
    let path = rng.pick(&paths).clone();
    if path.is_empty() {
        return None;
    }
    let (parent_path, last) = path.split_at(path.len() - 1);
    match rng.below(6) {
        0..=2 => *json_at(&mut v, &path)? = extreme_json(rng),
        3 => {
            // Drop the key (or element).
            let parent = json_at(&mut v, parent_path)?;
            match (&last[0], parent) {
                (serde_json::Value::String(k), serde_json::Value::Object(m)) => {
                    m.remove(k);
                }
                (serde_json::Value::Number(i), serde_json::Value::Array(a)) => {
                    a.remove(i.as_u64()? as usize);
                }
                _ => return None,
            }
        }
        4 => {
            // Splice a hostile snippet into a string (the chat template among them).
            let snippet = *rng.pick(&TEMPLATE_SNIPPETS);
            let node = json_at(&mut v, &path)?;
            let s = node.as_str()?.to_string();
            let mut cut = rng.below(s.len() + 1);
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            *node = format!("{}{snippet}{}", &s[..cut], &s[cut..]).into();
        }
        _ => {
            // Copy one subtree over another.
            let other = rng.pick(&paths).clone();
            let value = json_at(&mut v, &other)?.clone();
            *json_at(&mut v, &path)? = value;
        }
    }
    serde_json::to_vec(&v).ok()
}

fn extreme_toml(rng: &mut Rng) -> toml::Value {
    let options = [
        toml::Value::Integer(0),
        toml::Value::Integer(-1),
        toml::Value::Integer(i64::MAX),
        toml::Value::Integer(1 << 40),
        toml::Value::Integer(1_000_000_000_000),
        toml::Value::Float(1e300),
        toml::Value::Float(f64::NAN),
        toml::Value::Float(f64::INFINITY),
        toml::Value::Float(-0.5),
        toml::Value::String(String::new()),
        toml::Value::String("/dev/zero".into()),
        toml::Value::String("x".repeat(10_000)),
        toml::Value::Boolean(true),
        toml::Value::Array(vec![]),
        toml::Value::Array(vec![toml::Value::Float(2.0), toml::Value::Integer(-3)]),
        toml::Value::Table(toml::Table::new()),
    ];
    rng.pick(&options).clone()
}

/// One structure-aware mutation of a TOML document.
fn mutate_toml(rng: &mut Rng, data: &[u8]) -> Option<Vec<u8>> {
    let mut table: toml::Table = std::str::from_utf8(data).ok()?.parse().ok()?;
    let sections: Vec<String> = table.keys().cloned().collect();
    if sections.is_empty() {
        return None;
    }
    let section = rng.pick(&sections).clone();
    let inner = table.get_mut(&section)?.as_table_mut()?;
    let keys: Vec<String> = inner.keys().cloned().collect();
    match rng.below(4) {
        0 | 1 if !keys.is_empty() => {
            let key = rng.pick(&keys).clone();
            inner.insert(key, extreme_toml(rng));
        }
        2 if !keys.is_empty() => {
            let key = rng.pick(&keys).clone();
            inner.remove(&key);
        }
        _ => {
            // A misspelt or unknown key.
            let key = if keys.is_empty() { "seq_len".to_string() } else { rng.pick(&keys).clone() };
            inner.insert(format!("{key}x"), extreme_toml(rng));
        }
    }
    toml::to_string(&table).ok().map(String::into_bytes)
}

fn seeds(parser: &str) -> Vec<Vec<u8>> {
    let f = common::fixtures_dir();
    let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    match parser {
        "safetensors" => vec![
            read(f.join("tiny-v2/reference.safetensors")),
            read(f.join("tiny-v2/reference_bf16.safetensors")),
            read(f.join("gguf/dequant.safetensors")),
        ],
        "gguf" => vec![read(f.join("gguf/tiny-v2-lite-f16.gguf")), read(f.join("gguf/tiny-v3-256-q4_k_m.gguf"))],
        "config.json" => {
            let mut v: Vec<Vec<u8>> = std::fs::read_dir(f.join("configs"))
                .unwrap()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .map(read)
                .collect();
            for m in ["tiny-v2", "tiny-v3", "tiny-v3-fp8"] {
                v.push(read(f.join(m).join("config.json")));
            }
            v
        }
        "tokenizer.json" => vec![read(f.join("tokenizer/tokenizer.json"))],
        "tokenizer_config.json" => vec![read(f.join("tokenizer/tokenizer_config.json"))],
        "run file" => std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("presets"))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .map(read)
            .collect(),
        other => panic!("no seeds for {other}"),
    }
}

fn fuzz(parser: &'static str) {
    let cases: usize = std::env::var("LATENT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let seconds: u64 = std::env::var("LATENT_FUZZ_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    let seeds = seeds(parser);
    let tokenizer_json = std::fs::read(common::fixtures_dir().join("tokenizer/tokenizer.json")).unwrap();
    let structured = !matches!(parser, "safetensors" | "gguf");
    let focus = if parser == "gguf" { 48 << 10 } else { 4 << 10 };
    let scratch = tempfile::tempdir().unwrap();
    let mut rng = Rng(parser.bytes().fold(0x5eed_0000u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)));
    let started = Instant::now();
    let (mut ran, mut errors) = (0usize, 0usize);
    // The seeds themselves parse.
    for seed in &seeds {
        latent::fuzz::parse(parser, seed, &tokenizer_json, scratch.path())
            .unwrap_or_else(|e| panic!("{parser}: a valid seed fails: {e}"));
    }
    while ran < cases && started.elapsed() < Duration::from_secs(seconds) {
        let case_seed = rng.next();
        let mut case_rng = Rng(case_seed | 1);
        let mut data = case_rng.pick(&seeds).clone();
        for _ in 0..1 + case_rng.below(4) {
            let structural = structured && case_rng.below(3) != 0;
            let mutated = if structural {
                if parser == "run file" {
                    mutate_toml(&mut case_rng, &data)
                } else {
                    mutate_json(&mut case_rng, &data)
                }
            } else {
                None
            };
            match mutated {
                Some(m) => data = m,
                None => mutate_bytes(&mut case_rng, &mut data, focus),
            }
        }
        let (input, dir, tok) = (data.clone(), scratch.path().to_path_buf(), tokenizer_json.clone());
        let outcome = latent::bounded::run(Limits { memory: Some(CASE_MEMORY), time: CASE_TIME }, move || {
            latent::fuzz::parse(parser, &input, &tok, &dir).is_err()
        });
        match outcome {
            Ok(failed) => errors += usize::from(failed),
            Err(why) => {
                let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
                std::fs::create_dir_all(&out).unwrap();
                let file = out.join(format!("{}-{case_seed:016x}.bin", parser.replace([' ', '.'], "_")));
                std::fs::write(&file, &data).unwrap();
                let what = match why {
                    Exceeded::Memory(m) => format!("used more than {m} bytes"),
                    Exceeded::Time(t) => format!("took more than {t:?}"),
                    Exceeded::Panicked(p) => format!("panicked: {p}"),
                    Exceeded::Spawn(e) => format!("no thread: {e}"),
                };
                panic!("{parser}: case {ran} (seed {case_seed:#x}) {what}; the input is in {}", file.display());
            }
        }
        ran += 1;
    }
    eprintln!(
        "{parser}: {ran} mutated inputs in {:.1} s, {errors} refused with an error",
        started.elapsed().as_secs_f64()
    );
    assert!(ran >= cases.min(1000), "{parser}: only {ran} cases in {seconds} s");
    assert!(errors > 0, "{parser}: no mutation was refused; the mutator does nothing");
}

#[test]
fn fuzz_safetensors() {
    fuzz("safetensors");
}

#[test]
fn fuzz_gguf() {
    fuzz("gguf");
}

#[test]
fn fuzz_config_json() {
    fuzz("config.json");
}

#[test]
fn fuzz_tokenizer_json() {
    fuzz("tokenizer.json");
}

#[test]
fn fuzz_tokenizer_config_and_template() {
    fuzz("tokenizer_config.json");
}

#[test]
fn fuzz_run_files() {
    fuzz("run file");
}
