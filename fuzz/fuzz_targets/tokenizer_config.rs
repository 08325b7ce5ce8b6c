//! `cargo +nightly fuzz run tokenizer_config`: see README.md, Fuzzing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latent::fuzz::run_target("tokenizer_config.json", data));
