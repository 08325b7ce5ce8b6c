//! A decode step allocates nothing once its workspace has seen a token: every allocation in
//! the process is counted while tokens are decoded. (One test in this file: tests in the same
//! binary run side by side and would be counted too.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device};
use latent::cache::CacheKind;
use latent::weights::Quant;
use latent::{AttentionPath, LogitRows, Model, Workspace};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> usize {
    ALLOCATIONS.load(Ordering::Relaxed)
}

const PROMPT: usize = 8;
const WARM: usize = 3;
const MEASURED: usize = 64;

fn tokens() -> Vec<u32> {
    (0..(PROMPT + WARM + MEASURED) as u32).map(|i| 4 + (i * 37 + 11) % 300).collect()
}

/// Allocations while decoding `MEASURED` tokens after a prompt and `WARM` tokens, by the step
/// (`step`) or by `forward`.
fn count(model: &Model, kind: CacheKind, step: bool) -> usize {
    let tokens = tokens();
    let mut cache = model.new_cache_of(kind).unwrap();
    cache.reserve(tokens.len()).unwrap();
    model.forward(&tokens[..PROMPT], &mut cache, AttentionPath::Expanded, LogitRows::Last).unwrap();
    let mut ws = Workspace::default();
    let decode = |t: u32, cache: &mut latent::LatentCache, ws: &mut Workspace| match step {
        true => drop(model.decode_step(t, cache, ws).unwrap()),
        false => drop(model.forward(&[t], cache, AttentionPath::Absorbed, LogitRows::Last).unwrap()),
    };
    for &t in &tokens[PROMPT..PROMPT + WARM] {
        decode(t, &mut cache, &mut ws);
    }
    let before = allocations();
    for &t in &tokens[PROMPT + WARM..] {
        decode(t, &mut cache, &mut ws);
    }
    allocations() - before
}

#[test]
fn decode_steps_allocate_nothing_per_token() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let load = |name: &str, dtype: DType, quant: Option<Quant>| {
        Model::load_quantized(&dir.join(name), Some(dtype), quant, &Device::Cpu, |_, _| {}).unwrap().0
    };
    let models = vec![
        ("tiny-v3-256 Q4_K", load("tiny-v3-256", DType::F32, Some(Quant::Q4K))),
        ("gguf Q8_0", load("gguf/tiny-v3-256-q8_0.gguf", DType::F32, None)),
        ("tiny-v2 bf16", load("tiny-v2", DType::BF16, None)),
        // Sparse attention: the indexer's scores, the selection and the gathered rows reuse buffers.
        ("tiny-v32 bf16", load("tiny-v32", DType::BF16, None)),
    ];
    // A bf16 cache is read by the fused kernel where the CPU has AVX-512 BF16; elsewhere by a
    // fallback that allocates. The int8 cache has an allocation-free kernel on every CPU.
    let fused = latent::kernels::mla_decode::rounds_queries::<half::bf16>();
    for (name, model) in &models {
        for int8 in [false, true] {
            let kind = if int8 { CacheKind::Int8 } else { model.cache_kind() };
            let tensors = count(model, kind, false);
            assert!(tensors >= 10 * MEASURED, "{name}: the counter sees forward's tensors ({tensors})");
            if int8 || fused {
                let step = count(model, kind, true);
                // The thread pool's shared queue takes one block per 63 tasks handed to it.
                assert!(
                    step <= MEASURED.div_ceil(63) + 1,
                    "{name} (int8 cache: {int8}): {step} allocations in {MEASURED} decode steps"
                );
                // Four sequences a step: the step's buffers reach their size for any routing
                // of the batch on the first step.
                let batched = count_batched(model, kind, 4);
                assert!(
                    batched <= MEASURED.div_ceil(63) + 1,
                    "{name} (int8 cache: {int8}): {batched} allocations in {MEASURED} steps of 4 sequences"
                );
            }
        }
    }
    // Speculative decoding's draft step: the MTP module on the decode step's kernels.
    let mtp = load("tiny-v3-mtp", DType::BF16, None);
    for kind in [CacheKind::Int8, mtp.cache_kind()] {
        if kind == CacheKind::Int8 || fused {
            let drafts = count_drafts(&mtp, kind);
            assert!(
                drafts <= MEASURED.div_ceil(63) + 1,
                "tiny-v3-mtp ({kind:?}): {drafts} allocations in {MEASURED} drafts"
            );
        }
    }
}

/// Allocations while a model's MTP module drafts `MEASURED` tokens one by one on its own
/// workspace, after `WARM` drafts.
fn count_drafts(model: &Model, kind: CacheKind) -> usize {
    let tokens = tokens();
    let mut cache = model.new_mtp_cache(kind).unwrap();
    cache.reserve(tokens.len()).unwrap();
    let hidden: Vec<f32> = (0..model.config().hidden_size).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut ws = Workspace::default();
    let draft = |t: u32, cache: &mut latent::LatentCache, ws: &mut Workspace| {
        let (logits, y) = model.mtp_step(0, &hidden, &[t], cache, ws).unwrap();
        assert_eq!((logits.len(), y.len()), (model.config().vocab_size, hidden.len()));
    };
    for &t in &tokens[..WARM] {
        draft(t, &mut cache, &mut ws);
    }
    let before = allocations();
    for &t in &tokens[WARM..WARM + MEASURED] {
        draft(t, &mut cache, &mut ws);
    }
    allocations() - before
}

/// Allocations while `B` sequences decode `MEASURED` steps together, after `WARM` steps.
fn count_batched(model: &Model, kind: CacheKind, b: usize) -> usize {
    let tokens = tokens();
    let mut caches: Vec<latent::LatentCache> = (0..b).map(|_| model.new_cache_of(kind).unwrap()).collect();
    for (s, cache) in caches.iter_mut().enumerate() {
        cache.reserve(tokens.len()).unwrap();
        model.forward(&tokens[s..s + PROMPT], cache, AttentionPath::Expanded, LogitRows::Last).unwrap();
    }
    let mut ws = Workspace::default();
    let mut step_tokens = vec![0u32; b];
    let mut refs: Vec<&mut latent::LatentCache> = caches.iter_mut().collect();
    let mut step = |k: usize, refs: &mut Vec<&mut latent::LatentCache>, ws: &mut Workspace| {
        for (s, t) in step_tokens.iter_mut().enumerate() {
            *t = tokens[(PROMPT + k + 7 * s) % tokens.len()];
        }
        let logits = model.decode(&step_tokens, refs, ws).unwrap();
        assert_eq!(logits.len(), step_tokens.len() * model.config().vocab_size);
    };
    for k in 0..WARM {
        step(k, &mut refs, &mut ws);
    }
    let before = allocations();
    for k in WARM..WARM + MEASURED {
        step(k, &mut refs, &mut ws);
    }
    allocations() - before
}
