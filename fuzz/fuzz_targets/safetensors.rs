//! `cargo +nightly fuzz run safetensors`: see README.md, Fuzzing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latent::fuzz::run_target("safetensors", data));
