//! Prefix caching over whole sequences: when a sequence ends, its cache is kept with the tokens
//! whose rows it holds; a later request whose prompt starts with the same tokens (a chat's
//! earlier turns, a shared system prompt) takes that cache over and skips the prefill of the
//! shared part. Reuse is by runs of [`PAGE`] tokens, and always leaves at least the prompt's last
//! token to compute (its logits start the reply). A hit moves the cache to the new sequence
//! (no copy); entries are evicted least recently used when admission needs their rows.
//!
//! Matches are checked token by token. The kept rows of generated tokens were computed by the
//! decode step, not by a prefill: they agree with a fresh prefill's to rounding (the tests hold
//! the two paths within 1e-5 relative in f32), so a hit's tokens can differ from a miss's only
//! where two logits tie within that rounding.

/// Tokens per unit of reuse.
pub const PAGE: usize = 64;

/// What the store needs of a cache (a trait so that the logic is tested without a model).
pub trait Rows {
    /// Rows held.
    fn rows(&self) -> usize;
    /// Keeps the first `n` rows.
    fn keep(&mut self, n: usize);
    /// Frees the memory past the rows held.
    fn shrink(&mut self);
}

impl Rows for crate::cache::LatentCache {
    fn rows(&self) -> usize {
        self.len()
    }

    fn keep(&mut self, n: usize) {
        self.truncate(n);
    }

    fn shrink(&mut self) {
        crate::cache::LatentCache::shrink(self);
    }
}

struct Entry<C> {
    tokens: Vec<u32>,
    cache: C,
    used: u64,
}

/// Kept caches, keyed by their tokens.
pub struct PrefixStore<C> {
    entries: Vec<Entry<C>>,
    clock: u64,
    rows: usize,
}

impl<C: Rows> Default for PrefixStore<C> {
    fn default() -> Self {
        PrefixStore { entries: Vec::new(), clock: 0, rows: 0 }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<C: Rows> PrefixStore<C> {
    /// Rows held by the kept caches.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Caches kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keeps `cache`, whose rows are those of `tokens` (their first `cache.rows()`), cut to
    /// whole pages. A cache of less than a page is dropped.
    pub fn insert(&mut self, tokens: &[u32], mut cache: C) {
        let n = cache.rows().min(tokens.len()) / PAGE * PAGE;
        if n == 0 {
            return;
        }
        cache.keep(n);
        cache.shrink();
        self.clock += 1;
        self.rows += n;
        self.entries.push(Entry { tokens: tokens[..n].to_vec(), cache, used: self.clock });
    }

    /// The kept cache sharing the longest prefix with `prompt`, at least a page, cut to the
    /// shared whole pages (and short of the prompt's last token), and how many rows it holds.
    /// The cache leaves the store.
    pub fn take(&mut self, prompt: &[u32]) -> Option<(C, usize)> {
        let limit = prompt.len().saturating_sub(1);
        let (best, n) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit) / PAGE * PAGE))
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(i, n)| (n, self.entries[i].used))?;
        let mut entry = self.entries.swap_remove(best);
        self.rows -= entry.cache.rows();
        entry.cache.keep(n);
        Some((entry.cache, n))
    }

    /// Drops the least recently used cache; whether there was one.
    pub fn evict(&mut self) -> bool {
        let Some(i) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.used).map(|(i, _)| i) else {
            return false;
        };
        let entry = self.entries.swap_remove(i);
        self.rows -= entry.cache.rows();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in cache: how many rows it holds.
    #[derive(Debug, PartialEq)]
    struct Fake(usize);

    impl Rows for Fake {
        fn rows(&self) -> usize {
            self.0
        }
        fn keep(&mut self, n: usize) {
            self.0 = self.0.min(n);
        }
        fn shrink(&mut self) {}
    }

    fn tokens(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + seed).collect()
    }

    #[test]
    fn a_shared_prefix_is_taken_by_whole_pages_and_leaves_the_last_token() {
        let mut store = PrefixStore::default();
        let a = tokens(200, 0);
        store.insert(&a, Fake(200));
        assert_eq!(store.rows(), 192, "kept by whole pages");
        // A prompt sharing 150 tokens reuses 128 of them.
        let mut p = a[..150].to_vec();
        p.extend([9999, 9998]);
        let (cache, n) = store.take(&p).unwrap();
        assert_eq!((cache, n), (Fake(128), 128));
        assert!(store.is_empty() && store.rows() == 0, "a hit moves the cache out");
        // A prompt equal to the kept tokens still computes its last token.
        store.insert(&a, Fake(200));
        let (_, n) = store.take(&a[..128]).unwrap();
        assert_eq!(n, 64);
        // Less than a page in common, or a different first token: a miss.
        store.insert(&a, Fake(200));
        assert!(store.take(&a[..40]).is_none());
        assert!(store.take(&tokens(200, 1)).is_none());
        assert!(store.take(&a[..10]).is_none());
        store.insert(&a[..30], Fake(30));
        assert_eq!(store.len(), 1, "less than a page is not kept");
    }

    #[test]
    fn the_longest_match_wins_and_eviction_goes_least_recently_used_first() {
        let mut store = PrefixStore::default();
        let a = tokens(300, 0);
        store.insert(&a[..100], Fake(100)); // 64 rows kept
        store.insert(&a, Fake(300)); // 256
        store.insert(&tokens(300, 5), Fake(300)); // 256, unrelated
        assert_eq!(store.rows(), 64 + 256 + 256);
        let (_, n) = store.take(&a).unwrap();
        assert_eq!(n, 256, "the longest shared prefix");
        assert!(store.evict(), "the oldest (the 64-row one) goes first");
        assert_eq!(store.rows(), 256);
        assert!(store.take(&a).is_none());
        assert!(store.evict() && !store.evict());
        assert_eq!(store.rows(), 0);
    }
}
