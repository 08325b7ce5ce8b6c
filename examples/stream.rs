//! How fast the decode products stream their weights from memory, against the read probe that
//! `latent bench` takes its roofline from.
//!
//! `cargo run --release --example stream -- [GB] [ROUNDS] [--threads N]` multiplies one activation
//! row by a `(rows, 2048)` weight of about GB gigabytes in bf16 (default 0.42, a V2-Lite output
//! head) with latent's bf16 product, and the same values as Q8_0 and Q4_K tiles (and random Q6_K
//! tiles) with theirs, split over the threads in runs of 32 rows as a decode step splits them. Each product reads one of six
//! copies of its weight in turn, so that none finds the last pass's rows in L3 (260 MiB on some
//! Xeons: a weight read over and over from one copy measures the cache, not the memory). The
//! products and the probe take turns for ROUNDS rounds (default 11); medians are printed, as GB/s
//! of weight bytes and as a share of the probe measured in the same rounds.

use std::time::Instant;

use half::bf16;
use latent::kernels::kquant::{quantize_q4_k, BlockQ6K};
use latent::kernels::matvec::dot_block_bf16;
use latent::kernels::peak::read_bandwidth_gb_s;
use latent::kernels::quant::{quantize_q8_0, QuantMatrix};
use rayon::prelude::*;

const N_IN: usize = 2048;
const COPIES: usize = 6;
const TASK_ROWS: usize = 32;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut numbers = vec![];
    let mut threads = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), a.parse::<f64>()) {
            ("--threads", _) => threads = args.next().and_then(|n| n.parse().ok()),
            (_, Ok(v)) if v > 0.0 => numbers.push(v),
            _ => {
                eprintln!("usage: stream [GB] [ROUNDS] [--threads N]");
                std::process::exit(2);
            }
        }
    }
    let gb = numbers.first().copied().unwrap_or(0.42);
    let rounds = numbers.get(1).map_or(11, |&r| r as usize).max(1);
    match rayon::ThreadPoolBuilder::new().num_threads(threads.unwrap_or(0)).build() {
        Ok(pool) => pool.install(|| run(gb, rounds)),
        Err(e) => eprintln!("stream: {e}"),
    }
}

fn run(gb: f64, rounds: usize) {
    let n_out = ((gb * 1e9 / 2.0) as usize / N_IN).next_multiple_of(TASK_ROWS);
    let values: Vec<f32> = (0..n_out * N_IN).map(|i| ((i * 2654435761) % 1000) as f32 / 1000.0 - 0.5).collect();
    let x: Vec<f32> = (0..N_IN).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
    let x16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let w16: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
    let has_bf16 = dot_block_bf16(&x16, None, &w16[..N_IN], 1, N_IN, &mut [0f32]);
    let bf16_copies = vec![w16; COPIES];
    let q8 = QuantMatrix::Q8_0(quantize_q8_0(&values)).tiled(N_IN);
    let q4 = QuantMatrix::Q4K(quantize_q4_k(&values)).tiled(N_IN);
    // Q6_K (Q4_K_M files store the output head and some down projections in it) from random codes.
    let mut state = 1u64;
    let mut byte = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 56) as u8
    };
    let d = half::f16::from_f32(0.001);
    let q6 = (0..values.len() / 256)
        .map(|_| BlockQ6K {
            ql: std::array::from_fn(|_| byte()),
            qh: std::array::from_fn(|_| byte()),
            scales: std::array::from_fn(|_| byte() as i8),
            d,
        })
        .collect();
    let q6 = QuantMatrix::Q6K(q6).tiled(N_IN);
    drop(values);
    let q8_copies = vec![q8; COPIES];
    let q4_copies = vec![q4; COPIES];
    let q6_copies = vec![q6; COPIES];
    println!(
        "{n_out} x {N_IN} weight ({:.2} GB in bf16), {COPIES} copies each, {} threads, {rounds} rounds",
        (n_out * N_IN * 2) as f64 / 1e9,
        rayon::current_num_threads()
    );
    let mut y = vec![0f32; n_out];
    let (mut probe, mut b16, mut b8, mut b4, mut b6) = (vec![], vec![], vec![], vec![], vec![]);
    let timed = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        start.elapsed().as_secs_f64()
    };
    for round in 0..rounds {
        let c = round % COPIES;
        probe.push(read_bandwidth_gb_s());
        let w = &bf16_copies[c];
        let secs = timed(&mut || {
            y.par_chunks_mut(TASK_ROWS).enumerate().for_each(|(task, out)| {
                let rows = &w[task * TASK_ROWS * N_IN..(task * TASK_ROWS + out.len()) * N_IN];
                // (Where the CPU lacks AVX-512 BF16 this does nothing, and nothing is printed.)
                dot_block_bf16(&x16, None, rows, 1, N_IN, out);
            })
        });
        b16.push((w.len() * 2) as f64 / secs / 1e9);
        for (m, out) in [(&q8_copies[c], &mut b8), (&q4_copies[c], &mut b4), (&q6_copies[c], &mut b6)] {
            let secs = timed(&mut || drop(std::hint::black_box(m.matvec(&x, 1, N_IN, n_out))));
            out.push(m.bytes() as f64 / secs / 1e9);
        }
    }
    let probe = median(probe);
    println!("read probe            {probe:6.1} GB/s");
    if !has_bf16 {
        println!("bf16 product          (this CPU has no AVX-512 BF16: not measured)");
    } else {
        let v = median(b16);
        println!("bf16 product          {v:6.1} GB/s  {:4.0}% of the probe", 100.0 * v / probe);
    }
    for (name, v) in [("Q8_0 tiles", b8), ("Q4_K tiles", b4), ("Q6_K tiles", b6)] {
        let v = median(v);
        println!("{name:21} {v:6.1} GB/s  {:4.0}% of the probe", 100.0 * v / probe);
    }
}
