//! How the decode attention kernels see a layer's cached rows: page by page, where the paged
//! latent cache ([`crate::cache`]) keeps them. A page holds [`PAGE_ROWS`] consecutive rows of
//! one sequence; a sequence's pages lie anywhere in memory, in the order its block table lists
//! them. The kernels walk the pages in that order and never copy the rows into one buffer: the
//! fused bf16 kernel's run of rows is one page, the 8-bit kernel's run a few pages of 4 tiles.
//!
//! [`Contiguous`] shows one buffer of rows as pages too, for callers (and tests) that hold the
//! rows in one piece.

/// Rows per page.
pub const PAGE_ROWS: usize = 64;

/// One layer's cached rows, in float values `W`, page by page.
pub trait DensePages<W>: Sync {
    /// Rows cached.
    fn len(&self) -> usize;

    /// Whether no row is cached.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Page `i`'s rows, `i < len().div_ceil(PAGE_ROWS)`: `n × d_c` latents and `n × d_r` RoPE
    /// keys, row-major, `n = min(PAGE_ROWS, len − i · PAGE_ROWS)`.
    fn page(&self, i: usize) -> (&[W], &[W]);
}

/// Rows held in one piece, `c (len, d_c)` and `r (len, d_r)`, seen as pages.
#[derive(Debug, Clone, Copy)]
pub struct Contiguous<'a, W> {
    pub c: &'a [W],
    pub r: &'a [W],
    pub d_c: usize,
    pub d_r: usize,
}

impl<W: Sync> DensePages<W> for Contiguous<'_, W> {
    fn len(&self) -> usize {
        self.c.len() / self.d_c.max(1)
    }

    fn page(&self, i: usize) -> (&[W], &[W]) {
        let rows = i * PAGE_ROWS..((i + 1) * PAGE_ROWS).min(self.len());
        (&self.c[rows.start * self.d_c..rows.end * self.d_c], &self.r[rows.start * self.d_r..rows.end * self.d_r])
    }
}
