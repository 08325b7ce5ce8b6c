//! `cargo +nightly fuzz run gguf`: see README.md, Fuzzing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latent::fuzz::run_target("gguf", data));
