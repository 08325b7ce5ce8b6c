//! The 8-bit latent cache and the absorbed MLA decode attention over it.
//!
//! A cached row is `d_c` latents and the `d_r` rotated RoPE key. Here each is stored as 8-bit
//! codes with one f32 scale per block of up to [`SCALE_BLOCK`] latents, and one for the RoPE part:
//! 596 bytes a row at V2's sizes (512 + 64), against 1152 in bf16. DeepSeek's FP8 cache for V3.2
//! scales per 128 latents too. The latents are cached before `kv_a_layernorm`'s gain: the caller
//! folds the gain into the query and the output, so the codes see only the normalized values,
//! not a gain that may differ a lot from channel to channel.
//!
//! Rows are kept in tiles of 16 laid out as the weight tiles are ([`super::tiles`]): word `w`
//! (4 codes) of row `r` at word `16·w + r`, codes stored plus 128. Decode then needs no
//! horizontal sum:
//!
//! - **Scores**: one `vpdpbusd` of a tile's word `w` against a head's 4 query codes (broadcast)
//!   adds 4 products to each of the 16 rows' lanes. Queries are quantized to 8 bits per head and
//!   block, as llama.cpp quantizes activations; the codes' offset of 128 comes back off through
//!   the query's code sums. Each block's integer sums are scaled once per 16 rows.
//! - **Weighted sum**: one byte shuffle turns a tile word into 4 latents × 4 rows per 128-bit
//!   lane, so `vpdpbusd` against 4 rows' probabilities adds 4 rows' share to each latent's lane.
//!   The probabilities, times each row's scale, are quantized to 8 bits per head, block and run
//!   of [`RUN_TILES`] tiles (relative to the run's largest); the sums stay integers through the
//!   run.
//!
//! Both products do 64 multiply-adds per instruction, twice `vdpbf16ps`, and the cache is half as
//! many bytes. CPUs without AVX-512 VNNI run the same runs and online softmax in f32, each run's
//! rows dequantized in cache.

use rayon::prelude::*;

use super::mla_decode::MlaShape;
use super::Simd;

/// Rows per tile: one per 32-bit lane of an AVX-512 register.
pub const TILE_ROWS: usize = 16;
/// Latents per scale.
pub const SCALE_BLOCK: usize = 128;
/// Tiles per step of the online softmax: 256 rows.
pub const RUN_TILES: usize = 16;

/// Quantizes `get(i)` for `i` in `values` to codes of ±127 over their largest magnitude, handing
/// each to `put`; returns the scale (0 for a block of zeros).
fn quantize_block(get: impl Fn(usize) -> f32, values: std::ops::Range<usize>, mut put: impl FnMut(usize, i8)) -> f32 {
    let amax = values.clone().map(|i| get(i).abs()).fold(0f32, f32::max);
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for i in values {
        put(i, (get(i) * inv).round().clamp(-127.0, 127.0) as i8);
    }
    scale
}

/// The sizes of a row in the 8-bit format, and the format's arithmetic: where each code and
/// scale of a tile lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Int8Layout {
    pub d_c: usize,
    pub d_r: usize,
}

impl Int8Layout {
    /// Rows of `d_c` latents and `d_r` RoPE values; both must be positive multiples of 4 (a code
    /// word).
    pub fn new(d_c: usize, d_r: usize) -> Option<Int8Layout> {
        (d_c.is_multiple_of(4) && d_r.is_multiple_of(4) && d_c > 0 && d_r > 0).then_some(Int8Layout { d_c, d_r })
    }

    /// Code words per row.
    pub(crate) fn words(&self) -> usize {
        (self.d_c + self.d_r) / 4
    }

    /// Scale blocks of the latents.
    pub(crate) fn latent_blocks(&self) -> usize {
        self.d_c.div_ceil(SCALE_BLOCK)
    }

    /// Scale blocks per row: the latents', then the RoPE part's.
    pub(crate) fn blocks(&self) -> usize {
        self.latent_blocks() + 1
    }

    /// The values of block `b`.
    pub(crate) fn block_values(&self, b: usize) -> std::ops::Range<usize> {
        if b < self.latent_blocks() {
            b * SCALE_BLOCK..((b + 1) * SCALE_BLOCK).min(self.d_c)
        } else {
            self.d_c..self.d_c + self.d_r
        }
    }

    /// Bytes one row takes: its codes and scales.
    pub fn bytes_per_row(&self) -> usize {
        self.d_c + self.d_r + 4 * self.blocks()
    }

    /// Code bytes of one tile.
    pub fn tile_codes(&self) -> usize {
        self.words() * 64
    }

    /// Scales of one tile.
    pub fn tile_scales(&self) -> usize {
        self.blocks() * TILE_ROWS
    }

    /// Writes row `row` of a tile, `codes` ([`Int8Layout::tile_codes`] bytes) and `scales`
    /// ([`Int8Layout::tile_scales`]): `c` (`d_c` latents) and `r` (`d_r` RoPE values).
    pub fn write_row(&self, codes: &mut [u8], scales: &mut [f32], row: usize, c: &[f32], r: &[f32]) {
        assert!(c.len() == self.d_c && r.len() == self.d_r && row < TILE_ROWS, "an int8 row's sizes disagree");
        let d_c = self.d_c;
        let get = |i: usize| if i < d_c { c[i] } else { r[i - d_c] };
        for b in 0..self.blocks() {
            let scale = quantize_block(get, self.block_values(b), |i, code| {
                codes[(i / 4) * 64 + 4 * row + i % 4] = (code as i32 + 128) as u8;
            });
            scales[b * TILE_ROWS + row] = scale;
        }
    }

    /// The first `n` rows of a tile dequantized into `c` (`n × d_c`) and `r` (`n × d_r`).
    pub fn dequantize_tile(&self, (codes, scales): (&[u8], &[f32]), n: usize, c: &mut [f32], r: &mut [f32]) {
        let (d_c, d_r, blocks) = (self.d_c, self.d_r, self.blocks());
        for (w, word) in codes[..self.tile_codes()].chunks_exact(64).enumerate() {
            let latent = 4 * w < d_c;
            let b = if latent { 4 * w / SCALE_BLOCK } else { blocks - 1 };
            let (out, width, at) = if latent { (&mut *c, d_c, 4 * w) } else { (&mut *r, d_r, 4 * w - d_c) };
            for (row, out) in out.chunks_exact_mut(width).take(n).enumerate() {
                let scale = scales[b * TILE_ROWS + row];
                for (k, v) in out[at..at + 4].iter_mut().enumerate() {
                    *v = (word[4 * row + k] as i32 - 128) as f32 * scale;
                }
            }
        }
    }
}

/// Tiles of a tile group, the unit that lies in one piece: a page of the paged cache.
pub const GROUP_TILES: usize = super::paged::PAGE_ROWS / TILE_ROWS;

/// One layer's cached rows in the 8-bit format, as the decode kernel reads them: tile by tile,
/// wherever the tiles lie. Tiles come in groups of [`GROUP_TILES`] that lie in one piece.
pub trait Int8Tiles: Sync {
    /// The rows' sizes.
    fn layout(&self) -> Int8Layout;

    /// Rows cached.
    fn len(&self) -> usize;

    /// Whether no row is cached.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tile `t`'s codes and scales, and those of the rest of its group after them:
    /// `(GROUP_TILES − t % GROUP_TILES)` tiles of [`Int8Layout::tile_codes`] bytes and of
    /// [`Int8Layout::tile_scales`] scales.
    fn tile(&self, t: usize) -> (&[u8], &[f32]);

    /// Every row dequantized: `(len, d_c)` and `(len, d_r)`, row-major; tiles in parallel.
    fn dequantize(&self) -> (Vec<f32>, Vec<f32>) {
        let l = self.layout();
        let (d_c, d_r) = (l.d_c, l.d_r);
        let (mut c, mut r) = (vec![0f32; self.len() * d_c], vec![0f32; self.len() * d_r]);
        c.par_chunks_mut(TILE_ROWS * d_c)
            .zip(r.par_chunks_mut(TILE_ROWS * d_r))
            .enumerate()
            .for_each(|(t, (c, r))| l.dequantize_tile(self.tile(t), c.len() / d_c, c, r));
        (c, r)
    }
}

/// One layer's cached rows in 8-bit codes, tiled, in one growable piece (the paged cache keeps
/// its tiles in pages instead).
#[derive(Debug, Clone)]
pub struct Int8Rows {
    layout: Int8Layout,
    /// Per tile, `words` rows of 64 bytes: word `w` of the tile's 16 rows, codes plus 128.
    codes: Vec<u8>,
    /// Per tile, `blocks` rows of 16 scales.
    scales: Vec<f32>,
    len: usize,
}

impl Int8Rows {
    /// An empty cache of rows with `d_c` latents and `d_r` RoPE values; both must be multiples
    /// of 4 (a code word).
    pub fn new(d_c: usize, d_r: usize) -> Option<Int8Rows> {
        Int8Layout::new(d_c, d_r).map(|layout| Int8Rows { layout, codes: Vec::new(), scales: Vec::new(), len: 0 })
    }

    /// Bytes one row takes: its codes and scales.
    pub fn bytes_per_row(&self) -> usize {
        self.layout.bytes_per_row()
    }

    /// Keeps the first `len` rows.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Appends one row: `c` (`d_c` latents) and `r` (`d_r` RoPE values).
    pub fn push(&mut self, c: &[f32], r: &[f32]) {
        let l = self.layout;
        let (tile, row) = self.grow();
        let codes = &mut self.codes[tile * l.tile_codes()..(tile + 1) * l.tile_codes()];
        let scales = &mut self.scales[tile * l.tile_scales()..(tile + 1) * l.tile_scales()];
        l.write_row(codes, scales, row, c, r);
        self.len += 1;
    }

    /// Appends a copy of row `row` of a tile, `(codes, scales)` as [`Int8Tiles::tile`] hands
    /// them out: its codes and scales as they are (sparse attention gathers the rows it selects
    /// this way, without quantizing them again).
    pub fn push_copy(&mut self, (codes, scales): (&[u8], &[f32]), row: usize) {
        let l = self.layout;
        let (tile, at) = self.grow();
        let dst = &mut self.codes[tile * l.tile_codes()..(tile + 1) * l.tile_codes()];
        for w in 0..l.words() {
            dst[w * 64 + 4 * at..][..4].copy_from_slice(&codes[w * 64 + 4 * row..][..4]);
        }
        let dst = &mut self.scales[tile * l.tile_scales()..(tile + 1) * l.tile_scales()];
        for b in 0..l.blocks() {
            dst[b * TILE_ROWS + at] = scales[b * TILE_ROWS + row];
        }
        self.len += 1;
    }

    /// Room for the next row: its tile and its row in the tile.
    fn grow(&mut self) -> (usize, usize) {
        let l = self.layout;
        let (tile, row) = (self.len / TILE_ROWS, self.len % TILE_ROWS);
        // Whole groups, so that a group's tiles lie in one piece; code 0 (stored as 128) in rows
        // not written yet.
        let groups = (tile / GROUP_TILES + 1).max(2 * self.codes.len() / (GROUP_TILES * l.tile_codes()));
        if self.codes.len() < (tile + 1) * l.tile_codes() {
            self.codes.resize(groups * GROUP_TILES * l.tile_codes(), 128);
            self.scales.resize(groups * GROUP_TILES * l.tile_scales(), 0.0);
        }
        (tile, row)
    }
}

impl Int8Tiles for Int8Rows {
    fn layout(&self) -> Int8Layout {
        self.layout
    }

    fn len(&self) -> usize {
        self.len
    }

    fn tile(&self, t: usize) -> (&[u8], &[f32]) {
        let end = (t / GROUP_TILES + 1) * GROUP_TILES;
        let l = self.layout;
        (
            &self.codes[t * l.tile_codes()..end * l.tile_codes()],
            &self.scales[t * l.tile_scales()..end * l.tile_scales()],
        )
    }
}

/// `o_lat (H, d_c)` for `q_lat (H, d_c)` and `q_rope (H, d_r)` over `rows` (as
/// [`super::mla_decode::mla_decode`] computes it over dequantized rows): the 8-bit kernel on CPUs
/// with AVX-512 VNNI, elsewhere the same runs dequantized to f32 one at a time ([`portable`]).
pub fn mla_decode_int8(q_lat: &[f32], q_rope: &[f32], rows: &dyn Int8Tiles, heads: usize, scale: f32) -> Vec<f32> {
    let mut out = vec![0f32; heads * rows.layout().d_c];
    mla_decode_int8_into(q_lat, q_rope, rows, heads, scale, &mut Int8Scratch::default(), &mut out);
    out
}

/// What [`mla_decode_int8_into`] keeps between steps: the quantized query and each share's
/// online softmax state and run buffers. Sized by the first step, reused by the next ones.
#[derive(Default)]
pub struct Int8Scratch {
    query: Query,
    #[cfg(target_arch = "x86_64")]
    vnni: Vec<vnni::Share>,
    portable: Vec<portable::Share>,
    q_lat: Vec<f32>,
    q_rope: Vec<f32>,
}

/// [`mla_decode_int8`] into `out (H, d_c)`, allocating nothing once `scratch` has seen a step of
/// this size.
pub fn mla_decode_int8_into(
    q_lat: &[f32],
    q_rope: &[f32],
    rows: &dyn Int8Tiles,
    heads: usize,
    scale: f32,
    scratch: &mut Int8Scratch,
    out: &mut [f32],
) {
    let l = rows.layout();
    let (d_c, d_r, len) = (l.d_c, l.d_r, rows.len());
    assert!(
        q_lat.len() == heads * d_c && q_rope.len() == heads * d_r && out.len() == heads * d_c && len > 0,
        "mla_decode_int8: shapes disagree"
    );
    scratch.query.fill(q_lat, q_rope, l, heads);
    #[cfg(target_arch = "x86_64")]
    if Simd::detect() == Simd::Avx512Vnni {
        return vnni::decode(&scratch.query, rows, heads, scale, &mut scratch.vnni, out);
    }
    // The same quantized queries, so that every CPU computes the same scores.
    scratch.query.dequantize_into(l, heads, &mut scratch.q_lat, &mut scratch.q_rope);
    portable::decode(&scratch.q_lat, &scratch.q_rope, rows, heads, scale, &mut scratch.portable, out)
}

/// Most shares a step's runs are split into (the merge keeps a factor per share on the stack).
const MAX_SHARES: usize = 64;

/// The factor `e^(m_k − m)` of each share's sums for a head whose shares' maxima are `maxima`
/// (0 for a share that saw no row), and the common maximum `m`.
fn share_factors(maxima: impl Iterator<Item = f32> + Clone) -> [f32; MAX_SHARES] {
    let m = maxima.clone().fold(f32::NEG_INFINITY, f32::max);
    let mut factors = [0f32; MAX_SHARES];
    for (f, mk) in factors.iter_mut().zip(maxima) {
        *f = if mk > f32::NEG_INFINITY { super::rows::exp(mk - m) } else { 0.0 };
    }
    factors
}

/// The decode attention for CPUs without AVX-512 VNNI: the same runs, shares and online softmax
/// as the 8-bit kernel, each run's rows dequantized to f32 (in the core's caches, never the whole
/// cache at once) and multiplied in f32, which the compiler vectorizes for AVX2 or AVX-512. The
/// probabilities stay f32.
mod portable {
    use rayon::prelude::*;

    use super::{share_factors, Int8Tiles, MAX_SHARES, RUN_TILES, TILE_ROWS};
    use crate::kernels::rows::exp;
    use crate::kernels::{dispatch, mul_add, reserve_to, reset, Simd, Widen};

    /// One share's online softmax: per head `m`, `l` and the `d_c` sums `o`.
    pub(crate) struct Partial {
        m: Vec<f32>,
        l: Vec<f32>,
        o: Vec<f32>,
    }

    /// One share's state and its run of rows in f32 (latents, RoPE parts, then per head the
    /// run's scores).
    pub(crate) struct Share {
        part: Partial,
        run: Vec<f32>,
    }

    /// One step's queries (dequantized from their codes), rows, heads and score scale.
    pub(crate) struct Step<'a> {
        q_lat: &'a [f32],
        q_rope: &'a [f32],
        rows: &'a dyn Int8Tiles,
        heads: usize,
        scale: f32,
    }

    pub fn decode(
        q_lat: &[f32],
        q_rope: &[f32],
        rows: &dyn Int8Tiles,
        heads: usize,
        scale: f32,
        shares: &mut Vec<Share>,
        out: &mut [f32],
    ) {
        let step = Step { q_lat, q_rope, rows, heads, scale };
        let l = rows.layout();
        let (d_c, len) = (l.d_c, rows.len());
        let tiles = len.div_ceil(TILE_ROWS);
        let runs = tiles.div_ceil(RUN_TILES);
        let most = (2 * rayon::current_num_threads()).clamp(1, MAX_SHARES);
        let n = runs.clamp(1, most);
        let simd = Simd::detect();
        let run = RUN_TILES * TILE_ROWS;
        // Every share the sequence will use once it is long, sized now (see `vnni::decode`).
        while shares.len() < most {
            let part = Partial { m: Vec::new(), l: Vec::new(), o: Vec::new() };
            shares.push(Share { part, run: Vec::new() });
        }
        for Share { part, run: buffer } in shares.iter_mut() {
            reserve_to(&mut part.m, heads);
            reserve_to(&mut part.l, heads);
            reserve_to(&mut part.o, heads * d_c);
            reserve_to(buffer, run * (l.d_c + l.d_r) + heads * run);
        }
        shares[..n].par_iter_mut().enumerate().for_each(|(k, share)| {
            let part = &mut share.part;
            reset(&mut part.m, heads, f32::NEG_INFINITY);
            reset(&mut part.l, heads, 0.0);
            reset(&mut part.o, heads * d_c, 0.0);
            share.run.resize(run * (l.d_c + l.d_r) + heads * run, 0.0);
            for r in runs * k / n..runs * (k + 1) / n {
                let first = r * RUN_TILES;
                let span = (first, ((r + 1) * RUN_TILES).min(tiles));
                absorb_run::<f32>(simd, &step, span, part, &mut share.run);
            }
        });
        let shares = &shares[..n];
        out.par_chunks_mut(d_c).enumerate().for_each(|(h, out)| {
            let factors = share_factors(shares.iter().map(|s| s.part.m[h]));
            out.fill(0.0);
            let mut l = 0f32;
            for (share, &f) in shares.iter().zip(&factors).filter(|(_, &f)| f > 0.0) {
                l += f * share.part.l[h];
                for (a, &b) in out.iter_mut().zip(&share.part.o[h * d_c..(h + 1) * d_c]) {
                    *a += f * b;
                }
            }
            out.iter_mut().for_each(|v| *v /= l);
        });
    }

    /// `Σ a·b` in 16 interleaved sums, so the loop vectorizes.
    #[inline(always)]
    fn dot<const FUSED: bool>(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for l in 0..16 {
                acc[l] = mul_add::<FUSED>(x[l], y[l], acc[l]);
            }
        }
        let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
        acc.iter().sum::<f32>() + tail
    }

    dispatch!(
        /// Adds tiles `span.0..span.1` of `rows` to `part` (see [`decode`]).
        absorb_run => absorb_run_body(step: &Step<'_>, span: (usize, usize), part: &mut Partial, scratch: &mut [f32])
    );

    // `dispatch!` passes an element type; the rows here are always codes.
    #[allow(clippy::extra_unused_type_parameters)]
    #[inline(always)]
    fn absorb_run_body<W: Widen, const FUSED: bool>(
        step: &Step<'_>,
        span: (usize, usize),
        part: &mut Partial,
        scratch: &mut [f32],
    ) {
        let Step { q_lat, q_rope, rows, heads, scale } = *step;
        let l = rows.layout();
        let (d_c, d_r) = (l.d_c, l.d_r);
        let n = (span.1 * TILE_ROWS).min(rows.len()) - span.0 * TILE_ROWS;
        let (c, rest) = scratch.split_at_mut(RUN_TILES * TILE_ROWS * d_c);
        let (r, p) = rest.split_at_mut(RUN_TILES * TILE_ROWS * d_r);
        // The run's rows in f32.
        for t in span.0..span.1 {
            let (first, m) = ((t - span.0) * TILE_ROWS, TILE_ROWS.min(n - (t - span.0) * TILE_ROWS));
            l.dequantize_tile(
                rows.tile(t),
                m,
                &mut c[first * d_c..(first + m) * d_c],
                &mut r[first * d_r..(first + m) * d_r],
            );
        }
        for h in 0..heads {
            let p = &mut p[h * RUN_TILES * TILE_ROWS..][..n];
            let (ql, qr) = (&q_lat[h * d_c..(h + 1) * d_c], &q_rope[h * d_r..(h + 1) * d_r]);
            for (i, s) in p.iter_mut().enumerate() {
                let content = dot::<FUSED>(ql, &c[i * d_c..(i + 1) * d_c]);
                *s = (content + dot::<FUSED>(qr, &r[i * d_r..(i + 1) * d_r])) * scale;
            }
            let m_new = p.iter().copied().fold(part.m[h], f32::max);
            let o = &mut part.o[h * d_c..(h + 1) * d_c];
            if m_new > part.m[h] && part.l[h] > 0.0 {
                let alpha = exp(part.m[h] - m_new);
                part.l[h] *= alpha;
                o.iter_mut().for_each(|v| *v *= alpha);
            }
            part.m[h] = m_new;
            for (i, s) in p.iter_mut().enumerate() {
                *s = exp(*s - m_new);
                part.l[h] += *s;
                for (o, &x) in o.iter_mut().zip(&c[i * d_c..(i + 1) * d_c]) {
                    *o = mul_add::<FUSED>(*s, x, *o);
                }
            }
        }
    }
}

/// A step's queries in 8-bit codes, per head and scale block as the rows are, heads padded to
/// a multiple of [`QUERY_HEADS`].
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Per word of 4 codes, every head's (the heads an 8-head block multiplies side by side).
    words: Vec<i32>,
    /// Heads, padded.
    hp: usize,
    /// Per head and block, the codes' scale and sum.
    scales: Vec<f32>,
    sums: Vec<i32>,
}

/// Heads per block of the 8-bit kernel's query (the portable kernel pads alike).
const QUERY_HEADS: usize = 16;

impl Query {
    /// Quantizes `q_lat (H, d_c)` and `q_rope (H, d_r)` in the blocks of rows laid out as `rows`.
    pub fn new(q_lat: &[f32], q_rope: &[f32], rows: Int8Layout, heads: usize) -> Query {
        let mut q = Query::default();
        q.fill(q_lat, q_rope, rows, heads);
        q
    }

    /// [`Query::new`] into the buffers of `self`.
    pub fn fill(&mut self, q_lat: &[f32], q_rope: &[f32], rows: Int8Layout, heads: usize) {
        let (d_c, d_r, words, blocks) = (rows.d_c, rows.d_r, rows.words(), rows.blocks());
        let hp = heads.next_multiple_of(QUERY_HEADS);
        self.hp = hp;
        for (v, n) in [(&mut self.words, hp * words), (&mut self.sums, hp * blocks)] {
            v.clear();
            v.resize(n, 0);
        }
        self.scales.clear();
        self.scales.resize(hp * blocks, 0.0);
        for h in 0..heads {
            let get = |i: usize| if i < d_c { q_lat[h * d_c + i] } else { q_rope[h * d_r + i - d_c] };
            for b in 0..blocks {
                let (mut sum, words) = (0, &mut self.words);
                let scale = quantize_block(get, rows.block_values(b), |i, code| {
                    let word = &mut words[i / 4 * hp + h];
                    let mut bytes = word.to_le_bytes();
                    bytes[i % 4] = code as u8;
                    *word = i32::from_le_bytes(bytes);
                    sum += code as i32;
                });
                (self.scales[h * blocks + b], self.sums[h * blocks + b]) = (scale, sum);
            }
        }
    }

    /// The queries the codes stand for: `(H, d_c)`, `(H, d_r)` (the reference twin's input).
    pub fn dequantize(&self, rows: Int8Layout, heads: usize) -> (Vec<f32>, Vec<f32>) {
        let (mut lat, mut rope) = (Vec::new(), Vec::new());
        self.dequantize_into(rows, heads, &mut lat, &mut rope);
        (lat, rope)
    }

    /// [`Query::dequantize`] into `lat` and `rope` (resized).
    fn dequantize_into(&self, rows: Int8Layout, heads: usize, lat: &mut Vec<f32>, rope: &mut Vec<f32>) {
        let (d_c, d_r, blocks) = (rows.d_c, rows.d_r, rows.blocks());
        lat.resize(heads * d_c, 0.0);
        rope.resize(heads * d_r, 0.0);
        for h in 0..heads {
            for b in 0..blocks {
                for i in rows.block_values(b) {
                    let code = self.words[i / 4 * self.hp + h].to_le_bytes()[i % 4] as i8;
                    let v = code as f32 * self.scales[h * blocks + b];
                    if i < d_c {
                        lat[h * d_c + i] = v;
                    } else {
                        rope[h * d_r + i - d_c] = v;
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod vnni {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{share_factors, Int8Layout, Int8Tiles, Query, GROUP_TILES, MAX_SHARES, RUN_TILES, TILE_ROWS};
    use crate::kernels::rows::exp;
    use crate::kernels::{reserve_to, reset, Prefetch};

    /// Heads per register block of the weighted sum (queries are padded to a multiple).
    pub const HEADS: usize = super::QUERY_HEADS;
    /// Heads per register block of the scores (an integer and a float accumulator each).
    const SCORE_HEADS: usize = 8;
    /// Heads and latent words per register block of the weighted sum: each loaded probability
    /// register feeds `SUM_WORDS` products, each transposed word `SUM_HEADS`.
    const SUM_HEADS: usize = 4;
    const SUM_WORDS: usize = 4;
    const _: () = assert!(HEADS.is_multiple_of(SUM_HEADS), "the padded heads split into whole blocks");

    /// One share's online softmax state: per head the running maximum `m`, the sum `l` of
    /// `e^(s − m)`, and per latent word and head a register of sums `o` (lane `4k + j`: latent
    /// `4w + j` over rows `4k..4k + 4` of every tile; heads side by side, 1 KiB per word).
    struct Partial {
        m: Vec<f32>,
        l: Vec<f32>,
        o: Vec<f32>,
    }

    /// One run's scores (then probabilities), the probabilities' codes laid out for
    /// `vpdpbusd` per head, block and tile, and their scales per head and block.
    struct Scratch {
        p: Vec<f32>,
        codes: Vec<u8>,
        scales: Vec<f32>,
    }

    /// One share's state and run buffers, kept from step to step.
    pub(crate) struct Share {
        part: Partial,
        scratch: Scratch,
    }

    /// The byte shuffle within each 128-bit lane that turns 4 rows × 4 latents (a lane's 4 words)
    /// into 4 latents × 4 rows.
    const TRANSPOSE: [i8; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

    pub fn decode(q: &Query, rows: &dyn Int8Tiles, heads: usize, scale: f32, shares: &mut Vec<Share>, out: &mut [f32]) {
        let l = rows.layout();
        let (d_c, len) = (l.d_c, rows.len());
        let hp = heads.next_multiple_of(HEADS);
        let lw = d_c / 4;
        let tiles = len.div_ceil(TILE_ROWS);
        let runs = tiles.div_ceil(RUN_TILES);
        // Two shares per thread: each share's state is 1 KiB per latent word (64 KiB per head
        // group at V2's sizes), so more shares cost more to clear and merge than they balance.
        let most = (2 * rayon::current_num_threads()).clamp(1, MAX_SHARES);
        let n = runs.clamp(1, most);
        // Every share the sequence will use once it is long, sized now, so that a growing
        // sequence allocates nothing when it starts using another one.
        while shares.len() < most {
            let part = Partial { m: Vec::new(), l: Vec::new(), o: Vec::new() };
            let scratch = Scratch { p: Vec::new(), codes: Vec::new(), scales: Vec::new() };
            shares.push(Share { part, scratch });
        }
        for Share { part, scratch } in shares.iter_mut() {
            reserve_to(&mut part.m, hp);
            reserve_to(&mut part.l, hp);
            reserve_to(&mut part.o, hp * lw * 16);
            reserve_to(&mut scratch.p, hp * RUN_TILES * TILE_ROWS);
            reserve_to(&mut scratch.codes, hp * l.latent_blocks() * RUN_TILES * 64);
            reserve_to(&mut scratch.scales, hp * l.latent_blocks());
        }
        shares[..n].par_iter_mut().enumerate().for_each(|(k, share)| {
            let Share { part, scratch } = share;
            reset(&mut part.m, hp, f32::NEG_INFINITY);
            reset(&mut part.l, hp, 0.0);
            reset(&mut part.o, hp * lw * 16, 0.0);
            scratch.p.resize(hp * RUN_TILES * TILE_ROWS, 0.0);
            scratch.codes.resize(hp * l.latent_blocks() * RUN_TILES * 64, 0);
            scratch.scales.resize(hp * l.latent_blocks(), 0.0);
            let mine = runs * k / n..runs * (k + 1) / n;
            let tiles_of = |run: usize| (run * RUN_TILES).min(tiles)..((run + 1) * RUN_TILES).min(tiles);
            for run in mine.clone() {
                // The share's next run, fetched while this one is summed.
                let next = if run + 1 < mine.end { tiles_of(run + 1) } else { tiles..tiles };
                // SAFETY: `decode` is only called where `Simd::detect` found AVX-512 VNNI
                // (with F, BW); the tiles lie inside `rows`.
                unsafe { absorb_run(q, rows, hp, scale, (tiles_of(run), next), part, scratch) };
            }
        });
        // Merged head by head in parallel: each share's sums rescaled to the common maximum, the
        // 4 row groups of each latent's lanes added, divided by the softmax's sum.
        let shares = &shares[..n];
        out.par_chunks_mut(d_c).enumerate().for_each(|(h, out)| {
            let factors = share_factors(shares.iter().map(|s| s.part.m[h]));
            let l: f32 = shares.iter().zip(&factors).map(|(s, &f)| f * s.part.l[h]).sum();
            let inv = 1.0 / l;
            for (w, out) in out.chunks_exact_mut(4).enumerate() {
                let mut lanes = [0f32; 16];
                for (share, &f) in shares.iter().zip(&factors) {
                    for (a, &b) in lanes.iter_mut().zip(&share.part.o[(w * hp + h) * 16..][..16]) {
                        *a += f * b;
                    }
                }
                for (j, o) in out.iter_mut().enumerate() {
                    *o = (lanes[j] + lanes[4 + j] + lanes[8 + j] + lanes[12 + j]) * inv;
                }
            }
        });
    }

    /// Adds the rows of `tiles` to `part`: scores, online softmax, weighted sum.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI; `tiles` inside `rows`, `q` made for `rows` with `hp` heads.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn absorb_run(
        q: &Query,
        rows: &dyn Int8Tiles,
        hp: usize,
        scale: f32,
        (tiles, next): (std::ops::Range<usize>, std::ops::Range<usize>),
        part: &mut Partial,
        scratch: &mut Scratch,
    ) {
        let l: Int8Layout = rows.layout();
        let (words, blocks, lb, lw) = (l.words(), l.blocks(), l.latent_blocks(), l.d_c / 4);
        // The next run's tiles, fetched into L2 while this run's weighted sum computes from
        // cache, one slice per register block of words (see `Prefetch`): a pair of spans (codes,
        // scales) per group of tiles, which lie wherever their page is.
        let mut spans = [(std::ptr::null::<u8>(), 0); 2 * RUN_TILES / GROUP_TILES];
        for (k, t) in next.clone().step_by(GROUP_TILES).enumerate() {
            let (codes, scales) = rows.tile(t);
            let m = GROUP_TILES.min(next.end - t);
            spans[2 * k] = Prefetch::span(&codes[..m * l.tile_codes()]);
            spans[2 * k + 1] = Prefetch::span(&scales[..m * l.tile_scales()]);
        }
        let mut ahead = Prefetch::new(spans, lw.div_ceil(SUM_WORDS) * (hp / SUM_HEADS));
        let n = ((tiles.end * TILE_ROWS).min(rows.len()) - tiles.start * TILE_ROWS).min(tiles.len() * TILE_ROWS);
        let run = RUN_TILES * TILE_ROWS;
        assert!(
            tiles.end <= rows.len().div_ceil(TILE_ROWS) && tiles.len() <= RUN_TILES && q.words.len() >= words * hp,
            "absorb_run: tiles past the cache"
        );
        // Raw pointers: a bounds check per load costs more than the `vpdpbusd` it feeds. Each
        // tile's codes and scales where they lie.
        let mut tile_codes = [std::ptr::null::<u8>(); RUN_TILES];
        let mut tile_scales = [std::ptr::null::<f32>(); RUN_TILES];
        for (ti, t) in tiles.clone().enumerate() {
            let (codes, scales) = rows.tile(t);
            assert!(codes.len() >= l.tile_codes() && scales.len() >= l.tile_scales(), "absorb_run: a tile's size");
            (tile_codes[ti], tile_scales[ti]) = (codes.as_ptr(), scales.as_ptr());
        }
        let code = |t: usize, w: usize| tile_codes[t - tiles.start].wrapping_add(w * 64);
        // Probability codes by block, then tile, then head: a block's 16 tiles of 16 heads are
        // 16 KiB in a row, which stay in L1 through the block's latents.
        let p_codes_base = scratch.codes.as_mut_ptr();
        let p_codes = |b: usize, ti: usize, h: usize| p_codes_base.wrapping_add(((b * RUN_TILES + ti) * hp + h) * 64);
        // SAFETY (whole body): tile `t` of `tiles` holds `words` rows of 64 code bytes and
        // `blocks` rows of 16 scales; query words, scales and sums are indexed by heads below
        // `hp` and words or blocks below theirs; scratch holds `hp` heads of a whole run.
        unsafe {
            // Scores, scaled: head h's row i of the run at p[h · run + i].
            for (ti, t) in tiles.clone().enumerate() {
                let row_scales = |b: usize| _mm512_loadu_ps(tile_scales[ti].add(b * TILE_ROWS));
                for h0 in (0..hp).step_by(SCORE_HEADS) {
                    let mut s = [_mm512_setzero_ps(); SCORE_HEADS];
                    for b in 0..blocks {
                        let mut a: [__m512i; SCORE_HEADS] =
                            std::array::from_fn(|i| _mm512_set1_epi32(-128 * q.sums[(h0 + i) * blocks + b]));
                        let values = l.block_values(b);
                        for w in values.start / 4..values.end / 4 {
                            let c = _mm512_loadu_si512(code(t, w).cast());
                            let qw = q.words.as_ptr().add(w * hp + h0);
                            for (i, a) in a.iter_mut().enumerate() {
                                *a = _mm512_dpbusd_epi32(*a, c, _mm512_set1_epi32(*qw.add(i)));
                            }
                        }
                        let rs = row_scales(b);
                        for (i, (s, &a)) in s.iter_mut().zip(&a).enumerate() {
                            let f = _mm512_mul_ps(rs, _mm512_set1_ps(q.scales[(h0 + i) * blocks + b] * scale));
                            *s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), f, *s);
                        }
                    }
                    for (i, &s) in s.iter().enumerate() {
                        _mm512_storeu_ps(scratch.p[(h0 + i) * run + ti * TILE_ROWS..].as_mut_ptr(), s);
                    }
                }
            }
            // Online softmax: rescale what came before to the new maximum, then e^(s − m) for
            // the run's rows (none for the tile rows past the end).
            let spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
            let nt = tiles.len();
            for h in 0..hp {
                let p = &mut scratch.p[h * run..h * run + nt * TILE_ROWS];
                p[n..].fill(f32::NEG_INFINITY);
                let mut top = _mm512_set1_ps(part.m[h]);
                for chunk in p.chunks_exact(TILE_ROWS) {
                    top = _mm512_max_ps(top, _mm512_loadu_ps(chunk.as_ptr()));
                }
                let m_new = _mm512_reduce_max_ps(top);
                if m_new > part.m[h] && part.l[h] > 0.0 {
                    let alpha = exp(part.m[h] - m_new);
                    part.l[h] *= alpha;
                    for w in 0..lw {
                        part.o[(w * hp + h) * 16..][..16].iter_mut().for_each(|v| *v *= alpha);
                    }
                }
                part.m[h] = m_new;
                for chunk in p.chunks_exact_mut(TILE_ROWS) {
                    // Fixed-size, so that the exponentials vectorize.
                    let chunk: &mut [f32; TILE_ROWS] = chunk.try_into().unwrap_or_else(|_| unreachable!());
                    for v in chunk.iter_mut() {
                        *v = exp(*v - m_new);
                    }
                }
                p[n..].fill(0.0);
                let mut total = _mm512_setzero_ps();
                for chunk in p.chunks_exact(TILE_ROWS) {
                    total = _mm512_add_ps(total, _mm512_loadu_ps(chunk.as_ptr()));
                }
                part.l[h] += _mm512_reduce_add_ps(total);
                // Per latent block, p · (row scale) in 8 bits relative to the run's largest; the
                // codes of rows 4k..4k + 4 repeated over the 4 words of 128-bit lane k.
                for b in 0..lb {
                    let weighted = |ti: usize| {
                        let row_scales = tile_scales[ti].add(b * TILE_ROWS);
                        _mm512_mul_ps(_mm512_loadu_ps(p[ti * TILE_ROWS..].as_ptr()), _mm512_loadu_ps(row_scales))
                    };
                    let mut top = _mm512_setzero_ps();
                    for ti in 0..nt {
                        top = _mm512_max_ps(top, weighted(ti));
                    }
                    let sigma = _mm512_reduce_max_ps(top) / 255.0;
                    let inv = _mm512_set1_ps(if sigma > 0.0 { 1.0 / sigma } else { 0.0 });
                    scratch.scales[h * lb + b] = sigma;
                    for ti in 0..nt {
                        let codes = _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(weighted(ti), inv)));
                        let lanes = _mm512_permutexvar_epi32(spread, _mm512_castsi128_si512(codes));
                        _mm512_storeu_si512(p_codes(b, ti, h).cast(), lanes);
                    }
                }
            }
            // Weighted sum: per latent word, each tile's word turned into latents × rows and
            // multiplied by every head's probabilities of those rows.
            let transpose = _mm512_broadcast_i32x4(_mm_loadu_si128(TRANSPOSE.as_ptr().cast()));
            let flip = _mm512_set1_epi8(-128);
            for b in 0..lb {
                let values = l.block_values(b);
                for h0 in (0..hp).step_by(SUM_HEADS) {
                    let mut w = values.start / 4;
                    while w < values.end / 4 {
                        // Words in register blocks of SUM_WORDS; a partial block's last words alone.
                        let n = if values.end / 4 - w >= SUM_WORDS { SUM_WORDS } else { 1 };
                        ahead.tick();
                        let mut a = [[_mm512_setzero_si512(); SUM_WORDS]; SUM_HEADS];
                        for (ti, t) in tiles.clone().enumerate() {
                            let c: [__m512i; SUM_WORDS] = std::array::from_fn(|k| {
                                let word = _mm512_loadu_si512(code(t, w + k.min(n - 1)).cast());
                                _mm512_xor_si512(_mm512_shuffle_epi8(word, transpose), flip)
                            });
                            for (i, a) in a.iter_mut().enumerate() {
                                let p = _mm512_loadu_si512(p_codes(b, ti, h0 + i).cast());
                                // All SUM_WORDS words even in a partial block (its last word
                                // repeated, the repeats dropped below): a loop of fixed length
                                // keeps the block in registers, where one of `n` spilled it.
                                for (a, &c) in a.iter_mut().zip(&c) {
                                    *a = _mm512_dpbusd_epi32(*a, p, c);
                                }
                            }
                        }
                        for (i, a) in a.iter().enumerate() {
                            let sigma = _mm512_set1_ps(scratch.scales[(h0 + i) * lb + b]);
                            for (k, &a) in a.iter().enumerate() {
                                if k < n {
                                    let o = part.o[((w + k) * hp + h0 + i) * 16..].as_mut_ptr();
                                    _mm512_storeu_ps(
                                        o,
                                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), sigma, _mm512_loadu_ps(o)),
                                    );
                                }
                            }
                        }
                        w += n;
                    }
                }
            }
        }
    }
}

/// The reference twin of the 8-bit kernel in f64, and per output the bound on what quantizing
/// the probabilities may change: `Σ_runs (max_run p·scale / 510) Σ_run |code|` over `Σ p`.
/// The queries are those `q` stands for, the rows as dequantized.
pub fn reference_with_bound(q: &Query, rows: &dyn Int8Tiles, heads: usize, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let l = rows.layout();
    let (d_c, d_r, len) = (l.d_c, l.d_r, rows.len());
    let (q_lat, q_rope) = q.dequantize(l, heads);
    let (c, r) = rows.dequantize();
    let shape = MlaShape { heads, d_c, d_r, len };
    let out = super::mla_decode::mla_decode_reference(&q_lat, &q_rope, &c, &r, shape, scale);
    let mut bound = vec![0f32; heads * d_c];
    let run = RUN_TILES * TILE_ROWS;
    for h in 0..heads {
        let scores: Vec<f64> = (0..len)
            .map(|s| {
                let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>();
                let content = dot(&q_lat[h * d_c..(h + 1) * d_c], &c[s * d_c..(s + 1) * d_c]);
                let position = dot(&q_rope[h * d_r..(h + 1) * d_r], &r[s * d_r..(s + 1) * d_r]);
                (content + position) * scale as f64
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = scores.iter().map(|v| (v - max).exp()).collect();
        let total: f64 = p.iter().sum();
        let row_scale = |s: usize, b: usize| rows.tile(s / TILE_ROWS).1[b * TILE_ROWS + s % TILE_ROWS] as f64;
        for i in 0..d_c {
            let b = i / SCALE_BLOCK;
            let mut sum = 0f64;
            for r0 in (0..len).step_by(run) {
                let span = r0..(r0 + run).min(len);
                let top = span.clone().map(|s| p[s] * row_scale(s, b)).fold(0f64, f64::max);
                let codes: f64 =
                    span.map(|s| (c[s * d_c + i] as f64 / row_scale(s, b).max(f64::MIN_POSITIVE)).abs()).sum();
                sum += top / 510.0 * codes;
            }
            bound[h * d_c + i] = (sum / total) as f32;
        }
    }
    (out, bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matvec::tests::random;

    #[test]
    fn rows_round_trip_within_half_a_step_across_tiles() {
        let (d_c, d_r) = (136, 8); // two latent blocks, the second partial
        let mut rows = Int8Rows::new(d_c, d_r).unwrap();
        let n = 40;
        let (c, r) = (random(n * d_c, 1), random(n * d_r, 2));
        for s in 0..n {
            rows.push(&c[s * d_c..(s + 1) * d_c], &r[s * d_r..(s + 1) * d_r]);
        }
        assert_eq!(rows.len(), n);
        let (gc, gr) = rows.dequantize();
        for s in 0..n {
            for (b, values) in [(0..128), (128..136), (136..144)].into_iter().enumerate() {
                let v = |i: usize| {
                    if i < d_c {
                        (c[s * d_c + i], gc[s * d_c + i])
                    } else {
                        (r[s * d_r + i - d_c], gr[s * d_r + i - d_c])
                    }
                };
                let amax = values.clone().map(|i| v(i).0.abs()).fold(0f32, f32::max);
                for i in values {
                    let (want, got) = v(i);
                    assert!(
                        (want - got).abs() <= amax / 254.0 * 1.0001,
                        "row {s} block {b} value {i}: {got} vs {want}"
                    );
                }
            }
        }
        // Truncating and pushing again overwrites in place.
        rows.truncate(17);
        rows.push(&c[..d_c], &r[..d_r]);
        assert_eq!(rows.len(), 18);
        let (c18, r18) = rows.dequantize();
        assert_eq!((&c18[17 * d_c..], &r18[17 * d_r..]), (&gc[..d_c], &gr[..d_r]));
        assert_eq!((&c18[..17 * d_c], &r18[..17 * d_r]), (&gc[..17 * d_c], &gr[..17 * d_r]));
        assert!(Int8Rows::new(30, 8).is_none(), "latents not in whole words");
    }

    #[test]
    fn int8_decode_matches_reference_within_the_probability_rounding() {
        for len in [1, 15, 16, 17, 255, 256, 300, 1000, 3000] {
            for (heads, d_c, d_r) in [(4, 32, 8), (3, 136, 24), (16, 512, 64)] {
                let mut rows = Int8Rows::new(d_c, d_r).unwrap();
                let (c, r) = (random(len * d_c, 3), random(len * d_r, 4));
                for s in 0..len {
                    rows.push(&c[s * d_c..(s + 1) * d_c], &r[s * d_r..(s + 1) * d_r]);
                }
                // Spread softmaxes, and queries large enough for peaked ones.
                let gain = if len % 2 == 0 { 4.0 } else { 40.0 };
                let q_lat: Vec<f32> = random(heads * d_c, 5).iter().map(|v| gain * v).collect();
                let q_rope: Vec<f32> = random(heads * d_r, 6).iter().map(|v| gain * v).collect();
                let scale = 1.0 / ((d_c / 4) as f32).sqrt();
                let q = Query::new(&q_lat, &q_rope, rows.layout(), heads);
                let got = mla_decode_int8(&q_lat, &q_rope, &rows, heads, scale);
                let (want, bound) = reference_with_bound(&q, &rows, heads, scale);
                let what = format!("len {len} heads {heads} d_c {d_c} d_r {d_r}");
                let vnni = Simd::detect() == Simd::Avx512Vnni;
                for (i, ((&g, &w), &b)) in got.iter().zip(&want).zip(&bound).enumerate() {
                    let slack = if vnni { b } else { 0.0 };
                    let tol = slack + 2e-4 * w.abs() + 2e-5;
                    assert!((g - w).abs() <= tol, "{what}: [{i}] {g} vs {w} (bound {tol})");
                }
            }
        }
    }
}
