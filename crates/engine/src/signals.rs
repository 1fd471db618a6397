//! Signal state: dispositions (per process), blocked masks, pending signals and the
//! alternate signal stack (per thread).
//!
//! Dump reads dispositions and the alternate stack from the kernel's structures by BPF
//! (see [`crate::kfacts`]), else by injected calls (no system call reads another process's
//! dispositions), and pending signals with PTRACE_PEEKSIGINFO, which does not dequeue them.
//! Restore sets dispositions in the child before it stops, with every signal blocked so
//! that no handler can run before its code exists; pending signals are queued again by
//! injected calls at the end, and the blocked mask goes in last.

use crate::error::{Error, Result};
use crate::inject::{Batch, Injector};
use crate::mm::ChildMem;
use crate::parasite::Parasite;
use stasis_image::{AltStack, SigAction, SigInfo};
use stasis_sys::proc::KernelSigaction;
use stasis_sys::ptrace;
use stasis_sys::Pid;

const NSIG: i32 = 64;
const SS_ONSTACK: i32 = 1;
const SS_DISABLE: i32 = 2;

fn catchable(sig: i32) -> bool {
    sig != libc::SIGKILL && sig != libc::SIGSTOP
}

/// Reads the dispositions that are not the default with injected rt_sigaction calls into
/// the scratch page. Which ones those are comes from /proc (SigCgt, SigIgn), so that the
/// injected phase, during which a dumper killed by SIGKILL would leave the thread with
/// borrowed registers, stays as short as possible.
/// `queue_actions` queues the calls for the parasite's next flush; `read_actions` reads
/// what they wrote (each slot starts filled with a marker no disposition can have).
pub fn queue_actions(p: &mut Parasite, non_default: u64) -> Result<()> {
    p.write(0, &vec![0xff; (NSIG as usize + 1) * 32])?;
    for sig in (1..=NSIG).filter(|s| non_default_sig(non_default, *s)) {
        let out = p.scratch.0 + sig as u64 * 32;
        p.queue("rt_sigaction", libc::SYS_rt_sigaction, [sig as u64, 0, out, 8, 0, 0], true);
    }
    Ok(())
}

/// How many calls [`queue_actions`] queues.
pub fn queued_actions(non_default: u64) -> usize {
    (1..=NSIG).filter(|s| non_default_sig(non_default, *s)).count()
}

fn non_default_sig(non_default: u64, sig: i32) -> bool {
    catchable(sig) && non_default & (1u64 << (sig - 1)) != 0
}

/// See [`queue_actions`].
pub fn read_actions(p: &Parasite, non_default: u64) -> Result<Vec<SigAction>> {
    let mut buf = vec![0u8; (NSIG as usize + 1) * 32];
    p.read(0, &mut buf)?;
    let word = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().unwrap_or_default());
    let mut out = Vec::new();
    for sig in (1..=NSIG).filter(|s| non_default_sig(non_default, *s)) {
        let o = sig as usize * 32;
        if buf[o..o + 32].iter().all(|&b| b == 0xff) {
            return Err(Error::Injected { pid: p.inj.pid, call: "rt_sigaction", errno: stasis_sys::Errno(libc::EINVAL) });
        }
        let a = SigAction { sig, handler: word(o), flags: word(o + 8), restorer: word(o + 16), mask: word(o + 24) };
        if a.handler != 0 || a.flags != 0 || a.mask != 0 {
            out.push(a);
        }
    }
    Ok(out)
}

/// Queued signals of a thread (`shared` false) or of its whole process (`shared` true).
pub fn dump_pending(pid: Pid, tid: Pid, shared: bool) -> Result<Vec<SigInfo>> {
    let raw = ptrace::peek_siginfo(tid, shared).map_err(Error::sys(pid, "PTRACE_PEEKSIGINFO"))?;
    Ok(raw.into_iter().map(|s| SigInfo(s.to_vec())).collect())
}

/// In the restore child: block everything, then install every saved disposition and
/// reset all others to default (the child inherited the restorer's).
/// `inherited`: the signals whose disposition in the child (the restorer's, as
/// [`restorer_actions`] read them) is not the default; the others need no call unless
/// saved.
pub fn restore_actions_in_child(actions: &[SigAction], inherited: u64) -> std::result::Result<(), String> {
    stasis_sys::proc::set_own_sigmask(!0).map_err(|e| format!("sigprocmask: {e}"))?;
    for sig in (1..=NSIG).filter(|&s| catchable(s)) {
        let saved = actions.iter().find(|a| a.sig == sig);
        if saved.is_none() && inherited & (1u64 << (sig - 1)) == 0 {
            continue;
        }
        let act = saved
            .map(|a| KernelSigaction { handler: a.handler, flags: a.flags, restorer: a.restorer, mask: a.mask })
            .unwrap_or_default();
        stasis_sys::proc::set_sigaction(sig, &act).map_err(|e| format!("rt_sigaction({sig}): {e}"))?;
    }
    Ok(())
}

/// The signals whose disposition in this process is not the default (a signal that
/// cannot be read counts as not default).
pub fn restorer_actions() -> u64 {
    (1..=NSIG)
        .filter(|&s| catchable(s))
        .filter(|&s| stasis_sys::proc::own_sigaction(s).map_or(true, |a| a != KernelSigaction::default()))
        .fold(0, |m, s| m | 1u64 << (s - 1))
}

/// Injected in a new thread of a restored process: its alternate signal stack (the main
/// thread sets its own before it stops).
pub fn restore_altstack(calls: &mut Batch, mem: &ChildMem, at: u64, ss: &AltStack) -> Result<()> {
    let ss = if ss.flags & SS_DISABLE != 0 { AltStack { sp: 0, flags: SS_DISABLE, size: 0 } } else { *ss };
    let mut b = [0u8; 24];
    b[0..8].copy_from_slice(&ss.sp.to_le_bytes());
    // On-stack is a state, not a setting: the kernel derives it from the stack pointer.
    b[8..12].copy_from_slice(&(ss.flags & !SS_ONSTACK).to_le_bytes());
    b[16..24].copy_from_slice(&ss.size.to_le_bytes());
    mem.write(at, &b)?;
    calls.push("sigaltstack", libc::SYS_sigaltstack, [at, 0, 0, 0, 0, 0]);
    Ok(())
}

/// Injected: queues saved signals again, to the process (`tid` None) or one thread.
/// Signals queued to oneself may carry any si_code, so kernel-generated ones keep theirs.
pub fn restore_pending(inj: &mut Injector, mem: &ChildMem, at: u64, pid: Pid, tid: Option<Pid>, sigs: &[SigInfo]) -> Result<()> {
    for s in sigs {
        mem.write(at, &s.0)?;
        let sig = s.signo() as u64;
        match tid {
            None => inj.call("rt_sigqueueinfo", libc::SYS_rt_sigqueueinfo, [pid.0 as u64, sig, at, 0, 0, 0])?,
            Some(t) => inj.call(
                "rt_tgsigqueueinfo",
                libc::SYS_rt_tgsigqueueinfo,
                [pid.0 as u64, t.0 as u64, sig, at, 0, 0],
            )?,
        };
    }
    Ok(())
}

/// Injected: dequeues every pending signal (rt_sigtimedwait with a zero timeout, until
/// none is left).
pub fn drain_pending(inj: &mut Injector, mem: &ChildMem, at: u64) -> Result<()> {
    let mut b = [0u8; 24];
    b[0..8].copy_from_slice(&(!0u64).to_le_bytes()); // the set: every signal
    // b[8..24]: a zero timespec
    mem.write(at, &b)?;
    for _ in 0..1024 {
        let r = inj.raw(libc::SYS_rt_sigtimedwait, [at, 0, at + 8, 8, 0, 0])?;
        if r < 0 {
            return Ok(()); // EAGAIN: nothing pending
        }
    }
    Err(Error::Restore { pid: inj.pid, what: "pending signals keep arriving during restore".into() })
}
