//! Per-process settings: identity and session, credentials, cwd and root, umask,
//! resource limits, command name.
//!
//! Restore applies session, cwd, root, umask and comm in the child before it stops (plain
//! system calls on itself), and limits and credentials by injection at the very end:
//! limits last because a lowered RLIMIT_AS or RLIMIT_NOFILE could stop the restorer's own
//! work, credentials last because dropping them would stop prctl(PR_SET_MM_MAP).

use crate::error::{Error, Result};
use crate::freeze::read_status;
use crate::inject::Batch;
use crate::mm::ChildMem;
use crate::procfs;
use stasis_image::{Creds, Rlimit};
use stasis_sys::Pid;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The parts of a process record this module owns.
pub struct TaskState {
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub comm: String,
    pub creds: Creds,
    pub cwd: Vec<u8>,
    pub root: Vec<u8>,
    pub umask: u32,
    pub rlimits: Vec<Rlimit>,
    pub no_new_privs: bool,
    pub personality: u32,
}

fn link(pid: Pid, name: &str) -> Result<Vec<u8>> {
    let path = format!("/proc/{pid}/{name}");
    std::fs::read_link(&path)
        .map(|p| p.as_os_str().as_bytes().to_vec())
        .map_err(|e| Error::Proc { pid, path: path.into(), err: e })
}

/// `stat` and `status` were read with the process frozen; `comm` is its main thread's.
/// `known`: its personality and resource limits if BPF read them (see [`crate::kfacts`]),
/// else they come from /proc.
pub fn dump(
    pid: Pid,
    stat: &procfs::Stat,
    status: &procfs::Status,
    comm: &str,
    known: Option<&crate::kfacts::ProcFacts>,
) -> Result<TaskState> {
    if status.seccomp != 0 {
        return Err(Error::Unsupported { pid, what: format!("seccomp mode {}", status.seccomp) });
    }
    let (personality, limits) = match known {
        Some(k) => (k.personality, k.limits.clone()),
        None => {
            let (path, text) = procfs::read_text(pid, "personality")?;
            let personality =
                u32::from_str_radix(text.trim(), 16).map_err(|_| Error::ProcParse { pid, path, what: text.clone() })?;
            let (path, text) = procfs::read_text(pid, "limits")?;
            (personality, procfs::parse_limits(&text).map_err(|what| Error::ProcParse { pid, path, what })?)
        }
    };
    Ok(TaskState {
        ppid: stat.ppid,
        pgid: stat.pgrp,
        sid: stat.session,
        comm: comm.to_string(),
        creds: Creds { uids: status.uids, gids: status.gids, groups: status.groups.clone() },
        cwd: link(pid, "cwd")?,
        root: link(pid, "root")?,
        umask: status.umask,
        rlimits: limits.into_iter().map(|(resource, soft, hard)| Rlimit { resource, soft, hard }).collect(),
        no_new_privs: status.no_new_privs,
        personality,
    })
}

/// How the restored process joins a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionPlan {
    /// It led its own session: setsid().
    Leader,
    /// --shell-job: stay in the restorer's session and foreground process group.
    Inherit,
}

/// Decided at dump time already (so that an image is never written that cannot restore):
/// a process whose session leader is outside the image needs --shell-job.
pub fn session_plan(pid: Pid, sid: i32, shell_job: bool) -> Result<SessionPlan> {
    if sid == pid.0 {
        Ok(SessionPlan::Leader)
    } else if shell_job {
        Ok(SessionPlan::Inherit)
    } else {
        Err(Error::Unsupported {
            pid,
            what: format!("a session (sid {sid}) whose leader is outside the dumped tree (dump with --shell-job to restore it into the restorer's session)"),
        })
    }
}

/// In the restore child, before it stops.
/// `fs`: cwd, root and umask, unless the process shares them with its parent (CLONE_FS),
/// which sets them for both.
pub fn restore_in_child(plan: SessionPlan, fs: Option<(&[u8], &[u8], u32)>, comm: &str) -> std::result::Result<(), String> {
    use std::ffi::OsStr;
    if plan == SessionPlan::Leader {
        stasis_sys::proc::setsid().map_err(|e| format!("setsid: {e}"))?;
    }
    if let Some((cwd, root, umask)) = fs {
        let cwd = Path::new(OsStr::from_bytes(cwd));
        std::env::set_current_dir(cwd).map_err(|e| format!("chdir {}: {e}", cwd.display()))?;
        if root != b"/" {
            let root = Path::new(OsStr::from_bytes(root));
            stasis_sys::proc::chroot(root).map_err(|e| format!("chroot {}: {e}", root.display()))?;
        }
        stasis_sys::proc::umask(umask);
    }
    stasis_sys::proc::set_comm(comm.as_bytes()).map_err(|e| format!("PR_SET_NAME: {e}"))?;
    Ok(())
}

pub const RLIMIT_NAMES: [&str; 16] = [
    "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE", "RLIMIT_RSS",
    "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_AS", "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_RTPRIO", "RLIMIT_RTTIME",
];

/// The restorer's own resource limits, (resource, soft, hard), read once: every process
/// of a tree is checked against them, and every restore child inherits them.
pub fn own_limits() -> &'static [(u32, u64, u64)] {
    static OWN: std::sync::OnceLock<Vec<(u32, u64, u64)>> = std::sync::OnceLock::new();
    OWN.get_or_init(|| {
        (0..RLIMIT_NAMES.len() as u32)
            .filter_map(|r| stasis_sys::proc::own_rlimit(r).ok().map(|(soft, hard)| (r, soft, hard)))
            .collect()
    })
}

/// Checks before anything is created that every saved limit can be set here: raising a
/// hard limit above ours needs CAP_SYS_RESOURCE.
pub fn check_rlimits(pid: Pid, limits: &[Rlimit], have_sys_resource: bool) -> Result<()> {
    if have_sys_resource {
        return Ok(());
    }
    for l in limits {
        let hard = match own_limits().iter().find(|o| o.0 == l.resource) {
            Some(&(_, _, h)) => h,
            None => stasis_sys::proc::own_rlimit(l.resource).map_err(Error::sys(pid, "prlimit"))?.1,
        };
        if l.hard > hard {
            return Err(Error::Restore {
                pid,
                what: format!(
                    "{} hard limit {} is above this restorer's {} and raising it needs CAP_SYS_RESOURCE",
                    RLIMIT_NAMES.get(l.resource as usize).unwrap_or(&"RLIMIT_?"), l.hard, hard
                ),
            });
        }
    }
    Ok(())
}

/// Injected last of all, in every thread (credentials belong to threads; libc makes the
/// set*id calls of one thread apply to all): groups, gids, uids (in that order: after
/// setresuid a non-root thread could no longer change its groups).
///
/// Every thread that gets here still has the credentials it was created with, the
/// restorer's (read once).
pub fn restore_creds(calls: &mut Batch, mem: &ChildMem, at: u64, c: &Creds) -> Result<()> {
    static OWN: std::sync::OnceLock<crate::procfs::Status> = std::sync::OnceLock::new();
    let cur = match OWN.get() {
        Some(st) => st,
        None => {
            let st = read_status(stasis_sys::proc::getpid())?;
            OWN.get_or_init(|| st)
        }
    };
    if cur.uids == c.uids && cur.gids == c.gids && cur.groups == c.groups {
        return Ok(());
    }
    let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_le_bytes()).collect();
    mem.write(at, &groups)?;
    calls.push("setgroups", libc::SYS_setgroups, [c.groups.len() as u64, at, 0, 0, 0, 0]);
    calls.push("setresgid", libc::SYS_setresgid, [c.gids[0] as u64, c.gids[1] as u64, c.gids[2] as u64, 0, 0, 0]);
    calls.push("setfsgid", libc::SYS_setfsgid, [c.gids[3] as u64, 0, 0, 0, 0, 0]);
    calls.push("setresuid", libc::SYS_setresuid, [c.uids[0] as u64, c.uids[1] as u64, c.uids[2] as u64, 0, 0, 0]);
    calls.push("setfsuid", libc::SYS_setfsuid, [c.uids[3] as u64, 0, 0, 0, 0, 0]);
    Ok(())
}
