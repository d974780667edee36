//! Where the decoder keeps keys and values: the `KvStore` interface, the row storage in f32 or
//! int8, and the contiguous single-sequence cache that serves as the reference implementation
//! (the engine's paged cache must give the same results).

use crate::model::ops;
use anyhow::{bail, Result};

/// How cached K/V rows are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvDtype {
    #[default]
    F32,
    /// Symmetric int8 per (position, KV head): q = round(x / s), s = max|x| / 127 in f32.
    Int8,
}

impl KvDtype {
    pub fn parse(s: &str) -> Result<KvDtype> {
        match s {
            "f32" => Ok(KvDtype::F32),
            "int8" => Ok(KvDtype::Int8),
            other => bail!("unknown KV cache dtype {other:?} (the CPU cache stores f32 or int8)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Int8 => "int8",
        }
    }

    /// Bytes of one position's K (or V) row of `n_kv` heads of `head_dim`.
    pub fn row_bytes(self, n_kv: usize, head_dim: usize) -> usize {
        match self {
            KvDtype::F32 => 4 * n_kv * head_dim,
            KvDtype::Int8 => n_kv * head_dim + 4 * n_kv,
        }
    }
}

/// Rows of positions, each `n_kv` heads of `head_dim`, in one storage type.
pub struct KvRowBuf {
    dtype: KvDtype,
    n_kv: usize,
    head_dim: usize,
    f: Vec<f32>,
    q: Vec<i8>,
    scales: Vec<f32>,
}

impl KvRowBuf {
    /// `n_rows` zeroed rows (zeroed memory is mapped lazily: pages cost memory once written).
    pub fn new(dtype: KvDtype, n_kv: usize, head_dim: usize, n_rows: usize) -> KvRowBuf {
        let kvd = n_kv * head_dim;
        let (f, q, scales) = match dtype {
            KvDtype::F32 => (vec![0.0; n_rows * kvd], Vec::new(), Vec::new()),
            KvDtype::Int8 => (Vec::new(), vec![0; n_rows * kvd], vec![0.0; n_rows * n_kv]),
        };
        KvRowBuf { dtype, n_kv, head_dim, f, q, scales }
    }

    /// Rows `first..first + n`.
    pub fn rows(&self, first: usize, n: usize) -> KvRows<'_> {
        let kvd = self.n_kv * self.head_dim;
        let data = match self.dtype {
            KvDtype::F32 => KvData::F32(&self.f[first * kvd..(first + n) * kvd]),
            KvDtype::Int8 => KvData::Int8 {
                q: &self.q[first * kvd..(first + n) * kvd],
                scales: &self.scales[first * self.n_kv..(first + n) * self.n_kv],
            },
        };
        KvRows { data, n_kv: self.n_kv, head_dim: self.head_dim }
    }

    pub fn write(&mut self, row: usize, x: &[f32]) {
        let kvd = self.n_kv * self.head_dim;
        match self.dtype {
            KvDtype::F32 => self.f[row * kvd..(row + 1) * kvd].copy_from_slice(x),
            KvDtype::Int8 => {
                for (h, head) in x.chunks_exact(self.head_dim).enumerate() {
                    let amax = head.iter().fold(0f32, |m, &v| m.max(v.abs()));
                    let s = amax / 127.0;
                    self.scales[row * self.n_kv + h] = s;
                    let out = &mut self.q[row * kvd + h * self.head_dim..][..self.head_dim];
                    for (o, &v) in out.iter_mut().zip(head) {
                        *o = if s > 0.0 { (v / s).round() as i8 } else { 0 };
                    }
                }
            }
        }
    }
}

/// Consecutive positions' K or V rows of a block.
pub struct KvRows<'a> {
    pub data: KvData<'a>,
    pub n_kv: usize,
    pub head_dim: usize,
}

pub enum KvData<'a> {
    F32(&'a [f32]),
    Int8 { q: &'a [i8], scales: &'a [f32] },
}

impl KvRows<'_> {
    /// out[j] = scale · dot(q, head `kvh` of row `first + j`).
    pub fn scaled_dots(&self, q: &[f32], first: usize, kvh: usize, scale: f32, out: &mut [f32]) {
        let (kvd, at) = (self.n_kv * self.head_dim, first * self.n_kv * self.head_dim + kvh * self.head_dim);
        match self.data {
            KvData::F32(r) => ops::scaled_dots(q, &r[at..], kvd, scale, out),
            KvData::Int8 { q: r, scales } => {
                ops::scaled_dots_i8(q, &r[at..], kvd, &scales[first * self.n_kv + kvh..], self.n_kv, scale, out)
            }
        }
    }

    /// out += Σ_j w[j] · head `kvh` of row `first + j`.
    pub fn weighted_sum(&self, w: &[f32], first: usize, kvh: usize, out: &mut [f32]) {
        let (kvd, at) = (self.n_kv * self.head_dim, first * self.n_kv * self.head_dim + kvh * self.head_dim);
        match self.data {
            KvData::F32(r) => ops::weighted_sum(w, &r[at..], kvd, out),
            KvData::Int8 { q: r, scales } => {
                ops::weighted_sum_i8(w, &r[at..], kvd, &scales[first * self.n_kv + kvh..], self.n_kv, out)
            }
        }
    }
}

/// K/V storage for the sequences of a batch, addressed as fixed-size blocks of positions.
pub trait KvStore: Sync {
    /// Positions per block.
    fn block_size(&self) -> usize;
    /// Keys and values (`block_size` rows each) of the `block`-th block of sequence `seq` at
    /// `layer`.
    fn kv_block(&self, layer: usize, seq: usize, block: usize) -> (KvRows<'_>, KvRows<'_>);
    /// Stores one position's K and V rows.
    fn write(&mut self, layer: usize, seq: usize, pos: usize, k: &[f32], v: &[f32]);
}

/// A contiguous cache for one sequence: for each layer, keys and values of every position
/// (one block as long as the capacity).
pub struct KvCache {
    keys: Vec<KvRowBuf>,
    values: Vec<KvRowBuf>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new(n_layers: usize, n_kv: usize, head_dim: usize, capacity: usize, dtype: KvDtype) -> Self {
        let buf = || KvRowBuf::new(dtype, n_kv, head_dim, capacity);
        KvCache {
            keys: (0..n_layers).map(|_| buf()).collect(),
            values: (0..n_layers).map(|_| buf()).collect(),
            len: 0,
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets positions from `len` on (the next forward overwrites them).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

impl KvStore for KvCache {
    fn block_size(&self) -> usize {
        self.capacity
    }

    fn kv_block(&self, layer: usize, seq: usize, block: usize) -> (KvRows<'_>, KvRows<'_>) {
        debug_assert!(seq == 0 && block == 0, "a KvCache holds one sequence in one block");
        (self.keys[layer].rows(0, self.capacity), self.values[layer].rows(0, self.capacity))
    }

    fn write(&mut self, layer: usize, seq: usize, pos: usize, k: &[f32], v: &[f32]) {
        debug_assert_eq!(seq, 0, "a KvCache holds one sequence");
        self.keys[layer].write(pos, k);
        self.values[layer].write(pos, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn int8_rows_hold_each_head_to_half_a_step() {
        let mut rng = Rng::new(4);
        let (n_kv, hd) = (3, 16);
        let mut buf = KvRowBuf::new(KvDtype::Int8, n_kv, hd, 4);
        let x: Vec<f32> = (0..n_kv * hd).map(|_| rng.normal()).collect();
        buf.write(2, &x);
        let rows = buf.rows(2, 1);
        let KvData::Int8 { q, scales } = rows.data else { panic!("int8 rows") };
        for h in 0..n_kv {
            let head = &x[h * hd..(h + 1) * hd];
            let amax = head.iter().fold(0f32, |m, &v| m.max(v.abs()));
            assert_eq!(scales[h], amax / 127.0);
            for (i, &v) in head.iter().enumerate() {
                assert!((q[h * hd + i] as f32 * scales[h] - v).abs() <= 0.5 * scales[h] + 1e-7);
            }
        }
        assert_eq!(KvDtype::Int8.row_bytes(n_kv, hd), n_kv * hd + 4 * n_kv);
        assert!(KvDtype::parse("fp8").is_err());
    }
}
