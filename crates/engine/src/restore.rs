//! The restore pipeline.
//!
//! 1. Read the image and check everything before any process exists: checksums of every
//!    byte, host compatibility, the files it needs, limits we can set, the PID is free.
//! 2. Fork a child with the saved PID (clone3 set_tid). In ordinary code it sets what a
//!    process sets on itself: signal dispositions (all signals blocked), descriptors,
//!    session, cwd, root, umask, name; it maps a helper page holding a `syscall`
//!    instruction at an address the saved layout leaves free, asks to be traced and stops.
//! 3. The restorer, its tracer, injects the rest through that instruction: rseq off, the
//!    address space replaced (mm::MmRestore), mm fields (PR_SET_MM_MAP), per-thread kernel
//!    addresses, limits, pending signals, credentials; the last injected call unmaps the
//!    helper page, and at its exit stop the saved registers and signal mask go in.
//! 4. Detach: the process runs on from where it was dumped.
//!
//! Until the detach the child is killed with the restorer (PDEATHSIG, then
//! PTRACE_O_EXITKILL), and every error kills and reaps it: a failed restore leaves nothing.

use crate::error::{Error, Result};
use crate::freeze::{read_stat, read_status};
use crate::inject::Injector;
use crate::mm::{self, ChildMem, MapFds, MmRestore, HELPER_DATA, HELPER_LEN};
use crate::task::SessionPlan;
use crate::{files, host, signals, task, threads};
use stasis_image::{FdKind, ImageReader, MmRecord, ProcessRecord};
use stasis_sys::proc::{self as sp, Forked};
use stasis_sys::ptrace::{self, WaitStatus};
use stasis_sys::Pid;
use std::io::Read;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub dir: PathBuf,
    /// Attach terminals to the restorer's terminal and join its session.
    pub shell_job: bool,
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
}

/// A restored process, running, and a child of the calling process.
#[derive(Clone, Debug)]
pub struct Restored {
    pub pid: Pid,
    pub stats: RestoreStats,
}

const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
const XFEATURE_XTILEDATA: u64 = 18;
const CAP_SYS_RESOURCE: u64 = 24;

/// Descriptor numbers the restore child uses for the restorer's needs.
struct FdPlan {
    image: i32,
    exe: i32,
    maps: MapFds,
    /// The child parks its own descriptors (error pipe, terminal, image) at or above this.
    park: i32,
}

impl FdPlan {
    fn new(p: &ProcessRecord) -> FdPlan {
        let base = p.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2) + 1;
        let maps = MapFds::plan(&p.mm.vmas, base + 2);
        let park = base + 2 + maps.files.len() as i32 + 1;
        FdPlan { image: base, exe: base + 1, maps, park }
    }
}

/// Everything the child needs, computed before the fork.
struct Plan<'a> {
    rec: &'a ProcessRecord,
    session: SessionPlan,
    fds: FdPlan,
    helper: u64,
    terminal: Option<i32>,
    image_fd: i32,
    restorer: Pid,
}

fn check_pid_free(pid: Pid) -> Result<()> {
    match read_stat(pid) {
        Ok(st) if st.state == 'Z' => Err(Error::PidZombie { pid, parent: st.ppid }),
        Ok(st) => Err(Error::PidTaken { pid, comm: st.comm }),
        Err(Error::NoSuchProcess(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

fn restorer_terminal() -> Option<i32> {
    (0..3).find(|&fd| sp::isatty(fd))
}

pub fn restore(opts: &RestoreOptions) -> Result<Restored> {
    let t0 = Instant::now();
    let reader = ImageReader::open(&opts.dir)?;
    let img = &reader.image;
    let here = host::current()?;
    host::check_compatible(&img.host, &here)?;
    log::debug!("image metadata read and checked");
    let pages = reader.map_pages()?;
    reader.verify_pages(&pages, 2)?;
    log::debug!("page data checksums verified");
    let [rec] = img.processes.as_slice() else {
        return Err(Error::Incompatible(format!("{} processes in the image; this stasis restores one", img.processes.len())));
    };
    let pid = Pid(rec.pid);
    if rec.threads.first().map(|t| t.tid) != Some(rec.pid) {
        return Err(Error::Restore { pid, what: "the image has no main thread record".into() });
    }
    if img.shell_job && !opts.shell_job {
        return Err(Error::Restore { pid, what: "the image was dumped with --shell-job; restore it with --shell-job".into() });
    }
    let session = if rec.sid == rec.pid { SessionPlan::Leader } else { task::session_plan(pid, rec.sid, opts.shell_job)? };
    let terminal = restorer_terminal();
    if terminal.is_none() {
        if let Some(f) = rec.fds.iter().find(|f| matches!(f.kind, FdKind::Terminal { .. })) {
            return Err(Error::Restore { pid, what: format!("fd {} is a terminal but the restorer has none on fd 0-2", f.fd) });
        }
    }
    mm::check_files(pid, &rec.mm.vmas)?;
    files::check(pid, &rec.fds)?;
    let caps = read_status(sp::getpid())?.cap_eff;
    task::check_rlimits(pid, &rec.rlimits, caps & (1 << CAP_SYS_RESOURCE) != 0)?;
    let own_maps = mm::read_maps(sp::getpid())?;
    let own_busy: Vec<(u64, u64)> = own_maps.iter().map(|m| (m.start, m.end)).collect();
    let helper = mm::find_free(&[&own_busy, &mm::busy_ranges(&rec.mm.vmas)], HELPER_LEN)
        .ok_or_else(|| Error::Restore { pid, what: "no free address range for the helper page".into() })?;
    for t in &rec.threads {
        check_pid_free(Pid(t.tid))?;
    }
    let validate = t0.elapsed();

    let plan = Plan {
        rec,
        session,
        fds: FdPlan::new(rec),
        helper,
        terminal,
        image_fd: reader.file.as_raw_fd(),
        restorer: sp::getpid(),
    };
    let (mut err_rd, err_wr) = std::io::pipe().map_err(|e| Error::Io { op: "create", path: "pipe".into(), err: e })?;
    let child = match sp::fork_with_pid(Some(pid)) {
        Err(e) if e.0 == libc::EEXIST => {
            check_pid_free(pid)?;
            return Err(Error::PidTaken { pid, comm: "unknown".into() });
        }
        Err(e) if e.0 == libc::EBUSY => {
            return Err(Error::Restore { pid, what: "the restorer must be single-threaded to fork the restored process".into() })
        }
        Err(e) => return Err(Error::Sys { pid, op: "clone3 with set_tid", errno: e }),
        Ok(Forked::Child) => {
            drop(err_rd);
            // child_main moves the pipe's write end; it reports where it is now.
            let mut err_fd = err_wr.as_raw_fd();
            let msg = match child_main(&plan, &mut err_fd) {
                Err(m) => m,
                Ok(()) => "resumed unexpectedly".to_string(),
            };
            sp::write_all_raw(err_fd, msg.as_bytes());
            sp::exit_now(1);
        }
        Ok(Forked::Parent(c)) => c,
    };
    drop(err_wr);
    let guard = ChildGuard { pid: child, armed: true };
    match ptrace::waitpid(child, libc::__WALL).map_err(Error::sys(pid, "waitpid"))? {
        WaitStatus::Stopped(_, libc::SIGSTOP, _) => {}
        other => {
            let mut msg = String::new();
            let _ = err_rd.read_to_string(&mut msg);
            return Err(Error::Restore {
                pid,
                what: if msg.is_empty() { format!("the restore child ended early: {other:?}") } else { msg },
            });
        }
    }
    drop(err_rd);
    ptrace::set_options(child, ptrace::PTRACE_O_TRACESYSGOOD | ptrace::PTRACE_O_EXITKILL | ptrace::PTRACE_O_TRACECLONE)
        .map_err(Error::sys(pid, "PTRACE_SETOPTIONS"))?;
    log::debug!("restore child {child} stopped, ready for injection");
    let mut extra: Vec<Pid> = Vec::new();
    let memory_bytes = drive_child(&plan, pages.as_slice(), &mut extra)?;
    for t in extra {
        ptrace::detach(t, 0).map_err(Error::sys(pid, "PTRACE_DETACH"))?;
    }
    guard.release()?;
    Ok(Restored { pid: child, stats: RestoreStats { total: t0.elapsed(), validate, memory_bytes } })
}

/// Kills and reaps the restore child unless released.
struct ChildGuard {
    pid: Pid,
    armed: bool,
}

impl ChildGuard {
    fn release(mut self) -> Result<()> {
        self.armed = false;
        ptrace::detach(self.pid, 0).map_err(Error::sys(self.pid, "PTRACE_DETACH"))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = sp::kill(self.pid, libc::SIGKILL);
            // The leader's exit is reported only after every thread is gone, and we, their
            // tracer, must collect the exit of each traced thread first.
            loop {
                match ptrace::waitpid(Pid(-1), libc::__WALL) {
                    Ok(WaitStatus::Exited(p, _) | WaitStatus::Signaled(p, _)) if p == self.pid => break,
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
    }
}

/// The child's part: runs in the forked copy of the restorer, returns only on error.
fn child_main(plan: &Plan, err_fd: &mut i32) -> std::result::Result<(), String> {
    sp::set_pdeathsig(libc::SIGKILL).map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
    if sp::getppid() != plan.restorer {
        return Err("the restorer exited".into());
    }
    let rec = plan.rec;
    signals::restore_actions_in_child(&rec.sigactions)?;

    // Park our own descriptors above every number the plan uses, drop all others, then
    // open the saved ones at their numbers.
    let park = |fd: i32| sp::dup_at_least(fd, plan.fds.park).map_err(|e| format!("dup: {e}"));
    let err_hi = park(*err_fd)?;
    *err_fd = err_hi;
    let image_hi = park(plan.image_fd)?;
    let term_hi = plan.terminal.map(park).transpose()?;
    let _ = sp::close_range(0, plan.fds.park as u32 - 1);
    files::restore_in_child(&rec.fds, term_hi)?;
    let place = |fd: OwnedFd, at: i32| -> std::result::Result<(), String> {
        let raw = fd.into_raw_fd();
        if raw == at {
            return Ok(()); // opened right at its place (already close-on-exec)
        }
        sp::dup3(raw, at, libc::O_CLOEXEC).map_err(|e| format!("dup3 to {at}: {e}"))?;
        sp::close_range(raw as u32, raw as u32).map_err(|e| format!("close: {e}"))
    };
    sp::dup3(image_hi, plan.fds.image, libc::O_CLOEXEC).map_err(|e| format!("dup3 image: {e}"))?;
    let exe_path = std::ffi::OsStr::from_bytes(&rec.mm.exe.path);
    let exe = sp::open(exe_path.as_ref(), libc::O_RDONLY | libc::O_CLOEXEC, 0)
        .map_err(|e| format!("open exe {}: {e}", rec.mm.exe.display()))?;
    place(exe, plan.fds.exe)?;
    for (f, at, rw) in &plan.fds.maps.files {
        let mode = if *rw { libc::O_RDWR } else { libc::O_RDONLY };
        let fd = sp::open(std::ffi::OsStr::from_bytes(&f.path).as_ref(), mode | libc::O_CLOEXEC, 0)
            .map_err(|e| format!("open mapped file {}: {e}", f.display()))?;
        place(fd, *at)?;
    }
    for fd in [Some(image_hi), term_hi].into_iter().flatten() {
        let _ = sp::close_range(fd as u32, fd as u32);
    }

    task::restore_in_child(plan.session, &rec.cwd, &rec.root, rec.umask, &rec.comm)?;
    // syscall; then int3 so that a stray resume traps instead of running on.
    stasis_sys::mem::map_helper_region(plan.helper, HELPER_LEN as usize, &[0x0f, 0x05, 0xcc, 0xcc])
        .map_err(|e| format!("map helper page at {:#x}: {e}", plan.helper))?;
    ptrace::traceme().map_err(|e| format!("PTRACE_TRACEME: {e}"))?;
    // From here errors can no longer be reported through the pipe.
    let _ = sp::close_range(err_hi as u32, err_hi as u32);
    let me = sp::getpid();
    sp::kill(me, libc::SIGSTOP).map_err(|e| format!("SIGSTOP: {e}"))?;
    Ok(())
}

/// The restorer's part, with the child stopped at its SIGSTOP. Returns page bytes loaded.
fn drive_child(plan: &Plan, pages: &[u8], extra: &mut Vec<Pid>) -> Result<u64> {
    let rec = plan.rec;
    let pid = Pid(rec.pid);
    let regs = ptrace::get_regs(pid).map_err(Error::sys(pid, "PTRACE_GETREGSET"))?;
    let mut inj = Injector::new(pid, pid, plan.helper, regs);
    let mem = ChildMem::open(pid)?;
    let data = plan.helper + HELPER_DATA;
    threads::unregister_inherited_rseq(&mut inj)?;
    let child_maps = mm::read_maps(pid)?;
    let loaded = MmRestore { inj: &mut inj, mem: &mem, helper: plan.helper, pages }
        .rebuild(&child_maps, &rec.mm.vmas, &plan.fds.maps)?;
    log::debug!("address space rebuilt, {loaded} bytes loaded");
    // The child's exe link is the restorer's binary; when that is already the saved exe the
    // kernel must not be asked to change it (it refuses while the file is mapped).
    let exe_fd = if same_file_as_own_exe(&rec.mm.exe) { -1 } else { plan.fds.exe };
    set_mm_fields(&mut inj, &mem, data, &rec.mm, exe_fd)?;
    if rec.mm.xcomp_perm & (1 << XFEATURE_XTILEDATA) != 0 {
        inj.call("arch_prctl(ARCH_REQ_XCOMP_PERM)", libc::SYS_arch_prctl, [ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, 0, 0, 0, 0])?;
    }
    // The restorer's descriptors in the child: image, exe, mapped files.
    inj.call("close_range", libc::SYS_close_range, [plan.fds.image as u64, u32::MAX as u64, 0, 0, 0, 0])?;
    log::debug!("mm fields set, helper descriptors closed");
    task::restore_rlimits(&mut inj, &mem, data, &rec.rlimits)?;
    inj.call("prctl(PR_SET_PDEATHSIG)", libc::SYS_prctl, [libc::PR_SET_PDEATHSIG as u64, 0, 0, 0, 0, 0])?;
    // The other threads, each finished and left stopped with its registers in place.
    for t in &rec.threads[1..] {
        let tid = threads::clone_thread(&mut inj, &mem, data, t)?;
        log::debug!("thread {tid} created");
        extra.push(tid);
        let regs = ptrace::get_regs(tid).map_err(Error::sys(pid, "PTRACE_GETREGSET"))?;
        let mut tinj = Injector::new(pid, tid, plan.helper, regs);
        finish_thread(&mut tinj, &mem, data, rec, t)?;
        threads::restore_regs(pid, tid, t)?;
        log::debug!("thread {tid} ready");
    }
    let thread = &rec.threads[0];
    signals::restore_pending(&mut inj, &mem, data, pid, None, &rec.shared_pending)?;
    finish_thread(&mut inj, &mem, data, rec, thread)?;
    inj.call("munmap(helper)", libc::SYS_munmap, [plan.helper, HELPER_LEN, 0, 0, 0, 0])?;
    threads::restore_regs(pid, pid, thread)?;
    Ok(loaded)
}

fn same_file_as_own_exe(f: &stasis_image::FileRef) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/exe").map(|m| m.dev() == f.dev && m.ino() == f.ino).unwrap_or(false)
}

/// What every thread sets for itself once the address space exists: kernel-held
/// addresses, its pending signals, no_new_privs, credentials.
fn finish_thread(inj: &mut Injector, mem: &ChildMem, data: u64, rec: &ProcessRecord, t: &stasis_image::ThreadRecord) -> Result<()> {
    let pid = Pid(rec.pid);
    threads::restore_kernel_addrs(inj, mem, data, t)?;
    signals::restore_pending(inj, mem, data, pid, Some(Pid(t.tid)), &t.pending)?;
    task::restore_flags(inj, rec.personality, rec.no_new_privs)?;
    task::restore_creds(inj, mem, data, &rec.creds)
}

/// prctl(PR_SET_MM, PR_SET_MM_MAP): code/data/brk/stack/args/env boundaries, auxv and the
/// exe link, in one call that needs no CAP_SYS_RESOURCE.
fn set_mm_fields(inj: &mut Injector, mem: &ChildMem, at: u64, m: &MmRecord, exe_fd: i32) -> Result<()> {
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
    inj.call("prctl(PR_SET_MM_MAP)", libc::SYS_prctl, [PR_SET_MM, PR_SET_MM_MAP, at, b.len() as u64, 0, 0])
        .map(drop)
}
