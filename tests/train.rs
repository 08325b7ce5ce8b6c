//! Training: gradients against PyTorch, the balance losses against the papers' formulas, AdamW,
//! resuming, the auxiliary-loss-free bias, token dropping, SFT masks and bad run files.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use latent::model::moe::{drop_by_capacity, MoeTrace, MoeTraining, RouterSpec};
use latent::train::balance::{layer_losses, max_vio, update_bias, BalanceWeights, RouterShape};
use latent::train::loss::{batch_losses, Batch, LossSettings};
use latent::train::params::Params;
use latent::train::{RunFile, TrainOptions, Trainer};
use latent::weights::Weights;
use latent::{Config, Error};

fn fixture(name: &str) -> PathBuf {
    common::fixtures_dir().join(name)
}

const NO_AUX: LossSettings = LossSettings {
    balance: BalanceWeights { expert: 0.0, device: 0.0, comm: 0.0, sequence: 0.0 },
    capacity_factor: None,
    mtp_lambda: 0.0,
};

/// Every parameter's gradient of the language-model loss equals transformers' (train mode) within
/// 1e-4 relative (L2 over the tensor), and so does the loss.
fn grads_match_pytorch(name: &str) {
    let dir = fixture(name);
    let mut cfg = Config::from_file(&dir.join("config.json")).unwrap();
    cfg.num_nextn_predict_layers = 0; // transformers does not run V3's MTP module
    let params = Params::load(&cfg, &dir, &Device::Cpu).unwrap();
    let model = params.build_model(&cfg).unwrap();
    let reference = Weights::open_file(&dir.join("grads.safetensors"), DType::F32, &Device::Cpu).unwrap();
    let tokens: Vec<Vec<u32>> = reference
        .get("tokens", &[2, 16])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(|row| row.iter().map(|&t| t as u32).collect())
        .collect();
    let batch = Batch {
        samples: tokens.iter().map(Vec::as_slice).collect(),
        masks: vec![None, None],
        protected: vec![false, false],
    };
    let losses = batch_losses(&model, &batch, NO_AUX).unwrap();
    let want_loss = reference.get("loss", &[1]).unwrap().to_vec1::<f32>().unwrap()[0];
    assert!((losses.lm as f32 - want_loss).abs() < 1e-5 * want_loss, "{name}: loss {} vs {want_loss}", losses.lm);
    let grads = losses.total.backward().unwrap();
    let mut checked = 0;
    for (spec, var) in params.specs.iter().zip(&params.vars) {
        let want = reference.get(&format!("grad.{}", spec.name), &spec.shape).unwrap();
        let got = match grads.get(var.as_tensor()) {
            Some(g) => g.clone(),
            None => want.zeros_like().unwrap(),
        };
        let diff =
            (&got - &want).unwrap().sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
        let norm = want.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
        assert!(
            diff <= 1e-4 * norm.max(1e-6),
            "{name}: gradient of {} differs: |got - want| = {diff:e}, |want| = {norm:e}",
            spec.name
        );
        checked += 1;
    }
    assert!(checked > 50, "{name}: only {checked} tensors checked");
}

#[test]
fn v2_gradients_match_pytorch() {
    grads_match_pytorch("tiny-v2");
}

#[test]
fn v2_lite_gradients_match_pytorch() {
    grads_match_pytorch("tiny-v2-lite");
}

#[test]
fn v3_gradients_match_pytorch() {
    grads_match_pytorch("tiny-v3");
}

/// The training forward and the inference forward give the same logits on the same weights.
#[test]
fn training_forward_is_the_inference_forward() {
    let dir = fixture("tiny-v2");
    let cfg = Config::from_file(&dir.join("config.json")).unwrap();
    let params = Params::load(&cfg, &dir, &Device::Cpu).unwrap();
    let model = params.build_model(&cfg).unwrap();
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 320).collect();
    let moe = MoeTraining { capacity_factor: None, protected: &[false, false], seq_len: 12 };
    let out = model.forward_train(&tokens, 2, 12, &moe).unwrap();
    let (plain, _) = latent::Model::load(&dir, Some(DType::F32), &Device::Cpu).unwrap();
    for s in 0..2 {
        let mut cache = plain.new_cache().unwrap();
        let want = plain
            .forward(&tokens[s * 12..(s + 1) * 12], &mut cache, latent::AttentionPath::Expanded, latent::LogitRows::All)
            .unwrap();
        let got = out.logits.narrow(0, s * 12, 12).unwrap();
        common::assert_close("train vs inference logits", &got, &want, common::Tol { abs: 1e-4, rel: 1e-4 });
    }
}

fn trace(scores: Vec<Vec<f32>>, chosen: Vec<Vec<usize>>, seq_len: usize) -> MoeTrace {
    let (n, e) = (scores.len(), scores[0].len());
    let flat: Vec<f32> = scores.into_iter().flatten().collect();
    MoeTrace { scores: Tensor::from_vec(flat, (n, e), &Device::Cpu).unwrap(), chosen, dropped: 0, seq_len }
}

/// A hand-checked routing example: 4 tokens, 4 experts in 2 devices, top-2, at most 1 device each.
#[test]
fn balance_losses_follow_the_paper_formulas() {
    let scores = vec![
        vec![0.4, 0.3, 0.2, 0.1],
        vec![0.1, 0.2, 0.3, 0.4],
        vec![0.5, 0.25, 0.15, 0.1],
        vec![0.25, 0.25, 0.25, 0.25],
    ];
    let chosen = vec![vec![0, 1], vec![3, 2], vec![0, 1], vec![0, 2]];
    let shape = RouterShape { n_experts: 4, k: 2, n_group: 2, topk_group: 1 };
    let w = BalanceWeights { expert: 1.0, device: 1.0, comm: 1.0, sequence: 1.0 };
    let l = layer_losses(&trace(scores, chosen, 2), shape, w).unwrap();
    let value = |t: Option<Tensor>| t.unwrap().to_scalar::<f32>().unwrap() as f64;
    // Expert counts: e0 3, e1 2, e2 2, e3 1; f_i = 4/(2*4) * count = count / 2.
    // P = column means = [0.3125, 0.25, 0.225, 0.2125].
    let expert = 1.5 * 0.3125 + 1.0 * 0.25 + 1.0 * 0.225 + 0.5 * 0.2125;
    assert!((value(l.expert) - expert).abs() < 1e-6);
    // Devices {0,1}, {2,3}: f' = [(1.5+1)/2, (1+0.5)/2], P' = [0.5625, 0.4375].
    let device = 1.25 * 0.5625 + 0.75 * 0.4375;
    assert!((value(l.device) - device).abs() < 1e-6);
    // Tokens sent to device 0: t0, t2, t3 (3); device 1: t1, t3 (2); f'' = 2/(1*4) * count.
    let comm = 1.5 * 0.5625 + 1.0 * 0.4375;
    assert!((value(l.comm) - comm).abs() < 1e-6);
    // Sequence-wise over sequences {t0,t1} and {t2,t3} (rows already sum to 1, so s' = s):
    // seq 0: counts [1,1,1,1] -> f = 1 each, P = [0.25, 0.25, 0.25, 0.25] -> 1.0;
    // seq 1: counts [2,1,1,0] -> f = [2,1,1,0], P = [0.375, 0.25, 0.2, 0.175] -> 0.75+0.25+0.2.
    let sequence = (1.0 + (0.75 + 0.25 + 0.2)) / 2.0;
    assert!((value(l.sequence) - sequence).abs() < 1e-6);
}

#[test]
fn max_vio_and_bias_update() {
    assert_eq!(max_vio(&[10, 10, 10, 10]), 0.0);
    assert!((max_vio(&[30, 10, 0, 0]) - 2.0).abs() < 1e-12);
    let mut bias = vec![0.0f32; 4];
    update_bias(&mut bias, &[30, 10, 0, 0], 0.01);
    assert_eq!(bias, vec![-0.01, 0.0, 0.01, 0.01], "at the mean load the bias stays");
}

/// Over-full devices lose their lowest-affinity assignments, never a protected sequence's, and end
/// at or under capacity when enough unprotected assignments exist.
#[test]
fn token_dropping_respects_capacity_and_protection() {
    let spec = RouterSpec {
        scoring_func: latent::config::ScoringFunc::Softmax,
        topk_method: latent::config::TopkMethod::Greedy,
        n_routed_experts: 4,
        k: 1,
        n_group: 2,
        topk_group: 2,
        norm_topk_prob: false,
        routed_scaling_factor: 1.0,
        scale_after_norm: false,
    };
    // 8 tokens (2 sequences of 4), all routed to device 0; capacity = 1.0 * 8 / 2 = 4.
    let chosen: Vec<Vec<usize>> = (0..8).map(|t| vec![t % 2]).collect();
    let scores: Vec<Vec<f32>> = (0..8).map(|t| vec![0.1 * t as f32 + 0.05, 0.1 * t as f32, 0.0, 0.0]).collect();
    let opts = MoeTraining { capacity_factor: Some(1.0), protected: &[false, false], seq_len: 4 };
    let kept = drop_by_capacity(&chosen, &scores, &spec, 1.0, &opts);
    let kept_tokens: Vec<usize> = (0..8).filter(|&t| kept[t][0]).collect();
    assert_eq!(kept_tokens, vec![4, 5, 6, 7], "the four highest-affinity assignments stay");
    // Protect sequence 1 (tokens 4..8): only sequence 0 can be dropped.
    let opts = MoeTraining { capacity_factor: Some(1.0), protected: &[false, true], seq_len: 4 };
    let kept = drop_by_capacity(&chosen, &scores, &spec, 1.0, &opts);
    assert!((4..8).all(|t| kept[t][0]), "protected tokens are never dropped");
    assert!((0..4).all(|t| !kept[t][0]), "the unprotected ones go first");
    // Protect both: over capacity, but nothing may go.
    let opts = MoeTraining { capacity_factor: Some(1.0), protected: &[true, true], seq_len: 4 };
    assert!(drop_by_capacity(&chosen, &scores, &spec, 1.0, &opts).iter().all(|k| k[0]));
}

/// A scratch corpus and tokenizer for end-to-end runs.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..400)
            .map(|i| {
                format!(
                    "{} And the {} said unto them, {} the {} of the {}.\n",
                    i % 31,
                    WORDS[i % 7],
                    WORDS[(i * 3) % 7],
                    WORDS[(i * 5 + 1) % 7],
                    WORDS[(i * 2 + 3) % 7]
                )
            })
            .collect();
        std::fs::write(dir.path().join("train.txt"), &text).unwrap();
        std::fs::write(dir.path().join("valid.txt"), &text[..4000]).unwrap();
        latent::tokenizer::train_bpe(&[dir.path().join("train.txt")], 400, &dir.path().join("tok")).unwrap();
        Scratch { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn run(&self, preset: &str, out: &str, extra: &[&str]) -> RunFile {
        let mut o = vec![
            format!("data.train=[{:?}]", self.path("train.txt").to_string_lossy()),
            format!("data.valid=[{:?}]", self.path("valid.txt").to_string_lossy()),
            format!("data.tokenizer={:?}", self.path("tok").to_string_lossy()),
            format!("run.out={:?}", self.path(out).to_string_lossy()),
            "data.seq_len=16".into(),
            "data.batch_size=2".into(),
            "run.eval_every=0".into(),
            "run.eval_batches=2".into(),
        ];
        o.extend(extra.iter().map(|s| s.to_string()));
        RunFile::load(&format!("preset:{preset}"), &o).unwrap().0
    }
}

const WORDS: [&str; 7] = ["lord", "people", "king", "house", "land", "city", "children"];

fn train(run: RunFile, opts: &TrainOptions) -> Trainer {
    let mut t = Trainer::new(run, Path::new("<test>"), opts).unwrap();
    t.run(|_| {}).unwrap();
    t
}

/// N steps straight, and N/2 + save + resume + N/2, give the same losses and the same weights.
#[test]
fn resume_continues_exactly() {
    let s = Scratch::new();
    for preset in ["tiny-v2", "tiny-v3"] {
        let straight = train(s.run(preset, &format!("{preset}-a"), &["schedule.steps=6"]), &TrainOptions::default());
        // Interrupted after 3 of 6 steps, with a checkpoint there.
        let mut half = Trainer::new(
            s.run(preset, &format!("{preset}-b"), &["schedule.steps=6"]),
            Path::new("<test>"),
            &TrainOptions::default(),
        )
        .unwrap();
        half.run_until(3, |_| {}).unwrap();
        half.save().unwrap();
        drop(half);
        let resumed = train(
            s.run(preset, &format!("{preset}-b"), &["schedule.steps=6"]),
            &TrainOptions { resume: true, ..Default::default() },
        );
        let (a, b) = (straight.history(), resumed.history());
        assert_eq!(a.len(), 6);
        assert_eq!(b.len(), 6, "{preset}: the resumed log keeps the first half");
        for (x, y) in a.iter().zip(b) {
            assert!((x.loss - y.loss).abs() < 1e-6, "{preset} step {}: {} vs {}", x.step, x.loss, y.loss);
        }
        let (wa, wb) = (straight.params().values().unwrap(), resumed.params().values().unwrap());
        assert_eq!(wa, wb, "{preset}: weights differ after resuming");
        // The last checkpoint loads for inference, and its logits are the trained model's.
        let dir = latent::train::checkpoint::latest(&s.path(&format!("{preset}-b"))).unwrap();
        let (model, _) = latent::Model::load(&dir, Some(DType::F32), &Device::Cpu).unwrap();
        let mut cache = model.new_cache().unwrap();
        let toks = [5u32, 9, 30, 2];
        let got = model.forward(&toks, &mut cache, latent::AttentionPath::Expanded, latent::LogitRows::All).unwrap();
        let moe = MoeTraining { capacity_factor: None, protected: &[false], seq_len: 4 };
        let want = resumed.model().forward_train(&toks, 1, 4, &moe).unwrap().logits;
        common::assert_close("checkpoint logits", &got, &want, common::Tol { abs: 1e-4, rel: 1e-4 });
    }
}

/// The auxiliary-loss-free bias balances: MaxVio over the last steps is lower with gamma than
/// without it, on the same run.
#[test]
fn aux_free_bias_reduces_max_vio() {
    let s = Scratch::new();
    let common = ["schedule.steps=40", "balance.seq_alpha=0.0", "model.initializer_range=0.3", "optim.lr=1e-3"];
    let mut with = common.to_vec();
    with.push("balance.gamma=0.01");
    let mut without = common.to_vec();
    without.push("balance.gamma=0.0");
    let a = train(s.run("tiny-v3", "with", &with), &TrainOptions::default());
    let b = train(s.run("tiny-v3", "without", &without), &TrainOptions::default());
    let late = |t: &Trainer| t.history()[30..].iter().map(|h| h.max_vio_mean).sum::<f64>() / 10.0;
    let first = |t: &Trainer| t.history()[0].max_vio_mean;
    assert!(late(&a) < late(&b), "MaxVio with the bias {} vs without {}", late(&a), late(&b));
    assert!(late(&a) < first(&a), "MaxVio falls over training: {} -> {}", first(&a), late(&a));
}

/// With a capacity factor the log reports dropped assignments; protected share 1 drops none.
#[test]
fn token_dropping_in_a_run() {
    let s = Scratch::new();
    let extra = ["schedule.steps=3", "balance.capacity_factor=0.5", "model.initializer_range=0.3"];
    let dropped = train(s.run("tiny-v2", "drop", &extra), &TrainOptions::default());
    assert!(dropped.history().iter().all(|h| h.dropped_share > 0.0));
    let mut all_protected = extra.to_vec();
    all_protected.push("balance.protected_share=1.0");
    let kept = train(s.run("tiny-v2", "keep", &all_protected), &TrainOptions::default());
    assert!(kept.history().iter().all(|h| h.dropped_share == 0.0));
}

/// SFT: prompt tokens contribute no gradient; only assistant replies are learned.
#[test]
fn sft_masks_prompt_tokens() {
    let s = Scratch::new();
    let tok = latent::Tokenizer::load(&s.path("tok"), None).unwrap();
    let messages = vec![
        latent::tokenizer::Message::new("user", "the king said"),
        latent::tokenizer::Message::new("assistant", "unto the people"),
        latent::tokenizer::Message::new("user", "and the lord"),
        latent::tokenizer::Message::new("assistant", "of the land"),
    ];
    let (tokens, mask) = latent::train::data::render_masked(&tok, &messages).unwrap();
    let learned: Vec<u32> = tokens.iter().zip(&mask).filter(|(_, &m)| m).map(|(&t, _)| t).collect();
    let text = tok.decode(&learned, false).unwrap();
    assert_eq!(text, "unto the people<｜end▁of▁sentence｜>of the land<｜end▁of▁sentence｜>");

    // The masked loss and its gradient are those of the assistant targets alone: the prompt's
    // targets add nothing.
    let dir = fixture("tiny-v2");
    let cfg = Config::from_file(&dir.join("config.json")).unwrap();
    let params = Params::load(&cfg, &dir, &Device::Cpu).unwrap();
    let model = params.build_model(&cfg).unwrap();
    let sample: Vec<u32> = vec![5, 10, 11, 12, 13, 14];
    let mask = vec![false, false, true, false, true]; // targets 12 and 14 count
    let batch = Batch { samples: vec![&sample], masks: vec![Some(&mask)], protected: vec![false] };
    let masked = batch_losses(&model, &batch, NO_AUX).unwrap();
    let moe = MoeTraining { capacity_factor: None, protected: &[false], seq_len: 5 };
    let logits = model.forward_train(&sample[..5], 1, 5, &moe).unwrap().logits;
    let rows = Tensor::new(&[2u32, 4], &Device::Cpu).unwrap();
    let only =
        latent::train::loss::cross_entropy(&logits.index_select(&rows, 0).unwrap(), &[12, 14], None).unwrap().unwrap();
    assert!((masked.lm - only.to_scalar::<f32>().unwrap() as f64).abs() < 1e-6);
    let (ga, gb) = (masked.total.backward().unwrap(), only.backward().unwrap());
    for (spec, var) in params.specs.iter().zip(&params.vars) {
        match (ga.get(var.as_tensor()), gb.get(var.as_tensor())) {
            (Some(a), Some(b)) => common::assert_close(&spec.name, a, b, common::Tol { abs: 1e-6, rel: 1e-5 }),
            (None, None) => {}
            _ => panic!("{}: gradient present in one run only", spec.name),
        }
    }
    // Every target masked: nothing to learn, no loss term.
    let none = vec![false; 5];
    let batch = Batch { samples: vec![&sample], masks: vec![Some(&none)], protected: vec![false] };
    assert_eq!(batch_losses(&model, &batch, NO_AUX).unwrap().lm, 0.0);
}

/// `--init DIR --sft FILE`: fine-tuning starts from the checkpoint and learns the replies.
#[test]
fn sft_run_from_a_checkpoint() {
    let s = Scratch::new();
    train(s.run("tiny-v2", "base", &["schedule.steps=2"]), &TrainOptions::default());
    let base = latent::train::checkpoint::latest(&s.path("base")).unwrap();
    let line = r#"{"messages": [{"role": "user", "content": "who said it"}, {"role": "assistant", "content": "the king of the land"}]}"#;
    let jsonl: String = (0..12).map(|_| format!("{line}\n")).collect();
    std::fs::write(s.path("chat.jsonl"), jsonl).unwrap();
    let opts = TrainOptions { init: Some(base.clone()), sft: Some(s.path("chat.jsonl")), resume: false };
    let run = s.run(
        "tiny-v2",
        "sft",
        &["schedule.steps=8", "schedule.warmup_steps=1", "optim.lr=1e-2", "data.valid_fraction=0.0"],
    );
    let t = train(run, &opts);
    let h = t.history();
    assert!(
        h.last().unwrap().lm_loss < h[0].lm_loss * 0.7,
        "SFT loss {} -> {}",
        h[0].lm_loss,
        h.last().unwrap().lm_loss
    );
    // A conversation file without replies is refused, naming the file and line.
    std::fs::write(s.path("bad.jsonl"), r#"{"messages": [{"role": "user", "content": "hi"}]}"#).unwrap();
    let opts = TrainOptions { init: Some(base), sft: Some(s.path("bad.jsonl")), resume: false };
    let err = Trainer::new(s.run("tiny-v2", "bad", &[]), Path::new("<test>"), &opts).err().unwrap();
    assert!(err.to_string().contains("bad.jsonl") && err.to_string().contains("line 1"), "{err}");
}

#[test]
fn bad_run_files_are_clear_errors() {
    let p = Path::new("run.toml");
    let err = RunFile::parse("[model]\nhidden_size = 8\n[optim]\nlearning_rate = 1\n", p, &[]).unwrap_err();
    assert!(err.to_string().contains("learning_rate"), "{err}");
    let preset = latent::train::run::PRESETS.iter().find(|(name, _)| *name == "tiny-v2").unwrap().1;
    let err = RunFile::parse(preset, p, &["optim.lr=-1".into()]).unwrap_err();
    assert!(err.to_string().contains("optim.lr") && err.to_string().contains("-1"), "{err}");
    let err = RunFile::parse(preset, p, &["schedule.kind=linear".into()]).unwrap_err();
    assert!(err.to_string().contains("schedule.kind"), "{err}");
    let err = RunFile::parse(preset, p, &["model.n_group=3".into()]).unwrap_err();
    assert!(err.to_string().contains("n_group"), "{err}");
    // A misspelt model key, in the file or by --set, is refused with the key it likely meant.
    let err = RunFile::parse(preset, p, &["model.num_hiden_layers=3".into()]).unwrap_err().to_string();
    assert!(err.contains("model.num_hiden_layers") && err.contains("did you mean `num_hidden_layers`"), "{err}");
    let typo = preset.replace("[model]\n", "[model]\nkv_lora_ranks = 8\n");
    assert_ne!(typo, preset, "the preset has a [model] section");
    let err = RunFile::parse(&typo, p, &[]).unwrap_err().to_string();
    assert!(err.contains("model.kv_lora_ranks") && err.contains("kv_lora_rank"), "{err}");
    // Keys of a published config.json that latent does not use are accepted.
    assert!(RunFile::parse(preset, p, &["model.transformers_version=\"4.46\"".into()]).is_ok());
    let err = RunFile::load("preset:nope", &[]).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    let err = RunFile::parse(preset, p, &["noequals".into()]).unwrap_err();
    assert!(err.to_string().contains("KEY=VALUE"), "{err}");
}

#[test]
fn missing_corpus_and_broken_checkpoints_are_clear_errors() {
    let s = Scratch::new();
    let mut run = s.run("tiny-v2", "missing", &["schedule.steps=1"]);
    run.data.train = vec![s.path("no-such-file.txt")];
    let err = Trainer::new(run, Path::new("<test>"), &TrainOptions::default()).err().unwrap();
    assert!(err.to_string().contains("no-such-file.txt"), "{err}");

    train(s.run("tiny-v2", "ckpt", &["schedule.steps=1"]), &TrainOptions::default());
    let dir = latent::train::checkpoint::latest(&s.path("ckpt")).unwrap();
    // Truncated weights: resuming and loading both fail with the file named.
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let resume = s.run("tiny-v2", "ckpt", &["schedule.steps=2"]);
    let err =
        Trainer::new(resume, Path::new("<test>"), &TrainOptions { resume: true, ..Default::default() }).err().unwrap();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    assert!(matches!(latent::Model::load(&dir, None, &Device::Cpu), Err(Error::Safetensors { .. })));
    // A corrupted trainer state.
    std::fs::write(&weights, &bytes).unwrap();
    std::fs::write(dir.join("trainer_state.json"), "{\"step\": \"x\"}").unwrap();
    let resume = s.run("tiny-v2", "ckpt", &["schedule.steps=2"]);
    let err =
        Trainer::new(resume, Path::new("<test>"), &TrainOptions { resume: true, ..Default::default() }).err().unwrap();
    assert!(err.to_string().contains("trainer_state.json"), "{err}");
}

/// MTP (DeepSeek-V3 §2.2): depth-1 logits at row i see tokens up to i + 1 only, and a V3 checkpoint
/// carries the MTP module under the published tensor names.
#[test]
fn mtp_is_causal_and_saved_with_v3_names() {
    let s = Scratch::new();
    let t = train(s.run("tiny-v3", "mtp", &["schedule.steps=2"]), &TrainOptions::default());
    assert!(t.history().iter().all(|h| h.mtp_loss.is_some_and(|l| l > 0.0)));
    let model = t.model();
    assert_eq!(model.mtp_depth(), 1);
    let a: Vec<u32> = vec![7, 8, 9, 10, 11, 12, 13, 14];
    let mut b = a.clone();
    b[6] = 40; // changes what rows >= 5 may see (row i sees tokens <= i + 1)
    let moe = MoeTraining { capacity_factor: None, protected: &[false], seq_len: 8 };
    let la = model.forward_train(&a, 1, 8, &moe).unwrap().mtp_logits.remove(0);
    let lb = model.forward_train(&b, 1, 8, &moe).unwrap().mtp_logits.remove(0);
    assert_eq!(la.dims(), &[7, 512]);
    common::assert_close(
        "rows before the change",
        &la.narrow(0, 0, 5).unwrap(),
        &lb.narrow(0, 0, 5).unwrap(),
        common::Tol { abs: 1e-6, rel: 1e-6 },
    );
    let moved = (la.narrow(0, 5, 1).unwrap() - lb.narrow(0, 5, 1).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
    assert!(moved.to_scalar::<f32>().unwrap() > 1e-4, "row 5 sees token 6");

    let dir = latent::train::checkpoint::latest(&s.path("mtp")).unwrap();
    let w = Weights::open(&dir, None, &Device::Cpu).unwrap();
    for name in [
        "enorm.weight",
        "hnorm.weight",
        "eh_proj.weight",
        "shared_head.norm.weight",
        "shared_head.head.weight",
        "embed_tokens.weight",
        "self_attn.kv_b_proj.weight",
        "mlp.gate.e_score_correction_bias",
    ] {
        assert!(w.contains(&format!("model.layers.2.{name}")), "{name} missing from the MTP layer");
    }
}

/// Two micro-batches of 2 accumulate to the step one batch of 4 takes (balance losses off, as they
/// are per micro-batch by definition).
#[test]
fn gradient_accumulation_equals_the_larger_batch() {
    let s = Scratch::new();
    let off = ["schedule.steps=1", "balance.alpha1=0.0", "balance.alpha2=0.0", "balance.alpha3=0.0"];
    let mut big = off.to_vec();
    big.push("data.batch_size=4");
    let mut accum = off.to_vec();
    accum.extend(["data.batch_size=2", "optim.accumulation=2"]);
    let a = train(s.run("tiny-v2", "big", &big), &TrainOptions::default());
    let b = train(s.run("tiny-v2", "accum", &accum), &TrainOptions::default());
    assert!((a.history()[0].lm_loss - b.history()[0].lm_loss).abs() < 1e-5);
    assert!((a.history()[0].grad_norm - b.history()[0].grad_norm).abs() < 1e-4 * a.history()[0].grad_norm);
    for (x, y) in a.params().values().unwrap().iter().zip(b.params().values().unwrap()) {
        for (p, q) in x.iter().zip(&y) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }
}

/// DeepSeek-V2's schedule: linear warm-up, then x0.316 at 60% and again at 90% of the steps.
#[test]
fn learning_rate_schedules() {
    let run =
        RunFile::load("preset:tiny-v2", &["schedule.steps=100".into(), "schedule.warmup_steps=10".into()]).unwrap().0;
    let s = &run.schedule;
    let lr = |step| s.lr_at(1.0, step);
    assert!((lr(0) - 0.1).abs() < 1e-12 && (lr(9) - 1.0).abs() < 1e-12);
    assert_eq!(lr(59), 1.0);
    assert!((lr(60) - 0.316).abs() < 1e-12 && (lr(89) - 0.316).abs() < 1e-12);
    assert!((lr(90) - 0.316 * 0.316).abs() < 1e-12);
    let cos = RunFile::load(
        "preset:tiny-v2",
        &["schedule.kind=cosine".into(), "schedule.steps=110".into(), "schedule.warmup_steps=10".into()],
    )
    .unwrap()
    .0;
    let c = |step| cos.schedule.lr_at(1.0, step);
    assert!((c(10) - 1.0).abs() < 1e-12 && (c(60) - 0.55).abs() < 1e-9 && (c(110) - 0.1).abs() < 1e-9);
}

/// A saved config.json spells out what latent resolved where transformers would default otherwise
/// (no query compression is `"q_lora_rank": null`, not an absent key meaning 1536 to transformers).
#[test]
fn saved_config_is_explicit() {
    let run = RunFile::load("preset:v2-lite-6m", &[]).unwrap().0;
    assert!(!run.model.contains_key("q_lora_rank"));
    let json = run.config_json(Some(0), Some(1)).unwrap();
    assert!(json.get("q_lora_rank").is_some_and(|v| v.is_null()), "{json}");
    for key in
        ["num_key_value_heads", "n_group", "topk_group", "topk_method", "scoring_func", "norm_topk_prob", "rope_theta"]
    {
        assert!(json.get(key).is_some(), "{key} missing from {json}");
    }
    assert_eq!(json["architectures"][0], "DeepseekV2ForCausalLM");
}

/// Every folder under a checkpoint's name is complete and loads: weights, config, tokenizer.
fn assert_checkpoints_load(out: &Path) -> usize {
    let found = latent::train::checkpoint::list(out).unwrap();
    for (step, dir) in &found {
        for f in latent::train::checkpoint::CHECKPOINT_FILES {
            assert!(dir.join(f).is_file(), "checkpoint {step} lacks {f}");
        }
        latent::Model::load(dir, Some(DType::F32), &Device::Cpu).unwrap_or_else(|e| panic!("checkpoint {step}: {e}"));
        latent::Tokenizer::load(dir, None).unwrap_or_else(|e| panic!("checkpoint {step}: {e}"));
    }
    found.len()
}

/// A resumed run, and a run started with `--init`, write complete checkpoints after the folder they
/// started from is pruned or deleted: the tokenizer is read when the run starts.
#[test]
fn checkpoints_stay_complete_after_their_origin_is_gone() {
    let s = Scratch::new();
    train(s.run("tiny-v2", "a", &["schedule.steps=2", "run.save_every=1"]), &TrainOptions::default());
    // Resuming from checkpoint 2 and saving 3..8 prunes checkpoint 2 (3 are kept).
    let resumed = s.run("tiny-v2", "a", &["schedule.steps=8", "run.save_every=1"]);
    train(resumed, &TrainOptions { resume: true, ..Default::default() });
    let out = s.path("a");
    assert!(!out.join("checkpoint-000002").exists(), "pruned");
    assert_eq!(assert_checkpoints_load(&out), 3);

    // --init from a copy that is deleted once the run has started.
    let init = s.path("init");
    std::fs::create_dir_all(&init).unwrap();
    for e in std::fs::read_dir(out.join("checkpoint-000008")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), init.join(e.file_name())).unwrap();
    }
    let mut run = s.run("tiny-v2", "b", &["schedule.steps=2", "run.save_every=1"]);
    run.model = toml::Table::new();
    let mut t =
        Trainer::new(run, Path::new("<test>"), &TrainOptions { init: Some(init.clone()), ..Default::default() })
            .unwrap();
    std::fs::remove_dir_all(&init).unwrap();
    t.run(|_| {}).unwrap();
    assert_eq!(assert_checkpoints_load(&s.path("b")), 2);

    // A run whose tokenizer folder lacks tokenizer.json fails at the start, naming the file.
    std::fs::remove_file(s.path("tok/tokenizer.json")).unwrap();
    let err = Trainer::new(s.run("tiny-v2", "c", &["schedule.steps=1"]), Path::new("<test>"), &Default::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

/// Pruning orders checkpoints by their parsed step (past step 999,999 the names grow a digit), keeps
/// the newest, and leaves alone anything not named exactly as latent names a checkpoint.
#[test]
fn pruning_keeps_the_newest_by_step_and_ignores_foreign_entries() {
    use latent::train::checkpoint::{latest, list, parse_checkpoint_name, prune};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    for step in [999_997usize, 999_998, 999_999, 1_000_000, 1_000_001] {
        std::fs::create_dir_all(out.join(format!("checkpoint-{step:06}"))).unwrap();
    }
    std::fs::create_dir_all(out.join("checkpoint-old")).unwrap();
    std::fs::create_dir_all(out.join("checkpoint-12")).unwrap();
    std::fs::write(out.join("checkpoint-notes.txt"), "mine").unwrap();
    std::fs::write(out.join("checkpoint-000005"), "a file, not a checkpoint").unwrap();
    prune(out, 3, 1_000_001).unwrap();
    let steps: Vec<usize> = list(out).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [999_999, 1_000_000, 1_000_001]);
    for foreign in ["checkpoint-old", "checkpoint-12", "checkpoint-notes.txt", "checkpoint-000005"] {
        assert!(out.join(foreign).exists(), "{foreign} was touched");
    }
    // Without a `latest` pointer, the newest by step.
    assert!(latest(out).unwrap().ends_with("checkpoint-1000001"));
    std::fs::write(out.join("latest"), "checkpoint-999999").unwrap();
    assert!(latest(out).unwrap().ends_with("checkpoint-999999"));
    for name in ["checkpoint-12", "checkpoint-0000012", "checkpoint-+00012", "checkpoint-", "checkpoint-000012.bak"] {
        assert_eq!(parse_checkpoint_name(name), None, "{name}");
    }
    assert_eq!(parse_checkpoint_name("checkpoint-000012"), Some(12));
}

/// The memory estimate tracks measured peaks of this trainer (resident set of `latent train`, this
/// machine): v2-lite-6m at 8 x 256 tokens 0.96 GB, 32 x 256 3.26 GB, 4 x 1024 3.06 GB; tiny-v2 at
/// 64 x 256 1.51 GB (each with about 0.2 GB of process, data and tokenizer besides).
#[test]
fn training_memory_estimate_tracks_measured_peaks() {
    let p = Path::new("<test>");
    for (preset, batch, seq, measured_gb) in [
        ("v2-lite-6m", 8, 256, 0.96),
        ("v2-lite-6m", 32, 256, 3.26),
        ("v2-lite-6m", 4, 1024, 3.06),
        ("tiny-v2", 64, 256, 1.51),
    ] {
        let (run, _) = RunFile::load(&format!("preset:{preset}"), &[]).unwrap();
        let est = latent::train::trainer::estimate_memory(&run.config(p).unwrap(), seq);
        let gb = (est.total((batch * seq) as f64) + 0.2e9) / 1e9;
        assert!(
            (0.75..1.25).contains(&(gb / measured_gb)),
            "{preset} {batch}x{seq}: estimated {gb:.2} GB, measured {measured_gb} GB"
        );
    }
}

/// A batch that cannot fit this machine's memory is refused before anything is allocated, naming
/// the key and what would fit.
#[test]
fn a_batch_beyond_memory_is_refused_naming_the_key() {
    let s = Scratch::new();
    let run = s.run("tiny-v2", "huge", &["data.batch_size=1000000000000", "schedule.steps=1"]);
    let started = std::time::Instant::now();
    let err = Trainer::new(run, Path::new("<test>"), &TrainOptions::default()).err().unwrap().to_string();
    assert!(err.contains("data.batch_size") && err.contains("available") && err.contains("at most"), "{err}");
    assert!(started.elapsed().as_secs() < 10);
    // A model too large for the machine names the model.
    let run = s.run("tiny-v2", "huge", &["model.vocab_size=4000000000", "model.hidden_size=8192", "schedule.steps=1"]);
    let err = Trainer::new(run, Path::new("<test>"), &TrainOptions::default()).err().unwrap().to_string();
    assert!(err.contains("model") && err.contains("available"), "{err}");
}
