//! The restore pipeline, for a whole tree.
//!
//! 1. Read the image and check everything before any process exists: checksums of every
//!    byte, host compatibility, the files it needs, limits we can set, every PID and TID
//!    is free, the memory-object table fits. Create every memory object with its data
//!    (shmem::ShmemTable), then open every open file description once (files::DescTable):
//!    files, devices, pipes and FIFOs with their buffered bytes, memory objects,
//!    descriptors named by --inherit-fd; check that every saved file lock is free to take
//!    again.
//! 2. Fork the root with its PID (clone3 set_tid). Each restore child starts its session
//!    if it led one, joins its process group if it leads it or an ancestor does (see
//!    GroupPlan), forks its own children (zombies included) with their PIDs, then sets
//!    what a process sets on itself: signal dispositions (all signals blocked),
//!    descriptors (from the inherited descriptions), cwd, root, umask, name; it maps a
//!    helper page holding a `syscall` instruction at an address every saved layout leaves
//!    free, reports "ok" on the status pipe and waits in a read.
//! 3. The restorer seizes every process and injects the rest through that instruction:
//!    the other process groups, rseq off, the address space replaced (mm::MmRestore), mm fields
//!    (PR_SET_MM_MAP), file locks (after the last injected close), limits, threads (clone3 with set_tid), per-thread kernel
//!    addresses, pending signals, credentials; the last injected call unmaps the helper
//!    page, and the saved registers and signal mask go in at an interrupt stop, so that
//!    the kernel's own restart logic continues an interrupted system call.
//! 4. Seal the memfds (after every mapping exists: a write seal forbids writable
//!    mappings), then detach every thread of every process: all resume together.
//!
//! Until the detach every restore child dies with its parent (PDEATHSIG, then
//! PTRACE_O_EXITKILL), and every error kills and reaps them: a failed restore leaves
//! nothing.

use crate::error::{Error, Result};
use crate::freeze::{read_stat, read_status};
use crate::inject::{Batch, Injector, BATCH_CODE, BATCH_CODE_AT};
use crate::mm::{self, ChildMem, MapFds, MmRestore, HELPER_DATA, HELPER_LEN};
use crate::pidns::{self, PidMap};
use crate::shmem::{self, ShmemTable};
use crate::task::SessionPlan;
use crate::{epoll, files, host, locks, signals, task, threads, tty, vmshare};
use stasis_image::{ImageReader, MmRecord, ProcessRecord};
use stasis_sys::proc::{self as sp, Forked};
use stasis_sys::ptrace::{self, WaitStatus};
use stasis_sys::Pid;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub dir: PathBuf,
    /// Attach terminals to the restorer's terminal and join its session.
    pub shell_job: bool,
    /// `--inherit-fd fd[N]:KEY`: descriptor N of the restorer stands for the object the
    /// image calls KEY (such as `pipe:[1234]`, a pipe that led outside the tree).
    pub inherit_fds: Vec<(i32, String)>,
    /// Restore into a fresh PID namespace (and a private mount namespace with its own
    /// /proc): the saved PIDs never collide with running processes.
    pub pidns: bool,
}

impl RestoreOptions {
    /// A plain restore from `dir`: no shell job, no inherited descriptors, no new PID
    /// namespace.
    pub fn plain(dir: PathBuf) -> RestoreOptions {
        RestoreOptions { dir, shell_job: false, inherit_fds: Vec::new(), pidns: false }
    }
}

/// Figures of one restore.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RestoreStats {
    /// From the start of the call until the restored process runs.
    pub total: Duration,
    /// Reading and checking the image, before any process exists.
    pub validate: Duration,
    /// Bytes of page data loaded.
    pub memory_bytes: u64,
    /// How long each step took, in order: reading and checking the image, creating the
    /// processes, rebuilding them (memory, threads, registers) until they run.
    pub phases: Vec<(&'static str, Duration)>,
}

/// A restored process tree, running.
#[derive(Clone, Debug)]
pub struct Restored {
    /// The root, as the caller sees it.
    pub pid: Pid,
    /// The caller's child to wait for: the root, or with `--pidns` the namespace's init,
    /// which ends with the root's status once the last process of the namespace is gone.
    pub child: Pid,
    /// With `--pidns`: the root's PID inside its namespace (the saved one).
    pub pid_in_ns: Option<Pid>,
    pub stats: RestoreStats,
}

const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
const XFEATURE_XTILEDATA: u64 = 18;
const CAP_SYS_RESOURCE: u64 = 24;

/// Descriptor numbers the restore child uses for the restorer's needs.
struct FdPlan {
    exe: i32,
    maps: MapFds,
    /// A session leader keeps its controlling terminal here until the restorer has set
    /// the foreground process group through it.
    tty: i32,
    /// The child parks its own descriptors (status and wait pipes, inherited
    /// descriptions) at or above this.
    park: i32,
    /// The restorer's last injected close_range starts here: above every saved
    /// descriptor, at the first helper descriptor of the process or of its group.
    close_from: i32,
    /// The descriptions of the children that share this process's address space but not
    /// its descriptor table are parked here (see vmshare), one block after the other.
    carry: i32,
}

impl FdPlan {
    /// The plans of the processes of one descriptor table (one process, or several that
    /// share it: their saved descriptors are the same). Each gets its own helper
    /// numbers, one block after the other above the saved descriptors, and all park
    /// above every block: whatever one of them does to the table, the others see.
    /// `inherited_top` is above every descriptor the restorer holds: parking above it
    /// lets a child drop everything it inherited with one close_range. `carried[i]`:
    /// how many descriptors member i parks for its address-space children, whose saved
    /// descriptors all lie below `carried_top`.
    fn group(members: &[&ProcessRecord], carried: &[i32], carried_top: i32, inherited_top: i32) -> Vec<FdPlan> {
        let base = (members[0].fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2) + 1).max(carried_top);
        let mut next = base;
        let mut plans: Vec<FdPlan> = members
            .iter()
            .zip(carried)
            .map(|(p, &carried)| {
                let exe = next;
                let maps = MapFds::plan(&p.mm.vmas, exe + 1);
                let tty = exe + 1 + maps.len() as i32;
                let carry = tty + 1;
                next = carry + carried;
                FdPlan { exe, maps, tty, park: 0, close_from: base, carry }
            })
            .collect();
        for p in &mut plans {
            p.park = next.max(inherited_top);
        }
        plans
    }
}

/// For each process of the image, the index of the process that installs its descriptors
/// (itself, unless it shares its parent's table: then whoever installs the parent's), and
/// the one that sets its cwd, root and umask, alike. The image was checked to be
/// consistent (see check_sharing).
fn table_owners(procs: &[ProcessRecord]) -> (Vec<usize>, Vec<usize>) {
    let index = |pid: i32| procs.iter().position(|p| p.pid == pid);
    let owner = |mut i: usize, shares: fn(&ProcessRecord) -> bool| {
        for _ in 0..procs.len() {
            match (shares(&procs[i]), index(procs[i].ppid)) {
                (true, Some(parent)) => i = parent,
                _ => break,
            }
        }
        i
    };
    (
        (0..procs.len()).map(|i| owner(i, |p| p.files_with_parent)).collect(),
        (0..procs.len()).map(|i| owner(i, |p| p.fs_with_parent)).collect(),
    )
}

/// Before anything exists: a process that shares a table with its parent has a live
/// parent in the image (not the root: its parent is outside), and the same descriptors,
/// or cwd, root and umask, as that parent.
fn check_sharing(procs: &[ProcessRecord], root_idx: usize) -> Result<()> {
    vmshare::check(procs, root_idx).map_err(|(pid, what)| Error::Incompatible(format!("pid {pid}: {what}")))?;
    for (i, p) in procs.iter().enumerate() {
        if !p.files_with_parent && !p.fs_with_parent {
            continue;
        }
        let bad = |what: String| Err(Error::Incompatible(format!("pid {}: {what}", p.pid)));
        let parent = match procs.iter().find(|q| q.pid == p.ppid) {
            Some(q) if i != root_idx && q.zombie_status.is_none() && p.zombie_status.is_none() => q,
            _ => return bad(format!("shares a table with its parent {}, which the image does not hold", p.ppid)),
        };
        let fds = |r: &ProcessRecord| r.fds.iter().map(|f| (f.fd, files::desc_key(r.pid, f))).collect::<Vec<_>>();
        if p.files_with_parent && fds(p) != fds(parent) {
            return bad(format!("shares its descriptor table with its parent {} but their descriptors differ", p.ppid));
        }
        if p.fs_with_parent && (&p.cwd, &p.root, p.umask) != (&parent.cwd, &parent.root, parent.umask) {
            return bad(format!("shares its cwd, root and umask with its parent {} but they differ", p.ppid));
        }
    }
    Ok(())
}

/// One above the highest descriptor number this process has open.
fn open_fd_top() -> Result<i32> {
    let rd = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| Error::Io { op: "read", path: "/proc/self/fd".into(), err: e })?;
    Ok(rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()).max().unwrap_or(2) + 1)
}

/// Everything a restore child needs, computed before the first fork.
struct Plan<'a> {
    rec: &'a ProcessRecord,
    session: SessionPlan,
    fds: FdPlan,
    /// (saved number, inherited number, close-on-exec) of every descriptor this process
    /// installs: its own and those of the processes sharing its table (empty for one
    /// that shares its parent's).
    placement: Vec<(i32, i32, bool)>,
    /// Itself and the processes sharing its descriptor table, when it installs it (their
    /// helper descriptors are its job too); empty otherwise.
    installs_for: Vec<usize>,
    /// Clone flags it is created with: the tables it shares with its parent.
    share: i32,
    /// Its children that share its address space: the restorer clones them from it.
    vm_kids: Vec<vmshare::KidPlan<'a>>,
    /// The epoll registrations it makes once its descriptors are in place: (epoll
    /// descriptor, targets).
    epolls: Vec<epoll::Registrations>,
    /// Indexes of the children to fork, zombies included.
    children: Vec<usize>,
    /// A session leader's controlling terminal.
    ctty: Option<tty::CttyPlan>,
    /// Who puts it in its process group.
    group: GroupPlan,
    parent: Pid,
}

/// Who puts a restored process in its saved process group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GroupPlan {
    /// Nobody: it leads its session (setsid made the group), or the group's leader is
    /// not a live process of the tree (the group is not restored).
    Nothing,
    /// The child itself, before it forks its own children, which then inherit the group:
    /// it leads the group, or the leader is one of its ancestors, each of which set its
    /// own group before forking, so the group exists once the child does.
    Own,
    /// The restorer, once every process exists (the leader lies elsewhere in the tree).
    Restorer,
}

/// The GroupPlan of each process; `live[i]`: process i runs the restore child code (not
/// a zombie, not made by its parent's driver). Pure.
fn group_plans(procs: &[ProcessRecord], live: &[bool], root_idx: usize) -> Vec<GroupPlan> {
    let index = |pid: i32| procs.iter().position(|p| p.pid == pid);
    procs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let leader_live = index(r.pgid).is_some_and(|l| live[l]);
            if !live[i] || r.sid == r.pid || !leader_live {
                return GroupPlan::Nothing;
            }
            if r.pgid == r.pid {
                return GroupPlan::Own;
            }
            // Up the parent chain, through live processes only, to the root at most.
            let mut at = i;
            for _ in 0..procs.len() {
                if at == root_idx {
                    break;
                }
                match index(procs[at].ppid) {
                    Some(up) if live[up] => at = up,
                    _ => break,
                }
                if procs[at].pid == r.pgid {
                    return GroupPlan::Own;
                }
            }
            GroupPlan::Restorer
        })
        .collect()
}

/// What every restore child shares.
struct Shared<'a> {
    plans: Vec<Plan<'a>>,
    /// The plan of the tree's root.
    root: usize,
    /// The process that is PID 1 of a fresh namespace and mounts its /proc (a root whose
    /// saved PID is 1, restored with --pidns).
    mounts_proc: Option<usize>,
    helper: u64,
    /// The restore children report "ok PID" or "err PID message" here, one line each.
    status_fd: i32,
    /// They then wait reading this pipe, which is never written.
    wait_fd: i32,
    /// What every restore child inherits from the restorer and need not set again: the
    /// signals with a disposition other than the default, and the resource limits
    /// (resource, soft, hard).
    inherited_actions: u64,
    inherited_limits: &'static [(u32, u64, u64)],
}

/// How long a restore waits for the parents of zombies that hold PIDs of the image to
/// reap them. A tree that `stasis dump` has just killed is zombies until its parents reap
/// them, and an init or a busy shell may take a moment: a restore started right after the
/// dump must not fail for that.
const ZOMBIE_WAIT: Duration = Duration::from_secs(2);

/// Whether `pid` is free, waiting until `deadline` for a zombie holding it to be reaped.
fn check_pid_free(pid: Pid, deadline: Instant) -> Result<()> {
    const FIRST_NAP: Duration = Duration::from_micros(100);
    let mut nap = FIRST_NAP;
    loop {
        match read_stat(pid) {
            Ok(st) if st.state == 'Z' && Instant::now() < deadline => {
                if nap == FIRST_NAP {
                    log::debug!("PID {pid} is a zombie of {}: waiting for it to be reaped", st.ppid);
                }
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(5));
            }
            Ok(st) if st.state == 'Z' => return Err(Error::PidZombie { pid, parent: st.ppid }),
            Ok(st) => return Err(Error::PidTaken { pid, comm: st.comm }),
            Err(Error::NoSuchProcess(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn restorer_terminal() -> Option<i32> {
    (0..3).find(|&fd| sp::isatty(fd))
}

pub fn restore(opts: &RestoreOptions) -> Result<Restored> {
    let t0 = Instant::now();
    // The records and everything planned from them go to the shared arena until the first
    // fork: every restore child is a fork of ours, and would otherwise get a copy of the
    // page tables of all of it (see stasis_sys::alloc). Nothing there changes after.
    let arena = stasis_sys::alloc::SharedArena::enter();
    let reader = ImageReader::open(&opts.dir)?;
    let img = &reader.image;
    let here = host::current()?;
    host::check_compatible(&img.host, &here)?;
    log::debug!("image metadata read and checked");
    let pages = reader.map_pages()?;
    // Threads for large images only: each leaves a stack and an allocator arena that
    // every restore child, a fork of ours, copies and unmaps again.
    let verifiers = if reader.header.pages_len > 64 << 20 { 2 } else { 1 };
    reader.verify_pages(&pages, verifiers)?;
    log::debug!("page data checksums verified");
    let root_idx = img.processes.iter().position(|p| p.pid == img.root_pid).ok_or_else(|| {
        Error::Incompatible(format!("the image has no record of its root process {}", img.root_pid))
    })?;
    let root_pid = Pid(img.root_pid);
    if img.pid_namespace && !opts.pidns {
        return Err(Error::Restore {
            pid: root_pid,
            what: "the tree lived in a PID namespace of its own; restore it with --pidns".into(),
        });
    }
    if img.shell_job && !opts.shell_job {
        return Err(Error::Restore { pid: root_pid, what: "the image was dumped with --shell-job; restore it with --shell-job".into() });
    }
    let caps = read_status(sp::getpid())?.cap_eff;
    // Every restore child starts as a copy of this layout (see build_child).
    let own_layout = mm::read_layout(sp::getpid())?;
    let mut busy: Vec<(u64, u64)> = own_layout.iter().map(|m| (m.start, m.end)).collect();
    let mut mapped_files = std::collections::HashMap::new();
    let zombies_by = Instant::now() + ZOMBIE_WAIT;
    for rec in &img.processes {
        let pid = Pid(rec.pid);
        if !opts.pidns {
            check_pid_free(pid, zombies_by)?;
        }
        if rec.zombie_status.is_some() {
            continue;
        }
        if rec.threads.first().map(|t| t.tid) != Some(rec.pid) {
            return Err(Error::Restore { pid, what: "the image has no main thread record".into() });
        }
        for t in rec.threads[1..].iter().filter(|_| !opts.pidns) {
            check_pid_free(Pid(t.tid), zombies_by)?;
        }
        mm::check_files(pid, &rec.mm.vmas, &mut mapped_files)?;
        files::check(pid, &rec.fds)?;
        task::check_rlimits(pid, &rec.rlimits, caps & (1 << CAP_SYS_RESOURCE) != 0)?;
        busy.extend(mm::busy_ranges(&rec.mm.vmas));
    }
    let helper = mm::find_free(&[&busy], HELPER_LEN)
        .ok_or_else(|| Error::Restore { pid: root_pid, what: "no free address range for the helper page".into() })?;
    shmem::validate(img, pages.len() as u64)?;
    mm::validate(img, pages.len() as u64)?;
    check_sharing(&img.processes, root_idx)?;
    for p in img.processes.iter().filter(|p| p.vm_with_parent) {
        if let Some(parent) = img.processes.iter().find(|q| q.pid == p.ppid) {
            vmshare::check_rlimits(p, parent, caps & (1 << CAP_SYS_RESOURCE) != 0)?;
        }
    }
    let root = &img.processes[root_idx];
    let root_session = if root.sid == root.pid { SessionPlan::Leader } else { task::session_plan(root_pid, root.sid, opts.shell_job)? };
    // Every memory object and open file description, created before any process exists.
    let objects = ShmemTable::create(&img.shmem, pages.as_slice(), root_pid)?;
    let descs = files::DescTable::open(&img.processes, &img.pipes, &img.fifos, &objects, &img.ptys, restorer_terminal(), &opts.inherit_fds)?;
    for p in &img.processes {
        locks::check(Pid(p.pid), &p.locks, |fd| descs.raw_fd(p, fd))?;
    }
    let (status_rd, status_wr) = sp::pipe2(libc::O_CLOEXEC).map_err(Error::sys(root_pid, "pipe2"))?;
    let (wait_rd, wait_wr) = sp::pipe2(libc::O_CLOEXEC).map_err(Error::sys(root_pid, "pipe2"))?;
    // --pidns: the namespace's init waits on this for the word that the restore worked.
    let ctl = if opts.pidns { Some(sp::pipe2(libc::O_CLOEXEC).map_err(Error::sys(root_pid, "pipe2"))?) } else { None };
    let inherited_top = open_fd_top()?;
    // The root's parent: us, the namespace's init (PID 1), or nobody for a root that is
    // PID 1 itself.
    let root_parent = match (opts.pidns, root.pid) {
        (false, _) => sp::getpid(),
        (true, 1) => Pid(0),
        (true, _) => Pid(1),
    };
    let (files_owner, _) = table_owners(&img.processes);
    let n = img.processes.len();
    // Children sharing a process's address space, and those of them with a descriptor
    // table of their own, whose descriptions it carries (see vmshare).
    let vm_parent: Vec<Option<usize>> = img
        .processes
        .iter()
        .map(|p| p.vm_with_parent.then(|| img.processes.iter().position(|q| q.pid == p.ppid)).flatten())
        .collect();
    let vm_parent = &vm_parent;
    let vm_kids = |a: usize| (0..n).filter(move |&b| vm_parent[b] == Some(a));
    let own_table = |b: usize| !img.processes[b].files_with_parent;
    let kid_placement: Vec<Vec<(i32, i32, bool)>> =
        (0..n).map(|b| if vm_parent[b].is_some() && own_table(b) { descs.placement(&img.processes[b]) } else { Vec::new() }).collect();
    let mut fd_plans: Vec<Option<FdPlan>> = (0..n).map(|_| None).collect();
    for owner in 0..n {
        let members: Vec<usize> = (0..n).filter(|&i| files_owner[i] == owner).collect();
        if members.is_empty() {
            continue;
        }
        let recs: Vec<&ProcessRecord> = members.iter().map(|&i| &img.processes[i]).collect();
        let carried: Vec<i32> = members.iter().map(|&a| vm_kids(a).map(|b| kid_placement[b].len() as i32).sum()).collect();
        let carried_top = members
            .iter()
            .flat_map(|&a| vm_kids(a).flat_map(|b| kid_placement[b].iter().map(|m| m.0 + 1)))
            .max()
            .unwrap_or(0);
        for (&i, plan) in members.iter().zip(FdPlan::group(&recs, &carried, carried_top, inherited_top)) {
            fd_plans[i] = Some(plan);
        }
    }
    let installs: Vec<bool> = (0..n).map(|i| files_owner[i] == i && vm_parent[i].is_none()).collect();
    // Each address-space child: the descriptions its parent's table carries for it, at
    // the numbers the parent's FdPlan gives, and where they go in its own table.
    let mut carried_by: Vec<Vec<(i32, i32, bool)>> = vec![Vec::new(); n];
    let mut kid_plans: Vec<Vec<vmshare::KidPlan>> = (0..n).map(|_| Vec::new()).collect();
    for a in 0..n {
        let Some(fa) = fd_plans[a].as_ref() else { continue };
        let mut at = fa.carry;
        for b in vm_kids(a) {
            let own_fds = own_table(b).then(|| {
                let moves: Vec<(i32, i32, bool)> =
                    kid_placement[b].iter().enumerate().map(|(k, &(saved, _, cloexec))| (at + k as i32, saved, cloexec)).collect();
                carried_by[files_owner[a]].extend(kid_placement[b].iter().enumerate().map(|(k, &(_, src, _))| (at + k as i32, src, true)));
                at += moves.len() as i32;
                vmshare::OwnFds { moves, close_from: fa.close_from }
            });
            kid_plans[a].push(vmshare::KidPlan { rec: &img.processes[b], parent: &img.processes[a], own_fds });
        }
    }
    let mut epolls = epoll::plan(&img.processes, &installs)?;
    let live: Vec<bool> = img.processes.iter().map(|p| p.zombie_status.is_none() && !p.vm_with_parent).collect();
    let groups = group_plans(&img.processes, &live, root_idx);
    let mut plans: Vec<Plan> = img
        .processes
        .iter()
        .zip(fd_plans)
        .zip(kid_plans)
        .enumerate()
        .map(|(i, ((rec, fds), vm_kids))| {
            let session = if i == root_idx { root_session } else if rec.sid == rec.pid { SessionPlan::Leader } else { SessionPlan::Inherit };
            let ctty = match session {
                SessionPlan::Leader => tty::plan_ctty(rec, &img.processes, |i| descs.pty_slave(i), restorer_terminal())?,
                SessionPlan::Inherit => None,
            };
            let fds = fds.expect("every process is in its own descriptor table's group");
            let installs_for: Vec<usize> = match files_owner[i] == i {
                true => (0..img.processes.len()).filter(|&j| files_owner[j] == i).collect(),
                false => Vec::new(),
            };
            let mut placement = if installs_for.is_empty() { Vec::new() } else { descs.placement(rec) };
            placement.append(&mut carried_by[i]);
            let share = if rec.files_with_parent { libc::CLONE_FILES } else { 0 }
                | if rec.fs_with_parent { libc::CLONE_FS } else { 0 };
            Ok(Plan {
            rec,
            session,
            ctty,
            fds,
            placement,
            installs_for,
            epolls: std::mem::take(&mut epolls[i]),
            share,
            vm_kids,
            children: img
                .processes
                .iter()
                .enumerate()
                .filter(|(j, c)| *j != root_idx && c.ppid == rec.pid && vm_parent[*j].is_none())
                .map(|(j, _)| j)
                .collect(),
            group: groups[i],
            parent: if i == root_idx { root_parent } else { Pid(rec.ppid) },
        })
        })
        .collect::<Result<_>>()?;
    // The memory objects and files every process of a shared table maps, and its
    // executable, placed by its installer.
    // Zombies and the processes sharing their parent's address space install nothing.
    let mut opened = OpenFiles::default();
    for i in 0..plans.len() {
        let installs = plans[i].rec.zombie_status.is_none() && !plans[i].rec.vm_with_parent;
        let mut extra = Vec::new();
        for &j in &plans[i].installs_for {
            extra.extend(object_placement(&objects, &plans[j].fds));
            if installs {
                extra.extend(opened.placement(plans[j].rec, &plans[j].fds)?);
            }
        }
        plans[i].placement.extend(extra);
    }
    let validate = t0.elapsed();
    let shared = Shared {
        inherited_actions: signals::restorer_actions(),
        inherited_limits: task::own_limits(),
        plans,
        root: root_idx,
        mounts_proc: (opts.pidns && root.pid == 1).then_some(root_idx),
        helper,
        status_fd: status_wr.as_raw_fd(),
        wait_fd: wait_rd.as_raw_fd(),
    };
    // Only our next child goes into the new namespace: we return to our own at once (a
    // process whose children would land elsewhere may not even start threads).
    let own_ns = match opts.pidns {
        true => {
            let ns = sp::open("/proc/self/ns/pid".as_ref(), libc::O_RDONLY | libc::O_CLOEXEC, 0)
                .map_err(Error::sys(root_pid, "open /proc/self/ns/pid"))?;
            sp::unshare(libc::CLONE_NEWPID).map_err(Error::sys(root_pid, "unshare(CLONE_NEWPID)"))?;
            Some(ns)
        }
        false => None,
    };
    // Every restore child is a copy of us and rebuilds its address space from nothing:
    // the fewer pages we have populated, the cheaper both the fork and that rebuild (a
    // process that dumped before, as `stasis bench` does, holds much freed heap).
    drop(arena);
    stasis_sys::mem::release_free_heap();
    let first = match &ctl {
        Some((ctl_rd, _)) if root.pid != 1 => fork_ns_init(&shared, root_idx, ctl_rd.as_raw_fd(), !opts.shell_job),
        _ => fork_process(&shared, root_idx, &[]),
    };
    if let Some(ns) = own_ns {
        sp::setns(ns.as_raw_fd(), libc::CLONE_NEWPID).map_err(Error::sys(root_pid, "setns back to our PID namespace"))?;
    }
    let first = first?;
    drop(status_wr);
    drop(wait_rd);
    drop(descs);
    drop(opened);
    let mut guard = TreeGuard {
        ns_init: opts.pidns.then_some(first),
        pids: img.processes.iter().map(|p| Pid(p.pid)).collect(),
        armed: true,
    };
    wait_until_ready(&shared, status_rd)?;
    log::debug!("{} restore children ready", shared.plans.len());
    let created = t0.elapsed();
    let pids = if opts.pidns { PidMap::walk(first)? } else { PidMap::default() };
    // Forked by the restore children and driven by the restorer; the processes sharing
    // their parent's address space come from their parent's driver.
    let live: Vec<&Plan> = shared.plans.iter().filter(|p| p.rec.zombie_status.is_none() && !p.rec.vm_with_parent).collect();
    let loaded = drive_all(&live, &Drive { helper, pages: pages.as_slice(), pids: &pids, objects: &objects, root: root_pid, own_layout: &own_layout })?;
    let memory_bytes = objects.loaded + loaded;
    drop(objects);
    guard.armed = false;
    drop(wait_wr);
    if let Some((_, ctl_wr)) = &ctl {
        sp::write_all_raw(ctl_wr.as_raw_fd(), b"g");
    }
    Ok(Restored {
        pid: pids.outer(root.pid),
        child: first,
        pid_in_ns: opts.pidns.then_some(root_pid),
        stats: RestoreStats {
            total: t0.elapsed(),
            validate,
            memory_bytes,
            phases: vec![("validate", validate), ("create", created - validate), ("rebuild", t0.elapsed() - created)],
        },
    })
}

/// What every tracer worker needs.
struct Drive<'a> {
    helper: u64,
    pages: &'a [u8],
    pids: &'a PidMap,
    objects: &'a ShmemTable,
    root: Pid,
    /// The restorer's mappings, read before the first fork.
    own_layout: &'a [crate::procfs::MapEntry],
}

/// Seizes and drives every live process to its final registers, then lets all of them
/// run at once. ptrace requests must come from the thread that seized a tracee, so the
/// processes are shared out among tracer threads, each of which keeps its own from the
/// seize to the detach; barriers keep in order the steps that depend on other processes:
/// process groups (those not made by descent, see GroupPlan), foreground groups, every address space before any
/// process is finished (sharers of a descriptor table need their helper descriptors until
/// the last of them is built; the children sharing an address space are cloned right
/// after their parent's is built, while its table still carries their descriptions, and
/// finished in its finish, before its helper page goes), seals once every mapping
/// exists, and the detach, so that
/// nothing runs before everything is ready. Returns the page bytes loaded.
fn drive_all(live: &[&Plan], d: &Drive) -> Result<u64> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Barrier, Mutex};
    let want = live.len().min(crate::tracers::count()).max(1);
    let per = live.len().div_ceil(want).max(1);
    // Every worker must reach every barrier: as many as there are shares.
    let workers = live.len().div_ceil(per).max(1);
    let barrier = Barrier::new(workers);
    let failed = AtomicBool::new(false);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let loaded = AtomicU64::new(0);
    // Runs one step of a worker unless some worker failed, then waits for all of them.
    let step = |work: &mut dyn FnMut() -> Result<()>| {
        if !failed.load(Ordering::SeqCst) {
            if let Err(e) = work() {
                failed.store(true, Ordering::SeqCst);
                first_err.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
            }
        }
        barrier.wait();
    };
    let worker = |w: usize, mine: &[&Plan]| {
        let mut built = Vec::new();
        let mut threads: Vec<Pid> = Vec::new();
        step(&mut || mine.iter().try_for_each(|p| seize(d.pids.outer(p.rec.pid))));
        step(&mut || set_process_groups(mine, d));
        step(&mut || set_foreground_groups(mine, d));
        step(&mut || {
            for p in mine {
                let (b, n) = build_child(p, d)?;
                loaded.fetch_add(n, Ordering::Relaxed);
                built.push(b);
            }
            Ok(())
        });
        step(&mut || {
            for (p, b) in mine.iter().zip(built.drain(..)) {
                finish_child(p, b, d, &mut threads)?;
                threads.push(d.pids.outer(p.rec.pid));
            }
            Ok(())
        });
        step(&mut || if w == 0 { d.objects.seal(d.root) } else { Ok(()) });
        // All tasks resume together: nothing is detached before every one is ready.
        step(&mut || threads.iter().try_for_each(|&t| ptrace::detach(t, 0).map_err(Error::sys(t, "PTRACE_DETACH"))));
    };
    if workers == 1 {
        worker(0, live);
    } else {
        std::thread::scope(|s| {
            for (w, mine) in live.chunks(per).enumerate() {
                let worker = &worker;
                s.spawn(move || worker(w, mine));
            }
        });
    }
    match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(loaded.into_inner()),
    }
}

/// (saved number, inherited number, close-on-exec) of the memory objects a process's
/// mappings need, at the numbers the FdPlan gave them (close-on-exec: the restorer closes
/// them).
fn object_placement(objects: &ShmemTable, fds: &FdPlan) -> Vec<(i32, i32, bool)> {
    let mut placement = Vec::new();
    for &(id, rw, at) in &fds.maps.objects {
        if let Some(ours) = objects.fd(id, rw) {
            placement.push((at, ours, true));
        }
    }
    placement
}

/// The executables and the files behind the mappings of the processes, each opened once
/// by the restorer (per path and access: read-only, or read-write for a shared mapping
/// that may become writable): the restore children inherit them and put them at the
/// numbers their plans give, as they do the open file descriptions.
#[derive(Default)]
struct OpenFiles(std::collections::HashMap<(Vec<u8>, bool), OwnedFd>);

impl OpenFiles {
    fn fd(&mut self, pid: Pid, f: &stasis_image::FileRef, rw: bool, what: &str) -> Result<i32> {
        use std::collections::hash_map::Entry;
        let fd = match self.0.entry((f.path.clone(), rw)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let mode = if rw { libc::O_RDWR } else { libc::O_RDONLY };
                let fd = sp::open(std::ffi::OsStr::from_bytes(&f.path).as_ref(), mode | libc::O_CLOEXEC, 0).map_err(|err| {
                    Error::FileChanged { pid, path: f.display(), what: format!("cannot be opened as {what} ({err})") }
                })?;
                e.insert(fd)
            }
        };
        Ok(fd.as_raw_fd())
    }

    /// Where process `rec` wants them: (number in the child, ours, close-on-exec).
    fn placement(&mut self, rec: &ProcessRecord, fds: &FdPlan) -> Result<Vec<(i32, i32, bool)>> {
        let pid = Pid(rec.pid);
        let mut out = vec![(fds.exe, self.fd(pid, &rec.mm.exe, false, "its executable")?, true)];
        for (f, at, rw) in &fds.maps.files {
            out.push((*at, self.fd(pid, f, *rw, "a mapped file")?, true));
        }
        Ok(out)
    }
}

/// Reads the children's reports until every one has closed the status pipe.
fn wait_until_ready(shared: &Shared, status_rd: OwnedFd) -> Result<()> {
    let mut text = String::new();
    std::fs::File::from(status_rd)
        .read_to_string(&mut text)
        .map_err(|e| Error::Io { op: "read", path: "restore status pipe".into(), err: e })?;
    let mut ok = 0;
    for line in text.lines() {
        let mut parts = line.splitn(3, ' ');
        let (kind, pid) = (parts.next().unwrap_or(""), parts.next().and_then(|p| p.parse().ok()).unwrap_or(0));
        match kind {
            "ok" => ok += 1,
            _ => return Err(Error::Restore { pid: Pid(pid), what: parts.next().unwrap_or(line).to_string() }),
        }
    }
    let want = shared.plans.iter().filter(|p| p.rec.zombie_status.is_none() && !p.rec.vm_with_parent).count();
    if ok != want {
        return Err(Error::Restore {
            pid: Pid(shared.plans[0].rec.pid),
            what: format!("only {ok} of {want} restored processes got ready (one died early)"),
        });
    }
    Ok(())
}

/// Attaches to a ready restore child (blocked in a read) and stops it.
fn seize(pid: Pid) -> Result<()> {
    // Fork and clone events: the threads and the address-space children the restorer
    // clones start traced.
    let opts = ptrace::PTRACE_O_TRACESYSGOOD | ptrace::PTRACE_O_EXITKILL | ptrace::PTRACE_O_TRACECLONE | ptrace::PTRACE_O_TRACEFORK;
    ptrace::seize(pid, opts)
        .map_err(Error::sys(pid, "PTRACE_SEIZE"))?;
    ptrace::interrupt(pid).map_err(Error::sys(pid, "PTRACE_INTERRUPT"))?;
    loop {
        match ptrace::waitpid(pid, libc::__WALL).map_err(Error::sys(pid, "waitpid"))? {
            WaitStatus::Stopped(_, _, ptrace::PTRACE_EVENT_STOP) => return Ok(()),
            WaitStatus::Stopped(_, sig, _) => ptrace::cont(pid, sig).map_err(Error::sys(pid, "PTRACE_CONT"))?,
            other => return Err(Error::Restore { pid, what: format!("restore child ended early: {other:?}") }),
        }
    }
}

/// Process groups of `mine` that their leader's restore child made but that are not
/// theirs by descent (see GroupPlan), once every process exists: every leader has set
/// its own group before it said it was ready.
fn set_process_groups(mine: &[&Plan], d: &Drive) -> Result<()> {
    for p in mine.iter().filter(|p| p.group == GroupPlan::Restorer) {
        let r = p.rec;
        let pid = d.pids.outer(r.pid);
        let regs = ptrace::get_regs(pid).map_err(Error::sys(pid, "PTRACE_GETREGSET"))?;
        let mut inj = Injector::new(pid, pid, d.helper, regs);
        inj.call("setpgid", libc::SYS_setpgid, [0, r.pgid as u64, 0, 0, 0, 0])?;
    }
    Ok(())
}

/// Foreground groups of controlling terminals, once the groups exist. The leader blocks
/// every signal, so this cannot stop it with SIGTTOU.
fn set_foreground_groups(mine: &[&Plan], d: &Drive) -> Result<()> {
    for p in mine {
        let Some(fg) = p.ctty.and_then(|c| c.fg_pgrp) else { continue };
        let pid = d.pids.outer(p.rec.pid);
        let at = d.helper + HELPER_DATA;
        ChildMem::open(pid)?.write(at, &fg.to_le_bytes())?;
        let regs = ptrace::get_regs(pid).map_err(Error::sys(pid, "PTRACE_GETREGSET"))?;
        let mut inj = Injector::new(pid, pid, d.helper, regs);
        inj.call("ioctl(TIOCSPGRP)", libc::SYS_ioctl, [p.fds.tty as u64, libc::TIOCSPGRP, at, 0, 0, 0])?;
    }
    Ok(())
}

/// Kills every restored process and collects every traced thread, unless disarmed.
struct TreeGuard {
    /// With --pidns: the namespace's PID 1, whose death kills everything in it.
    ns_init: Option<Pid>,
    pids: Vec<Pid>,
    armed: bool,
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Ours are the processes whose parent is the restorer or another of ours: a PID
        // the image names may have been taken by an unrelated process meanwhile.
        let me = sp::getpid();
        let ours = |p: &Pid| {
            read_stat(*p).is_ok_and(|st| st.ppid == me.0 || self.pids.iter().any(|q| q.0 == st.ppid))
        };
        let victims: Vec<Pid> = match self.ns_init {
            Some(init) => vec![init],
            None => self.pids.iter().copied().filter(ours).collect(),
        };
        for p in victims {
            let _ = sp::kill(p, libc::SIGKILL);
        }
        // A leader's exit is reported only after its threads are gone, and we, their
        // tracer, must collect each traced thread's exit first.
        while ptrace::waitpid(Pid(-1), libc::__WALL).is_ok() {}
    }
}

/// Forks the process `idx` of the plan with its PID; in the child, runs its restore
/// code and never returns. A child that shares a table with us (CLONE_FILES, CLONE_FS)
/// must have forked its own children before we change that table, so that they start
/// from what the restorer handed down: it says so on a pipe, and only then do we return.
/// Below this many children a parent forks them all itself.
const DELEGATE_FROM: usize = 8;

/// Which of `children` (plan indexes, all of one parent) are forked by one of them (the
/// first returned) instead of by their parent, with CLONE_PARENT: half of those that
/// share no table with their parent (whose clone flags CLONE_PARENT would change) and end
/// with SIGCHLD, when there are at least DELEGATE_FROM. The one forking them is such a
/// child too, alive.
fn split_forks(shared: &Shared, children: &[usize]) -> (Option<usize>, Vec<usize>) {
    // A sibling made with CLONE_PARENT gets its creator's exit signal: only SIGCHLD ones.
    let sigchld = |c: usize| shared.plans[c].rec.exit_signal.is_none_or(|s| s == libc::SIGCHLD);
    let plain: Vec<usize> = children.iter().copied().filter(|&c| shared.plans[c].share == 0 && sigchld(c)).collect();
    let Some(&helper) = plain.iter().find(|&&c| shared.plans[c].rec.zombie_status.is_none()) else {
        return (None, Vec::new());
    };
    if plain.len() < DELEGATE_FROM {
        return (None, Vec::new());
    }
    let rest: Vec<usize> = plain.into_iter().filter(|&c| c != helper).collect();
    (Some(helper), rest[rest.len() / 2..].to_vec())
}

/// Forks the restore child of plan `idx` (a child of ours), which first forks the plans
/// `siblings` as children of ours too (CLONE_PARENT), then restores itself.
fn fork_process(shared: &Shared, idx: usize, siblings: &[usize]) -> Result<Pid> {
    fork_with(shared, idx, siblings, 0)
}

fn fork_with(shared: &Shared, idx: usize, siblings: &[usize], extra: i32) -> Result<Pid> {
    let plan = &shared.plans[idx];
    let pid = Pid(plan.rec.pid);
    let report = match plan.share {
        0 => None,
        _ => Some(sp::pipe2(libc::O_CLOEXEC).map_err(Error::sys(pid, "pipe2"))?),
    };
    // The root's parent is the restorer (or the namespace's init), not its own: SIGCHLD.
    let exit_signal = match idx == shared.root {
        true => libc::SIGCHLD,
        false => plan.rec.exit_signal.unwrap_or(libc::SIGCHLD),
    };
    match sp::fork_with_pid_signal(Some(pid), plan.share | extra, exit_signal) {
        Err(e) if e.0 == libc::EEXIST => {
            check_pid_free(pid, Instant::now())?;
            Err(Error::PidTaken { pid, comm: "unknown".into() })
        }
        Err(e) if e.0 == libc::EBUSY => {
            Err(Error::Restore { pid, what: "the restorer must be single-threaded to fork the restored process".into() })
        }
        Err(e) => Err(Error::Sys { pid, op: "clone3 with set_tid", errno: e }),
        Ok(Forked::Parent(c)) => {
            if let Some((rd, _wr)) = report {
                // Both ends close here, after the report: with CLONE_FILES the child's
                // descriptors are ours.
                wait_for_report(c, &rd)?;
            }
            Ok(c)
        }
        Ok(Forked::Child) => {
            // Before making siblings: if our parent is gone (a failed restore killed
            // it), so are we, and nothing of ours outlives it.
            if !siblings.is_empty() && (sp::set_pdeathsig(libc::SIGKILL).is_err() || sp::getppid() != plan.parent) {
                sp::exit_now(1);
            }
            for &s in siblings {
                if let Err(e) = fork_with(shared, s, &[], libc::CLONE_PARENT) {
                    sp::write_all_raw(shared.status_fd, format!("err {pid} {}\n", e.to_string().replace('\n', " ")).as_bytes());
                    sp::exit_now(1);
                }
            }
            if let Some(status) = plan.rec.zombie_status {
                // A zombie keeps the name it died with.
                let _ = sp::set_comm(plan.rec.comm.as_bytes());
                become_zombie(status);
            }
            // child_main moves the status pipe; it reports where it is now.
            let mut status_fd = shared.status_fd;
            let report_fd = report.as_ref().map(|(_, wr)| wr.as_raw_fd());
            let msg = match child_main(shared, idx, &mut status_fd, report_fd) {
                Err(m) => m,
                Ok(()) => "resumed unexpectedly".to_string(),
            };
            sp::write_all_raw(status_fd, format!("err {pid} {}\n", msg.replace('\n', " ")).as_bytes());
            sp::exit_now(1);
        }
    }
}

/// Waits until child `c`, which shares a table with us, writes its one byte on `rd`, or
/// ends first (it then reported why on the status pipe).
fn wait_for_report(c: Pid, rd: &OwnedFd) -> Result<()> {
    let pidfd = sp::pidfd_open(c).map_err(Error::sys(c, "pidfd_open"))?;
    let ready = sp::poll_many(&[rd.as_raw_fd(), pidfd.as_raw_fd()], libc::POLLIN, -1).map_err(Error::sys(c, "poll"))?;
    let mut b = [0u8; 1];
    if ready[0] & libc::POLLIN != 0 && sp::read_raw(rd.as_raw_fd(), &mut b) == Ok(1) {
        return Ok(());
    }
    Err(Error::Restore { pid: c, what: "a restore child that shares a table with its parent ended early".into() })
}

/// Forks PID 1 of the fresh PID namespace (see pidns), which forks the root. It leads a
/// session of its own unless the root must join the restorer's (--shell-job).
fn fork_ns_init(shared: &Shared, root_idx: usize, ctl: i32, setsid: bool) -> Result<Pid> {
    let root_pid = Pid(shared.plans[root_idx].rec.pid);
    match sp::fork_with_pid(None, 0) {
        Err(e) => Err(Error::Sys { pid: root_pid, op: "clone3 (PID namespace init)", errno: e }),
        Ok(Forked::Parent(c)) => Ok(c),
        Ok(Forked::Child) => {
            let fail = |msg: String| -> ! {
                sp::write_all_raw(shared.status_fd, format!("err {root_pid} namespace init: {msg}\n").as_bytes());
                sp::exit_now(1)
            };
            let _ = sp::set_comm(b"stasis-init");
            if let Err(e) = sp::set_own_sigmask(!0) {
                fail(format!("sigprocmask: {e}"));
            }
            if let Err(e) = pidns::mount_own_proc() {
                fail(e);
            }
            if setsid {
                if let Err(e) = sp::setsid() {
                    fail(format!("setsid: {e}"));
                }
            }
            match fork_process(shared, root_idx, &[]) {
                Ok(root) => pidns::init_loop(ctl, root),
                Err(e) => fail(e.to_string()),
            }
        }
    }
}

/// A zombie comes back by ending the way it ended: with its exit code, or killed by its
/// signal (default disposition, unblocked).
fn become_zombie(status: i32) -> ! {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let _ = sp::set_sigaction(sig, &stasis_sys::proc::KernelSigaction::default());
        let _ = sp::set_own_sigmask(0);
        let _ = sp::kill(sp::getpid(), sig);
    }
    sp::exit_now(libc::WEXITSTATUS(status))
}

/// The child's part: runs in the forked copy of the restorer (or of its restored parent),
/// returns only on error. `report`: the pipe to the parent this process shares a table
/// with, written once its own children exist and it no longer needs the descriptors it
/// inherited at their original numbers.
fn child_main(shared: &Shared, idx: usize, status_fd: &mut i32, report: Option<i32>) -> std::result::Result<(), String> {
    let plan = &shared.plans[idx];
    let rec = plan.rec;
    sp::set_pdeathsig(libc::SIGKILL).map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
    if sp::getppid() != plan.parent {
        return Err("the parent exited".into());
    }
    // No handler may run before its code exists: block everything first.
    sp::set_own_sigmask(!0).map_err(|e| format!("sigprocmask: {e}"))?;
    if shared.mounts_proc == Some(idx) {
        pidns::mount_own_proc()?;
    }
    // A session leader starts its session before forking, so its children are in it.
    if plan.session == SessionPlan::Leader {
        sp::setsid().map_err(|e| format!("setsid: {e}"))?;
        // Before forking: children inherit the controlling terminal at fork.
        if let Some(c) = &plan.ctty {
            stasis_sys::tty::set_controlling_tty(c.fd, c.steal).map_err(|e| format!("TIOCSCTTY: {e}"))?;
        }
    }
    // Before forking: our children inherit the group.
    if plan.group == GroupPlan::Own {
        let pgid = if rec.pgid == rec.pid { 0 } else { rec.pgid };
        sp::setpgid(Pid(0), Pid(pgid)).map_err(|e| format!("setpgid {}: {e}", rec.pgid))?;
    }
    // Returns only once every child sharing a table with us has forked its own. Of many
    // children, one forks half of its siblings (CLONE_PARENT), at the same time as we
    // fork the rest.
    let (helper_child, delegated) = split_forks(shared, &plan.children);
    for &c in plan.children.iter().filter(|c| !delegated.contains(c)) {
        let theirs = if Some(c) == helper_child { delegated.as_slice() } else { &[] };
        fork_process(shared, c, theirs).map_err(|e| e.to_string())?;
    }
    signals::restore_actions_in_child(&rec.sigactions, shared.inherited_actions)?;
    // Above every number the processes sharing our table use, so that no one's
    // close_range or dup3 hits them.
    let park = |fd: i32| sp::dup_at_least(fd, plan.fds.park).map_err(|e| format!("dup: {e}"));
    let status_hi = park(*status_fd)?;
    *status_fd = status_hi;
    let wait_hi = park(shared.wait_fd)?;
    if !plan.installs_for.is_empty() {
        install_descriptors(shared, plan)?;
        epoll::register_in_child(&plan.epolls)?;
    }
    if let Some(r) = report {
        sp::write_all_raw(r, b"r");
    }
    let fs = (!rec.fs_with_parent).then_some((rec.cwd.as_slice(), rec.root.as_slice(), rec.umask));
    task::restore_in_child(SessionPlan::Inherit, fs, &rec.comm)?;
    // syscall; then int3 so that a stray resume traps instead of running on.
    // syscall at 0 (single injected calls), the batch runner at BATCH_CODE_AT.
    let mut code = vec![0xcc; BATCH_CODE_AT as usize];
    code[..2].copy_from_slice(&[0x0f, 0x05]);
    code.extend_from_slice(&BATCH_CODE);
    stasis_sys::mem::map_helper_region(shared.helper, HELPER_LEN as usize, &code)
        .map_err(|e| format!("map helper page at {:#x}: {e}", shared.helper))?;
    let ok = format!("ok {}\n", rec.pid);
    set_own_state(rec, shared.inherited_limits)?;
    // No parent-death signal from here on: it would outlive the restore, and the end of
    // the wait pipe tells us the restorer is gone. Before the report: once the restorer
    // has every report it may stop us at any instruction.
    sp::set_pdeathsig(0).map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
    sp::write_all_raw(status_hi, ok.as_bytes());
    let _ = sp::close_range(status_hi as u32, status_hi as u32);
    // Wait for the restorer to seize us; the pipe is never written, and reads end only
    // if the restorer died.
    let mut b = [0u8; 1];
    let _ = sp::read_raw(wait_hi, &mut b);
    sp::exit_now(1)
}

/// Last in the restore child, each a call the restorer need not inject: resource limits
/// (after everything that allocates), personality and no_new_privs (before any thread
/// exists, so the threads inherit them), and the main thread's kernel-held addresses
/// (robust list, clear_child_tid, alternate stack; the kernel only records them until the
/// thread exits or takes a signal, by which time the saved memory is in place).
/// `inherited_limits`: see [`Shared`].
fn set_own_state(rec: &ProcessRecord, inherited_limits: &[(u32, u64, u64)]) -> std::result::Result<(), String> {
    const ROBUST_LIST_HEAD_LEN: u64 = 24;
    let main = &rec.threads[0];
    let (head, len) = main.robust_list;
    sp::set_robust_list(head, if len == 0 { ROBUST_LIST_HEAD_LEN } else { len }).map_err(|e| format!("set_robust_list: {e}"))?;
    sp::set_tid_address(main.clear_child_tid);
    let a = &main.altstack;
    let r = match a.flags & libc::SS_DISABLE {
        0 => sp::set_altstack(a.sp, a.flags & !libc::SS_ONSTACK, a.size),
        _ => sp::set_altstack(0, libc::SS_DISABLE, 0),
    };
    r.map_err(|e| format!("sigaltstack: {e}"))?;
    sp::set_personality(rec.personality).map_err(|e| format!("personality: {e}"))?;
    if rec.no_new_privs {
        sp::set_no_new_privs().map_err(|e| format!("PR_SET_NO_NEW_PRIVS: {e}"))?;
    }
    for l in rec.rlimits.iter().filter(|l| !inherited_limits.contains(&(l.resource, l.soft, l.hard))) {
        sp::set_own_rlimit(l.resource, l.soft, l.hard).map_err(|e| format!("setrlimit {}: {e}", l.resource))?;
    }
    Ok(())
}

/// In the restore child that installs a descriptor table: every saved descriptor, then
/// for itself and each process sharing the table the descriptors the restorer needs
/// there (controlling terminal, exe, mapped files), at the numbers their FdPlans give.
fn install_descriptors(shared: &Shared, plan: &Plan) -> std::result::Result<(), String> {
    let park = |fd: i32| sp::dup_at_least(fd, plan.fds.park).map_err(|e| format!("dup: {e}"));
    let mut ttys = Vec::new();
    for &m in &plan.installs_for {
        let p = &shared.plans[m];
        if let Some(c) = p.ctty.filter(|c| c.fg_pgrp.is_some()) {
            ttys.push((park(c.fd)?, p.fds.tty));
        }
    }
    files::restore_in_child(&plan.placement, plan.fds.park)?;
    for (hi, at) in ttys {
        sp::dup3(hi, at, libc::O_CLOEXEC).map_err(|e| format!("dup3 to {at}: {e}"))?;
    }
    Ok(())
}

/// A seized restore child whose address space is built, with what finish_child needs.
struct Built<'a> {
    inj: Injector,
    mem: ChildMem,
    /// The children sharing its address space, cloned and waiting for their finish.
    kids: Vec<vmshare::Spawned<'a>>,
}

/// The restorer's first part, with the child seized and stopped: the address space and
/// the mm fields, which need the helper descriptors in the child. Returns page bytes
/// loaded.
fn build_child<'a>(plan: &'a Plan<'a>, d: &Drive) -> Result<(Built<'a>, u64)> {
    let (helper, pages, pids) = (d.helper, d.pages, d.pids);
    let rec = plan.rec;
    // As we see it (ptrace, /proc); injected calls use the saved numbers.
    let pid = pids.outer(rec.pid);
    let regs = ptrace::get_regs(pid).map_err(Error::sys(pid, "PTRACE_GETREGSET"))?;
    let mut inj = Injector::new(pid, pid, helper, regs);
    let mem = ChildMem::open(pid)?;
    let data = helper + HELPER_DATA;
    // One batch for the whole address space and the mm fields. rseq goes first: the
    // kernel writes to the inherited rseq area on every return to user space, and the
    // batch returns to user space between its calls.
    let mut calls = Batch::default();
    threads::unregister_inherited_rseq(pid, &mut calls)?;
    // The child is a copy of the restorer (forked from it, or from a restored parent not
    // yet rebuilt): its vDSO block is where ours is, and whatever it mapped since it was
    // forked (its helper page, allocations) goes with the rest. No need to read its maps.
    MmRestore { pid, calls: &mut calls, mem: &mem, helper, pages }.rebuild(d.own_layout, &rec.mm.vmas, &plan.fds.maps)?;
    // The child's exe link is the restorer's binary; when that is already the saved exe the
    // kernel must not be asked to change it (it refuses while the file is mapped).
    let exe_fd = if same_file_as_own_exe(&rec.mm.exe) { -1 } else { plan.fds.exe };
    set_mm_fields(&mut calls, &mem, data, &rec.mm, exe_fd)?;
    if rec.mm.xcomp_perm & (1 << XFEATURE_XTILEDATA) != 0 {
        calls.push("arch_prctl(ARCH_REQ_XCOMP_PERM)", libc::SYS_arch_prctl, [ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, 0, 0, 0, 0]);
    }
    let ncalls = calls.len();
    calls.run(&mut inj, &mem, helper)?;
    let loaded = mm::fill(pid, &mem, pages, &rec.mm.vmas)?;
    log::debug!("address space rebuilt ({ncalls} calls in one batch), {loaded} bytes loaded");
    // While the table still holds the descriptions parked for them.
    let kids = plan.vm_kids.iter().map(|k| vmshare::spawn(&mut inj, &mem, helper, k)).collect::<Result<_>>()?;
    Ok((Built { inj, mem, kids }, loaded))
}

/// The restorer's second part, once every process sharing this one's descriptor table
/// is built: their helper descriptors go, then everything else is set and the threads
/// made. The new threads go to `extra`.
fn finish_child(plan: &Plan, built: Built, d: &Drive, extra: &mut Vec<Pid>) -> Result<()> {
    let (helper, pids) = (d.helper, d.pids);
    let rec = plan.rec;
    let pid = pids.outer(rec.pid);
    let Built { mut inj, mem, kids } = built;
    let data = helper + HELPER_DATA;
    // The restorer's descriptors in the child: image, exe, mapped files, parked ones (of
    // the whole table: a second close_range of a shared one finds nothing left). Alone,
    // before the locks (a close drops its POSIX locks on that file) and what processes
    // sharing the address space set up; else first in the main thread's last batch.
    let close = ("close_range", libc::SYS_close_range, [plan.fds.close_from as u64, u32::MAX as u64, 0, 0, 0, 0]);
    let close_last = rec.locks.is_empty() && kids.is_empty();
    if !close_last {
        inj.call(close.0, close.1, close.2)?;
        log::debug!("mm fields set, helper descriptors closed");
    }
    locks::restore(&mut inj, &mem, data, &rec.locks)?;
    // Before the helper page goes: they run their injected calls in it too.
    for k in kids {
        vmshare::finish(k, &mem, helper, extra)?;
    }
    // The other threads, each finished and left stopped with its registers in place.
    for t in &rec.threads[1..] {
        let tid = threads::clone_thread(&mut inj, &mem, data, t)?;
        log::debug!("thread {tid} created");
        extra.push(tid);
        let regs = ptrace::get_regs(tid).map_err(Error::sys(pid, "PTRACE_GETREGSET"))?;
        let mut tinj = Injector::new(pid, tid, helper, regs);
        finish_thread(&mut tinj, &mem, data, rec, t, true, &[], false)?;
        threads::restore_regs(pid, tid, t)?;
        log::debug!("thread {tid} ready");
    }
    let thread = &rec.threads[0];
    // Signals that arrived during the restore (SIGCHLD of a re-created zombie) are not
    // the program's: drop them before queueing the saved ones. Every signal sent while
    // the kernel has memory for its queue entry shows in the queues, read at this stop
    // without /proc.
    let queued = |shared| ptrace::peek_siginfo(pid, shared).map_err(Error::sys(pid, "PTRACE_PEEKSIGINFO"));
    if !queued(false)?.is_empty() || !queued(true)?.is_empty() {
        signals::drain_pending(&mut inj, &mem, data)?;
    }
    signals::restore_pending(&mut inj, &mem, data, Pid(rec.pid), None, &rec.shared_pending)?;
    let lead = if close_last { std::slice::from_ref(&close) } else { &[] };
    // The helper page goes last in the same batch: the stop for the fault that follows
    // is where the saved registers go in (a signal-delivery stop: the kernel's restart
    // handling applies as at any stop). Not for a program that ignores SIGSEGV (the fault
    // would reset that); it gets an unmapping call that ends at an interrupt stop.
    // Nor with a SIGSEGV of its own queued (now, for the main thread or the process): that
    // one would be delivered first, and would absorb the fault's.
    const SIG_IGN: u64 = 1;
    let ignores_segv = rec.sigactions.iter().any(|a| a.sig == libc::SIGSEGV && a.handler == SIG_IGN);
    let segv_queued = thread.pending.iter().chain(&rec.shared_pending).any(|s| s.signo() == libc::SIGSEGV);
    let separate = ignores_segv || segv_queued;
    finish_thread(&mut inj, &mem, data, rec, thread, false, lead, !separate)?;
    if separate {
        inj.call_to_interrupt_stop("munmap(helper)", libc::SYS_munmap, [helper, HELPER_LEN, 0, 0, 0, 0])?;
    }
    threads::set_final_regs(pid, pid, thread)
}

fn same_file_as_own_exe(f: &stasis_image::FileRef) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/exe").map(|m| m.dev() == f.dev && m.ino() == f.ino).unwrap_or(false)
}

/// What every thread sets for itself once the address space exists: kernel-held
/// addresses, its pending signals, credentials (last: dropping them would forbid the
/// clone3 with set_tid that makes the next thread). `fresh`: see restore_kernel_addrs;
/// `lead`: calls that go first in the same batch; `unmap_helper`: the batch ends by
/// removing the helper page (the last thread of the process to finish).
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish_thread(
    inj: &mut Injector,
    mem: &ChildMem,
    data: u64,
    rec: &ProcessRecord,
    t: &stasis_image::ThreadRecord,
    fresh: bool,
    lead: &[(&'static str, i64, [u64; 6])],
    unmap_helper: bool,
) -> Result<()> {
    let pid = Pid(rec.pid);
    signals::restore_pending(inj, mem, data, pid, Some(Pid(t.tid)), &t.pending)?;
    // The rest in one batch: `lead`, kernel-held addresses (name at data, alternate stack
    // at data + 64), then credentials (groups at data + 512).
    let mut calls = Batch::default();
    for &(name, nr, args) in lead {
        calls.push(name, nr, args);
    }
    threads::restore_kernel_addrs(&mut calls, mem, data, t, fresh)?;
    task::restore_creds(&mut calls, mem, data + 512, &rec.creds)?;
    let helper = data - HELPER_DATA;
    match unmap_helper {
        true => calls.run_and_unmap(inj, mem, helper, HELPER_LEN),
        false => calls.run(inj, mem, helper),
    }
}

/// prctl(PR_SET_MM, PR_SET_MM_MAP): code/data/brk/stack/args/env boundaries, auxv and the
/// exe link, in one call that needs no CAP_SYS_RESOURCE.
fn set_mm_fields(calls: &mut Batch, mem: &ChildMem, at: u64, m: &MmRecord, exe_fd: i32) -> Result<()> {
    let auxv: Vec<u8> = m.auxv.iter().flat_map(|w| w.to_le_bytes()).collect();
    let auxv_at = at + 128;
    let mut b = Vec::with_capacity(104);
    for v in [
        m.start_code, m.end_code, m.start_data, m.end_data, m.start_brk, m.brk, m.start_stack,
        m.arg_start, m.arg_end, m.env_start, m.env_end, auxv_at,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&(auxv.len() as u32).to_le_bytes());
    b.extend_from_slice(&(exe_fd as u32).to_le_bytes());
    mem.write(at, &b)?;
    mem.write(auxv_at, &auxv)?;
    calls.push("prctl(PR_SET_MM_MAP)", libc::SYS_prctl, [PR_SET_MM, PR_SET_MM_MAP, at, b.len() as u64, 0, 0]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stasis_image::{FdKind, FdRecord};

    fn rec(pid: i32, ppid: i32, files: bool, fs: bool, fds: &[i32]) -> ProcessRecord {
        let mut r = crate::dump::test_record(pid, ppid);
        r.files_with_parent = files;
        r.fs_with_parent = fs;
        r.fds = fds
            .iter()
            .map(|&fd| FdRecord {
                fd,
                cloexec: false,
                kind: FdKind::CharDevice { path: b"/dev/null".to_vec(), rdev: 0x103, flags: 0 },
                same_as: None,
                desc: fd as u64 + 1,
            })
            .collect();
        r
    }

    /// root ── A (files) ── A1 (files, fs);  root ── B
    fn tree() -> Vec<ProcessRecord> {
        vec![
            rec(10, 1, false, false, &[0, 1, 7]),
            rec(11, 10, true, false, &[0, 1, 7]),
            rec(12, 11, true, true, &[0, 1, 7]),
            rec(13, 10, false, false, &[0, 1]),
        ]
    }

    #[test]
    fn owners_follow_the_parent_chain() {
        let (files, fs) = table_owners(&tree());
        assert_eq!(files, vec![0, 0, 0, 3]);
        assert_eq!(fs, vec![0, 1, 1, 3]);
    }

    #[test]
    fn a_shared_table_gets_one_block_per_process() {
        let procs = tree();
        let members: Vec<&ProcessRecord> = procs[..3].iter().collect();
        let plans = FdPlan::group(&members, &[0, 0, 0], 0, 5);
        // Above fd 7: exe and tty of each (no mapped files), one after the other.
        let layout: Vec<(i32, i32)> = plans.iter().map(|p| (p.exe, p.tty)).collect();
        assert_eq!(layout, vec![(8, 9), (10, 11), (12, 13)]);
        assert!(plans.iter().all(|p| p.park == 14 && p.close_from == 8));
        let alone = FdPlan::group(&[&procs[3]], &[0], 0, 20);
        assert_eq!((alone[0].exe, alone[0].tty, alone[0].park, alone[0].close_from), (3, 4, 20, 3));
    }

    #[test]
    fn groups_are_joined_by_descent_where_the_leader_is_an_ancestor() {
        use GroupPlan::*;
        // Session 10: 10 ── 11 (group 11) ── 12 (group 11), 13 (group 11, its leader a
        // sibling), 14 (group 10) ── 15 (group 10), zombie 16 ── (group 16: none live);
        // 17 (group 20, led outside the tree).
        let mut procs: Vec<ProcessRecord> =
            [(10, 1), (11, 10), (12, 11), (13, 10), (14, 10), (15, 14), (16, 10), (17, 10)].iter().map(|&(p, pp)| rec(p, pp, false, false, &[])).collect();
        for (p, g) in procs.iter_mut().zip([10, 11, 11, 11, 10, 10, 16, 20]) {
            p.pgid = g;
            p.sid = 10;
        }
        let mut live = vec![true; procs.len()];
        live[6] = false;
        let plans = group_plans(&procs, &live, 0);
        assert_eq!(plans, vec![Nothing, Own, Own, Restorer, Own, Own, Nothing, Nothing]);
        // A process made by its parent's driver breaks the chain of descent.
        live[4] = false;
        assert_eq!(group_plans(&procs, &live, 0)[5], Restorer);
    }

    #[test]
    fn inconsistent_sharing_is_rejected() {
        assert!(check_sharing(&tree(), 0).is_ok());
        let mut t = tree();
        t[2].fds.pop();
        assert!(check_sharing(&t, 0).unwrap_err().to_string().contains("descriptors differ"));
        let mut t = tree();
        t[1].cwd = b"/tmp".to_vec();
        t[1].files_with_parent = false;
        t[1].fs_with_parent = true;
        assert!(check_sharing(&t, 0).unwrap_err().to_string().contains("cwd"));
        let mut t = tree();
        t[0].files_with_parent = true;
        assert!(check_sharing(&t, 0).unwrap_err().to_string().contains("does not hold"));
    }
}
