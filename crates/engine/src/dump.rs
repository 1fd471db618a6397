//! The dump pipeline, top to bottom: check the target, freeze it, collect every kind of
//! state while page data streams into the image, write the metadata and rename the image
//! into place, then release (kill, or let it run on).
//!
//! Every error path drops the freeze guard, which puts registers and signal mask back and
//! detaches: the target runs on as if nothing happened. The image writer removes its
//! temporary file unless the image was completed.

use crate::error::{Error, Result};
use crate::freeze::{read_stat, read_status, Frozen};
use crate::parasite::Parasite;
use crate::procfs::{self, PF_KTHREAD};
use crate::{files, host, mm, signals, task, threads};
use stasis_image::{Image, ImageWriter, MmRecord, ProcessRecord};
use stasis_sys::Pid;
use std::path::PathBuf;
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

pub fn dump(opts: &DumpOptions) -> Result<DumpStats> {
    let t0 = Instant::now();
    let pid = Pid(opts.pid);
    precheck(pid)?;
    let host = host::current()?;
    let pidfd = stasis_sys::proc::pidfd_open(pid).map_err(|e| match e.0 {
        libc::ESRCH => Error::NoSuchProcess(pid),
        _ => Error::Sys { pid, op: "pidfd_open", errno: e },
    })?;
    let mut writer = ImageWriter::create(&opts.dir)?;
    let frozen_at = Instant::now();
    let mut frozen = Frozen::freeze(pid)?;
    log::debug!("pid {pid}: frozen {} thread(s)", frozen.threads.len());
    let mut image = collect(pid, &pidfd, &mut frozen, &mut writer, opts, host)?;
    let memory_bytes = writer.pages_len();
    let nthreads = frozen.threads.len();
    log::debug!("pid {pid}: state collected, {memory_bytes} bytes of pages written");
    // A process that runs on needs no durable image to be safe: release it before the
    // metadata, fsync and rename. One that will be killed must wait until the image is
    // complete on disk, or a failed write would lose it.
    let frozen_for;
    let image_bytes = if opts.leave_running {
        frozen.release()?;
        frozen_for = frozen_at.elapsed();
        writer.finish(&mut image)?
    } else {
        let n = writer.finish(&mut image)?;
        frozen.kill()?;
        frozen_for = frozen_at.elapsed();
        n
    };
    log::debug!("pid {pid}: image complete");
    Ok(DumpStats {
        total: t0.elapsed(),
        frozen: frozen_for,
        image_bytes,
        memory_bytes,
        processes: 1,
        threads: nthreads,
    })
}

fn collect(
    pid: Pid,
    pidfd: &std::os::fd::OwnedFd,
    frozen: &mut Frozen,
    writer: &mut ImageWriter,
    opts: &DumpOptions,
    host: stasis_image::HostInfo,
) -> Result<Image> {
    let children = procfs::read_text(pid, &format!("task/{pid}/children"))?.1;
    if !children.trim().is_empty() {
        return Err(Error::Unsupported { pid, what: format!("child processes (pids {})", children.trim()) });
    }
    let ts = task::dump(pid)?;
    task::session_plan(pid, ts.sid, opts.shell_job)?;
    let fds = files::dump(pid, pidfd, opts.shell_job)?;

    // Everything that needs injected calls, then the scratch page is gone again before
    // the memory layout is read.
    let status = read_status(pid)?;
    let main = &mut frozen.threads[0];
    let mut p = Parasite::start(pid, main)?;
    let sigactions = signals::dump_actions(&mut p, status.sig_caught | status.sig_ignored)?;
    let brk = p.inj.call("brk", libc::SYS_brk, [0, 0, 0, 0, 0, 0])?;
    const PERM_AT: u64 = 12288;
    let xcomp_perm = match p.inj.raw(libc::SYS_arch_prctl, [ARCH_GET_XCOMP_PERM, p.scratch.0 + PERM_AT, 0, 0, 0, 0])? {
        0 => p.read_u64(PERM_AT)?,
        _ => 0,
    };
    let mut thread_recs = vec![threads::dump(pid, main, &mut p)?];
    for t in frozen.threads.iter_mut().skip(1) {
        p.use_thread(t)?;
        thread_recs.push(threads::dump(pid, t, &mut p)?);
    }
    p.use_thread(&mut frozen.threads[0])?;
    p.finish()?;
    for t in &frozen.threads {
        t.restore_state().map_err(Error::sys(pid, "PTRACE_SETREGSET"))?;
    }

    log::debug!("pid {pid}: parasite done");
    let maps = mm::read_maps(pid)?;
    let vmas = mm::dump(pid, &maps, writer)?;
    let stat = read_stat(pid)?;
    let auxv = std::fs::read(format!("/proc/{pid}/auxv"))
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
        brk,
        start_stack: stat.start_stack,
        arg_start: stat.arg_start,
        arg_end: stat.arg_end,
        env_start: stat.env_start,
        env_end: stat.env_end,
        auxv: procfs::parse_auxv(&auxv),
        exe: mm::file_ref(exe_link.as_os_str().as_bytes(), &exe_md),
        xcomp_perm,
        vmas,
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
        sigactions,
        shared_pending: signals::dump_pending(pid, pid, true)?,
        mm,
        fds,
        threads: thread_recs,
        no_new_privs: ts.no_new_privs,
        personality: ts.personality,
    };
    Ok(Image {
        stasis_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        host,
        root_pid: pid.0,
        shell_job: opts.shell_job,
        processes: vec![process],
        page_block_size: 0,
        page_block_hashes: Vec::new(),
    })
}
