//! The latent KV cache: per layer and per token, only `c_kv` (d_c, after `kv_a_layernorm`) and the
//! rotated `k_rope` (d_r) — `kv_lora_rank + qk_rope_head_dim` values. Nothing per head is cached.
//!
//! **Pages.** Rows live in pages of [`PAGE_ROWS`] tokens; a page holds those tokens' rows of
//! every layer (per layer, the latents then the RoPE keys, in the cache's format). Pages come
//! from a [`PagePool`] of fixed size, sized from a byte budget, and a sequence's cache is its
//! block table: the list of its pages, in token order. The decode kernels read each page where
//! it lies ([`crate::kernels::paged`]); nothing is gathered into one buffer per step.
//!
//! **Sharing.** A page is reference-counted (`Arc`): caches that share a prefix (a prompt's `n`
//! completions, a prefix kept for later requests) hold the same pages. A cache writes only pages
//! it holds alone; a shared page it must write is copied first (copy on write), so a shared
//! page never changes. A page goes back to its pool's free list when its last holder lets go.
//!
//! **Formats.** A float cache keeps rows in bf16, f16 or f32. An int8 cache
//! ([`CacheKind::Int8`]) keeps 8-bit codes with a scale per 128 latents
//! ([`crate::kernels::latent_int8`]): 596 bytes a row at V2's sizes against 1152 in bf16, a
//! page's 64 rows as 4 tiles of 16 per layer. Its latents are cached before `kv_a_layernorm`'s
//! gain, which the attention folds into its query and output.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::kernels::dsa::KeyPages;
use crate::kernels::latent_int8::{Int8Layout, Int8Rows, Int8Tiles, GROUP_TILES, TILE_ROWS};
use crate::kernels::paged::DensePages;
pub use crate::kernels::paged::PAGE_ROWS;

/// How cached rows are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// In a float dtype.
    Dense(DType),
    /// 8-bit codes, a scale per 128 latents and one for the RoPE part.
    Int8,
    /// For study only: per head keys (`d_nope + d_rope`) and values (`d_v`) in a float dtype, as
    /// multi-head attention caches them (transformers, candle): `n_h (d_n + d_r + d_v)` values
    /// per token and layer instead of `d_c + d_r`. The same pages hold the keys where a latent
    /// cache holds latents and the values where it holds RoPE keys.
    Expanded(DType),
}

impl CacheKind {
    /// The float dtype rows are stored in (`None` for int8).
    pub fn dtype(&self) -> Option<DType> {
        match self {
            CacheKind::Dense(d) | CacheKind::Expanded(d) => Some(*d),
            CacheKind::Int8 => None,
        }
    }
}

/// What one page holds: its kind, and the model's layers and row sizes: per token and layer `d_c`
/// latents and `d_r` RoPE values (for an expanded cache, the keys' and the values' widths), and
/// for sparse attention (V3.2) the lightning indexer's key, `d_i` values ([`IndexKeys`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLayout {
    pub kind: CacheKind,
    pub layers: usize,
    pub d_c: usize,
    pub d_r: usize,
    /// The indexer key's width; 0 without sparse attention.
    pub d_i: usize,
}

impl PageLayout {
    /// The pages of `cfg`'s cache of the given kind.
    pub fn new(cfg: &Config, kind: CacheKind) -> Result<PageLayout> {
        let (h, d_r) = (cfg.num_attention_heads, cfg.qk_rope_head_dim);
        let d_i = cfg.dsa.map_or(0, |d| d.index_head_dim);
        match kind {
            CacheKind::Expanded(_) if d_i > 0 => Err(Error::InvalidArgument(
                "an expanded cache cannot serve sparse attention (DeepSeek-V3.2): its rows are not the latents the \
                 indexer selects; use a latent cache"
                    .into(),
            )),
            CacheKind::Expanded(_) => {
                let keys = h * (cfg.qk_nope_head_dim + d_r);
                PageLayout::of(kind, cfg.num_hidden_layers, keys, h * cfg.v_head_dim)
            }
            _ => Ok(PageLayout::of(kind, cfg.num_hidden_layers, cfg.kv_lora_rank, d_r)?.with_index_keys(d_i)),
        }
    }

    /// The same pages with room for an indexer key of `d_i` values per token and layer.
    pub fn with_index_keys(self, d_i: usize) -> PageLayout {
        PageLayout { d_i, ..self }
    }

    /// The format indexer keys are kept in: f32 beside f32 rows, bf16 otherwise. Not 8 bits as
    /// DeepSeek's own inference keeps them: a key's rounding moves its score, and a score near the
    /// top-k boundary then picks another row; bf16 is what the reference computes them in.
    pub fn index_dtype(&self) -> DType {
        match self.kind {
            CacheKind::Dense(DType::F32) => DType::F32,
            _ => DType::BF16,
        }
    }

    /// Bytes the indexer keys take per token, all layers (part of [`PageLayout::bytes_per_token`]).
    pub fn index_bytes_per_token(&self) -> usize {
        self.layers * self.d_i * self.index_dtype().size_in_bytes()
    }

    /// Pages of `layers` layers of rows of `d_c` latents and `d_r` RoPE values.
    pub fn of(kind: CacheKind, layers: usize, d_c: usize, d_r: usize) -> Result<PageLayout> {
        match kind {
            CacheKind::Dense(DType::BF16 | DType::F16 | DType::F32)
            | CacheKind::Expanded(DType::BF16 | DType::F16 | DType::F32) => {}
            CacheKind::Dense(other) | CacheKind::Expanded(other) => {
                return Err(Error::InvalidArgument(format!(
                    "a latent cache holds bf16, f16 or f32 rows, not {other:?}"
                )))
            }
            CacheKind::Int8 => {
                Int8Layout::new(d_c, d_r).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "an int8 latent cache needs kv_lora_rank and qk_rope_head_dim in multiples of 4, the model \
                         has {d_c} and {d_r}"
                    ))
                })?;
            }
        }
        Ok(PageLayout { kind, layers, d_c, d_r, d_i: 0 })
    }

    fn int8(&self) -> Option<Int8Layout> {
        match self.kind {
            CacheKind::Int8 => Int8Layout::new(self.d_c, self.d_r),
            CacheKind::Dense(_) | CacheKind::Expanded(_) => None,
        }
    }

    /// Bytes one token takes across all layers: `layers * (d_c + d_r) * dtype size`, or the codes
    /// and scales of an int8 row; plus the indexer keys, if any.
    pub fn bytes_per_token(&self) -> usize {
        let rows = match (self.kind, self.int8()) {
            (CacheKind::Dense(dtype) | CacheKind::Expanded(dtype), _) => {
                self.layers * (self.d_c + self.d_r) * dtype.size_in_bytes()
            }
            (CacheKind::Int8, Some(l)) => self.layers * l.bytes_per_row(),
            (CacheKind::Int8, None) => 0,
        };
        rows + self.index_bytes_per_token()
    }

    /// Bytes one page takes.
    pub fn page_bytes(&self) -> usize {
        PAGE_ROWS * self.bytes_per_token()
    }

    /// A fresh page's values (zeros; int8 codes of 0).
    fn new_page(&self) -> PageData {
        let (rows_c, rows_r) = (self.layers * PAGE_ROWS * self.d_c, self.layers * PAGE_ROWS * self.d_r);
        let rows = match (self.kind.dtype(), self.int8()) {
            (Some(DType::BF16), _) => Rows::Bf16(vec![half::bf16::ZERO; rows_c], vec![half::bf16::ZERO; rows_r]),
            (Some(DType::F16), _) => Rows::F16(vec![half::f16::ZERO; rows_c], vec![half::f16::ZERO; rows_r]),
            (None, Some(l)) => Rows::Int8(
                vec![128; self.layers * GROUP_TILES * l.tile_codes()],
                vec![0.0; self.layers * GROUP_TILES * l.tile_scales()],
            ),
            _ => Rows::F32(vec![0.0; rows_c], vec![0.0; rows_r]),
        };
        let keys = self.layers * PAGE_ROWS * self.d_i;
        let index = match self.index_dtype() {
            DType::F32 => IndexKeys::F32(vec![0.0; keys]),
            _ => IndexKeys::Bf16(vec![half::bf16::ZERO; keys]),
        };
        PageData { rows, index }
    }
}

/// A page's values: its rows, and its indexer keys (empty without sparse attention).
#[derive(Debug, Clone)]
struct PageData {
    rows: Rows,
    index: IndexKeys,
}

/// The lightning indexer's keys of a page: per layer `PAGE_ROWS` keys of `d_i` values.
#[derive(Debug, Clone)]
enum IndexKeys {
    Bf16(Vec<half::bf16>),
    F32(Vec<f32>),
}

/// A page's rows: per layer `PAGE_ROWS` rows of latents, and as many of RoPE keys; or per
/// layer [`GROUP_TILES`] tiles of 8-bit codes and their scales.
#[derive(Debug, Clone)]
enum Rows {
    Bf16(Vec<half::bf16>, Vec<half::bf16>),
    F16(Vec<half::f16>, Vec<half::f16>),
    F32(Vec<f32>, Vec<f32>),
    Int8(Vec<u8>, Vec<f32>),
}

/// [`PAGE_ROWS`] tokens' rows of every layer. A page belongs to its pool: when its last holder
/// drops it, its memory goes back to the pool's free list.
#[derive(Debug)]
pub struct Page {
    data: PageData,
    pool: Arc<Mutex<PoolState>>,
}

impl Drop for Page {
    fn drop(&mut self) {
        let empty = PageData { rows: Rows::F32(Vec::new(), Vec::new()), index: IndexKeys::F32(Vec::new()) };
        let data = std::mem::replace(&mut self.data, empty);
        let mut state = lock(&self.pool);
        state.used -= 1;
        state.free.push(data);
    }
}

fn lock(state: &Mutex<PoolState>) -> MutexGuard<'_, PoolState> {
    // The state is a counter and a list: a panic elsewhere cannot leave it torn.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Page {
    /// Writes row `row` (of the page) of `layer`: `c` latents and `r` RoPE values, and `k`, the
    /// indexer key (`d_i` values).
    fn write(&mut self, layout: &PageLayout, layer: usize, row: usize, c: &[f32], r: &[f32], k: &[f32]) {
        let (d_c, d_r, d_i) = (layout.d_c, layout.d_r, layout.d_i);
        let (at_c, at_r) = ((layer * PAGE_ROWS + row) * d_c, (layer * PAGE_ROWS + row) * d_r);
        let at_i = (layer * PAGE_ROWS + row) * d_i;
        match &mut self.data.index {
            IndexKeys::Bf16(keys) => {
                keys[at_i..at_i + d_i].iter_mut().zip(k).for_each(|(d, &x)| *d = half::bf16::from_f32(x))
            }
            IndexKeys::F32(keys) => keys[at_i..at_i + d_i].copy_from_slice(k),
        }
        match &mut self.data.rows {
            Rows::Bf16(pc, pr) => {
                pc[at_c..at_c + d_c].iter_mut().zip(c).for_each(|(d, &x)| *d = half::bf16::from_f32(x));
                pr[at_r..at_r + d_r].iter_mut().zip(r).for_each(|(d, &x)| *d = half::bf16::from_f32(x));
            }
            Rows::F16(pc, pr) => {
                pc[at_c..at_c + d_c].iter_mut().zip(c).for_each(|(d, &x)| *d = half::f16::from_f32(x));
                pr[at_r..at_r + d_r].iter_mut().zip(r).for_each(|(d, &x)| *d = half::f16::from_f32(x));
            }
            Rows::F32(pc, pr) => {
                pc[at_c..at_c + d_c].copy_from_slice(c);
                pr[at_r..at_r + d_r].copy_from_slice(r);
            }
            Rows::Int8(codes, scales) => {
                let Some(l) = layout.int8() else { return };
                let tile = layer * GROUP_TILES + row / TILE_ROWS;
                let codes = &mut codes[tile * l.tile_codes()..(tile + 1) * l.tile_codes()];
                let scales = &mut scales[tile * l.tile_scales()..(tile + 1) * l.tile_scales()];
                l.write_row(codes, scales, row % TILE_ROWS, c, r);
            }
        }
    }

    /// The first `n` rows of `layer` as f32: appended to `c` and `r` (dequantized for int8).
    fn read_f32(&self, layout: &PageLayout, layer: usize, n: usize, c: &mut Vec<f32>, r: &mut Vec<f32>) {
        let (d_c, d_r) = (layout.d_c, layout.d_r);
        let (rc, rr) = (
            layer * PAGE_ROWS * d_c..(layer * PAGE_ROWS + n) * d_c,
            layer * PAGE_ROWS * d_r..(layer * PAGE_ROWS + n) * d_r,
        );
        match &self.data.rows {
            Rows::Bf16(pc, pr) => {
                c.extend(pc[rc].iter().map(|v| v.to_f32()));
                r.extend(pr[rr].iter().map(|v| v.to_f32()));
            }
            Rows::F16(pc, pr) => {
                c.extend(pc[rc].iter().map(|v| v.to_f32()));
                r.extend(pr[rr].iter().map(|v| v.to_f32()));
            }
            Rows::F32(pc, pr) => {
                c.extend_from_slice(&pc[rc]);
                r.extend_from_slice(&pr[rr]);
            }
            Rows::Int8(codes, scales) => {
                let Some(l) = layout.int8() else { return };
                let (c0, r0) = (c.len(), r.len());
                c.resize(c0 + n * d_c, 0.0);
                r.resize(r0 + n * d_r, 0.0);
                for t in 0..n.div_ceil(TILE_ROWS) {
                    let tile = layer * GROUP_TILES + t;
                    let m = TILE_ROWS.min(n - t * TILE_ROWS);
                    let src = (&codes[tile * l.tile_codes()..], &scales[tile * l.tile_scales()..]);
                    let (at_c, at_r) = (c0 + t * TILE_ROWS * d_c, r0 + t * TILE_ROWS * d_r);
                    l.dequantize_tile(src, m, &mut c[at_c..at_c + m * d_c], &mut r[at_r..at_r + m * d_r]);
                }
            }
        }
    }
}

#[derive(Debug)]
struct PoolState {
    /// Pages handed out and not yet back.
    used: usize,
    /// Pages back from their last holder, ready to hand out again.
    free: Vec<PageData>,
}

/// A fixed number of pages (or as many as asked, for a pool without a budget), handed out to
/// caches and taken back when their last holder lets go. Clones are handles to the same pool.
#[derive(Debug, Clone)]
pub struct PagePool {
    layout: PageLayout,
    /// Most pages out at once (`None`: no limit).
    capacity: Option<usize>,
    state: Arc<Mutex<PoolState>>,
}

impl PagePool {
    /// A pool of as many pages of `layout` as `budget` bytes hold (`None`: no limit).
    pub fn new(layout: PageLayout, budget: Option<usize>) -> PagePool {
        let capacity = budget.map(|b| b / layout.page_bytes().max(1));
        PagePool { layout, capacity, state: Arc::new(Mutex::new(PoolState { used: 0, free: Vec::new() })) }
    }

    /// A pool of exactly `pages` pages.
    pub fn with_pages(layout: PageLayout, pages: usize) -> PagePool {
        PagePool::new(layout, Some(pages * layout.page_bytes()))
    }

    fn state(&self) -> MutexGuard<'_, PoolState> {
        lock(&self.state)
    }

    /// What its pages hold.
    pub fn layout(&self) -> &PageLayout {
        &self.layout
    }

    /// Pages in all (`None`: no limit).
    pub fn total_pages(&self) -> Option<usize> {
        self.capacity
    }

    /// Pages held by caches.
    pub fn used_pages(&self) -> usize {
        self.state().used
    }

    /// Pages that can still be handed out (`usize::MAX` without a limit).
    pub fn free_pages(&self) -> usize {
        self.capacity.map_or(usize::MAX, |c| c.saturating_sub(self.used_pages()))
    }

    /// A page, if the pool has one left.
    fn take(&self) -> Option<Arc<Page>> {
        let mut state = self.state();
        if self.capacity.is_some_and(|c| state.used >= c) {
            return None;
        }
        state.used += 1;
        let data = state.free.pop();
        drop(state);
        let data = data.unwrap_or_else(|| self.layout.new_page());
        Some(Arc::new(Page { data, pool: self.state.clone() }))
    }

    fn full_error(&self) -> Error {
        Error::InvalidArgument(format!(
            "the latent cache's page pool is full: {} pages of {} bytes are in use",
            self.used_pages(),
            self.layout.page_bytes()
        ))
    }
}

/// The latent cache of one sequence, for every layer: its pages, in token order.
#[derive(Debug)]
pub struct LatentCache {
    pool: PagePool,
    /// The block table: page `i` holds tokens `i·PAGE_ROWS..(i+1)·PAGE_ROWS`. Pages past the rows
    /// held are room already taken ([`LatentCache::reserve`]).
    pages: Vec<Arc<Page>>,
    /// Rows written per layer (they differ only in the middle of a forward).
    lens: Vec<usize>,
    device: Device,
}

impl Clone for LatentCache {
    /// A cache sharing every page with this one (each is copied when either writes it).
    fn clone(&self) -> Self {
        LatentCache {
            pool: self.pool.clone(),
            pages: self.pages.clone(),
            lens: self.lens.clone(),
            device: self.device.clone(),
        }
    }
}

impl LatentCache {
    /// An empty cache for `cfg` holding rows in `dtype`, with a pool of its own.
    pub fn new(cfg: &Config, dtype: DType, device: &Device) -> Result<LatentCache> {
        LatentCache::with_kind(cfg, CacheKind::Dense(dtype), device)
    }

    /// An empty cache for `cfg` of the given kind, with a pool of its own (no limit).
    pub fn with_kind(cfg: &Config, kind: CacheKind, device: &Device) -> Result<LatentCache> {
        Ok(LatentCache::in_pool(&PagePool::new(PageLayout::new(cfg, kind)?, None), device))
    }

    /// An empty cache whose pages come from `pool`.
    pub fn in_pool(pool: &PagePool, device: &Device) -> LatentCache {
        LatentCache { pool: pool.clone(), pages: Vec::new(), lens: vec![0; pool.layout.layers], device: device.clone() }
    }

    /// How the rows are stored.
    pub fn kind(&self) -> CacheKind {
        self.pool.layout.kind
    }

    /// The pool its pages come from.
    pub fn pool(&self) -> &PagePool {
        &self.pool
    }

    /// Tokens cached (the position the next token will take).
    pub fn len(&self) -> usize {
        self.lens.first().copied().unwrap_or(0)
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes one token occupies across all layers: `n_layers * (d_c + d_r) * dtype size`, or
    /// the codes and scales of an int8 cache.
    pub fn bytes_per_token(&self) -> usize {
        self.pool.layout.bytes_per_token()
    }

    /// Pages held, the room past the rows included.
    /// Rows of `layer` (0 for a layer the cache does not have).
    pub fn layer_len(&self, layer: usize) -> usize {
        self.lens.get(layer).copied().unwrap_or(0)
    }

    /// Rows the cache has room for without taking another page.
    pub fn capacity(&self) -> usize {
        self.pages.len() * PAGE_ROWS
    }

    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    /// The `i`-th page of the block table (shared with the caller).
    pub fn page(&self, i: usize) -> Option<Arc<Page>> {
        self.pages.get(i).cloned()
    }

    /// A cache of the first `len` rows held in `pages` (taken from `pool`, shared with whoever
    /// else holds them): what a prefix kept for later requests becomes again.
    pub fn from_pages(pool: &PagePool, pages: Vec<Arc<Page>>, len: usize, device: &Device) -> Result<LatentCache> {
        if len > pages.len() * PAGE_ROWS {
            return Err(Error::internal(format!("{len} rows do not fit {} pages", pages.len())));
        }
        let mut cache = LatentCache::in_pool(pool, device);
        cache.pages = pages;
        cache.lens.iter_mut().for_each(|l| *l = len);
        Ok(cache)
    }

    /// Forgets every token, keeping the pages.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keeps only the first `len` tokens (a no-op if fewer are cached); the pages stay.
    pub fn truncate(&mut self, len: usize) {
        self.lens.iter_mut().for_each(|l| *l = (*l).min(len));
    }

    /// Returns the pages past the rows held to the pool.
    pub fn shrink(&mut self) {
        let keep = self.len().div_ceil(PAGE_ROWS);
        self.pages.truncate(keep);
    }

    /// Pages the cache must take from its pool to hold `tokens` tokens: new pages, and copies of
    /// shared ones it would write.
    pub fn pages_needed(&self, tokens: usize) -> usize {
        let from = self.len() / PAGE_ROWS;
        let to = tokens.div_ceil(PAGE_ROWS);
        let copies = (from..to.min(self.pages.len())).filter(|&i| Arc::strong_count(&self.pages[i]) > 1).count();
        to.saturating_sub(self.pages.len()) + copies
    }

    /// Makes room for `tokens` tokens in every layer, so that writing them takes nothing from the
    /// pool and allocates nothing: the pages they need, and a copy of each shared page among
    /// them. Fails, keeping what it took, when the pool runs out.
    pub fn reserve(&mut self, tokens: usize) -> Result<()> {
        let to = tokens.div_ceil(PAGE_ROWS);
        for i in self.len() / PAGE_ROWS..to.min(self.pages.len()) {
            self.own(i)?;
        }
        while self.pages.len() < to {
            let page = self.pool.take().ok_or_else(|| self.pool.full_error())?;
            self.pages.push(page);
        }
        Ok(())
    }

    /// Makes page `i` this cache's alone, copying it if it is shared.
    fn own(&mut self, i: usize) -> Result<&mut Page> {
        if Arc::get_mut(&mut self.pages[i]).is_none() {
            let mut copy = self.pool.take().ok_or_else(|| self.pool.full_error())?;
            if let Some(fresh) = Arc::get_mut(&mut copy) {
                fresh.data.clone_from(&self.pages[i].data);
            }
            // The shared page stays with its other holders.
            self.pages[i] = copy;
        }
        Arc::get_mut(&mut self.pages[i]).ok_or_else(|| Error::internal("a page copied on write is still shared"))
    }

    /// Writes the next row of `layer`, taking a page from the pool if it needs one.
    fn write_row(&mut self, layer: usize, c: &[f32], r: &[f32], k: &[f32]) -> Result<()> {
        let layout = self.pool.layout;
        if c.len() != layout.d_c || r.len() != layout.d_r || k.len() != layout.d_i {
            return Err(Error::InvalidArgument(format!(
                "a latent cache row is {} + {} values and an indexer key of {}, got {} + {} and {}",
                layout.d_c,
                layout.d_r,
                layout.d_i,
                c.len(),
                r.len(),
                k.len()
            )));
        }
        let Some(&row) = self.lens.get(layer) else {
            return Err(Error::InvalidArgument(format!("the latent cache has no layer {layer}")));
        };
        let i = row / PAGE_ROWS;
        if i >= self.pages.len() {
            self.reserve((i + 1) * PAGE_ROWS)?;
        }
        self.own(i)?.write(&layout, layer, row % PAGE_ROWS, c, r, k);
        self.lens[layer] += 1;
        Ok(())
    }

    fn rows_f32(&self, layer: usize) -> (Vec<f32>, Vec<f32>) {
        let layout = &self.pool.layout;
        let len = self.lens.get(layer).copied().unwrap_or(0);
        let (mut c, mut r) = (Vec::with_capacity(len * layout.d_c), Vec::with_capacity(len * layout.d_r));
        for (i, page) in self.pages.iter().enumerate().take(len.div_ceil(PAGE_ROWS)) {
            page.read_f32(layout, layer, PAGE_ROWS.min(len - i * PAGE_ROWS), &mut c, &mut r);
        }
        (c, r)
    }

    /// Appends `c_kv: (T, d_c)` and `k_rope: (T, d_r)` to `layer` (for an expanded cache, keys
    /// and values); returns all rows `(S, d_c)`, `(S, d_r)` in the cache's dtype: the prefill
    /// attention's operands (a copy of the pages).
    pub fn append(&mut self, layer: usize, c_kv: &Tensor, k_rope: &Tensor) -> Result<(Tensor, Tensor)> {
        let (kind, d_c, d_r) = (self.kind(), self.pool.layout.d_c, self.pool.layout.d_r);
        if kind.dtype().is_none() {
            return Err(Error::InvalidArgument("an int8 latent cache takes rows through append_int8".into()));
        }
        let t = c_kv.dim(0)?;
        if k_rope.dims() != [t, d_r] || c_kv.dims() != [t, d_c] {
            return Err(Error::InvalidArgument(format!(
                "latent cache rows are ({t}, {d_c}) and ({t}, {d_r}), got {:?} and {:?}",
                c_kv.dims(),
                k_rope.dims()
            )));
        }
        self.append_rows(layer, c_kv, k_rope, None)?;
        self.layer_rows(layer)
    }

    /// Every row of `layer` of a float cache, `(S, d_c)` and `(S, d_r)` in the cache's dtype.
    pub fn layer_rows(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let (d_c, d_r) = (self.pool.layout.d_c, self.pool.layout.d_r);
        let Some(dtype) = self.kind().dtype() else {
            return Err(Error::InvalidArgument("an int8 latent cache's rows are read by dequantized".into()));
        };
        let (c, r) = self.rows_f32(layer);
        let s = c.len() / d_c.max(1);
        let c = Tensor::from_vec(c, (s, d_c), &self.device)?.to_dtype(dtype)?;
        let r = Tensor::from_vec(r, (s, d_r), &self.device)?.to_dtype(dtype)?;
        Ok((c, r))
    }

    fn append_rows(&mut self, layer: usize, c_kv: &Tensor, k_rope: &Tensor, keys: Option<&Tensor>) -> Result<()> {
        let (d_c, d_r, d_i) = (self.pool.layout.d_c, self.pool.layout.d_r, self.pool.layout.d_i);
        let dtype = self.kind().dtype().unwrap_or(DType::F32);
        let as_rows = |t: &Tensor, dtype: DType| -> Result<Vec<f32>> {
            Ok(t.to_dtype(dtype)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let (c, r) = (as_rows(c_kv, dtype)?, as_rows(k_rope, dtype)?);
        let n = c.len() / d_c.max(1);
        let k = match keys {
            Some(keys) => as_rows(keys, self.pool.layout.index_dtype())?,
            None => Vec::new(),
        };
        if k.len() != n * d_i {
            return Err(Error::InvalidArgument(format!(
                "{n} latent cache rows need {} indexer key values, got {}",
                n * d_i,
                k.len()
            )));
        }
        self.reserve(self.lens.get(layer).copied().unwrap_or(0) + n)?;
        for (i, (c, r)) in c.chunks_exact(d_c).zip(r.chunks_exact(d_r)).enumerate() {
            self.write_row(layer, c, r, &k[i * d_i..(i + 1) * d_i])?;
        }
        Ok(())
    }

    /// Appends `t` rows with their indexer keys `keys (T, d_i)` to `layer` (a cache with
    /// [`PageLayout::d_i`] > 0, float or int8 rows: int8 rows take `kv_a_layernorm`'s output
    /// without its gain, as [`LatentCache::append_int8`] says).
    pub fn append_indexed(&mut self, layer: usize, c_kv: &Tensor, k_rope: &Tensor, keys: &Tensor) -> Result<()> {
        self.append_rows(layer, c_kv, k_rope, Some(keys))
    }

    /// Appends one row and its indexer key (`d_i` values) to `layer`.
    pub fn push_row_indexed(&mut self, layer: usize, c: &[f32], r: &[f32], k: &[f32]) -> Result<()> {
        self.write_row(layer, c, r, k)
    }

    pub fn push_row(&mut self, layer: usize, c: &[f32], r: &[f32]) -> Result<()> {
        self.write_row(layer, c, r, &[])
    }

    /// Runs `f` on the cached rows of a float `layer` (latent or expanded), page by page as
    /// stored. `None` for an int8 cache, or rows neither bf16 nor f32.
    pub(crate) fn with_dense_rows<R>(&self, layer: usize, f: impl FnOnce(DenseRows<'_>) -> R) -> Option<R> {
        let len = *self.lens.get(layer)?;
        let layout = &self.pool.layout;
        let (pages, d_c, d_r) = (&self.pages[..], layout.d_c, layout.d_r);
        match layout.kind.dtype() {
            Some(DType::BF16) => {
                Some(f(DenseRows::Bf16(&LayerPages { pages, layer, len, d_c, d_r, get: bf16_slices })))
            }
            Some(DType::F32) => Some(f(DenseRows::F32(&LayerPages { pages, layer, len, d_c, d_r, get: f32_slices }))),
            _ => None,
        }
    }

    /// Appends to an int8 cache's `layer` the normalized latents `c_hat: (T, d_c)` (before
    /// `kv_a_layernorm`'s gain) and `k_rope: (T, d_r)`.
    pub fn append_int8(&mut self, layer: usize, c_hat: &Tensor, k_rope: &Tensor) -> Result<()> {
        if self.kind() != CacheKind::Int8 {
            return Err(Error::InvalidArgument(format!("layer {layer} has no int8 latent cache")));
        }
        self.append_rows(layer, c_hat, k_rope, None)
    }

    /// The indexer keys of `layer` (a cache with [`PageLayout::d_i`] > 0), page by page where they
    /// lie; `None` for a layer the cache does not have.
    pub(crate) fn with_index_keys<R>(&self, layer: usize, f: impl FnOnce(IndexRows<'_>) -> R) -> Option<R> {
        let len = *self.lens.get(layer)?;
        let (pages, d_i) = (&self.pages[..], self.pool.layout.d_i);
        match self.pool.layout.index_dtype() {
            DType::F32 => Some(f(IndexRows::F32(&LayerKeys { pages, layer, len, d_i, get: f32_keys }))),
            _ => Some(f(IndexRows::Bf16(&LayerKeys { pages, layer, len, d_i, get: bf16_keys }))),
        }
    }

    /// Copies rows `indices` (each below the layer's length) of `layer` into `out`, in the cache's
    /// format (f16 rows widened to f32): what sparse attention reads, one selection's worth.
    pub(crate) fn gather<'g>(&self, layer: usize, indices: &[u32], out: &'g mut Gathered) -> Result<GatheredRows<'g>> {
        let len = self.lens.get(layer).copied().unwrap_or(0);
        if let Some(&bad) = indices.iter().find(|&&i| i as usize >= len) {
            return Err(Error::internal(format!("row {bad} of layer {layer} is past the {len} cached")));
        }
        let layout = self.pool.layout;
        let (d_c, d_r) = (layout.d_c, layout.d_r);
        let at = |i: u32| (&self.pages[i as usize / PAGE_ROWS].data.rows, layer * PAGE_ROWS + i as usize % PAGE_ROWS);
        let mismatch = || Error::internal("a page of the cache is not in the cache's format");
        match layout.kind {
            CacheKind::Dense(DType::BF16) => {
                let (c, r) = &mut out.bf16;
                c.clear();
                r.clear();
                for &i in indices {
                    let (page, row) = at(i);
                    let Rows::Bf16(pc, pr) = page else { return Err(mismatch()) };
                    c.extend_from_slice(&pc[row * d_c..(row + 1) * d_c]);
                    r.extend_from_slice(&pr[row * d_r..(row + 1) * d_r]);
                }
                Ok(GatheredRows::Bf16(c, r))
            }
            CacheKind::Int8 => {
                let l = layout.int8().ok_or_else(mismatch)?;
                let rows = out.int8.get_or_insert_with(|| Int8Rows::new(l.d_c, l.d_r).expect("a valid int8 layout"));
                if rows.layout() != l {
                    *rows = Int8Rows::new(l.d_c, l.d_r).ok_or_else(mismatch)?;
                }
                rows.truncate(0);
                for &i in indices {
                    let tile = layer * GROUP_TILES + (i as usize % PAGE_ROWS) / TILE_ROWS;
                    match &self.pages[i as usize / PAGE_ROWS].data.rows {
                        Rows::Int8(codes, scales) => rows.push_copy(
                            (&codes[tile * l.tile_codes()..], &scales[tile * l.tile_scales()..]),
                            i as usize % TILE_ROWS,
                        ),
                        _ => return Err(mismatch()),
                    }
                }
                Ok(GatheredRows::Int8(rows))
            }
            CacheKind::Dense(_) | CacheKind::Expanded(_) => {
                let (c, r) = &mut out.f32;
                c.clear();
                r.clear();
                for &i in indices {
                    let (page, row) = at(i);
                    let (cs, rs) = (row * d_c..(row + 1) * d_c, row * d_r..(row + 1) * d_r);
                    match page {
                        Rows::F32(pc, pr) => {
                            c.extend_from_slice(&pc[cs]);
                            r.extend_from_slice(&pr[rs]);
                        }
                        Rows::F16(pc, pr) => {
                            c.extend(pc[cs].iter().map(|v| v.to_f32()));
                            r.extend(pr[rs].iter().map(|v| v.to_f32()));
                        }
                        Rows::Bf16(pc, pr) => {
                            c.extend(pc[cs].iter().map(|v| v.to_f32()));
                            r.extend(pr[rs].iter().map(|v| v.to_f32()));
                        }
                        Rows::Int8(..) => return Err(mismatch()),
                    }
                }
                Ok(GatheredRows::F32(c, r))
            }
        }
    }

    /// An int8 cache's rows of `layer`, tile by tile where they lie.
    pub fn int8_rows(&self, layer: usize) -> Option<Int8Pages<'_>> {
        let layout = self.pool.layout.int8()?;
        let len = *self.lens.get(layer)?;
        Some(Int8Pages { pages: &self.pages, layer, len, layout })
    }

    /// An int8 cache's rows of `layer` dequantized: `(S, d_c)` normalized latents and `(S, d_r)`, f32.
    pub fn dequantized(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let rows = self
            .int8_rows(layer)
            .ok_or_else(|| Error::InvalidArgument(format!("layer {layer} has no int8 latent cache")))?;
        let (c, r) = rows.dequantize();
        let (s, l) = (rows.len(), rows.layout());
        Ok((Tensor::from_vec(c, (s, l.d_c), &self.device)?, Tensor::from_vec(r, (s, l.d_r), &self.device)?))
    }
}

/// A dense layer's rows page by page, in the dtype they are stored in.
/// One layer's indexer keys, in the format the cache keeps them.
pub(crate) enum IndexRows<'a> {
    Bf16(&'a dyn KeyPages<half::bf16>),
    F32(&'a dyn KeyPages<f32>),
}

type KeySlice<W> = fn(&Page) -> Option<&[W]>;

struct LayerKeys<'a, W> {
    pages: &'a [Arc<Page>],
    layer: usize,
    len: usize,
    d_i: usize,
    get: KeySlice<W>,
}

fn bf16_keys(p: &Page) -> Option<&[half::bf16]> {
    match &p.data.index {
        IndexKeys::Bf16(k) => Some(k),
        IndexKeys::F32(_) => None,
    }
}

fn f32_keys(p: &Page) -> Option<&[f32]> {
    match &p.data.index {
        IndexKeys::F32(k) => Some(k),
        IndexKeys::Bf16(_) => None,
    }
}

impl<W: Sync> KeyPages<W> for LayerKeys<'_, W> {
    fn len(&self) -> usize {
        self.len
    }

    fn page(&self, i: usize) -> &[W] {
        let n = PAGE_ROWS.min(self.len - i * PAGE_ROWS);
        let first = self.layer * PAGE_ROWS * self.d_i;
        match (self.get)(&self.pages[i]) {
            Some(k) => &k[first..first + n * self.d_i],
            None => unreachable!("every page of a cache keeps its keys in the cache's index format"),
        }
    }
}

/// Where [`LatentCache::gather`] copies rows to, kept from step to step.
#[derive(Default)]
pub(crate) struct Gathered {
    bf16: (Vec<half::bf16>, Vec<half::bf16>),
    f32: (Vec<f32>, Vec<f32>),
    int8: Option<Int8Rows>,
}

/// Rows [`LatentCache::gather`] copied: latents and RoPE keys, row-major, or int8 tiles.
pub(crate) enum GatheredRows<'a> {
    Bf16(&'a [half::bf16], &'a [half::bf16]),
    F32(&'a [f32], &'a [f32]),
    Int8(&'a Int8Rows),
}

pub(crate) enum DenseRows<'a> {
    Bf16(&'a dyn DensePages<half::bf16>),
    F32(&'a dyn DensePages<f32>),
}

/// A page's latents and RoPE keys, if they are `W`.
type Slices<W> = fn(&Page) -> Option<(&[W], &[W])>;

/// One layer's rows in a cache's pages.
struct LayerPages<'a, W> {
    pages: &'a [Arc<Page>],
    layer: usize,
    len: usize,
    d_c: usize,
    d_r: usize,
    /// The page's values, if they are `W`.
    get: Slices<W>,
}

fn bf16_slices(p: &Page) -> Option<(&[half::bf16], &[half::bf16])> {
    match &p.data.rows {
        Rows::Bf16(c, r) => Some((c, r)),
        _ => None,
    }
}

fn f32_slices(p: &Page) -> Option<(&[f32], &[f32])> {
    match &p.data.rows {
        Rows::F32(c, r) => Some((c, r)),
        _ => None,
    }
}

impl<W: Sync> DensePages<W> for LayerPages<'_, W> {
    fn len(&self) -> usize {
        self.len
    }

    fn page(&self, i: usize) -> (&[W], &[W]) {
        let n = PAGE_ROWS.min(self.len - i * PAGE_ROWS);
        let first = self.layer * PAGE_ROWS;
        match (self.get)(&self.pages[i]) {
            Some((c, r)) => {
                (&c[first * self.d_c..(first + n) * self.d_c], &r[first * self.d_r..(first + n) * self.d_r])
            }
            None => unreachable!("every page of a cache has the cache's format"),
        }
    }
}

/// One layer's int8 rows in a cache's pages: a page's 64 rows are the layer's 4 tiles there.
pub struct Int8Pages<'a> {
    pages: &'a [Arc<Page>],
    layer: usize,
    len: usize,
    layout: Int8Layout,
}

impl Int8Tiles for Int8Pages<'_> {
    fn layout(&self) -> Int8Layout {
        self.layout
    }

    fn len(&self) -> usize {
        self.len
    }

    fn tile(&self, t: usize) -> (&[u8], &[f32]) {
        let l = self.layout;
        let (page, first) = (t / GROUP_TILES, self.layer * GROUP_TILES + t % GROUP_TILES);
        let end = (self.layer + 1) * GROUP_TILES;
        match &self.pages[page].data.rows {
            Rows::Int8(codes, scales) => (
                &codes[first * l.tile_codes()..end * l.tile_codes()],
                &scales[first * l.tile_scales()..end * l.tile_scales()],
            ),
            _ => unreachable!("every page of an int8 cache holds codes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(first: usize, n: usize, width: usize) -> Tensor {
        let values: Vec<f32> = (first * width..(first + n) * width).map(|v| v as f32).collect();
        Tensor::from_vec(values, (n, width), &Device::Cpu).unwrap()
    }

    fn layout() -> PageLayout {
        PageLayout::of(CacheKind::Dense(DType::F32), 2, 8, 4).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn rows_survive_reserving_and_crossing_pages() {
        let pool = PagePool::new(layout(), None);
        let mut cache = LatentCache::in_pool(&pool, &Device::Cpu);
        cache.append(0, &rows(0, 3, 8), &rows(0, 3, 4)).unwrap();
        assert_eq!(cache.pages(), 1);
        cache.reserve(200).unwrap();
        assert_eq!((cache.pages(), pool.used_pages()), (4, 4), "pages for 200 tokens, taken once");
        let (c, r) = cache.append(0, &rows(3, 198, 8), &rows(3, 198, 4)).unwrap();
        assert_eq!(cache.pages(), 4, "writes within the room take no page");
        assert_eq!((values(&c), values(&r)), (values(&rows(0, 201, 8)), values(&rows(0, 201, 4))));
        // Past the room, a page at a time; layer 1 is untouched.
        cache.append(0, &rows(201, 56, 8), &rows(201, 56, 4)).unwrap();
        assert_eq!(cache.pages(), 5);
        let (c1, _) = cache.append(1, &rows(0, 1, 8), &rows(0, 1, 4)).unwrap();
        assert_eq!(values(&c1), values(&rows(0, 1, 8)));
        drop(cache);
        assert_eq!(pool.used_pages(), 0, "a dropped cache gives its pages back");
    }

    #[test]
    fn shared_pages_are_copied_on_write_and_freed_by_their_last_holder() {
        let pool = PagePool::with_pages(layout(), 4);
        let mut a = LatentCache::in_pool(&pool, &Device::Cpu);
        a.append(0, &rows(0, 70, 8), &rows(0, 70, 4)).unwrap(); // pages 0 and 1 (6 rows)
        a.append(1, &rows(0, 70, 8), &rows(0, 70, 4)).unwrap();
        let mut b = a.clone();
        assert_eq!(pool.used_pages(), 2, "a fork shares every page");
        assert_eq!(b.pages_needed(71), 1, "writing row 70 copies the shared page 1");
        assert_eq!(b.pages_needed(128), 1);
        assert_eq!(b.pages_needed(129), 2);
        b.truncate(69);
        b.append(0, &rows(1000, 1, 8), &rows(1000, 1, 4)).unwrap();
        assert_eq!(pool.used_pages(), 3, "b's second page is its own copy now");
        let (ca, _) = a.append(0, &rows(70, 1, 8), &rows(70, 1, 4)).unwrap();
        assert_eq!(values(&ca), values(&rows(0, 71, 8)), "a's rows did not change");
        let (cb, _) = b.append(0, &rows(1001, 1, 8), &rows(1001, 1, 4)).unwrap();
        let mut want = values(&rows(0, 69, 8));
        want.extend(values(&rows(1000, 2, 8)));
        assert_eq!(values(&cb), want);
        // The pool is bounded: 4 pages in all.
        let mut c = LatentCache::in_pool(&pool, &Device::Cpu);
        assert!(c.reserve(64).is_ok());
        assert!(c.reserve(128).is_err(), "a fifth page is refused");
        drop(a);
        assert_eq!(pool.used_pages(), 3, "page 0 is still b's");
        drop(b);
        drop(c);
        assert_eq!((pool.used_pages(), pool.free_pages()), (0, 4));
    }

    /// Rows `0..n` of `width` pseudo-random values.
    fn random_rows(n: usize, width: usize, seed: u64) -> Tensor {
        let v = crate::kernels::matvec::tests::random(n * width, seed);
        Tensor::from_vec(v, (n, width), &Device::Cpu).unwrap()
    }

    #[test]
    fn paged_attention_equals_contiguous_attention() {
        use crate::kernels::latent_int8::{mla_decode_int8, Int8Rows};
        use crate::kernels::mla_decode::{mla_decode_into, mla_decode_paged_into, MlaScratch, MlaShape};
        let (heads, d_c, d_r, n) = (4, 64, 16, 300);
        let (c, r) = (random_rows(n, d_c, 1), random_rows(n, d_r, 2));
        let q_lat = crate::kernels::matvec::tests::random(heads * d_c, 3);
        let q_rope = crate::kernels::matvec::tests::random(heads * d_r, 4);
        for dtype in [DType::BF16, DType::F32] {
            // Two caches filled a page at a time in turn: their pages interleave in memory.
            let pool = PagePool::new(PageLayout::of(CacheKind::Dense(dtype), 2, d_c, d_r).unwrap(), None);
            let (mut a, mut other) =
                (LatentCache::in_pool(&pool, &Device::Cpu), LatentCache::in_pool(&pool, &Device::Cpu));
            for p in (0..n).step_by(PAGE_ROWS) {
                let m = PAGE_ROWS.min(n - p);
                a.append(1, &c.narrow(0, p, m).unwrap(), &r.narrow(0, p, m).unwrap()).unwrap();
                other.append(1, &c.narrow(0, 0, m).unwrap(), &r.narrow(0, 0, m).unwrap()).unwrap();
            }
            let shape = MlaShape { heads, d_c, d_r, len: n };
            let mut paged = vec![0f32; heads * d_c];
            a.with_dense_rows(1, |rows| match rows {
                DenseRows::Bf16(rows) => {
                    mla_decode_paged_into(&q_lat, &q_rope, rows, shape, 0.2, &mut MlaScratch::default(), &mut paged)
                }
                DenseRows::F32(rows) => {
                    mla_decode_paged_into(&q_lat, &q_rope, rows, shape, 0.2, &mut MlaScratch::default(), &mut paged)
                }
            })
            .unwrap();
            let mut contiguous = vec![0f32; heads * d_c];
            let (cc, rc) = (c.to_dtype(dtype).unwrap(), r.to_dtype(dtype).unwrap());
            match dtype {
                DType::BF16 => {
                    let (cv, rv) = (
                        cc.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
                        rc.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
                    );
                    mla_decode_into(&q_lat, &q_rope, &cv, &rv, shape, 0.2, &mut MlaScratch::default(), &mut contiguous);
                }
                _ => {
                    let (cv, rv) = (values(&cc), values(&rc));
                    mla_decode_into(&q_lat, &q_rope, &cv, &rv, shape, 0.2, &mut MlaScratch::default(), &mut contiguous);
                }
            }
            assert_eq!(paged, contiguous, "{dtype:?}: the same rows, read where they lie");
        }
        // The 8-bit rows: pages of 4 tiles against one growable buffer.
        let pool = PagePool::new(PageLayout::of(CacheKind::Int8, 2, d_c, d_r).unwrap(), None);
        let (mut a, mut other) = (LatentCache::in_pool(&pool, &Device::Cpu), LatentCache::in_pool(&pool, &Device::Cpu));
        let mut one = Int8Rows::new(d_c, d_r).unwrap();
        let (cv, rv) = (values(&c), values(&r));
        for p in (0..n).step_by(PAGE_ROWS) {
            let m = PAGE_ROWS.min(n - p);
            a.append_int8(0, &c.narrow(0, p, m).unwrap(), &r.narrow(0, p, m).unwrap()).unwrap();
            other.append_int8(0, &c.narrow(0, 0, m).unwrap(), &r.narrow(0, 0, m).unwrap()).unwrap();
        }
        for s in 0..n {
            one.push(&cv[s * d_c..(s + 1) * d_c], &rv[s * d_r..(s + 1) * d_r]);
        }
        let paged = mla_decode_int8(&q_lat, &q_rope, &a.int8_rows(0).unwrap(), heads, 0.2);
        assert_eq!(paged, mla_decode_int8(&q_lat, &q_rope, &one, heads, 0.2), "int8");
    }

    #[test]
    fn int8_pages_round_trip_within_their_quantization() {
        let layout = PageLayout::of(CacheKind::Int8, 2, 8, 4).unwrap();
        let pool = PagePool::new(layout, None);
        let mut cache = LatentCache::in_pool(&pool, &Device::Cpu);
        let (c, r) = (rows(0, 100, 8), rows(0, 100, 4));
        cache.append_int8(1, &c, &r).unwrap();
        let (gc, gr) = cache.dequantized(1).unwrap();
        for (want, got, width) in [(values(&c), values(&gc), 8), (values(&r), values(&gr), 4)] {
            for (row_w, row_g) in want.chunks(width).zip(got.chunks(width)) {
                let amax = row_w.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (w, g) in row_w.iter().zip(row_g) {
                    assert!((w - g).abs() <= amax / 127.0, "{g} vs {w}");
                }
            }
        }
        assert_eq!(cache.int8_rows(0).unwrap().len(), 0, "layer 0 holds nothing yet");
    }
}
