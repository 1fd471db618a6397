//! The dump pipeline.

use crate::error::Result;
use std::path::PathBuf;
use std::time::Duration;

/// What to dump, where, and what happens to the target afterwards.
#[derive(Clone, Debug)]
pub struct DumpOptions {
    pub pid: i32,
    pub dir: PathBuf,
    /// Let the target run on after the dump instead of killing it.
    pub leave_running: bool,
    /// Accept terminals and a session outside the tree (as CRIU's --shell-job).
    pub shell_job: bool,
}

/// Figures of one dump.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DumpStats {
    /// From the start of the call until the image was complete and the target released.
    pub total: Duration,
    /// How long the target was frozen.
    pub frozen: Duration,
    /// Size of the image file.
    pub image_bytes: u64,
    /// Bytes of page data saved.
    pub memory_bytes: u64,
    pub processes: usize,
    pub threads: usize,
}

pub fn dump(_opts: &DumpOptions) -> Result<DumpStats> {
    todo!()
}
