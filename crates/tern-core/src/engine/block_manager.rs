//! Allocation of KV blocks, with prefix caching: a full block is named by a hash of its tokens
//! chained with its parent block's hash, so equal prefixes map to equal block chains. Blocks
//! are reference-counted; a cached block nobody holds stays reusable until it is evicted,
//! least recently released first.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

/// Chained content hash of a full block.
pub(crate) fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    // DefaultHasher::new() has fixed keys: hashes are stable within a process.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// What a cached block holds, checked on every hit so a hash collision can never alias.
struct CachedContent {
    hash: u64,
    parent: Option<u64>,
    tokens: Vec<u32>,
}

pub(crate) struct BlockManager {
    refcount: Vec<u32>,
    content: Vec<Option<CachedContent>>,
    cached: HashMap<u64, u32>,
    /// Blocks with no content, free.
    free: Vec<u32>,
    /// Cached blocks nobody holds, by release time (oldest evicted first).
    evictable: BTreeSet<(u64, u32)>,
    released_at: Vec<u64>,
    clock: u64,
    caching: bool,
}

impl BlockManager {
    pub(crate) fn new(n_blocks: usize, caching: bool) -> Self {
        BlockManager {
            refcount: vec![0; n_blocks],
            content: (0..n_blocks).map(|_| None).collect(),
            cached: HashMap::new(),
            // Popped from the end: low block ids first.
            free: (0..n_blocks as u32).rev().collect(),
            evictable: BTreeSet::new(),
            released_at: vec![0; n_blocks],
            clock: 0,
            caching,
        }
    }

    /// Blocks that an allocation could take (free or evictable).
    pub(crate) fn n_available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    pub(crate) fn n_used(&self) -> usize {
        self.refcount.len() - self.n_available()
    }

    /// A fresh block (evicting the least recently released cached block if none is free).
    pub(crate) fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(c) = self.content[b as usize].take() {
                    self.cached.remove(&c.hash);
                }
                b
            }
        };
        self.refcount[b as usize] = 1;
        Some(b)
    }

    /// Takes a reference to the cached block with this content, if there is one.
    pub(crate) fn acquire_cached(&mut self, hash: u64, parent: Option<u64>, tokens: &[u32]) -> Option<u32> {
        if !self.caching {
            return None;
        }
        let &b = self.cached.get(&hash)?;
        let c = self.content[b as usize].as_ref()?;
        if c.parent != parent || c.tokens != tokens {
            return None;
        }
        if self.refcount[b as usize] == 0 {
            self.evictable.remove(&(self.released_at[b as usize], b));
        }
        self.refcount[b as usize] += 1;
        Some(b)
    }

    /// Records that block `b` (held, full, computed) holds this content, so later prompts with
    /// the same prefix can share it. A second block with equal content stays private.
    pub(crate) fn register(&mut self, b: u32, hash: u64, parent: Option<u64>, tokens: &[u32]) {
        if !self.caching || self.cached.contains_key(&hash) || self.content[b as usize].is_some() {
            return;
        }
        self.cached.insert(hash, b);
        self.content[b as usize] = Some(CachedContent { hash, parent, tokens: tokens.to_vec() });
    }

    /// Drops one reference; a block nobody holds becomes free (or evictable if cached).
    pub(crate) fn release(&mut self, b: u32) {
        let rc = &mut self.refcount[b as usize];
        debug_assert!(*rc > 0, "release of a free block");
        *rc -= 1;
        if *rc > 0 {
            return;
        }
        if self.content[b as usize].is_some() {
            self.clock += 1;
            self.released_at[b as usize] = self.clock;
            self.evictable.insert((self.clock, b));
        } else {
            self.free.push(b);
        }
    }

    /// Releases a sequence's blocks, last block first: a prompt's tail is then evicted before
    /// its head, which more requests share.
    pub(crate) fn release_all(&mut self, table: &mut Vec<u32>) {
        for b in table.drain(..).rev() {
            self.release(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_blocks_are_shared_and_evicted_least_recent_first() {
        let mut m = BlockManager::new(3, true);
        let (t1, t2) = ([1u32, 2], [3u32, 4]);
        let (h1, h2) = (block_hash(None, &t1), block_hash(Some(block_hash(None, &t1)), &t2));
        let a = m.allocate().unwrap();
        let b = m.allocate().unwrap();
        m.register(a, h1, None, &t1);
        m.register(b, h2, Some(h1), &t2);
        assert_eq!(m.acquire_cached(h1, None, &t1), Some(a), "a held cached block is shared");
        assert_eq!(m.acquire_cached(h1, None, &[9, 9]), None, "content is checked, not only the hash");
        m.release(a);
        m.release_all(&mut vec![a, b]);
        assert_eq!(m.n_available(), 3);
        // Free first, then the least recently released cached block (b: released before a).
        let c = m.allocate().unwrap();
        assert!(c != a && c != b);
        assert_eq!(m.allocate(), Some(b));
        assert_eq!(m.acquire_cached(h2, Some(h1), &t2), None, "evicted content is gone");
        assert_eq!(m.acquire_cached(h1, None, &t1), Some(a), "a stayed cached");
        assert_eq!(m.allocate(), None);
    }

    #[test]
    fn without_caching_nothing_is_shared() {
        let mut m = BlockManager::new(2, false);
        let a = m.allocate().unwrap();
        m.register(a, 7, None, &[1]);
        assert_eq!(m.acquire_cached(7, None, &[1]), None);
        m.release(a);
        assert_eq!(m.n_available(), 2);
    }
}
