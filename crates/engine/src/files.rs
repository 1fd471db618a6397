//! File descriptors: regular files and directories (by path, offset and flags), stateless
//! character devices (/dev/null, /dev/zero, ...), terminals under --shell-job, pipes,
//! FIFOs (see fifo.rs), memory objects (memfd, deleted tmpfs files; their data is saved by
//! the shmem module), pseudo-terminal pairs inside the tree (their state lives in the
//! tty module) and event descriptors (signalfd, eventfd, timerfd, epoll: each in its
//! module). The file locks each descriptor shows go to locks.rs.
//!
//! Dump takes its own duplicate of each descriptor with pidfd_getfd to fstat it, and reads
//! position and flags from /proc/PID/fdinfo. Anything else is refused, naming the
//! descriptor and its kind. Restore reopens every file in the child before it stops and
//! places it at its number; the descriptors the restorer itself needs in the child (image,
//! mapped files, exe) sit above all saved numbers and are closed by the last injections.

use crate::error::{Error, Result};
use crate::mm::file_ref;
use crate::shmem::{self, ShmemDump, ShmemTable};
use crate::{fifo, locks, procfs};
use stasis_image::{FdKind, FdRecord};
use stasis_sys::{Pid, RemoteFd};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::tty::{major, minor};

/// Terminal majors: ttyN/ttySN (4), /dev/tty, console, ptmx (5), pty slaves (136-143).
fn is_tty_major(maj: u64) -> bool {
    maj == 4 || maj == 5 || (136..=143).contains(&maj)
}

/// Stateless memory devices that reopen to the same thing: null, zero, full, random,
/// urandom.
fn is_stateless_chardev(rdev: u64) -> bool {
    major(rdev) == 1 && matches!(minor(rdev), 3 | 5 | 7 | 8 | 9)
}

/// What the link text of /proc/PID/fd/N calls a descriptor that is not a path.
pub fn kind_from_link(link: &str) -> String {
    if let Some(rest) = link.strip_prefix("anon_inode:") {
        return rest.trim_matches(|c| c == '[' || c == ']').to_string();
    }
    match link.split(':').next() {
        Some(k @ ("pipe" | "socket" | "net" | "mnt")) => k.to_string(),
        _ => link.to_string(),
    }
}

/// The descriptors of one process, with the (device, inode) of each for grouping
/// descriptions across the tree.
#[derive(Default)]
pub struct DumpedFds {
    pub records: Vec<FdRecord>,
    pub idents: Vec<(u64, u64)>,
    /// The file locks fdinfo lists for each descriptor, alike.
    pub locks: Vec<Vec<locks::HeldLock>>,
}

/// The descriptors of `pid`; memory objects among them are recorded in `objects`.
pub fn dump(pid: Pid, pidfd: &OwnedFd, shell_job: bool, objects: &std::sync::Mutex<ShmemDump>) -> Result<DumpedFds> {
    let dir = format!("/proc/{pid}/fd");
    let rd = std::fs::read_dir(&dir).map_err(|e| Error::Proc { pid, path: dir.clone().into(), err: e })?;
    let mut fds: Vec<i32> = rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    fds.sort();
    let mut out: Vec<FdRecord> = Vec::new();
    let mut idents: Vec<(u64, u64)> = Vec::new();
    let mut held = Vec::new();
    for fd in fds {
        let link = std::fs::read_link(format!("{dir}/{fd}"))
            .map_err(|e| Error::Proc { pid, path: format!("{dir}/{fd}").into(), err: e })?;
        let link_bytes = link.as_os_str().as_bytes().to_vec();
        let link_str = link.to_string_lossy().into_owned();
        let (path, text) = procfs::read_text(pid, &format!("fdinfo/{fd}"))?;
        let info = procfs::parse_fdinfo(&text).map_err(|what| Error::ProcParse { pid, path: path.clone(), what })?;
        let own = stasis_sys::proc::pidfd_getfd(pidfd, RemoteFd(fd)).map_err(Error::sys(pid, "pidfd_getfd"))?;
        // fstat of our copy: no walk of a /proc path.
        let file = std::fs::File::from(own);
        let md = file.metadata().map_err(|e| Error::Proc { pid, path: format!("fd {fd}").into(), err: e })?;
        let own = OwnedFd::from(file);
        let ft = md.file_type();
        let cloexec = info.flags & libc::O_CLOEXEC != 0;
        let flags = info.flags & !libc::O_CLOEXEC;
        let unsupported = |kind: String| Error::UnsupportedFd { pid, fd, kind };
        let kind = if let Some(anon) = link_str.strip_prefix("anon_inode:") {
            match anon {
                "[signalfd]" => crate::signalfd::dump(pid, &path, &text, flags)?,
                "[eventfd]" => crate::eventfd::dump(pid, &path, &text, flags)?,
                "[timerfd]" => crate::timerfd::dump(pid, fd, &own, flags)?,
                "[eventpoll]" => crate::epoll::dump(pid, &path, &text, flags)?,
                _ => return Err(unsupported(kind_from_link(&link_str))),
            }
        } else if ft.is_file() || ft.is_dir() {
            if !link_str.starts_with('/') {
                return Err(unsupported(kind_from_link(&link_str)));
            }
            match shmem::kind_from_name(&link_bytes) {
                Some(kind) if ft.is_file() => {
                    let link = format!("{dir}/{fd}");
                    let mut objects = objects.lock().unwrap_or_else(|p| p.into_inner());
                    let id = objects.intern(pid, &link, kind, |what| Error::UnsupportedFd { pid, fd, kind: what })?;
                    FdKind::Shmem { id, flags, pos: info.pos }
                }
                _ if link_str.ends_with(" (deleted)") => return Err(unsupported(format!("deleted file {link_str}"))),
                _ => FdKind::File { file: file_ref(&link_bytes, &md), flags, pos: info.pos },
            }
        } else if ft.is_char_device() {
            let rdev = md.rdev();
            if is_stateless_chardev(rdev) {
                FdKind::CharDevice { path: link_bytes, rdev, flags }
            } else if crate::tty::is_ptmx(rdev) {
                let index = stasis_sys::tty::pty_index(own.as_raw_fd()).map_err(Error::sys(pid, "TIOCGPTN"))?;
                FdKind::PtyMaster { index, flags }
            } else if let Some(index) = crate::tty::pts_index(rdev) {
                // Inside the tree or not is decided once every process is known.
                FdKind::PtySlave { index, flags }
            } else if major(rdev) == 5 && minor(rdev) == 0 && !shell_job {
                return Err(unsupported(format!("{link_str} (the controlling terminal opened by that name)")));
            } else if is_tty_major(major(rdev)) {
                if !shell_job {
                    return Err(Error::TerminalNeedsShellJob { pid, fd, path: link_str });
                }
                FdKind::Terminal { path: link_bytes, rdev, flags }
            } else {
                return Err(unsupported(format!("character device {}:{} ({link_str})", major(rdev), minor(rdev))));
            }
        } else if ft.is_fifo() && link_str.starts_with("pipe:") {
            FdKind::Pipe { ino: md.ino(), write: flags & libc::O_ACCMODE == libc::O_WRONLY, flags }
        } else if ft.is_fifo() {
            if !link_str.starts_with('/') || link_str.ends_with(" (deleted)") {
                return Err(unsupported(format!("fifo {link_str}")));
            }
            FdKind::Fifo { file: file_ref(&link_bytes, &md), flags }
        } else if ft.is_socket() {
            return Err(unsupported("socket".into()));
        } else {
            return Err(unsupported(kind_from_link(&link_str)));
        };
        held.push(locks::from_fdinfo(pid, fd, &link_str, &text)?);
        idents.push((md.dev(), md.ino()));
        out.push(FdRecord { fd, cloexec, kind, same_as: None, desc: 0 });
    }
    Ok(DumpedFds { records: out, idents, locks: held })
}

/// (device, inode) of an open file.
type FileIdent = (u64, u64);
/// (process index, descriptor index, description id) of the first descriptor seen of a
/// description.
type Representative = (usize, usize, u64);
/// A descriptor (process, number) of the read end and of the write end of a pipe.
type PipeEnds = (Option<(Pid, i32)>, Option<(Pid, i32)>);

/// The access mode (O_RDONLY, O_WRONLY, O_RDWR) of a descriptor's open file description,
/// which no fcntl changes: descriptors that differ in it are of different descriptions.
fn access_mode(kind: &FdKind) -> i32 {
    let flags = match kind {
        FdKind::File { flags, .. }
        | FdKind::CharDevice { flags, .. }
        | FdKind::Terminal { flags, .. }
        | FdKind::Pipe { flags, .. }
        | FdKind::Fifo { flags, .. }
        | FdKind::Shmem { flags, .. }
        | FdKind::PtyMaster { flags, .. }
        | FdKind::PtySlave { flags, .. }
        | FdKind::Signalfd { flags, .. }
        | FdKind::Eventfd { flags, .. }
        | FdKind::Epoll { flags, .. } => *flags,
        FdKind::Timerfd(t) => t.flags,
    };
    flags & libc::O_ACCMODE
}

/// Numbers the open file descriptions of a whole tree: descriptors of the same file that
/// kcmp reports as one description get one id, whichever process holds them. Only
/// descriptors of one file and access mode are compared, first with the description
/// seen at the same number (where a child's inherited descriptors are).
pub fn assign_descriptions(procs: &mut [(Pid, DumpedFds)]) -> Result<()> {
    // (process index, descriptor index) of one representative per description so far,
    // by file identity and access mode.
    let mut reps: std::collections::HashMap<(FileIdent, i32), Vec<Representative>> = Default::default();
    let mut next = 1u64;
    for pi in 0..procs.len() {
        for fi in 0..procs[pi].1.records.len() {
            let key = (procs[pi].1.idents[fi], access_mode(&procs[pi].1.records[fi].kind));
            let (pid, fd) = (procs[pi].0, procs[pi].1.records[fi].fd);
            let cands = reps.entry(key).or_default();
            let rep_fd = |&(rp, rf, _): &Representative| procs[rp].1.records[rf].fd;
            let same_number = cands.iter().filter(|r| rep_fd(r) == fd);
            let mut found = None;
            for &(rp, rf, id) in same_number.chain(cands.iter().filter(|r| rep_fd(r) != fd)) {
                let (rpid, rfd) = (procs[rp].0, procs[rp].1.records[rf].fd);
                if stasis_sys::proc::kcmp_same_file(rpid, RemoteFd(rfd), pid, RemoteFd(fd)).map_err(Error::sys(pid, "kcmp"))? {
                    found = Some(id);
                    break;
                }
            }
            let id = found.unwrap_or_else(|| {
                next += 1;
                cands.push((pi, fi, next - 1));
                next - 1
            });
            procs[pi].1.records[fi].desc = id;
        }
    }
    Ok(())
}

/// The bytes queued in a pipe (`what`, for messages), read without consuming them (tee
/// into a pipe of ours).
pub(crate) fn pipe_contents(pid: Pid, what: &str, read_end: &OwnedFd, capacity: u32) -> Result<Vec<u8>> {
    let queued = stasis_sys::proc::bytes_readable(read_end.as_raw_fd()).map_err(Error::sys(pid, "FIONREAD"))?;
    let mut data = vec![0u8; queued];
    if queued == 0 {
        return Ok(data);
    }
    let (our_r, our_w) = stasis_sys::proc::pipe2(libc::O_CLOEXEC | libc::O_NONBLOCK).map_err(Error::sys(pid, "pipe2"))?;
    stasis_sys::proc::set_pipe_size(our_w.as_raw_fd(), capacity).map_err(Error::sys(pid, "F_SETPIPE_SZ"))?;
    let n = stasis_sys::proc::tee(read_end.as_raw_fd(), our_w.as_raw_fd(), queued).map_err(Error::sys(pid, "tee"))?;
    if n != queued {
        return Err(Error::Unsupported { pid, what: format!("{what}: copied {n} of {queued} queued bytes") });
    }
    let mut f = std::fs::File::from(our_r);
    std::io::Read::read_exact(&mut f, &mut data)
        .map_err(|e| Error::Proc { pid, path: what.into(), err: e })?;
    Ok(data)
}

/// The pipes of the tree: capacity and buffered bytes of those inside it; those with an
/// end held outside it are marked external (restore then needs --inherit-fd).
pub fn dump_pipes(procs: &[(Pid, &OwnedFd, &[FdRecord])]) -> Result<Vec<stasis_image::PipeRecord>> {
    let mut ends: std::collections::BTreeMap<u64, PipeEnds> = Default::default();
    for (pid, _, recs) in procs {
        for r in recs.iter() {
            if let FdKind::Pipe { ino, write, .. } = r.kind {
                let e = ends.entry(ino).or_default();
                if write {
                    e.1.get_or_insert((*pid, r.fd));
                } else if e.0.is_none() {
                    e.0 = Some((*pid, r.fd));
                }
            }
        }
    }
    let mut out = Vec::new();
    for (ino, (rd, wr)) in ends {
        let (pid, fd) = rd.or(wr).unwrap_or((Pid(0), -1));
        let pidfd = procs.iter().find(|(p, _, _)| *p == pid).map(|(_, f, _)| *f);
        let theirs = match pidfd {
            Some(f) => stasis_sys::proc::pidfd_getfd(f, RemoteFd(fd)).map_err(Error::sys(pid, "pidfd_getfd"))?,
            None => continue,
        };
        let capacity = stasis_sys::proc::pipe_size(theirs.as_raw_fd()).map_err(Error::sys(pid, "F_GETPIPE_SZ"))?;
        if rd.is_none() || wr.is_none() {
            // One end only. Nobody at all holds the other (POLLHUP: no writers; POLLERR:
            // no readers): a widowed pipe, restored exactly. Else the other end is outside.
            let ev = stasis_sys::proc::poll_now(theirs.as_raw_fd(), libc::POLLIN).map_err(Error::sys(pid, "poll"))?;
            let widowed = if rd.is_some() { ev & libc::POLLHUP != 0 } else { ev & libc::POLLERR != 0 };
            if !widowed {
                log::debug!("pid {pid}: fd {fd}: pipe:[{ino}] leads outside the tree");
                out.push(stasis_image::PipeRecord { ino, capacity, data: Vec::new(), external: true });
                continue;
            }
        }
        let data = match rd {
            Some((rpid, _)) => pipe_contents(rpid, &format!("pipe:[{ino}]"), &theirs, capacity)?,
            None => Vec::new(),
        };
        out.push(stasis_image::PipeRecord { ino, capacity, data, external: false });
    }
    Ok(out)
}

/// Checks before anything is created that every file can be reopened as it was.
pub fn check(pid: Pid, fds: &[FdRecord]) -> Result<()> {
    for r in fds {
        let file = match &r.kind {
            FdKind::File { file, .. } => file,
            FdKind::Fifo { file, .. } => {
                fifo::check(pid, r, file)?;
                continue;
            }
            FdKind::CharDevice { .. }
            | FdKind::Terminal { .. }
            | FdKind::Pipe { .. }
            | FdKind::Shmem { .. }
            | FdKind::PtyMaster { .. }
            | FdKind::PtySlave { .. }
            | FdKind::Signalfd { .. }
            | FdKind::Eventfd { .. }
            | FdKind::Timerfd(_)
            | FdKind::Epoll { .. } => continue,
        };
        let md = std::fs::metadata(Path::new(std::ffi::OsStr::from_bytes(&file.path))).map_err(|e| {
            Error::FileChanged { pid, path: file.display(), what: format!("(fd {}) is gone: {e}", r.fd) }
        })?;
        if md.mode() & libc::S_IFMT != file.mode & libc::S_IFMT {
            return Err(Error::FileChanged { pid, path: file.display(), what: format!("(fd {}) changed its type", r.fd) });
        }
    }
    Ok(())
}

/// Flags that must not be replayed when reopening: they act at open time only.
const OPEN_ONLY: i32 = libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY;

pub(crate) fn reopen(pid: Pid, path: &[u8], flags: i32) -> Result<OwnedFd> {
    let p = Path::new(std::ffi::OsStr::from_bytes(path));
    stasis_sys::proc::open(p, (flags & !OPEN_ONLY) | libc::O_CLOEXEC, 0).map_err(|e| Error::FileChanged {
        pid,
        path: p.display().to_string(),
        what: format!("cannot be opened again: {e}"),
    })
}

/// The open file description a saved descriptor refers to. Images from before
/// description ids only know dups inside one process (`same_as`).
pub fn desc_key(pid: i32, r: &FdRecord) -> u64 {
    if r.desc != 0 {
        return r.desc;
    }
    (1 << 63) | ((pid as u64) << 24) | r.same_as.unwrap_or(r.fd) as u64
}

/// Every open file description of an image, opened by the restorer before any process
/// exists (so that a missing file fails the restore with nothing created), at numbers of
/// its own choosing. Every restored process is forked from the restorer, inherits all of
/// them and keeps the ones it needs: descriptions shared across fork stay shared.
pub struct DescTable {
    fds: std::collections::HashMap<u64, OwnedFd>,
    /// Pseudo-terminal pairs by saved index.
    ptys: std::collections::HashMap<u32, crate::tty::Pair>,
}

impl DescTable {
    /// `inherited` maps `pipe:[INO]` (as --inherit-fd names it) to a descriptor of ours;
    /// `objects` holds the memory objects, already created.
    pub fn open(
        procs: &[stasis_image::ProcessRecord],
        pipes: &[stasis_image::PipeRecord],
        fifos: &[stasis_image::FifoRecord],
        objects: &ShmemTable,
        ptys: &[stasis_image::PtyRecord],
        terminal: Option<i32>,
        inherited: &[(i32, String)],
    ) -> Result<DescTable> {
        let mut fds: std::collections::HashMap<u64, OwnedFd> = Default::default();
        let mut pairs: std::collections::HashMap<u32, crate::tty::Pair> = Default::default();
        for rec in ptys {
            let holder = procs.iter().find_map(|p| {
                p.fds.iter().find_map(|r| match r.kind {
                    FdKind::PtyMaster { index, .. } if index == rec.index => Some((Pid(p.pid), r.fd)),
                    _ => None,
                })
            });
            pairs.insert(rec.index, crate::tty::create(rec, holder)?);
        }
        let pair = |pid: Pid, fd: i32, index: u32| {
            pairs.get(&index).ok_or_else(|| Error::Restore {
                pid,
                what: format!("fd {fd}: /dev/pts/{index} has no pseudo-terminal record"),
            })
        };
        // Pipe ends already created, by (inode, write end).
        let mut pipe_ends: std::collections::HashMap<(u64, bool), i32> = Default::default();
        // Held until every description is open, then dropped: see fifo.rs.
        let mut anchors = fifo::Anchors::default();
        for p in procs {
            let pid = Pid(p.pid);
            for r in &p.fds {
                let key = desc_key(p.pid, r);
                if fds.contains_key(&key) {
                    continue;
                }
                let fd = match &r.kind {
                    FdKind::File { file, flags, pos } => {
                        let fd = reopen(pid, &file.path, *flags)?;
                        if file.mode & libc::S_IFMT == libc::S_IFREG {
                            stasis_sys::proc::seek_to(fd.as_raw_fd(), *pos).map_err(Error::sys(pid, "lseek"))?;
                        }
                        fd
                    }
                    FdKind::CharDevice { path, flags, .. } => reopen(pid, path, *flags)?,
                    FdKind::Fifo { file, flags } => anchors.open(pid, file, *flags, fifos)?,
                    FdKind::Shmem { id, flags, pos } => {
                        // A description of its own, opened through our descriptor of the object.
                        let ours = objects.fd(*id, true).ok_or_else(|| Error::Restore {
                            pid,
                            what: format!("fd {}: memory object {id} was not created", r.fd),
                        })?;
                        // O_NOFOLLOW (shm_open sets it) would refuse the /proc link; it
                        // only matters when a path is opened.
                        let fd = reopen(pid, format!("/proc/self/fd/{ours}").as_bytes(), *flags & !libc::O_NOFOLLOW)?;
                        stasis_sys::proc::seek_to(fd.as_raw_fd(), *pos).map_err(Error::sys(pid, "lseek"))?;
                        fd
                    }
                    FdKind::Terminal { .. } => {
                        let t = terminal.ok_or_else(|| Error::Restore {
                            pid,
                            what: format!("fd {} is a terminal but the restorer has none on fd 0-2", r.fd),
                        })?;
                        let d = stasis_sys::proc::dup_at_least(t, 3).map_err(Error::sys(pid, "dup"))?;
                        stasis_sys::proc::owned(d)
                    }
                    FdKind::Pipe { ino, .. } if pipes.iter().any(|x| x.ino == *ino && x.external) => {
                        let id = format!("pipe:[{ino}]");
                        let ours = inherited.iter().find(|(_, k)| *k == id).map(|(fd, _)| *fd).ok_or_else(|| {
                            Error::Restore {
                                pid,
                                what: format!("fd {} was {id}, whose other end was outside the image; restore with --inherit-fd fd[N]:{id} to connect it to descriptor N of stasis", r.fd),
                            }
                        })?;
                        stasis_sys::proc::owned(stasis_sys::proc::dup_at_least(ours, 3).map_err(Error::sys(pid, "dup"))?)
                    }
                    FdKind::Pipe { ino, write, flags } => {
                        if !pipe_ends.contains_key(&(*ino, false)) {
                            let rec = pipes.iter().find(|x| x.ino == *ino).ok_or_else(|| Error::Restore {
                                pid,
                                what: format!("fd {}: pipe:[{ino}] has no pipe record", r.fd),
                            })?;
                            let (rd, wr) = make_pipe(pid, rec)?;
                            pipe_ends.insert((*ino, false), rd.as_raw_fd());
                            pipe_ends.insert((*ino, true), wr.as_raw_fd());
                            // Park both ends under their first description; a second
                            // description of the same end is opened through /proc.
                            let (mine, other) = if *write { (wr, rd) } else { (rd, wr) };
                            let other_key = (1 << 62) | (*ino << 1) | (!*write as u64);
                            fds.insert(other_key, other);
                            set_flags(pid, &mine, *flags)?;
                            fds.insert(key, mine);
                            continue;
                        }
                        let end = pipe_ends[&(*ino, *write)];
                        let other_key = (1 << 62) | (*ino << 1) | (*write as u64);
                        let fd = match fds.remove(&other_key) {
                            Some(first) => first,
                            None => reopen(pid, format!("/proc/self/fd/{end}").as_bytes(), *flags)?,
                        };
                        set_flags(pid, &fd, *flags)?;
                        fd
                    }
                    FdKind::PtyMaster { index, flags } => {
                        // A master has one open file description (opening /dev/ptmx
                        // again makes a new pair).
                        let m = pair(pid, r.fd, *index)?.master.as_raw_fd();
                        let fd = stasis_sys::proc::owned(stasis_sys::proc::dup_at_least(m, 3).map_err(Error::sys(pid, "dup"))?);
                        set_flags(pid, &fd, *flags)?;
                        fd
                    }
                    FdKind::PtySlave { index, flags } => crate::tty::open_slave(pair(pid, r.fd, *index)?, *flags)?,
                    FdKind::Signalfd { mask, flags } => {
                        let fd = crate::signalfd::create(pid, r.fd, *mask, *flags)?;
                        set_flags(pid, &fd, *flags)?;
                        fd
                    }
                    FdKind::Eventfd { count, semaphore, flags } => {
                        let fd = crate::eventfd::create(pid, r.fd, *count, *semaphore, *flags)?;
                        set_flags(pid, &fd, *flags)?;
                        fd
                    }
                    FdKind::Timerfd(t) => crate::timerfd::create(pid, r.fd, t)?,
                    FdKind::Epoll { flags, .. } => crate::epoll::create(pid, r.fd, *flags)?,
                };
                fds.insert(key, fd);
            }
        }
        for p in pairs.values() {
            crate::tty::finish(p)?;
        }
        Ok(DescTable { fds, ptys: pairs })
    }

    /// The restorer's slave description of pair `index` (for a session leader's
    /// TIOCSCTTY and TIOCSPGRP).
    pub fn pty_slave(&self, index: u32) -> Option<i32> {
        self.ptys.get(&index).map(|p| p.slave.as_raw_fd())
    }

    /// Our copy of the description behind descriptor `fd` of a process.
    pub fn raw_fd(&self, p: &stasis_image::ProcessRecord, fd: i32) -> Option<i32> {
        let r = p.fds.iter().find(|r| r.fd == fd)?;
        self.fds.get(&desc_key(p.pid, r)).map(|f| f.as_raw_fd())
    }

    /// (saved number, our number, close-on-exec) for every descriptor of a process.
    pub fn placement(&self, p: &stasis_image::ProcessRecord) -> Vec<(i32, i32, bool)> {
        p.fds
            .iter()
            .filter_map(|r| self.fds.get(&desc_key(p.pid, r)).map(|fd| (r.fd, fd.as_raw_fd(), r.cloexec)))
            .collect()
    }
}

/// A pipe with the saved capacity and buffered bytes.
fn make_pipe(pid: Pid, rec: &stasis_image::PipeRecord) -> Result<(OwnedFd, OwnedFd)> {
    let (rd, wr) = stasis_sys::proc::pipe2(libc::O_CLOEXEC).map_err(Error::sys(pid, "pipe2"))?;
    stasis_sys::proc::set_pipe_size(wr.as_raw_fd(), rec.capacity).map_err(Error::sys(pid, "F_SETPIPE_SZ"))?;
    let mut f = std::fs::File::from(wr);
    std::io::Write::write_all(&mut f, &rec.data)
        .map_err(|e| Error::Proc { pid, path: format!("pipe:[{}]", rec.ino).into(), err: e })?;
    Ok((rd, OwnedFd::from(f)))
}

/// The status flags the kernel lets one change after open (O_NONBLOCK, O_APPEND, ...).
pub(crate) fn set_flags(pid: Pid, fd: &OwnedFd, flags: i32) -> Result<()> {
    let settable = libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC | libc::O_DIRECT | libc::O_NOATIME;
    stasis_sys::proc::set_status_flags(fd.as_raw_fd(), flags & settable).map_err(Error::sys(pid, "F_SETFL"))
}

/// In the restore child: put every saved descriptor at its number, from the descriptions
/// inherited from the restorer. `park` is above every saved number and every descriptor the
/// restorer still needs in the child; what lands there is closed by the restorer later.
pub fn restore_in_child(placement: &[(i32, i32, bool)], park: i32) -> std::result::Result<(), String> {
    let mut parked: Vec<(i32, i32)> = Vec::new(); // (our number, parked number)
    for &(_, src, _) in placement {
        if !parked.iter().any(|&(s, _)| s == src) {
            let p = stasis_sys::proc::dup_at_least(src, park).map_err(|e| format!("dup: {e}"))?;
            parked.push((src, p));
        }
    }
    let _ = stasis_sys::proc::close_range(0, park as u32 - 1);
    for &(target, src, cloexec) in placement {
        let from = parked.iter().find(|&&(s, _)| s == src).map(|&(_, p)| p).unwrap_or(src);
        let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
        stasis_sys::proc::dup3(from, target, flags).map_err(|e| format!("dup3 to fd {target}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_links() {
        assert_eq!(kind_from_link("anon_inode:[eventfd]"), "eventfd");
        assert_eq!(kind_from_link("anon_inode:[eventpoll]"), "eventpoll");
        assert_eq!(kind_from_link("pipe:[1234]"), "pipe");
        assert_eq!(kind_from_link("socket:[99]"), "socket");
    }

    #[test]
    fn device_numbers() {
        let null = std::fs::metadata("/dev/null").unwrap().rdev();
        assert_eq!((major(null), minor(null)), (1, 3));
        assert!(is_stateless_chardev(null));
        assert!(is_tty_major(136));
    }
}
