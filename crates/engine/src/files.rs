//! File descriptors: regular files and directories (by path, offset and flags), stateless
//! character devices (/dev/null, /dev/zero, ...), and terminals under --shell-job.
//!
//! Dump takes its own duplicate of each descriptor with pidfd_getfd to fstat it, and reads
//! position and flags from /proc/PID/fdinfo. Anything else is refused, naming the
//! descriptor and its kind. Restore reopens every file in the child before it stops and
//! places it at its number; the descriptors the restorer itself needs in the child (image,
//! mapped files, exe) sit above all saved numbers and are closed by the last injections.

use crate::error::{Error, Result};
use crate::mm::file_ref;
use crate::procfs;
use stasis_image::{FdKind, FdRecord};
use stasis_sys::{Pid, RemoteFd};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

fn major(rdev: u64) -> u64 {
    ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff)
}

fn minor(rdev: u64) -> u64 {
    (rdev & 0xff) | ((rdev >> 12) & !0xff)
}

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

pub fn dump(pid: Pid, pidfd: &OwnedFd, shell_job: bool) -> Result<Vec<FdRecord>> {
    let dir = format!("/proc/{pid}/fd");
    let rd = std::fs::read_dir(&dir).map_err(|e| Error::Proc { pid, path: dir.clone().into(), err: e })?;
    let mut fds: Vec<i32> = rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    fds.sort();
    let mut out: Vec<FdRecord> = Vec::new();
    let mut metas: Vec<(u64, u64)> = Vec::new();
    for fd in fds {
        let link = std::fs::read_link(format!("{dir}/{fd}"))
            .map_err(|e| Error::Proc { pid, path: format!("{dir}/{fd}").into(), err: e })?;
        let link_bytes = link.as_os_str().as_bytes().to_vec();
        let link_str = link.to_string_lossy().into_owned();
        let (path, text) = procfs::read_text(pid, &format!("fdinfo/{fd}"))?;
        let info = procfs::parse_fdinfo(&text).map_err(|what| Error::ProcParse { pid, path, what })?;
        let own = stasis_sys::proc::pidfd_getfd(pidfd, RemoteFd(fd)).map_err(Error::sys(pid, "pidfd_getfd"))?;
        let md = std::fs::metadata(format!("/proc/self/fd/{}", own.as_raw_fd()))
            .map_err(|e| Error::Proc { pid, path: format!("fd {fd}").into(), err: e })?;
        let ft = md.file_type();
        let cloexec = info.flags & libc::O_CLOEXEC != 0;
        let flags = info.flags & !libc::O_CLOEXEC;
        let unsupported = |kind: String| Error::UnsupportedFd { pid, fd, kind };
        let kind = if ft.is_file() || ft.is_dir() {
            if !link_str.starts_with('/') {
                return Err(unsupported(kind_from_link(&link_str)));
            }
            if link_str.ends_with(" (deleted)") {
                return Err(unsupported(format!("deleted file {link_str}")));
            }
            FdKind::File { file: file_ref(&link_bytes, &md), flags, pos: info.pos }
        } else if ft.is_char_device() {
            let rdev = md.rdev();
            if is_stateless_chardev(rdev) {
                FdKind::CharDevice { path: link_bytes, rdev, flags }
            } else if is_tty_major(major(rdev)) {
                if !shell_job {
                    return Err(Error::TerminalNeedsShellJob { pid, fd, path: link_str });
                }
                FdKind::Terminal { path: link_bytes, rdev, flags }
            } else {
                return Err(unsupported(format!("character device {}:{} ({link_str})", major(rdev), minor(rdev))));
            }
        } else if ft.is_fifo() {
            return Err(unsupported(if link_str.starts_with("pipe:") { "pipe".into() } else { format!("fifo {link_str}") }));
        } else if ft.is_socket() {
            return Err(unsupported("socket".into()));
        } else {
            return Err(unsupported(kind_from_link(&link_str)));
        };
        let same_as = shared_description(pid, fd, &md, &out, &metas)?;
        metas.push((md.dev(), md.ino()));
        out.push(FdRecord { fd, cloexec, kind, same_as });
    }
    Ok(out)
}

/// The first earlier descriptor that shares `fd`'s open file description, if any. Only
/// descriptors of the same file can; kcmp decides among those.
fn shared_description(
    pid: Pid,
    fd: i32,
    md: &std::fs::Metadata,
    earlier: &[FdRecord],
    metas: &[(u64, u64)],
) -> Result<Option<i32>> {
    for (r, &(dev, ino)) in earlier.iter().zip(metas) {
        if r.same_as.is_none() && dev == md.dev() && ino == md.ino() {
            let same = stasis_sys::proc::kcmp_same_file(pid, RemoteFd(r.fd), pid, RemoteFd(fd))
                .map_err(Error::sys(pid, "kcmp"))?;
            if same {
                return Ok(Some(r.fd));
            }
        }
    }
    Ok(None)
}

/// Checks before anything is created that every file can be reopened as it was.
pub fn check(pid: Pid, fds: &[FdRecord]) -> Result<()> {
    for r in fds {
        let FdKind::File { file, .. } = &r.kind else { continue };
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

fn reopen(path: &[u8], flags: i32) -> std::result::Result<OwnedFd, String> {
    let p = Path::new(std::ffi::OsStr::from_bytes(path));
    stasis_sys::proc::open(p, (flags & !OPEN_ONLY) | libc::O_CLOEXEC, 0)
        .map_err(|e| format!("reopen {}: {e}", p.display()))
}

/// In the restore child: open every saved descriptor at its number. `terminal` is the
/// restorer's terminal for --shell-job. The child's own descriptors must already sit
/// above every saved number.
pub fn restore_in_child(fds: &[FdRecord], terminal: Option<i32>) -> std::result::Result<(), String> {
    for r in fds {
        let flags = if r.cloexec { libc::O_CLOEXEC } else { 0 };
        if let Some(orig) = r.same_as {
            stasis_sys::proc::dup3(orig, r.fd, flags).map_err(|e| format!("dup3 fd {orig} to {}: {e}", r.fd))?;
            continue;
        }
        let opened = match &r.kind {
            FdKind::File { file, flags, pos } => {
                let fd = reopen(&file.path, *flags)?;
                if file.mode & libc::S_IFMT == libc::S_IFREG {
                    stasis_sys::proc::seek_to(fd.as_raw_fd(), *pos).map_err(|e| format!("lseek fd {}: {e}", r.fd))?;
                }
                Some(fd)
            }
            FdKind::CharDevice { path, flags, .. } => Some(reopen(path, *flags)?),
            FdKind::Terminal { .. } => None,
        };
        let src = match &opened {
            Some(fd) => fd.as_raw_fd(),
            None => terminal.ok_or("fd is a terminal but the restorer has none (run restore from a terminal)")?,
        };
        if src == r.fd {
            // reopen() landed exactly on the number: keep it, with the saved close-on-exec.
            let raw = opened.map(std::os::fd::IntoRawFd::into_raw_fd).unwrap_or(src);
            stasis_sys::proc::set_cloexec(raw, r.cloexec).map_err(|e| format!("fcntl fd {}: {e}", r.fd))?;
            continue;
        }
        stasis_sys::proc::dup3(src, r.fd, flags).map_err(|e| format!("dup3 to fd {}: {e}", r.fd))?;
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
