//! Microbenchmark of the quantized products, one weight format at a time.
//!
//! `cargo run --release --example kernels -- [IN OUT] [--threads N] [--mla]` multiplies one activation row
//! by an `(OUT, IN)` matrix (default 2048 x 11264, a V2-Lite dense MLP's gate and up together)
//! in Q8_0, Q4_K, Q6_K and Q5_0, as rows and as tiles of 16 rows, and prints the median time and
//! the GB/s of blocks read. Small matrices stay in cache, so they measure the kernels' compute,
//! and large ones memory. Then it times one absorbed MLA decode step (16 heads, 512 + 64 latent)
//! at 4096 and 16384 cached tokens, over a bf16, an int8 and an f32 cache (6 layers' caches read in turn,
//! each from memory as in a model), and the prefill product of 48
//! and 512 activation rows in each format: the bf16 GEMM of dequantized rows against the tiles'
//! 8-bit product. `--gemm` times only the bf16 GEMM of a bf16 model's prefill at its shapes, as
//! a share of the measured peak of `vdpbf16ps`.

use std::time::Instant;

use latent::kernels::gemm::{gemm_bf16, gemm_quant};
use latent::kernels::kquant::{quantize_q4_k, BlockQ5_0, BlockQ6K};
use latent::kernels::latent_int8::{mla_decode_int8_into, Int8Rows, Int8Scratch};
use latent::kernels::matvec::weighted_rows;
use latent::kernels::mla_decode::{mla_decode_into, MlaScratch, MlaShape};
use latent::kernels::peak::dot_peaks;
use latent::kernels::quant::{quantize_q8_0, QuantMatrix};

fn main() {
    let mut sizes = vec![];
    let mut threads = None;
    let mut mla_only = false;
    let mut gemm_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), a.parse::<usize>()) {
            ("--threads", _) => threads = args.next().and_then(|n| n.parse().ok()),
            ("--mla", _) => mla_only = true,
            ("--gemm", _) => gemm_only = true,
            (_, Ok(n)) if n > 0 => sizes.push(n),
            _ => {
                eprintln!("usage: kernels [IN OUT] [--threads N] [--mla | --gemm] (IN a multiple of 256; --mla: only the attention step; --gemm: only the bf16 GEMM)");
                std::process::exit(2);
            }
        }
    }
    let (n_in, n_out) = match sizes[..] {
        [i, o] if i % 256 == 0 => (i, o),
        [] => (2048, 11264),
        _ => {
            eprintln!("kernels: IN must be a multiple of 256, and OUT given with it");
            std::process::exit(2);
        }
    };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.unwrap_or(0)).build();
    match pool {
        Ok(pool) if mla_only => pool.install(|| [4096, 16384].into_iter().for_each(mla)),
        Ok(pool) if gemm_only => pool.install(gemm_shapes),
        Ok(pool) => pool.install(|| run(n_in, n_out)),
        Err(e) => eprintln!("kernels: {e}"),
    }
}

/// Median seconds of `runs` calls of `f`, after 3 unmeasured ones.
fn median(runs: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The bf16 GEMM (`gemm_bf16`) at a V2-Lite prefill's shapes: a routed expert's 48 rows, the
/// whole 512-token prompt through an expert's gate, its down projection, and the dense MLP.
fn gemm_shapes() {
    let peak = dot_peaks().bf16_gmac_s;
    let bf = |n: usize, seed: u64| -> Vec<half::bf16> {
        (0..n).map(|i| half::bf16::from_f32(((i as u64 * 2654435761 + seed) % 1000) as f32 / 1000.0 - 0.5)).collect()
    };
    for (t, n_in, n_out) in [(48, 2048, 1408), (512, 2048, 1408), (512, 1408, 2048), (512, 2048, 10944)] {
        let (x, w) = (bf(t * n_in, 1), bf(n_in * n_out, 2));
        let macs = (t * n_in * n_out) as f64;
        let runs = (20.0 * 512.0 * 2048.0 * 11264.0 / macs).clamp(5.0, 200.0) as usize;
        let secs = median(runs, || drop(std::hint::black_box(gemm_bf16(&x, &w, t, n_in, n_out))));
        let share =
            peak.map_or(String::new(), |p| format!(", {:.0}% of vdpbf16ps' {p:.0}", 100.0 * macs / secs / 1e9 / p));
        println!(
            "gemm_bf16 {t:3} x {n_in:5} -> {n_out:5}: {:7.3} ms, {:6.1} GMAC/s{share}",
            secs * 1e3,
            macs / secs / 1e9
        );
    }
}

/// Caches the MLA step is timed over in turn, as a model's layers read theirs: each comes from
/// memory, not from a cache that a repeated call over one layer's rows would leave in L3.
const LAYERS: usize = 6;

fn mla(len: usize) {
    let (heads, d_c, d_r) = (16, 512, 64);
    let shape = MlaShape { heads, d_c, d_r, len };
    let values = |n: usize, seed: u64| -> Vec<f32> {
        (0..n).map(|i| ((i as u64 * 2654435761 + seed * 7919) % 1000) as f32 / 1000.0 - 0.5).collect()
    };
    let bf = |v: &[f32]| -> Vec<half::bf16> { v.iter().map(|&x| half::bf16::from_f32(x)).collect() };
    let (q_lat, q_rope) = (values(heads * d_c, 1), values(heads * d_r, 2));
    let layers: Vec<(Vec<f32>, Vec<f32>)> =
        (0..LAYERS as u64).map(|l| (values(len * d_c, 3 + l), values(len * d_r, 40 + l))).collect();
    let bf_layers: Vec<_> = layers.iter().map(|(c, r)| (bf(c), bf(r))).collect();
    let p = values(heads * len, 5);
    // As the decode step calls them: into one output, with scratch kept from call to call; the
    // median over steps of one layer each, the layers in turn.
    let mut out = vec![0f32; heads * d_c];
    let mut scratch = MlaScratch::default();
    let mut layer = 0;
    let mut turn = || {
        layer = (layer + 1) % LAYERS;
        layer
    };
    let step = median(60, || {
        let (c_kv, k_rope) = &bf_layers[turn()];
        mla_decode_into(&q_lat, &q_rope, c_kv, k_rope, shape, 0.1, &mut scratch, &mut out)
    });
    let step32 = median(24, || {
        let (c32, r32) = &layers[turn()];
        mla_decode_into(&q_lat, &q_rope, c32, r32, shape, 0.1, &mut scratch, &mut out)
    });
    let sum = median(24, || drop(std::hint::black_box(weighted_rows(&p, &bf_layers[turn()].0, heads, len, d_c))));
    let int8: Vec<Int8Rows> = layers
        .iter()
        .map(|(c32, r32)| {
            let mut rows = Int8Rows::new(d_c, d_r).expect("V2's latent sizes are whole words");
            for (c, r) in c32.chunks_exact(d_c).zip(r32.chunks_exact(d_r)) {
                rows.push(c, r);
            }
            rows
        })
        .collect();
    let mut scratch8 = Int8Scratch::default();
    let step8 =
        median(60, || mla_decode_int8_into(&q_lat, &q_rope, &int8[turn()], heads, 0.1, &mut scratch8, &mut out));
    let macs = (heads * len * d_c) as f64;
    println!(
        "MLA decode step over {len} tokens (one of {LAYERS} layers' caches in turn): {:.3} ms with a bf16 cache, {:.3} ms with int8, {:.3} ms with f32 \
         (the unfused weighted sum of bf16 latents alone {:.3} ms, {:.1} GMAC/s)",
        step * 1e3,
        step8 * 1e3,
        step32 * 1e3,
        sum * 1e3,
        macs / sum / 1e9
    );
    // Against the arithmetic ceiling: per cached row, every head's score (d_c + d_r) and its
    // share of the weighted sum (d_c).
    let step_macs = (heads * len * (2 * d_c + d_r)) as f64;
    let peaks = dot_peaks();
    // The bf16 kernel multiplies bf16 pairs by `vdpbf16ps` or by two FMAs, whichever is faster here.
    let fma = latent::kernels::gemm::bf16_by_fma();
    let (bf16_peak, bf16_instruction) =
        if fma { (peaks.f32_gmac_s, "vfmadd231ps") } else { (peaks.bf16_gmac_s, "vdpbf16ps") };
    for (what, secs, peak) in [("int8", step8, peaks.int8_gmac_s), ("bf16", step, bf16_peak)] {
        let rate = step_macs / secs / 1e9;
        match peak {
            Some(peak) => println!(
                "  {what} step: {rate:.1} GMAC/s, {:.0}% of the CPU's {} throughput measured on these threads ({peak:.1} GMAC/s)",
                100.0 * rate / peak,
                if what == "int8" { "vpdpbusd" } else { bf16_instruction }
            ),
            None => println!("  {what} step: {rate:.1} GMAC/s"),
        }
    }
}

fn run(n_in: usize, n_out: usize) {
    let mut state = 1u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        state
    };
    let values: Vec<f32> = (0..n_in * n_out).map(|_| (next() >> 40) as f32 / 16777216.0 - 0.5).collect();
    let x = values[..n_in].to_vec();
    let mut byte = || (next() >> 56) as u8;
    let d = half::f16::from_f32(0.001);
    let q6 = (0..n_in * n_out / 256)
        .map(|_| BlockQ6K {
            ql: std::array::from_fn(|_| byte()),
            qh: std::array::from_fn(|_| byte()),
            scales: std::array::from_fn(|_| byte() as i8),
            d,
        })
        .collect();
    let q5 = (0..n_in * n_out / 32)
        .map(|_| BlockQ5_0 { d, qh: std::array::from_fn(|_| byte()), qs: std::array::from_fn(|_| byte()) })
        .collect();
    let rows = [
        QuantMatrix::Q8_0(quantize_q8_0(&values)),
        QuantMatrix::Q4K(quantize_q4_k(&values)),
        QuantMatrix::Q6K(q6),
        QuantMatrix::Q5_0(q5),
    ];
    // Each format as GGML's rows, then in tiles of 16 rows (the layout loading picks on CPUs with
    // AVX-512 VNNI).
    let matrices: Vec<QuantMatrix> = rows.into_iter().flat_map(|m| [m.clone(), m.tiled(n_in)]).collect();
    println!("{n_in} x {n_out}, {} threads", rayon::current_num_threads());
    // About 300 products of the default size's work per format, and at least 300.
    let runs = (300 * 2048 * 11264 / (n_in * n_out)).max(300);
    for m in &matrices {
        for _ in 0..3 {
            std::hint::black_box(m.matvec(&x, 1, n_in, n_out));
        }
        let mut times: Vec<f64> = (0..runs)
            .map(|_| {
                let start = Instant::now();
                std::hint::black_box(m.matvec(&x, 1, n_in, n_out));
                start.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        let layout = if m.is_tiled() { "tiles" } else { "rows" };
        println!("{:5} {layout:5} {:8.3} ms {:6.1} GB/s", m.name(), t * 1e3, m.bytes() as f64 / t / 1e9);
    }
    for len in [4096, 16384] {
        mla(len);
    }
    prefill(&matrices, &values, n_in, n_out);
}

/// The prefill product of many activation rows: the rows' bf16 GEMM (each task dequantizes its
/// run of rows, `gemm_quant`: prefill where weights are not tiled) against the tiles' own 8-bit
/// product, for a routed expert's share of a 512-token prompt (48 rows) and for the whole prompt.
fn prefill(matrices: &[QuantMatrix], values: &[f32], n_in: usize, n_out: usize) {
    for t in [48, 512] {
        let x = &values[..t * n_in];
        let macs = (t * n_in * n_out) as f64;
        // `matrices` holds each format as rows, then as tiles.
        for pair in matrices.chunks_exact(2) {
            let (rows, tiles) = (&pair[0], &pair[1]);
            let runs = (20.0 * 512.0 * 2048.0 * 11264.0 / macs).clamp(3.0, 200.0) as usize;
            let bf16 = median(runs, || drop(std::hint::black_box(gemm_quant(x, rows, t, n_in, n_out))));
            let int8 = median(runs, || drop(std::hint::black_box(tiles.matvec(x, t, n_in, n_out))));
            println!(
                "{:5} {t:3} rows: bf16 GEMM of dequantized rows {:6.1} GMAC/s, tiles 8-bit {:6.1} GMAC/s",
                rows.name(),
                macs / bf16 / 1e9,
                macs / int8 / 1e9
            );
        }
    }
}
