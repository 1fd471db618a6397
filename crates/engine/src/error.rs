//! Errors of the engine. Each variant names the operation and the object it failed on, so
//! the one line a user sees is the cause.

use stasis_image::ImageError;
use stasis_sys::{Errno, Pid};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pid {0}: no such process")]
    NoSuchProcess(Pid),
    #[error("pid {0} is a kernel thread and cannot be dumped")]
    KernelThread(Pid),
    #[error("pid {0} is stasis itself and cannot be dumped")]
    IsSelf(Pid),
    #[error("pid {pid} is already traced by pid {tracer} (a debugger or another dump?)")]
    AlreadyTraced { pid: Pid, tracer: i32 },
    #[error("pid {pid}{thread} is in vfork() waiting for child {child} to exec or exit (waited {waited:?}); dump again once it has")]
    InVfork { pid: Pid, thread: String, child: Pid, waited: std::time::Duration },
    #[error("a tracer thread of the dump ended unexpectedly")]
    TracerLost,
    #[error("pid {pid}: {what} is not supported yet")]
    Unsupported { pid: Pid, what: String },
    #[error("pid {pid}: fd {fd}: unsupported descriptor kind: {kind}")]
    UnsupportedFd { pid: Pid, fd: i32, kind: String },
    #[error("pid {pid}: fd {fd} is a terminal ({path}); dump with --shell-job to let restore attach it to the restoring terminal")]
    TerminalNeedsShellJob { pid: Pid, fd: i32, path: String },
    #[error("pid {pid}: fd {fd} is /dev/pts/{index}, a pseudo-terminal whose master is outside the dumped tree; dump with --shell-job to let restore attach it to the restoring terminal")]
    PtyMasterOutside { pid: Pid, fd: i32, index: u32 },
    #[error("pid {pid}: mapping {start:#x}-{end:#x} ({what}) is not supported yet")]
    UnsupportedMapping { pid: Pid, start: u64, end: u64, what: String },
    #[error("pid {pid}: {op}: {errno}")]
    Sys { pid: Pid, op: &'static str, errno: Errno },
    #[error("pid {pid}: reading {path}: {err}")]
    Proc { pid: Pid, path: PathBuf, err: std::io::Error },
    #[error("pid {pid}: cannot parse {path}: {what}")]
    ProcParse { pid: Pid, path: String, what: String },
    #[error("pid {pid}: injected {call} returned {errno}")]
    Injected { pid: Pid, call: &'static str, errno: Errno },
    #[error("pid {pid}: thread {tid} stopped unexpectedly ({what})")]
    UnexpectedStop { pid: Pid, tid: Pid, what: String },
    #[error("pid {pid} exited during the operation ({what})")]
    TargetDied { pid: Pid, what: String },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("image: {0}")]
    Incompatible(String),
    #[error("PID {pid} is taken by a live process ({comm}); restore into a free PID or stop that process")]
    PidTaken { pid: Pid, comm: String },
    #[error("/dev/pts/{index} (its master held by {holder} of the image) is taken by another pseudo-terminal; the tree knows its terminal by that name, so it comes back only as /dev/pts/{index}: restore once that one is closed")]
    PtyIndexTaken { index: u32, holder: String },
    #[error("PID {pid} is still held by a zombie (its parent {parent} has not reaped it); restore once it has")]
    PidZombie { pid: Pid, parent: i32 },
    #[error("restore of pid {pid}: file {path} {what}")]
    FileChanged { pid: Pid, path: String, what: String },
    #[error("restore of pid {pid}: {what}")]
    Restore { pid: Pid, what: String },
    #[error("{op} {path}: {err}")]
    Io { op: &'static str, path: PathBuf, err: std::io::Error },
}

impl Error {
    pub fn sys(pid: Pid, op: &'static str) -> impl FnOnce(Errno) -> Error {
        move |errno| Error::Sys { pid, op, errno }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
