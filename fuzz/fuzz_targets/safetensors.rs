//! `cargo +nightly fuzz run safetensors`: see README.md, Fuzzing.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
fn scratch() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("latent-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

fuzz_target!(|data: &[u8]| {
    // latent catches some third-party panics (the tokenizers library on malformed input) and
    // reports them as errors; libFuzzer's hook would abort on those, so latent's hook goes first.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(latent::bounded::install_panic_hook);
    // Errors are expected; a panic, a hang or a memory blow-up is what libFuzzer reports.
    let _ = latent::fuzz::safetensors(data, &scratch());
});
