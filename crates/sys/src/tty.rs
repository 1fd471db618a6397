//! Terminal ioctls: termios2, window size, pseudo-terminal index, lock, packet mode and
//! peer, controlling terminal and foreground group, input injection. See tty_ioctl(4) and
//! ioctl_tty(2). Termios and window-size calls on a pty master act on its slave.

use crate::types::{cvt, Pid, SysResult};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// `struct termios2`: flags, line discipline, control characters and the two speeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Termios {
    pub iflag: u32,
    pub oflag: u32,
    pub cflag: u32,
    pub lflag: u32,
    pub line: u8,
    pub cc: [u8; 19],
    pub ispeed: u32,
    pub ospeed: u32,
}

/// `struct winsize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
    pub xpixel: u16,
    pub ypixel: u16,
}

fn ioctl_get_int(fd: RawFd, req: libc::Ioctl) -> SysResult<i32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the request writes one int to the valid pointer.
    cvt(unsafe { libc::ioctl(fd, req, &mut v) } as libc::c_long)?;
    Ok(v)
}

fn ioctl_set_int_ptr(fd: RawFd, req: libc::Ioctl, v: i32) -> SysResult<()> {
    let v: libc::c_int = v;
    // SAFETY: the request reads one int from the valid pointer.
    cvt(unsafe { libc::ioctl(fd, req, &v) } as libc::c_long).map(drop)
}

/// `ioctl(fd, TCGETS2)`.
pub fn get_termios(fd: RawFd) -> SysResult<Termios> {
    // SAFETY: termios2 is plain data; all-zero is a valid value.
    let mut t: libc::termios2 = unsafe { std::mem::zeroed() };
    // SAFETY: TCGETS2 writes one termios2 to the valid pointer.
    cvt(unsafe { libc::ioctl(fd, libc::TCGETS2, &mut t) } as libc::c_long)?;
    Ok(Termios {
        iflag: t.c_iflag,
        oflag: t.c_oflag,
        cflag: t.c_cflag,
        lflag: t.c_lflag,
        line: t.c_line,
        cc: t.c_cc,
        ispeed: t.c_ispeed,
        ospeed: t.c_ospeed,
    })
}

/// `ioctl(fd, TCSETS2)`: takes effect at once (no drain, no flush).
pub fn set_termios(fd: RawFd, v: &Termios) -> SysResult<()> {
    // SAFETY: termios2 is plain data; all-zero is a valid value.
    let mut t: libc::termios2 = unsafe { std::mem::zeroed() };
    t.c_iflag = v.iflag;
    t.c_oflag = v.oflag;
    t.c_cflag = v.cflag;
    t.c_lflag = v.lflag;
    t.c_line = v.line;
    t.c_cc = v.cc;
    t.c_ispeed = v.ispeed;
    t.c_ospeed = v.ospeed;
    // SAFETY: TCSETS2 reads one termios2 from the valid pointer.
    cvt(unsafe { libc::ioctl(fd, libc::TCSETS2, &t) } as libc::c_long).map(drop)
}

/// `ioctl(fd, TIOCGWINSZ)`.
pub fn get_winsize(fd: RawFd) -> SysResult<WinSize> {
    let mut w = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize to the valid pointer.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut w) } as libc::c_long)?;
    Ok(WinSize { rows: w.ws_row, cols: w.ws_col, xpixel: w.ws_xpixel, ypixel: w.ws_ypixel })
}

/// `ioctl(fd, TIOCSWINSZ)`.
pub fn set_winsize(fd: RawFd, v: &WinSize) -> SysResult<()> {
    let w = libc::winsize { ws_row: v.rows, ws_col: v.cols, ws_xpixel: v.xpixel, ws_ypixel: v.ypixel };
    // SAFETY: TIOCSWINSZ reads one winsize from the valid pointer.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &w) } as libc::c_long).map(drop)
}

/// `ioctl(master, TIOCGPTN)`: the index N of the slave /dev/pts/N.
pub fn pty_index(master: RawFd) -> SysResult<u32> {
    ioctl_get_int(master, libc::TIOCGPTN).map(|v| v as u32)
}

/// `ioctl(master, TIOCGPTLCK)`: whether the slave is locked (unlockpt not called).
pub fn pty_locked(master: RawFd) -> SysResult<bool> {
    ioctl_get_int(master, libc::TIOCGPTLCK).map(|v| v != 0)
}

/// `ioctl(master, TIOCSPTLCK)`: lock or unlock the slave.
pub fn set_pty_locked(master: RawFd, locked: bool) -> SysResult<()> {
    ioctl_set_int_ptr(master, libc::TIOCSPTLCK, locked as i32)
}

/// `ioctl(master, TIOCGPKT)`: packet mode.
pub fn packet_mode(master: RawFd) -> SysResult<bool> {
    ioctl_get_int(master, libc::TIOCGPKT).map(|v| v != 0)
}

/// `ioctl(master, TIOCPKT)`.
pub fn set_packet_mode(master: RawFd, on: bool) -> SysResult<()> {
    ioctl_set_int_ptr(master, libc::TIOCPKT, on as i32)
}

/// `ioctl(fd, TIOCGEXCL)`: exclusive mode (TIOCEXCL).
pub fn exclusive(fd: RawFd) -> SysResult<bool> {
    ioctl_get_int(fd, libc::TIOCGEXCL).map(|v| v != 0)
}

/// `ioctl(fd, TIOCEXCL)` or `ioctl(fd, TIOCNXCL)`.
pub fn set_exclusive(fd: RawFd, on: bool) -> SysResult<()> {
    let req = if on { libc::TIOCEXCL } else { libc::TIOCNXCL };
    // SAFETY: these requests take no argument.
    cvt(unsafe { libc::ioctl(fd, req) } as libc::c_long).map(drop)
}

/// `open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC)`: a new pseudo-terminal pair.
pub fn open_ptmx() -> SysResult<OwnedFd> {
    // SAFETY: a constant NUL-terminated path; open returns a new descriptor or -1.
    let fd = cvt(unsafe { libc::open(c"/dev/ptmx".as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) }
        as libc::c_long)?;
    // SAFETY: the kernel just returned this new descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `ioctl(master, TIOCGPTPEER, flags)`: a new open file description of the slave, opened
/// with `flags` (always with O_NOCTTY and O_CLOEXEC added).
pub fn open_peer(master: RawFd, flags: i32) -> SysResult<OwnedFd> {
    let flags = flags | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes integer open flags and returns a new descriptor or -1.
    let fd = cvt(unsafe { libc::ioctl(master, libc::TIOCGPTPEER, flags) } as libc::c_long)?;
    // SAFETY: the kernel just returned this new descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `ioctl(fd, TIOCSCTTY, steal)`: make the terminal the caller's controlling terminal
/// (the caller leads a session without one). `steal` takes it from another session,
/// which needs CAP_SYS_ADMIN.
pub fn set_controlling_tty(fd: RawFd, steal: bool) -> SysResult<()> {
    // SAFETY: TIOCSCTTY takes an integer argument.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSCTTY, steal as libc::c_int) } as libc::c_long).map(drop)
}

/// `tcsetpgrp(fd, pgrp)` (TIOCSPGRP).
pub fn tcsetpgrp(fd: RawFd, pgrp: Pid) -> SysResult<()> {
    ioctl_set_int_ptr(fd, libc::TIOCSPGRP, pgrp.0)
}

/// `ioctl(fd, TIOCSTI, &byte)`: the byte enters the terminal's input as if typed, through
/// its line discipline at once (not through the asynchronous flip buffer). Needs
/// CAP_SYS_ADMIN for a terminal that is not the caller's controlling terminal.
pub fn inject_input(fd: RawFd, byte: u8) -> SysResult<()> {
    // SAFETY: TIOCSTI reads one byte from the valid pointer.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSTI, &byte) } as libc::c_long).map(drop)
}
