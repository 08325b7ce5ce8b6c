//! `cargo +nightly fuzz run run_file`: see README.md, Fuzzing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| latent::fuzz::run_target("run file", data));
