//! Training: pre-training from plain text and supervised fine-tuning on chat data, with the
//! DeepSeek balance machinery (V2's auxiliary losses, V3's bias update and sequence-wise loss,
//! device-level token dropping) and V3's multi-token prediction. The model trained is the same
//! [`Model`](crate::Model) inference runs, built over autograd variables ([`params::Params`]).

pub mod balance;
pub mod checkpoint;
pub mod data;
pub mod loss;
pub mod optim;
pub mod params;
pub mod run;
pub mod trainer;

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

pub use run::RunFile;
pub use trainer::{StepLog, TrainOptions, Trainer};

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a reader
/// (or a crash) sees the old file or the new one, never half of one; the file and the folder's entry
/// are flushed to disk before it returns.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    checkpoint::sync_dir(dir)
}
