//! Where speculative decoding with the MTP module pays, on a model too large for this CPU's caches:
//! the cost of a plain one-token decode step, of a verify step over `k + 1` tokens and of one draft
//! step of the MTP module, and decoding with the drafts accepted at a forced rate (a harness for
//! measurement: the acceptance is drawn, not computed, so a random-weight model shows the speed a
//! trained one would at that rate).
//!
//!   cargo run --release --example speculative -- MODEL [--draft-tokens K] [--acceptance A,B,..]
//!       [--quant q8_0|q4_k] [--tokens N] [--repeats R]
//!
//! MODEL needs an MTP module (`tools/make_v2_lite_shaped.py OUT --mtp`). Figures are medians.

use std::time::Instant;

use candle_core::Device;
use latent::weights::Quant;
use latent::{AttentionPath, LogitRows, Model, Workspace};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Args {
    model: std::path::PathBuf,
    k: usize,
    rates: Vec<f64>,
    quant: Option<Quant>,
    tokens: usize,
    repeats: usize,
}

fn args() -> Args {
    let mut a = Args { model: "".into(), k: 1, rates: vec![0.6, 0.75, 0.85, 0.9], quant: None, tokens: 24, repeats: 5 };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--draft-tokens" => a.k = value().parse().expect("--draft-tokens N"),
            "--acceptance" => a.rates = value().split(',').map(|r| r.parse().expect("--acceptance A,B")).collect(),
            "--quant" => {
                a.quant = Some(match value().as_str() {
                    "q8_0" => Quant::Q8_0,
                    "q4_k" => Quant::Q4K,
                    other => panic!("--quant q8_0 or q4_k, not {other}"),
                })
            }
            "--tokens" => a.tokens = value().parse().expect("--tokens N"),
            "--repeats" => a.repeats = value().parse().expect("--repeats N"),
            _ => a.model = arg.into(),
        }
    }
    a
}

/// A small seeded generator for the forced acceptances.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn main() {
    let a = args();
    let (model, _) =
        Model::load_quantized(&a.model, None, a.quant, &Device::Cpu, |_, _| {}).expect("loading the model");
    assert!(model.mtp_depth() > 0, "the model has no MTP module (make one with tools/make_v2_lite_shaped.py --mtp)");
    let (hidden, k) = (model.config().hidden_size, a.k);
    let prompt: Vec<u32> = (0..16u32).map(|i| 10 + i * 7).collect();
    let room = prompt.len() + a.tokens * (k + 2) + 64;
    let fresh = || {
        let mut cache = model.new_cache().unwrap();
        cache.reserve(room).unwrap();
        model.forward(&prompt, &mut cache, AttentionPath::Expanded, LogitRows::Last).unwrap();
        let mut mtp = model.new_mtp_cache(cache.kind()).unwrap();
        mtp.reserve(room).unwrap();
        (cache, mtp)
    };
    let (mut ws, mut mtp_ws) = (Workspace::default(), Workspace::default());
    let h0 = vec![0.1f32; hidden];

    // The three steps, each timed alone.
    let (mut cache, mut mtp) = fresh();
    let (mut plain, mut verify, mut draft) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..a.repeats + 1 {
        let n = cache.len();
        let t = Instant::now();
        model.decode_step(7, &mut cache, &mut ws).unwrap();
        let plain_s = t.elapsed().as_secs_f64();
        cache.truncate(n);
        let run: Vec<u32> = (0..=k as u32).map(|j| 7 + j).collect();
        let t = Instant::now();
        model.decode_runs(&run, &[run.len()], &mut [&mut cache], &mut ws).unwrap();
        let verify_s = t.elapsed().as_secs_f64();
        cache.truncate(n);
        let m = mtp.len();
        let t = Instant::now();
        model.mtp_step(0, &h0, &[7], &mut mtp, &mut mtp_ws).unwrap();
        let draft_s = t.elapsed().as_secs_f64();
        mtp.truncate(m);
        if i > 0 {
            plain.push(plain_s);
            verify.push(verify_s);
            draft.push(draft_s);
        }
    }
    let (plain, verify, draft) = (median(plain), median(verify), median(draft));
    println!(
        "model {} (quant {:?}), k = {k}: plain step {:.1} ms, verify step over {} tokens {:.1} ms ({:.2}x plain), draft \
         step {:.1} ms ({:.2}x plain)",
        a.model.display(),
        a.quant,
        1e3 * plain,
        k + 1,
        1e3 * verify,
        verify / plain,
        1e3 * draft,
        draft / plain
    );

    // Decoding with drafts accepted at a forced rate: real draft and verify steps, the accepted
    // prefix drawn (each draft accepted with probability `rate` while the ones before it were).
    let plain_tok_s = {
        let (mut cache, _) = fresh();
        let t = Instant::now();
        for _ in 0..a.tokens {
            model.decode_step(7, &mut cache, &mut ws).unwrap();
        }
        a.tokens as f64 / t.elapsed().as_secs_f64()
    };
    for &rate in &a.rates {
        let (mut cache, mut mtp) = fresh();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut produced, mut h) = (0, h0.clone());
        let t = Instant::now();
        while produced < a.tokens {
            let verified = mtp.len();
            let mut drafts = Vec::with_capacity(k);
            let (mut last_h, mut tok) = (h.clone(), 7u32);
            for _ in 0..k {
                let (logits, y) = model.mtp_step(0, &last_h, &[tok], &mut mtp, &mut mtp_ws).unwrap();
                tok = latent::sampling::argmax(logits);
                drafts.push(tok);
                last_h = y[y.len() - hidden..].to_vec();
            }
            mtp.truncate(verified + 1);
            let mut run = vec![7u32];
            run.extend(&drafts);
            let n = cache.len();
            model.decode_runs(&run, &[run.len()], &mut [&mut cache], &mut ws).unwrap();
            let accepted = (0..k).take_while(|_| rng.next() < rate).count();
            cache.truncate(n + 1 + accepted);
            h = ws.hidden()[accepted * hidden..(accepted + 1) * hidden].to_vec();
            produced += accepted + 1;
        }
        let tok_s = produced as f64 / t.elapsed().as_secs_f64();
        let expected: f64 = (1..=k).map(|j| rate.powi(j as i32)).sum::<f64>() + 1.0;
        let predicted = expected / (verify + k as f64 * draft) * plain;
        println!(
            "acceptance {rate:.2}: {tok_s:.2} tokens/s against {plain_tok_s:.2} plain: {:.2}x (from the step costs: \
             {predicted:.2}x)",
            tok_s / plain_tok_s
        );
    }
}
