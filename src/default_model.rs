//! The demo models built into the binary: a DeepSeek-V3-architecture model with one
//! multi-token-prediction module, trained by latent on the King James Bible at its full context
//! (`models/kjv-v3`, made by `latent train preset:kjv-v3`), and its chat-tuned variant
//! (`models/kjv-v3-chat`, fine-tuned on question-answer pairs drawn from the same text). Commands
//! run them when no `--model` is given: `chat` and `serve` the chat variant, the others the base
//! model. Their files are written once to a cache folder named after their hash, so the binary
//! works wherever it is copied.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// Which built-in model a command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demo {
    /// The language model: `generate`, `perplexity`, `bench`, `inspect`.
    Base,
    /// The chat-tuned variant: `chat` and `serve`.
    Chat,
}

type Files = &'static [(&'static str, &'static [u8])];

/// The tokenizer both share.
const TOKENIZER: &[u8] = include_bytes!("../models/kjv-v3/tokenizer.json");

const BASE: Files = &[
    ("config.json", include_bytes!("../models/kjv-v3/config.json")),
    ("model.safetensors", include_bytes!("../models/kjv-v3/model.safetensors")),
    ("tokenizer.json", TOKENIZER),
    ("tokenizer_config.json", include_bytes!("../models/kjv-v3/tokenizer_config.json")),
];

const CHAT: Files = &[
    ("config.json", include_bytes!("../models/kjv-v3-chat/config.json")),
    ("model.safetensors", include_bytes!("../models/kjv-v3-chat/model.safetensors")),
    ("tokenizer.json", TOKENIZER),
    ("tokenizer_config.json", include_bytes!("../models/kjv-v3-chat/tokenizer_config.json")),
];

impl Demo {
    fn files(self) -> Files {
        match self {
            Demo::Base => BASE,
            Demo::Chat => CHAT,
        }
    }

    /// A short description for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Demo::Base => {
                "the built-in demo model (a 7.8M-parameter DeepSeek-V3 with MTP, trained on the King James Bible)"
            }
            Demo::Chat => {
                "the built-in chat model (the demo DeepSeek-V3 tuned to answer questions on the King James Bible)"
            }
        }
    }

    /// The name the server gives it.
    pub fn served_name(self) -> &'static str {
        match self {
            Demo::Base => "latent-kjv",
            Demo::Chat => "latent-kjv-chat",
        }
    }

    fn folder(self) -> &'static str {
        match self {
            Demo::Base => "kjv-v3",
            Demo::Chat => "kjv-v3-chat",
        }
    }
}

/// FNV-1a over every file's name and bytes.
fn fingerprint(files: Files) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in files {
        for &b in name.as_bytes().iter().chain(bytes.iter()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".cache");
    }
    std::env::temp_dir()
}

/// The folder holding the demo model, written on first use.
pub fn dir(demo: Demo) -> Result<PathBuf> {
    let files = demo.files();
    let dir = cache_root().join("latent").join(format!("{}-{:016x}", demo.folder(), fingerprint(files)));
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    let parent = dir.parent().map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{}-{}.tmp", demo.folder(), std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    // config.json last: its presence marks a complete folder.
    for (name, bytes) in files.iter().rev() {
        let path = tmp.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process got there first.
        Err(_) if dir.join("config.json").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e).with_context(|| format!("moving the demo model into {}", dir.display())),
    }
}
