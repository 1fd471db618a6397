//! File-lock calls for probing a restored tree's locks from outside, each wrapped once
//! with its safety argument (the test itself stays safe code).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, AsFd};

/// `F_OFD_GETLK` and `F_OFD_SETLK` (fcntl.h; libc does not export them for every target).
pub const F_OFD_GETLK: libc::c_int = 36;
pub const F_OFD_SETLK: libc::c_int = 37;

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `flock(fd, op)`.
pub fn flock(fd: impl AsFd, op: libc::c_int) -> io::Result<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::flock(fd.as_fd().as_raw_fd(), op) })
}

fn flock_struct(ty: libc::c_int, start: i64, len: i64) -> libc::flock {
    // SAFETY: `struct flock` is plain integers; all zeroes is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

/// `fcntl(fd, cmd, &flock)` for F_SETLK or F_OFD_SETLK (`ty` F_RDLCK, F_WRLCK, F_UNLCK).
pub fn set_lock(fd: impl AsFd, cmd: libc::c_int, ty: libc::c_int, start: i64, len: i64) -> io::Result<()> {
    let fl = flock_struct(ty, start, len);
    // SAFETY: `fl` is a valid struct flock for the duration of the call.
    check(unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), cmd, &fl) })
}

/// `fcntl(fd, cmd, &flock)` for F_GETLK or F_OFD_GETLK: (type, pid) of the lock that
/// would be in the way of a `ty` lock on the range, type F_UNLCK if none.
pub fn get_lock(fd: impl AsFd, cmd: libc::c_int, ty: libc::c_int, start: i64, len: i64) -> io::Result<(libc::c_int, i32)> {
    let mut fl = flock_struct(ty, start, len);
    // SAFETY: `fl` is a valid, writable struct flock for the duration of the call.
    check(unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), cmd, &mut fl) })?;
    Ok((fl.l_type as libc::c_int, fl.l_pid))
}
