//! The stasis engine: checkpoint a running process into an image and bring it back.
//!
//! ```text
//! dump:    seize (freeze) -> collect (read state) -> write image (atomic) -> release
//! restore: read + validate image -> plan -> create task with its PID -> task rebuilds its
//!          non-memory state -> restorer injects the address space, threads, registers ->
//!          resume
//! ```
//! One module per kind of state (`mm`, `shmem`, `files`, `signals`, `task`, `threads`), each with
//! its dump half and its restore half side by side.

pub mod check;
pub mod dump;
pub mod epoll;
pub mod error;
pub mod eventfd;
pub mod fifo;
pub mod files;
pub mod freeze;
pub mod host;
pub mod inject;
pub mod kfacts;
pub mod locks;
pub mod mm;
pub mod parasite;
pub mod pidns;
pub mod procfs;
pub mod restore;
pub mod shmem;
pub mod signalfd;
pub mod signals;
pub mod task;
pub mod threads;
pub mod timerfd;
pub mod tracers;
pub mod tty;
pub mod vmshare;

pub use dump::{dump, DumpOptions, DumpStats};
pub use error::Error;
pub use restore::{restore, RestoreOptions, RestoreStats, Restored};
pub use stasis_sys::Pid;

/// Times consecutive steps: each `next` returns the time since the previous one.
pub(crate) struct Lap(std::time::Instant);

impl Lap {
    pub(crate) fn new() -> Lap {
        Lap(std::time::Instant::now())
    }

    pub(crate) fn next(&mut self) -> std::time::Duration {
        let now = std::time::Instant::now();
        let d = now - self.0;
        self.0 = now;
        d
    }
}

/// Fault injection for tests: whether this is the N-th call (counting from 1, `count`
/// counts them) for N read once from environment variable `var` into `at` (none: never).
pub(crate) fn fault_hit(var: &str, at: &std::sync::OnceLock<u64>, count: &std::sync::atomic::AtomicU64) -> bool {
    let at = *at.get_or_init(|| std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(0));
    at != 0 && count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == at
}
