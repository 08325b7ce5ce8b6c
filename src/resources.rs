//! What the machine can give: the memory a new allocation can still get. Counts that imply more
//! than that (a training batch, a cache budget, a batch of sequences) are refused with a message
//! naming the setting before anything is allocated, instead of the kernel's out-of-memory killer
//! ending the process minutes later.

use crate::error::{Error, Result};
use crate::inspect::bytes_f64;

/// Bytes this process can still allocate: `MemAvailable + SwapFree` from `/proc/meminfo`, or less
/// where a cgroup memory limit leaves less. `None` where the system does not say.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        kib.checked_mul(1024)
    };
    let mut available = field("MemAvailable:")?.saturating_add(field("SwapFree:").unwrap_or(0));
    // cgroup v2: the limit less what the group already uses.
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    if let (Some(max), Some(current)) = (read("/sys/fs/cgroup/memory.max"), read("/sys/fs/cgroup/memory.current")) {
        available = available.min(max.saturating_sub(current));
    }
    Some(available)
}

/// An estimate, in bytes, of what `what` needs; refused with `hint` when it is more than the
/// machine has available.
pub fn check_fits(setting: &str, need: f64, what: &str, hint: &str) -> Result<()> {
    let Some(available) = available_memory() else { return Ok(()) };
    if need > available as f64 {
        return Err(Error::InvalidArgument(format!(
            "{setting}: {what} would need about {}, but this machine has {} of memory available; {hint}",
            bytes_f64(need),
            bytes_f64(available as f64)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_known_here_and_absurd_needs_are_refused() {
        if let Some(m) = available_memory() {
            assert!(m > 0);
            let err = check_fits("--x", 1e30, "this", "give less").unwrap_err().to_string();
            assert!(err.contains("--x") && err.contains("available") && err.contains("give less"), "{err}");
            check_fits("--x", 1.0, "this", "").unwrap();
        }
        assert_eq!(bytes_f64(1536.0), "1.5 KiB");
        assert_eq!(bytes_f64(3.0 * (1u64 << 40) as f64), "3.00 TiB");
        assert!(bytes_f64(1e30).contains("e30"));
    }
}
