//! The demo model built into the binary: the DeepSeek-V2-architecture model latent trained on the
//! King James Bible (`models/kjv`, made by `latent train preset:kjv`). Commands run it when no
//! `--model` is given. Its files are written once to a cache folder named after their hash, so the
//! binary works wherever it is copied.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// The checkpoint's files, as committed.
const FILES: &[(&str, &[u8])] = &[
    ("config.json", include_bytes!("../models/kjv/config.json")),
    ("model.safetensors", include_bytes!("../models/kjv/model.safetensors")),
    ("tokenizer.json", include_bytes!("../models/kjv/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../models/kjv/tokenizer_config.json")),
];

/// A short description for messages.
pub const NAME: &str = "the built-in demo model (a 6.5M-parameter DeepSeek-V2 trained on the King James Bible)";

/// FNV-1a over every file's name and bytes.
fn fingerprint() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in FILES {
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
pub fn dir() -> Result<PathBuf> {
    let dir = cache_root().join("latent").join(format!("kjv-{:016x}", fingerprint()));
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    let parent = dir.parent().map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".kjv-{}.tmp", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    // config.json last: its presence marks a complete folder.
    for (name, bytes) in FILES.iter().rev() {
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
