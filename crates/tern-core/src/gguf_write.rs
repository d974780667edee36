//! Writes GGUF v3 files (metadata and tensors), as `tern quantize` produces them. The file is
//! written next to its destination and renamed into place only when complete, so a failure
//! never leaves a partial model behind.

use crate::gguf::MetaValue;
use crate::kernels::DType;
use anyhow::{bail, Context, Result};
use std::io::{BufWriter, Write};
use std::path::Path;

const ALIGNMENT: usize = 32;

/// A tensor to write: `dims` in GGUF order (dims[0] is the contiguous one), `data` its encoded
/// bytes.
pub struct OutTensor<'a> {
    pub name: String,
    pub dims: Vec<u64>,
    pub dtype: DType,
    pub data: std::borrow::Cow<'a, [u8]>,
}

fn type_id(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) -> Result<()> {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend(x.to_le_bytes()),
        MetaValue::I16(x) => out.extend(x.to_le_bytes()),
        MetaValue::U32(x) => out.extend(x.to_le_bytes()),
        MetaValue::I32(x) => out.extend(x.to_le_bytes()),
        MetaValue::U64(x) => out.extend(x.to_le_bytes()),
        MetaValue::I64(x) => out.extend(x.to_le_bytes()),
        MetaValue::F32(x) => out.extend(x.to_le_bytes()),
        MetaValue::F64(x) => out.extend(x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(items) => {
            // An empty array's element type is not kept by the reader; u8 reads back the same.
            let ty = items.first().map_or(0, type_id);
            if items.iter().any(|i| type_id(i) != ty) {
                bail!("metadata array with mixed element types");
            }
            out.extend(ty.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i)?;
            }
        }
    }
    Ok(())
}

/// Writes `metadata` (any `general.alignment` is replaced by 32) and `tensors` to `path`.
pub fn write(path: &Path, metadata: &[(String, MetaValue)], tensors: &[OutTensor]) -> Result<()> {
    let mut head = Vec::new();
    head.extend(b"GGUF");
    head.extend(3u32.to_le_bytes());
    head.extend((tensors.len() as u64).to_le_bytes());
    let meta: Vec<_> = metadata.iter().filter(|(k, _)| k != "general.alignment").collect();
    head.extend((meta.len() as u64 + 1).to_le_bytes());
    put_str(&mut head, "general.alignment");
    head.extend(4u32.to_le_bytes());
    head.extend((ALIGNMENT as u32).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut head, k);
        head.extend(type_id(v).to_le_bytes());
        put_value(&mut head, v)?;
    }
    let mut offset = 0usize;
    for t in tensors {
        let elems: u64 = t.dims.iter().product();
        let rows = elems / t.dims[0];
        if t.data.len() != rows as usize * t.dtype.row_bytes(t.dims[0] as usize)? {
            bail!("tensor {}: {} bytes do not match {:?} {}", t.name, t.data.len(), t.dims, t.dtype.name());
        }
        put_str(&mut head, &t.name);
        head.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            head.extend(d.to_le_bytes());
        }
        head.extend(t.dtype.ggml_id().to_le_bytes());
        head.extend((offset as u64).to_le_bytes());
        offset += t.data.len().next_multiple_of(ALIGNMENT);
    }
    head.resize(head.len().next_multiple_of(ALIGNMENT), 0);

    let tmp = path.with_extension("gguf.partial");
    let result = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = BufWriter::new(f);
        w.write_all(&head)?;
        for t in tensors {
            w.write_all(&t.data)?;
            w.write_all(&vec![0u8; t.data.len().next_multiple_of(ALIGNMENT) - t.data.len()])?;
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot move the output to {}", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
