//! Prefix caching by pages. When a sequence ends (or is preempted), each full page of its
//! cache is kept, keyed by a hash chain of its tokens: a page's key is the hash of its parent
//! page's key and its own [`PAGE_ROWS`] tokens, so a key stands for the whole prefix up to the
//! page's end. A later request walks its prompt page by page down the chain, checks each hit
//! token by token (a hash collision is a miss, never wrong rows), and starts with the pages
//! found: shared, not copied (a page is reference-counted, and copied only if written). A hit
//! always leaves at least the prompt's last token to compute: its logits start the reply.
//!
//! Pages are evicted least recently used, and only pages nobody else holds (evicting a page a
//! sequence holds would free nothing) and that no kept page continues (a chain is cut from its
//! end, so what is kept stays reachable). A walk touches a chain's pages from its end to its
//! start, so a chain's first pages, which more prompts share, are the last to go.
//!
//! The kept rows of generated tokens were computed by the decode step, not by a prefill: they
//! agree with a fresh prefill's to rounding (the tests hold the two paths within 1e-5 relative
//! in f32), so a hit's tokens can differ from a miss's only where two logits tie within that
//! rounding.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use crate::cache::{LatentCache, Page, PAGE_ROWS};

struct Entry {
    tokens: Vec<u32>,
    page: Arc<Page>,
    parent: Option<u64>,
    /// Kept pages that continue this one.
    children: usize,
    used: u64,
}

/// Kept pages, keyed by the hash chain of their tokens.
#[derive(Default)]
pub struct PrefixStore {
    entries: HashMap<u64, Entry>,
    clock: u64,
}

/// The key of the page holding `tokens` after the page keyed `parent`.
fn key(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl PrefixStore {
    /// Pages kept.
    pub fn pages(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Pages only the store holds: what evicting would give back to the pool.
    pub fn evictable(&self) -> usize {
        self.entries.values().filter(|e| Arc::strong_count(&e.page) == 1).count()
    }

    /// Keeps the full pages of `cache`, whose rows are those of `tokens` (their first
    /// `cache.len()`). Pages kept already are only marked used.
    pub fn insert(&mut self, tokens: &[u32], cache: &LatentCache) {
        let full = cache.len().min(tokens.len()) / PAGE_ROWS;
        let mut parent = None;
        let mut chain = Vec::with_capacity(full);
        for (i, page_tokens) in tokens.chunks_exact(PAGE_ROWS).take(full).enumerate() {
            let k = key(parent, page_tokens);
            match self.entries.get(&k) {
                Some(e) if e.tokens == page_tokens && e.parent == parent => {}
                Some(_) => break, // a collision: keep what is there
                None => {
                    let Some(page) = cache.page(i) else { break };
                    if let Some(p) = parent.and_then(|p| self.entries.get_mut(&p)) {
                        p.children += 1;
                    }
                    let entry = Entry { tokens: page_tokens.to_vec(), page, parent, children: 0, used: 0 };
                    self.entries.insert(k, entry);
                }
            }
            chain.push(k);
            parent = Some(k);
        }
        self.touch(&chain);
    }

    /// Marks a chain used, its end first, so that its start is the most recent.
    fn touch(&mut self, chain: &[u64]) {
        for k in chain.iter().rev() {
            self.clock += 1;
            if let Some(e) = self.entries.get_mut(k) {
                e.used = self.clock;
            }
        }
    }

    /// The kept pages that start `prompt`, short of its last token, and the rows they hold.
    pub fn lookup(&mut self, prompt: &[u32]) -> (Vec<Arc<Page>>, usize) {
        let most = prompt.len().saturating_sub(1) / PAGE_ROWS;
        let (mut pages, mut chain, mut parent) = (Vec::new(), Vec::new(), None);
        for page_tokens in prompt.chunks_exact(PAGE_ROWS).take(most) {
            let k = key(parent, page_tokens);
            match self.entries.get(&k) {
                Some(e) if e.tokens == page_tokens && e.parent == parent => pages.push(e.page.clone()),
                _ => break,
            }
            chain.push(k);
            parent = Some(k);
        }
        self.touch(&chain);
        let rows = pages.len() * PAGE_ROWS;
        (pages, rows)
    }

    /// Drops the least recently used page that only the store holds and no kept page
    /// continues; whether there was one.
    pub fn evict(&mut self) -> bool {
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| e.children == 0 && Arc::strong_count(&e.page) == 1)
            .min_by_key(|(_, e)| e.used)
            .map(|(&k, _)| k);
        let Some(k) = victim else { return false };
        if let Some(e) = self.entries.remove(&k) {
            if let Some(p) = e.parent.and_then(|p| self.entries.get_mut(&p)) {
                p.children -= 1;
            }
            // The page goes back to its pool's free list when this last holder drops it.
            drop(e.page);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{CacheKind, PageLayout, PagePool};
    use candle_core::{DType, Device, Tensor};

    fn tokens(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + seed).collect()
    }

    /// A cache of `n` rows from `pool` (row `i` holds the value `i`).
    fn cache(pool: &PagePool, n: usize) -> LatentCache {
        let mut c = LatentCache::in_pool(pool, &Device::Cpu);
        let rows = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap().reshape((n, 1)).unwrap();
        let rows = rows.broadcast_as((n, 4)).unwrap().contiguous().unwrap();
        c.append(0, &rows, &rows).unwrap();
        c
    }

    fn pool(pages: usize) -> PagePool {
        PagePool::with_pages(PageLayout::of(CacheKind::Dense(DType::F32), 1, 4, 4).unwrap(), pages)
    }

    #[test]
    fn full_pages_are_shared_by_a_prompt_that_starts_the_same_and_leave_the_last_token() {
        let pool = pool(16);
        let mut store = PrefixStore::default();
        let a = tokens(200, 0);
        store.insert(&a, &cache(&pool, 200));
        assert_eq!((store.pages(), pool.used_pages()), (3, 3), "whole pages kept; the rest let go");
        // A prompt sharing 150 tokens finds 2 pages, shared with the store, not copied.
        let mut p = a[..150].to_vec();
        p.extend([9999, 9998]);
        let (pages, rows) = store.lookup(&p);
        assert_eq!((pages.len(), rows, pool.used_pages()), (2, 128, 3));
        assert_eq!(store.evictable(), 1, "the pages in use are not evictable");
        let c = LatentCache::from_pages(&pool, pages, rows, &Device::Cpu).unwrap();
        assert_eq!(c.len(), 128);
        // A prompt equal to the kept tokens still computes its last token.
        assert_eq!(store.lookup(&a[..128]).1, 64);
        // A different first page, or less than a page: a miss.
        assert_eq!(store.lookup(&tokens(200, 1)).1, 0);
        assert_eq!(store.lookup(&a[..40]).1, 0);
        let mut b = a.clone();
        b[3] = 1;
        assert_eq!(store.lookup(&b).1, 0, "a change in the first page misses every later page");
    }

    #[test]
    fn eviction_cuts_chains_from_their_end_least_recently_used_first_and_spares_pages_in_use() {
        let pool = pool(16);
        let mut store = PrefixStore::default();
        let (a, b) = (tokens(256, 0), tokens(128, 5));
        store.insert(&a, &cache(&pool, 256)); // 4 pages
        store.insert(&b, &cache(&pool, 128)); // 2 pages, more recent
        assert_eq!(store.pages(), 6);
        let (held, _) = store.lookup(&b[..100]); // b's first page in use
        assert_eq!(held.len(), 1);
        // a's chain goes first, from its end; b's first page, held, stays.
        for left in (2..6).rev() {
            assert!(store.evict());
            assert_eq!(store.pages(), left);
        }
        assert_eq!(store.lookup(&a).1, 0);
        assert!(store.evict(), "b's second page");
        assert!(!store.evict(), "b's first page is in use");
        drop(held);
        assert!(store.evict() && store.is_empty());
        assert_eq!(pool.used_pages(), 0, "every page back in the pool");
    }

    #[test]
    fn a_chain_extends_a_kept_one_and_keeps_what_it_shares_once() {
        let pool = pool(16);
        let mut store = PrefixStore::default();
        let a = tokens(300, 0);
        store.insert(&a[..130], &cache(&pool, 130));
        store.insert(&a, &cache(&pool, 300));
        assert_eq!(store.pages(), 4, "pages 0 and 1 once, 2 and 3 added");
        assert_eq!(pool.used_pages(), 4);
        assert_eq!(store.lookup(&a).1, 256);
    }
}
