//! PID namespaces.
//!
//! Dump: a tree that lives in a PID namespace of its own (a container, or a tree restored
//! with `--pidns`) knows itself by the PIDs of that namespace, not by the ones /proc shows
//! us. The image keeps the tree's own PIDs (the last NSpid/NSpgid/NSsid column) and says
//! that the tree needs a namespace of its own; every process must sit in the root's
//! namespace (a namespace nested inside the tree is refused).
//!
//! Restore with `--pidns`: the restorer unshares CLONE_NEWPID, so its next child is PID 1
//! of a fresh namespace. Unless the image's root is PID 1 itself, that child is a small
//! init ("stasis-init", a fork of the restorer) that mounts the namespace's own /proc in
//! a private mount namespace, forks the root with its PID, waits for the restorer's word
//! and then reaps orphans until its last child is gone, leaving with the root's status.
//! Every restored task keeps its saved PID inside; from outside it has another one, which
//! the restorer finds through NSpid (`PidMap`).

use crate::error::{Error, Result};
use crate::freeze::read_status;
use crate::procfs;
use stasis_image::ProcessRecord;
use stasis_sys::proc as sp;
use stasis_sys::Pid;
use std::collections::HashMap;

/// The PIDs of a dumped tree as the tree itself sees them. `None` when the tree lives in
/// our own namespace (nothing to translate).
pub struct TreeView {
    /// Our PID → the tree's PID, for every process and thread.
    map: HashMap<i32, i32>,
    /// Our PID of each process → its process group and session in the tree's namespace.
    groups: HashMap<i32, (i32, i32)>,
    depth: usize,
}

impl TreeView {
    /// Reads NSpid of every process (and, when the tree has a namespace of its own, of
    /// every thread). `procs` are the tree's processes, root first, as we see them.
    /// `statuses`: each process's status as read with the tree frozen, if it was.
    pub fn read(procs: &[(Pid, Vec<Pid>)], statuses: &[Option<&procfs::Status>]) -> Result<Option<TreeView>> {
        let root = procs[0].0;
        let mut depth = 0;
        let mut map = HashMap::new();
        let mut groups = HashMap::new();
        for ((pid, threads), known) in procs.iter().zip(statuses.iter().chain(std::iter::repeat(&None))) {
            let read;
            let st = match known {
                Some(st) => *st,
                None => {
                    read = read_status(*pid)?;
                    &read
                }
            };
            if *pid == root {
                depth = st.nspid.len();
            }
            if st.nspid.len() != depth {
                return Err(Error::Unsupported {
                    pid: *pid,
                    what: format!(
                        "a PID namespace other than its tree's root {root} (it is {} levels deep, the root {depth})",
                        st.nspid.len()
                    ),
                });
            }
            if depth <= 1 {
                continue;
            }
            map.insert(pid.0, innermost(*pid, &st.nspid)?);
            groups.insert(pid.0, (innermost(*pid, &st.nspgid)?, innermost(*pid, &st.nssid)?));
            for t in threads.iter().filter(|t| *t != pid) {
                let (path, text) = procfs::read_text(*pid, &format!("task/{t}/status"))?;
                let ts = procfs::parse_status(&text).map_err(|what| Error::ProcParse { pid: *pid, path, what })?;
                map.insert(t.0, innermost(*pid, &ts.nspid)?);
            }
        }
        Ok((depth > 1).then_some(TreeView { map, groups, depth }))
    }

    /// Rewrites every PID of the records into the tree's own numbering.
    pub fn translate(&self, recs: &mut [ProcessRecord]) -> Result<()> {
        for r in recs.iter_mut() {
            let ours = Pid(r.pid);
            (r.pgid, r.sid) = self.groups.get(&r.pid).copied().ok_or_else(|| Error::Unsupported {
                pid: ours,
                what: "a process that appeared after the tree was read".into(),
            })?;
            // The root's parent may be outside the tree: its PID in the tree's namespace,
            // or 0 when it is not in it (the root is then the namespace's init).
            r.ppid = match self.map.get(&r.ppid) {
                Some(p) => *p,
                None => match read_status(Pid(r.ppid)) {
                    Ok(pst) if pst.nspid.len() == self.depth => innermost(ours, &pst.nspid)?,
                    _ => 0,
                },
            };
            if let Some(c) = r.ctty.as_mut() {
                c.fg_pgrp = self.map.get(&c.fg_pgrp).copied().unwrap_or(c.fg_pgrp);
            }
            for t in r.threads.iter_mut() {
                t.tid = self.inner(ours, t.tid)?;
            }
            r.pid = self.inner(ours, r.pid)?;
        }
        Ok(())
    }

    pub fn inner(&self, pid: Pid, ours: i32) -> Result<i32> {
        self.map.get(&ours).copied().ok_or_else(|| Error::Unsupported {
            pid,
            what: format!("task {ours}, which has no PID in the tree's namespace"),
        })
    }
}

fn innermost(pid: Pid, col: &[i32]) -> Result<i32> {
    col.last().copied().ok_or_else(|| Error::ProcParse {
        pid,
        path: format!("/proc/{pid}/status"),
        what: "no NSpid/NSpgid/NSsid line".into(),
    })
}

/// Saved (inner) PID → PID as the restorer sees it.
#[derive(Default)]
pub struct PidMap {
    /// `None`: no namespace of its own, the numbers are the same.
    map: Option<HashMap<i32, Pid>>,
}

impl PidMap {
    pub fn outer(&self, inner: i32) -> Pid {
        match &self.map {
            None => Pid(inner),
            Some(m) => m.get(&inner).copied().unwrap_or(Pid(inner)),
        }
    }

    /// Walks the process tree from `first` (the namespace's PID 1, as we see it) and reads
    /// each process's innermost PID.
    pub fn walk(first: Pid) -> Result<PidMap> {
        let mut map = HashMap::new();
        let mut todo = vec![first];
        while let Some(p) = todo.pop() {
            let st = read_status(p)?;
            map.insert(innermost(p, &st.nspid)?, p);
            let dir = format!("/proc/{p}/task");
            let rd = std::fs::read_dir(&dir).map_err(|e| Error::Proc { pid: p, path: dir.clone().into(), err: e })?;
            for t in rd.flatten() {
                let tid = t.file_name().to_string_lossy().into_owned();
                let text = procfs::read_text(p, &format!("task/{tid}/children"))?.1;
                todo.extend(text.split_whitespace().filter_map(|c| c.parse().ok()).map(Pid));
            }
        }
        Ok(PidMap { map: Some(map) })
    }
}

/// In the first process of a fresh PID namespace: a private mount namespace with the PID
/// namespace's own /proc, so that /proc/self and /proc/PID agree with getpid() inside.
pub fn mount_own_proc() -> std::result::Result<(), String> {
    sp::unshare(libc::CLONE_NEWNS).map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
    let flags = libc::MS_REC | libc::MS_PRIVATE;
    sp::mount(None, "/".as_ref(), None, flags).map_err(|e| format!("make / private: {e}"))?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    sp::mount(Some("proc".as_ref()), "/proc".as_ref(), Some("proc"), flags).map_err(|e| format!("mount /proc: {e}"))
}

/// The namespace's init after the root is forked: keeps only `ctl`, waits for the
/// restorer's go (a byte; end of file means the restore failed, and leaving kills the
/// namespace), then reaps every child until none is left and exits with the root's
/// status (128 + signal for a root killed by a signal, as a shell reports it).
pub fn init_loop(ctl: i32, root: Pid) -> ! {
    let _ = sp::close_range(0, (ctl - 1) as u32);
    let _ = sp::close_range((ctl + 1) as u32, u32::MAX);
    let mut b = [0u8; 1];
    if !matches!(sp::read_raw(ctl, &mut b), Ok(1)) {
        sp::exit_now(1);
    }
    let _ = sp::close_range(ctl as u32, ctl as u32);
    let mut code = 0;
    loop {
        match stasis_sys::ptrace::waitpid(Pid(-1), 0) {
            Ok(stasis_sys::ptrace::WaitStatus::Exited(p, c)) if p == root => code = c,
            Ok(stasis_sys::ptrace::WaitStatus::Signaled(p, s)) if p == root => code = 128 + s,
            Ok(_) => {}
            Err(e) if e.0 == libc::EINTR => {}
            Err(_) => sp::exit_now(code),
        }
    }
}
