//! Safetensors checkpoints, single-file or sharded (`model.safetensors.index.json`), memory-mapped.
//!
//! Every shard's header is read and validated up front (offsets, sizes, overlaps: the `safetensors`
//! crate checks them against the file length, so no length field sizes an allocation). A tensor
//! name found in two shards is an error, never last-one-wins. `get` checks the shape before
//! copying the bytes once, straight from the mapping into a tensor of the compute dtype.

pub mod fp8;
pub mod gguf;
pub mod gguf_model;
pub mod names;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::kernels::kquant::{BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ5_0, BlockQ6K};
use crate::kernels::quant::{dequantize, BlockQ8_0, QuantMatrix};
use gguf::{GgmlType, GgufFile};

/// One mapped shard and where its tensor data starts.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
    /// The GGML type of a tensor from a GGUF file (then `dtype` is unused).
    ggml: Option<GgmlType>,
}

/// All tensors of a checkpoint, mapped but not yet copied.
pub struct Weights {
    /// The index of a sharded checkpoint, or its single file: what errors about absent tensors name.
    source: PathBuf,
    shards: Vec<Shard>,
    entries: HashMap<String, Entry>,
    device: Device,
    dtype: DType,
    fp8_block: Option<[usize; 2]>,
    used: Mutex<BTreeSet<String>>,
    /// Tensors held in memory (training's variables), served before the mapped ones, as they are.
    memory: HashMap<String, Tensor>,
    quant: Option<Quant>,
    /// GGML formats of the quantized weights handed out, for reports.
    quant_formats: Mutex<BTreeSet<&'static str>>,
    /// A GGUF file's split `attn_k_b` / `attn_v_b` blocks, by the name of the `kv_b_proj` they
    /// were joined into (see [`Weights::absorption_blocks`]).
    absorption: HashMap<String, (QuantMatrix, QuantMatrix)>,
}

/// A quantized format linear weights can be converted to on load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// GGML's Q8_0: blocks of 32 i8 values with one f16 scale (8.5 bits per weight).
    Q8_0,
    /// GGML's Q4_K: blocks of 256 4-bit values with 6-bit group scales and minimums (4.5 bits per weight).
    Q4K,
}

#[derive(Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

/// The file that holds the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

impl Weights {
    /// Whether `dir` holds a single-file or sharded safetensors checkpoint.
    pub fn present(dir: &Path) -> bool {
        dir.join(INDEX_FILE).exists() || dir.join(SINGLE_FILE).exists()
    }

    /// Maps the checkpoint in `dir`; tensors are produced in `dtype` (the checkpoint's when `None`).
    pub fn open(dir: &Path, dtype: Option<DType>, device: &Device) -> Result<Weights> {
        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let source = if index_path.exists() { index_path.clone() } else { single.clone() };
        let (files, index) = if index_path.exists() {
            let (files, map) = read_index(&index_path, dir)?;
            (files, Some((index_path, map)))
        } else if single.exists() {
            (vec![single], None)
        } else {
            return Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no {SINGLE_FILE} or {INDEX_FILE} in this folder"),
                ),
            ));
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut entries: HashMap<String, Entry> = HashMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let (shard, tensors) = map_shard(&path)?;
            for (name, mut entry) in tensors {
                entry.shard = i;
                if let Some(prev) = entries.get(&name) {
                    return Err(Error::DuplicateTensor {
                        name,
                        first: shards.get(prev.shard).map(|s: &Shard| s.path.clone()).unwrap_or_default(),
                        second: shard.path.clone(),
                    });
                }
                entries.insert(name, entry);
            }
            shards.push(shard);
        }
        if let Some((index_path, map)) = index {
            check_index_agrees(&index_path, &map, &entries, &shards)?;
        }
        let dtype = match dtype {
            Some(d) => d,
            None => checkpoint_dtype(&entries),
        };
        Ok(Weights::assemble(&source, shards, entries, HashMap::new(), dtype, device))
    }

    /// Maps one safetensors file of any name (e.g. a training checkpoint's optimizer state).
    pub fn open_file(path: &Path, dtype: DType, device: &Device) -> Result<Weights> {
        let (shard, tensors) = map_shard(path)?;
        let entries = tensors.into_iter().map(|(name, entry)| (name, Entry { shard: 0, ..entry })).collect();
        Ok(Weights::assemble(path, vec![shard], entries, HashMap::new(), dtype, device))
    }

    /// Maps the tensors of a `deepseek2` GGUF file under their Hugging Face names (see
    /// [`gguf_model`]); `config` is the file's own (`gguf_model::config`). Tensors in F32/F16/BF16
    /// and the formats the kernels do not read directly are converted to `dtype` (when `None`:
    /// BF16 for a mostly-BF16 file, else F32) on `get`; Q8_0, Q4_K and Q6_K linear weights stay in their blocks
    /// (`get_quantized`). A split `attn_k_b` / `attn_v_b` pair is joined back into `kv_b_proj`.
    pub fn open_gguf(file: GgufFile, config: &Config, dtype: Option<DType>, device: &Device) -> Result<Weights> {
        let (mapped, split, unknown) = gguf_model::map_tensors(&file)?;
        if let Some(name) = unknown.first() {
            return Err(Error::gguf(&file.path, format!("tensor `{name}` has no place in a deepseek2 model")));
        }
        let (mut memory, mut absorption) = (HashMap::new(), HashMap::new());
        let (heads, rank) = (config.num_attention_heads, config.kv_lora_rank);
        let (nope, v) = (config.qk_nope_head_dim, config.v_head_dim);
        for s in split {
            let want_k = [heads, rank, nope];
            let want_v = [heads, v, rank];
            for (t, want) in [(&s.k_b, &want_k), (&s.v_b, &want_v)] {
                if t.shape() != want {
                    return Err(Error::TensorShape {
                        path: file.path.clone(),
                        name: t.name.clone(),
                        expected: want.to_vec(),
                        got: t.shape(),
                    });
                }
            }
            let k = dequantize_ggml(s.k_b.ggml_type, file.data(&s.k_b));
            let vv = dequantize_ggml(s.v_b.ggml_type, file.data(&s.v_b));
            let joined = gguf_model::join_kv_b(&k, &vv, heads, rank, nope, v);
            let name = names::layer(s.layer).attn("kv_b_proj");
            let blocks =
                (quant_blocks(s.k_b.ggml_type, file.data(&s.k_b)), quant_blocks(s.v_b.ggml_type, file.data(&s.v_b)));
            if let (Some(k_b), Some(v_b)) = blocks {
                absorption.insert(name.clone(), (k_b.for_decode(nope), v_b.for_decode(rank)));
            }
            memory.insert(name, Tensor::from_vec(joined, (heads * (nope + v), rank), device)?);
        }
        let mut entries = HashMap::new();
        for m in mapped {
            let entry = Entry {
                shard: 0,
                dtype: Dtype::F32,
                shape: m.shape,
                begin: m.start,
                end: m.start + m.len,
                ggml: Some(m.ggml_type),
            };
            if entries.insert(m.name.clone(), entry).is_some() {
                return Err(Error::gguf(&file.path, format!("two tensors map to `{}`", m.name)));
            }
        }
        let path = file.path.clone();
        let shard = Shard { path: path.clone(), mmap: file.mmap, data_start: 0 };
        // A bf16 file computes in bf16; every other (f16, f32, quantized) in f32.
        let bf16_bytes: usize =
            entries.values().filter(|e| e.ggml == Some(GgmlType::BF16)).map(|e| e.end - e.begin).sum();
        let all_bytes: usize = entries.values().map(|e| e.end - e.begin).sum();
        let dtype = dtype.unwrap_or(if 2 * bf16_bytes > all_bytes { DType::BF16 } else { DType::F32 });
        Ok(Weights { absorption, ..Weights::assemble(&path, vec![shard], entries, memory, dtype, device) })
    }

    /// The blocks of `name` if it is stored quantized (Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K: the
    /// kernels multiply them all directly) with `shape` `(out, in)`; `None` for float tensors.
    pub fn get_quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QuantMatrix>> {
        let Some(entry) = self.entries.get(name) else { return Ok(None) };
        let Some(ty) = entry.ggml else { return Ok(None) };
        if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) || self.memory.contains_key(name) {
            return Ok(None);
        }
        let shard = &self.shards[entry.shard];
        if entry.shape != shape {
            return Err(Error::TensorShape {
                path: shard.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: entry.shape.clone(),
            });
        }
        let bytes = &shard.mmap[shard.data_start + entry.begin..shard.data_start + entry.end];
        let Some(blocks) = quant_blocks(ty, bytes) else { return Ok(None) };
        // SAFETY: as in `get_as`: the read-only range is not used after this point.
        let _ = unsafe {
            shard.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, shard.data_start + entry.begin, bytes.len())
        };
        self.used.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
        Ok(Some(blocks))
    }

    /// The blocks of the split `attn_k_b` `(H·kv_lora, nope)` and `attn_v_b` `(H·v, kv_lora)` a
    /// GGUF file's `kv_b_name` was joined from, where both are in formats the kernels multiply:
    /// MLA decode absorbs and expands with them per head, reading the file's own blocks instead of
    /// the dense joined weight.
    pub fn absorption_blocks(&self, kv_b_name: &str) -> Option<(QuantMatrix, QuantMatrix)> {
        let blocks = self.absorption.get(kv_b_name)?;
        self.note_quant_format(blocks.0.name());
        self.note_quant_format(blocks.1.name());
        Some(blocks.clone())
    }

    /// Records that a weight is held in the GGML format `name` (`Linear::load` calls it).
    pub fn note_quant_format(&self, name: &'static str) {
        self.quant_formats.lock().unwrap_or_else(|p| p.into_inner()).insert(name);
    }

    /// The GGML formats of the quantized weights handed out so far, e.g. `Q4_K, Q6_K`.
    pub fn quant_formats(&self) -> Option<String> {
        let formats = self.quant_formats.lock().unwrap_or_else(|p| p.into_inner());
        (!formats.is_empty()).then(|| formats.iter().copied().collect::<Vec<_>>().join(", "))
    }

    /// The GGML type of `name`, if it comes from a GGUF file.
    pub fn ggml_type(&self, name: &str) -> Option<GgmlType> {
        self.entries.get(name).and_then(|e| e.ggml)
    }

    /// Serves `tensors` (all of one dtype, e.g. training's variables) as a checkpoint: `get` returns
    /// them as they are, so a model built from them shares their storage and their gradients.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, source: &Path, device: &Device) -> Weights {
        let dtype = tensors.values().next().map(|t| t.dtype()).unwrap_or(DType::F32);
        Weights::assemble(source, Vec::new(), HashMap::new(), tensors, dtype, device)
    }

    fn assemble(
        source: &Path,
        shards: Vec<Shard>,
        entries: HashMap<String, Entry>,
        memory: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Weights {
        Weights {
            source: source.to_path_buf(),
            shards,
            entries,
            device: device.clone(),
            dtype,
            fp8_block: None,
            used: Mutex::new(BTreeSet::new()),
            memory,
            quant: None,
            quant_formats: Mutex::new(BTreeSet::new()),
            absorption: HashMap::new(),
        }
    }

    /// Asks for linear weights in `quant` (`Linear::load` quantizes those whose rows allow it).
    pub fn with_quant(mut self, quant: Option<Quant>) -> Weights {
        self.quant = quant;
        self
    }

    /// The quantized format asked for, if any.
    pub fn quant(&self) -> Option<Quant> {
        self.quant
    }

    /// Declares the checkpoint's FP8 block size (`quantization_config.weight_block_size`): FP8
    /// tensors are then dequantized with their `*_scale_inv` on `get`.
    pub fn with_fp8_block(mut self, block: Option<[usize; 2]>) -> Weights {
        self.fp8_block = block;
        self
    }

    /// The compute dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The stored shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.entries.keys().chain(self.memory.keys()).map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Whether the checkpoint has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name) || self.memory.contains_key(name)
    }

    /// The tensor `name`, checked to have `shape`, in the compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    /// The tensor `name`, checked to have `shape`, converted to `dtype`.
    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        if let Some(t) = self.memory.get(name) {
            if t.dims() != shape {
                return Err(Error::TensorShape {
                    path: self.source.clone(),
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            self.used.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
            return Ok(t.to_dtype(dtype)?);
        }
        let Some(entry) = self.entries.get(name) else {
            return Err(Error::MissingTensor {
                path: self.source.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
            });
        };
        let shard = &self.shards[entry.shard];
        if entry.shape != shape {
            return Err(Error::TensorShape {
                path: shard.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: entry.shape.clone(),
            });
        }
        let stored = match (entry.ggml, entry.dtype) {
            (Some(GgmlType::BF16), _) => DType::BF16,
            (Some(GgmlType::F16), _) => DType::F16,
            (Some(GgmlType::F32), _) => DType::F32,
            (Some(ty), _) => {
                let bytes = &shard.mmap[shard.data_start + entry.begin..shard.data_start + entry.end];
                let values = dequantize_ggml(ty, bytes);
                self.used.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
                return Ok(Tensor::from_vec(values, shape, &self.device)?.to_dtype(dtype)?);
            }
            (None, Dtype::BF16) => DType::BF16,
            (None, Dtype::F16) => DType::F16,
            (None, Dtype::F32) => DType::F32,
            (None, Dtype::F8_E4M3) => return self.get_fp8(name, entry, dtype),
            (None, other) => {
                return Err(Error::TensorDtype {
                    path: shard.path.clone(),
                    name: name.to_string(),
                    got: format!("{other:?}"),
                })
            }
        };
        let (start, len) = (shard.data_start + entry.begin, entry.end - entry.begin);
        let bytes = &shard.mmap[start..start + len];
        let tensor = match stored {
            DType::BF16 => Tensor::from_vec(copy_elements::<half::bf16>(bytes), shape, &self.device)?,
            DType::F16 => Tensor::from_vec(copy_elements::<half::f16>(bytes), shape, &self.device)?,
            _ => Tensor::from_vec(copy_elements::<f32>(bytes), shape, &self.device)?,
        };
        // SAFETY: the mapping is read-only and file-backed; DONTNEED only drops this range's pages
        // from our address space (a later read faults them in again from the file), and `bytes`,
        // the only borrow of the range, is not used after this point. This keeps the peak resident
        // memory at one copy of the weights instead of the copy plus the mapped file.
        let _ = unsafe { shard.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, start, len) };
        let tensor = tensor.to_dtype(dtype)?;
        self.used.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
        Ok(tensor)
    }

    /// An FP8 tensor dequantized with its `{name}_scale_inv` block scales.
    fn get_fp8(&self, name: &str, entry: &Entry, dtype: DType) -> Result<Tensor> {
        let path = &self.shards[entry.shard].path;
        let (Some(block), &[rows, cols]) = (self.fp8_block, entry.shape.as_slice()) else {
            return Err(Error::TensorDtype {
                path: path.clone(),
                name: name.to_string(),
                got: "F8_E4M3 without quantization_config.weight_block_size in config.json".into(),
            });
        };
        let scale_name = format!("{name}_scale_inv");
        let grid = fp8::scale_grid(rows, cols, block);
        let scales: Vec<f32> = self.get_as(&scale_name, &grid, DType::F32)?.flatten_all()?.to_vec1()?;
        let shard = &self.shards[entry.shard];
        let bytes = &shard.mmap[shard.data_start + entry.begin..shard.data_start + entry.end];
        let values = fp8::dequantize(bytes, &scales, rows, cols, block);
        self.used.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
        Ok(Tensor::from_vec(values, (rows, cols), &self.device)?.to_dtype(dtype)?)
    }

    /// Names of tensors never read by `get`, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let all = self.entries.keys().chain(self.memory.keys());
        let mut names: Vec<String> = all.filter(|n| !used.contains(*n)).cloned().collect();
        names.sort();
        names
    }

    /// Total bytes of tensor data stored in the checkpoint.
    pub fn stored_bytes(&self) -> usize {
        self.entries.values().map(|e| e.end - e.begin).sum()
    }

    /// The files that hold the tensors.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("safetensors stores little-endian values; latent copies them as they are");

/// Copies `bytes` (little-endian elements of `T`: a plain float type, or a GGML block, which is
/// `repr(C)` over u8/i8 arrays and f16) into a new vector, asking the OS for huge pages first: a
/// multi-GB checkpoint then costs thousands of page faults, not millions. The file's bytes need
/// not be aligned for `T`.
/// A tensor's bytes as blocks the kernels multiply directly, if its format is one of them.
fn quant_blocks(ty: GgmlType, bytes: &[u8]) -> Option<QuantMatrix> {
    Some(match ty {
        GgmlType::Q8_0 => QuantMatrix::Q8_0(copy_elements::<BlockQ8_0>(bytes)),
        GgmlType::Q4_0 => QuantMatrix::Q4_0(copy_elements::<BlockQ4_0>(bytes)),
        GgmlType::Q5_0 => QuantMatrix::Q5_0(copy_elements::<BlockQ5_0>(bytes)),
        GgmlType::Q4K => QuantMatrix::Q4K(copy_elements::<BlockQ4K>(bytes)),
        GgmlType::Q5K => QuantMatrix::Q5K(copy_elements::<BlockQ5K>(bytes)),
        GgmlType::Q6K => QuantMatrix::Q6K(copy_elements::<BlockQ6K>(bytes)),
        _ => return None,
    })
}

fn copy_elements<T: Copy>(bytes: &[u8]) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    let n = bytes.len() / size;
    let mut v: Vec<T> = Vec::with_capacity(n);
    advise_huge_pages(v.as_mut_ptr().cast::<u8>(), n * size);
    // SAFETY: `v` has capacity for `n` elements, i.e. `n * size` bytes, and `bytes` has at least as
    // many; the regions cannot overlap (one is a fresh allocation). T is bf16, f16, f32 or a GGML
    // block of bytes and f16s, for which every bit pattern is a valid value, so the copied bytes
    // initialise all `n` elements.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr().cast::<u8>(), n * size);
        v.set_len(n);
    }
    v
}

/// The f32 values of GGML-typed tensor data.
pub fn dequantize_ggml(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    match ty {
        GgmlType::F32 => copy_elements::<f32>(bytes),
        GgmlType::F16 => copy_elements::<half::f16>(bytes).iter().map(|v| v.to_f32()).collect(),
        GgmlType::BF16 => copy_elements::<half::bf16>(bytes).iter().map(|v| v.to_f32()).collect(),
        GgmlType::Q4_0 => dequantize(&copy_elements::<BlockQ4_0>(bytes)),
        GgmlType::Q5_0 => dequantize(&copy_elements::<BlockQ5_0>(bytes)),
        GgmlType::Q8_0 => dequantize(&copy_elements::<BlockQ8_0>(bytes)),
        GgmlType::Q4K => dequantize(&copy_elements::<BlockQ4K>(bytes)),
        GgmlType::Q5K => dequantize(&copy_elements::<BlockQ5K>(bytes)),
        GgmlType::Q6K => dequantize(&copy_elements::<BlockQ6K>(bytes)),
    }
}

/// MADV_HUGEPAGE on the 2 MiB-aligned part of a fresh allocation (a hint; failures are ignored).
pub(crate) fn advise_huge_pages(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (ptr as usize).div_ceil(HUGE) * HUGE;
        let end = (ptr as usize + len) / HUGE * HUGE;
        if end > start {
            // SAFETY: [start, end) lies inside the allocation at `ptr`; MADV_HUGEPAGE changes only
            // how its (still untouched) pages are backed, never their contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

fn read_index(index_path: &Path, dir: &Path) -> Result<(Vec<PathBuf>, HashMap<String, String>)> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    let index: Index = serde_path_to_error::deserialize(de)
        .map_err(|e| Error::config(index_path, &e.path().to_string(), e.inner().to_string()))?;
    let mut files: Vec<String> = index.weight_map.values().cloned().collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(Error::config(index_path, "weight_map", "names no tensors"));
    }
    let mut paths = Vec::with_capacity(files.len());
    for file in &files {
        let rel = Path::new(file);
        let inside = rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !inside {
            return Err(Error::config(
                index_path,
                "weight_map",
                format!("shard `{file}` is not a plain file name inside the model folder"),
            ));
        }
        let path = dir.join(rel);
        if !path.is_file() {
            return Err(Error::config(
                index_path,
                "weight_map",
                format!("shard `{file}` does not exist in {}", dir.display()),
            ));
        }
        paths.push(path);
    }
    Ok((paths, index.weight_map))
}

fn map_shard(path: &Path) -> Result<(Shard, Vec<(String, Entry)>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the mapping is read-only; a checkpoint changed on disk while loaded is outside our contract.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    check_safetensors_header(path, &mmap)?;
    let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
        .map_err(|e| Error::safetensors(path, format!("not a valid safetensors file: {e}")))?;
    let tensors = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let (begin, end) = info.data_offsets;
            let entry = Entry { shard: 0, dtype: info.dtype, shape: info.shape.clone(), begin, end, ggml: None };
            (name, entry)
        })
        .collect();
    Ok((Shard { path: path.to_path_buf(), mmap, data_start: 8 + header_len }, tensors))
}

/// Largest safetensors header read (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// Checks a safetensors header tensor by tensor before the format's reader sees it, so that a size
/// or offset error names the tensor at fault and says what was expected: each tensor's
/// `data_offsets` must span exactly its shape's elements times its dtype's size, lie inside the
/// data, and the tensors must tile the data without overlap or gap.
fn check_safetensors_header(path: &Path, bytes: &[u8]) -> Result<()> {
    let bad = |reason: String| Err(Error::safetensors(path, format!("not a valid safetensors file: {reason}")));
    if bytes.len() < 8 {
        return bad(format!("{} bytes, shorter than the 8-byte header length", bytes.len()));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[..8]);
    let header_len = u64::from_le_bytes(len);
    let data_len = (bytes.len() as u64 - 8).checked_sub(header_len);
    let Some(data_len) = data_len.filter(|_| header_len <= MAX_HEADER) else {
        return bad(format!(
            "the header length field says {header_len} bytes, but the file holds {} after it (and a header may \
             take at most {MAX_HEADER})",
            bytes.len() - 8
        ));
    };
    let header = &bytes[8..8 + header_len as usize];
    let Ok(header) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(header) else {
        return bad("the header is not a JSON object".into());
    };
    let mut spans = Vec::new();
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let tensor = |reason: String| bad(format!("tensor `{name}`: {reason}"));
        let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let Some(size) = safetensors_dtype_bytes(dtype) else {
            return tensor(format!("dtype `{dtype}` is not one latent reads (expected BF16, F16, F32 or F8_E4M3)"));
        };
        let shape: Option<Vec<u64>> =
            info.get("shape").and_then(|s| s.as_array()).and_then(|s| s.iter().map(|d| d.as_u64()).collect());
        let Some(shape) = shape else {
            return tensor(format!(
                "shape {} is not a list of sizes",
                info.get("shape").unwrap_or(&serde_json::Value::Null)
            ));
        };
        let offsets: Option<Vec<u64>> =
            info.get("data_offsets").and_then(|s| s.as_array()).and_then(|s| s.iter().map(|d| d.as_u64()).collect());
        let Some([begin, end]) = offsets.as_deref().and_then(|o| <[u64; 2]>::try_from(o).ok()) else {
            return tensor("`data_offsets` is not a pair [begin, end] of byte offsets".into());
        };
        let expected = shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d));
        let Some(expected) = expected else {
            return tensor(format!("shape {shape:?} of {dtype} has more bytes than 2^64"));
        };
        if end < begin || end - begin != expected {
            return tensor(format!(
                "shape {shape:?} of {dtype} takes {expected} bytes, but its data_offsets [{begin}, {end}] span {}",
                if end < begin { "a negative range".to_string() } else { format!("{} bytes", end - begin) }
            ));
        }
        if end > data_len {
            return tensor(format!(
                "data_offsets [{begin}, {end}] end past the file's {data_len} bytes of tensor data (truncated file?)"
            ));
        }
        spans.push((begin, end, name));
    }
    spans.sort();
    let mut at = 0u64;
    let mut previous: Option<&String> = None;
    for (begin, end, name) in spans {
        if begin < at {
            let other = previous.map(String::as_str).unwrap_or("?");
            return bad(format!(
                "tensor `{name}` (bytes {begin}..{end}) overlaps tensor `{other}` (ending at byte {at})"
            ));
        }
        if begin > at && end > begin {
            return bad(format!(
                "{} bytes before tensor `{name}` (from byte {at} to {begin}) belong to no tensor",
                begin - at
            ));
        }
        at = at.max(end);
        previous = Some(name);
    }
    if at != data_len {
        return bad(format!("the tensors cover {at} bytes of data, but the file holds {data_len} after the header"));
    }
    Ok(())
}

/// Bytes per element of a safetensors dtype name; `None` for the sub-byte types (latent reads none
/// of them) and for names that are no dtype.
fn safetensors_dtype_bytes(name: &str) -> Option<u64> {
    Some(match name {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

fn check_index_agrees(
    index_path: &Path,
    map: &HashMap<String, String>,
    entries: &HashMap<String, Entry>,
    shards: &[Shard],
) -> Result<()> {
    for (name, file) in map {
        let found = entries.get(name).map(|e| &shards[e.shard].path);
        let agrees = found.is_some_and(|p| p.file_name() == Path::new(file).file_name());
        if !agrees {
            let where_ = found.map(|p| p.display().to_string()).unwrap_or_else(|| "no shard".into());
            return Err(Error::config(
                index_path,
                &format!("weight_map.{name}"),
                format!("says the tensor is in `{file}`, but it is in {where_}"),
            ));
        }
    }
    Ok(())
}

/// The most common float dtype among the stored tensors (bf16 for published checkpoints).
fn checkpoint_dtype(entries: &HashMap<String, Entry>) -> DType {
    let mut counts = [0usize; 3];
    for e in entries.values() {
        match e.dtype {
            Dtype::BF16 => counts[0] += e.end - e.begin,
            Dtype::F16 => counts[1] += e.end - e.begin,
            Dtype::F32 => counts[2] += e.end - e.begin,
            _ => {}
        }
    }
    let best = (0..3).max_by_key(|&i| counts[i]).unwrap_or(2);
    [DType::BF16, DType::F16, DType::F32][best]
}
