//! The restore pipeline.

use crate::error::Result;
use stasis_sys::Pid;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub dir: PathBuf,
    /// Attach terminals to the restorer's terminal and join its session.
    pub shell_job: bool,
}

/// Figures of one restore.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RestoreStats {
    /// From the start of the call until the restored process runs.
    pub total: Duration,
    /// Reading and checking the image, before any process exists.
    pub validate: Duration,
    /// Bytes of page data loaded.
    pub memory_bytes: u64,
}

/// A restored process, running, and a child of the calling process.
#[derive(Clone, Debug)]
pub struct Restored {
    pub pid: Pid,
    pub stats: RestoreStats,
}

/// Restores the image in `opts.dir`. The caller must be single-threaded (the restored
/// process is forked from it). On success the process runs as the caller's child.
pub fn restore(_opts: &RestoreOptions) -> Result<Restored> {
    todo!()
}
