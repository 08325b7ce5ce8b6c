//! Entry points for fuzzing: each feeds bytes to one parser of a file a user gives latent, the way
//! latent reads that file, and goes on through what a successful parse leads to (loading every
//! tensor, encoding and decoding text, rendering the chat template). Errors are the expected
//! outcome for most inputs; what must never happen is a panic, a hang or unbounded memory.
//!
//! `tests/fuzz.rs` runs thousands of mutated inputs per parser in the test suite; `fuzz/` holds
//! cargo-fuzz targets over the same functions for long coverage-guided runs (see README.md).

use std::path::Path;

use candle_core::{DType, Device};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::tokenizer::{Message, Tokenizer};

/// The parsers, by the file each reads.
pub const PARSERS: [&str; 6] =
    ["safetensors", "gguf", "config.json", "tokenizer.json", "tokenizer_config.json", "run file"];

fn write(scratch: &Path, name: &str, bytes: &[u8]) -> Result<std::path::PathBuf> {
    let path = scratch.join(name);
    std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// A `model.safetensors` file: the header, then every tensor read and converted to f32.
pub fn safetensors(bytes: &[u8], scratch: &Path) -> Result<()> {
    let path = write(scratch, "model.safetensors", bytes)?;
    let w = crate::weights::Weights::open_file(&path, DType::F32, &Device::Cpu)?;
    let names: Vec<String> = w.names().into_iter().map(str::to_owned).collect();
    for name in names {
        let shape = w.shape(&name).map(<[usize]>::to_vec).unwrap_or_default();
        w.get(&name, &shape)?;
    }
    Ok(())
}

/// A GGUF file: header and metadata, the config and tokenizer built from the metadata, and the
/// model loaded from its tensors.
pub fn gguf(bytes: &[u8], scratch: &Path) -> Result<()> {
    let path = write(scratch, "model.gguf", bytes)?;
    let file = crate::weights::gguf::GgufFile::open(&path)?;
    crate::weights::gguf_model::config(&file)?;
    if let Ok(tok) = crate::weights::gguf_model::tokenizer(&file) {
        exercise_tokenizer(&tok)?;
    }
    crate::model::Model::load(&path, Some(DType::F32), &Device::Cpu)?;
    Ok(())
}

/// A `config.json`.
pub fn config_json(bytes: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(bytes).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    Config::from_json(text, Path::new("config.json"))?;
    Ok(())
}

/// A `tokenizer.json` (with no `tokenizer_config.json`): built, then text encoded and decoded.
pub fn tokenizer_json(bytes: &[u8], scratch: &Path) -> Result<()> {
    let tok = Tokenizer::from_parts(bytes, &scratch.join("tokenizer.json"), &scratch.join("absent.json"), None)?;
    exercise_tokenizer(&tok)
}

/// A `tokenizer_config.json` beside a sane `tokenizer.json`: its special tokens and its chat
/// template, rendered over a short conversation and encoded.
pub fn tokenizer_config(bytes: &[u8], tokenizer_json: &[u8], scratch: &Path) -> Result<()> {
    let path = write(scratch, "tokenizer_config.json", bytes)?;
    let tok = Tokenizer::from_parts(tokenizer_json, &scratch.join("tokenizer.json"), &path, None)?;
    exercise_tokenizer(&tok)
}

/// A run file (`latent train RUN.toml`): parsed, validated, and its `[model]` built into a config.
pub fn run_file(bytes: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(bytes).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let path = Path::new("run.toml");
    let run = crate::train::RunFile::parse(text, path, &[])?;
    if !run.model.is_empty() {
        run.config(path)?;
    }
    Ok(())
}

/// Runs the parser named by `parser` (one of [`PARSERS`]); `sane_tokenizer` is the tokenizer.json
/// a `tokenizer_config.json` is read beside.
pub fn parse(parser: &str, bytes: &[u8], sane_tokenizer: &[u8], scratch: &Path) -> Result<()> {
    match parser {
        "safetensors" => safetensors(bytes, scratch),
        "gguf" => gguf(bytes, scratch),
        "config.json" => config_json(bytes),
        "tokenizer.json" => tokenizer_json(bytes, scratch),
        "tokenizer_config.json" => tokenizer_config(bytes, sane_tokenizer, scratch),
        "run file" => run_file(bytes),
        other => Err(Error::InvalidArgument(format!("no parser `{other}`; parsers are {PARSERS:?}"))),
    }
}

/// The demo model's tokenizer, which a fuzzed `tokenizer_config.json` is read beside.
const SANE_TOKENIZER: &[u8] = include_bytes!("../models/kjv/tokenizer.json");

/// What a cargo-fuzz target runs (`fuzz/fuzz_targets/`): `parser` over `data`, in a scratch
/// folder of this process, with latent's panic hook in front of libFuzzer's, so that the panics
/// latent catches and reports as errors are not counted as crashes. A `tokenizer_config.json` is
/// read beside the built-in demo model's tokenizer.
pub fn run_target(parser: &str, data: &[u8]) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(crate::bounded::install_panic_hook);
    let scratch = std::env::temp_dir().join(format!("latent-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&scratch);
    // Errors are expected; a panic, a hang or a memory blow-up is what libFuzzer reports.
    let _ = parse(parser, data, SANE_TOKENIZER, &scratch);
}

fn exercise_tokenizer(tok: &Tokenizer) -> Result<()> {
    let ids = tok.encode("Hello, world! <｜end▁of▁sentence｜> ünïcödé 123")?;
    tok.decode(&ids, false)?;
    tok.decode(&ids, true)?;
    if tok.has_chat_template() {
        let messages = [
            Message { role: "system".into(), content: "Be brief.".into() },
            Message { role: "user".into(), content: "Hi <｜User｜>".into() },
        ];
        tok.encode_chat(&messages, true)?;
    }
    Ok(())
}
