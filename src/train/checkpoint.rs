//! Checkpoints in the Hugging Face layout, written atomically.
//!
//! `checkpoint-NNNNNN/` holds `config.json`, `model.safetensors`, the tokenizer files (what
//! `latent generate` and transformers load), and for resuming `optimizer.safetensors` (AdamW
//! moments, and the f32 master weights when the model is saved in bf16), `trainer_state.json` and
//! the `run.toml` that made it. The folder is filled under a temporary name and renamed when
//! complete; `latest` names the newest complete one. An interrupted save leaves no folder that
//! `latest` points to.

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

/// Everything a checkpoint writes.
pub struct Snapshot<'a> {
    pub cfg: &'a Config,
    pub config_json: &'a serde_json::Value,
    pub run_toml: &'a str,
    pub params: &'a Params,
    pub master: &'a [Vec<f32>],
    pub opt: &'a AdamW,
    pub state: TrainerState,
    pub tokenizer_dir: &'a Path,
    pub dtype: DType,
}

/// The name of the pointer file to the newest checkpoint.
pub const LATEST: &str = "latest";

/// Writes checkpoint `snap.state.step` into `out` and points `out/latest` at it; keeps the newest
/// `keep` checkpoints. Returns the checkpoint's folder.
pub fn save(out: &Path, snap: &Snapshot<'_>, keep: usize) -> Result<PathBuf> {
    let name = format!("checkpoint-{:06}", snap.state.step);
    let final_dir = out.join(&name);
    let tmp = out.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
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
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let src = snap.tokenizer_dir.join(f);
        if src.exists() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            write_atomic(&tmp.join(f), &bytes)?;
        }
    }
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    write_atomic(&out.join(LATEST), name.as_bytes())?;
    prune(out, keep)?;
    Ok(final_dir)
}

fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| Error::io(&tmp, std::io::Error::other(e.to_string())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Removes all but the newest `keep` checkpoints (0 keeps all).
fn prune(out: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-")))
        .collect();
    found.sort();
    let n = found.len();
    for old in found.into_iter().take(n.saturating_sub(keep)) {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// The newest complete checkpoint under `out`.
pub fn latest(out: &Path) -> Result<PathBuf> {
    let pointer = out.join(LATEST);
    let name = std::fs::read_to_string(&pointer).map_err(|e| Error::io(&pointer, e))?;
    let dir = out.join(name.trim());
    if !dir.is_dir() {
        return Err(Error::io(
            &pointer,
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("names {}, which does not exist", dir.display())),
        ));
    }
    Ok(dir)
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
