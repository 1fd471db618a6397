//! System calls used only to probe what the running kernel offers (`stasis check`), plus
//! the signal wait the command-line tool uses while it waits for a restored process.
//!
//! Probes create throw-away objects (a child that only waits, a child that exits at once,
//! a small private mapping, a userfaultfd) and never touch anything the caller owns. The
//! children run nothing but async-signal-safe system calls, so the probes are safe to run
//! from a multi-threaded process (such as a test harness).

use crate::proc::CloneArgs;
use crate::types::{cvt, Errno, Pid, SysResult};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `fork(2)` a child that does nothing but wait for signals (`pause(2)` in a loop), and
/// dies with SIGKILL when the caller's thread exits (`PR_SET_PDEATHSIG`). The caller owns
/// the child: it must kill and reap it.
pub fn fork_idle_child() -> SysResult<Pid> {
    let parent = crate::proc::getpid();
    // SAFETY: in the child only async-signal-safe system calls run (prctl, getppid, pause,
    // _exit), so forking from a multi-threaded process cannot deadlock on a lock held by a
    // thread that does not exist in the child. No Rust state is touched there.
    let r = unsafe { libc::fork() };
    match r {
        -1 => Err(Errno::last()),
        0 => {
            // SAFETY: plain integer arguments; then only pause/_exit, see above.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                if libc::getppid() != parent.0 {
                    libc::_exit(0);
                }
                loop {
                    libc::pause();
                }
            }
        }
        pid => Ok(Pid(pid)),
    }
}


/// `clone3(NULL, 0)`: a kernel with `clone3` refuses the too-small size with `EINVAL`; one
/// without it answers `ENOSYS`. Returns the errno the kernel gave.
pub fn clone3_invalid_call() -> Errno {
    // SAFETY: a NULL argument pointer with size 0 is rejected by the kernel before anything
    // is read or created.
    let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<crate::proc::CloneArgs>(), 0usize) };
    if r == -1 {
        Errno::last()
    } else {
        // Cannot happen; report it as the "exists" answer rather than panic.
        Errno(libc::EINVAL)
    }
}

/// `clone3` with `set_tid = [pid]` (a fork whose child gets PID `pid`); the child calls
/// `_exit(0)` at once. Returns the child's PID; the caller must reap it.
pub fn fork_exiting_child_at(pid: Pid) -> SysResult<Pid> {
    let tid: libc::pid_t = pid.0;
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: &tid as *const libc::pid_t as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM duplicates the process like fork(); `args` and `tid`
    // are live for the call. The child only calls _exit (async-signal-safe), so the copy of
    // a multi-threaded caller never runs code that could need another thread's lock.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match r {
        -1 => Err(Errno::last()),
        0 => {
            // SAFETY: leaving the child at once without running any user-space code.
            unsafe { libc::_exit(0) }
        }
        p => Ok(Pid(p as i32)),
    }
}

const UFFD_API: u64 = 0xaa;
const UFFD_USER_MODE_ONLY: libc::c_long = 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong =
    (3 << 30) | ((std::mem::size_of::<UffdioApi>() as libc::c_ulong) << 16) | (0xaa << 8) | 0x3f;

/// `userfaultfd(2)` then the `UFFDIO_API` handshake asking for no feature: the kernel
/// answers with every feature it supports (`UFFD_FEATURE_*` bits). Falls back to
/// `UFFD_USER_MODE_ONLY` when unprivileged creation is refused.
pub fn userfaultfd_features() -> SysResult<u64> {
    let base = (libc::O_CLOEXEC | libc::O_NONBLOCK) as libc::c_long;
    // SAFETY: userfaultfd takes only integer flags.
    let mut r = unsafe { libc::syscall(libc::SYS_userfaultfd, base) };
    if r == -1 && Errno::last().0 == libc::EPERM {
        // SAFETY: as above.
        r = unsafe { libc::syscall(libc::SYS_userfaultfd, base | UFFD_USER_MODE_ONLY) };
    }
    let fd = cvt(r)?;
    // SAFETY: the kernel just returned this new descriptor; we own it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = UffdioApi {
        api: UFFD_API,
        ..Default::default()
    };
    // SAFETY: `api` is a correctly sized struct uffdio_api the kernel reads and fills.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi) };
    cvt(r as libc::c_long)?;
    Ok(api.features)
}

/// `prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE, &size)`: the size of `struct prctl_mm_map` the
/// kernel expects, which is how a caller learns that `PR_SET_MM_MAP` exists.
pub fn prctl_mm_map_size() -> SysResult<u32> {
    const PR_SET_MM_MAP_SIZE: libc::c_ulong = 15;
    let mut size: libc::c_uint = 0;
    // SAFETY: PR_SET_MM_MAP_SIZE writes one unsigned int to the pointer, which is live.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_MM,
            PR_SET_MM_MAP_SIZE,
            &mut size as *mut libc::c_uint,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    cvt(r as libc::c_long)?;
    Ok(size)
}

/// `madvise` advice that turns pages into guard regions (Linux 6.13+).
const MADV_GUARD_INSTALL: libc::c_int = 102;

/// A small private anonymous mapping made for a probe, unmapped on drop. It hands out no
/// slice of its memory: a probe may turn pages of it into guard regions, which fault on
/// any access.
pub struct ProbeRegion {
    map: crate::mem::LocalMapping,
}

impl ProbeRegion {
    /// `mmap(NULL, pages * 4096, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS)`.
    pub fn map(pages: usize) -> SysResult<ProbeRegion> {
        let map = crate::mem::LocalMapping::anonymous(pages * crate::types::PAGE_SIZE as usize)?;
        Ok(ProbeRegion { map })
    }

    pub fn addr(&self) -> u64 {
        self.map.addr()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn page_addr(&self, page: usize) -> SysResult<u64> {
        let off = page * crate::types::PAGE_SIZE as usize;
        if off >= self.len() {
            return Err(Errno(libc::EINVAL));
        }
        Ok(self.addr() + off as u64)
    }

    /// Writes one byte to page `page`, so that it is present and written.
    pub fn touch(&self, page: usize) -> SysResult<()> {
        let a = self.page_addr(page)?;
        // SAFETY: `a` lies inside this live read/write mapping, which no Rust reference
        // aliases. A guard page would fault, so callers touch pages before guarding them.
        unsafe { std::ptr::write_volatile(a as *mut u8, 1) };
        Ok(())
    }

    /// `madvise(page, 4096, MADV_GUARD_INSTALL)`.
    pub fn install_guard(&self, page: usize) -> SysResult<()> {
        let a = self.page_addr(page)?;
        // SAFETY: the range lies inside this mapping; nothing reads it afterwards (the
        // type hands out no references to its memory).
        let r = unsafe {
            libc::madvise(
                a as *mut libc::c_void,
                crate::types::PAGE_SIZE as usize,
                MADV_GUARD_INSTALL,
            )
        };
        cvt(r as libc::c_long).map(drop)
    }
}


fn sigmask_of(sigs: &[i32]) -> u64 {
    sigs.iter()
        .filter(|&&s| (1..=64).contains(&s))
        .fold(0u64, |m, &s| m | 1 << (s - 1))
}

/// `rt_sigprocmask(SIG_BLOCK, sigs)` for the calling thread; returns the previous mask.
pub fn block_signals(sigs: &[i32]) -> SysResult<u64> {
    let set = sigmask_of(sigs);
    let mut old: u64 = 0;
    // SAFETY: `set` and `old` are live 8-byte kernel sigsets for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK,
            &set as *const u64,
            &mut old as *mut u64,
            8usize,
        )
    };
    cvt(r)?;
    Ok(old)
}

/// `rt_sigtimedwait(sigs, &info, NULL)`: waits until one of `sigs` (which the caller has
/// blocked) is pending, takes it off the queue and returns its number. Retries on EINTR.
pub fn wait_signal(sigs: &[i32]) -> SysResult<i32> {
    let set = sigmask_of(sigs);
    loop {
        let mut info = [0u8; 128];
        // SAFETY: `set` is a live 8-byte sigset and `info` a 128-byte siginfo buffer; a NULL
        // timeout means wait without limit.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_sigtimedwait,
                &set as *const u64,
                info.as_mut_ptr(),
                std::ptr::null::<libc::timespec>(),
                8usize,
            )
        };
        match cvt(r) {
            Ok(sig) => return Ok(sig as i32),
            Err(e) if e.0 == libc::EINTR => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigmask_bits() {
        assert_eq!(sigmask_of(&[1]), 1);
        assert_eq!(
            sigmask_of(&[libc::SIGCHLD, libc::SIGINT]),
            (1 << 16) | (1 << 1)
        );
        assert_eq!(sigmask_of(&[0, 65]), 0);
    }

    #[test]
    fn probe_region_guard() {
        let r = ProbeRegion::map(2).unwrap();
        r.touch(0).unwrap();
        assert!(r.touch(2).is_err());
        // Kernels older than 6.13 answer EINVAL; both outcomes are fine here.
        let _ = r.install_guard(1);
    }

    #[test]
    fn mm_map_size_is_known() {
        assert!(prctl_mm_map_size().unwrap() >= 104);
    }
}
