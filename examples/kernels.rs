//! Microbenchmark of the quantized decode product, one weight format at a time.
//!
//! `cargo run --release --example kernels -- [IN OUT] [--threads N]` multiplies one activation row
//! by an `(OUT, IN)` matrix (default 2048 x 11264, a V2-Lite dense MLP's gate and up together)
//! in Q8_0, Q4_K, Q6_K and Q5_0, and prints the median time and the GB/s of blocks read. Small
//! matrices stay in cache, so they measure the kernels' compute, and large ones memory.

use std::time::Instant;

use latent::kernels::kquant::{quantize_q4_k, BlockQ5_0, BlockQ6K};
use latent::kernels::quant::{quantize_q8_0, QuantMatrix};

fn main() {
    let mut sizes = vec![];
    let mut threads = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), a.parse::<usize>()) {
            ("--threads", _) => threads = args.next().and_then(|n| n.parse().ok()),
            (_, Ok(n)) if n > 0 => sizes.push(n),
            _ => {
                eprintln!("usage: kernels [IN OUT] [--threads N] (IN a multiple of 256)");
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
        Ok(pool) => pool.install(|| run(n_in, n_out)),
        Err(e) => eprintln!("kernels: {e}"),
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
    let matrices = [
        QuantMatrix::Q8_0(quantize_q8_0(&values)),
        QuantMatrix::Q4K(quantize_q4_k(&values)),
        QuantMatrix::Q6K(q6),
        QuantMatrix::Q5_0(q5),
    ];
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
        println!("{:5} {:8.3} ms {:6.1} GB/s", m.name(), t * 1e3, m.bytes() as f64 / t / 1e9);
    }
}
