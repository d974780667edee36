//! The K/V an early-exit drafter attends over: its layers are the target's first layers, so
//! the target's pool already holds their keys and values for every position the target has
//! computed, and the drafter reads them there instead of computing them again (no prefill and
//! no catch-up of its own). What it proposes from goes to a small tail pool of its own: those
//! positions have no blocks in the target's tables yet, and the target's verification pass
//! writes its own K/V there anyway. The tail's first block starts as a copy of the target's
//! block that the first proposed position falls in.

use crate::engine::paged_kv::PagedKv;
use crate::model::kv_cache::{KvRows, KvStore};

/// One sequence of a drafting batch.
pub(crate) struct SharedSeq<'a> {
    /// The sequence's block table in the target's pool.
    pub table: &'a [u32],
    /// Blocks before this one are read from the target's pool, the rest from `tail`.
    pub first_tail_block: usize,
    pub tail: &'a mut PagedKv,
}

pub(crate) struct SharedKv<'a> {
    pub pool: &'a PagedKv,
    pub seqs: Vec<SharedSeq<'a>>,
}

/// Starts a sequence's tail for drafting from position `computed` (the target's K/V covers
/// positions `..computed`): copies the target's partly filled block, if there is one.
pub(crate) fn start_tail(pool: &PagedKv, table: &[u32], computed: usize, tail: &mut PagedKv, layers: usize) {
    let bs = pool.block_size();
    if !computed.is_multiple_of(bs) {
        tail.copy_block(0, pool, table[computed / bs], layers);
    }
}

impl KvStore for SharedKv<'_> {
    fn block_size(&self) -> usize {
        self.pool.block_size()
    }

    fn kv_block(&self, layer: usize, seq: usize, block: usize) -> (KvRows<'_>, KvRows<'_>) {
        let s = &self.seqs[seq];
        match block.checked_sub(s.first_tail_block) {
            Some(t) => s.tail.block(t as u32, layer),
            None => self.pool.block(s.table[block], layer),
        }
    }

    fn write(&mut self, layer: usize, seq: usize, pos: usize, k: &[f32], v: &[f32]) {
        let bs = self.pool.block_size();
        let s = &mut self.seqs[seq];
        let t = (pos / bs).checked_sub(s.first_tail_block).expect("the drafter writes past what the target computed");
        s.tail.write(t as u32, layer, pos % bs, k, v);
    }
}
