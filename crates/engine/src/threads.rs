//! Per-thread state: registers (general purpose with fs/gs base, and the XSAVE area), the
//! signal mask and queue, rseq registration, robust futex list, clear_child_tid and the
//! alternate signal stack.
//!
//! Restore puts the kernel-held per-thread addresses back by injected calls
//! (set_robust_list, set_tid_address, rseq) once the memory they point into exists, and
//! the registers last, at the exit stop of the final injected call.

use crate::error::{Error, Result};
use crate::freeze::FrozenThread;
use crate::inject::{to_interrupt_stop, Batch, Injector};
use crate::mm::ChildMem;
use crate::parasite::Parasite;
use crate::signals;
use stasis_image::{Rseq, ThreadRecord};
use stasis_sys::ptrace::{self, UserRegs, USER_REGS_COUNT};
use stasis_sys::Pid;

const PR_GET_TID_ADDRESS: u64 = 40;
const RSEQ_FLAG_UNREGISTER: u64 = 1;

/// In the parasite's scratch area, after the dispositions (see signals::queue_actions).
const TID_AT: u64 = 2304;

/// Queues what one thread's record needs from inside it (its clear_child_tid address
/// and alternate stack), for the parasite's next flush in this very thread.
pub fn queue(p: &mut Parasite) -> Result<()> {
    p.write(TID_AT, &[0xff; 8])?;
    p.queue("prctl(PR_GET_TID_ADDRESS)", libc::SYS_prctl, [PR_GET_TID_ADDRESS, p.scratch.0 + TID_AT, 0, 0, 0, 0], true);
    p.queue_altstack()
}

/// What a thread's record needs from inside the thread, or from the kernel's own
/// structures (see [`crate::kfacts`]).
pub struct Inside {
    pub xstate: Vec<u8>,
    pub clear_child_tid: u64,
    pub altstack: stasis_image::AltStack,
}

/// Reads one frozen thread, once what [`queue`] queued has run. `comm`: its name if
/// known already (the main thread's is in the process's stat).
pub fn dump(pid: Pid, t: &FrozenThread, p: &mut Parasite, comm: Option<&str>) -> Result<ThreadRecord> {
    let xstate = p.xstate_of(t.tid)?;
    let clear_child_tid = match p.read_u64(TID_AT)? {
        u64::MAX => return Err(Error::Injected { pid, call: "prctl(PR_GET_TID_ADDRESS)", errno: stasis_sys::Errno(libc::EINVAL) }),
        a => a,
    };
    record(pid, t, Inside { xstate, clear_child_tid, altstack: p.altstack()? }, comm)
}

/// The XSAVE image of a frozen thread.
pub fn xstate(pid: Pid, tid: Pid) -> Result<Vec<u8>> {
    ptrace::get_regset(tid, ptrace::NT_X86_XSTATE, stasis_sys::cpu::xsave_size())
        .map_err(Error::sys(pid, "PTRACE_GETREGSET NT_X86_XSTATE"))
}

/// The record of one frozen thread, with what `inside` says; the rest by ptrace and /proc.
pub fn record(pid: Pid, t: &FrozenThread, inside: Inside, comm: Option<&str>) -> Result<ThreadRecord> {
    let tid = t.tid;
    let rc = ptrace::get_rseq_config(tid).map_err(Error::sys(pid, "PTRACE_GET_RSEQ_CONFIGURATION"))?;
    let robust_list = stasis_sys::proc::get_robust_list(tid).map_err(Error::sys(pid, "get_robust_list"))?;
    let comm = match comm {
        Some(c) => c.to_string(),
        None => crate::procfs::read_text(pid, &format!("task/{tid}/comm"))?.1.trim_end_matches('\n').to_string(),
    };
    Ok(ThreadRecord {
        tid: tid.0,
        comm,
        regs: t.regs.to_array().to_vec(),
        xstate: inside.xstate,
        sigmask: t.sigmask,
        pending: signals::dump_pending(pid, tid, false)?,
        rseq: (rc.rseq_abi_pointer != 0).then_some(Rseq {
            addr: rc.rseq_abi_pointer,
            len: rc.rseq_abi_size,
            sig: rc.signature,
        }),
        robust_list,
        clear_child_tid: inside.clear_child_tid,
        altstack: inside.altstack,
    })
}

pub fn regs_of(pid: Pid, t: &ThreadRecord) -> Result<UserRegs> {
    let arr: [u64; USER_REGS_COUNT] = t.regs.as_slice().try_into().map_err(|_| Error::Restore {
        pid,
        what: format!("thread {} has {} registers saved, expected {USER_REGS_COUNT}", t.tid, t.regs.len()),
    })?;
    Ok(UserRegs::from_array(&arr))
}

/// Removes the rseq registration the restore child inherited from the restorer, before
/// the memory it points into is unmapped (the kernel writes to it on every return to
/// user space): the first call of the batch that rebuilds the address space.
pub fn unregister_inherited_rseq(pid: Pid, calls: &mut Batch) -> Result<()> {
    let rc = ptrace::get_rseq_config(pid).map_err(Error::sys(pid, "PTRACE_GET_RSEQ_CONFIGURATION"))?;
    if rc.rseq_abi_pointer != 0 {
        calls.push(
            "rseq(RSEQ_FLAG_UNREGISTER)",
            libc::SYS_rseq,
            [rc.rseq_abi_pointer, rc.rseq_abi_size as u64, RSEQ_FLAG_UNREGISTER, rc.signature as u64, 0, 0],
        );
    }
    Ok(())
}

/// Injected once the address space is in place: the kernel-held per-thread addresses the
/// thread cannot have yet. `fresh`: a thread just made by [`clone_thread`], which has its
/// clear_child_tid (CLONE_CHILD_CLEARTID) and no alternate stack, and gets its name and
/// robust list here (/proc/PID/task/TID/comm is writable only from inside the thread
/// group, hence prctl). Otherwise the main thread, which set its name, robust list,
/// clear_child_tid and alternate stack itself before it stopped. rseq registration
/// writes to the area at once, so it waits for the memory in every thread.
pub fn restore_kernel_addrs(calls: &mut Batch, mem: &ChildMem, scratch: u64, t: &ThreadRecord, fresh: bool) -> Result<()> {
    if fresh {
        let mut name = [0u8; 16];
        let n = t.comm.len().min(15);
        name[..n].copy_from_slice(&t.comm.as_bytes()[..n]);
        mem.write(scratch, &name)?;
        calls.push("prctl(PR_SET_NAME)", libc::SYS_prctl, [libc::PR_SET_NAME as u64, scratch, 0, 0, 0, 0]);
        if t.robust_list.0 != 0 {
            calls.push("set_robust_list", libc::SYS_set_robust_list, [t.robust_list.0, t.robust_list.1, 0, 0, 0, 0]);
        }
    }
    if let Some(r) = t.rseq {
        calls.push("rseq", libc::SYS_rseq, [r.addr, r.len as u64, 0, r.sig as u64, 0, 0]);
    }
    if !fresh || t.altstack.flags & libc::SS_DISABLE != 0 {
        return Ok(());
    }
    signals::restore_altstack(calls, mem, scratch + 64, &t.altstack)
}

/// After the last injected call: the thread's own registers, set at an interrupt stop so
/// that the kernel itself continues an interrupted system call (see
/// inject::to_interrupt_stop). A restored task has a fresh restart block, so a
/// restart-block call returns EINTR, as after a signal.
pub fn restore_regs(pid: Pid, tid: Pid, t: &ThreadRecord) -> Result<()> {
    to_interrupt_stop(pid, tid)?;
    set_final_regs(pid, tid, t)
}

/// The thread's saved registers, XSAVE state and signal mask, set at an interrupt stop.
pub fn set_final_regs(pid: Pid, tid: Pid, t: &ThreadRecord) -> Result<()> {
    if !t.xstate.is_empty() {
        ptrace::set_regset(tid, ptrace::NT_X86_XSTATE, &t.xstate)
            .map_err(Error::sys(pid, "PTRACE_SETREGSET NT_X86_XSTATE"))?;
    }
    let regs = crate::inject::resume_in_new_task(&regs_of(pid, t)?);
    ptrace::set_regs(tid, &regs).map_err(Error::sys(pid, "PTRACE_SETREGSET"))?;
    ptrace::set_sigmask(tid, t.sigmask).map_err(Error::sys(pid, "PTRACE_SETSIGMASK"))
}

const THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;

/// Injected clone3 in the main thread: a new thread with the saved TID and
/// clear_child_tid. It inherits the main thread's personality, no_new_privs and
/// credentials as they are at that moment. With
/// PTRACE_O_TRACECLONE it starts traced and stopped before running any instruction, so
/// its registers are set before it ever runs.
pub fn clone_thread(inj: &mut Injector, mem: &ChildMem, at: u64, t: &ThreadRecord) -> Result<Pid> {
    let pid = inj.pid;
    let tid_at = at + 128;
    let mut args = [0u64; 11];
    args[0] = THREAD_FLAGS;
    if t.clear_child_tid != 0 {
        args[0] |= libc::CLONE_CHILD_CLEARTID as u64;
        args[2] = t.clear_child_tid; // child_tid
    }
    args[8] = tid_at; // set_tid
    args[9] = 1; // set_tid_size
    let bytes: Vec<u8> = args.iter().flat_map(|v| v.to_le_bytes()).collect();
    mem.write(at, &bytes)?;
    mem.write(tid_at, &t.tid.to_le_bytes())?;
    inj.event_msg = None;
    let got = inj.call("clone3(CLONE_THREAD)", libc::SYS_clone3, [at, bytes.len() as u64, 0, 0, 0, 0])?;
    if got as i32 != t.tid {
        return Err(Error::Restore { pid, what: format!("thread {} came back as {got}", t.tid) });
    }
    // clone3 answers with the TID the process sees; ptrace needs the one we see (they
    // differ inside a PID namespace of its own).
    let tid = inj.event_msg.map(|m| Pid(m as i32)).unwrap_or(Pid(t.tid));
    match ptrace::waitpid(tid, libc::__WALL).map_err(Error::sys(pid, "waitpid"))? {
        ptrace::WaitStatus::Stopped(..) => {}
        other => return Err(Error::Restore { pid, what: format!("new thread {tid}: {other:?}") }),
    }
    Ok(tid)
}
