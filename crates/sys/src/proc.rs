//! Process-level system calls: creating tasks with chosen PIDs, descriptors of other
//! processes, signals, sessions, and the per-process settings a restore child applies to
//! itself before the restorer takes over.

use crate::types::{cvt, Errno, Pid, RemoteFd, SysResult};
use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(p: &Path) -> SysResult<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno(libc::EINVAL))
}

fn syscall6(nr: libc::c_long, a: [u64; 6]) -> SysResult<libc::c_long> {
    // SAFETY: only used below with system calls whose pointer arguments (if any) point to
    // live, correctly sized buffers owned by the caller for the duration of the call.
    cvt(unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) })
}

/// `pidfd_open(2)`.
pub fn pidfd_open(pid: Pid) -> SysResult<OwnedFd> {
    let fd = syscall6(libc::SYS_pidfd_open, [pid.0 as u64, 0, 0, 0, 0, 0])?;
    // SAFETY: the kernel just returned this new descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_getfd(2)`: our own duplicate of descriptor `fd` of the process behind `pidfd`.
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: RemoteFd) -> SysResult<OwnedFd> {
    use std::os::fd::AsRawFd;
    let r = syscall6(libc::SYS_pidfd_getfd, [pidfd.as_raw_fd() as u64, fd.0 as u64, 0, 0, 0, 0])?;
    // SAFETY: the kernel just returned this new descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

const KCMP_FILE: u64 = 0;

/// Kernel objects two tasks may share after clone(): `kcmp` types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shared {
    Vm = 1,
    Files = 2,
    Fs = 3,
    Sighand = 4,
}

/// `kcmp(p1, p2, type, 0, 0) == 0`: do two tasks share this object?
pub fn kcmp_shares(p1: Pid, p2: Pid, what: Shared) -> SysResult<bool> {
    let r = syscall6(libc::SYS_kcmp, [p1.0 as u64, p2.0 as u64, what as u64, 0, 0, 0])?;
    Ok(r == 0)
}

/// `kcmp(p1, p2, type, 0, 0)` as an ordering: the kernel orders the objects consistently
/// (by an obfuscated address), so tasks can be sorted and grouped by object in
/// O(n log n) comparisons.
pub fn kcmp_order(p1: Pid, p2: Pid, what: Shared) -> SysResult<std::cmp::Ordering> {
    let r = syscall6(libc::SYS_kcmp, [p1.0 as u64, p2.0 as u64, what as u64, 0, 0, 0])?;
    Ok(match r {
        0 => std::cmp::Ordering::Equal,
        1 => std::cmp::Ordering::Less,
        _ => std::cmp::Ordering::Greater,
    })
}

/// `kcmp(pid1, pid2, KCMP_FILE, fd1, fd2) == 0`: do two descriptors share one open file
/// description?
pub fn kcmp_same_file(p1: Pid, fd1: RemoteFd, p2: Pid, fd2: RemoteFd) -> SysResult<bool> {
    let r = syscall6(
        libc::SYS_kcmp,
        [p1.0 as u64, p2.0 as u64, KCMP_FILE, fd1.0 as u64, fd2.0 as u64, 0],
    )?;
    Ok(r == 0)
}

/// `get_robust_list(tid)`: (head address, length).
pub fn get_robust_list(tid: Pid) -> SysResult<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: u64 = 0;
    syscall6(
        libc::SYS_get_robust_list,
        [tid.0 as u64, &mut head as *mut u64 as u64, &mut len as *mut u64 as u64, 0, 0, 0],
    )?;
    Ok((head, len))
}

/// The kernel's `struct clone_args` (version 2, 88 bytes).
#[repr(C)]
#[derive(Default)]
pub(crate) struct CloneArgs {
    pub(crate) flags: u64,
    pub(crate) pidfd: u64,
    pub(crate) child_tid: u64,
    pub(crate) parent_tid: u64,
    pub(crate) exit_signal: u64,
    pub(crate) stack: u64,
    pub(crate) stack_size: u64,
    pub(crate) tls: u64,
    pub(crate) set_tid: u64,
    pub(crate) set_tid_size: u64,
    pub(crate) cgroup: u64,
}

/// Waits (up to two seconds) until this process has one thread: a thread that was just
/// joined may still be listed for a moment while the kernel releases it.
fn wait_single_threaded() -> SysResult<()> {
    // A process forked by fork_with_pid is single-threaded from birth, and the restore
    // code it runs starts no thread: only the process that first called here is checked.
    static FIRST: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    if *FIRST.get_or_init(std::process::id) != std::process::id() {
        return Ok(());
    }
    for _ in 0..20_000 {
        let threads = std::fs::read_dir("/proc/self/task").map_err(|_| Errno(libc::EIO))?.count();
        if threads == 1 {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    Err(Errno(libc::EBUSY))
}

/// Who we are after [`fork_with_pid`].
#[derive(Debug, PartialEq, Eq)]
pub enum Forked {
    Child,
    Parent(Pid),
}

/// The tables a child made by [`fork_with_pid`] may share with its parent instead of
/// getting a copy: its descriptor table (`CLONE_FILES`) and its cwd, root and umask
/// (`CLONE_FS`); and `CLONE_PARENT`, which makes it our sibling (a child of our parent).
pub const SHAREABLE: i32 = libc::CLONE_FILES | libc::CLONE_FS | libc::CLONE_PARENT;

/// `clone3` without `CLONE_VM` (a fork) whose child gets PID `pid` (`set_tid`), or any
/// PID when `pid` is `None`, and shares with its parent the tables `share` names (a
/// subset of [`SHAREABLE`], else `EINVAL`). Refused with `EBUSY` unless the calling
/// process has exactly one thread, because a forked copy of a multi-threaded process may
/// inherit locks held by threads that do not exist in the child.
///
/// With `CLONE_FILES` the two processes hold the same descriptors: an `OwnedFd` dropped
/// in one closes the other's too, so the caller must decide which of them owns each.
pub fn fork_with_pid(pid: Option<Pid>, share: i32) -> SysResult<Forked> {
    fork_with_pid_signal(pid, share, libc::SIGCHLD)
}

/// [`fork_with_pid`] whose child sends `exit_signal` to its parent when it ends (0: none).
/// With `CLONE_PARENT` the child gets its creator's exit signal instead (the kernel
/// takes no other).
pub fn fork_with_pid_signal(pid: Option<Pid>, share: i32, exit_signal: i32) -> SysResult<Forked> {
    if share & !SHAREABLE != 0 {
        return Err(Errno(libc::EINVAL));
    }
    wait_single_threaded()?;
    let tid: libc::pid_t = pid.map(|p| p.0).unwrap_or(0);
    let args = CloneArgs {
        flags: share as u64,
        // A sibling gets the exit signal of its creator (the kernel wants 0 here).
        exit_signal: if share & libc::CLONE_PARENT != 0 { 0 } else { exit_signal as u64 },
        set_tid: if pid.is_some() { &tid as *const libc::pid_t as u64 } else { 0 },
        set_tid_size: pid.is_some() as u64,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM duplicates the (single-threaded, checked above)
    // process like fork(): the child runs on its own copy of our memory. CLONE_FILES and
    // CLONE_FS (with CLONE_PARENT the only flags allowed, checked above) share no memory,
    // only the descriptor table and the cwd/root/umask, which Rust's memory safety does
    // not rest on; CLONE_PARENT only chooses the child's parent. `args` and `tid` are live for the call.
    let r = unsafe {
        libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>())
    };
    match r {
        -1 => Err(Errno::last()),
        0 => Ok(Forked::Child),
        p => Ok(Forked::Parent(Pid(p as i32))),
    }
}

pub fn getpid() -> Pid {
    Pid(std::process::id() as i32)
}

pub fn getppid() -> Pid {
    // SAFETY: getppid has no arguments and cannot fail.
    Pid(unsafe { libc::getppid() })
}

/// `kill(2)`.
pub fn kill(pid: Pid, sig: i32) -> SysResult<()> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::kill(pid.0, sig) } as libc::c_long).map(drop)
}

/// `tgkill(2)`: signal `sig` to thread `tid` of process `tgid`.
pub fn tgkill(tgid: Pid, tid: Pid, sig: i32) -> SysResult<()> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::syscall(libc::SYS_tgkill, tgid.0 as libc::c_long, tid.0 as libc::c_long, sig as libc::c_long) }).map(drop)
}

/// `setsid(2)`.
pub fn setsid() -> SysResult<Pid> {
    // SAFETY: no arguments.
    cvt(unsafe { libc::setsid() } as libc::c_long).map(|p| Pid(p as i32))
}

/// `setpgid(pid, pgid)`.
pub fn setpgid(pid: Pid, pgid: Pid) -> SysResult<()> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::setpgid(pid.0, pgid.0) } as libc::c_long).map(drop)
}

/// `chroot(2)`.
pub fn chroot(path: &Path) -> SysResult<()> {
    let c = cstr(path)?;
    // SAFETY: `c` is a valid NUL-terminated string for the call.
    cvt(unsafe { libc::chroot(c.as_ptr()) } as libc::c_long).map(drop)
}

/// `unshare(2)` of the given CLONE_NEW* flags.
pub fn unshare(flags: i32) -> SysResult<()> {
    // SAFETY: plain integer argument.
    cvt(unsafe { libc::unshare(flags) } as libc::c_long).map(drop)
}

/// `setns(2)`: join the namespace `fd` refers to (`nstype` one CLONE_NEW* flag or 0).
pub fn setns(fd: RawFd, nstype: i32) -> SysResult<()> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::setns(fd, nstype) } as libc::c_long).map(drop)
}

/// `mount(2)`; `source` and `fstype` may be absent (a propagation change).
pub fn mount(source: Option<&Path>, target: &Path, fstype: Option<&str>, flags: u64) -> SysResult<()> {
    let src = source.map(cstr).transpose()?;
    let tgt = cstr(target)?;
    let fs = fstype.map(|f| CString::new(f).map_err(|_| Errno(libc::EINVAL))).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every string is NUL-terminated and alive for the call; null is allowed for
    // source and fstype; no data argument.
    cvt(unsafe { libc::mount(ptr(&src), tgt.as_ptr(), ptr(&fs), flags as libc::c_ulong, std::ptr::null()) }
        as libc::c_long)
    .map(drop)
}

/// `prlimit64(0, resource, {soft, hard}, NULL)`: the calling process's limit.
pub fn set_own_rlimit(resource: u32, soft: u64, hard: u64) -> SysResult<()> {
    let new = libc::rlimit64 { rlim_cur: soft, rlim_max: hard };
    // SAFETY: `new` is a valid rlimit64 for the call; no old-value buffer.
    cvt(unsafe { libc::prlimit64(0, resource as _, &new, std::ptr::null_mut()) } as libc::c_long).map(drop)
}

/// `set_robust_list(head, len)` for the calling thread. The kernel only records the
/// address (it reads it when the thread exits).
pub fn set_robust_list(head: u64, len: u64) -> SysResult<()> {
    syscall6(libc::SYS_set_robust_list, [head, len, 0, 0, 0, 0]).map(drop)
}

/// `set_tid_address(addr)` for the calling thread; the kernel only records the address.
pub fn set_tid_address(addr: u64) {
    // SAFETY: the kernel stores the value and dereferences it only at thread exit, where
    // a bad address is ignored; the call cannot fail.
    unsafe { libc::syscall(libc::SYS_set_tid_address, addr) };
}

/// `sigaltstack` for the calling thread: `sp`, `flags` (0 or SS_DISABLE), `size`. The
/// kernel does not look at the memory until a handler runs on it.
pub fn set_altstack(sp: u64, flags: i32, size: u64) -> SysResult<()> {
    let ss = libc::stack_t { ss_sp: sp as *mut libc::c_void, ss_flags: flags, ss_size: size as usize };
    // SAFETY: `ss` is a valid stack_t for the call; no old-value buffer.
    cvt(unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) } as libc::c_long).map(drop)
}

/// The calling thread's alternate signal stack, as `sigaltstack(NULL, &old)` gives it:
/// (sp, flags, size).
pub fn own_altstack() -> SysResult<(u64, i32, u64)> {
    let mut old = libc::stack_t { ss_sp: std::ptr::null_mut(), ss_flags: 0, ss_size: 0 };
    // SAFETY: `old` is a valid stack_t for the kernel to fill; no new value.
    cvt(unsafe { libc::sigaltstack(std::ptr::null(), &mut old) } as libc::c_long)?;
    Ok((old.ss_sp as u64, old.ss_flags, old.ss_size as u64))
}

/// The calling thread's clear_child_tid address (`prctl(PR_GET_TID_ADDRESS)`).
pub fn own_tid_address() -> SysResult<u64> {
    const PR_GET_TID_ADDRESS: u64 = 40;
    let mut addr = 0u64;
    syscall6(libc::SYS_prctl, [PR_GET_TID_ADDRESS, &mut addr as *mut u64 as u64, 0, 0, 0, 0])?;
    Ok(addr)
}

/// The calling process's program break (`brk(0)`).
pub fn own_brk() -> u64 {
    syscall6(libc::SYS_brk, [0; 6]).map_or(0, |b| b as u64)
}

/// The XSAVE features the calling process may use (`arch_prctl(ARCH_GET_XCOMP_PERM)`).
pub fn own_xcomp_perm() -> SysResult<u64> {
    const ARCH_GET_XCOMP_PERM: u64 = 0x1022;
    let mut perm = 0u64;
    syscall6(libc::SYS_arch_prctl, [ARCH_GET_XCOMP_PERM, &mut perm as *mut u64 as u64, 0, 0, 0, 0])?;
    Ok(perm)
}

/// The calling thread's ID.
pub fn gettid() -> Pid {
    // SAFETY: gettid takes no arguments and cannot fail.
    Pid(unsafe { libc::syscall(libc::SYS_gettid) } as i32)
}

/// The calling process's execution domain (`personality(0xffffffff)`).
pub fn own_personality() -> u32 {
    syscall6(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0, 0]).map_or(0, |p| p as u32)
}

/// `personality(persona)`.
pub fn set_personality(persona: u32) -> SysResult<()> {
    syscall6(libc::SYS_personality, [persona as u64, 0, 0, 0, 0, 0]).map(drop)
}

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
pub fn set_no_new_privs() -> SysResult<()> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) } as libc::c_long).map(drop)
}

/// `umask(2)`; returns the previous mask.
pub fn umask(mask: u32) -> u32 {
    // SAFETY: plain integer argument; cannot fail.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

/// `open(2)` with exact flags (the caller decides O_APPEND, O_NONBLOCK, O_CLOEXEC, ...).
pub fn open(path: &Path, flags: i32, mode: u32) -> SysResult<OwnedFd> {
    let c = cstr(path)?;
    // SAFETY: `c` is a valid NUL-terminated string for the call.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), flags, mode as libc::c_uint) } as libc::c_long)?;
    // SAFETY: the kernel just returned this new descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `lseek(fd, off, SEEK_SET)`.
pub fn seek_to(fd: RawFd, off: u64) -> SysResult<()> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::lseek(fd, off as i64, libc::SEEK_SET) } as libc::c_long).map(drop)
}

/// `dup3(old, new, flags)`, placing a descriptor at an exact number in our own table.
pub fn dup3(old: RawFd, new: RawFd, flags: i32) -> SysResult<()> {
    // SAFETY: plain integer arguments; the caller owns the number `new` afterwards.
    cvt(unsafe { libc::dup3(old, new, flags) } as libc::c_long).map(drop)
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, min)`: a duplicate numbered at least `min`.
pub fn dup_at_least(fd: RawFd, min: RawFd) -> SysResult<RawFd> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) } as libc::c_long).map(|f| f as RawFd)
}

/// `close_range(first, last, 0)`.
pub fn close_range(first: u32, last: u32) -> SysResult<()> {
    syscall6(libc::SYS_close_range, [first as u64, last as u64, 0, 0, 0, 0]).map(drop)
}

/// `prctl(PR_SET_NAME)`: the calling thread's comm.
pub fn set_comm(name: &[u8]) -> SysResult<()> {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name[..n]);
    // SAFETY: `buf` is a NUL-terminated 16-byte buffer, as PR_SET_NAME expects.
    cvt(unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr()) } as libc::c_long).map(drop)
}

/// `prctl(PR_SET_PDEATHSIG, sig)`.
pub fn set_pdeathsig(sig: i32) -> SysResult<()> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong) } as libc::c_long)
        .map(drop)
}

/// `prctl(PR_SET_TIMERSLACK, ns)` for the calling thread (and threads it starts later).
pub fn set_timer_slack(ns: u64) -> SysResult<()> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong) } as libc::c_long).map(drop)
}

/// `prctl(PR_SET_CHILD_SUBREAPER, 1)`.
pub fn set_child_subreaper() -> SysResult<()> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) } as libc::c_long)
        .map(drop)
}

/// The kernel's `struct sigaction` for `rt_sigaction(2)` on x86-64 (not glibc's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelSigaction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// `rt_sigaction(sig, act, NULL, 8)` for the calling process. The handler address is not
/// dereferenced by the kernel, so it may be an address of the process being restored.
pub fn set_sigaction(sig: i32, act: &KernelSigaction) -> SysResult<()> {
    syscall6(
        libc::SYS_rt_sigaction,
        [sig as u64, act as *const KernelSigaction as u64, 0, 8, 0, 0],
    )
    .map(drop)
}

/// `rt_sigaction(sig, NULL, &old, 8)`: the calling process's disposition of `sig`.
pub fn own_sigaction(sig: i32) -> SysResult<KernelSigaction> {
    let mut old = KernelSigaction::default();
    syscall6(libc::SYS_rt_sigaction, [sig as u64, 0, &mut old as *mut KernelSigaction as u64, 8, 0, 0])?;
    Ok(old)
}

/// `rt_sigprocmask(SIG_SETMASK, &mask, NULL, 8)` for the calling thread.
pub fn set_own_sigmask(mask: u64) -> SysResult<()> {
    syscall6(
        libc::SYS_rt_sigprocmask,
        [libc::SIG_SETMASK as u64, &mask as *const u64 as u64, 0, 8, 0, 0],
    )
    .map(drop)
}

/// `_exit(2)`: leave at once, running no destructors or atexit handlers (a restore child
/// must not flush the restorer's buffers).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no Rust state.
    unsafe { libc::_exit(code) }
}

/// `uname(2)`: (release, machine).
pub fn uname() -> (String, String) {
    // SAFETY: utsname is plain old data; zeroed is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid out buffer.
    unsafe { libc::uname(&mut u) };
    let s = |f: &[libc::c_char]| {
        let b: Vec<u8> = f.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        String::from_utf8_lossy(&b).into_owned()
    };
    (s(&u.release), s(&u.machine))
}

/// `prlimit(0, resource, NULL, &old)` for the calling process: (soft, hard).
pub fn own_rlimit(resource: u32) -> SysResult<(u64, u64)> {
    let mut old = libc::rlimit64 { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `old` is a valid out buffer.
    cvt(unsafe { libc::prlimit64(0, resource as _, std::ptr::null(), &mut old) } as libc::c_long)?;
    Ok((old.rlim_cur, old.rlim_max))
}

/// `mkfifo(3)`.
pub fn mkfifo(path: &Path, mode: u32) -> SysResult<()> {
    let c = cstr(path)?;
    // SAFETY: `c` is a valid NUL-terminated string for the call.
    cvt(unsafe { libc::mkfifo(c.as_ptr(), mode) } as libc::c_long).map(drop)
}

/// `isatty(3)`.
pub fn isatty(fd: RawFd) -> bool {
    // SAFETY: plain integer argument.
    unsafe { libc::isatty(fd) == 1 }
}

/// `lseek(fd, off, SEEK_DATA)` (or `SEEK_HOLE` with `hole`); `None` past the last data.
pub fn seek_data(fd: RawFd, off: u64, hole: bool) -> Option<u64> {
    let whence = if hole { libc::SEEK_HOLE } else { libc::SEEK_DATA };
    // SAFETY: plain integer arguments.
    let r = unsafe { libc::lseek(fd, off as i64, whence) };
    (r >= 0).then_some(r as u64)
}

/// `fcntl(fd, F_SETFD, cloexec ? FD_CLOEXEC : 0)`.
pub fn set_cloexec(fd: RawFd, cloexec: bool) -> SysResult<()> {
    let v = if cloexec { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, v) } as libc::c_long).map(drop)
}

/// `write(2)` of all of `data` to a raw descriptor, ignoring errors: for a child about to
/// `_exit` that reports why through a pipe whose number it moved.
pub fn write_all_raw(fd: RawFd, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: `data` is a live buffer of the given length.
        let n = unsafe { libc::write(fd, data.as_ptr() as *const libc::c_void, data.len()) };
        if n <= 0 {
            return;
        }
        data = &data[n as usize..];
    }
}

/// `pipe2(flags)`: (read end, write end).
pub fn pipe2(flags: i32) -> SysResult<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid two-element out array.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), flags) } as libc::c_long)?;
    // SAFETY: the kernel just returned these two new descriptors; we own them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `fcntl(fd, F_GETPIPE_SZ)`.
pub fn pipe_size(fd: RawFd) -> SysResult<u32> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) } as libc::c_long).map(|v| v as u32)
}

/// `fcntl(fd, F_SETPIPE_SZ, size)`.
pub fn set_pipe_size(fd: RawFd, size: u32) -> SysResult<()> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, size as libc::c_int) } as libc::c_long).map(drop)
}

/// `ioctl(fd, FIONREAD)`: bytes waiting in a pipe.
pub fn bytes_readable(fd: RawFd) -> SysResult<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the valid pointer.
    cvt(unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } as libc::c_long)?;
    Ok(n as usize)
}

/// `tee(in, out, len, SPLICE_F_NONBLOCK)`: duplicates pipe data without consuming it.
pub fn tee(fd_in: RawFd, fd_out: RawFd, len: usize) -> SysResult<usize> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::tee(fd_in, fd_out, len, libc::SPLICE_F_NONBLOCK) } as libc::c_long).map(|n| n as usize)
}

/// `fcntl(fd, F_SETFL, flags)`: status flags of the open file description.
pub fn set_status_flags(fd: RawFd, flags: i32) -> SysResult<()> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } as libc::c_long).map(drop)
}

/// Takes ownership of a descriptor number this process just received from a wrapper above
/// (for example [`dup_at_least`]).
pub fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: callers pass a descriptor they created and nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `read(2)` into `buf` from a raw descriptor.
pub fn read_raw(fd: RawFd, buf: &mut [u8]) -> SysResult<usize> {
    // SAFETY: `buf` is a live, writable buffer of the given length.
    cvt(unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) } as libc::c_long).map(|n| n as usize)
}

/// `poll(2)` on one descriptor with a zero timeout: the returned events.
pub fn poll_now(fd: RawFd, events: i16) -> SysResult<i16> {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one valid pollfd for the call.
    cvt(unsafe { libc::poll(&mut p, 1, 0) } as libc::c_long)?;
    Ok(p.revents)
}

/// `flock(fd, op)`.
pub fn flock(fd: RawFd, op: i32) -> SysResult<()> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::flock(fd, op) } as libc::c_long).map(drop)
}

/// `fcntl(fd, cmd, &flock)` with F_GETLK or F_OFD_GETLK: the type (`F_UNLCK` if none) and
/// PID of a lock in the way of a `write` (else read) lock on `len` bytes (0: to the end
/// of the file) from `start`.
pub fn get_lock(fd: RawFd, cmd: i32, write: bool, start: u64, len: u64) -> SysResult<(i32, i32)> {
    // SAFETY: `struct flock` is plain integers; all zeroes is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if write { libc::F_WRLCK } else { libc::F_RDLCK } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    // SAFETY: `fl` is a valid, writable struct flock for the duration of the call.
    cvt(unsafe { libc::fcntl(fd, cmd, &mut fl) } as libc::c_long)?;
    Ok((fl.l_type as i32, fl.l_pid))
}

/// `memfd_create(name, flags)`.
pub fn memfd_create(name: &[u8], flags: u32) -> SysResult<OwnedFd> {
    let c = CString::new(name).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated string for the call.
    let fd = cvt(unsafe { libc::memfd_create(c.as_ptr(), flags) } as libc::c_long)?;
    // SAFETY: the kernel just returned this new descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `fstatfs(fd)`: the `f_type` magic number of the file system holding the file.
pub fn fs_type(fd: RawFd) -> SysResult<i64> {
    // SAFETY: statfs is plain old data; zeroed is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out buffer for the call.
    cvt(unsafe { libc::fstatfs(fd, &mut st) } as libc::c_long)?;
    Ok(st.f_type as i64)
}

/// `fcntl(fd, F_GET_SEALS)`.
pub fn get_seals(fd: RawFd) -> SysResult<u32> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::fcntl(fd, libc::F_GET_SEALS) } as libc::c_long).map(|v| v as u32)
}

/// `fcntl(fd, F_ADD_SEALS, seals)`.
pub fn add_seals(fd: RawFd, seals: u32) -> SysResult<()> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals as libc::c_int) } as libc::c_long).map(drop)
}

/// `poll(2)` on one descriptor, waiting up to `timeout_ms`: the returned events (0 on
/// timeout).
pub fn poll_wait(fd: RawFd, events: i16, timeout_ms: i32) -> SysResult<i16> {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one valid pollfd for the call.
    cvt(unsafe { libc::poll(&mut p, 1, timeout_ms) } as libc::c_long)?;
    Ok(p.revents)
}

/// `poll(2)` on several descriptors for the same events, waiting up to `timeout_ms` (-1:
/// for ever): the returned events of each, in order.
pub fn poll_many(fds: &[RawFd], events: i16, timeout_ms: i32) -> SysResult<Vec<i16>> {
    let mut p: Vec<libc::pollfd> = fds.iter().map(|&fd| libc::pollfd { fd, events, revents: 0 }).collect();
    // SAFETY: `p` holds `p.len()` valid pollfd structures for the call.
    cvt(unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) } as libc::c_long)?;
    Ok(p.iter().map(|p| p.revents).collect())
}

/// `write(2)` from `buf`: the number of bytes written.
pub fn write_some(fd: RawFd, buf: &[u8]) -> SysResult<usize> {
    // SAFETY: `buf` is a live buffer of the given length.
    cvt(unsafe { libc::write(fd, buf.as_ptr() as *const libc::c_void, buf.len()) } as libc::c_long).map(|n| n as usize)
}

/// One mapping as `PROCMAP_QUERY` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueriedVma {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// As /proc/PID/maps would print it: a path, "[stack]", "[vdso]", or empty.
    pub name: Vec<u8>,
}

/// `PROCMAP_QUERY_*` query flags (linux/fs.h).
pub const PROCMAP_QUERY_VMA_EXECUTABLE: u64 = 0x04;
pub const PROCMAP_QUERY_COVERING_OR_NEXT_VMA: u64 = 0x10;

#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: libc::c_ulong = (3 << 30) | ((std::mem::size_of::<ProcmapQuery>() as libc::c_ulong) << 16) | (0x66 << 8) | 17;

/// `ioctl(PROCMAP_QUERY)` on an open /proc/PID/maps (Linux 6.11 on): the mapping that
/// covers `addr` (or, with PROCMAP_QUERY_COVERING_OR_NEXT_VMA, the next one after it) and
/// has the other `flags`. `None` when there is none; ENOTTY from an older kernel.
pub fn procmap_query(maps: &std::fs::File, addr: u64, flags: u64) -> SysResult<Option<QueriedVma>> {
    use std::os::fd::AsRawFd;
    let mut name = [0u8; 4096];
    let mut q = ProcmapQuery {
        size: std::mem::size_of::<ProcmapQuery>() as u64,
        query_flags: flags,
        query_addr: addr,
        vma_name_size: name.len() as u32,
        vma_name_addr: name.as_mut_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: `q` is a properly sized, initialized procmap_query that outlives the call;
    // the kernel writes at most `vma_name_size` bytes to `name`, which is that long and
    // lives on this stack frame until after the call; no build id is asked for.
    let r = unsafe { libc::ioctl(maps.as_raw_fd(), PROCMAP_QUERY as _, &mut q as *mut ProcmapQuery) };
    match cvt(r as libc::c_long) {
        Err(e) if e.0 == libc::ENOENT => Ok(None),
        Err(e) => Err(e),
        Ok(_) => {
            let len = (q.vma_name_size as usize).saturating_sub(1).min(name.len());
            Ok(Some(QueriedVma {
                start: q.vma_start,
                end: q.vma_end,
                read: q.vma_flags & 1 != 0,
                write: q.vma_flags & 2 != 0,
                exec: q.vma_flags & 4 != 0,
                shared: q.vma_flags & 8 != 0,
                offset: q.vma_offset,
                dev_major: q.dev_major,
                dev_minor: q.dev_minor,
                inode: q.inode,
                name: name[..len].to_vec(),
            }))
        }
    }
}
