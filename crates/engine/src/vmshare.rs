//! Processes that share an address space: a child cloned with CLONE_VM but without
//! CLONE_THREAD (with or without CLONE_SIGHAND, CLONE_FILES, CLONE_FS), as programs make
//! helper processes with clone(2).
//!
//! Dump: right after the freeze, before any injected call, kcmp(KCMP_VM) and
//! kcmp(KCMP_SIGHAND) group the processes ([`assign`]). What is kept: a parent A and any
//! of its children B that share A's address space (and maybe A's signal handlers), each
//! B single-threaded, without children, in A's session. Every other grouping is refused,
//! naming the process. B's memory is A's: only A's record holds the mappings and only
//! A's pages are saved; B's own state (registers, signal mask and queue, limits,
//! descriptors, ...) is saved as for any process. Injecting the dump's scratch area into
//! B maps it into A's address space too, so A's /proc view (its mappings) is read only
//! once every member of the group is through its injected calls (see
//! dump::collect_members); the area is gone again by then.
//!
//! Restore: B is not forked by the restore children (its address space cannot be
//! rebuilt apart from A's). Once A's address space is built, the restorer injects into A
//! a clone3 with CLONE_VM and B's other sharing flags, B's exit signal and set_tid = B's
//! PID ([`spawn`]); with PTRACE_O_TRACEFORK/TRACECLONE the new process starts traced and
//! stopped. A descriptor table of its own is a copy of A's, which then also holds B's
//! descriptions, parked by A's table installer at numbers above the saved ones (FdPlan
//! `carry`): B moves them into place and closes the rest. Later, in A's finish step and
//! before A's helper page goes, B gets by injected calls what a process has of its own
//! and the clone copied from A ([`finish`]): process group, signal handlers (unless
//! shared), cwd and umask (unless shared), limits, personality, no_new_privs, AMX
//! permission, file locks, pending signals, then what a new thread gets (name, robust
//! list, rseq, alternate stack, credentials) and its registers. It is detached with
//! everyone else.

use crate::error::{Error, Result};
use crate::inject::{Batch, Injector};
use crate::mm::{ChildMem, HELPER_DATA};
use crate::{locks, signals, threads};
use stasis_image::{ProcessRecord, SigAction};
use stasis_sys::ptrace;
use stasis_sys::Pid;

/// One process of a frozen tree, as [`assign`] needs it.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    pub pid: i32,
    pub ppid: i32,
    /// Threads (0 for a zombie).
    pub threads: usize,
}

/// Which processes share their parent's address space, and which also its signal
/// handlers, by member index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sharing {
    /// `Some(j)`: shares the address space of member j, its parent.
    pub vm_parent: Vec<Option<usize>>,
    pub sighand: Vec<bool>,
}

/// Decides from the groups of members sharing one address space (`vm`) and one signal
/// handler table (`sighand`), each a list of member indexes in tree order, which sharing
/// is restorable: a parent and children of it that share its address space, and maybe
/// its handlers. The error names the process and what it shares.
pub fn assign(members: &[Member], vm: &[Vec<usize>], sighand: &[Vec<usize>]) -> std::result::Result<Sharing, (i32, String)> {
    let n = members.len();
    let mut out = Sharing { vm_parent: vec![None; n], sighand: vec![false; n] };
    for g in vm.iter().filter(|g| g.len() > 1) {
        let in_group = |pid: i32| g.iter().any(|&m| members[m].pid == pid);
        let heads: Vec<usize> = g.iter().copied().filter(|&m| !in_group(members[m].ppid)).collect();
        let Some(&head) = heads.first() else {
            return Err((members[g[0]].pid, "sharing its address space in a group without a first process".into()));
        };
        let hp = members[head].pid;
        if let Some(&other) = heads.get(1) {
            let m = members[other];
            return Err((m.pid, format!("sharing its address space with pid {hp} but not with its parent {} (CLONE_VM)", m.ppid)));
        }
        for &i in g.iter().filter(|&&i| i != head) {
            let m = members[i];
            if let Some(c) = members.iter().find(|c| c.ppid == m.pid) {
                return Err((
                    m.pid,
                    format!("sharing its address space with its parent {} (CLONE_VM) while having children of its own (pid {})", m.ppid, c.pid),
                ));
            }
            if m.ppid != hp {
                return Err((m.pid, format!("sharing its address space with its parent {}, which shares pid {hp}'s in turn (CLONE_VM)", m.ppid)));
            }
            if m.threads > 1 {
                return Err((m.pid, format!("sharing its address space with its parent {} (CLONE_VM) while having threads of its own", m.ppid)));
            }
            out.vm_parent[i] = Some(head);
        }
    }
    for g in sighand.iter().filter(|g| g.len() > 1) {
        let head = g[0];
        for &i in &g[1..] {
            if out.vm_parent[i] != Some(head) {
                return Err((
                    members[i].pid,
                    format!("sharing its signal handlers with pid {} other than as its CLONE_VM|CLONE_SIGHAND child", members[head].pid),
                ));
            }
            out.sighand[i] = true;
        }
    }
    Ok(out)
}

fn action(actions: &[SigAction], sig: i32) -> (u64, u64, u64, u64) {
    actions.iter().find(|a| a.sig == sig).map(|a| (a.handler, a.flags, a.restorer, a.mask)).unwrap_or_default()
}

/// What the restore cannot give a process that shares its parent's address space, or
/// what does not agree in its record (both halves use it: the dump refuses, the restore
/// rejects the image). `Err((pid, what))`.
pub fn check(procs: &[ProcessRecord], root_idx: usize) -> std::result::Result<(), (i32, String)> {
    for (i, p) in procs.iter().enumerate() {
        if !p.vm_with_parent && !p.sighand_with_parent {
            continue;
        }
        let bad = |what: String| Err((p.pid, what));
        if !p.vm_with_parent {
            return bad("shares its signal handlers but not its address space with its parent".into());
        }
        let parent = match procs.iter().find(|q| q.pid == p.ppid) {
            Some(q) if i != root_idx && q.zombie_status.is_none() && p.zombie_status.is_none() => q,
            _ => return bad(format!("shares its address space with its parent {}, which the image does not hold", p.ppid)),
        };
        if parent.vm_with_parent {
            return bad(format!("shares its address space with its parent {}, itself sharing its own parent's", p.ppid));
        }
        if let Some(c) = procs.iter().find(|c| c.ppid == p.pid) {
            return bad(format!("shares its address space with its parent {} and has children of its own (pid {})", p.ppid, c.pid));
        }
        if p.threads.len() != 1 {
            return bad(format!("shares its address space with its parent {} and has threads of its own", p.ppid));
        }
        if !p.mm.vmas.is_empty() {
            return bad("shares its parent's address space but lists mappings of its own".into());
        }
        if p.sid != parent.sid {
            return bad(format!("shares its address space with its parent {} but is in another session ({})", p.ppid, p.sid));
        }
        if p.pgid == p.pid {
            if let Some(q) = procs.iter().find(|q| q.pid != p.pid && q.pgid == p.pid) {
                return bad(format!("shares its address space with its parent {} and leads process group {} that pid {} is in", p.ppid, p.pid, q.pid));
            }
            if procs.iter().any(|q| q.ctty.as_ref().is_some_and(|c| c.fg_pgrp == p.pid)) {
                return bad(format!("shares its address space with its parent {} and leads a terminal's foreground process group", p.ppid));
            }
        } else if p.pgid != parent.pgid && !procs.iter().any(|q| q.pid == p.pgid && q.zombie_status.is_none()) {
            return bad(format!("shares its address space with its parent {} and is in process group {}, led outside the image", p.ppid, p.pgid));
        }
        if p.sighand_with_parent && (1..=64).any(|s| action(&p.sigactions, s) != action(&parent.sigactions, s)) {
            return bad(format!("shares its signal handlers with its parent {} but their dispositions differ", p.ppid));
        }
        if !p.fs_with_parent && p.root != parent.root {
            return bad(format!("shares its address space with its parent {} but has another root directory", p.ppid));
        }
        if !p.fs_with_parent && p.root != b"/" && p.cwd != parent.cwd {
            return bad(format!("shares its address space with its parent {} and has a cwd of its own under a changed root", p.ppid));
        }
        if parent.no_new_privs && !p.no_new_privs {
            return bad(format!("shares its address space with its parent {}, which has no_new_privs set while it has not", p.ppid));
        }
    }
    Ok(())
}

/// Raising a hard limit above its parent's needs CAP_SYS_RESOURCE: checked before
/// anything is created.
pub fn check_rlimits(p: &ProcessRecord, parent: &ProcessRecord, have_sys_resource: bool) -> Result<()> {
    if have_sys_resource {
        return Ok(());
    }
    for l in &p.rlimits {
        if let Some(q) = parent.rlimits.iter().find(|q| q.resource == l.resource).filter(|q| l.hard > q.hard) {
            return Err(Error::Restore {
                pid: Pid(p.pid),
                what: format!(
                    "{} hard limit {} is above its parent's {} and raising it needs CAP_SYS_RESOURCE",
                    crate::task::RLIMIT_NAMES.get(l.resource as usize).unwrap_or(&"RLIMIT_?"),
                    l.hard,
                    q.hard
                ),
            });
        }
    }
    Ok(())
}

/// A process the restorer clones from its parent's restored address space.
pub struct KidPlan<'a> {
    pub rec: &'a ProcessRecord,
    pub parent: &'a ProcessRecord,
    /// A descriptor table of its own; `None`: it shares its parent's (CLONE_FILES).
    pub own_fds: Option<OwnFds>,
}

/// How a copy of the parent's table becomes the process's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnFds {
    /// (number in the copy, saved number, close-on-exec) of each of its descriptors.
    pub moves: Vec<(i32, i32, bool)>,
    /// Every number from here up is a helper descriptor in the parent's table, above all
    /// saved ones.
    pub close_from: i32,
}

impl OwnFds {
    /// The calls that turn the copy into the saved table: each descriptor to its number,
    /// then everything else closed (the parent's saved descriptors, the helpers).
    fn calls(&self, calls: &mut Batch) {
        for &(from, to, cloexec) in &self.moves {
            calls.push("dup3", libc::SYS_dup3, [from as u64, to as u64, if cloexec { libc::O_CLOEXEC as u64 } else { 0 }, 0, 0, 0]);
        }
        for (lo, hi) in gaps(self.moves.iter().map(|m| m.1), self.close_from) {
            calls.push("close_range", libc::SYS_close_range, [lo as u64, hi as u64, 0, 0, 0, 0]);
        }
        calls.push("close_range", libc::SYS_close_range, [self.close_from as u64, u32::MAX as u64, 0, 0, 0, 0]);
    }
}

/// The ranges [lo, hi] below `end` that hold none of `keep`.
fn gaps(keep: impl Iterator<Item = i32>, end: i32) -> Vec<(i32, i32)> {
    let mut keep: Vec<i32> = keep.filter(|&k| k < end).collect();
    keep.sort();
    keep.dedup();
    let mut out = Vec::new();
    let mut lo = 0;
    for k in keep.into_iter().chain([end]) {
        if k > lo {
            out.push((lo, k - 1));
        }
        lo = k + 1;
    }
    out
}

impl KidPlan<'_> {
    fn clone_flags(&self) -> u64 {
        let r = self.rec;
        let mut f = libc::CLONE_VM as u64;
        for (on, flag) in [(r.sighand_with_parent, libc::CLONE_SIGHAND), (r.files_with_parent, libc::CLONE_FILES), (r.fs_with_parent, libc::CLONE_FS)] {
            if on {
                f |= flag as u64;
            }
        }
        if r.threads[0].clear_child_tid != 0 {
            f |= libc::CLONE_CHILD_CLEARTID as u64;
        }
        f
    }
}

/// A cloned process, stopped, before its finish.
pub struct Spawned<'a> {
    kid: &'a KidPlan<'a>,
    /// As we see it.
    pid: Pid,
    inj: Injector,
}

/// Injected in the parent once its address space is built (and while its table still
/// holds the descriptions parked for the child): clone3 with CLONE_VM and the child's
/// saved PID; then a table of its own is put in order.
pub fn spawn<'a>(parent: &mut Injector, mem: &ChildMem, helper: u64, kid: &'a KidPlan<'a>) -> Result<Spawned<'a>> {
    let rec = kid.rec;
    let at = helper + HELPER_DATA;
    let tid_at = at + 128;
    let mut args = [0u64; 11];
    args[0] = kid.clone_flags();
    args[2] = rec.threads[0].clear_child_tid; // child_tid
    args[4] = rec.exit_signal.unwrap_or(libc::SIGCHLD) as u64;
    args[8] = tid_at; // set_tid
    args[9] = 1; // set_tid_size
    let bytes: Vec<u8> = args.iter().flat_map(|v| v.to_le_bytes()).collect();
    mem.write(at, &bytes)?;
    mem.write(tid_at, &rec.pid.to_le_bytes())?;
    parent.event_msg = None;
    let got = parent.call("clone3(CLONE_VM)", libc::SYS_clone3, [at, bytes.len() as u64, 0, 0, 0, 0])?;
    if got as i32 != rec.pid {
        return Err(Error::Restore { pid: Pid(rec.pid), what: format!("cloned from its parent, it came back as {got}") });
    }
    // clone3 answers with the PID the parent sees; ptrace needs ours.
    let pid = parent.event_msg.map(|m| Pid(m as i32)).unwrap_or(Pid(rec.pid));
    match ptrace::waitpid(pid, libc::__WALL).map_err(Error::sys(pid, "waitpid"))? {
        ptrace::WaitStatus::Stopped(..) => {}
        other => return Err(Error::Restore { pid, what: format!("cloned from its parent: {other:?}") }),
    }
    let regs = ptrace::get_regs(pid).map_err(Error::sys(pid, "PTRACE_GETREGSET"))?;
    let mut inj = Injector::new(pid, pid, helper, regs);
    if let Some(own) = &kid.own_fds {
        let mut calls = Batch::default();
        own.calls(&mut calls);
        calls.run(&mut inj, mem, helper)?;
    }
    log::debug!("pid {}: cloned from its parent {} (CLONE_VM)", rec.pid, kid.parent.pid);
    Ok(Spawned { kid, pid, inj })
}

const SIGACTIONS_AT: u64 = 8192;
const RLIMITS_AT: u64 = 12288;
const CWD_AT: u64 = 16384;
const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
const XFEATURE_XTILEDATA: u64 = 18;

/// In the parent's finish step, after the parent's last close (file locks) and before
/// its helper page goes: what the clone copied from the parent and is the child's own,
/// then its thread state and registers. The child goes to `extra`, to be detached with
/// every other task.
pub fn finish(s: Spawned, mem: &ChildMem, helper: u64, extra: &mut Vec<Pid>) -> Result<()> {
    let Spawned { kid, pid, mut inj } = s;
    let (rec, parent) = (kid.rec, kid.parent);
    let data = helper + HELPER_DATA;
    let mut calls = Batch::default();
    if rec.pgid != parent.pgid {
        let to = if rec.pgid == rec.pid { 0 } else { rec.pgid as u64 };
        calls.push("setpgid", libc::SYS_setpgid, [0, to, 0, 0, 0, 0]);
    }
    if !rec.sighand_with_parent {
        for sig in (1..=64).filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP) {
            let want = action(&rec.sigactions, sig);
            if want == action(&parent.sigactions, sig) {
                continue;
            }
            let at = data + SIGACTIONS_AT + sig as u64 * 32;
            let b: Vec<u8> = [want.0, want.1, want.2, want.3].iter().flat_map(|v| v.to_le_bytes()).collect();
            mem.write(at, &b)?;
            calls.push("rt_sigaction", libc::SYS_rt_sigaction, [sig as u64, at, 0, 8, 0, 0]);
        }
    }
    if !rec.fs_with_parent {
        if rec.cwd != parent.cwd {
            let mut path = rec.cwd.clone();
            path.push(0);
            mem.write(data + CWD_AT, &path)?;
            calls.push("chdir", libc::SYS_chdir, [data + CWD_AT, 0, 0, 0, 0, 0]);
        }
        if rec.umask != parent.umask {
            calls.push("umask", libc::SYS_umask, [rec.umask as u64, 0, 0, 0, 0, 0]);
        }
    }
    for l in &rec.rlimits {
        if parent.rlimits.iter().any(|q| q == l) {
            continue;
        }
        let at = data + RLIMITS_AT + l.resource as u64 * 16;
        let b: Vec<u8> = [l.soft, l.hard].iter().flat_map(|v| v.to_le_bytes()).collect();
        mem.write(at, &b)?;
        calls.push("prlimit64", libc::SYS_prlimit64, [0, l.resource as u64, at, 0, 0, 0]);
    }
    if rec.personality != parent.personality {
        calls.push("personality", libc::SYS_personality, [rec.personality as u64, 0, 0, 0, 0, 0]);
    }
    if rec.no_new_privs && !parent.no_new_privs {
        calls.push("prctl(PR_SET_NO_NEW_PRIVS)", libc::SYS_prctl, [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0]);
    }
    let amx = |m: &ProcessRecord| m.mm.xcomp_perm & (1 << XFEATURE_XTILEDATA) != 0;
    if amx(rec) && !amx(parent) {
        calls.push("arch_prctl(ARCH_REQ_XCOMP_PERM)", libc::SYS_arch_prctl, [ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, 0, 0, 0, 0]);
    }
    if !calls.is_empty() {
        calls.run(&mut inj, mem, helper)?;
    }
    // After every close in its table (its own, or the parent's last close_range).
    locks::restore(&mut inj, mem, data, &rec.locks)?;
    signals::restore_pending(&mut inj, mem, data, Pid(rec.pid), None, &rec.shared_pending)?;
    let thread = &rec.threads[0];
    crate::restore::finish_thread(&mut inj, mem, data, rec, thread, true, &[], false)?;
    threads::restore_regs(pid, pid, thread)?;
    extra.push(pid);
    log::debug!("pid {}: ready", rec.pid);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pid: i32, ppid: i32) -> Member {
        Member { pid, ppid, threads: 1 }
    }

    /// root 10 ── A 11 ── B 12 (B shares A's address space); root ── C 13
    fn tree() -> Vec<Member> {
        vec![m(10, 1), m(11, 10), m(12, 11), m(13, 10)]
    }

    #[test]
    fn a_child_sharing_its_parents_address_space_is_kept() {
        let s = assign(&tree(), &[vec![1, 2]], &[vec![1, 2]]).unwrap();
        assert_eq!(s.vm_parent, vec![None, None, Some(1), None]);
        assert_eq!(s.sighand, vec![false, false, true, false]);
        // Two children of the root sharing its address space.
        let t = [m(10, 1), m(11, 10), m(13, 10)];
        let s = assign(&t, &[vec![0, 1, 2]], &[vec![0, 2]]).unwrap();
        assert_eq!(s.vm_parent, vec![None, Some(0), Some(0)]);
        assert_eq!(s.sighand, vec![false, false, true]);
    }

    #[test]
    fn other_groupings_are_refused() {
        // Siblings (CLONE_PARENT): C shares A's, not its parent's.
        let e = assign(&tree(), &[vec![1, 3]], &[]).unwrap_err();
        assert_eq!(e.0, 13);
        assert!(e.1.contains("with pid 11 but not with its parent 10"), "{}", e.1);
        // A sharer with a child of its own.
        let e = assign(&tree(), &[vec![0, 1]], &[]).unwrap_err();
        assert_eq!(e.0, 11);
        assert!(e.1.contains("children of its own (pid 12)"), "{}", e.1);
        // Threads of its own.
        let mut t = tree();
        t[2].threads = 2;
        assert!(assign(&t, &[vec![1, 2]], &[]).unwrap_err().1.contains("threads"));
        // Handlers shared without the address space.
        let e = assign(&tree(), &[], &[vec![1, 2]]).unwrap_err();
        assert_eq!(e.0, 12);
        assert!(e.1.contains("signal handlers"), "{}", e.1);
    }

    #[test]
    fn gaps_skip_kept_numbers() {
        assert_eq!(gaps([0, 1, 2, 7].into_iter(), 10), vec![(3, 6), (8, 9)]);
        assert_eq!(gaps([3].into_iter(), 4), vec![(0, 2)]);
        assert_eq!(gaps(std::iter::empty(), 3), vec![(0, 2)]);
        let own = OwnFds { moves: vec![(12, 1, false), (13, 0, true)], close_from: 12 };
        let mut calls = Batch::default();
        own.calls(&mut calls);
        // Two moves, one gap (2..=11), and everything from 12 up.
        assert_eq!(calls.len(), 4);
    }

    #[test]
    fn records_are_checked() {
        let mut procs: Vec<ProcessRecord> = [(10, 1), (11, 10)]
            .iter()
            .map(|&(p, pp)| {
                let mut r = crate::dump::test_record(p, pp);
                r.threads = vec![thread(p)];
                r.sid = 10;
                r.pgid = 10;
                r
            })
            .collect();
        procs[1].vm_with_parent = true;
        assert_eq!(check(&procs, 0), Ok(()));
        procs[1].sighand_with_parent = true;
        procs[0].sigactions = vec![SigAction { sig: 10, handler: 0x1000, flags: 0, restorer: 0, mask: 0 }];
        assert!(check(&procs, 0).unwrap_err().1.contains("dispositions differ"));
        procs[1].sigactions = procs[0].sigactions.clone();
        assert_eq!(check(&procs, 0), Ok(()));
        procs[1].sid = 11;
        assert!(check(&procs, 0).unwrap_err().1.contains("session"));
        procs[1].sid = 10;
        assert!(check(&procs, 1).unwrap_err().1.contains("does not hold"));
    }

    fn thread(tid: i32) -> stasis_image::ThreadRecord {
        stasis_image::ThreadRecord {
            tid,
            comm: String::new(),
            regs: Vec::new(),
            xstate: Vec::new(),
            sigmask: 0,
            pending: Vec::new(),
            rseq: None,
            robust_list: (0, 0),
            clear_child_tid: 0,
            altstack: Default::default(),
        }
    }
}
