//! Running code that a model folder brings — a chat template, a tokenizer's pre-tokenizer regexes
//! — under a memory and a time bound, so that a hostile one ends in an error, not in minutes of
//! work or the machine's memory.
//!
//! The work runs on its own thread. The time bound is a deadline on the caller's wait. The memory
//! bound needs [`BoundedAlloc`] as the program's global allocator (the `latent` binary installs
//! it; a program using the library adds `#[global_allocator] static A: latent::bounded::BoundedAlloc
//! = latent::bounded::BoundedAlloc;`): it charges each allocation of a bounded thread to that
//! thread's budget, and a thread that passes its budget is stopped where it allocates (put to sleep
//! for good: Rust code cannot be interrupted, and an allocator may not fail or unwind without
//! aborting the process). The memory such a thread holds, at most its budget, is not returned; the
//! callers refuse to run the same hostile code twice, so that is paid once.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// The system allocator with a per-thread budget for threads running under [`run`].
pub struct BoundedAlloc;

static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Bytes this thread may still allocate; `isize::MAX` for an unbounded thread.
    static REMAINING: Cell<isize> = const { Cell::new(isize::MAX) };
    /// Set when this thread passes its budget.
    static TRIPPED: Cell<*const AtomicBool> = const { Cell::new(std::ptr::null()) };
    /// Set while this thread runs code whose panics latent catches and reports as errors.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, turning a panic inside it (in a third-party parser given hostile input) into
/// `Err(message)`; with [`install_panic_hook`] the panic is not printed either.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let before = CATCHING.with(|c| c.replace(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(before));
    out.map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "no reason given".into())
    })
}

/// Keeps the default panic message for every panic except those that latent catches and reports
/// as an error ([`catch_panic`], and the work of [`run`]): call once at start-up.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !CATCHING.with(|c| c.get()) {
            default(info);
        }
    }));
}

#[inline]
fn charge(bytes: isize) {
    let _ = REMAINING.try_with(|r| {
        let left = r.get();
        if left == isize::MAX {
            return;
        }
        let left = left.saturating_sub(bytes);
        r.set(left);
        if left < 0 {
            stop_here();
        }
    });
}

#[cold]
fn stop_here() -> ! {
    let _ = TRIPPED.try_with(|t| {
        // SAFETY: the pointer is to an `AtomicBool` in an `Arc` that the bounded closure's thread
        // keeps alive for as long as it runs (see `run`).
        if let Some(flag) = unsafe { t.get().as_ref() } {
            flag.store(true, Ordering::Release);
        }
    });
    loop {
        // Sleeping allocates nothing.
        std::thread::sleep(Duration::from_secs(3600));
    }
}

// SAFETY: every call is forwarded to `System` unchanged; the bookkeeping around it allocates
// nothing and never unwinds.
unsafe impl GlobalAlloc for BoundedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(Ordering::Relaxed) {
            INSTALLED.store(true, Ordering::Relaxed);
        }
        charge(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size() as isize);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        charge(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        charge(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Whether the memory bound is in force: [`BoundedAlloc`] is the global allocator.
pub fn memory_bound_enforced() -> bool {
    drop(std::hint::black_box(Vec::<u8>::with_capacity(16)));
    INSTALLED.load(Ordering::Relaxed)
}

/// Bounds for [`run`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes the work may allocate (net of what it frees).
    pub memory: Option<usize>,
    /// How long the caller waits.
    pub time: Duration,
}

/// Why [`run`] gave no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exceeded {
    Memory(usize),
    Time(Duration),
    /// The work panicked, with this message.
    Panicked(String),
    /// No thread could be started.
    Spawn(String),
}

/// Runs `work` on its own thread under `limits`.
pub fn run<T: Send + 'static>(limits: Limits, work: impl FnOnce() -> T + Send + 'static) -> Result<T, Exceeded> {
    let tripped = Arc::new(AtomicBool::new(false));
    let flag = tripped.clone();
    let (tx, rx) = mpsc::sync_channel(1);
    let memory = limits.memory;
    std::thread::Builder::new()
        .name("latent-bounded".into())
        .spawn(move || {
            if let Some(bytes) = memory {
                TRIPPED.with(|t| t.set(Arc::as_ptr(&flag)));
                REMAINING.with(|r| r.set(bytes.min(isize::MAX as usize - 1) as isize));
            }
            let out = catch_panic(work);
            REMAINING.with(|r| r.set(isize::MAX));
            TRIPPED.with(|t| t.set(std::ptr::null()));
            let _ = tx.send(out);
            drop(flag);
        })
        .map_err(|e| Exceeded::Spawn(e.to_string()))?;
    let start = Instant::now();
    loop {
        let left = limits.time.saturating_sub(start.elapsed());
        match rx.recv_timeout(left.min(Duration::from_millis(20))) {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(message)) => return Err(Exceeded::Panicked(message)),
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Exceeded::Panicked("no reason given".into())),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if tripped.load(Ordering::Acquire) {
                    return Err(Exceeded::Memory(memory.unwrap_or(0)));
                }
                if start.elapsed() >= limits.time {
                    return Err(Exceeded::Time(limits.time));
                }
            }
        }
    }
}
