//! The few raw system calls the harness needs that std does not offer, each
//! wrapped once with its safety argument so the rest of the harness is safe
//! code.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::Duration;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Makes orphaned descendants (a restored process whose `stasis restore -d`
/// exited) children of this process, so the tests can reap them by PID.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and no pointers.
    check(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) }).map(drop)
}

/// Makes the spawned program a session (and process group) leader, so that
/// it can be dumped without --shell-job.
pub fn setsid_on_spawn(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setsid(), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| check(libc::setsid()).map(drop));
    }
}

/// Keeps descriptors the test process inherited without close-on-exec
/// (from whatever started cargo) out of the spawned program: it gets only
/// stdin, stdout and stderr. They are marked close-on-exec rather than
/// closed so that std's own pipe reporting exec failures keeps working.
pub fn only_stdio_on_spawn(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only
    // makes a system call (close_range), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let ret = libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            check(ret as libc::c_int).map(drop)
        });
    }
}

/// Makes the spawned program die (SIGKILL) when the thread that spawned it ends, so that
/// a test process killed from outside (a CI timeout) takes the processes it started with
/// it instead of leaving them running. Only that program: its children (but those the
/// fixtures fork with fam_fork, which do the same) and a restored incarnation (a restore
/// resets PR_SET_PDEATHSIG) are not covered.
pub fn die_with_parent_on_spawn(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl()
    // and getppid(), which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong))?;
            // The test may have died before the prctl: then nobody is left to kill us.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

pub fn kill(pid: i32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill() takes plain integers.
    check(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// waitpid(pid, flags): None if WNOHANG was given and it has not ended.
pub fn waitpid(pid: i32, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid, writable c_int for the call.
        match check(unsafe { libc::waitpid(pid, &mut status, flags) }) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(ExitStatus::from_raw(status))),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A descriptor that polls readable once `pid` has ended (also when it is
/// not our child), so exits can be waited for with a timeout.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by the kernel (with O_CLOEXEC) and is
    // owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until one of `fds` is readable or hung up; returns which are, or
/// an empty vector on timeout.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: pfds is a valid array of pfds.len() pollfd structures.
    let n = match check(unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) }) {
        Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
        other => other?,
    };
    if n == 0 {
        return Ok(Vec::new());
    }
    Ok(pfds
        .iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
        .collect())
}

pub fn mkfifo(path: &Path, mode: libc::mode_t) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: c is a valid NUL-terminated path for the duration of the call.
    check(unsafe { libc::mkfifo(c.as_ptr(), mode) }).map(drop)
}

/// `kcmp(a, b, kind, 0, 0) == 0`: do two processes share the kernel object
/// `kind` (KCMP_VM 1, KCMP_FILES 2, KCMP_FS 3, KCMP_SIGHAND 4)?
#[allow(dead_code)] // only some test files compare processes
pub fn kcmp_shares(a: i32, b: i32, kind: i32) -> io::Result<bool> {
    // SAFETY: kcmp takes plain integers and touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, a, b, kind, 0, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r == 0)
}
