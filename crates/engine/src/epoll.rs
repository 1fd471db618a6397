//! epoll instances and their registrations.
//!
//! fdinfo lists each registration as "tfd: N events: X data: Y ...": the target's
//! descriptor number when it was registered, the event mask as the kernel keeps it and
//! the caller's cookie. The kernel knows a registration by (file, number), so restore must
//! make each with epoll_ctl in a process that holds the target at that very number.
//!
//! Dump therefore finds, for each epoll description of the tree, a process holding it
//! whose descriptor at every registered number is still the registered file (kcmp
//! KCMP_EPOLL_TFD), and saves each target with its description id. A target closed or
//! moved to another number in every holder is refused, as is an epoll registered in
//! another epoll. Restore creates the instance in the restorer (files::DescTable); the
//! restore child that installs the descriptor table of such a process makes the
//! registrations once its descriptors are in place. Level-triggered registrations find
//! their targets ready again by themselves; an edge-triggered one that is ready reports
//! one edge after restore, as on registration.
//!
//! A one-shot registration that already fired keeps only its flag bits, but epoll_ctl
//! always adds EPOLLERR and EPOLLHUP, so it would come back armed. It is registered first
//! for every event and fired at once with a zero-timeout epoll_wait, which disables it as
//! before; this needs the target ready for something (a pipe's write end, an eventfd,
//! ...), which dump checks.

use crate::error::{Error, Result};
use crate::files::DumpedFds;
use stasis_image::{EpollTarget, FdKind, ProcessRecord};
use stasis_sys::events as ev;
use stasis_sys::{Pid, RemoteFd};
use std::os::fd::{AsRawFd, OwnedFd};

/// The flag bits of a registration (not events): EPOLLWAKEUP, EPOLLONESHOT, EPOLLET,
/// EPOLLEXCLUSIVE.
const FLAG_BITS: u32 = (1 << 29) | (1 << 30) | (1 << 31) | (1 << 28);
const ONESHOT: u32 = 1 << 30;
/// Every event a target may report, to fire a disabled one-shot registration.
const ALL_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLPRI | libc::EPOLLOUT | libc::EPOLLRDNORM | libc::EPOLLRDBAND
    | libc::EPOLLWRNORM | libc::EPOLLWRBAND | libc::EPOLLMSG | libc::EPOLLRDHUP) as u32;

/// A one-shot registration that fired: it reports nothing until re-armed.
fn fired_oneshot(events: u32) -> bool {
    events & ONESHOT != 0 && events & !FLAG_BITS == 0
}

/// The registrations in an epoll's fdinfo, description ids not known yet.
pub fn parse(text: &str) -> std::result::Result<Vec<EpollTarget>, String> {
    let mut out: Vec<EpollTarget> = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("tfd:")) {
        let mut words = line.split_whitespace();
        let mut value = |key: &str| -> std::result::Result<&str, String> {
            match (words.next(), words.next()) {
                (Some(k), Some(v)) if k == key => Ok(v),
                _ => Err(format!("bad epoll line {line:?}")),
            }
        };
        let bad = || format!("bad epoll line {line:?}");
        let fd = value("tfd:")?.parse().map_err(|_| bad())?;
        let events = u32::from_str_radix(value("events:")?, 16).map_err(|_| bad())?;
        let data = u64::from_str_radix(value("data:")?, 16).map_err(|_| bad())?;
        if out.iter().any(|t| t.fd == fd) {
            return Err(format!("two registrations of fd {fd}"));
        }
        out.push(EpollTarget { fd, events, data, desc: 0 });
    }
    Ok(out)
}

pub fn dump(pid: Pid, path: &str, text: &str, flags: i32) -> Result<FdKind> {
    let targets = parse(text).map_err(|what| Error::ProcParse { pid, path: path.into(), what })?;
    Ok(FdKind::Epoll { flags, targets })
}

/// Once every description of the tree has its id: finds for each epoll description a
/// holder with every target at its registered number, and fills in the targets'
/// description ids (in every holder's record).
pub fn resolve(procs: &mut [(Pid, DumpedFds)], pidfds: &[(Pid, OwnedFd)]) -> Result<()> {
    let mut done: Vec<u64> = Vec::new();
    for pi in 0..procs.len() {
        for fi in 0..procs[pi].1.records.len() {
            let r = &procs[pi].1.records[fi];
            let FdKind::Epoll { targets, .. } = &r.kind else { continue };
            if done.contains(&r.desc) {
                continue;
            }
            let (desc, epfd, first_pid) = (r.desc, r.fd, procs[pi].0);
            let mut missing = None;
            let mut found = None;
            for (pid, d) in procs.iter() {
                let Some(e) = d.records.iter().find(|x| x.desc == desc) else { continue };
                match holder_targets(*pid, e.fd, targets, &d.records)? {
                    Ok(resolved) => {
                        found = Some((*pid, resolved));
                        break;
                    }
                    Err(fd) => {
                        missing.get_or_insert(fd);
                    }
                }
            }
            let Some((holder, resolved)) = found else {
                let fd = missing.unwrap_or(-1);
                return Err(Error::UnsupportedFd {
                    pid: first_pid,
                    fd: epfd,
                    kind: format!("epoll whose registered target fd {fd} is no longer open at that number (closed or moved)"),
                });
            };
            check_targets(holder, epfd, &resolved, procs, pidfds)?;
            for (_, d) in procs.iter_mut() {
                for x in d.records.iter_mut().filter(|x| x.desc == desc) {
                    if let FdKind::Epoll { targets, .. } = &mut x.kind {
                        targets.clone_from(&resolved);
                    }
                }
            }
            done.push(desc);
        }
    }
    Ok(())
}

/// The targets with their description ids if `pid` holds each at its registered number,
/// else the first number where it does not.
fn holder_targets(
    pid: Pid,
    epfd: i32,
    targets: &[EpollTarget],
    recs: &[stasis_image::FdRecord],
) -> Result<std::result::Result<Vec<EpollTarget>, i32>> {
    let mut out = Vec::new();
    for t in targets {
        let Some(rec) = recs.iter().find(|x| x.fd == t.fd) else { return Ok(Err(t.fd)) };
        match ev::kcmp_epoll_target(pid, RemoteFd(epfd), t.fd, RemoteFd(t.fd)) {
            Ok(true) => out.push(EpollTarget { desc: rec.desc, ..*t }),
            Ok(false) | Err(stasis_sys::Errno(libc::ENOENT)) => return Ok(Err(t.fd)),
            Err(e) => return Err(Error::Sys { pid, op: "kcmp(KCMP_EPOLL_TFD)", errno: e }),
        }
    }
    Ok(Ok(out))
}

/// What restore cannot make again: an epoll inside an epoll, a fired one-shot
/// registration of a target that is ready for nothing.
fn check_targets(pid: Pid, epfd: i32, targets: &[EpollTarget], procs: &[(Pid, DumpedFds)], pidfds: &[(Pid, OwnedFd)]) -> Result<()> {
    let recs = &procs.iter().find(|(p, _)| *p == pid).expect("the holder is a process of the tree").1.records;
    let refuse = |what: String| Error::UnsupportedFd { pid, fd: epfd, kind: what };
    for t in targets {
        let rec = recs.iter().find(|x| x.fd == t.fd).expect("resolved targets are held");
        if matches!(rec.kind, FdKind::Epoll { .. }) {
            return Err(refuse(format!("epoll registered in an epoll (target fd {})", t.fd)));
        }
        if fired_oneshot(t.events) {
            let pidfd = pidfds.iter().find(|(p, _)| *p == pid).map(|(_, f)| f).expect("a live holder has a pidfd");
            let own = stasis_sys::proc::pidfd_getfd(pidfd, RemoteFd(t.fd)).map_err(Error::sys(pid, "pidfd_getfd"))?;
            let ready = stasis_sys::proc::poll_now(own.as_raw_fd(), ALL_EVENTS as i16).map_err(Error::sys(pid, "poll"))?;
            if ready == 0 {
                return Err(refuse(format!(
                    "epoll with a one-shot registration of fd {} that fired and whose target is ready for nothing",
                    t.fd
                )));
            }
        }
    }
    Ok(())
}

/// An epoll descriptor of a process and the registrations to make on it.
pub type Registrations = (i32, Vec<EpollTarget>);

/// For each process of the image, the registrations it makes on restore: (epoll
/// descriptor, targets). The one that makes those of an epoll description is the first
/// process installing a descriptor table (`installs[i]`) that holds the description and
/// every target at its number.
pub fn plan(procs: &[ProcessRecord], installs: &[bool]) -> Result<Vec<Vec<Registrations>>> {
    let mut out: Vec<Vec<Registrations>> = vec![Vec::new(); procs.len()];
    let mut done: Vec<u64> = Vec::new();
    for p in procs {
        for r in &p.fds {
            let FdKind::Epoll { targets, .. } = &r.kind else { continue };
            let key = crate::files::desc_key(p.pid, r);
            if done.contains(&key) {
                continue;
            }
            let holds = |q: &ProcessRecord| -> Option<i32> {
                let e = q.fds.iter().find(|x| crate::files::desc_key(q.pid, x) == key)?;
                targets
                    .iter()
                    .all(|t| q.fds.iter().any(|x| x.fd == t.fd && crate::files::desc_key(q.pid, x) == t.desc))
                    .then_some(e.fd)
            };
            let who = procs.iter().enumerate().find_map(|(i, q)| {
                (installs[i] && q.zombie_status.is_none()).then(|| holds(q).map(|fd| (i, fd))).flatten()
            });
            let Some((i, fd)) = who else {
                return Err(Error::Incompatible(format!(
                    "pid {}: fd {}: no process of the image holds this epoll's targets at their numbers",
                    p.pid, r.fd
                )));
            };
            // Fired one-shot registrations first: see the module notes.
            let mut ordered = targets.clone();
            ordered.sort_by_key(|t| !fired_oneshot(t.events));
            out[i].push((fd, ordered));
            done.push(key);
        }
    }
    Ok(out)
}

/// A new epoll instance (its registrations come later, from a restore child).
pub fn create(pid: Pid, fd: i32, flags: i32) -> Result<OwnedFd> {
    let e = ev::epoll_create(libc::EPOLL_CLOEXEC)
        .map_err(|e| Error::Restore { pid, what: format!("fd {fd}: epoll_create1: {e}") })?;
    crate::files::set_flags(pid, &e, flags)?;
    Ok(e)
}

/// In the restore child, with its descriptors in place: the registrations `plan` gave it.
pub fn register_in_child(regs: &[Registrations]) -> std::result::Result<(), String> {
    for (epfd, targets) in regs {
        for t in targets {
            let fail = |op: &str, e: String| format!("epoll fd {epfd}: {op} of fd {}: {e}", t.fd);
            if fired_oneshot(t.events) {
                ev::epoll_add(*epfd, t.fd, t.events | ALL_EVENTS, t.data).map_err(|e| fail("EPOLL_CTL_ADD", e.to_string()))?;
                let got = ev::epoll_ready(*epfd, 4).map_err(|e| fail("epoll_wait", e.to_string()))?;
                if got.len() != 1 || got[0].1 != t.data {
                    return Err(fail("disabling the fired one-shot registration", format!("epoll_wait gave {got:?}")));
                }
            } else {
                ev::epoll_add(*epfd, t.fd, t.events, t.data).map_err(|e| fail("EPOLL_CTL_ADD", e.to_string()))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_from_fdinfo() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n\
            tfd:        6 events: 10000019 data:                8  pos:0 ino:40e sdev:10\n\
            tfd:        5 events: 40000000 data:                7  pos:0 ino:40e sdev:10\n\
            tfd:        9 events: 80000019 data:     deadbeefcafe  pos:0 ino:15a272 sdev:f\n";
        let t = parse(text).unwrap();
        let got: Vec<(i32, u32, u64)> = t.iter().map(|t| (t.fd, t.events, t.data)).collect();
        assert_eq!(got, vec![(6, 0x1000_0019, 8), (5, 0x4000_0000, 7), (9, 0x8000_0019, 0xdead_beef_cafe)]);
        assert!(fired_oneshot(t[1].events));
        assert!(!fired_oneshot(t[0].events) && !fired_oneshot(t[2].events));
        assert!(parse("tfd: 5 events: 1 data: 0\ntfd: 5 events: 1 data: 1\n").is_err());
        assert!(parse("tfd: 5 events: zz data: 0\n").is_err());
    }
}
