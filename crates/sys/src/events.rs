//! Event descriptors: signalfd, eventfd, timerfd and epoll, created anew on restore and
//! inspected from outside on dump.

use crate::types::{cvt, Pid, RemoteFd, SysResult};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

fn own(fd: libc::c_long) -> OwnedFd {
    // SAFETY: callers pass a descriptor the kernel just returned to us; nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// `signalfd(-1, mask, flags)`: a new signalfd for the signals of `mask` (bit N-1 is
/// signal N, as in the kernel's `sigset_t`).
pub fn signalfd(mask: u64, flags: i32) -> SysResult<OwnedFd> {
    // Raw system call: glibc's sigset_t is 128 bytes, the kernel reads 8.
    // SAFETY: `mask` is a live 8-byte buffer for the call; the size argument says 8.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_signalfd4, -1, &mask as *const u64, 8usize, flags) })?;
    Ok(own(fd))
}

/// `eventfd(0, flags)` then, for a non-zero `count`, a write of it: the counter is 64 bits
/// wide but eventfd() takes an `unsigned int`.
pub fn eventfd(count: u64, flags: i32) -> SysResult<OwnedFd> {
    // SAFETY: plain integer arguments.
    let fd = own(cvt(unsafe { libc::eventfd(0, flags) } as libc::c_long)?);
    if count != 0 {
        let b = count.to_ne_bytes();
        use std::os::fd::AsRawFd;
        // SAFETY: `b` is a live 8-byte buffer for the call.
        cvt(unsafe { libc::write(fd.as_raw_fd(), b.as_ptr() as *const libc::c_void, 8) } as libc::c_long)?;
    }
    Ok(fd)
}

/// `timerfd_create(clockid, flags)`.
pub fn timerfd_create(clockid: i32, flags: i32) -> SysResult<OwnedFd> {
    // SAFETY: plain integer arguments.
    Ok(own(cvt(unsafe { libc::timerfd_create(clockid, flags) } as libc::c_long)?))
}

fn ts(ns: u64) -> libc::timespec {
    libc::timespec { tv_sec: (ns / 1_000_000_000) as libc::time_t, tv_nsec: (ns % 1_000_000_000) as libc::c_long }
}

/// `timerfd_settime(fd, flags, {value, interval})`, both in nanoseconds.
pub fn timerfd_settime(fd: RawFd, flags: i32, value_ns: u64, interval_ns: u64) -> SysResult<()> {
    let spec = libc::itimerspec { it_interval: ts(interval_ns), it_value: ts(value_ns) };
    // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
    cvt(unsafe { libc::timerfd_settime(fd, flags, &spec, std::ptr::null_mut()) } as libc::c_long).map(drop)
}

/// `timerfd_gettime(fd)`: (time to the next expiry, interval) in nanoseconds. As a side
/// effect the kernel moves an expired periodic timer on to its next expiry and counts the
/// expirations it missed (what a read would do, without consuming them).
pub fn timerfd_gettime(fd: RawFd) -> SysResult<(u64, u64)> {
    // SAFETY: itimerspec is plain integers; zeroed is valid.
    let mut spec: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: `spec` is a valid out buffer for the call.
    cvt(unsafe { libc::timerfd_gettime(fd, &mut spec) } as libc::c_long)?;
    let ns = |t: libc::timespec| t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64;
    Ok((ns(spec.it_value), ns(spec.it_interval)))
}

/// `TFD_IOC_SET_TICKS`: `_IOW('T', 0, u64)`.
const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;

/// `ioctl(fd, TFD_IOC_SET_TICKS, &ticks)`: expirations a read will return (after any
/// timerfd_settime, which clears them).
pub fn timerfd_set_ticks(fd: RawFd, ticks: u64) -> SysResult<()> {
    // SAFETY: the ioctl reads one u64 from the valid pointer.
    cvt(unsafe { libc::ioctl(fd, TFD_IOC_SET_TICKS, &ticks as *const u64) } as libc::c_long).map(drop)
}

/// `clock_gettime(clockid)` in nanoseconds.
pub fn clock_ns(clockid: i32) -> SysResult<u64> {
    // SAFETY: timespec is plain integers; zeroed is valid.
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid out buffer for the call.
    cvt(unsafe { libc::clock_gettime(clockid, &mut t) } as libc::c_long)?;
    Ok(t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64)
}

/// `epoll_create1(flags)`.
pub fn epoll_create(flags: i32) -> SysResult<OwnedFd> {
    // SAFETY: plain integer arguments.
    Ok(own(cvt(unsafe { libc::epoll_create1(flags) } as libc::c_long)?))
}

/// `epoll_ctl(epfd, EPOLL_CTL_ADD, fd, {events, data})`.
pub fn epoll_add(epfd: RawFd, fd: RawFd, events: u32, data: u64) -> SysResult<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: `ev` is a valid epoll_event for the call.
    cvt(unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) } as libc::c_long).map(drop)
}

/// `epoll_wait(epfd, .., max, 0)`: the (events, data) of the ready registrations, without
/// waiting.
pub fn epoll_ready(epfd: RawFd, max: usize) -> SysResult<Vec<(u32, u64)>> {
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; max.max(1)];
    // SAFETY: `evs` holds `evs.len()` writable epoll_event structures.
    let n = cvt(unsafe { libc::epoll_wait(epfd, evs.as_mut_ptr(), evs.len() as libc::c_int, 0) } as libc::c_long)?;
    Ok(evs[..n as usize].iter().map(|e| (e.events, e.u64)).collect())
}

const KCMP_EPOLL_TFD: u64 = 7;

/// The kernel's `struct kcmp_epoll_slot`.
#[repr(C)]
struct KcmpEpollSlot {
    efd: u32,
    tfd: u32,
    toff: u32,
}

/// `kcmp(pid, pid, KCMP_EPOLL_TFD, fd, {epfd, tfd, 0})`: is the file registered as
/// target `tfd` in epoll `epfd` of `pid` the one `pid` holds at `fd`? `Err(ENOENT)`:
/// no such registration.
pub fn kcmp_epoll_target(pid: Pid, epfd: RemoteFd, tfd: i32, fd: RemoteFd) -> SysResult<bool> {
    let slot = KcmpEpollSlot { efd: epfd.0 as u32, tfd: tfd as u32, toff: 0 };
    // SAFETY: `slot` is a valid kcmp_epoll_slot for the call; the rest are integers.
    let r = cvt(unsafe {
        libc::syscall(libc::SYS_kcmp, pid.0, pid.0, KCMP_EPOLL_TFD, fd.0 as u64, &slot as *const KcmpEpollSlot)
    })?;
    Ok(r == 0)
}
