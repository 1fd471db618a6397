//! The dump pipeline, top to bottom: check the root, freeze the tree (each parent before
//! listing its children), collect every process (injected calls first, right after the
//! freeze), then what the processes share (open file descriptions, pipes, memory objects)
//! and all page data in one parallel write, write the metadata and rename the image into place, then release
//! (kill, or let it run on).
//!
//! Every error path drops the freeze guard, which puts registers and signal mask back and
//! detaches: the target runs on as if nothing happened. The image writer removes its
//! temporary file unless the image was completed.

use crate::error::{Error, Result};
use crate::Lap;
use crate::freeze::{read_stat, read_status, Frozen, ProcInfo};
use crate::parasite::{CodeCache, Parasite};
use crate::procfs::{self, PF_KTHREAD};
use crate::shmem::ShmemDump;
use crate::tracers::{self, Tracers};
use crate::{epoll, fifo, files, host, kfacts, locks, mm, pidns, signals, task, threads, tty, vmshare};
use stasis_image::{Image, ImageWriter, MmRecord, ProcessRecord};
use stasis_sys::Pid;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to dump, where, and what happens to the target afterwards.
#[derive(Clone, Debug)]
pub struct DumpOptions {
    pub pid: i32,
    pub dir: PathBuf,
    /// Let the target run on after the dump instead of killing it.
    pub leave_running: bool,
    /// Accept terminals and a session outside the tree (as CRIU's --shell-job).
    pub shell_job: bool,
}

/// Figures of one dump.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DumpStats {
    /// From the start of the call until the image was complete and the target released.
    pub total: Duration,
    /// How long the target was frozen.
    pub frozen: Duration,
    /// Size of the image file.
    pub image_bytes: u64,
    /// Bytes of page data saved.
    pub memory_bytes: u64,
    pub processes: usize,
    pub threads: usize,
    /// How long each step took, in order: freezing the tree, collecting every process,
    /// what the processes share, page data, writing the image, releasing the tree.
    pub phases: Vec<(&'static str, Duration)>,
}

const ARCH_GET_XCOMP_PERM: u64 = 0x1022;

/// Refusals that need no freezing: a missing process, a kernel thread, ourselves, a
/// process somebody else traces.
fn precheck(pid: Pid) -> Result<()> {
    if pid.0 <= 0 {
        return Err(Error::NoSuchProcess(pid));
    }
    if pid == stasis_sys::proc::getpid() {
        return Err(Error::IsSelf(pid));
    }
    let stat = read_stat(pid)?;
    let status = read_status(pid)?;
    if stat.flags & PF_KTHREAD != 0 || status.kthread {
        return Err(Error::KernelThread(pid));
    }
    if stat.state == 'Z' {
        return Err(Error::Unsupported { pid, what: "a zombie process".into() });
    }
    if stat.state == 'T' {
        return Err(Error::Unsupported { pid, what: "a stopped process (SIGSTOP/SIGTSTP; continue it first)".into() });
    }
    if status.tracer_pid != 0 {
        return Err(Error::AlreadyTraced { pid, tracer: status.tracer_pid });
    }
    Ok(())
}

/// One process of the tree: frozen (by tracer `tracer`, with these threads), or a zombie
/// (nothing to freeze).
struct Member {
    pid: Pid,
    tids: Option<Vec<Pid>>,
    tracer: usize,
    /// Read once the process was frozen (for a zombie, once it was found to be one).
    proc: Option<ProcInfo>,
}

/// What freezing one process gave: its threads (`None`: a zombie), its stat and status,
/// and, for a live one, its children, each with whether it shares the process's address
/// space.
type FrozenMember = (Option<Vec<Pid>>, ProcInfo, Vec<(Pid, bool)>);

/// Freezes the tree rooted at `root`, parents before children: a frozen parent cannot
/// fork or reap, so its children are listed once it is frozen, and so on down. The
/// children of a process are shared out among the tracer threads, and each tracer
/// freezes its share together (see Frozen::freeze_many) and lists their children.
fn freeze_tree(root: Pid, tracers: &mut Tracers) -> Result<Vec<Member>> {
    use std::sync::mpsc;
    let (tx, rx) = mpsc::channel::<(usize, Result<FrozenMember>)>();
    // Freezes `batch` (member index, pid) on tracer `w`; answers each as it is frozen.
    let freeze_on = |tracers: &mut Tracers, batch: Vec<(usize, Pid)>, w: usize| {
        let answers: Vec<tracers::Answer<FrozenMember>> =
            batch.iter().map(|&(i, _)| tracers::Answer::new(i, tx.clone())).collect();
        let pids: Vec<Pid> = batch.iter().map(|&(_, p)| p).collect();
        tracers.run(w, move |held| {
            for ((answer, &pid), r) in answers.into_iter().zip(&pids).zip(Frozen::freeze_many(&pids)) {
                let r = match pid == root {
                    true => r.map(|(f, info)| (Some(f), info)),
                    false => as_child(pid, r),
                };
                answer.send(r.and_then(|(f, info)| match f {
                    None => Ok((None, info, Vec::new())),
                    Some(f) => {
                        let tids: Vec<Pid> = f.threads.iter().map(|t| t.tid).collect();
                        let kids = children_of(pid, &tids)?;
                        held.push(f);
                        Ok((Some(tids), info, kids))
                    }
                }));
            }
        })
    };
    let mut members = vec![Member { pid: root, tids: None, tracer: 0, proc: None }];
    // Of each member: how far below the root it is.
    let mut depth = vec![0usize];
    freeze_on(tracers, vec![(0, root)], 0)?;
    let mut pending = 1;
    // The refusal that counts, by (depth, pid) of the process it concerns: nearest the root,
    // then lowest PID, as in collect_members. The rest of the tree is frozen all the same
    // (and let go with it), so which refusal counts does not depend on which tracer
    // answered first.
    let mut refusal: Option<((usize, i32), Error)> = None;
    let mut refuse = |key: (usize, i32), e: Error| {
        if refusal.as_ref().is_none_or(|(k, _)| key < *k) {
            refusal = Some((key, e));
        }
    };
    while pending > 0 {
        let Ok((idx, r)) = rx.recv() else {
            refuse((0, 0), Error::TracerLost);
            break;
        };
        pending -= 1;
        let key = (depth[idx], members[idx].pid.0);
        let (tids, info, kids) = match r {
            Ok(x) => x,
            Err(e) => {
                refuse(key, e);
                continue;
            }
        };
        members[idx].proc = Some(info);
        if tids.is_none() {
            continue;
        }
        members[idx].tids = tids;
        let pid = members[idx].pid;
        if let Some((c, _)) = kids.iter().find(|(c, _)| *c == stasis_sys::proc::getpid()) {
            refuse(key, Error::Unsupported {
                pid: root,
                what: format!("a tree that contains stasis itself (pid {c}, child of {pid})"),
            });
            continue;
        }
        let mut batches: Vec<Vec<(usize, Pid)>> = vec![Vec::new(); tracers.max()];
        for (child, shares_vm) in kids {
            // A child sharing its parent's address space goes to the parent's tracer,
            // after it: the parent's mappings are read before its injected calls, which
            // then must not overlap the child's (whose scratch area would appear among
            // them).
            let w = if shares_vm { members[idx].tracer } else { members.len() % tracers.max() };
            batches[w].push((members.len(), child));
            members.push(Member { pid: child, tids: None, tracer: w, proc: None });
            depth.push(depth[idx] + 1);
        }
        for (w, batch) in batches.into_iter().enumerate().filter(|(_, b)| !b.is_empty()) {
            pending += batch.len();
            freeze_on(tracers, batch, w)?;
        }
    }
    match refusal {
        Some((_, e)) => Err(e),
        None => Ok(members),
    }
}

/// A child of a frozen process as its freeze left it; `None` if it is a zombie. A child
/// exiting while it is being frozen can only become a zombie (its parent is frozen and
/// cannot reap it), so that is what it is recorded as.
fn as_child(child: Pid, r: Result<(Frozen, ProcInfo)>) -> Result<(Option<Frozen>, ProcInfo)> {
    match r {
        Ok((f, info)) => Ok((Some(f), info)),
        Err(e @ (Error::TargetDied { .. } | Error::NoSuchProcess(_) | Error::Sys { .. })) => match read_stat(child) {
            Ok(st) if matches!(st.state, 'Z' | 'X') => Ok((None, Box::new((st, read_status(child)?)))),
            _ => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// The children of frozen process `pid` (threads `tids`), each with whether it shares
/// the process's address space.
fn children_of(pid: Pid, tids: &[Pid]) -> Result<Vec<(Pid, bool)>> {
    let mut out = Vec::new();
    for tid in tids {
        let text = procfs::read_text(pid, &format!("task/{tid}/children"))?.1;
        out.extend(text.split_whitespace().filter_map(|c| c.parse().ok()).map(Pid));
    }
    out.sort();
    out.dedup();
    Ok(out
        .into_iter()
        .map(|c| (c, stasis_sys::proc::kcmp_shares(c, pid, stasis_sys::proc::Shared::Vm).unwrap_or(false)))
        .collect())
}

pub fn dump(opts: &DumpOptions) -> Result<DumpStats> {
    let t0 = Instant::now();
    let root = Pid(opts.pid);
    precheck(root)?;
    let host = host::current()?;
    let mut writer = ImageWriter::create(&opts.dir)?;
    let frozen_at = Instant::now();
    // Dropped last: on any error the processes are let go only after everything else.
    let mut tracers = Tracers::new();
    let members = freeze_tree(root, &mut tracers)?;
    log::debug!("pid {root}: froze a tree of {} processes", members.len());
    let mut phases = vec![("freeze", frozen_at.elapsed())];
    let (mut image, nthreads, drained) = std::thread::scope(|s| {
        let tables = s.spawn(|| table_groups(&members));
        let facts = s.spawn(|| match kfacts::read() {
            Ok(f) => Some(Arc::new(f)),
            Err(why) => {
                log::debug!("kernel facts by BPF: {why}; injected calls and smaps instead");
                None
            }
        });
        let sharing = address_spaces(root, &members)?;
        // A reader that panicked only costs the faster way: the fallback needs nothing of it.
        let facts = facts.join().ok().flatten();
        collect_tree(root, &members, &mut tracers, &sharing, tables, facts, &mut writer, opts, host, &mut phases)
    })?;
    let memory_bytes = writer.pages_len();
    log::debug!("pid {root}: state collected, {memory_bytes} bytes of pages written");
    // A tree that runs on needs no durable image to be safe: release it before the
    // metadata, fsync and rename. One that will be killed must wait until the image is
    // complete on disk, or a failed write would lose it.
    let frozen_for;
    let live: Vec<Pid> = members.iter().filter(|m| m.tids.is_some()).map(|m| m.pid).collect();
    // Declared after `tracers`, so dropped first: on an error below, the bytes read out of
    // terminals go back while the tree is still frozen.
    let drained = drained;
    let mut lap = Lap::new();
    let image_bytes = if opts.leave_running {
        drained.put_back()?;
        tracers.release_all()?;
        frozen_for = frozen_at.elapsed();
        phases.push(("release", lap.next()));
        let n = writer.finish(&mut image)?;
        phases.push(("write", lap.next()));
        n
    } else {
        let n = writer.finish(&mut image)?;
        phases.push(("write", lap.next()));
        tracers.kill_all(&live)?;
        drained.discard();
        frozen_for = frozen_at.elapsed();
        phases.push(("kill", lap.next()));
        n
    };
    log::debug!("pid {root}: image complete");
    Ok(DumpStats {
        total: t0.elapsed(),
        frozen: frozen_for,
        image_bytes,
        memory_bytes,
        processes: image.processes.len(),
        threads: nthreads,
        phases,
    })
}

/// What one live process gave: its record, descriptors, memory plan and a pidfd.
type Collected = (ProcessRecord, files::DumpedFds, Option<mm::MmPlan>, std::os::fd::OwnedFd);

/// Threads that read processes' /proc state while the tracers inject into the next ones.
const PROC_READERS: usize = 2;

/// The per-process records, descriptors, pidfds and memory plans of every member, in
/// member order, and the number of threads. Each tracer thread runs the injected calls
/// of the processes it froze, one after the other, all tracers at the same time; the
/// /proc part of each process runs on reader threads as soon as its injected calls are
/// over.
///
/// When several processes are refused, the error is that of the one first in
/// [`failure_ranks`] order, whichever thread finished first: after a failure only the
/// processes ranked after it are skipped, so every one ranked before it is still
/// collected and may turn out to be the one to name.
#[allow(clippy::type_complexity)]
fn collect_members(
    members: &[Member],
    tracers: &mut Tracers,
    info: &TreeInfo,
) -> Result<(Vec<ProcessRecord>, Vec<(Pid, files::DumpedFds)>, Vec<(Pid, std::os::fd::OwnedFd)>, Vec<Option<mm::MmPlan>>, usize)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    type Work = (usize, Pid, std::os::fd::OwnedFd, Injected);
    let n = members.len();
    let code = Arc::new(std::sync::Mutex::new(CodeCache::default()));
    let kin: Vec<(Pid, Option<i32>)> = members.iter().map(|m| (m.pid, m.proc.as_ref().map(|p| p.0.ppid))).collect();
    let rank = Arc::new(failure_ranks(&kin));
    // The rank of the first failed process so far (usize::MAX: none failed).
    let failed = Arc::new(AtomicUsize::new(usize::MAX));
    // Processes sharing an address space: with a parent or a child.
    let vm_parent = &info.sharing.vm_parent;
    let vm_shared: Arc<Vec<bool>> =
        Arc::new((0..n).map(|i| vm_parent[i].is_some() || vm_parent.contains(&Some(i))).collect());
    let (work_tx, work_rx) = mpsc::channel::<Work>();
    let (done_tx, done_rx) = mpsc::channel::<(usize, Result<Collected>)>();
    for w in 0..tracers.started() {
        let mine: Vec<(usize, Pid, Box<(procfs::Stat, procfs::Status)>)> = members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.tids.is_some() && m.tracer == w)
            .filter_map(|(i, m)| Some((i, m.pid, m.proc.clone()?)))
            .collect();
        let (code, failed, work_tx, done_tx) = (code.clone(), failed.clone(), work_tx.clone(), done_tx.clone());
        let (vm_shared, rank, facts) = (vm_shared.clone(), rank.clone(), info.facts.clone());
        tracers.run(w, move |held| {
            for (i, pid, proc) in mine {
                if rank[i] > failed.load(Ordering::SeqCst) {
                    continue;
                }
                let vm_shared = vm_shared[i];
                let r = stasis_sys::proc::pidfd_open(pid)
                    .map_err(Error::sys(pid, "pidfd_open"))
                    .and_then(|pidfd| Ok((pidfd, inject_part(pid, tracers::held(held, pid)?, proc, &code, vm_shared, facts.as_deref())?)));
                match r {
                    Ok((pidfd, inj)) => {
                        let _ = work_tx.send((i, pid, pidfd, inj));
                    }
                    Err(e) => {
                        failed.fetch_min(rank[i], Ordering::SeqCst);
                        let _ = done_tx.send((i, Err(e)));
                    }
                }
            }
        })?;
    }
    drop(work_tx);
    let work_rx = std::sync::Mutex::new(work_rx);
    let mut results: Vec<Option<Result<Collected>>> = (0..n).map(|_| None).collect();
    std::thread::scope(|s| {
        for _ in 0..PROC_READERS {
            let (rx, tx, failed, rank) = (&work_rx, done_tx.clone(), &failed, &rank);
            s.spawn(move || loop {
                let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok((i, pid, pidfd, inj)) = job else { return };
                if rank[i] > failed.load(Ordering::SeqCst) {
                    continue;
                }
                let r = proc_part(i, pid, &pidfd, inj, info).map(|(rec, fds, plan)| (rec, fds, plan, pidfd));
                if r.is_err() {
                    failed.fetch_min(rank[i], Ordering::SeqCst);
                }
                let _ = tx.send((i, r));
            });
        }
        drop(done_tx);
        for (i, r) in done_rx {
            results[i] = Some(r);
        }
    });
    let first_failed = (0..n).filter(|&i| matches!(results[i], Some(Err(_)))).min_by_key(|&i| rank[i]);
    if let Some(Some(e)) = first_failed.map(|i| results[i].take()) {
        return e.map(|_| unreachable!("an error was found"));
    }
    let mut procs = Vec::with_capacity(n);
    let mut fds = Vec::with_capacity(n);
    let mut own_pidfds = Vec::new();
    let mut mms = Vec::with_capacity(n);
    let mut nthreads = 0;
    for (i, m) in members.iter().enumerate() {
        match (results[i].take(), &m.tids) {
            (_, None) => {
                procs.push(zombie_record(m.pid)?);
                fds.push((m.pid, files::DumpedFds::default()));
                mms.push(None);
            }
            (Some(r), Some(_)) => {
                let (rec, dumped, plan, pidfd) = r?;
                nthreads += rec.threads.len();
                procs.push(rec);
                fds.push((m.pid, dumped));
                mms.push(plan);
                own_pidfds.push((m.pid, pidfd));
            }
            (None, Some(_)) => return Err(Error::TracerLost),
        }
    }
    Ok((procs, fds, own_pidfds, mms, nthreads))
}

/// The order in which the refusals of several processes count, by member (pid and
/// parent's pid): nearest the root first, then by PID. Member order would not do: it
/// follows the order in which the tracers froze the processes. Members come after their
/// parents (see freeze_tree). Pure.
fn failure_ranks(members: &[(Pid, Option<i32>)]) -> Vec<usize> {
    let index: std::collections::HashMap<Pid, usize> = members.iter().enumerate().map(|(i, &(pid, _))| (pid, i)).collect();
    let mut depth = vec![0usize; members.len()];
    for (i, &(_, ppid)) in members.iter().enumerate().skip(1) {
        let parent = ppid.and_then(|p| index.get(&Pid(p)));
        depth[i] = parent.map_or(0, |&j| depth[j] + 1);
    }
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by_key(|&i| (depth[i], members[i].0 .0));
    let mut rank = vec![0; members.len()];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r;
    }
    rank
}

/// Collects every process, then what the processes share: open file descriptions
/// (numbered across the tree), pipes, pseudo-terminals and controlling terminals, and
/// page data (one parallel write for all). The bytes read out of terminals come back
/// with the guard that puts them back.
#[allow(clippy::too_many_arguments)]
fn collect_tree(
    root: Pid,
    members: &[Member],
    tracers: &mut Tracers,
    sharing: &vmshare::Sharing,
    tables: std::thread::ScopedJoinHandle<'_, Result<TableGroups>>,
    facts: Option<Arc<kfacts::Facts>>,
    writer: &mut ImageWriter,
    opts: &DumpOptions,
    host: stasis_image::HostInfo,
    phases: &mut Vec<(&'static str, Duration)>,
) -> Result<(Image, usize, tty::Drained)> {
    let mut lap = Lap::new();
    let tasks: Vec<(Pid, Vec<Pid>)> = members
        .iter()
        .map(|m| (m.pid, m.tids.clone().unwrap_or_default()))
        .collect();
    let statuses: Vec<Option<&procfs::Status>> = members.iter().map(|m| m.proc.as_ref().map(|p| &p.1)).collect();
    let view = pidns::TreeView::read(&tasks, &statuses)?;
    let sids: std::collections::HashMap<Pid, i32> =
        members.iter().filter_map(|m| Some((m.pid, m.proc.as_ref()?.0.session))).collect();
    let info = TreeInfo {
        opts,
        sids: &sids,
        root,
        objects: std::sync::Mutex::new(ShmemDump::default()),
        mapped_files: Default::default(),
        sharing,
        facts,
    };
    let (procs, fds, pidfds, mms, nthreads) = collect_members(members, tracers, &info)?;
    phases.push(("collect", lap.next()));
    let mut procs = procs;
    let mut fds = fds;
    let mut mms = mms;
    let mut objects = info.objects.into_inner().unwrap_or_else(|p| p.into_inner());
    let tables = tables.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
    shared_tables(&mut procs, sharing, &tables)?;
    files::assign_descriptions(&mut fds)?;
    epoll::resolve(&mut fds, &pidfds)?;
    let masters = {
        let mut recs: Vec<(Pid, &mut Vec<stasis_image::FdRecord>)> =
            fds.iter_mut().map(|(pid, d)| (*pid, &mut d.records)).collect();
        tty::resolve_slaves(&mut recs, opts.shell_job)?
    };
    let stats: Vec<&procfs::Stat> =
        members.iter().map(|m| m.proc.as_ref().map(|p| &p.0).ok_or(Error::TracerLost)).collect::<Result<_>>()?;
    tty::controlling_ttys(&mut procs, &stats, &masters, opts.shell_job)?;
    let views: Vec<(Pid, &std::os::fd::OwnedFd, &[stasis_image::FdRecord])> = fds
        .iter()
        .filter_map(|(pid, d)| pidfds.iter().find(|(p, _)| p == pid).map(|(_, fd)| (*pid, fd, d.records.as_slice())))
        .collect();
    let pipes = files::dump_pipes(&views)?;
    let fifos = fifo::dump(&views)?;
    let held: Vec<locks::ProcLocks> =
        fds.iter().map(|(pid, d)| (*pid, d.records.as_slice(), d.locks.as_slice())).collect();
    let lock_recs = locks::assign(&held);
    epolls_of_sharers(&procs, &fds)?;
    // Last of the checks that may refuse: from here on bytes are read out of terminals.
    let (ptys, drained) = tty::dump_ptys(&masters, &pidfds)?;
    for ((rec, (_, d)), l) in procs.iter_mut().zip(fds).zip(lock_recs) {
        rec.fds = d.records;
        rec.locks = l;
    }
    phases.push(("shared", lap.next()));
    let vmas = mm::save_all(&mut mms, &mut objects, writer)?;
    phases.push(("pages", lap.next()));
    for (rec, v) in procs.iter_mut().zip(vmas) {
        rec.mm.vmas = v;
    }
    // Last: everything above used our PIDs to reach the processes.
    if let Some(v) = &view {
        v.translate(&mut procs)?;
    }
    let image = Image {
        stasis_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        host,
        root_pid: procs[0].pid,
        shell_job: opts.shell_job,
        pid_namespace: view.is_some(),
        processes: procs,
        pipes,
        fifos,
        shmem: objects.into_records(),
        ptys,
        page_block_size: 0,
        page_block_hashes: Vec::new(),
    };
    Ok((image, nthreads, drained))
}

/// Groups of the processes (indexes into `pids`, of those in `live`) that share one
/// kernel object of kind `what`, each in tree order: sorted by the object, as kcmp
/// orders them, so a tree of n costs n log n calls. Grouping compares neighbours of the
/// sorted order, which the sort has compared already (it must, to order them): each
/// answer is kept, so no pair is asked twice.
fn groups_sharing(pids: &[i32], live: &[usize], what: stasis_sys::proc::Shared) -> Result<Vec<Vec<usize>>> {
    use std::cmp::Ordering;
    let mut known: std::collections::HashMap<(usize, usize), Ordering> = Default::default();
    let mut failed = None;
    let mut order = |a: usize, b: usize| -> Ordering {
        if let Some(&o) = known.get(&(a, b)) {
            return o;
        }
        match stasis_sys::proc::kcmp_order(Pid(pids[a]), Pid(pids[b]), what) {
            Ok(o) => {
                known.insert((a, b), o);
                known.insert((b, a), o.reverse());
                o
            }
            Err(e) => {
                failed.get_or_insert(Error::Sys { pid: Pid(pids[a]), op: "kcmp", errno: e });
                Ordering::Equal
            }
        }
    };
    let mut sorted = live.to_vec();
    merge_sort_by(&mut sorted, &mut order);
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (k, &i) in sorted.iter().enumerate() {
        let same = k > 0 && order(sorted[k - 1], i) == Ordering::Equal;
        match groups.last_mut() {
            Some(g) if same => g.push(i),
            _ => groups.push(vec![i]),
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    for g in groups.iter_mut() {
        g.sort();
    }
    Ok(groups)
}

/// Sorts `v` by `cmp`, stably, with a top-down merge sort: every comparison here is a
/// system call, and this one makes about a fifth fewer than the standard library's sort
/// (tuned for cheap comparisons) on the orders kcmp gives. Pure.
fn merge_sort_by(v: &mut [usize], cmp: &mut impl FnMut(usize, usize) -> std::cmp::Ordering) {
    let n = v.len();
    if n < 2 {
        return;
    }
    let mid = n / 2;
    merge_sort_by(&mut v[..mid], cmp);
    merge_sort_by(&mut v[mid..], cmp);
    let left = v[..mid].to_vec();
    let (mut i, mut j, mut k) = (0, mid, 0);
    while i < left.len() && j < n {
        // Only a right element strictly less goes first: equal ones keep their order.
        if cmp(v[j], left[i]) == std::cmp::Ordering::Less {
            v[k] = v[j];
            j += 1;
        } else {
            v[k] = left[i];
            i += 1;
        }
        k += 1;
    }
    // What is left of the right half is in place already.
    v[k..k + left.len() - i].copy_from_slice(&left[i..]);
}

/// The processes that share a descriptor table (CLONE_FILES) and those that share cwd,
/// root and umask (CLONE_FS), as groups_sharing gives them.
struct TableGroups {
    files: Vec<Vec<usize>>,
    fs: Vec<Vec<usize>>,
}

/// Groups the live members by the descriptor table and by the cwd/root/umask they
/// share. Neither changes while the tree is frozen (the dump's injected calls neither
/// clone nor unshare), so this runs beside the collection of the processes.
fn table_groups(members: &[Member]) -> Result<TableGroups> {
    use stasis_sys::proc::Shared;
    let live: Vec<usize> = (0..members.len()).filter(|&i| members[i].tids.is_some()).collect();
    let pids: Vec<i32> = members.iter().map(|m| m.pid.0).collect();
    Ok(TableGroups { files: groups_sharing(&pids, &live, Shared::Files)?, fs: groups_sharing(&pids, &live, Shared::Fs)? })
}

/// Right after the freeze, before any injected call: which processes share their
/// parent's address space (and signal handlers); see vmshare. Refuses the root sharing
/// its address space or handlers with its parent outside the tree, and every grouping
/// that vmshare::assign does not keep.
fn address_spaces(root: Pid, members: &[Member]) -> Result<vmshare::Sharing> {
    use stasis_sys::proc::{kcmp_shares, Shared};
    let mut info = Vec::with_capacity(members.len());
    for m in members {
        let ppid = match &m.proc {
            Some(p) => p.0.ppid,
            None => read_stat(m.pid)?.ppid,
        };
        let threads = m.tids.as_ref().map(|t| t.len()).unwrap_or(0);
        info.push(vmshare::Member { pid: m.pid.0, ppid, threads });
    }
    let ppid = info[0].ppid;
    for (what, name) in [(Shared::Vm, "its address space (CLONE_VM)"), (Shared::Sighand, "its signal handlers (CLONE_SIGHAND)")] {
        // kcmp needs ptrace access to both: a parent we may not inspect (an init of
        // another user namespace) is not compared.
        if ppid > 0 && kcmp_shares(root, Pid(ppid), what).unwrap_or(false) {
            return Err(Error::Unsupported { pid: root, what: format!("sharing {name} with its parent {ppid}, outside the dumped tree") });
        }
    }
    let live: Vec<usize> = (0..members.len()).filter(|&i| members[i].tids.is_some()).collect();
    let pids: Vec<i32> = info.iter().map(|m| m.pid).collect();
    let vm = groups_sharing(&pids, &live, Shared::Vm)?;
    // Signal handlers are shared only along with the address space (clone() refuses
    // CLONE_SIGHAND without CLONE_VM, and exec gives up both), so only the members of
    // one address space are compared.
    let mut sighand = Vec::new();
    for g in &vm {
        match g.len() {
            1 => sighand.push(g.clone()),
            _ => sighand.extend(groups_sharing(&pids, g, Shared::Sighand)?),
        }
    }
    vmshare::assign(&info, &vm, &sighand).map_err(|(pid, what)| Error::Unsupported { pid: Pid(pid), what })
}

/// What processes of the tree share with each other instead of holding copies. A
/// descriptor table (CLONE_FILES) or cwd/root/umask (CLONE_FS) shared with the parent is
/// recorded, and restore clones the process alike; since sharing is handed down at
/// clone time, a group of sharers must hang together along the parent chain (each one's
/// parent in the group, but for the first). An address space and signal handlers shared
/// with the parent (`sharing`, from address_spaces) are recorded too, once the records
/// agree with what restore can do (vmshare::check). Refused: a group that does not hang
/// together so, and anything the root shares with its parent outside the tree.
fn shared_tables(procs: &mut [ProcessRecord], sharing: &vmshare::Sharing, tables: &TableGroups) -> Result<()> {
    use stasis_sys::proc::{kcmp_shares, Shared};
    const KINDS: [(Shared, &str); 2] =
        [(Shared::Files, "its descriptor table (CLONE_FILES)"), (Shared::Fs, "its cwd, root and umask (CLONE_FS)")];
    let root = &procs[0];
    if root.ppid > 0 {
        for (what, name) in KINDS {
            // kcmp needs ptrace access to both: see address_spaces.
            if kcmp_shares(Pid(root.pid), Pid(root.ppid), what).unwrap_or(false) {
                return Err(Error::Unsupported {
                    pid: Pid(root.pid),
                    what: format!("sharing {name} with its parent {}, outside the dumped tree", root.ppid),
                });
            }
        }
    }
    for ((what, name), groups) in KINDS.into_iter().zip([&tables.files, &tables.fs]) {
        for members in groups.iter().filter(|m| m.len() > 1) {
            let in_group = |pid: i32| members.iter().any(|&m| procs[m].pid == pid);
            let heads: Vec<usize> = members.iter().copied().filter(|&m| !in_group(procs[m].ppid)).collect();
            if let [_, second, ..] = heads[..] {
                let (p, q) = (procs[second].pid, procs[heads[0]].pid);
                return Err(Error::Unsupported {
                    pid: Pid(p),
                    what: format!("sharing {name} with pid {q} but not with its parent {}", procs[second].ppid),
                });
            }
            for &m in members.iter().filter(|&&m| !heads.contains(&m)) {
                match what {
                    Shared::Files => procs[m].files_with_parent = true,
                    Shared::Fs => procs[m].fs_with_parent = true,
                    Shared::Vm | Shared::Sighand => {}
                }
            }
        }
    }
    for (i, p) in procs.iter_mut().enumerate() {
        p.vm_with_parent = sharing.vm_parent[i].is_some();
        p.sighand_with_parent = sharing.sighand[i];
    }
    vmshare::check(procs, 0).map_err(|(pid, what)| Error::Unsupported { pid: Pid(pid), what })
}

/// An epoll in the own descriptor table of a process sharing its parent's address space
/// is registered on restore by a process that installs a table (it is never forked):
/// refused unless one holds it with its targets (as epoll::plan decides on restore).
fn epolls_of_sharers(procs: &[ProcessRecord], fds: &[(Pid, files::DumpedFds)]) -> Result<()> {
    let has_epoll = |d: &files::DumpedFds| d.records.iter().any(|r| matches!(r.kind, stasis_image::FdKind::Epoll { .. }));
    let Some((p, _)) = procs.iter().zip(fds).find(|(p, (_, d))| p.vm_with_parent && !p.files_with_parent && has_epoll(d)) else {
        return Ok(());
    };
    let mut recs = procs.to_vec();
    for (r, (_, d)) in recs.iter_mut().zip(fds) {
        r.fds = d.records.clone();
    }
    let installs: Vec<bool> = recs.iter().map(|r| !r.files_with_parent && !r.vm_with_parent).collect();
    epoll::plan(&recs, &installs).map(drop).map_err(|e| Error::Unsupported {
        pid: Pid(p.pid),
        what: format!("an epoll in a descriptor table of its own while sharing its parent's address space ({e})"),
    })
}

/// A zombie: who it is and how it ended.
fn zombie_record(pid: Pid) -> Result<ProcessRecord> {
    let stat = read_stat(pid)?;
    let (path, text) = procfs::read_text(pid, "stat")?;
    let status = text.rsplit(' ').next().and_then(|w| w.trim().parse().ok()).ok_or_else(|| Error::ProcParse {
        pid,
        path,
        what: "no exit code".into(),
    })?;
    Ok(ProcessRecord {
        pgid: stat.pgrp,
        sid: stat.session,
        comm: stat.comm,
        zombie_status: Some(status),
        exit_signal: Some(stat.exit_signal),
        ..empty_record(pid.0, stat.ppid)
    })
}

/// A record with nothing in it but the two PIDs, for unit tests of planners.
#[cfg(test)]
pub(crate) fn test_record(pid: i32, ppid: i32) -> ProcessRecord {
    empty_record(pid, ppid)
}

/// A process record that holds nothing but its PIDs (cwd and root "/").
fn empty_record(pid: i32, ppid: i32) -> ProcessRecord {
    ProcessRecord {
        pid,
        ppid,
        pgid: pid,
        sid: pid,
        comm: String::new(),
        creds: Default::default(),
        cwd: b"/".to_vec(),
        root: b"/".to_vec(),
        umask: 0,
        rlimits: Vec::new(),
        sigactions: Vec::new(),
        shared_pending: Vec::new(),
        mm: MmRecord {
            start_code: 0,
            end_code: 0,
            start_data: 0,
            end_data: 0,
            start_brk: 0,
            brk: 0,
            start_stack: 0,
            arg_start: 0,
            arg_end: 0,
            env_start: 0,
            env_end: 0,
            auxv: Vec::new(),
            exe: stasis_image::FileRef { path: Vec::new(), dev: 0, ino: 0, mode: 0, size: 0, mtime_ns: 0 },
            xcomp_perm: 0,
            vmas: Vec::new(),
        },
        fds: Vec::new(),
        threads: Vec::new(),
        no_new_privs: false,
        personality: 0,
        zombie_status: None,
        locks: Vec::new(),
        ctty: None,
        files_with_parent: false,
        fs_with_parent: false,
        vm_with_parent: false,
        sighand_with_parent: false,
        exit_signal: None,
    }
}

/// What the injected calls of one process found (the tracer thread's part).
struct Injected {
    sigactions: Vec<stasis_image::SigAction>,
    brk: u64,
    xcomp_perm: u64,
    threads: Vec<stasis_image::ThreadRecord>,
    shared_pending: Vec<stasis_image::SigInfo>,
    /// Read once frozen.
    proc: Box<(procfs::Stat, procfs::Status)>,
    /// The mappings (smaps), read before the injected calls when the address space is
    /// shared with other processes (whose own injected calls may map a scratch area in it
    /// later); else read once the process's own are over, by its proc_part.
    maps: Option<Vec<procfs::MapEntry>>,
}

/// The part of one live process that needs ptrace (injected calls, registers, queued
/// signals), run by the tracer thread. The scratch area is gone again when it returns.
fn inject_part(
    pid: Pid,
    frozen: &mut Frozen,
    proc: Box<(procfs::Stat, procfs::Status)>,
    code: &std::sync::Mutex<CodeCache>,
    vm_shared: bool,
    facts: Option<&kfacts::Facts>,
) -> Result<Injected> {
    if let Some(done) = facts.and_then(|f| from_facts(pid, frozen, &proc, f, vm_shared)) {
        let (sigactions, brk, xcomp_perm, threads, maps) = done?;
        let shared_pending = signals::dump_pending(pid, pid, true)?;
        return Ok(Injected { sigactions, brk, xcomp_perm, threads, shared_pending, proc, maps });
    }
    let status = &proc.1;
    let nthreads = frozen.threads.len();
    let main = &mut frozen.threads[0];
    // Before any scratch area exists: the program's own layout (without the flags that
    // only smaps has, and which take it far longer, when nothing else can map into it
    // before proc_part reads them).
    let maps = match vm_shared {
        true => mm::read_maps(pid)?,
        false => match mm::read_for_injection(pid, main.regs.rsp)? {
            Some(m) => m,
            None => mm::read_layout(pid)?,
        },
    };
    // SIGCHLD too: its default disposition's flags matter (SA_NOCLDWAIT, SA_NOCLDSTOP).
    let non_default = status.sig_caught | status.sig_ignored | 1 << (libc::SIGCHLD - 1);
    // The chain below: a call per disposition, arch_prctl, and threads::queue's two.
    let chain = signals::queued_actions(non_default) + 3;
    let own_stack = (nthreads == 1 && !vm_shared).then_some(chain);
    let mut p = Parasite::start(pid, main, nthreads, &maps, code, status.sig_caught, own_stack)?;
    // What lands in memory runs as one chain of calls; brk answers in a register only.
    signals::queue_actions(&mut p, non_default)?;
    /// After the dispositions and the clear_child_tid slot (see threads::queue).
    const PERM_AT: u64 = 2312;
    p.write(PERM_AT, &[0xff; 8])?;
    p.queue("arch_prctl(ARCH_GET_XCOMP_PERM)", libc::SYS_arch_prctl, [ARCH_GET_XCOMP_PERM, p.scratch.0 + PERM_AT, 0, 0, 0, 0], false);
    threads::queue(&mut p)?;
    p.flush()?;
    let sigactions = signals::read_actions(&p, non_default)?;
    let xcomp_perm = match p.read_u64(PERM_AT)? {
        u64::MAX => 0, // not known to this kernel
        perm => perm,
    };
    let brk = p.call("brk", libc::SYS_brk, [0, 0, 0, 0, 0, 0])?;
    let mut threads = vec![threads::dump(pid, main, &mut p, Some(&proc.0.comm))?];
    for t in frozen.threads.iter_mut().skip(1) {
        p.use_thread(t)?;
        threads::queue(&mut p)?;
        p.flush()?;
        threads.push(threads::dump(pid, t, &mut p, None)?);
    }
    // The scratch area goes from whichever thread ran last: all share the address space.
    p.finish()?;
    for t in &frozen.threads {
        t.restore_state().map_err(Error::sys(pid, "PTRACE_SETREGSET"))?;
    }
    log::debug!("pid {pid}: parasite done");
    let maps = vm_shared.then_some(maps);
    Ok(Injected { sigactions, brk, xcomp_perm, threads, shared_pending: signals::dump_pending(pid, pid, true)?, proc, maps })
}

/// What [`inject_part`] gets by injected calls, from what BPF read instead (see
/// [`kfacts`]): dispositions, break, XSAVE permissions, threads, and the mappings of a
/// process that shares its address space. None if BPF missed the process or a thread.
#[allow(clippy::type_complexity)]
fn from_facts(
    pid: Pid,
    frozen: &Frozen,
    proc: &(procfs::Stat, procfs::Status),
    facts: &kfacts::Facts,
    vm_shared: bool,
) -> Option<Result<(Vec<stasis_image::SigAction>, u64, u64, Vec<stasis_image::ThreadRecord>, Option<Vec<procfs::MapEntry>>)>> {
    let p = facts.procs.get(&pid.0)?;
    let per_thread: Vec<&kfacts::ThreadFacts> = frozen.threads.iter().map(|t| facts.threads.get(&t.tid.0)).collect::<Option<_>>()?;
    let threads = frozen.threads.iter().zip(per_thread).enumerate().map(|(i, (t, f))| {
        let inside = threads::Inside {
            xstate: threads::xstate(pid, t.tid)?,
            clear_child_tid: f.clear_child_tid,
            altstack: f.altstack(t.regs.rsp),
        };
        threads::record(pid, t, inside, (i == 0).then_some(proc.0.comm.as_str()))
    });
    let threads = match threads.collect::<Result<Vec<_>>>() {
        Ok(t) => t,
        Err(e) => return Some(Err(e)),
    };
    let maps = match vm_shared {
        true => match mm::read_maps_with(pid, facts.vmas.get(&pid.0).map(Vec::as_slice)) {
            Ok(m) => Some(m),
            Err(e) => return Some(Err(e)),
        },
        false => None,
    };
    log::debug!("pid {pid}: read by BPF, no injected calls");
    Some(Ok((p.actions.clone(), p.brk, p.xcomp_perm, threads, maps)))
}

/// What the tree-wide steps of collect_tree need to know of every process.
struct TreeInfo<'a> {
    opts: &'a DumpOptions,
    sids: &'a std::collections::HashMap<Pid, i32>,
    root: Pid,
    objects: std::sync::Mutex<ShmemDump>,
    mapped_files: mm::MappedFiles,
    sharing: &'a vmshare::Sharing,
    /// What BPF read of every traced task, if it could.
    facts: Option<Arc<kfacts::Facts>>,
}

/// The rest of one live process, read from /proc and its descriptors (no ptrace: any
/// thread may run it, once the process's own injected calls are over), put together with
/// the injected part: everything but what it shares with others (descriptions, pipes)
/// and its page data, which the tree-level steps fill in. A process sharing its parent's
/// address space (member `i`) has no memory plan: its parent's holds the mappings.
fn proc_part(
    i: usize,
    pid: Pid,
    pidfd: &std::os::fd::OwnedFd,
    inj: Injected,
    t: &TreeInfo,
) -> Result<(ProcessRecord, files::DumpedFds, Option<mm::MmPlan>)> {
    let (stat, status) = &*inj.proc;
    let known = t.facts.as_ref().and_then(|f| f.procs.get(&pid.0));
    let ts = task::dump(pid, stat, status, &inj.threads[0].comm, known)?;
    // Sessions: a leader, or the session of its parent inside the tree; only the root may
    // belong to an outside session, and then only with --shell-job.
    if pid == t.root {
        task::session_plan(pid, ts.sid, t.opts.shell_job)?;
    } else if ts.sid != pid.0 && t.sids.get(&Pid(ts.ppid)) != Some(&ts.sid) {
        return Err(Error::Unsupported { pid, what: format!("a session (sid {}) other than its parent's", ts.sid) });
    }
    let fds = files::dump(pid, pidfd, t.opts.shell_job, &t.objects)?;
    let mm_plan = match t.sharing.vm_parent[i] {
        Some(_) => None,
        None => {
            let maps = match inj.maps {
                Some(m) => m,
                None => mm::read_maps_with(pid, t.facts.as_ref().and_then(|f| f.vmas.get(&pid.0)).map(Vec::as_slice))?,
            };
            log::debug!("pid {pid}: {} mappings to plan", maps.len());
            Some(mm::plan(pid, &maps, &t.objects, &t.mapped_files)?)
        }
    };
    let auxv = procfs::read_proc_file(&format!("/proc/{pid}/auxv"))
        .map_err(|e| Error::Proc { pid, path: format!("/proc/{pid}/auxv").into(), err: e })?;
    let exe_link = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map_err(|e| Error::Proc { pid, path: format!("/proc/{pid}/exe").into(), err: e })?;
    let exe_md = std::fs::metadata(format!("/proc/{pid}/exe"))
        .map_err(|e| Error::Proc { pid, path: format!("/proc/{pid}/exe").into(), err: e })?;
    use std::os::unix::ffi::OsStrExt;
    let mm = MmRecord {
        start_code: stat.start_code,
        end_code: stat.end_code,
        start_data: stat.start_data,
        end_data: stat.end_data,
        start_brk: stat.start_brk,
        brk: inj.brk,
        start_stack: stat.start_stack,
        arg_start: stat.arg_start,
        arg_end: stat.arg_end,
        env_start: stat.env_start,
        env_end: stat.env_end,
        auxv: procfs::parse_auxv(&auxv),
        exe: mm::file_ref(exe_link.as_os_str().as_bytes(), &exe_md),
        xcomp_perm: inj.xcomp_perm,
        vmas: Vec::new(),
    };
    let process = ProcessRecord {
        pid: pid.0,
        ppid: ts.ppid,
        pgid: ts.pgid,
        sid: ts.sid,
        comm: ts.comm,
        creds: ts.creds,
        cwd: ts.cwd,
        root: ts.root,
        umask: ts.umask,
        rlimits: ts.rlimits,
        sigactions: inj.sigactions,
        shared_pending: inj.shared_pending,
        mm,
        fds: Vec::new(),
        threads: inj.threads,
        no_new_privs: ts.no_new_privs,
        personality: ts.personality,
        zombie_status: None,
        locks: Vec::new(),
        ctty: None,
        files_with_parent: false,
        fs_with_parent: false,
        vm_with_parent: false,
        sighand_with_parent: false,
        exit_signal: Some(stat.exit_signal),
    };
    Ok((process, fds, mm_plan))
}

#[cfg(test)]
mod tests {
    use super::{failure_ranks, merge_sort_by};
    use stasis_sys::Pid;

    #[test]
    fn failures_rank_by_depth_then_pid() {
        // Root 50; children 70 and 60 (frozen in that order); 70's child 55, 60's child
        // 90, listed in the order their parents' answers came; a zombie 65 whose parent
        // is unknown counts as near as the root.
        let members = [(50, Some(1)), (70, Some(50)), (60, Some(50)), (90, Some(60)), (55, Some(70)), (65, None)];
        let members: Vec<(Pid, Option<i32>)> = members.iter().map(|&(p, pp)| (Pid(p), pp)).collect();
        assert_eq!(failure_ranks(&members), [0, 3, 2, 5, 4, 1]);
        assert_eq!(failure_ranks(&[]), Vec::<usize>::new());
    }

    #[test]
    fn merge_sort_is_stable_and_sparing() {
        for n in [0usize, 1, 2, 3, 7, 64, 100, 257] {
            // Pseudo-random keys with many repeats.
            let keys: Vec<u64> = (0..n as u64).map(|i| (i * 2_654_435_761) % 13).collect();
            let mut v: Vec<usize> = (0..n).collect();
            let mut calls = 0;
            merge_sort_by(&mut v, &mut |a, b| {
                calls += 1;
                keys[a].cmp(&keys[b])
            });
            assert!(v.windows(2).all(|w| (keys[w[0]], w[0]) < (keys[w[1]], w[1])), "n={n}: {v:?}");
            let bound = n * (usize::BITS - n.leading_zeros()) as usize;
            assert!(calls <= bound, "n={n}: {calls} comparisons");
        }
    }
}
