//! Named pipes (FIFOs) opened by path: each descriptor's open file description (read end,
//! write end or both, its flags) and, once per FIFO, the pipe behind them: capacity and the
//! bytes queued in it.
//!
//! Dump refuses a FIFO that a process outside the tree also holds open (restoring it would
//! either cut that process off or hand it our saved bytes a second time). The queued bytes
//! are read without consuming them, with tee() from a read end: one of the tree's, or, when
//! the tree only writes to the FIFO, a read end of our own opened through /proc.
//!
//! Restore, before any process exists, opens each FIFO first read-write and non-blocking
//! (an "anchor", which never blocks and is both a reader and a writer), so that opening the
//! saved descriptions, one end at a time, neither blocks nor fails with ENXIO; it sets the
//! capacity and writes the saved bytes through the anchor, and drops the anchor once every
//! description is open: the pipe lives on in them.

use crate::error::{Error, Result};
use crate::files;
use stasis_image::{FdKind, FdRecord, FifoRecord, FileRef};
use stasis_sys::{Pid, RemoteFd};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// (device, inode) of a FIFO.
type FifoId = (u64, u64);

/// A descriptor of a FIFO in the tree: process, number, status flags, path.
struct Holder<'a> {
    pid: Pid,
    pidfd: &'a OwnedFd,
    fd: i32,
    flags: i32,
    path: String,
}

/// The FIFOs the tree holds: capacity and queued bytes of each.
pub fn dump(procs: &[(Pid, &OwnedFd, &[FdRecord])]) -> Result<Vec<FifoRecord>> {
    let mut fifos: BTreeMap<FifoId, Vec<Holder>> = BTreeMap::new();
    for (pid, pidfd, recs) in procs {
        for r in recs.iter() {
            if let FdKind::Fifo { file, flags } = &r.kind {
                fifos.entry((file.dev, file.ino)).or_default().push(Holder {
                    pid: *pid,
                    pidfd,
                    fd: r.fd,
                    flags: *flags,
                    path: file.display(),
                });
            }
        }
    }
    if fifos.is_empty() {
        return Ok(Vec::new());
    }
    let tree: Vec<Pid> = procs.iter().map(|(p, _, _)| *p).collect();
    refuse_outside_holders(&fifos, &tree)?;
    let mut out = Vec::new();
    for ((dev, ino), holders) in fifos {
        let first = &holders[0];
        let what = format!("fifo {}", first.path);
        let getfd = |h: &Holder| {
            stasis_sys::proc::pidfd_getfd(h.pidfd, RemoteFd(h.fd)).map_err(Error::sys(h.pid, "pidfd_getfd"))
        };
        let any = getfd(first)?;
        let capacity = stasis_sys::proc::pipe_size(any.as_raw_fd()).map_err(Error::sys(first.pid, "F_GETPIPE_SZ"))?;
        let queued = stasis_sys::proc::bytes_readable(any.as_raw_fd()).map_err(Error::sys(first.pid, "FIONREAD"))?;
        let data = if queued == 0 {
            Vec::new()
        } else {
            let reader = match holders.iter().find(|h| h.flags & libc::O_ACCMODE != libc::O_WRONLY) {
                Some(h) => getfd(h)?,
                None => {
                    // Only writers in the tree: a read end of our own, which never blocks.
                    let ours = format!("/proc/self/fd/{}", any.as_raw_fd());
                    stasis_sys::proc::open(Path::new(&ours), libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC, 0)
                        .map_err(Error::sys(first.pid, "open fifo for reading"))?
                }
            };
            files::pipe_contents(first.pid, &what, &reader, capacity)?
        };
        out.push(FifoRecord { dev, ino, capacity, data });
    }
    Ok(out)
}

/// Looks through every other process's descriptors for the tree's FIFOs.
fn refuse_outside_holders(fifos: &BTreeMap<FifoId, Vec<Holder>>, tree: &[Pid]) -> Result<()> {
    let me = stasis_sys::proc::getpid();
    let Ok(proc_dir) = std::fs::read_dir("/proc") else { return Ok(()) };
    for entry in proc_dir.flatten() {
        let Some(other) = entry.file_name().to_str().and_then(|n| n.parse().ok()).map(Pid) else { continue };
        if other == me || tree.contains(&other) {
            continue;
        }
        // A process may exit meanwhile, or deny us its table: nothing of ours there.
        let Ok(fds) = std::fs::read_dir(format!("/proc/{other}/fd")) else { continue };
        for fd in fds.flatten() {
            let path = fd.path();
            if !std::fs::read_link(&path).is_ok_and(|l| l.as_os_str().as_bytes().starts_with(b"/")) {
                continue;
            }
            let Ok(md) = std::fs::metadata(&path) else { continue };
            if !md.file_type().is_fifo() {
                continue;
            }
            if let Some(holders) = fifos.get(&(md.dev(), md.ino())) {
                let h = &holders[0];
                return Err(Error::UnsupportedFd {
                    pid: h.pid,
                    fd: h.fd,
                    kind: format!("fifo {} that pid {other}, outside the tree, also holds open", h.path),
                });
            }
        }
    }
    Ok(())
}

/// Before anything is created: every FIFO path must still name a FIFO.
pub fn check(pid: Pid, r: &FdRecord, file: &FileRef) -> Result<()> {
    let path = Path::new(std::ffi::OsStr::from_bytes(&file.path));
    let md = std::fs::metadata(path).map_err(|e| Error::FileChanged {
        pid,
        path: file.display(),
        what: format!("(fd {}, a fifo) is gone: {e}", r.fd),
    })?;
    if !md.file_type().is_fifo() {
        return Err(Error::FileChanged { pid, path: file.display(), what: format!("(fd {}) is no longer a fifo", r.fd) });
    }
    Ok(())
}

/// The restorer's read-write descriptor of each FIFO, held while the saved descriptions
/// are opened (see the module notes).
#[derive(Default)]
pub struct Anchors(HashMap<FifoId, OwnedFd>);

impl Anchors {
    /// Opens one saved description of a FIFO; the first one of a FIFO also fills it.
    pub fn open(&mut self, pid: Pid, file: &FileRef, flags: i32, fifos: &[FifoRecord]) -> Result<OwnedFd> {
        let id = (file.dev, file.ino);
        if let std::collections::hash_map::Entry::Vacant(slot) = self.0.entry(id) {
            let rec = fifos.iter().find(|f| (f.dev, f.ino) == id).ok_or_else(|| Error::Restore {
                pid,
                what: format!("fifo {} has no fifo record", file.display()),
            })?;
            let anchor = files::reopen(pid, &file.path, libc::O_RDWR | libc::O_NONBLOCK)?;
            let what = || format!("fifo {}", file.display());
            stasis_sys::proc::set_pipe_size(anchor.as_raw_fd(), rec.capacity).map_err(Error::sys(pid, "F_SETPIPE_SZ"))?;
            let queued = stasis_sys::proc::bytes_readable(anchor.as_raw_fd()).map_err(Error::sys(pid, "FIONREAD"))?;
            if queued != 0 {
                return Err(Error::Restore { pid, what: format!("{} already holds {queued} bytes: is it open elsewhere?", what()) });
            }
            let mut f = std::fs::File::from(anchor);
            std::io::Write::write_all(&mut f, &rec.data)
                .map_err(|e| Error::Io { op: "write", path: what().into(), err: e })?;
            slot.insert(OwnedFd::from(f));
        }
        files::reopen(pid, &file.path, flags)
    }
}
