//! Where the decoder keeps keys and values: the `KvStore` interface, and the contiguous
//! single-sequence cache that serves as its reference implementation (the engine's paged
//! cache must give the same results).

/// K/V storage for the sequences of a batch, addressed as fixed-size blocks of positions.
pub trait KvStore: Sync {
    /// Positions per block.
    fn block_size(&self) -> usize;
    /// Keys and values (`block_size × kv_dim` floats each, position-major) of the `block`-th
    /// block of sequence `seq` at `layer`.
    fn kv_block(&self, layer: usize, seq: usize, block: usize) -> (&[f32], &[f32]);
    /// Stores one position's K and V rows.
    fn write(&mut self, layer: usize, seq: usize, pos: usize, k: &[f32], v: &[f32]);
}

/// A contiguous cache for one sequence: for each layer, keys and values of every position,
/// `kv_dim` floats per position (one block as long as the capacity). Pages are committed by
/// the OS as they are written, so a large capacity costs memory only once used.
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

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

impl KvStore for KvCache {
    fn block_size(&self) -> usize {
        self.capacity
    }

    fn kv_block(&self, layer: usize, seq: usize, block: usize) -> (&[f32], &[f32]) {
        debug_assert!(seq == 0 && block == 0, "a KvCache holds one sequence in one block");
        (&self.keys[layer], &self.values[layer])
    }

    fn write(&mut self, layer: usize, seq: usize, pos: usize, k: &[f32], v: &[f32]) {
        debug_assert_eq!(seq, 0, "a KvCache holds one sequence");
        let at = pos * self.kv_dim;
        self.keys[layer][at..at + k.len()].copy_from_slice(k);
        self.values[layer][at..at + v.len()].copy_from_slice(v);
    }
}
