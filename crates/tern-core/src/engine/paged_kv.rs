//! The paged KV pool: one arena of fixed-size blocks, each holding `block_size` positions of
//! keys and values for every layer. Sequences address it through block tables.

use crate::model::config::ModelConfig;
use crate::model::kv_cache::KvStore;
use anyhow::{bail, Result};

pub(crate) struct PagedKv {
    /// Block-major: block b, layer l, K then V, `block_size × kv_dim` floats each.
    arena: Vec<f32>,
    n_layers: usize,
    kv_dim: usize,
    block_size: usize,
    n_blocks: usize,
}

impl PagedKv {
    pub(crate) fn bytes_per_block(c: &ModelConfig, block_size: usize) -> usize {
        c.n_layers * 2 * block_size * c.n_kv_heads * c.head_dim * std::mem::size_of::<f32>()
    }

    pub(crate) fn new(c: &ModelConfig, block_size: usize, n_blocks: usize) -> Result<Self> {
        let kv_dim = c.n_kv_heads * c.head_dim;
        let Some(len) = n_blocks.checked_mul(c.n_layers * 2 * block_size * kv_dim) else {
            bail!("a KV pool of {n_blocks} blocks is too large");
        };
        // Zeroed memory is mapped lazily by the OS: pages cost memory once written.
        Ok(PagedKv { arena: vec![0.0; len], n_layers: c.n_layers, kv_dim, block_size, n_blocks })
    }

    pub(crate) fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    fn offset(&self, block: u32, layer: usize) -> usize {
        (block as usize * self.n_layers + layer) * 2 * self.block_size * self.kv_dim
    }
}

/// The pool seen through the block tables of one batch's sequences (`seq` indexes `tables`).
pub(crate) struct PagedView<'a> {
    pub kv: &'a mut PagedKv,
    pub tables: Vec<&'a [u32]>,
}

impl KvStore for PagedView<'_> {
    fn block_size(&self) -> usize {
        self.kv.block_size
    }

    fn kv_block(&self, layer: usize, seq: usize, block: usize) -> (&[f32], &[f32]) {
        let n = self.kv.block_size * self.kv.kv_dim;
        let at = self.kv.offset(self.tables[seq][block], layer);
        (&self.kv.arena[at..at + n], &self.kv.arena[at + n..at + 2 * n])
    }

    fn write(&mut self, layer: usize, seq: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (bs, kvd) = (self.kv.block_size, self.kv.kv_dim);
        let at = self.kv.offset(self.tables[seq][pos / bs], layer) + pos % bs * kvd;
        self.kv.arena[at..at + kvd].copy_from_slice(k);
        self.kv.arena[at + bs * kvd..at + bs * kvd + kvd].copy_from_slice(v);
    }
}
