//! ptrace(2) requests used to freeze, inspect and drive a target thread.
//!
//! See ptrace(2). Requests operate on one thread; the caller must be the tracer thread.

use crate::types::{cvt, Errno, Pid, SysResult};

const PTRACE_GETREGSET: libc::c_uint = 0x4204;
const PTRACE_SETREGSET: libc::c_uint = 0x4205;
const PTRACE_SEIZE: libc::c_uint = 0x4206;
const PTRACE_INTERRUPT: libc::c_uint = 0x4207;
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;

pub const NT_PRSTATUS: u32 = 1;
pub const NT_X86_XSTATE: u32 = 0x202;

pub const PTRACE_O_TRACESYSGOOD: u64 = 1;
pub const PTRACE_O_EXITKILL: u64 = 1 << 20;
pub const PTRACE_O_TRACEFORK: u64 = 1 << 1;
pub const PTRACE_O_TRACECLONE: u64 = 1 << 3;
pub const PTRACE_EVENT_STOP: i32 = 128;
pub const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;

/// Size of a kernel `siginfo_t`.
pub const SIGINFO_SIZE: usize = 128;

/// x86-64 `struct user_regs_struct`, as read by `PTRACE_GETREGSET NT_PRSTATUS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserRegs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

pub const USER_REGS_COUNT: usize = 27;

impl UserRegs {
    pub fn to_array(&self) -> [u64; USER_REGS_COUNT] {
        [
            self.r15, self.r14, self.r13, self.r12, self.rbp, self.rbx, self.r11, self.r10,
            self.r9, self.r8, self.rax, self.rcx, self.rdx, self.rsi, self.rdi, self.orig_rax,
            self.rip, self.cs, self.eflags, self.rsp, self.ss, self.fs_base, self.gs_base,
            self.ds, self.es, self.fs, self.gs,
        ]
    }

    pub fn from_array(a: &[u64; USER_REGS_COUNT]) -> UserRegs {
        UserRegs {
            r15: a[0], r14: a[1], r13: a[2], r12: a[3], rbp: a[4], rbx: a[5], r11: a[6],
            r10: a[7], r9: a[8], r8: a[9], rax: a[10], rcx: a[11], rdx: a[12], rsi: a[13],
            rdi: a[14], orig_rax: a[15], rip: a[16], cs: a[17], eflags: a[18], rsp: a[19],
            ss: a[20], fs_base: a[21], gs_base: a[22], ds: a[23], es: a[24], fs: a[25],
            gs: a[26],
        }
    }

    /// Names in the order of [`UserRegs::to_array`].
    pub const NAMES: [&'static str; USER_REGS_COUNT] = [
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
        "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
        "gs_base", "ds", "es", "fs", "gs",
    ];
}

fn ptrace(req: libc::c_uint, pid: Pid, addr: u64, data: u64) -> SysResult<libc::c_long> {
    // SAFETY: every request issued through this helper passes either plain integers or a
    // pointer to a live buffer of the size the request expects (checked at each call site).
    cvt(unsafe { libc::ptrace(req, pid.0, addr as *mut libc::c_void, data as *mut libc::c_void) })
}

/// `PTRACE_SEIZE`: attach without stopping the thread.
pub fn seize(tid: Pid, options: u64) -> SysResult<()> {
    ptrace(PTRACE_SEIZE, tid, 0, options).map(drop)
}

/// `PTRACE_INTERRUPT`: ask a seized thread to enter a `PTRACE_EVENT_STOP`.
pub fn interrupt(tid: Pid) -> SysResult<()> {
    ptrace(PTRACE_INTERRUPT, tid, 0, 0).map(drop)
}

/// `PTRACE_SETOPTIONS`.
pub fn set_options(tid: Pid, options: u64) -> SysResult<()> {
    ptrace(libc::PTRACE_SETOPTIONS, tid, 0, options).map(drop)
}

/// `PTRACE_DETACH`, delivering `sig` (0 for none).
pub fn detach(tid: Pid, sig: i32) -> SysResult<()> {
    ptrace(libc::PTRACE_DETACH, tid, 0, sig as u64).map(drop)
}

/// `PTRACE_CONT`, delivering `sig` (0 for none).
pub fn cont(tid: Pid, sig: i32) -> SysResult<()> {
    ptrace(libc::PTRACE_CONT, tid, 0, sig as u64).map(drop)
}

/// `PTRACE_SINGLESTEP`, delivering `sig` (0 for none).
pub fn single_step(tid: Pid, sig: i32) -> SysResult<()> {
    ptrace(libc::PTRACE_SINGLESTEP, tid, 0, sig as u64).map(drop)
}

/// `PTRACE_SYSCALL`: resume until the next system-call entry or exit stop.
pub fn syscall(tid: Pid, sig: i32) -> SysResult<()> {
    ptrace(libc::PTRACE_SYSCALL, tid, 0, sig as u64).map(drop)
}

/// `PTRACE_GETEVENTMSG`.
pub fn event_msg(tid: Pid) -> SysResult<u64> {
    let mut v: u64 = 0;
    ptrace(libc::PTRACE_GETEVENTMSG, tid, 0, &mut v as *mut u64 as u64)?;
    Ok(v)
}

/// `PTRACE_GETREGSET NT_PRSTATUS`: general-purpose registers, fs_base and gs_base.
pub fn get_regs(tid: Pid) -> SysResult<UserRegs> {
    let mut regs = UserRegs::default();
    let mut iov = libc::iovec {
        iov_base: &mut regs as *mut UserRegs as *mut libc::c_void,
        iov_len: std::mem::size_of::<UserRegs>(),
    };
    ptrace(PTRACE_GETREGSET, tid, NT_PRSTATUS as u64, &mut iov as *mut libc::iovec as u64)?;
    Ok(regs)
}

/// `PTRACE_SETREGSET NT_PRSTATUS`.
pub fn set_regs(tid: Pid, regs: &UserRegs) -> SysResult<()> {
    let mut copy = *regs;
    let mut iov = libc::iovec {
        iov_base: &mut copy as *mut UserRegs as *mut libc::c_void,
        iov_len: std::mem::size_of::<UserRegs>(),
    };
    ptrace(PTRACE_SETREGSET, tid, NT_PRSTATUS as u64, &mut iov as *mut libc::iovec as u64)
        .map(drop)
}

/// `PTRACE_GETREGSET` of note type `nt` into a buffer of `size` bytes; returns the bytes
/// the kernel filled.
pub fn get_regset(tid: Pid, nt: u32, size: usize) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: size };
    ptrace(PTRACE_GETREGSET, tid, nt as u64, &mut iov as *mut libc::iovec as u64)?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// `PTRACE_SETREGSET` of note type `nt`.
pub fn set_regset(tid: Pid, nt: u32, data: &[u8]) -> SysResult<()> {
    let mut buf = data.to_vec();
    let mut iov =
        libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    ptrace(PTRACE_SETREGSET, tid, nt as u64, &mut iov as *mut libc::iovec as u64).map(drop)
}

/// `PTRACE_GETSIGMASK`: the thread's blocked signal mask.
pub fn get_sigmask(tid: Pid) -> SysResult<u64> {
    let mut mask: u64 = 0;
    ptrace(PTRACE_GETSIGMASK, tid, 8, &mut mask as *mut u64 as u64)?;
    Ok(mask)
}

/// `PTRACE_SETSIGMASK`.
pub fn set_sigmask(tid: Pid, mask: u64) -> SysResult<()> {
    let mut m = mask;
    ptrace(PTRACE_SETSIGMASK, tid, 8, &mut m as *mut u64 as u64).map(drop)
}

#[repr(C)]
struct PeekSiginfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}

/// `PTRACE_PEEKSIGINFO`: every queued signal of the thread (or, with `shared`, of the
/// thread group), as raw 128-byte `siginfo_t` records, without dequeuing them.
pub fn peek_siginfo(tid: Pid, shared: bool) -> SysResult<Vec<[u8; SIGINFO_SIZE]>> {
    let mut out = Vec::new();
    const BATCH: usize = 32;
    loop {
        let mut buf = [[0u8; SIGINFO_SIZE]; BATCH];
        let mut args = PeekSiginfoArgs {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: BATCH as i32,
        };
        let n = ptrace(
            PTRACE_PEEKSIGINFO,
            tid,
            &mut args as *mut PeekSiginfoArgs as u64,
            buf.as_mut_ptr() as u64,
        )? as usize;
        out.extend_from_slice(&buf[..n]);
        if n < BATCH {
            return Ok(out);
        }
    }
}

/// `PTRACE_GETSIGINFO`: the raw `siginfo_t` of the signal the thread is stopped for.
pub fn get_siginfo(tid: Pid) -> SysResult<[u8; SIGINFO_SIZE]> {
    let mut buf = [0u8; SIGINFO_SIZE];
    ptrace(libc::PTRACE_GETSIGINFO as _, tid, 0, buf.as_mut_ptr() as u64)?;
    Ok(buf)
}

/// Result of `PTRACE_GET_RSEQ_CONFIGURATION`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RseqConfig {
    pub rseq_abi_pointer: u64,
    pub rseq_abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}

/// `PTRACE_GET_RSEQ_CONFIGURATION`: the thread's rseq registration (pointer 0 if none).
pub fn get_rseq_config(tid: Pid) -> SysResult<RseqConfig> {
    let mut c = RseqConfig::default();
    ptrace(
        PTRACE_GET_RSEQ_CONFIGURATION,
        tid,
        std::mem::size_of::<RseqConfig>() as u64,
        &mut c as *mut RseqConfig as u64,
    )?;
    Ok(c)
}

/// What `waitpid` reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitStatus {
    Exited(Pid, i32),
    Signaled(Pid, i32),
    /// Stopped with a signal and, for `PTRACE_EVENT_*` stops, the event number.
    Stopped(Pid, i32, i32),
    /// WNOHANG and nothing to report.
    StillAlive,
}

fn decode_status(pid: libc::pid_t, st: libc::c_int) -> WaitStatus {
    if pid == 0 {
        WaitStatus::StillAlive
    } else if libc::WIFEXITED(st) {
        WaitStatus::Exited(Pid(pid), libc::WEXITSTATUS(st))
    } else if libc::WIFSIGNALED(st) {
        WaitStatus::Signaled(Pid(pid), libc::WTERMSIG(st))
    } else {
        WaitStatus::Stopped(Pid(pid), libc::WSTOPSIG(st), (st >> 16) & 0xff)
    }
}

/// `waitpid(pid, &status, flags)`; retries on EINTR.
pub fn waitpid(pid: Pid, flags: i32) -> SysResult<WaitStatus> {
    loop {
        let mut st: libc::c_int = 0;
        // SAFETY: `st` is a valid out pointer for the duration of the call.
        let r = unsafe { libc::waitpid(pid.0, &mut st, flags) };
        if r == -1 {
            let e = Errno::last();
            if e.0 == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        return Ok(decode_status(r, st));
    }
}
