//! The paged KV pool: one arena of fixed-size blocks, each holding `block_size` positions of
//! keys and values for every layer. Sequences address it through block tables.

use crate::model::config::ModelConfig;
use crate::model::kv_cache::{KvDtype, KvRowBuf, KvRows, KvStore};
use anyhow::{bail, Result};

pub(crate) struct PagedKv {
    /// Block-major rows: block b, layer l, K then V, `block_size` rows each.
    arena: KvRowBuf,
    n_layers: usize,
    block_size: usize,
    n_blocks: usize,
    dtype: KvDtype,
}

impl PagedKv {
    pub(crate) fn bytes_per_block(c: &ModelConfig, block_size: usize, dtype: KvDtype) -> usize {
        c.n_layers * 2 * block_size * dtype.row_bytes(c.n_kv_heads, c.head_dim)
    }

    pub(crate) fn new(c: &ModelConfig, block_size: usize, n_blocks: usize, dtype: KvDtype) -> Result<Self> {
        let Some(rows) = n_blocks.checked_mul(c.n_layers * 2 * block_size) else {
            bail!("a KV pool of {n_blocks} blocks is too large");
        };
        if rows.checked_mul(c.n_kv_heads * c.head_dim * 4).is_none() {
            bail!("a KV pool of {n_blocks} blocks is too large");
        }
        let arena = KvRowBuf::new(dtype, c.n_kv_heads, c.head_dim, rows);
        Ok(PagedKv { arena, n_layers: c.n_layers, block_size, n_blocks, dtype })
    }

    pub(crate) fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    pub(crate) fn block_size(&self) -> usize {
        self.block_size
    }

    pub(crate) fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// The first row of (block, layer)'s keys; its values follow `block_size` rows later.
    fn first_row(&self, block: u32, layer: usize) -> usize {
        (block as usize * self.n_layers + layer) * 2 * self.block_size
    }

    /// Keys and values of `block` at `layer`.
    pub(crate) fn block(&self, block: u32, layer: usize) -> (KvRows<'_>, KvRows<'_>) {
        let bs = self.block_size;
        let r = self.first_row(block, layer);
        (self.arena.rows(r, bs), self.arena.rows(r + bs, bs))
    }

    /// Stores K and V of position `offset` of `block` at `layer`.
    pub(crate) fn write(&mut self, block: u32, layer: usize, offset: usize, k: &[f32], v: &[f32]) {
        let r = self.first_row(block, layer) + offset;
        self.arena.write(r, k);
        self.arena.write(r + self.block_size, v);
    }

    /// Copies the first `layers` layers of `src`'s block `src_block` (a pool of the same block
    /// size and K/V type) into this pool's block `block`.
    pub(crate) fn copy_block(&mut self, block: u32, src: &PagedKv, src_block: u32, layers: usize) {
        debug_assert_eq!(self.block_size, src.block_size);
        for l in 0..layers {
            self.arena.copy_rows(
                self.first_row(block, l),
                &src.arena,
                src.first_row(src_block, l),
                2 * self.block_size,
            );
        }
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

    fn kv_block(&self, layer: usize, seq: usize, block: usize) -> (KvRows<'_>, KvRows<'_>) {
        self.kv.block(self.tables[seq][block], layer)
    }

    fn write(&mut self, layer: usize, seq: usize, pos: usize, k: &[f32], v: &[f32]) {
        let bs = self.kv.block_size;
        self.kv.write(self.tables[seq][pos / bs], layer, pos % bs, k, v);
    }
}
