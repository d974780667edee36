//! GGUF v2/v3 reader: metadata and tensor directory, with tensor data left in the memory map.
//!
//! Every count, length and offset read from the file is checked against the file size before
//! use, so a truncated or corrupted file yields an error naming the problem, never a panic or
//! a giant allocation.

use crate::kernels::DType;
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) if v >= 0 => Some(v as u64),
            MetaValue::I16(v) if v >= 0 => Some(v as u64),
            MetaValue::I32(v) if v >= 0 => Some(v as u64),
            MetaValue::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's directory entry. `dims` are in GGUF order: dims[0] is the contiguous (inner) one.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub dtype: DType,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

/// An opened GGUF file: parsed metadata and tensor directory over a shared memory map.
pub struct GgufFile {
    pub version: u32,
    pub metadata: HashMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    map: Arc<Mmap>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the file is opened read-only; like every mmap-based loader we assume it is
        // not truncated by another process while we run.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
        Self::parse(Arc::new(map)).with_context(|| format!("invalid GGUF file {}", path.display()))
    }

    fn parse(map: Arc<Mmap>) -> Result<Self> {
        let mut r = Reader { buf: &map[..], pos: 0 };
        let magic = r.bytes(4).context("file too short for a GGUF header")?;
        if magic != MAGIC {
            bail!("not a GGUF file (magic {:?})", String::from_utf8_lossy(magic));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            bail!("unsupported GGUF version {version} (supported: 2, 3)");
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        // Each entry needs at least a few bytes, so counts beyond the file size are corrupt.
        if n_tensors > r.remaining() as u64 || n_kv > r.remaining() as u64 {
            bail!("corrupt header: {n_tensors} tensors / {n_kv} metadata entries in a {} byte file", map.len());
        }
        let mut metadata = HashMap::new();
        for i in 0..n_kv {
            let key = r.string().with_context(|| format!("metadata entry {i}"))?;
            let ty = r.u32()?;
            let value = r.value(ty, 0).with_context(|| format!("metadata value of {key:?}"))?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => {
                v.as_u64().filter(|a| a.is_power_of_two()).context("general.alignment must be a power of two")?
            }
            None => DEFAULT_ALIGNMENT,
        };
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = r.string().with_context(|| format!("tensor {i} name"))?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > 4 {
                bail!("tensor {name:?}: {n_dims} dimensions (expected 1-4)");
            }
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            let type_id = r.u32()?;
            let dtype = DType::from_ggml(type_id)
                .with_context(|| format!("tensor {name:?} has unsupported GGML type id {type_id}"))?;
            let rel_offset = r.u64()?;
            infos.push((name, dims, dtype, rel_offset));
        }
        let data_start = r.pos.div_ceil(alignment as usize) * alignment as usize;
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, dtype, rel_offset) in infos {
            let n_elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let n_elements =
                n_elements.filter(|&n| n > 0).with_context(|| format!("tensor {name:?}: bad shape {dims:?}"))?;
            let row_len = dims[0] as usize;
            let n_rows = (n_elements / dims[0]) as usize;
            let row_bytes =
                dtype.row_bytes(row_len).with_context(|| format!("tensor {name:?}: row of {row_len} elements"))?;
            let n_bytes = row_bytes.checked_mul(n_rows).context("tensor size overflows")?;
            let offset = (data_start as u64).checked_add(rel_offset).context("tensor offset overflows")? as usize;
            if offset.checked_add(n_bytes).is_none_or(|end| end > map.len()) {
                bail!(
                    "tensor {name:?} ({} bytes at offset {offset}) extends past the end of the file ({} bytes): truncated file?",
                    n_bytes,
                    map.len()
                );
            }
            tensors.push(TensorInfo { name, dims, dtype, offset, n_bytes });
        }
        Ok(GgufFile { version, metadata, tensors, map })
    }

    pub fn map(&self) -> &Arc<Mmap> {
        &self.map
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(MetaValue::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(MetaValue::as_u64)
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(MetaValue::as_f64)
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(MetaValue::as_bool)
    }

    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key).with_context(|| format!("missing or non-integer metadata key {key:?}"))
    }

    /// A string array (e.g. the vocabulary); errors if any element is not a string.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let arr = v.as_array().with_context(|| format!("{key:?} is not an array"))?;
        arr.iter()
            .map(|v| v.as_str().with_context(|| format!("{key:?} holds a non-string")))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail!("unexpected end of file at byte {} (needed {n} more bytes): truncated file?", self.pos);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.bytes(N)?.try_into().expect("length checked"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        if len > self.remaining() as u64 {
            bail!("string of {len} bytes at byte {} runs past the end of the file", self.pos);
        }
        let b = self.bytes(len as usize)?;
        // Some tokenizer vocabularies hold invalid UTF-8 fragments; keep them lossily.
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>()?[0]),
            1 => MetaValue::I8(self.array::<1>()?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => MetaValue::Bool(self.array::<1>()?[0] != 0),
            8 => MetaValue::String(self.string()?),
            9 => {
                if depth > 2 {
                    bail!("metadata arrays nested too deeply");
                }
                let item_ty = self.u32()?;
                let len = self.u64()?;
                if len > self.remaining() as u64 {
                    bail!("array of {len} items runs past the end of the file");
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            _ => bail!("unknown metadata value type {ty}"),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a minimal GGUF v3 file: metadata (string, u32 and f32 values) and f32 tensors.
    pub fn write_gguf(meta: &[(&str, MetaValue)], tensors: &[(&str, Vec<u64>, Vec<f32>)]) -> Vec<u8> {
        fn s(out: &mut Vec<u8>, v: &str) {
            out.extend((v.len() as u64).to_le_bytes());
            out.extend(v.as_bytes());
        }
        let mut out = Vec::new();
        out.extend(MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            s(&mut out, k);
            match v {
                MetaValue::String(v) => {
                    out.extend(8u32.to_le_bytes());
                    s(&mut out, v);
                }
                MetaValue::U32(v) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                MetaValue::F32(v) => {
                    out.extend(6u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                other => unimplemented!("test writer: {other:?}"),
            }
        }
        let mut offset = 0u64;
        for (name, dims, data) in tensors {
            s(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(0u32.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() * 4).div_ceil(32) as u64 * 32;
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        for (_, _, data) in tensors {
            let start = out.len();
            for x in data {
                out.extend(x.to_le_bytes());
            }
            while (out.len() - start) % 32 != 0 {
                out.push(0);
            }
        }
        out
    }

    pub fn str_meta(v: &str) -> MetaValue {
        MetaValue::String(v.into())
    }

    pub fn parse(bytes: Vec<u8>) -> Result<GgufFile> {
        let f = tempfile_path();
        std::fs::write(&f, bytes).unwrap();
        let r = GgufFile::open(&f);
        let _ = std::fs::remove_file(&f);
        r
    }

    fn tempfile_path() -> std::path::PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        std::env::temp_dir().join(format!(
            "tern-gguf-test-{}-{}.gguf",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    #[test]
    fn parses_metadata_and_tensors() {
        let bytes = write_gguf(
            &[("general.architecture", str_meta("llama"))],
            &[("w", vec![4, 2], (0..8).map(|x| x as f32).collect())],
        );
        let f = parse(bytes).unwrap();
        assert_eq!(f.get_str("general.architecture"), Some("llama"));
        let t = f.tensor("w").unwrap();
        assert_eq!(t.dims, vec![4, 2]);
        assert_eq!(t.n_bytes, 32);
        let data = &f.map()[t.offset..t.offset + t.n_bytes];
        assert_eq!(f32::from_le_bytes(data[28..32].try_into().unwrap()), 7.0);
    }

    #[test]
    fn rejects_bad_magic() {
        let err = parse(b"GGML\x03\0\0\0".to_vec()).err().unwrap();
        assert!(format!("{err:#}").contains("not a GGUF file"), "{err:#}");
    }

    #[test]
    fn rejects_every_truncation() {
        let bytes = write_gguf(&[("general.architecture", str_meta("llama"))], &[("w", vec![8, 2], vec![1.0; 16])]);
        for cut in [0, 3, 7, 15, 23, 40, bytes.len() - 1] {
            let err = parse(bytes[..cut].to_vec()).err().unwrap_or_else(|| panic!("truncated at {cut} parsed"));
            let msg = format!("{err:#}");
            assert!(
                msg.contains("truncated") || msg.contains("too short") || msg.contains("past the end"),
                "cut {cut}: {msg}"
            );
        }
    }

    #[test]
    fn rejects_corrupt_counts_without_allocating() {
        let mut bytes = write_gguf(&[("a", str_meta("b"))], &[]);
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // metadata count
        let err = parse(bytes).err().unwrap();
        assert!(format!("{err:#}").contains("corrupt header"), "{err:#}");
    }

    #[test]
    fn rejects_unknown_tensor_type() {
        let mut bytes = write_gguf(&[], &[("w", vec![4], vec![0.0; 4])]);
        // type id sits after magic(4) ver(4) counts(16) name(8+1) n_dims(4) dim(8)
        let at = 24 + 9 + 4 + 8;
        bytes[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
        let err = parse(bytes).err().unwrap();
        assert!(format!("{err:#}").contains("unsupported GGML type id 99"), "{err:#}");
    }
}
