//! GGUF files (version 2 and 3), memory-mapped: metadata, tensor directory, tensor data.
//!
//! Layout: magic `GGUF`, version u32, tensor count u64, metadata count u64; then the metadata
//! (key string, value type u32, value); then per tensor its name, dimension count u32, the
//! dimensions u64 (innermost first: a row-major `(out, in)` matrix is `[in, out]`), GGML type
//! u32 and data offset u64; then the data, aligned to `general.alignment` (32 when absent).
//! Every count and length is checked against the bytes left in the file before anything is
//! allocated, so a corrupt header is an error naming the file and the offset, never a panic.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};

/// The GGML tensor types latent reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q5_0,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

impl GgmlType {
    /// The type of GGML's numeric code, if latent reads it.
    pub fn from_code(code: u32) -> Option<GgmlType> {
        Some(match code {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            6 => GgmlType::Q5_0,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// `(values per block, bytes per block)`.
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }

    /// GGML's name.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// Bytes of `n` values (`n` a multiple of the block).
    pub fn bytes_for(self, n: usize) -> usize {
        let (values, bytes) = self.block();
        n / values * bytes
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        Some(match *self {
            Value::F32(v) => v as f64,
            Value::F64(v) => v,
            Value::U8(v) => v as f64,
            Value::I8(v) => v as f64,
            Value::U16(v) => v as f64,
            Value::I16(v) => v as f64,
            Value::U32(v) => v as f64,
            Value::I32(v) => v as f64,
            Value::U64(v) => v as f64,
            Value::I64(v) => v as f64,
            Value::Bool(_) | Value::Str(_) | Value::Array(_) => return None,
        })
    }

    /// The string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The boolean, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The array, if it is one.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }

    /// A short description for error messages.
    pub fn describe(&self) -> String {
        match self {
            Value::Str(s) if s.len() > 40 => format!("a string of {} bytes", s.len()),
            Value::Array(v) => format!("an array of {} values", v.len()),
            other => format!("{other:?}"),
        }
    }
}

/// One tensor's directory entry.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions innermost first, as GGML stores them.
    pub dims: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Byte range in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    /// The row-major shape (outermost first), as safetensors and transformers write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    /// Number of values.
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub mmap: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
}

/// Whether `path` is a GGUF file (by its first four bytes).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file() && File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

/// A bounds-checked reader over the header bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: &str) -> Error {
        Error::gguf(self.path, format!("at byte {}: {what}", self.pos))
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(self.err(&format!("{what} runs past the end of the file ({n} bytes)")));
        };
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items of at least `min_size` bytes each, checked against the bytes left.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_size as u64) > left {
            return Err(self.err(&format!("{what} {n} is more than the file can hold")));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, &format!("length of {what}"))?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err(&format!("{what} is not UTF-8")))
    }

    fn value(&mut self, kind: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match kind {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(&format!("`{key}`: boolean byte {b}, expected 0 or 1"))),
            },
            8 => Value::Str(self.string(key)?),
            9 if depth == 0 => {
                let item = self.u32(key)?;
                let n = self.count(1, &format!("length of array `{key}`"))?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(self.err(&format!("`{key}`: unknown value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Maps and parses the file at `path`.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only; a file changed on disk while loaded is outside our contract.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (version, metadata, tensors) = parse(&mmap, path)?;
        Ok(GgufFile { path: path.to_path_buf(), mmap, version, metadata, tensors })
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The bytes of a tensor's data.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.start..t.start + t.len]
    }
}

type Parsed = (u32, BTreeMap<String, Value>, Vec<TensorInfo>);

fn parse(bytes: &[u8], path: &Path) -> Result<Parsed> {
    let mut c = Cursor { bytes, pos: 0, path };
    if c.take(4, "the magic").ok() != Some(b"GGUF".as_slice()) {
        return Err(Error::gguf(path, "not a GGUF file (the first four bytes are not `GGUF`)"));
    }
    let version = c.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(Error::gguf(path, format!("GGUF version {version}; latent reads versions 2 and 3")));
    }
    // A tensor entry is at least 8 (name) + 4 + 8 + 4 + 8 bytes; a metadata entry 8 + 4 + 1.
    let n_tensors = c.count(32, "tensor count")?;
    let n_kv = c.count(13, "metadata count")?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string("a metadata key")?;
        let kind = c.u32(&key)?;
        let value = c.value(kind, &key, 0)?;
        if metadata.contains_key(&key) {
            // Readers disagree on which copy wins; a file that says two things is refused.
            return Err(c.err(&format!("metadata key `{key}` appears twice")));
        }
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => {
                return Err(Error::gguf(
                    path,
                    format!("general.alignment is {}, expected a power of two", v.describe()),
                ))
            }
        },
    };
    let mut raw = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string("a tensor name")?;
        let n_dims = c.u32(&name)? as usize;
        if !(1..=4).contains(&n_dims) {
            return Err(c.err(&format!("tensor `{name}` has {n_dims} dimensions, expected 1 to 4")));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = c.u64(&name)?;
            if d == 0 || d > 1 << 40 {
                return Err(c.err(&format!("tensor `{name}` has a dimension of {d}")));
            }
            dims.push(d as usize);
        }
        let code = c.u32(&name)?;
        let Some(ggml_type) = GgmlType::from_code(code) else {
            return Err(c.err(&format!(
                "tensor `{name}` has GGML type {code}; latent reads F32, F16, BF16, Q4_0, Q5_0, Q8_0, Q4_K, Q5_K and Q6_K"
            )));
        };
        let offset = c.u64(&name)?;
        raw.push((name, dims, ggml_type, offset));
    }
    let data_start = c.pos.div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, dims, ggml_type, offset) in raw {
        let elements = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let (block, _) = ggml_type.block();
        let Some(elements) = elements.filter(|_| dims[0].is_multiple_of(block)) else {
            return Err(Error::gguf(
                path,
                format!("tensor `{name}`: dimensions {dims:?} do not fit {} blocks of {block}", ggml_type.name()),
            ));
        };
        let len = ggml_type.bytes_for(elements);
        let start = usize::try_from(offset).ok().and_then(|o| o.checked_add(data_start));
        let fits = start.and_then(|s| s.checked_add(len)).is_some_and(|end| end <= bytes.len());
        let (Some(start), true) = (start, fits) else {
            return Err(Error::gguf(
                path,
                format!("tensor `{name}` ({len} bytes at offset {offset}) runs past the end of the file"),
            ));
        };
        if !offset.is_multiple_of(alignment as u64) {
            return Err(Error::gguf(
                path,
                format!("tensor `{name}` starts at offset {offset}, not a multiple of the alignment ({alignment})"),
            ));
        }
        tensors.push(TensorInfo { name, dims, ggml_type, start, len });
    }
    // No two tensors share a name or a byte: a tensor's data is its own.
    let mut by_start: Vec<&TensorInfo> = tensors.iter().collect();
    by_start.sort_by_key(|t| (t.start, t.len));
    for pair in by_start.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.start + a.len > b.start && a.len > 0 && b.len > 0 {
            return Err(Error::gguf(
                path,
                format!(
                    "the data of tensors `{}` ({} bytes at {}) and `{}` ({} bytes at {}) overlap",
                    a.name,
                    a.len,
                    a.start - data_start,
                    b.name,
                    b.len,
                    b.start - data_start
                ),
            ));
        }
    }
    let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(twice) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::gguf(path, format!("tensor `{}` appears twice", twice[0])));
    }
    Ok((version, metadata, tensors))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a minimal GGUF (v3) with the given metadata and F32 tensors (row-major shapes).
    pub(crate) fn write(path: &Path, kv: &[(&str, Value)], tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        fn value(out: &mut Vec<u8>, v: &Value) {
            match v {
                Value::U32(x) => out.extend(x.to_le_bytes()),
                Value::F32(x) => out.extend(x.to_le_bytes()),
                Value::Bool(b) => out.push(*b as u8),
                Value::Str(s) => string(out, s),
                Value::Array(items) => {
                    let kind = items.first().map_or(4, kind_of);
                    out.extend(kind.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    items.iter().for_each(|i| value(out, i));
                }
                other => panic!("test writer: {other:?}"),
            }
        }
        fn kind_of(v: &Value) -> u32 {
            match v {
                Value::U32(_) => 4,
                Value::F32(_) => 6,
                Value::Bool(_) => 7,
                Value::Str(_) => 8,
                Value::Array(_) => 9,
                _ => 4,
            }
        }
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((kv.len() as u64).to_le_bytes());
        for (k, v) in kv {
            string(&mut out, k);
            out.extend(kind_of(v).to_le_bytes());
            value(&mut out, v);
        }
        let mut offset = 0u64;
        for (name, shape, data) in tensors {
            string(&mut out, name);
            out.extend((shape.len() as u32).to_le_bytes());
            shape.iter().rev().for_each(|d| out.extend((*d as u64).to_le_bytes()));
            out.extend(0u32.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() * 4).div_ceil(32) as u64 * 32;
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        for (_, _, data) in tensors {
            let start = out.len();
            data.iter().for_each(|v| out.extend(v.to_le_bytes()));
            out.resize(start + (data.len() * 4).div_ceil(32) * 32, 0);
        }
        std::fs::write(path, out).unwrap();
    }

    #[test]
    fn reads_what_it_is_given_and_refuses_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let kv = [
            ("general.architecture", Value::Str("deepseek2".into())),
            ("deepseek2.block_count", Value::U32(2)),
            ("tokenizer.ggml.tokens", Value::Array(vec![Value::Str("a".into()), Value::Str("b".into())])),
        ];
        write(&path, &kv, &[("w", vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), ("v", vec![4], vec![7.0; 4])]);
        let f = GgufFile::open(&path).unwrap();
        assert!(is_gguf(&path));
        assert_eq!(f.version, 3);
        assert_eq!(f.get("deepseek2.block_count").and_then(Value::as_u64), Some(2));
        assert_eq!(f.get("tokenizer.ggml.tokens").and_then(Value::as_array).map(|a| a.len()), Some(2));
        let w = &f.tensors[0];
        assert_eq!((w.shape(), w.ggml_type, w.len), (vec![2, 3], GgmlType::F32, 24));
        assert_eq!(&f.data(w)[4..8], 2f32.to_le_bytes());
        assert_eq!(f.data(&f.tensors[1])[..4], 7f32.to_le_bytes());

        // Truncated data, a huge count and a bad magic are errors that name the file.
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.gguf");
        std::fs::write(&cut, &bytes[..bytes.len() - 20]).unwrap();
        let err = GgufFile::open(&cut).err().unwrap().to_string();
        assert!(err.contains("cut.gguf") && err.contains("runs past the end"), "{err}");
        let mut huge = bytes.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&cut, &huge).unwrap();
        let err = GgufFile::open(&cut).err().unwrap().to_string();
        assert!(err.contains("tensor count"), "{err}");
        std::fs::write(&cut, b"GGML....").unwrap();
        assert!(GgufFile::open(&cut).err().unwrap().to_string().contains("not a GGUF file"));
        for n in [0, 10, 30, 100, 200] {
            std::fs::write(&cut, &bytes[..n.min(bytes.len())]).unwrap();
            assert!(GgufFile::open(&cut).is_err(), "a {n}-byte prefix must not parse");
        }
    }

    /// The byte position of the `n`-th occurrence of `needle` in `hay`.
    fn find(hay: &[u8], needle: &[u8], n: usize) -> usize {
        hay.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle).nth(n).unwrap().0
    }

    #[test]
    fn a_key_or_tensor_given_twice_and_misaligned_or_overlapping_data_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let tensors = [("wa", vec![8], vec![1.0; 8]), ("wb", vec![8], vec![2.0; 8])];
        let open = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            GgufFile::open(&path).err().map(|e| e.to_string()).unwrap_or_default()
        };
        // A duplicate metadata key (last one would win in a lenient reader).
        let kv = [("general.name", Value::Str("a".into())), ("general.name", Value::Str("b".into()))];
        write(&path, &kv, &tensors);
        let err = open(&std::fs::read(&path).unwrap());
        assert!(err.contains("`general.name` appears twice"), "{err}");
        // The second tensor's offset (32) pointed at the first's data, or at a misaligned byte.
        write(&path, &[], &tensors);
        let good = std::fs::read(&path).unwrap();
        assert!(GgufFile::open(&path).is_ok());
        let at = find(&good, b"wb", 0) + 2 + 4 + 8 + 4; // name, n_dims, one dim, type: the offset
        let mut overlap = good.clone();
        overlap[at..at + 8].copy_from_slice(&16u64.to_le_bytes());
        let err = open(&overlap);
        assert!(err.contains("alignment"), "{err}");
        let mut overlap = good.clone();
        overlap[at..at + 8].copy_from_slice(&0u64.to_le_bytes());
        let err = open(&overlap);
        assert!(err.contains("`wa`") && err.contains("`wb`") && err.contains("overlap"), "{err}");
        // The same name twice.
        let mut twice = good.clone();
        let b = find(&twice, b"wb", 0);
        twice[b..b + 2].copy_from_slice(b"wa");
        let err = open(&twice);
        assert!(err.contains("`wa` appears twice"), "{err}");
    }
}
