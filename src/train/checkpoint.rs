//! Checkpoints in the Hugging Face layout, written atomically.
//!
//! `checkpoint-NNNNNN/` holds `config.json`, `model.safetensors`, the tokenizer files (what
//! `latent generate` and transformers load), and for resuming `optimizer.safetensors` (AdamW
//! moments, and the f32 master weights when the model is saved in bf16), `trainer_state.json` and
//! the `run.toml` that made it. The folder is filled under a temporary name and renamed when
//! complete; `latest` names the newest complete one. Files and folders are flushed to disk
//! before a checkpoint counts, and pruning renames a checkpoint away before deleting it, so a kill
//! at any moment leaves only complete checkpoints under checkpoint names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::train::optim::AdamW;
use crate::train::params::Params;
use crate::train::write_atomic;

/// What `trainer_state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// AdamW's step count.
    pub adam_t: u64,
    pub seed: u64,
    /// Whether `optimizer.safetensors` carries master weights (`master.*`).
    pub master_weights: bool,
}

/// The tokenizer files a checkpoint carries, read once when the run starts: a checkpoint is complete
/// on its own even after the folder the run started from (an `--init` checkpoint, or the one it
/// resumed from) has been pruned or deleted.
#[derive(Debug, Clone)]
pub struct TokenizerFiles {
    files: Vec<(&'static str, Vec<u8>)>,
}

impl TokenizerFiles {
    /// Reads `tokenizer.json` (required) and `tokenizer_config.json` (when present) from `dir`.
    pub fn read(dir: &Path) -> Result<TokenizerFiles> {
        let mut files = Vec::new();
        for (name, required) in [("tokenizer.json", true), ("tokenizer_config.json", false)] {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => files.push((name, bytes)),
                Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Ok(TokenizerFiles { files })
    }

    /// The contents of `name`, if the run's tokenizer has that file.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.files.iter().find(|(n, _)| *n == name).map(|(_, bytes)| bytes.as_slice())
    }
}

/// Everything a checkpoint writes.
pub struct Snapshot<'a> {
    pub cfg: &'a Config,
    pub config_json: &'a serde_json::Value,
    pub run_toml: &'a str,
    pub params: &'a Params,
    pub master: &'a [Vec<f32>],
    pub opt: &'a AdamW,
    pub state: TrainerState,
    pub tokenizer: &'a TokenizerFiles,
    pub dtype: DType,
}

/// The name of the pointer file to the newest checkpoint.
pub const LATEST: &str = "latest";

/// The files every checkpoint holds; a folder without one of them is not a complete checkpoint.
pub const CHECKPOINT_FILES: [&str; 6] =
    ["config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json", "run.toml", "tokenizer.json"];

/// The folder name of the checkpoint after `step` optimizer steps.
pub fn checkpoint_name(step: usize) -> String {
    format!("checkpoint-{step:06}")
}

/// The step of a folder named exactly as [`checkpoint_name`] names one; `None` for anything else
/// (a user's `checkpoint-old`, `checkpoint-12`, `checkpoint-000001.bak`), which latent never touches.
pub fn parse_checkpoint_name(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("checkpoint-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step: usize = digits.parse().ok()?;
    (checkpoint_name(step) == name).then_some(step)
}

/// Latent's checkpoints under `out`, by step, oldest first: folders with exactly latent's names.
pub fn list(out: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(out).map_err(|e| Error::io(out, e))? {
        let entry = entry.map_err(|e| Error::io(out, e))?;
        let Some(step) = entry.file_name().to_str().and_then(parse_checkpoint_name) else { continue };
        if entry.file_type().map_err(|e| Error::io(&entry.path(), e))?.is_dir() {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Writes checkpoint `snap.state.step` into `out` and points `out/latest` at it; keeps the newest
/// `keep` checkpoints. Returns the checkpoint's folder.
///
/// Crash safety: the folder is filled under a hidden temporary name, every file and the folder are
/// flushed to disk (fsync), and only then is it renamed to its final name and the parent flushed.
/// A checkpoint that is replaced or pruned is first renamed to a hidden name and then deleted, so a
/// kill at any point leaves every `checkpoint-N` folder complete, and `latest` naming one of them.
pub fn save(out: &Path, snap: &Snapshot<'_>, keep: usize) -> Result<PathBuf> {
    sweep_leftovers(out)?;
    let name = checkpoint_name(snap.state.step);
    let final_dir = out.join(&name);
    let tmp = out.join(format!(".{name}.tmp"));
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;

    let config = serde_json::to_string_pretty(snap.config_json).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    write_atomic(&tmp.join("config.json"), config.as_bytes())?;
    let tensors = snap.params.checkpoint_tensors(snap.cfg, snap.dtype)?;
    save_safetensors(&tensors, &tmp.join("model.safetensors"))?;

    let device = Device::Cpu;
    let mut opt: HashMap<String, Tensor> = HashMap::new();
    let master = snap.dtype != DType::F32;
    for (i, spec) in snap.params.specs.iter().enumerate() {
        let shape = spec.shape.as_slice();
        opt.insert(format!("m.{}", spec.name), Tensor::from_slice(&snap.opt.m[i], shape, &device)?);
        opt.insert(format!("v.{}", spec.name), Tensor::from_slice(&snap.opt.v[i], shape, &device)?);
        if master {
            opt.insert(format!("master.{}", spec.name), Tensor::from_slice(&snap.master[i], shape, &device)?);
        }
    }
    save_safetensors(&opt, &tmp.join("optimizer.safetensors"))?;
    let state = TrainerState { master_weights: master, ..snap.state.clone() };
    let state = serde_json::to_string_pretty(&state).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    write_atomic(&tmp.join("trainer_state.json"), state.as_bytes())?;
    write_atomic(&tmp.join("run.toml"), snap.run_toml.as_bytes())?;
    for (file, bytes) in &snap.tokenizer.files {
        write_atomic(&tmp.join(file), bytes)?;
    }
    sync_dir(&tmp)?;
    if final_dir.exists() {
        remove_crash_safe(out, &final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    sync_dir(out)?;
    write_atomic(&out.join(LATEST), name.as_bytes())?;
    prune(out, keep, snap.state.step)?;
    Ok(final_dir)
}

fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| Error::io(&tmp, std::io::Error::other(e.to_string())))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Flushes a folder's entries (the names of files created or renamed in it) to disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    // Opening a folder read-only and fsyncing it is how POSIX persists its entries; elsewhere the
    // rename itself is what there is.
    #[cfg(unix)]
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| Error::io(dir, e))?;
    Ok(())
}

/// Renames `dir` (a checkpoint under `out`) to a hidden name, flushes `out`, then deletes it: a
/// kill in the middle leaves a hidden leftover, never a half-deleted folder under a checkpoint's
/// name.
fn remove_crash_safe(out: &Path, dir: &Path) -> Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let doomed = out.join(format!(".{name}.deleting"));
    if doomed.exists() {
        std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
    }
    std::fs::rename(dir, &doomed).map_err(|e| Error::io(dir, e))?;
    sync_dir(out)?;
    std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))
}

/// Deletes what an interrupted save or prune left: `.checkpoint-N.tmp` and `.checkpoint-N.deleting`
/// folders (latent's exact names only).
fn sweep_leftovers(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    for entry in std::fs::read_dir(out).map_err(|e| Error::io(out, e))? {
        let entry = entry.map_err(|e| Error::io(out, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(inner) = name.strip_prefix('.') else { continue };
        let Some(ckpt) = inner.strip_suffix(".tmp").or_else(|| inner.strip_suffix(".deleting")) else { continue };
        if parse_checkpoint_name(ckpt).is_some() && entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(entry.path()).map_err(|e| Error::io(&entry.path(), e))?;
        }
    }
    Ok(())
}

/// Removes all but the newest `keep` checkpoints by step (0 keeps all), never `current` (the one
/// just saved, which `latest` names) and never anything but latent's own checkpoint names.
pub fn prune(out: &Path, keep: usize, current: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let found = list(out)?;
    let n = found.len();
    for (step, old) in found.into_iter().take(n.saturating_sub(keep)) {
        if step != current {
            remove_crash_safe(out, &old)?;
        }
    }
    Ok(())
}

/// The newest complete checkpoint under `out`: the one `out/latest` names, or, when that pointer
/// is missing or names no folder, the checkpoint with the highest step.
pub fn latest(out: &Path) -> Result<PathBuf> {
    let pointer = out.join(LATEST);
    if let Ok(name) = std::fs::read_to_string(&pointer) {
        let name = name.trim();
        if parse_checkpoint_name(name).is_some() && out.join(name).is_dir() {
            return Ok(out.join(name));
        }
    }
    if !out.is_dir() {
        return Err(Error::io(
            out,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such run folder (nothing to resume)"),
        ));
    }
    match list(out)?.pop() {
        Some((_, dir)) => Ok(dir),
        None => Err(Error::io(
            &pointer,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the run folder holds no checkpoint (no `latest`, no checkpoint-NNNNNN folder)",
            ),
        )),
    }
}

/// What resuming reads back.
pub struct Restored {
    pub params: Params,
    pub master: Vec<Vec<f32>>,
    pub opt: AdamW,
    pub state: TrainerState,
}

/// Reads a checkpoint written by [`save`], checking every tensor against `cfg`.
pub fn restore(dir: &Path, cfg: &Config) -> Result<Restored> {
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| Error::config(&state_path, "trainer_state", format!("not a trainer state: {e}")))?;
    let params = Params::load(cfg, dir, &Device::Cpu)?;
    let opt_path = dir.join("optimizer.safetensors");
    let w = crate::weights::Weights::open_file(&opt_path, DType::F32, &Device::Cpu)?;
    let mut opt = AdamW::new(&params.specs.iter().map(|s| s.numel()).collect::<Vec<_>>());
    let mut master = Vec::with_capacity(params.specs.len());
    for (i, spec) in params.specs.iter().enumerate() {
        let get = |prefix: &str| -> Result<Vec<f32>> {
            Ok(w.get(&format!("{prefix}.{}", spec.name), &spec.shape)?.flatten_all()?.to_vec1()?)
        };
        opt.m[i] = get("m")?;
        opt.v[i] = get("v")?;
        master.push(if state.master_weights {
            get("master")?
        } else {
            params.vars[i].as_tensor().flatten_all()?.to_vec1()?
        });
    }
    opt.t = state.adam_t;
    if state.master_weights {
        params.set_values(&master)?;
    }
    Ok(Restored { params, master, opt, state })
}
