//! latent: runs and trains DeepSeek-V2-family models (DeepSeek-V2, V2-Lite, V3) from and to their
//! published Hugging Face checkpoint layout, with a latent-only KV cache.
//!
//! ```text
//! config.json ─► Config ─┐
//! *.safetensors ─► Weights (mmap, dtype, names) ─► Model
//!                                                   │  embed → [MLA → FFN|MoE] × L → norm → lm_head
//! tokenizer.json ─► Tokenizer ─► token ids ─────────┤
//!                                                   ▼
//!                         LatentCache (c_kv ‖ k_rope per layer)
//!                                                   ▼
//!                  Sampler (temperature, top-k/p, penalty, seed) ─► tokens ─► text
//!
//! text ─► Tokenizer ─► train::data (windows, seeded order) ─► Trainer (Model::forward_train over
//!   autograd variables, losses incl. balance/MTP, AdamW) ─► checkpoint in the same layout
//! ```

pub mod bench;
pub mod bench_serve;
pub mod cache;
pub mod config;
pub mod engine;
pub mod error;
pub mod model;
pub mod weights;

pub use cache::LatentCache;
pub use config::Config;
pub use error::{Error, ErrorKind, Result};
pub use model::{AttentionPath, LogitRows, Model, Span, Workspace};
pub mod generate;
pub mod inspect;
pub mod kernels;
pub mod perplexity;
pub mod sampling;
pub mod server;
pub mod tokenizer;

pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::Tokenizer;
pub mod bounded;
pub mod fuzz;
pub mod plot;
pub mod resources;
pub mod train;
