//! Running a system call inside a stopped target thread.
//!
//! The thread's registers are pointed at a `syscall` instruction that exists in the target
//! (a byte pair in its vDSO during a dump; the helper page during a restore), loaded with
//! the call's number and arguments, and resumed with `PTRACE_SYSCALL` twice: to the call's
//! entry stop and to its exit stop, where `rax` holds the result. Syscall stops are ptrace
//! notifications, not signals; single-stepping instead would raise a forced SIGTRAP, which
//! resets a blocked or ignored SIGTRAP disposition of the target. `orig_rax` is set to -1
//! so that the kernel does not apply its restart logic to the injected registers.
//!
//! After an injection the thread sits at a syscall-exit stop, where the kernel no longer
//! restarts an interrupted call on resume; [`restart_fixup`] does what it would have done.
//! The caller owns putting the thread's own registers back (the freeze guard does so on
//! every path). The tracee must have `PTRACE_O_TRACESYSGOOD` set.

use crate::error::{Error, Result};
use stasis_sys::ptrace::{self, UserRegs, WaitStatus};
use stasis_sys::{Errno, Pid};

pub struct Injector {
    pub pid: Pid,
    pub tid: Pid,
    syscall_ip: u64,
    pub base: UserRegs,
    /// PTRACE_GETEVENTMSG of the last PTRACE_EVENT_* stop inside an injected call (the
    /// new task's PID, as we see it, for a clone).
    pub event_msg: Option<u64>,
}

/// `base` set up to make system call `nr` with `args` at `ip` (orig_rax -1: nothing for
/// the kernel to restart). Pure.
pub fn call_regs(base: &UserRegs, ip: u64, nr: i64, args: [u64; 6]) -> UserRegs {
    let mut r = *base;
    r.rip = ip;
    r.rax = nr as u64;
    r.orig_rax = u64::MAX;
    [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9] = args;
    r
}

/// A system call's raw result, or the error naming `call` when it is a negative errno.
pub fn checked(pid: Pid, call: &'static str, r: i64) -> Result<u64> {
    match (-4095..0).contains(&r) {
        true => Err(Error::Injected { pid, call, errno: Errno(-r as i32) }),
        false => Ok(r as u64),
    }
}

/// Waits for thread `tid`'s next stop and returns its (signal, event) when `want` takes
/// it; any other stop, or the thread's end, is an error that says it came `during` what.
pub fn wait_stop(pid: Pid, tid: Pid, during: &str, want: impl Fn(i32, i32) -> bool) -> Result<(i32, i32)> {
    loop {
        match ptrace::waitpid(tid, libc::__WALL).map_err(Error::sys(pid, "waitpid"))? {
            WaitStatus::Stopped(_, sig, ev) if want(sig, ev) => return Ok((sig, ev)),
            WaitStatus::Stopped(_, sig, ev) => {
                return Err(Error::UnexpectedStop { pid, tid, what: format!("signal {sig}, event {ev}, {during}") })
            }
            WaitStatus::Exited(_, c) => return Err(Error::TargetDied { pid, what: format!("thread {tid}: exit {c} {during}") }),
            WaitStatus::Signaled(_, s) => return Err(Error::TargetDied { pid, what: format!("thread {tid}: signal {s} {during}") }),
            WaitStatus::StillAlive => {}
        }
    }
}

impl Injector {
    /// `base` supplies segment registers and flags; `syscall_ip` the instruction to run.
    pub fn new(pid: Pid, tid: Pid, syscall_ip: u64, base: UserRegs) -> Injector {
        Injector { pid, tid, syscall_ip, base, event_msg: None }
    }

    /// Runs one system call; returns the raw result (negative errno on failure).
    pub fn raw(&mut self, nr: i64, args: [u64; 6]) -> Result<i64> {
        let r = call_regs(&self.base, self.syscall_ip, nr, args);
        let pid = self.pid;
        ptrace::set_regs(self.tid, &r).map_err(Error::sys(pid, "PTRACE_SETREGSET"))?;
        self.wait_syscall_stop(nr)?; // entry
        fault_point();
        self.wait_syscall_stop(nr)?; // exit
        let out = ptrace::get_regs(self.tid).map_err(Error::sys(pid, "PTRACE_GETREGSET"))?;
        Ok(out.rax as i64)
    }

    fn wait_syscall_stop(&mut self, nr: i64) -> Result<()> {
        let pid = self.pid;
        ptrace::syscall(self.tid, 0).map_err(Error::sys(pid, "PTRACE_SYSCALL"))?;
        loop {
            match ptrace::waitpid(self.tid, libc::__WALL).map_err(Error::sys(pid, "waitpid"))? {
                WaitStatus::Stopped(_, s, 0) if s == libc::SIGTRAP | 0x80 => return Ok(()),
                // PTRACE_EVENT_CLONE and friends, inside an injected clone: go on to the
                // syscall's exit stop.
                WaitStatus::Stopped(_, libc::SIGTRAP, ev) if ev != 0 => {
                    self.event_msg = Some(ptrace::event_msg(self.tid).map_err(Error::sys(pid, "PTRACE_GETEVENTMSG"))?);
                    ptrace::syscall(self.tid, 0).map_err(Error::sys(pid, "PTRACE_SYSCALL"))?;
                }
                WaitStatus::Stopped(_, sig, ev) => {
                    return Err(Error::UnexpectedStop {
                        pid,
                        tid: self.tid,
                        what: format!("signal {sig}, event {ev}, during injected syscall {nr}"),
                    })
                }
                WaitStatus::Exited(_, c) => {
                    return Err(Error::TargetDied { pid, what: format!("exit {c} during injected syscall {nr}") })
                }
                WaitStatus::Signaled(_, s) => {
                    return Err(Error::TargetDied { pid, what: format!("signal {s} during injected syscall {nr}") })
                }
                WaitStatus::StillAlive => {}
            }
        }
    }

    /// Runs one system call and leaves the thread at the interrupt stop that follows it
    /// (instead of its exit stop): from the entry stop the thread is interrupted and let
    /// go, so the call completes and the thread traps before its next instruction. One
    /// stop fewer than a call followed by [`to_interrupt_stop`]. A negative result is an
    /// error naming `call`.
    pub fn call_to_interrupt_stop(&mut self, call: &'static str, nr: i64, args: [u64; 6]) -> Result<u64> {
        let pid = self.pid;
        let r = call_regs(&self.base, self.syscall_ip, nr, args);
        ptrace::set_regs(self.tid, &r).map_err(Error::sys(pid, "PTRACE_SETREGSET"))?;
        self.wait_syscall_stop(nr)?; // entry
        fault_point();
        to_interrupt_stop(pid, self.tid)?;
        let got = ptrace::get_regs(self.tid).map_err(Error::sys(pid, "PTRACE_GETREGSET"))?.rax as i64;
        checked(pid, call, got)
    }

    /// Runs one system call and turns a negative result into an error naming `call`.
    pub fn call(&mut self, call: &'static str, nr: i64, args: [u64; 6]) -> Result<u64> {
        log::trace!("pid {}: injected {call}", self.pid);
        let r = self.raw(nr, args)?;
        checked(self.pid, call, r)
    }
}

/// Where the restore helper page holds [`BATCH_CODE`], and its call table.
pub const BATCH_CODE_AT: u64 = 16;
pub const BATCH_TABLE_AT: u64 = 32 * 1024;
/// Entries of the table, the end marker included (64 bytes each, up to the page's end).
const BATCH_TABLE_SLOTS: usize = 512;

/// Runs the call table at %rbx: entries of eight words (number, six arguments, result),
/// ended by a negative number. Stops at the end or at the first call that fails, then
/// stops itself: tkill(gettid(), SIGSTOP), which its tracer sees as a signal-delivery
/// stop and suppresses (SIGSTOP has no disposition a program can change, unlike the
/// SIGTRAP of an int3). The trailing int3 is never reached under a tracer.
///
/// ```text
/// 0:  mov (%rbx),%rax; test %rax,%rax; js done
///     mov 8(%rbx),%rdi; mov 16(%rbx),%rsi; mov 24(%rbx),%rdx
///     mov 32(%rbx),%r10; mov 40(%rbx),%r8; mov 48(%rbx),%r9
///     syscall; mov %rax,56(%rbx)
///     cmp $-4095,%rax; jae done; add $64,%rbx; jmp 0
/// done: mov $186,%eax; syscall; mov %rax,%rdi; mov $19,%esi; mov $200,%eax; syscall
///     int3; jmp done
/// ```
pub const BATCH_CODE: [u8; 77] = [
    0x48, 0x8b, 0x03, 0x48, 0x85, 0xc0, 0x78, 0x2c, 0x48, 0x8b, 0x7b, 0x08, 0x48, 0x8b, 0x73, 0x10, 0x48, 0x8b,
    0x53, 0x18, 0x4c, 0x8b, 0x53, 0x20, 0x4c, 0x8b, 0x43, 0x28, 0x4c, 0x8b, 0x4b, 0x30, 0x0f, 0x05, 0x48, 0x89,
    0x43, 0x38, 0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, 0x73, 0x06, 0x48, 0x83, 0xc3, 0x40, 0xeb, 0xcc, 0xb8, 0xba,
    0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x89, 0xc7, 0xbe, 0x13, 0x00, 0x00, 0x00, 0xb8, 0xc8, 0x00, 0x00, 0x00,
    0x0f, 0x05, 0xcc, 0xeb, 0xe7,
];

/// System calls run in a restore child one after another from [`BATCH_CODE`], with one
/// resume and one stop for all of them instead of two stops each: for calls whose results
/// nothing depends on but success (the address-space rebuild). Only for a restore child:
/// its code runs in the helper page, and all its signals are blocked.
#[derive(Default)]
pub struct Batch {
    calls: Vec<(&'static str, i64, [u64; 6])>,
}

impl Batch {
    pub fn push(&mut self, call: &'static str, nr: i64, args: [u64; 6]) {
        self.calls.push((call, nr, args));
    }

    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Runs every call in `inj`'s thread, whose helper page is at `helper`; the first
    /// failure is an error naming its call.
    pub fn run(self, inj: &mut Injector, mem: &crate::mm::ChildMem, helper: u64) -> Result<()> {
        for chunk in self.calls.chunks(BATCH_TABLE_SLOTS - 1) {
            run_chunk(inj, mem, helper, chunk, None)?;
        }
        Ok(())
    }

    /// Runs every call, then unmaps the helper page (`helper_len` bytes) with the runner
    /// still in it: its next instruction faults, and the thread stops for that SIGSEGV
    /// (unblocked for it), one stop for all. The signal is dropped when the thread is let
    /// go. A program that ignores SIGSEGV must not get here: a fault resets an ignored
    /// disposition.
    pub fn run_and_unmap(mut self, inj: &mut Injector, mem: &crate::mm::ChildMem, helper: u64, helper_len: u64) -> Result<()> {
        self.push("munmap(helper)", libc::SYS_munmap, [helper, helper_len, 0, 0, 0, 0]);
        let n = self.calls.len().div_ceil(BATCH_TABLE_SLOTS - 1);
        for (i, chunk) in self.calls.chunks(BATCH_TABLE_SLOTS - 1).enumerate() {
            run_chunk(inj, mem, helper, chunk, (i + 1 == n).then_some(helper_len))?;
        }
        Ok(())
    }
}

/// `unmaps`: the chunk's last call removes the helper page, of that many bytes (see
/// Batch::run_and_unmap).
fn run_chunk(inj: &mut Injector, mem: &crate::mm::ChildMem, helper: u64, calls: &[(&'static str, i64, [u64; 6])], unmaps: Option<u64>) -> Result<()> {
    let (pid, tid) = (inj.pid, inj.tid);
    let mut table = Vec::with_capacity((calls.len() + 1) * 64);
    for (_, nr, args) in calls {
        table.extend_from_slice(&nr.to_le_bytes());
        args.iter().for_each(|a| table.extend_from_slice(&a.to_le_bytes()));
        table.extend_from_slice(&0u64.to_le_bytes());
    }
    table.extend_from_slice(&(-1i64).to_le_bytes());
    table.resize((calls.len() + 1) * 64, 0);
    mem.write(helper + BATCH_TABLE_AT, &table)?;
    let mut r = inj.base;
    r.rip = helper + BATCH_CODE_AT;
    r.rbx = helper + BATCH_TABLE_AT;
    r.orig_rax = u64::MAX;
    ptrace::set_regs(tid, &r).map_err(Error::sys(pid, "PTRACE_SETREGSET"))?;
    if unmaps.is_some() {
        ptrace::set_sigmask(tid, !(1u64 << (libc::SIGSEGV - 1))).map_err(Error::sys(pid, "PTRACE_SETSIGMASK"))?;
    }
    fault_point();
    ptrace::cont(tid, 0).map_err(Error::sys(pid, "PTRACE_CONT"))?;
    let done = |sig: i32, ev: i32| ev == 0 && (sig == libc::SIGSTOP || (sig == libc::SIGSEGV && unmaps.is_some()));
    if wait_stop(pid, tid, "in a batch of injected calls", done)?.0 == libc::SIGSEGV {
        // Every call done, the helper page gone under the runner: the fault must be in
        // the page (si_addr at offset 16 of siginfo).
        let si = ptrace::get_siginfo(tid).map_err(Error::sys(pid, "PTRACE_GETSIGINFO"))?;
        let addr = u64::from_le_bytes(si[16..24].try_into().unwrap_or_default());
        ptrace::set_sigmask(tid, !0).map_err(Error::sys(pid, "PTRACE_SETSIGMASK"))?;
        if !(helper..helper + unmaps.unwrap_or(0)).contains(&addr) {
            return Err(Error::UnexpectedStop { pid, tid, what: format!("SIGSEGV at {addr:#x}, outside the helper page, in a batch of injected calls") });
        }
        return Ok(());
    }
    let mut out = vec![0u8; calls.len() * 64];
    mem.read(helper + BATCH_TABLE_AT, &mut out)?;
    for (i, (call, _, _)) in calls.iter().enumerate() {
        checked(pid, call, i64::from_le_bytes(out[i * 64 + 56..i * 64 + 64].try_into().unwrap_or_default()))?;
    }
    Ok(())
}

/// Moves a seized thread from a syscall stop to an interrupt stop (PTRACE_EVENT_STOP),
/// without it running a user instruction: the interrupt is handled on its way out of the
/// kernel. Registers set at such a stop get the kernel's own system-call restart
/// handling when the thread resumes, signal delivery included (a handler makes an
/// interrupted call return EINTR, none restarts it), exactly as for any ptrace stop.
pub fn to_interrupt_stop(pid: Pid, tid: Pid) -> Result<()> {
    ptrace::interrupt(tid).map_err(Error::sys(pid, "PTRACE_INTERRUPT"))?;
    ptrace::cont(tid, 0).map_err(Error::sys(pid, "PTRACE_CONT"))?;
    wait_stop(pid, tid, "moving to an interrupt stop", |_, ev| ev == ptrace::PTRACE_EVENT_STOP).map(drop)
}

/// Fault injection for tests of rule 1: with `STASIS_FAULT_KILL_AT_INJECTION=N` in the
/// environment, the process SIGKILLs itself while its N-th injected call (counting from 1)
/// is in flight, as a dumper killed at that instant would be.
pub(crate) fn fault_point() {
    static AT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if crate::fault_hit("STASIS_FAULT_KILL_AT_INJECTION", &AT, &COUNT) {
        let _ = stasis_sys::proc::kill(stasis_sys::proc::getpid(), libc::SIGKILL);
    }
}

pub const ERESTARTSYS: i64 = -512;
pub const ERESTARTNOINTR: i64 = -513;
pub const ERESTARTNOHAND: i64 = -514;
pub const ERESTART_RESTARTBLOCK: i64 = -516;

/// How a thread stopped inside an interrupted system call must continue when it resumes
/// without running a signal handler: the kernel's own rule. `same_task` tells whether the
/// kernel still holds the thread's restart block (a restored task has a fresh one, so a
/// restart-block call returns EINTR there, as after a signal).
pub fn restart_fixup(regs: &UserRegs, same_task: bool) -> UserRegs {
    let mut r = *regs;
    if (r.orig_rax as i64) < 0 {
        return r;
    }
    match r.rax as i64 {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            r.rax = r.orig_rax;
            r.rip -= 2;
        }
        ERESTART_RESTARTBLOCK if same_task => {
            r.rax = libc::SYS_restart_syscall as u64;
            r.rip -= 2;
        }
        ERESTART_RESTARTBLOCK => r.rax = (-libc::EINTR) as i64 as u64,
        _ => {}
    }
    r.orig_rax = u64::MAX;
    r
}

/// The registers a restored thread resumes with, for the kernel's restart logic to act on
/// at its interrupt stop. A restored task has a fresh restart block, so a call that was
/// to continue through it (-ERESTART_RESTARTBLOCK) returns EINTR, as after a signal with a
/// handler: right for nanosleep (it reports the time left), wrong for poll with a
/// timeout, which reports nothing and which programs that block every signal (such as
/// `script`, reading signals from a signalfd) take as a fatal error. Such a poll runs
/// again with its original arguments (-ERESTARTNOHAND): its timeout starts afresh, which
/// only makes it wait longer, as a checkpointed program does anyway.
pub fn resume_in_new_task(regs: &UserRegs) -> UserRegs {
    let mut r = *regs;
    if r.orig_rax == libc::SYS_poll as u64 && r.rax as i64 == ERESTART_RESTARTBLOCK {
        r.rax = ERESTARTNOHAND as u64;
    }
    r
}

/// Finds a `syscall` instruction (0f 05) in `code`, mapped at `base`. Any occurrence will
/// do: execution starts at the pair itself, so what precedes it does not matter.
pub fn find_syscall_insn(code: &[u8], base: u64) -> Option<u64> {
    code.windows(2).position(|w| w == [0x0f, 0x05]).map(|i| base + i as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_call(rax: i64) -> UserRegs {
        UserRegs { orig_rax: 35, rax: rax as u64, rip: 0x1002, ..Default::default() }
    }

    #[test]
    fn restartable_calls_run_again() {
        for code in [ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND] {
            let r = restart_fixup(&in_call(code), false);
            assert_eq!((r.rax, r.rip, r.orig_rax), (35, 0x1000, u64::MAX));
        }
    }

    #[test]
    fn restart_block_is_eintr_in_a_new_task() {
        let r = restart_fixup(&in_call(ERESTART_RESTARTBLOCK), false);
        assert_eq!((r.rax as i64, r.rip), (-4, 0x1002));
        let r = restart_fixup(&in_call(ERESTART_RESTARTBLOCK), true);
        assert_eq!((r.rax, r.rip), (libc::SYS_restart_syscall as u64, 0x1000));
    }

    #[test]
    fn an_interrupted_poll_runs_again_in_a_new_task() {
        let poll = UserRegs { orig_rax: libc::SYS_poll as u64, rax: ERESTART_RESTARTBLOCK as u64, rip: 0x1002, ..Default::default() };
        let r = restart_fixup(&resume_in_new_task(&poll), false);
        assert_eq!((r.rax, r.rip), (libc::SYS_poll as u64, 0x1000));
        let sleep = in_call(ERESTART_RESTARTBLOCK);
        assert_eq!(resume_in_new_task(&sleep), sleep);
    }

    #[test]
    fn finished_calls_and_user_code_are_untouched() {
        let r = restart_fixup(&in_call(-4), false);
        assert_eq!((r.rax as i64, r.rip), (-4, 0x1002));
        let user = UserRegs { orig_rax: u64::MAX, rax: 7, rip: 0x5000, ..Default::default() };
        assert_eq!(restart_fixup(&user, false), user);
    }

    #[test]
    fn finds_syscall_pair() {
        assert_eq!(find_syscall_insn(&[0x90, 0x0f, 0x05, 0xc3], 0x1000), Some(0x1001));
        assert_eq!(find_syscall_insn(&[0x0f, 0x90, 0x05], 0x1000), None);
    }
}
