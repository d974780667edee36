//! Where the decoder keeps keys and values: the `KvStore` interface, the row storage (f32, f16,
//! bf16, int8 or FP8), and the contiguous single-sequence cache that serves as the reference
//! implementation (the engine's paged cache must give the same results).

use crate::kernels::{e4m3_from_f32, E4M3_MAX};
use crate::model::ops::{self, Bf16Bits, E4m3, F16Bits, KvElem, NO_SCALES};
use anyhow::{bail, Result};

/// How cached K/V rows are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
    Bf16,
    /// Symmetric int8 per (position, KV head): q = round(x / s), s = max|x| / 127 in f32.
    Int8,
    /// FP8 E4M3 per (position, KV head): q = e4m3(x / s), s = max|x| / 448 in f32.
    Fp8,
}

impl KvDtype {
    pub const NAMES: &'static str = "f32, f16, bf16, int8 or fp8";

    pub fn parse(s: &str) -> Result<KvDtype> {
        match s {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            "bf16" => Ok(KvDtype::Bf16),
            "int8" => Ok(KvDtype::Int8),
            "fp8" | "fp8_e4m3" => Ok(KvDtype::Fp8),
            other => bail!("unknown KV cache dtype {other:?} (the CPU cache stores {})", Self::NAMES),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
            KvDtype::Int8 => "int8",
            KvDtype::Fp8 => "fp8",
        }
    }

    /// Bytes of one position's K (or V) row of `n_kv` heads of `head_dim`.
    pub fn row_bytes(self, n_kv: usize, head_dim: usize) -> usize {
        match self {
            KvDtype::F32 => 4 * n_kv * head_dim,
            KvDtype::F16 | KvDtype::Bf16 => 2 * n_kv * head_dim,
            KvDtype::Int8 | KvDtype::Fp8 => n_kv * head_dim + 4 * n_kv,
        }
    }
}

/// The stored elements of a row buffer.
enum Elems {
    F32(Vec<f32>),
    F16(Vec<F16Bits>),
    Bf16(Vec<Bf16Bits>),
    Int8(Vec<i8>),
    Fp8(Vec<E4m3>),
}

/// Element types whose all-zero bit pattern is a valid value (zero).
///
/// # Safety
/// Implementors must be plain integers or `repr(transparent)` wrappers of them.
unsafe trait ZeroBits: Copy {}
// SAFETY: repr(transparent) over u16 / u8.
unsafe impl ZeroBits for F16Bits {}
unsafe impl ZeroBits for Bf16Bits {}
unsafe impl ZeroBits for E4m3 {}

/// `n` zeros from zeroed memory, so that pages are mapped only once written. (`vec![x; n]`
/// does this for integers and floats, but writes every element of a wrapper type: a KV pool
/// of gigabytes would then be resident from the start.)
fn zeroed<T: ZeroBits>(n: usize) -> Vec<T> {
    if n == 0 || std::mem::size_of::<T>() == 0 {
        return Vec::new();
    }
    let layout = std::alloc::Layout::array::<T>(n).expect("KV buffer size overflows");
    // SAFETY: the layout is non-zero-sized; all-zero bits are a valid T (ZeroBits); the
    // pointer comes from the global allocator with this exact layout and capacity.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut T;
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Vec::from_raw_parts(p, n, n)
    }
}

/// Rows of positions, each `n_kv` heads of `head_dim`, in one storage type.
pub struct KvRowBuf {
    n_kv: usize,
    head_dim: usize,
    elems: Elems,
    /// Int8 and FP8: one scale per (row, head).
    scales: Vec<f32>,
}

impl KvRowBuf {
    /// `n_rows` zeroed rows (zeroed memory is mapped lazily: pages cost memory once written).
    pub fn new(dtype: KvDtype, n_kv: usize, head_dim: usize, n_rows: usize) -> KvRowBuf {
        let n = n_rows * n_kv * head_dim;
        let elems = match dtype {
            KvDtype::F32 => Elems::F32(vec![0.0; n]),
            KvDtype::F16 => Elems::F16(zeroed(n)),
            KvDtype::Bf16 => Elems::Bf16(zeroed(n)),
            KvDtype::Int8 => Elems::Int8(vec![0; n]),
            KvDtype::Fp8 => Elems::Fp8(zeroed(n)),
        };
        let scales = match dtype {
            KvDtype::Int8 | KvDtype::Fp8 => vec![0.0; n_rows * n_kv],
            _ => Vec::new(),
        };
        KvRowBuf { n_kv, head_dim, elems, scales }
    }

    /// Rows `first..first + n`.
    pub fn rows(&self, first: usize, n: usize) -> KvRows<'_> {
        let kvd = self.n_kv * self.head_dim;
        let r = first * kvd..(first + n) * kvd;
        let scales =
            &self.scales[(first * self.n_kv).min(self.scales.len())..((first + n) * self.n_kv).min(self.scales.len())];
        let data = match &self.elems {
            Elems::F32(v) => KvData::F32(&v[r]),
            Elems::F16(v) => KvData::F16(&v[r]),
            Elems::Bf16(v) => KvData::Bf16(&v[r]),
            Elems::Int8(v) => KvData::Int8 { q: &v[r], scales },
            Elems::Fp8(v) => KvData::Fp8 { q: &v[r], scales },
        };
        KvRows { data, n_kv: self.n_kv, head_dim: self.head_dim }
    }

    /// Copies `n` rows of `src` (same type and shape), from `src_first`, to rows `first..`:
    /// the stored bits, not a re-encoding.
    pub fn copy_rows(&mut self, first: usize, src: &KvRowBuf, src_first: usize, n: usize) {
        assert!(self.n_kv == src.n_kv && self.head_dim == src.head_dim, "KV rows of different shapes");
        let kvd = self.n_kv * self.head_dim;
        let (to, from) = (first * kvd..(first + n) * kvd, src_first * kvd..(src_first + n) * kvd);
        match (&mut self.elems, &src.elems) {
            (Elems::F32(a), Elems::F32(b)) => a[to].copy_from_slice(&b[from]),
            (Elems::F16(a), Elems::F16(b)) => a[to].copy_from_slice(&b[from]),
            (Elems::Bf16(a), Elems::Bf16(b)) => a[to].copy_from_slice(&b[from]),
            (Elems::Int8(a), Elems::Int8(b)) => a[to].copy_from_slice(&b[from]),
            (Elems::Fp8(a), Elems::Fp8(b)) => a[to].copy_from_slice(&b[from]),
            _ => panic!("KV rows of different types"),
        }
        if !self.scales.is_empty() {
            let nk = self.n_kv;
            self.scales[first * nk..(first + n) * nk]
                .copy_from_slice(&src.scales[src_first * nk..(src_first + n) * nk]);
        }
    }

    pub fn write(&mut self, row: usize, x: &[f32]) {
        let (hd, n_kv) = (self.head_dim, self.n_kv);
        let at = row * n_kv * hd..(row + 1) * n_kv * hd;
        match &mut self.elems {
            Elems::F32(v) => v[at].copy_from_slice(x),
            Elems::F16(v) => v[at].iter_mut().zip(x).for_each(|(o, &x)| *o = F16Bits(half::f16::from_f32(x).to_bits())),
            Elems::Bf16(v) => {
                v[at].iter_mut().zip(x).for_each(|(o, &x)| *o = Bf16Bits(half::bf16::from_f32(x).to_bits()))
            }
            Elems::Int8(v) => {
                write_scaled(x, hd, &mut self.scales[row * n_kv..], &mut v[at], 127.0, |y| y.round() as i8)
            }
            Elems::Fp8(v) => {
                write_scaled(x, hd, &mut self.scales[row * n_kv..], &mut v[at], E4M3_MAX, |y| E4m3(e4m3_from_f32(y)))
            }
        }
    }
}

/// Stores `x` head by head with one scale per head, s = max|x| / `qmax`.
fn write_scaled<E>(x: &[f32], hd: usize, scales: &mut [f32], out: &mut [E], qmax: f32, enc: impl Fn(f32) -> E) {
    for ((head, out), s) in x.chunks_exact(hd).zip(out.chunks_exact_mut(hd)).zip(scales.iter_mut()) {
        let amax = head.iter().fold(0f32, |m, &v| m.max(v.abs()));
        *s = amax / qmax;
        let inv = if *s > 0.0 { 1.0 / *s } else { 0.0 };
        for (o, &v) in out.iter_mut().zip(head) {
            *o = enc(v * inv);
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
    F16(&'a [F16Bits]),
    Bf16(&'a [Bf16Bits]),
    Int8 { q: &'a [i8], scales: &'a [f32] },
    Fp8 { q: &'a [E4m3], scales: &'a [f32] },
}

impl KvRows<'_> {
    /// out[j] = scale · dot(q, head `kvh` of row `first + j`).
    pub fn scaled_dots(&self, q: &[f32], first: usize, kvh: usize, scale: f32, out: &mut [f32]) {
        let (kvd, at) = (self.n_kv * self.head_dim, first * self.n_kv * self.head_dim + kvh * self.head_dim);
        let s = first * self.n_kv + kvh;
        match self.data {
            KvData::F32(r) => ops::scaled_dots(q, &r[at..], kvd, scale, out),
            KvData::F16(r) => ops::scaled_dots_narrow(q, &r[at..], kvd, NO_SCALES, 0, scale, out),
            KvData::Bf16(r) => ops::scaled_dots_narrow(q, &r[at..], kvd, NO_SCALES, 0, scale, out),
            KvData::Int8 { q: r, scales } => {
                ops::scaled_dots_narrow(q, &r[at..], kvd, &scales[s..], self.n_kv, scale, out)
            }
            KvData::Fp8 { q: r, scales } => {
                ops::scaled_dots_narrow(q, &r[at..], kvd, &scales[s..], self.n_kv, scale, out)
            }
        }
    }

    /// out += Σ_j w[j] · head `kvh` of row `first + j`.
    pub fn weighted_sum(&self, w: &[f32], first: usize, kvh: usize, out: &mut [f32]) {
        let (kvd, at) = (self.n_kv * self.head_dim, first * self.n_kv * self.head_dim + kvh * self.head_dim);
        let s = first * self.n_kv + kvh;
        match self.data {
            KvData::F32(r) => ops::weighted_sum(w, &r[at..], kvd, out),
            KvData::F16(r) => ops::weighted_sum_narrow(w, &r[at..], kvd, NO_SCALES, 0, out),
            KvData::Bf16(r) => ops::weighted_sum_narrow(w, &r[at..], kvd, NO_SCALES, 0, out),
            KvData::Int8 { q: r, scales } => ops::weighted_sum_narrow(w, &r[at..], kvd, &scales[s..], self.n_kv, out),
            KvData::Fp8 { q: r, scales } => ops::weighted_sum_narrow(w, &r[at..], kvd, &scales[s..], self.n_kv, out),
        }
    }

    /// Head `kvh` of row `j` as f32 (tests).
    pub fn head_f32(&self, j: usize, kvh: usize) -> Vec<f32> {
        let hd = self.head_dim;
        let at = (j * self.n_kv + kvh) * hd;
        let s = j * self.n_kv + kvh;
        fn conv<E: KvElem>(r: &[E], f: f32) -> Vec<f32> {
            r.iter().map(|e| f * e.to_f32()).collect()
        }
        match self.data {
            KvData::F32(r) => r[at..at + hd].to_vec(),
            KvData::F16(r) => conv(&r[at..at + hd], 1.0),
            KvData::Bf16(r) => conv(&r[at..at + hd], 1.0),
            KvData::Int8 { q: r, scales } => conv(&r[at..at + hd], scales[s]),
            KvData::Fp8 { q: r, scales } => conv(&r[at..at + hd], scales[s]),
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
    fn narrow_rows_hold_each_value_to_their_precision() {
        let mut rng = Rng::new(4);
        let (n_kv, hd) = (3, 16);
        let x: Vec<f32> = (0..n_kv * hd).map(|_| rng.normal()).collect();
        // (dtype, error bound relative to the head's max |x| or to |x|)
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Bf16, KvDtype::Int8, KvDtype::Fp8] {
            let mut buf = KvRowBuf::new(dtype, n_kv, hd, 4);
            buf.write(2, &x);
            let rows = buf.rows(2, 1);
            for h in 0..n_kv {
                let head = &x[h * hd..(h + 1) * hd];
                let amax = head.iter().fold(0f32, |m, &v| m.max(v.abs()));
                for (&got, &v) in rows.head_f32(0, h).iter().zip(head) {
                    let bound = match dtype {
                        KvDtype::F32 => 0.0,
                        KvDtype::F16 => v.abs() * 2f32.powi(-11),
                        KvDtype::Bf16 => v.abs() * 2f32.powi(-8),
                        // Half a step of 1/127 of the head's max.
                        KvDtype::Int8 => 0.5 * amax / 127.0 + 1e-7,
                        // Half a mantissa step (3 bits), or half the smallest subnormal step.
                        KvDtype::Fp8 => (v.abs() * 2f32.powi(-4)).max(amax / E4M3_MAX * 2f32.powi(-10)) + 1e-7,
                    };
                    assert!((got - v).abs() <= bound, "{dtype:?}: {got} for {v} (bound {bound})");
                }
            }
            assert_eq!(dtype.row_bytes(n_kv, hd), KvDtype::parse(dtype.name()).unwrap().row_bytes(n_kv, hd));
        }
        assert_eq!(KvDtype::Int8.row_bytes(n_kv, hd), n_kv * hd + 4 * n_kv);
        assert_eq!(KvDtype::F16.row_bytes(n_kv, hd), 2 * n_kv * hd);
        assert!(KvDtype::parse("fp4").is_err());
    }
}
