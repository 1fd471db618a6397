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
    base: UserRegs,
    /// PTRACE_GETEVENTMSG of the last PTRACE_EVENT_* stop inside an injected call (the
    /// new task's PID, as we see it, for a clone).
    pub event_msg: Option<u64>,
}

impl Injector {
    /// `base` supplies segment registers and flags; `syscall_ip` the instruction to run.
    pub fn new(pid: Pid, tid: Pid, syscall_ip: u64, base: UserRegs) -> Injector {
        Injector { pid, tid, syscall_ip, base, event_msg: None }
    }

    /// Runs one system call; returns the raw result (negative errno on failure).
    pub fn raw(&mut self, nr: i64, args: [u64; 6]) -> Result<i64> {
        let mut r = self.base;
        r.rip = self.syscall_ip;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
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

    /// Runs one system call and turns a negative result into an error naming `call`.
    pub fn call(&mut self, call: &'static str, nr: i64, args: [u64; 6]) -> Result<u64> {
        let r = self.raw(nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(Error::Injected { pid: self.pid, call, errno: Errno(-r as i32) });
        }
        Ok(r as u64)
    }
}

/// Moves a seized thread from a syscall stop to an interrupt stop (PTRACE_EVENT_STOP),
/// without it running a user instruction: the interrupt is handled on its way out of the
/// kernel. Registers set at such a stop get the kernel's own system-call restart
/// handling when the thread resumes, signal delivery included (a handler makes an
/// interrupted call return EINTR, none restarts it), exactly as for any ptrace stop.
pub fn to_interrupt_stop(pid: Pid, tid: Pid) -> Result<()> {
    ptrace::interrupt(tid).map_err(Error::sys(pid, "PTRACE_INTERRUPT"))?;
    ptrace::cont(tid, 0).map_err(Error::sys(pid, "PTRACE_CONT"))?;
    loop {
        match ptrace::waitpid(tid, libc::__WALL).map_err(Error::sys(pid, "waitpid"))? {
            WaitStatus::Stopped(_, _, ptrace::PTRACE_EVENT_STOP) => return Ok(()),
            WaitStatus::Stopped(_, sig, ev) => {
                return Err(Error::UnexpectedStop { pid, tid, what: format!("signal {sig}, event {ev}, moving to an interrupt stop") })
            }
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                return Err(Error::TargetDied { pid, what: format!("thread {tid} ended moving to an interrupt stop") })
            }
            WaitStatus::StillAlive => {}
        }
    }
}

/// Fault injection for tests of rule 1: with `STASIS_FAULT_KILL_AT_INJECTION=N` in the
/// environment, the process SIGKILLs itself while its N-th injected call (counting from 1)
/// is in flight, as a dumper killed at that instant would be.
fn fault_point() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static AT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let at = *AT.get_or_init(|| {
        std::env::var("STASIS_FAULT_KILL_AT_INJECTION").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
    });
    if at != 0 && COUNT.fetch_add(1, Ordering::Relaxed) + 1 == at {
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
