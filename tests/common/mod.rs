//! Shared test helpers: fixtures made by tools/make_fixtures.py, and `assert_close`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;

/// Absolute and relative tolerance: |a - b| <= abs + rel * |b|.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    pub abs: f32,
    pub rel: f32,
}

impl Tol {
    /// f32 parity with the reference.
    pub const F32: Tol = Tol { abs: 1e-4, rel: 0.0 };
}

/// Fails with the worst index, its values, and the first few values, if `got` and `want` differ.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: Tol) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let (mut worst, mut worst_err) = (0, 0f32);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert_eq!(a.is_finite(), b.is_finite(), "{what}: finiteness differs at {i}: {a} vs {b}");
        let err = (a - b).abs() - tol.rel * b.abs();
        if err > worst_err {
            (worst, worst_err) = (i, err);
        }
    }
    assert!(
        worst_err <= tol.abs,
        "{what}: max error {worst_err:e} at index {worst} (got {}, want {}); first values got {:?} want {:?}",
        g[worst],
        w[worst],
        &g[..4.min(g.len())],
        &w[..4.min(w.len())]
    );
}

#[derive(Debug, Deserialize)]
pub struct Perplexity {
    pub file: String,
    pub context: usize,
    pub tokens: usize,
    pub nll: f64,
    pub ppl: f64,
}

#[derive(Debug, Deserialize)]
pub struct Meta {
    pub transformers: String,
    pub prompt_tokens: Vec<u32>,
    pub greedy_tokens: Vec<u32>,
    pub perplexity: Option<Perplexity>,
}

/// A fixture folder and what transformers computed for it.
pub struct Fixture {
    pub dir: PathBuf,
    pub meta: Meta,
    reference: HashMap<String, Tensor>,
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The fixture names with a model in them.
pub const MODELS: [&str; 4] = ["tiny-v2", "tiny-v2-lite", "tiny-v3", "tiny-v32"];

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        let dir = fixtures_dir().join(name);
        let meta: Meta = serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
        let reference = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
        Fixture { dir, meta, reference }
    }

    pub fn reference(&self, name: &str) -> &Tensor {
        self.reference.get(name).unwrap_or_else(|| panic!("reference has no `{name}`"))
    }

    /// `model`'s greedy continuation of the fixture's prompt, as many tokens as the reference's.
    pub fn greedy_tokens(&self, model: &latent::Model) -> Vec<u32> {
        let tokenizer = latent::Tokenizer::load(&self.dir, Some(model.config())).unwrap();
        let sampling = latent::SamplingParams { temperature: 0.0, ..Default::default() };
        let request = latent::generate::Request::new(self.meta.greedy_tokens.len(), sampling);
        let mut cache = model.new_cache().unwrap();
        let prompt = &self.meta.prompt_tokens;
        latent::generate::generate(model, &tokenizer, &mut cache, prompt, &request, |_| {}).unwrap().tokens
    }
}

/// A fixture with its model and tokenizer loaded in f32.
pub fn load_model(name: &str) -> (Fixture, latent::Model, latent::Tokenizer) {
    let fx = Fixture::load(name);
    let (model, _) = latent::Model::load(&fx.dir, None, &Device::Cpu).unwrap();
    let tokenizer = latent::Tokenizer::load(&fx.dir, Some(model.config())).unwrap();
    (fx, model, tokenizer)
}

/// A copy of a fixture folder in a temporary directory, to break on purpose.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures_dir().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

/// Rewrites one top-level field of a copied fixture's config.json.
pub fn set_config_value(dir: &Path, field: &str, value: serde_json::Value) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg[field] = value;
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
}
