//! Freezing a process: every thread seized and interrupted into a ptrace stop.
//!
//! [`Frozen`] is a guard: dropped without an explicit [`Frozen::kill`], it puts back the
//! registers it was given (so an injected call interrupted by an error cannot leave a
//! thread pointing at the wrong instruction) and detaches, and the process runs on as if
//! nothing happened. If the dumper itself dies, the kernel detaches the threads and they
//! resume on their own.

use crate::error::{Error, Result};
use crate::inject::restart_fixup;
use crate::procfs;
use stasis_sys::ptrace::{self, UserRegs, WaitStatus};
use stasis_sys::Pid;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// A thread in a ptrace stop, with the registers it had when it stopped.
pub struct FrozenThread {
    pub tid: Pid,
    pub regs: UserRegs,
    pub sigmask: u64,
    /// System calls were injected: the thread now sits at a syscall-exit stop, where the
    /// kernel no longer restarts the call it was interrupted in (see inject::restart_fixup).
    pub injected: bool,
}

impl FrozenThread {
    /// Puts the thread's own state back while keeping it stopped, so that from here on a
    /// dumper that dies (and is detached by the kernel) leaves a thread that continues
    /// correctly.
    pub fn restore_state(&self) -> stasis_sys::SysResult<()> {
        if self.injected {
            ptrace::set_regs(self.tid, &restart_fixup(&self.regs, true))?;
        }
        ptrace::set_sigmask(self.tid, self.sigmask)
    }

    /// Releases the thread. After injections it sits at a syscall-exit stop; moved to an
    /// interrupt stop first, it gets its exact original registers and the kernel's own
    /// restart handling (a signal arriving right then is handled as in the original).
    fn put_back(&self, pid: Pid) -> Result<()> {
        if self.injected {
            crate::inject::to_interrupt_stop(pid, self.tid)?;
            ptrace::set_regs(self.tid, &self.regs).map_err(Error::sys(pid, "PTRACE_SETREGSET"))?;
        }
        ptrace::set_sigmask(self.tid, self.sigmask).map_err(Error::sys(pid, "PTRACE_SETSIGMASK"))?;
        ptrace::detach(self.tid, 0).map_err(Error::sys(pid, "PTRACE_DETACH"))
    }
}

pub struct Frozen {
    pub pid: Pid,
    pub threads: Vec<FrozenThread>,
    done: bool,
}

fn list_tasks(pid: Pid) -> Result<Vec<Pid>> {
    let path = format!("/proc/{pid}/task");
    let rd = std::fs::read_dir(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NoSuchProcess(pid),
        _ => Error::Proc { pid, path: path.clone().into(), err: e },
    })?;
    let mut v: Vec<Pid> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok().map(Pid))
        .collect();
    v.sort();
    Ok(v)
}

/// How long a dump waits for a thread in vfork() to be let go by its child (which execs
/// or exits: posix_spawn's child does so at once) before it refuses the process.
const VFORK_WAIT: Duration = Duration::from_secs(1);

/// System calls that can wait for a vfork child: vfork, clone and clone3 with
/// CLONE_VFORK.
const VFORK_CALLS: [i64; 3] = [libc::SYS_vfork, libc::SYS_clone, libc::SYS_clone3];

/// The child thread `tid` of `pid` waits for in vfork(): the thread sleeps (state D,
/// TASK_KILLABLE) in a clone system call and a child it made shares its address space,
/// or the call asked for CLONE_VFORK without CLONE_VM (the child is then the thread's
/// newest: it made none since). Such a thread cannot enter a ptrace stop until the child
/// execs or exits.
pub fn vfork_child(pid: Pid, tid: Pid) -> Result<Option<Pid>> {
    let (path, text) = procfs::read_text(pid, &format!("task/{tid}/stat"))?;
    if procfs::parse_stat(&text).map_err(|what| Error::ProcParse { pid, path, what })?.state != 'D' {
        return Ok(None);
    }
    let call = procfs::read_text(pid, &format!("task/{tid}/syscall"))?.1;
    let mut words = call.split_whitespace();
    let Some(nr) = words.next().and_then(|n| n.parse().ok()).filter(|n: &i64| VFORK_CALLS.contains(n)) else {
        return Ok(None);
    };
    let kids = procfs::read_text(pid, &format!("task/{tid}/children"))?.1;
    let kids: Vec<Pid> = kids.split_whitespace().filter_map(|c| c.parse().ok()).map(Pid).collect();
    for &child in &kids {
        if stasis_sys::proc::kcmp_shares(tid, child, stasis_sys::proc::Shared::Vm).unwrap_or(false) {
            return Ok(Some(child));
        }
    }
    let arg1 = words.next().and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()).unwrap_or(0);
    let flags = match nr {
        libc::SYS_clone => arg1,
        // clone3: the flags are the first field of the struct clone_args at arg1, which
        // stays as it is while the thread waits.
        libc::SYS_clone3 => {
            let mut b = [0u8; 8];
            let remote = [stasis_sys::mem::RemoteRange { addr: stasis_sys::RemoteAddr(arg1), len: 8 }];
            match stasis_sys::mem::process_vm_readv(pid, &mut b, &remote) {
                Ok(8) => u64::from_le_bytes(b),
                _ => 0,
            }
        }
        _ => 0,
    };
    Ok(if flags & libc::CLONE_VFORK as u64 != 0 { kids.last().copied() } else { None })
}

/// Returns once thread `tid` is not (or no longer) waiting in vfork(), within VFORK_WAIT;
/// else the refusal naming the process and the child it waits for.
fn wait_out_vfork(pid: Pid, tid: Pid, since: Instant) -> Result<()> {
    while let Some(child) = vfork_child(pid, tid)? {
        if since.elapsed() >= VFORK_WAIT {
            let thread = if tid == pid { String::new() } else { format!(" (thread {tid})") };
            return Err(Error::InVfork { pid, thread, child, waited: VFORK_WAIT });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Waits for a seized thread to report its interrupt stop. A signal that arrives first is
/// passed back to the thread (so it is not lost) and we wait again. The stop normally
/// comes at once; one that does not may be a thread waiting in vfork() (one that
/// entered it before the interrupt, or whose clone was under way: copy_process gives up
/// only for a fatal signal): unless the child lets it go, it is refused after
/// VFORK_WAIT, still seized (a running tracee cannot be detached; the kernel lets it go
/// when the dumper exits).
fn wait_for_stop(pid: Pid, tid: Pid) -> Result<()> {
    let start = Instant::now();
    let mut nap = Duration::ZERO;
    loop {
        match ptrace::waitpid(tid, libc::__WALL | libc::WNOHANG).map_err(Error::sys(pid, "waitpid"))? {
            WaitStatus::Stopped(_, _, ptrace::PTRACE_EVENT_STOP) => return Ok(()),
            WaitStatus::Stopped(_, sig, _) => {
                ptrace::cont(tid, sig).map_err(Error::sys(pid, "PTRACE_CONT"))?;
            }
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                return Err(Error::TargetDied { pid, what: format!("thread {tid} exited while freezing") })
            }
            WaitStatus::StillAlive => {
                if nap >= Duration::from_millis(1) {
                    wait_out_vfork(pid, tid, start)?;
                }
                std::thread::sleep(nap);
                nap = (nap * 2).clamp(Duration::from_micros(10), Duration::from_millis(1));
            }
        }
    }
}

/// System calls that run with a temporary signal mask and put the caller's own back when
/// they return (the kernel keeps it as saved_sigmask meanwhile).
const MASK_SWAPPING_CALLS: [i64; 6] = [
    libc::SYS_rt_sigsuspend,
    libc::SYS_ppoll,
    libc::SYS_pselect6,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    333, // io_pgetevents (not in the libc crate)
];

/// The thread's own signal mask when it is stopped in a call that swapped it for a
/// temporary one (sigsuspend, ppoll, pselect, epoll_pwait): ptrace shows only the
/// temporary mask, and PTRACE_SETSIGMASK would drop the saved one. One injected getpid,
/// with the mask untouched, takes the thread through the kernel's return to user space,
/// which puts the saved mask back; it is read at the call's entry stop. The restarted
/// call installs its temporary mask again, as it did the first time. `None` for a thread
/// in any other call (its mask is its own). The thread is left at a syscall-exit stop.
/// A signal that arrives right then (the temporary mask may let it through) is given
/// back to the thread, which is released, and the dump is refused: dump again.
fn real_sigmask(pid: Pid, tid: Pid, regs: &UserRegs) -> Result<Option<u64>> {
    if !MASK_SWAPPING_CALLS.contains(&(regs.orig_rax as i64)) {
        return Ok(None);
    }
    // The thread stopped inside the call, so the two bytes before rip are its syscall.
    let mut insn = [0u8; 2];
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .map_err(|e| Error::Proc { pid, path: format!("/proc/{pid}/mem").into(), err: e })?;
    if std::os::unix::fs::FileExt::read_exact_at(&mem, &mut insn, regs.rip.wrapping_sub(2)).is_err() || insn != [0x0f, 0x05] {
        return Ok(None);
    }
    let mut r = *regs;
    r.rip -= 2;
    r.rax = libc::SYS_getpid as u64;
    r.orig_rax = u64::MAX;
    ptrace::set_regs(tid, &r).map_err(Error::sys(pid, "PTRACE_SETREGSET"))?;
    let mut mask = None;
    for _ in 0..2 {
        ptrace::syscall(tid, 0).map_err(Error::sys(pid, "PTRACE_SYSCALL"))?;
        loop {
            match ptrace::waitpid(tid, libc::__WALL).map_err(Error::sys(pid, "waitpid"))? {
                WaitStatus::Stopped(_, s, 0) if s == libc::SIGTRAP | 0x80 => break,
                WaitStatus::Stopped(_, sig, 0) => {
                    // A signal-delivery stop: back to where the thread was, with its signal.
                    ptrace::set_regs(tid, regs).map_err(Error::sys(pid, "PTRACE_SETREGSET"))?;
                    ptrace::detach(tid, sig).map_err(Error::sys(pid, "PTRACE_DETACH"))?;
                    return Err(Error::Unsupported {
                        pid,
                        what: format!("a signal ({sig}) that arrived while thread {tid} was being frozen in a call with a temporary signal mask; dump again"),
                    });
                }
                WaitStatus::Stopped(..) | WaitStatus::StillAlive => {}
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                    return Err(Error::TargetDied { pid, what: format!("thread {tid} exited while freezing") })
                }
            }
        }
        if mask.is_none() {
            mask = Some(ptrace::get_sigmask(tid).map_err(Error::sys(pid, "PTRACE_GETSIGMASK"))?);
        }
    }
    Ok(mask)
}

/// /proc/PID/stat and status of a process, read once it was frozen (for a zombie, once
/// it was found to be one).
pub type ProcInfo = Box<(procfs::Stat, procfs::Status)>;

/// A process whose threads are being frozen: those in `interrupted` are seized and
/// interrupted but their stops not yet awaited, those in `fr` are stopped. Dropped
/// before [`Freezing::finish`] (an error), it lets every thread go again: the stopped
/// ones by the guard in `fr`, the interrupted ones once they have stopped.
struct Freezing {
    fr: Frozen,
    seen: BTreeSet<Pid>,
    interrupted: Vec<Pid>,
}

impl Freezing {
    /// Seizes and interrupts the main thread of `pid`; its stop comes in while the
    /// caller starts on other processes. Most processes have no other thread: the
    /// others, if any, are found by [`Freezing::finish`], which counts them.
    fn start(pid: Pid) -> Result<Freezing> {
        let fr = Frozen { pid, threads: Vec::new(), done: false };
        let mut f = Freezing { fr, seen: BTreeSet::new(), interrupted: Vec::new() };
        f.seize(&[pid])?;
        Ok(f)
    }

    /// Seizes and interrupts the threads `new`, adding each to `seen` and, once
    /// interrupted, to `interrupted`. A thread that exited meanwhile is skipped. A thread
    /// waiting in vfork() is found while its stop is awaited (it never comes).
    fn seize(&mut self, new: &[Pid]) -> Result<()> {
        let pid = self.fr.pid;
        for &tid in new {
            if let Err(e) = ptrace::seize(tid, ptrace::PTRACE_O_TRACESYSGOOD) {
                if e.0 == libc::ESRCH {
                    continue; // exited meanwhile
                }
                if e.0 == libc::EPERM {
                    let st = read_status(pid)?;
                    if st.tracer_pid != 0 {
                        return Err(Error::AlreadyTraced { pid, tracer: st.tracer_pid });
                    }
                }
                return Err(Error::Sys { pid, op: "PTRACE_SEIZE", errno: e });
            }
            self.seen.insert(tid);
            // Listed first: if the interrupt fails, the error path still lets it go.
            self.interrupted.push(tid);
            ptrace::interrupt(tid).map_err(Error::sys(pid, "PTRACE_INTERRUPT"))?;
        }
        Ok(())
    }

    /// Awaits the stop of every interrupted thread and records its registers and signal
    /// mask; then, while the thread count in /proc/PID/status says there are threads it
    /// has not stopped (started before their creator was interrupted), seizes those too.
    /// Returns the frozen process with its stat and status, both read once it was frozen.
    fn finish(mut self) -> Result<(Frozen, ProcInfo)> {
        let pid = self.fr.pid;
        let status = loop {
            while let Some(&tid) = self.interrupted.first() {
                wait_for_stop(pid, tid)?;
                let regs = ptrace::get_regs(tid).map_err(Error::sys(pid, "PTRACE_GETREGSET"))?;
                let mask = ptrace::get_sigmask(tid).map_err(Error::sys(pid, "PTRACE_GETSIGMASK"))?;
                // Recorded before the probe, which may leave it at another stop.
                self.fr.threads.push(FrozenThread { tid, regs, sigmask: mask, injected: false });
                self.interrupted.remove(0);
                if let Some(m) = real_sigmask(pid, tid, &regs)? {
                    let t = self.fr.threads.last_mut().expect("just pushed");
                    (t.sigmask, t.injected) = (m, true);
                }
            }
            if self.fr.threads.is_empty() {
                // The main thread exited: the others, if any, are in the list.
                let all = list_tasks(pid)?;
                let new: Vec<Pid> = all.into_iter().filter(|t| !self.seen.contains(t)).collect();
                if new.is_empty() {
                    return Err(Error::NoSuchProcess(pid));
                }
                self.seize(&new)?;
                continue;
            }
            // Every stopped thread is alive: as many threads as stopped ones means none
            // was left out. Else the list is read (again): a thread started meanwhile
            // cannot escape, its creator is stopped by now.
            let status = read_status(pid)?;
            if status.threads as usize == self.fr.threads.len() {
                break status;
            }
            let new: Vec<Pid> = list_tasks(pid)?.into_iter().filter(|t| !self.seen.contains(t)).collect();
            if new.is_empty() {
                break status;
            }
            self.seize(&new)?;
        };
        let stat = read_stat(pid)?;
        let mut fr = std::mem::replace(&mut self.fr, Frozen { pid, threads: Vec::new(), done: true });
        // The thread-group leader first: code below treats threads[0] as the main thread.
        fr.threads.sort_by_key(|t| (t.tid != pid, t.tid));
        Ok((fr, Box::new((stat, status))))
    }
}

impl Drop for Freezing {
    fn drop(&mut self) {
        let pid = self.fr.pid;
        for &tid in &self.interrupted {
            // One refused for waiting in vfork() stays seized (a running tracee cannot
            // be detached; the kernel lets it go when the dumper exits): waiting for it
            // again would only double the time the refusal takes.
            if matches!(vfork_child(pid, tid), Ok(Some(_))) {
                continue;
            }
            if wait_for_stop(pid, tid).is_ok() {
                let _ = ptrace::detach(tid, 0);
            }
        }
    }
}

impl Frozen {
    /// Seizes and stops every thread of `pid`, re-reading the thread list until it finds
    /// no thread it has not stopped (threads started meanwhile cannot escape).
    pub fn freeze(pid: Pid) -> Result<(Frozen, ProcInfo)> {
        Freezing::start(pid)?.finish()
    }

    /// Freezes the processes `pids` together: every thread of each is seized and
    /// interrupted first, then the stops are awaited, so that they come in parallel
    /// rather than one after the other. One result per process, in order; one that
    /// fails does not hold up the others.
    pub fn freeze_many(pids: &[Pid]) -> impl Iterator<Item = Result<(Frozen, ProcInfo)>> {
        let started: Vec<Result<Freezing>> = pids.iter().map(|&p| Freezing::start(p)).collect();
        started.into_iter().map(|f| f.and_then(Freezing::finish))
    }

    /// Waits until the processes `frozen`, all traced by this thread and all sent
    /// SIGKILL, are gone from our side. As tracer we see each thread's exit first;
    /// consuming them lets the real parents reap the processes. The exits are collected
    /// in whatever order they come: a leader is reported only once its other threads are
    /// gone, a PID namespace's init only once every other task of its namespace is, and
    /// waiting for any exit rather than a given one wakes this thread once per exit.
    /// Each is sent SIGKILL (again) here: one that cannot be is not waited for.
    pub fn reap_killed(frozen: Vec<Frozen>) -> Result<()> {
        let mut left: BTreeSet<Pid> = BTreeSet::new();
        let mut first = Ok(());
        for mut f in frozen {
            f.done = true;
            match stasis_sys::proc::kill(f.pid, libc::SIGKILL) {
                Ok(()) => left.extend(f.threads.iter().map(|t| t.tid)),
                Err(e) if e.0 == libc::ESRCH => {}
                Err(e) => first = first.and(Err(Error::Sys { pid: f.pid, op: "kill", errno: e })),
            }
        }
        while !left.is_empty() {
            match ptrace::waitpid(Pid(-1), libc::__WALL | libc::__WNOTHREAD) {
                Ok(WaitStatus::Exited(tid, _) | WaitStatus::Signaled(tid, _)) => {
                    left.remove(&tid);
                }
                // A stop reported before the kill took effect: the exit follows.
                Ok(WaitStatus::Stopped(..) | WaitStatus::StillAlive) => {}
                Err(e) if e.0 == libc::ECHILD => break, // nothing left to wait for
                Err(e) => {
                    let pid = left.first().copied().unwrap_or(Pid(0));
                    return first.and(Err(Error::Sys { pid, op: "waitpid", errno: e }));
                }
            }
        }
        first
    }

    /// Puts back every thread's registers and signal mask and lets the process run on.
    pub fn release(mut self) -> Result<()> {
        self.done = true;
        let mut first_err = None;
        for t in &self.threads {
            if let Err(e) = t.put_back(self.pid) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.done {
            for t in &self.threads {
                let _ = t.put_back(self.pid);
            }
        }
    }
}

pub fn read_status(pid: Pid) -> Result<procfs::Status> {
    let (path, text) = procfs::read_text(pid, "status")?;
    procfs::parse_status(&text).map_err(|what| Error::ProcParse { pid, path, what })
}

pub fn read_stat(pid: Pid) -> Result<procfs::Stat> {
    let (path, text) = procfs::read_text(pid, "stat")?;
    procfs::parse_stat(&text).map_err(|what| Error::ProcParse { pid, path, what })
}
