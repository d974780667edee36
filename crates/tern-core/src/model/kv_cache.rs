//! A contiguous per-sequence KV cache: for each layer, keys and values of every cached
//! position, `kv_dim` floats per position. Pages are committed by the OS as they are written,
//! so a large capacity costs memory only once used.

pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    kv_dim: usize,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new(n_layers: usize, kv_dim: usize, capacity: usize) -> Self {
        KvCache {
            keys: (0..n_layers).map(|_| vec![0.0; capacity * kv_dim]).collect(),
            values: (0..n_layers).map(|_| vec![0.0; capacity * kv_dim]).collect(),
            kv_dim,
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

    /// Stores K/V rows for positions `pos..pos + k.len() / kv_dim` of one layer.
    pub(crate) fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let at = pos * self.kv_dim;
        self.keys[layer][at..at + k.len()].copy_from_slice(k);
        self.values[layer][at..at + v.len()].copy_from_slice(v);
    }

    pub(crate) fn keys(&self, layer: usize, upto: usize) -> &[f32] {
        &self.keys[layer][..upto * self.kv_dim]
    }

    pub(crate) fn values(&self, layer: usize, upto: usize) -> &[f32] {
        &self.values[layer][..upto * self.kv_dim]
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
