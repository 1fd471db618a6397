//! File locks: flock(2) locks and OFD locks, which belong to an open file description, and
//! POSIX record locks (fcntl F_SETLK), which belong to a process.
//!
//! Dump reads the `lock:` lines of /proc/PID/fdinfo/N. This kernel lists there the locks
//! of the file that N refers to which are owned by N's description (flock, OFD, leases:
//! every process sharing the description shows them, with the PID of the one that took a
//! flock lock) or by N's process (POSIX, shown only under the description the lock was
//! taken through). Each description's locks are recorded with one process that holds it
//! (for flock the one that took it, when it is in the tree), each POSIX lock with its
//! owner. Leases, delegations and mandatory locks are refused.
//!
//! Restore takes every lock again by injected calls in the process the record names, after
//! the restorer's last injected close: closing any descriptor of a file drops the POSIX
//! locks its process holds on it. That is still before any task of the tree runs again, so
//! a task that was blocked waiting for a lock restarts its call and finds the lock held.

use crate::error::{Error, Result};
use crate::inject::Injector;
use crate::mm::ChildMem;
use stasis_image::{FdRecord, LockKind, LockRecord};
use stasis_sys::{Errno, Pid};

/// One lock as fdinfo shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldLock {
    pub kind: LockKind,
    pub write: bool,
    /// The PID the kernel keeps with the lock: who took it (-1 for OFD locks).
    pub pid: i32,
    pub start: u64,
    /// Length in bytes, 0 for "to the end of the file".
    pub len: u64,
}

/// What a `lock:` line holds, or the kind of lock it names that cannot be restored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParsedLock {
    Held(HeldLock),
    Unsupported(String),
}

/// Parses the text after `lock:` in fdinfo, such as
/// `1: POSIX  ADVISORY  WRITE 11008 fe:00:10068035 0 9` (end inclusive, or `EOF`).
pub fn parse_lock_line(line: &str) -> std::result::Result<ParsedLock, String> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let bad = || format!("bad lock line: {line:?}");
    // w[0] is the "N:" id; a blocked request would read "N: ->", which fdinfo never shows.
    let kind = match *w.get(1).ok_or_else(bad)? {
        "POSIX" => LockKind::Posix,
        "OFDLCK" => LockKind::Ofd,
        "FLOCK" => LockKind::Flock,
        "LEASE" => return Ok(ParsedLock::Unsupported("lease (F_SETLEASE)".into())),
        "DELEG" => return Ok(ParsedLock::Unsupported("delegation (NFS server)".into())),
        "ACCESS" => return Ok(ParsedLock::Unsupported("mandatory-locking access lock".into())),
        other => return Ok(ParsedLock::Unsupported(format!("file lock of kind {other}"))),
    };
    match *w.get(2).ok_or_else(bad)? {
        "ADVISORY" => {}
        "MANDATORY" => return Ok(ParsedLock::Unsupported(format!("mandatory {} lock", kind.name()))),
        other => return Ok(ParsedLock::Unsupported(format!("{} lock marked {other}", kind.name()))),
    }
    let write = match *w.get(3).ok_or_else(bad)? {
        "WRITE" => true,
        "READ" => false,
        other => return Ok(ParsedLock::Unsupported(format!("{} lock of type {other}", kind.name()))),
    };
    let pid = w.get(4).and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let start: u64 = w.get(6).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let len = match *w.get(7).ok_or_else(bad)? {
        "EOF" => 0,
        end => end.parse::<u64>().ok().filter(|&e| e >= start).ok_or_else(bad)? - start + 1,
    };
    Ok(ParsedLock::Held(HeldLock { kind, write, pid, start, len }))
}

/// The locks fdinfo lists for descriptor `fd` of `pid`; refuses those that cannot be
/// restored, naming the descriptor and the file (`link`).
pub fn from_fdinfo(pid: Pid, fd: i32, link: &str, fdinfo: &str) -> Result<Vec<HeldLock>> {
    let mut out = Vec::new();
    for line in fdinfo.lines() {
        let Some(rest) = line.strip_prefix("lock:") else { continue };
        match parse_lock_line(rest) {
            Ok(ParsedLock::Held(l)) => out.push(l),
            Ok(ParsedLock::Unsupported(kind)) => {
                return Err(Error::UnsupportedFd { pid, fd, kind: format!("{kind} on {link}") })
            }
            Err(what) => return Err(Error::ProcParse { pid, path: format!("/proc/{pid}/fdinfo/{fd}"), what }),
        }
    }
    Ok(out)
}

/// A process, its descriptors and, alike, the locks fdinfo listed for each.
pub type ProcLocks<'a> = (Pid, &'a [FdRecord], &'a [Vec<HeldLock>]);

/// Decides which process takes each lock again: a POSIX lock its owner; a lock of a
/// description (flock, OFD) one process holding that description, the one that took it
/// when that is known and in the tree. `procs`: each process's descriptors (with their
/// description ids) and, alike, the locks fdinfo listed for each. Returns each process's
/// locks, in the order of `procs`.
pub fn assign(procs: &[ProcLocks]) -> Vec<Vec<LockRecord>> {
    let mut out: Vec<Vec<LockRecord>> = vec![Vec::new(); procs.len()];
    // Locks of descriptions: (description, lock) -> (process index, descriptor).
    let mut shared: Vec<((u64, HeldLock), (usize, i32))> = Vec::new();
    for (pi, (pid, fds, held)) in procs.iter().enumerate() {
        for (r, locks) in fds.iter().zip(held.iter()) {
            for l in locks {
                let rec = LockRecord { fd: r.fd, kind: l.kind, write: l.write, start: l.start, len: l.len };
                if l.kind == LockKind::Posix {
                    // A dup of the description shows the same lock again.
                    let dup = out[pi].iter().any(|o| {
                        o.kind == rec.kind && (o.start, o.len, o.write) == (rec.start, rec.len, rec.write)
                            && fds.iter().any(|f| f.fd == o.fd && f.desc == r.desc)
                    });
                    if !dup {
                        out[pi].push(rec);
                    }
                    continue;
                }
                let key = (r.desc, HeldLock { pid: 0, ..*l });
                match shared.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, holder)) if l.kind == LockKind::Flock && l.pid == pid.0 && holder.0 != pi => {
                        *holder = (pi, r.fd)
                    }
                    Some(_) => {}
                    None => shared.push((key, (pi, r.fd))),
                }
            }
        }
    }
    for ((_, l), (pi, fd)) in shared {
        out[pi].push(LockRecord { fd, kind: l.kind, write: l.write, start: l.start, len: l.len });
    }
    out
}

const F_OFD_SETLK: u64 = 37;

/// `struct flock` for x86-64: type, whence, start, len, pid (zero for OFD locks).
fn flock_struct(l: &LockRecord) -> [u8; 32] {
    let mut b = [0u8; 32];
    let ty = if l.write { libc::F_WRLCK } else { libc::F_RDLCK } as i16;
    b[0..2].copy_from_slice(&ty.to_le_bytes());
    b[2..4].copy_from_slice(&(libc::SEEK_SET as i16).to_le_bytes());
    b[8..16].copy_from_slice(&l.start.to_le_bytes());
    b[16..24].copy_from_slice(&l.len.to_le_bytes());
    b
}

/// Describes a lock for messages: "posix write lock on bytes 0-9".
pub fn describe(l: &LockRecord) -> String {
    let ty = if l.write { "write" } else { "read" };
    let range = match (l.kind, l.len) {
        (LockKind::Flock, _) => String::new(),
        (_, 0) => format!(" on bytes {}-EOF", l.start),
        (_, n) => format!(" on bytes {}-{}", l.start, l.start + n - 1),
    };
    format!("{} {ty} lock{range}", l.kind.name())
}

const F_OFD_GETLK: i32 = 36;

/// Before any process exists: every lock must be free to take again. `desc` gives the
/// restorer's own copy of the description behind a saved descriptor (DescTable), which
/// holds no lock yet; a flock lock is probed by taking and dropping it at once.
pub fn check(pid: Pid, locks: &[LockRecord], desc: impl Fn(i32) -> Option<std::os::fd::RawFd>) -> Result<()> {
    for l in locks {
        let Some(fd) = desc(l.fd) else {
            return Err(Error::Restore { pid, what: format!("fd {}: its {} has no descriptor", l.fd, describe(l)) });
        };
        let taken = |holder: Option<i32>| {
            let by = holder.filter(|&p| p > 0).map(|p| format!(" (pid {p})")).unwrap_or_default();
            Error::Restore {
                pid,
                what: format!("fd {}: cannot take its {} again: another process{by} holds a conflicting lock now", l.fd, describe(l)),
            }
        };
        match l.kind {
            LockKind::Flock => {
                let op = if l.write { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
                match stasis_sys::proc::flock(fd, op) {
                    Ok(()) => stasis_sys::proc::flock(fd, libc::LOCK_UN).map_err(Error::sys(pid, "flock(LOCK_UN)"))?,
                    Err(e) if e.0 == libc::EWOULDBLOCK => return Err(taken(None)),
                    Err(e) => return Err(Error::Sys { pid, op: "flock", errno: e }),
                }
            }
            LockKind::Posix | LockKind::Ofd => {
                let cmd = if l.kind == LockKind::Posix { libc::F_GETLK } else { F_OFD_GETLK };
                let (ty, holder) = stasis_sys::proc::get_lock(fd, cmd, l.write, l.start, l.len)
                    .map_err(Error::sys(pid, "F_GETLK"))?;
                if ty != libc::F_UNLCK {
                    return Err(taken(Some(holder)));
                }
            }
        }
    }
    Ok(())
}

/// Injected into the stopped restore child, after its last close: takes each of its locks
/// again, without waiting. `at` is scratch memory in the child.
pub fn restore(inj: &mut Injector, mem: &ChildMem, at: u64, locks: &[LockRecord]) -> Result<()> {
    let pid = inj.pid;
    for l in locks {
        let r = match l.kind {
            LockKind::Flock => {
                let op = if l.write { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
                inj.raw(libc::SYS_flock, [l.fd as u64, op as u64, 0, 0, 0, 0])?
            }
            LockKind::Posix | LockKind::Ofd => {
                mem.write(at, &flock_struct(l))?;
                let cmd = if l.kind == LockKind::Posix { libc::F_SETLK as u64 } else { F_OFD_SETLK };
                inj.raw(libc::SYS_fcntl, [l.fd as u64, cmd, at, 0, 0, 0])?
            }
        };
        if r < 0 {
            let errno = Errno(-r as i32);
            let why = if matches!(errno.0, libc::EAGAIN | libc::EACCES) {
                "another process holds a conflicting lock now".to_string()
            } else {
                errno.to_string()
            };
            return Err(Error::Restore { pid, what: format!("fd {}: cannot take its {} again: {why}", l.fd, describe(l)) });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stasis_image::FdKind;

    fn held(kind: LockKind, write: bool, pid: i32, start: u64, len: u64) -> HeldLock {
        HeldLock { kind, write, pid, start, len }
    }

    #[test]
    fn lines_as_this_kernel_prints_them() {
        let p = |s| parse_lock_line(s).unwrap();
        assert_eq!(p("\t1: FLOCK  ADVISORY  READ 11008 fe:00:10068034 0 EOF"), ParsedLock::Held(held(LockKind::Flock, false, 11008, 0, 0)));
        assert_eq!(p("\t1: POSIX  ADVISORY  WRITE 11008 fe:00:10068035 0 9"), ParsedLock::Held(held(LockKind::Posix, true, 11008, 0, 10)));
        assert_eq!(p("\t2: POSIX  ADVISORY  READ 11008 fe:00:10068035 20 EOF"), ParsedLock::Held(held(LockKind::Posix, false, 11008, 20, 0)));
        assert_eq!(p("\t1: OFDLCK ADVISORY  WRITE -1 fe:00:10068036 5 14"), ParsedLock::Held(held(LockKind::Ofd, true, -1, 5, 10)));
        assert!(matches!(p("\t1: LEASE  ACTIVE    READ 15252 fe:00:10068034 0 EOF"), ParsedLock::Unsupported(k) if k.contains("lease")));
        assert!(matches!(p("\t1: POSIX  MANDATORY WRITE 1 fe:00:1 0 EOF"), ParsedLock::Unsupported(k) if k.contains("mandatory")));
        assert!(parse_lock_line("\t1: POSIX  ADVISORY  WRITE x").is_err());
        assert!(parse_lock_line("\t1: POSIX  ADVISORY  WRITE 1 fe:00:1 9 3").is_err());
    }

    #[test]
    fn fdinfo_refusal_names_fd_and_kind() {
        let text = "pos:\t0\nflags:\t0100000\nlock:\t1: LEASE  ACTIVE    READ 7 fe:00:1 0 EOF\n";
        let e = from_fdinfo(Pid(7), 20, "/tmp/f", text).unwrap_err().to_string();
        assert!(e.contains("pid 7") && e.contains("fd 20") && e.contains("lease") && e.contains("/tmp/f"), "{e}");
    }

    fn fd(fd: i32, desc: u64) -> FdRecord {
        FdRecord { fd, cloexec: false, kind: FdKind::Pipe { ino: 1, write: false, flags: 0 }, same_as: None, desc }
    }

    #[test]
    fn each_lock_is_taken_once_by_the_right_process() {
        // Parent 10 and child 11 share description 1 (flock taken by the parent, listed by
        // both; the child comes first) and 2 (OFD). Parent: POSIX lock through fd 3 and its
        // dup fd 4. Child: its own POSIX lock.
        let pfds = [fd(3, 1), fd(4, 1), fd(5, 2)];
        let cfds = [fd(3, 1), fd(5, 2), fd(6, 3)];
        let fl = held(LockKind::Flock, true, 10, 0, 0);
        let ofd = held(LockKind::Ofd, false, -1, 0, 100);
        let pp = held(LockKind::Posix, true, 10, 0, 10);
        let cp = held(LockKind::Posix, false, 11, 20, 10);
        let pheld = vec![vec![fl, pp], vec![fl, pp], vec![ofd]];
        let cheld = vec![vec![fl], vec![ofd], vec![cp]];
        let out = assign(&[(Pid(11), &cfds, &cheld), (Pid(10), &pfds, &pheld)]);
        let rec = |fd, l: HeldLock| LockRecord { fd, kind: l.kind, write: l.write, start: l.start, len: l.len };
        assert_eq!(out[0], vec![rec(6, cp), rec(5, ofd)]);
        assert_eq!(out[1], vec![rec(3, pp), rec(3, fl)]);
    }
}
